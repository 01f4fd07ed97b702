"""Objectives: the value of removing a set of blocks, for selectors that search.

Convention: an objective is a *loss*, LOWER = better set to remove. Every objective is memoised by the
``frozenset`` of blocks; :attr:`Objective.evaluations` counts the distinct sets really computed (a
cache hit is free). Selectors query through :meth:`Objective.counter`, a view that counts the distinct
sets *that selector* asked for, so a selector's reported cost does not depend on what other cells
sharing the cache asked before it.

Kinds built by :class:`ObjectiveFactory`:

``proxy_sum``
    ``loss(S) = -sum_{i in S} redundancy_i`` where ``redundancy`` is the single-block score oriented
    so that high = removable. Additive, so ``topk`` is optimal for it.
``proxy_span``
    ``S`` is split into maximal runs of consecutive blocks ``[l, l + n)``; ``loss(S) = sum over runs
    of importance(l, n)``, where ``importance`` is ``metric.score_spans(states, n)[l]`` oriented with
    the metric's ``higher_is_important`` (lower = more removable). It compares the state entering a
    run with the state leaving it, as Gromov et al.'s span method and MI-PRUN's data-processing
    argument do. Span scores are computed lazily, once per run length ``n``. For singleton runs it
    equals ``proxy_sum``.
``loss``
    The calibration loss of the model with ``S`` skipped (:func:`algorithms.models.masking.skip_blocks`,
    no copy): mean next-token NLL over the calibration ``input_ids`` (the protocol of
    :mod:`algorithms.evaluations.perplexity`), or its ``exp`` (perplexity) with ``true_loss="ppl"``. Runs in
    ``inference_mode`` on the model's device, ``batch_size`` sequences at a time.

Units: with ``unit="attention"`` or ``"mlp"`` the indices are blocks whose branch is removed. Two
attention branches of consecutive blocks are not consecutive in the residual stream (an MLP lies
between them), so every branch is its own run and ``proxy_span`` equals ``proxy_sum``; ``loss`` skips
the branches (:func:`algorithms.models.units.skip_units`). With ``unit="sublayer"`` the indices are
sub-layers in stream order (``2i`` attention, ``2i + 1`` MLP of block ``i``): consecutive indices are
consecutive steps of the residual stream, so ``proxy_span`` splits into the usual runs, scored on the
full sub-layer stream (``states`` must then be the ``(2L + 1, ...)`` stream, not the block states).

Any other callable ``frozenset[int] -> float`` can stand in for a kind (``custom={"loss": fn}``), which
is how the tests build objectives with a known optimum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from algorithms.models.prefix import PrefixStates

#: the kinds a selector's ``objective`` parameter may name
OBJECTIVE_KINDS = ("proxy_sum", "proxy_span", "loss")
PROXY_KINDS = ("proxy_sum", "proxy_span")


def runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as ``(start, length)``, in order: ``{1,2,5} -> [(1,2),(5,1)]``."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


#: bump when the calibration loss of a removal set (masking, NLL, prefix reuse) changes its numbers: it
#: enters the key of the loss journal a grid keeps (``cache/losses``)
LOSS_VERSION = "1"


def _key(blocks: Iterable[int]) -> frozenset[int]:
    return frozenset(int(b) for b in blocks)


class Objective:
    """A memoised loss over block sets (lower = better to remove).

    ``fn`` receives a ``frozenset[int]`` and returns a number; NaN is stored as ``+inf`` (a set that
    breaks the model is never preferred) so that comparisons stay total. ``on_new(blocks, value)``, when
    set, hears every value computed here, the moment it is memoised (not the values given by
    :meth:`seed`): the grid appends them to a journal, from which an interrupted search is seeded again.
    """

    def __init__(self, fn: Callable[[frozenset[int]], float], name: str = "custom",
                 anchor: Callable[[frozenset[int]], float | None] | None = None) -> None:
        self.fn = fn
        self.name = name
        self._anchor = anchor
        self.cache: dict[frozenset[int], float] = {}
        self.evaluations = 0  #: distinct sets really computed (cache misses)
        self.anchors = 0  #: :meth:`anchor` passes really run
        self.on_new: Callable[[frozenset[int], float], None] | None = None

    def __call__(self, blocks: Iterable[int]) -> float:
        key = _key(blocks)
        value = self.cache.get(key)
        if value is None:
            value = float(self.fn(key))
            if math.isnan(value):
                value = math.inf
            self._memoise(key, value)
        return value

    def _memoise(self, key: frozenset[int], value: float) -> None:
        self.cache[key] = value
        self.evaluations += 1
        if self.on_new is not None:
            self.on_new(key, value)

    def anchor(self, blocks: Iterable[int]) -> None:
        """A hint from a search: the sets it asks for next contain ``blocks`` (a greedy step). An objective
        that can use it prepares for them (the ``loss`` keeps the states of the model without ``blocks``
        at every depth, so each superset starts at its first block not in ``blocks``); no value changes.
        The value of ``blocks`` itself, computed on the way, is memoised (and counted when new)."""
        if self._anchor is None:
            return
        key = _key(blocks)
        value = self._anchor(key)
        if value is None:
            return
        self.anchors += 1
        if key not in self.cache:
            self._memoise(key, math.inf if math.isnan(value) else float(value))

    def cached(self, blocks: Iterable[int]) -> float | None:
        """The memoised value of ``blocks`` without computing it (None when unknown)."""
        return self.cache.get(_key(blocks))

    def seed(self, blocks: Iterable[int], value: float) -> None:
        """Store a value known from elsewhere (e.g. a resumed Optuna study); not counted."""
        self.cache.setdefault(_key(blocks), float(value))

    def counter(self) -> CountingObjective:
        return CountingObjective(self)

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, evaluations={self.evaluations})"


class CountingObjective:
    """A view of an :class:`Objective` that counts the distinct sets a selector queried through it.

    Sets marked with :meth:`prepaid` (values known from elsewhere, e.g. a resumed Optuna study) are
    memoised and never counted.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.name = objective.name
        self.seen: set[frozenset[int]] = set()
        self.prepaid_sets: set[frozenset[int]] = set()
        self._computed_before = objective.evaluations

    def __call__(self, blocks: Iterable[int]) -> float:
        key = _key(blocks)
        self.seen.add(key)
        return self.objective(key)

    def anchor(self, blocks: Iterable[int]) -> None:
        """:meth:`Objective.anchor` (a hint; counts nothing: the value of ``blocks`` is asked separately)."""
        self.objective.anchor(blocks)

    def prepaid(self, blocks: Iterable[int], value: float) -> None:
        """Memoise a value known from elsewhere; querying that set later costs nothing."""
        key = _key(blocks)
        self.objective.seed(key, value)
        self.prepaid_sets.add(key)

    @property
    def evaluations(self) -> int:
        """Distinct sets this view asked for, prepaid ones excluded (the cost on a cold cache)."""
        return len(self.seen - self.prepaid_sets)

    @property
    def computed(self) -> int:
        """Sets really computed since the view was made (fewer when a shared cache already held some)."""
        return self.objective.evaluations - self._computed_before


class ObjectiveFactory:
    """Builds and memoises the objectives of one (model, calibration batch, metric).

    Every argument is optional; asking for a kind whose inputs are missing raises a ``ValueError``
    naming them. ``states`` may be a tensor or a zero-argument callable returning one (so a runner can
    defer a host-to-device copy until a span objective is really needed). ``block_scores`` (raw metric
    orientation) seeds the length-1 span scores, so ``proxy_sum`` agrees exactly with the scores a
    selection problem carries. ``share`` is another factory whose ``loss`` objective (which does not
    depend on the metric) is reused, so cells with different metrics on the same model and
    calibration batch share true-loss evaluations; ``loss`` passes that objective in directly.
    ``run_score(start, length)`` scores a run of blocks for ``proxy_span`` when the metric has no
    hidden-state span scores (a model metric). ``fingerprint`` identifies model + calibration
    data (it enters Optuna study names).
    """

    def __init__(
        self,
        *,
        model: Any = None,
        input_ids: torch.Tensor | None = None,
        states: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        metric: Any = None,
        higher_is_important: bool | None = None,
        block_scores: torch.Tensor | None = None,
        batch_size: int = 4,
        true_loss: str = "nll",
        custom: Mapping[str, Callable[[frozenset[int]], float]] | None = None,
        share: ObjectiveFactory | None = None,
        span_scores: Callable[[int], torch.Tensor] | None = None,
        fingerprint: str | None = None,
        unit: str = "block",
        loss: Objective | None = None,
        run_score: Callable[[int, int], float] | None = None,
        prefix: PrefixStates | Callable[[], PrefixStates | None] | None = None,
    ) -> None:
        if true_loss not in ("nll", "ppl"):
            raise ValueError(f"true_loss must be 'nll' or 'ppl', got {true_loss!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if higher_is_important is None and metric is not None:
            higher_is_important = bool(type(metric).higher_is_important)
        self.model = model
        self.input_ids = input_ids
        self._states = states
        self.metric = metric
        self.higher_is_important = higher_is_important
        self.batch_size = batch_size
        self.true_loss = true_loss
        self.custom = dict(custom or {})
        self.fingerprint = fingerprint
        self.unit = unit
        #: the dense model's states on ``input_ids`` in ``batch_size`` batches (the captured hidden states):
        #: the ``loss`` of a set starts at its first removed block (:mod:`algorithms.models.prefix`)
        self._prefix = prefix
        #: the states of the model without the set a greedy search has chosen so far (:meth:`Objective.anchor`)
        self._anchor: PrefixStates | None = None
        self._span_fn = span_scores
        self._objectives: dict[str, Objective] = {}
        #: model-level objectives (``loss``), shared with ``share`` when it wraps the same model and ids
        same = (share is not None and share.model is model and share.input_ids is input_ids
                and share.unit == unit)
        self._shared: dict[str, Objective] = share._shared if same else {}
        if loss is not None:  # a memoised loss of this model and these windows, kept by the caller
            self._shared["loss"] = loss
        #: (start, length) -> score of the run (raw orientation), for metrics whose run scores do not come
        #: from hidden states (model metrics: :meth:`algorithms.model_metrics.ModelMetric.span_score`)
        self._run_score = run_score
        self._runs: dict[tuple[int, int], float] = {}
        self._spans: dict[int, list[float]] = {}
        if block_scores is not None:
            self._spans[1] = [float(v) for v in torch.as_tensor(block_scores, dtype=torch.float64).tolist()]

    # ------------------------------------------------------------------ public
    def get(self, kind: str) -> Objective:
        """The memoised objective of ``kind`` (``proxy_sum``, ``proxy_span``, ``loss`` or a custom name)."""
        if kind == "loss" and kind not in self.custom:
            if kind not in self._shared:
                self._shared[kind] = self._build(kind)
            return self._shared[kind]
        if kind not in self._objectives:
            self._objectives[kind] = self._build(kind)
        return self._objectives[kind]

    def describe(self) -> dict[str, Any]:
        """What identifies these objectives (enters study names and records)."""
        return {
            "fingerprint": self.fingerprint,
            "metric": self.metric.describe() if hasattr(self.metric, "describe") else None,
            "higher_is_important": self.higher_is_important,
            "true_loss": self.true_loss,
            **({"unit": self.unit} if self.unit != "block" else {}),
            "custom": sorted(self.custom),
        }

    def span_importance(self, start: int, length: int) -> float:
        """Importance of the run ``[start, start + length)`` (lower = more removable)."""
        if length > 1 and self._run_score is not None:
            if (start, length) not in self._runs:
                self._runs[start, length] = float(self._run_score(start, length))
            raw = self._runs[start, length]
        else:
            raw = self._span_scores(length)[start]
        return raw if self.higher_is_important else -raw

    # ------------------------------------------------------------------ builders
    def _build(self, kind: str) -> Objective:
        if kind in self.custom:
            return Objective(self.custom[kind], name=kind)
        if kind == "proxy_sum":
            self._need("proxy_sum", states_or_scores=True)
            return Objective(lambda s: sum(self.span_importance(b, 1) for b in s), name=kind)
        if kind == "proxy_span":
            self._need("proxy_span", states_or_scores=False)
            contiguous = self.unit in ("block", "sublayer")  # runs of indices are runs of the stream
            split = runs if contiguous else (lambda s: [(b, 1) for b in sorted(s)])
            return Objective(lambda s: sum(self.span_importance(start, n) for start, n in split(s)), name=kind)
        if kind == "loss":
            missing = [n for n, v in (("model", self.model), ("input_ids", self.input_ids)) if v is None]
            if missing:
                raise ValueError(f"objective 'loss' needs {' and '.join(missing)}; this factory has none")
            return Objective(self._calibration_loss, name=kind, anchor=self._anchor_loss)
        raise ValueError(f"unknown objective {kind!r}; known: {', '.join(OBJECTIVE_KINDS + tuple(self.custom))}")

    def _need(self, kind: str, *, states_or_scores: bool) -> None:
        if self.higher_is_important is None:
            raise ValueError(f"objective {kind!r} needs the metric's orientation (higher_is_important)")
        if states_or_scores and 1 in self._spans:
            return
        if self._span_fn is None and self._run_score is None and (self._states is None or self.metric is None):
            raise ValueError(f"objective {kind!r} needs hidden states and a metric; this factory lacks them")

    def _span_scores(self, n: int) -> list[float]:
        if n not in self._spans and self._span_fn is not None:
            self._spans[n] = [float(v) for v in torch.as_tensor(self._span_fn(n)).tolist()]
        if n not in self._spans:
            states = self._states() if callable(self._states) else self._states
            if states is None or self.metric is None:
                raise ValueError(f"span scores of length {n} need hidden states and a metric")
            self._states = states  # resolve a lazy callable once
            # every missing length up to n in one pass: each depth is prepared once for all of them, and
            # a search that needs runs of length n needs the shorter ones too
            missing = [m for m in range(1, n + 1) if m not in self._spans]
            with torch.inference_mode():
                for m, scores in self.metric.score_span_lengths(states, missing).items():
                    self._spans[m] = [float(v) for v in scores.cpu().tolist()]
        return self._spans[n]

    def _dense_prefix(self) -> PrefixStates | None:
        if callable(self._prefix):
            self._prefix = self._prefix()  # resolve a lazy prefix once
        return self._prefix

    def _start(self, blocks: frozenset[int]) -> PrefixStates | None:
        """The kept states (dense, or the anchor's) from which the model without ``blocks`` starts deepest."""
        kept = [p for p in (self._dense_prefix(), self._anchor) if p is not None]
        return max(kept, key=lambda p: p.resume_depth(blocks, self.unit), default=None)

    def _calibration_loss(self, blocks: frozenset[int]) -> float:
        from algorithms.models.nll import mean_nll
        from algorithms.models.prefix import resumed_without
        from algorithms.models.units import skip_units

        start = self._start(blocks)
        with skip_units(self.model, self.unit, sorted(blocks)) as model, \
                contextlib.nullcontext(model) if start is None else resumed_without(model, start, blocks, self.unit):
            nll, _ = mean_nll(model, self.input_ids, batch_size=self.batch_size)
        return self._value(nll)

    def _value(self, nll: float) -> float:
        from algorithms.models.nll import perplexity_of

        return perplexity_of(nll) if self.true_loss == "ppl" else nll

    def _anchor_loss(self, blocks: frozenset[int]) -> float | None:
        """Keep the states of the model without ``blocks`` at the dense prefix's depths (replacing the
        previous anchor; memory: at most one more set of captured states), computed from the deepest
        kept states; returns its loss. ``None`` (nothing kept) without a dense prefix or for no blocks."""
        from algorithms.models.nll import mean_nll
        from algorithms.models.prefix import resumed_recording
        from algorithms.models.units import skip_units

        dense = self._dense_prefix()
        if dense is None or not blocks:
            return None
        if self._anchor is not None and self._anchor.removed == blocks and self._anchor.unit == self.unit:
            return None
        start = self._start(blocks)
        self._anchor = None  # the new anchor shares the states it starts from; the rest of the old one goes
        with skip_units(self.model, self.unit, sorted(blocks)) as model, \
                resumed_recording(model, start, dense.depths, blocks, self.unit) as (started, anchor):
            nll, _ = mean_nll(started, self.input_ids, batch_size=self.batch_size)
        self._anchor = anchor
        return self._value(nll)
