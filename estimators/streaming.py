"""Scoring from states streamed batch by batch: memory that does not grow with calibration tokens.

The stored path (:meth:`estimators.base.Metric.score_span_lengths`) needs every hidden state of a
calibration group at once, ``(L + 1, samples, seq_len, d)``: 141 GB for SLEB's 128 × 2048 tokens on
Llama-3-8B. A metric that says how it can be scored from a stream (:meth:`Metric.stream_kind
<estimators.base.Metric.stream_kind>`) is instead fed each capture batch ``(depths, b, seq_len, d)``
as it leaves the model and keeps only what its scores need:

``tokens``
    A mean over tokens of a per-token value (:meth:`~estimators.base.Metric.token_values`: ``bi``,
    ``angular``): float64 sums for every (start depth, span length). Memory ``O(L · max_length)``.
``moments``
    A function of means and covariances (``mi_gauss``, ``cka_linear``): float64 sums of each depth's
    features and their products, and of the cross-products of every depth pair a span needs, shifted by
    the first batch's mean against cancellation (float32 products, as the stored path's). Memory
    ``O((L + 1 + L · max_length) d²)``, whatever the token count.
``sample``
    A seeded token sample (``hsic``, ``mi_ksg``, ``mi_renyi``): the rows the stored path would draw
    (:func:`estimators.tensors.sample_rows`), gathered as their batches pass; scored on the sample
    exactly as the stored path scores it. Memory ``O(L · n_tokens · d)``.

Span lengths up to ``max_length`` are accumulated (a selector's runs and the shared ``proxy_span`` of a
chosen set need spans up to the set's size). ``tokens`` and ``sample`` scores equal the stored path's
(the same per-token values and rows; sums in float64); ``moments`` scores equal them up to rounding
(``tests/test_streaming.py`` bounds the difference on SmolLM2 states). A metric whose ``stream_kind``
is None (the default, so any plugin that says nothing) is scored from stored states.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from estimators.base import Metric
from estimators.tensors import no_tf32, sample_rows

Tensor = torch.Tensor

#: the kinds :meth:`Metric.stream_kind` may return
STREAM_KINDS = ("tokens", "moments", "sample")


@dataclass(frozen=True)
class Moments:
    """One depth's token statistics, float64: ``n`` tokens, feature ``mean`` (d,), covariance ``cov``
    (d, d, ddof 1)."""

    n: int
    mean: Tensor
    cov: Tensor


class Accumulator(abc.ABC):
    """What a metric keeps of a stream of ``depths`` depths: :meth:`update` with each batch, then
    :meth:`span_lengths` (span lengths up to ``max_length``)."""

    def __init__(self, metric: Metric, depths: int, max_length: int) -> None:
        if depths < 2:
            raise ValueError(f"a stream needs at least two depths (one block), got {depths}")
        if not 1 <= max_length <= depths - 1:
            raise ValueError(f"max_length must be in [1, {depths - 1}], got {max_length}")
        self.metric, self.depths, self.max_length = metric, depths, max_length
        self.batches = 0

    @abc.abstractmethod
    def update(self, batch: Tensor, rows: slice) -> None:
        """Take one capture batch ``(depths, b, seq_len, d)``: the states of calibration samples ``rows``."""

    @abc.abstractmethod
    def _spans(self, lengths: list[int], metric: Metric) -> dict[int, Tensor]:
        """Scores of every span of each length (all checked, none longer than ``max_length``)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes this accumulator holds (its memory, which no token count changes)."""

    def span_lengths(self, lengths: Iterable[int], metric: Metric | None = None) -> dict[int, Tensor]:
        """``{n: scores of the L - n + 1 spans of n blocks}``, float64 on the CPU, as
        :meth:`Metric.score_span_lengths <estimators.base.Metric.score_span_lengths>` returns them;
        ``metric``: another metric that shares what this one kept (:func:`shared_accumulators`)."""
        if self.batches == 0:
            raise ValueError("no batch was streamed: nothing to score")
        lengths = sorted(set(lengths))
        for n in lengths:
            if not isinstance(n, int) or not 1 <= n <= self.max_length:
                raise ValueError(f"span length {n!r}: this stream kept spans of 1 to {self.max_length} blocks "
                                 f"(max_length); score longer spans from stored states")
        return {n: scores.to("cpu", torch.float64) for n, scores in self._spans(lengths, metric or self.metric).items()}

    def share_key(self) -> tuple | None:
        """What this accumulator's state depends on, when other metrics can score from the same state
        (equal keys: one accumulator feeds them all); None when it is the metric's own."""
        return None

    def _pairs(self) -> Iterable[tuple[int, int]]:
        """(start depth, span length) of every span kept."""
        for start in range(self.depths - 1):
            for n in range(1, min(self.max_length, self.depths - 1 - start) + 1):
                yield start, n


class TokenAccumulator(Accumulator):
    """``tokens`` kind: float64 sums of :meth:`Metric.token_values` per (start, length), and the count."""

    def __init__(self, metric: Metric, depths: int, max_length: int) -> None:
        super().__init__(metric, depths, max_length)
        self.sums: Tensor | None = None  # (depths - 1, max_length)
        self.count = 0

    def update(self, batch: Tensor, rows: slice) -> None:
        picked = self.metric.select_tokens(batch)
        if self.sums is None:
            self.sums = torch.zeros(self.depths - 1, self.max_length, dtype=torch.float64, device=batch.device)
        for start, n in self._pairs():
            values = self.metric.token_values(picked[start], picked[start + n])
            self.sums[start, n - 1] += values.to(torch.float64).sum()
        self.count += picked[0, ..., 0].numel()
        self.batches += 1

    def _spans(self, lengths: list[int], metric: Metric) -> dict[int, Tensor]:
        assert self.sums is not None and metric is self.metric, "token sums are their metric's own"
        return {n: self.sums[: self.depths - n, n - 1] / self.count for n in lengths}

    @property
    def nbytes(self) -> int:
        return 0 if self.sums is None else self.sums.numel() * 8


class MomentAccumulator(Accumulator):
    """``moments`` kind: per depth the sum of (shifted) features and of their products, per kept span the
    sum of cross-products, all float64; then :meth:`Metric.prepare_moments` per depth and
    :meth:`Metric.compare_moments` per span."""

    def __init__(self, metric: Metric, depths: int, max_length: int) -> None:
        super().__init__(metric, depths, max_length)
        self.n = 0
        self.shift: Tensor | None = None  # (depths, d): the first batch's mean per depth
        self.s1: Tensor | None = None  # (depths, d)
        self.s2: Tensor | None = None  # (depths, d, d)
        self.cross: dict[tuple[int, int], Tensor] = {}  # (start, length) -> (d, d)

    def update(self, batch: Tensor, rows: slice) -> None:
        picked = self.metric.select_tokens(batch)
        flat = picked.reshape(self.depths, -1, picked.shape[-1])
        work = torch.float64 if flat.dtype == torch.float64 else torch.float32
        if self.shift is None:
            # the first batch's mean, rounded to the working precision: the covariance does not depend on
            # the shift, only on its being the same for every batch (the mean adds it back in float64)
            self.shift = flat.to(torch.float64).mean(1).to(work)
            d = flat.shape[-1]
            self.s1 = torch.zeros(self.depths, d, dtype=torch.float64, device=flat.device)
            self.s2 = torch.zeros(self.depths, d, d, dtype=torch.float64, device=flat.device)
        assert self.s1 is not None and self.s2 is not None
        # shifted by a fixed mean, so large offsets cancel before the products; a constant feature is 0
        z = flat.to(work) - self.shift[:, None]
        with no_tf32():
            self.s1 += z.sum(1, dtype=torch.float64)
            self.s2 += (z.transpose(1, 2) @ z).to(torch.float64)
            for start, n in self._pairs():
                product = (z[start].T @ z[start + n]).to(torch.float64)
                if (start, n) in self.cross:
                    self.cross[start, n] += product
                else:
                    self.cross[start, n] = product
        self.n += flat.shape[1]
        self.batches += 1

    def moments(self, depth: int) -> Moments:
        assert self.s1 is not None and self.s2 is not None and self.shift is not None
        m = self.s1[depth] / self.n
        cov = (self.s2[depth] - self.n * torch.outer(m, m)) / (self.n - 1)
        return Moments(self.n, self.shift[depth].to(torch.float64) + m, cov)

    def _cross_covariance(self, start: int, n: int) -> Tensor:
        assert self.s1 is not None
        mx, my = self.s1[start] / self.n, self.s1[start + n] / self.n
        return (self.cross[start, n] - self.n * torch.outer(mx, my)) / (self.n - 1)

    def share_key(self) -> tuple | None:
        # the sums depend on the tokens only: metrics that keep every token share them
        if type(self.metric).select_tokens is not Metric.select_tokens:
            return None
        return ("moments", self.depths)

    def _spans(self, lengths: list[int], metric: Metric) -> dict[int, Tensor]:
        if self.n < 2:
            raise ValueError(f"moments need at least 2 tokens, got {self.n}")
        sides: dict[int, Any] = {}

        def side(depth: int) -> Any:
            if depth not in sides:
                sides[depth] = metric.prepare_moments(self.moments(depth))
            return sides[depth]

        out = {}
        for n in lengths:
            out[n] = torch.stack([
                metric.compare_moments(side(start), side(start + n), self._cross_covariance(start, n))
                .to(torch.float64).reshape(()) for start in range(self.depths - n)])
        return out

    @property
    def nbytes(self) -> int:
        if self.s2 is None:
            return 0
        return 8 * (self.s2.numel() + 2 * self.s1.numel() + sum(c.numel() for c in self.cross.values()))


class SampleAccumulator(Accumulator):
    """``sample`` kind: the rows the stored path draws (:meth:`Metric.sample_spec`), at every depth,
    gathered as their batches pass; scored with :meth:`Metric.score_sample`."""

    def __init__(self, metric: Metric, depths: int, max_length: int, *, samples: int, seq_len: int) -> None:
        super().__init__(metric, depths, max_length)
        n_tokens, seed = metric.sample_spec()
        self.population = samples * seq_len
        #: flat token index (sample-major) of each kept row, in draw order; None: every token, in order
        self.rows = sample_rows(self.population, n_tokens, seed)
        self.seq_len = seq_len
        self.sample: Tensor | None = None  # (depths, n, d)
        self.filled = 0

    def update(self, batch: Tensor, rows: slice) -> None:
        flat = batch.reshape(self.depths, -1, batch.shape[-1])
        if self.sample is None:
            n = self.population if self.rows is None else self.rows.numel()
            self.sample = torch.empty(self.depths, n, flat.shape[-1], dtype=flat.dtype, device=flat.device)
        first, stop = rows.start * self.seq_len, rows.start * self.seq_len + flat.shape[1]
        if self.rows is None:
            self.sample[:, first:stop] = flat
            self.filled += flat.shape[1]
        else:
            where = ((self.rows >= first) & (self.rows < stop)).nonzero().flatten()
            self.sample[:, where.to(flat.device)] = flat[:, (self.rows[where] - first).to(flat.device)]
            self.filled += where.numel()
        self.batches += 1

    def share_key(self) -> tuple | None:
        return ("sample", self.depths, self.population, *self.metric.sample_spec())

    def _spans(self, lengths: list[int], metric: Metric) -> dict[int, Tensor]:
        assert self.sample is not None
        if self.filled != self.sample.shape[1]:
            raise ValueError(f"the stream covered {self.filled} of the {self.sample.shape[1]} sampled tokens")
        return metric.score_sample(self.sample[:, None], self.population, lengths)

    @property
    def nbytes(self) -> int:
        return 0 if self.sample is None else self.sample.numel() * self.sample.element_size()


def accumulator(metric: Metric, *, depths: int, samples: int, seq_len: int, max_length: int = 1) -> Accumulator | None:
    """The accumulator of ``metric``'s :meth:`~estimators.base.Metric.stream_kind` for a stream of
    ``depths`` depths over ``samples × seq_len`` tokens; None when the metric needs stored states."""
    kind = metric.stream_kind()
    if kind is None:
        return None
    if kind == "tokens":
        return TokenAccumulator(metric, depths, max_length)
    if kind == "moments":
        return MomentAccumulator(metric, depths, max_length)
    if kind == "sample":
        return SampleAccumulator(metric, depths, max_length, samples=samples, seq_len=seq_len)
    raise ValueError(f"metric {metric.name!r}: stream_kind() returned {kind!r}; expected one of "
                     f"{', '.join(STREAM_KINDS)} or None")


@dataclass(frozen=True)
class MetricStream:
    """One metric's scores from an accumulator it may share with other metrics."""

    accumulator: Accumulator
    metric: Metric

    def span_lengths(self, lengths: Iterable[int]) -> dict[int, Tensor]:
        return self.accumulator.span_lengths(lengths, self.metric)


def shared_accumulators(
    requests: dict[str, tuple[Metric, int, int]], *, samples: int, seq_len: int,
) -> tuple[list[Accumulator], dict[str, MetricStream]]:
    """Accumulators for several metrics of one stream: ``requests`` maps a name to ``(metric, depths,
    max_length)``. Metrics whose accumulators keep the same state (:meth:`Accumulator.share_key`: the
    moments of every token, the same token sample) share one, kept for the longest span any of them
    needs: ``mi_gauss`` and ``cka_linear`` one set of covariances, ``hsic`` and ``mi_ksg`` at their
    default ``n_tokens`` (2048) and ``seed`` one sample (``mi_renyi``'s default is 512 tokens: its own). Returns the accumulators to feed (each once
    per batch) and each name's :class:`MetricStream`; a metric without a stream kind is left out."""
    wanted: dict[str, tuple[Accumulator, Metric]] = {}
    lengths: dict[tuple, int] = {}
    for name, (metric, depths, max_length) in requests.items():
        acc = accumulator(metric, depths=depths, samples=samples, seq_len=seq_len, max_length=max_length)
        if acc is None:
            continue
        key = acc.share_key()
        if key is not None:
            lengths[key] = max(lengths.get(key, 1), max_length)
        wanted[name] = (acc, metric)
    feeds: dict[Any, Accumulator] = {}
    out = {}
    for name, (acc, metric) in wanted.items():
        key = acc.share_key()
        if key is None:
            feeds[name, None] = acc
        else:
            if key not in feeds:
                feeds[key] = accumulator(metric, depths=acc.depths, samples=samples, seq_len=seq_len,
                                         max_length=lengths[key])
            acc = feeds[key]
        out[name] = MetricStream(acc, metric)
    return list(feeds.values()), out


def stream_scores(metric: Metric, states: Tensor, *, batch_size: int, lengths: Iterable[int] = (1,)) -> dict[int, Tensor]:
    """Score stored ``states`` ``(depths, samples, seq_len, d)`` by streaming them ``batch_size`` samples
    at a time (what capture does without storing them): the streamed counterpart of
    :meth:`Metric.score_span_lengths <estimators.base.Metric.score_span_lengths>`, for tests and checks."""
    lengths = sorted(set(lengths))
    acc = accumulator(metric, depths=states.shape[0], samples=states.shape[1], seq_len=states.shape[2],
                      max_length=max(lengths))
    if acc is None:
        raise ValueError(f"metric {metric.name!r} has no stream kind: it is scored from stored states")
    for start in range(0, states.shape[1], batch_size):
        rows = slice(start, min(start + batch_size, states.shape[1]))
        acc.update(states[:, rows], rows)
    return acc.span_lengths(lengths)
