"""Metric base class: thin objects over :mod:`estimators.functional`.

Hidden states are one tensor ``states`` of shape ``(L + 1, samples, seq_len, d)``: ``states[i]`` is
the hidden state *entering* block ``i`` and ``states[L]`` the raw output of the last block (captured
with hooks, before the final norm). A block's score compares ``states[i]`` with ``states[i + 1]``; a
span of ``n`` blocks starting at ``l`` compares ``states[l]`` with ``states[l + n]``.

A subclass sets ``name``, ``higher_is_important`` and implements :meth:`pair`. ``version`` enters
every cell id, so bump it whenever the numbers a metric returns change.

Scoring every block touches each depth twice (as the output of block ``i - 1`` and the input of block
``i``). A metric with per-depth work (a kernel matrix, a standardisation, a projection) overrides
:meth:`prepare` and :meth:`compare` as well, so :meth:`score_spans` does that work once per depth:
``L + 1`` preparations for ``L`` blocks instead of ``2L``. ``pair(x, y)`` must equal
``compare(prepare(x), prepare(y))``; ``estimators.testing.check_metric`` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from estimators.checks import is_int

Tensor = torch.Tensor


class Metric:
    """Base class of block-importance metrics."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    #: True when a high score marks a block that matters (keep it); False when high means redundant.
    higher_is_important: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params = params
        #: set while :meth:`score_sample` scores a token sample: the number of tokens it was drawn from
        self.population: int | None = None

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        """Score between the same tokens at two depths, ``x`` and ``y`` of shape ``(..., d)``."""
        raise NotImplementedError

    def prepare(self, z: Tensor) -> Any:
        """Per-depth work on the (token-selected) states ``z`` of one depth, shared by every pair that
        uses that depth. Default: none, the states themselves."""
        return z

    def compare(self, a: Any, b: Any) -> Tensor:
        """Score between two prepared depths. Default: :meth:`pair` on the states :meth:`prepare`
        passed through."""
        return self.pair(a, b)

    def check_input(self, n_tokens: int, width: int) -> None:
        """Raise ``ValueError`` when states of ``n_tokens`` tokens and ``width`` features cannot be
        scored (``bench validate`` calls it before anything runs). Default: anything goes."""

    def select_tokens(self, states: Tensor) -> Tensor:
        """The tokens this metric scores, from ``states`` of shape ``(L + 1, samples, seq_len, d)``, in the
        same layout (every depth keeps the same tokens). :meth:`score_spans` applies it once before
        :meth:`prepare`; ``pair`` and ``compare`` see only what it keeps. Default: every token."""
        return states

    # ------------------------------------------------------------------ streamed scoring
    def stream_kind(self) -> str | None:
        """How this metric is scored from states streamed batch by batch, without storing them
        (:mod:`estimators.streaming`): ``"tokens"`` (a mean of :meth:`token_values`), ``"moments"``
        (:meth:`prepare_moments` / :meth:`compare_moments` on float64 covariances), ``"sample"`` (a seeded
        token sample, :meth:`sample_spec`, scored by :meth:`score_sample`), or None: it needs every
        state at once and is scored from the stored tensor (the default, so a plugin that says nothing
        is scored as before)."""
        return None

    def token_values(self, x: Tensor, y: Tensor) -> Tensor:
        """``tokens`` kind: one value per token of ``x`` and ``y`` ``(..., d)``, flattened; the score is
        their mean, so ``pair(x, y) == token_values(x, y).mean()``."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token values")

    def prepare_moments(self, moments: Any) -> Any:
        """``moments`` kind: per-depth work on one depth's :class:`estimators.streaming.Moments`."""
        raise NotImplementedError(f"{type(self).__name__} is not scored from moments")

    def compare_moments(self, a: Any, b: Any, cross: Tensor) -> Tensor:
        """``moments`` kind: the score of two prepared depths and their float64 cross-covariance
        ``(dx, dy)`` (ddof 1)."""
        raise NotImplementedError(f"{type(self).__name__} is not scored from moments")

    def sample_spec(self) -> tuple[int | None, int]:
        """``sample`` kind: ``(n_tokens, seed)`` of the token sample every depth is scored on (the rows
        :func:`estimators.tensors.sample_tokens` draws with a generator seeded with ``seed``; None: all)."""
        raise NotImplementedError(f"{type(self).__name__} does not score a token sample")

    def score_sample(self, sample: Tensor, population: int, lengths: Iterable[int]) -> dict[int, Tensor]:
        """``sample`` kind: :meth:`score_span_lengths` of ``sample`` ``(depths, 1, n, d)``, the rows
        :meth:`sample_spec` draws from ``population`` tokens; :attr:`population` is set meanwhile, so
        :meth:`prepare` moves its random generator on as if it had drawn them (then it equals the stored
        path bit for bit)."""
        self.population = population
        try:
            return self.score_span_lengths(sample, lengths)
        finally:
            self.population = None

    @staticmethod
    def _check_states(states: Tensor) -> None:
        if states.dim() != 4:
            raise ValueError(f"states must have shape (L+1, samples, seq_len, d), got {tuple(states.shape)}")
        if states.shape[0] < 2:
            raise ValueError("states must hold at least one block (two depths)")

    def score_spans(self, states: Tensor, n: int = 1) -> Tensor:
        """Scores of every span of ``n`` consecutive blocks, shape ``(L - n + 1,)``, float64."""
        return self._span_lengths(states, [n])[n]

    def score_span_lengths(self, states: Tensor, lengths: Iterable[int]) -> dict[int, Tensor]:
        """:meth:`score_spans` for several span lengths in one pass over the depths: each depth is
        prepared once whatever the number of lengths, and at most ``max(lengths) + 1`` prepared depths
        are alive at a time. Returns ``{n: scores of shape (L - n + 1,)}``. A subclass that overrides
        :meth:`score_spans` keeps its own way: it is called once per length."""
        if type(self).score_spans is not Metric.score_spans:
            return {n: self.score_spans(states, n) for n in self._lengths(states, lengths)}
        return self._span_lengths(states, lengths)

    def _lengths(self, states: Tensor, lengths: Iterable[int]) -> list[int]:
        self._check_states(states)
        n_blocks = states.shape[0] - 1
        lengths = list(lengths)
        for n in lengths:
            if not is_int(n, 1) or n > n_blocks:
                raise ValueError(f"span length n={n!r} must be an int in [1, {n_blocks}]")
        return sorted(set(lengths))

    def _span_lengths(self, states: Tensor, lengths: Iterable[int]) -> dict[int, Tensor]:
        lengths = self._lengths(states, lengths)
        if not lengths:
            return {}
        n_blocks = states.shape[0] - 1
        picked = self.select_tokens(states)
        prepared: dict[int, Any] = {}  # depth -> prepare(depth)

        def depth(i: int) -> Any:
            if i not in prepared:
                prepared[i] = self.prepare(picked[i])
            return prepared[i]

        scores: dict[int, list[Tensor]] = {n: [] for n in lengths}
        for start in range(n_blocks - lengths[0] + 1):
            for n in lengths:
                if start + n <= n_blocks:
                    scores[n].append(self.compare(depth(start), depth(start + n)))
            del prepared[start]  # it ended the spans that start before it and starts none after this
        return {n: torch.stack([v.to(torch.float64).reshape(()) for v in row]) for n, row in scores.items()}

    def score_blocks(self, states: Tensor) -> Tensor:
        """One score per block, shape ``(L,)``, float64."""
        return self.score_spans(states, 1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": dict(self.params)}
