"""The contract every metric meets, built-in or plugin, as plain functions a plugin author calls from
their own tests (``from estimators.testing import check_metric``; ``algorithms.testing`` has
``check_selector``). blockbench runs its built-ins through the same functions.

Each check raises ``AssertionError`` with what is wrong; it needs only torch (no model, no data).
"""

from __future__ import annotations

import torch

from estimators.base import Metric


def _metric_class(metric: type[Metric] | str) -> type[Metric]:
    if isinstance(metric, str):
        from estimators import METRICS

        return METRICS.get(metric)
    return metric


def check_scores_per_block_and_span(metric: type[Metric] | str, **params) -> None:
    """Shapes ``(L,)`` and ``(L - n + 1,)``, float64, finite; a span of one block equals the block;
    each block's score equals :meth:`~estimators.base.Metric.pair` on its two depths (so a metric's
    shared per-depth work, ``prepare``/``compare``, changes no number)."""
    cls = _metric_class(metric)
    g = torch.Generator().manual_seed(7)
    states = torch.randn(5, 4, 64, 16, generator=g)  # L=4 blocks, N=256 tokens, d=16
    m = cls(**params)
    assert isinstance(m, Metric), f"{cls!r}() is not a Metric"
    assert m.name, f"{cls.__name__} sets no `name`"
    blocks, spans = m.score_blocks(states), m.score_spans(states, 2)
    assert blocks.shape == (4,), f"score_blocks shape {tuple(blocks.shape)}, expected (4,)"
    assert spans.shape == (3,), f"score_spans(n=2) shape {tuple(spans.shape)}, expected (3,)"
    assert blocks.dtype == spans.dtype == torch.float64, f"scores are {blocks.dtype}, expected float64"
    assert torch.isfinite(blocks).all() and torch.isfinite(spans).all(), (
        f"non-finite scores {blocks}, {spans}"
    )
    torch.testing.assert_close(m.score_spans(states, 1), blocks, msg="a span of one block is not the block")
    picked = m.select_tokens(states)
    pairs = torch.stack([m.pair(picked[i], picked[i + 1]).to(torch.float64).reshape(()) for i in range(4)])
    torch.testing.assert_close(
        blocks, pairs, msg=f"score_blocks {blocks.tolist()} differs from pair() {pairs.tolist()}: check prepare/compare"
    )


def check_orientation(metric: type[Metric] | str, **params) -> None:
    """A block that barely changes the stream comes out more redundant than one that rewrites it,
    read through the metric's ``higher_is_important``."""
    cls = _metric_class(metric)
    g = torch.Generator().manual_seed(8)
    s0 = torch.randn(4, 128, 16, generator=g)
    s1 = s0 + 0.1 * torch.randn(4, 128, 16, generator=g)  # block 0 barely changes the stream
    s2 = 0.3 * s1 + torch.randn(4, 128, 16, generator=g)  # block 1 rewrites it
    scores = cls(**params).score_blocks(torch.stack([s0, s1, s2]))
    redundancy = -scores if cls.higher_is_important else scores
    assert redundancy[0] > redundancy[1], (
        f"{cls.name}: the near-identity block is not the more redundant one (scores {scores.tolist()}, "
        f"higher_is_important={cls.higher_is_important}): check the sign"
    )


def check_unknown_parameter_refused(metric: type[Metric] | str) -> None:
    """``cls(no_such_option=1)`` raises TypeError or ValueError naming the option (so a typo in a grid
    file is an error, not silently the default)."""
    cls = _metric_class(metric)
    try:
        cls(no_such_option=1)
    except (TypeError, ValueError) as exc:
        assert "no_such_option" in str(exc), f"the error does not name the option: {exc}"
    else:
        raise AssertionError(f"{cls.__name__} accepted an unknown parameter 'no_such_option'")


def check_streaming(metric: type[Metric] | str, **params) -> None:
    """A metric with a :meth:`~estimators.base.Metric.stream_kind` scores the same from states streamed in
    batches of 1 and 3 samples (:func:`estimators.streaming.stream_scores`) as from the stored tensor, for
    spans of 1 and 2 blocks: ``tokens`` and ``sample`` kinds to 1e-12 (the same values, summed in
    float64), ``moments`` on float64 states to 1e-9 (float32 states differ by their own rounding). A
    metric without a kind passes (it is scored from stored states)."""
    from estimators.streaming import STREAM_KINDS, stream_scores

    cls = _metric_class(metric)
    m = cls(**params)
    kind = m.stream_kind()
    if kind is None:
        return
    assert kind in STREAM_KINDS, f"{cls.__name__}.stream_kind() returned {kind!r}, expected one of {STREAM_KINDS}"
    g = torch.Generator().manual_seed(9)
    states = torch.randn(5, 4, 64, 16, generator=g).cumsum(0)  # L=4 blocks, N=256 tokens, d=16
    if kind == "moments":
        states = states.double()
    expected = m.score_span_lengths(states, [1, 2])
    for batch_size in (1, 3):
        got = stream_scores(m, states, batch_size=batch_size, lengths=[1, 2])
        for n in (1, 2):
            torch.testing.assert_close(
                got[n], expected[n], rtol=1e-9 if kind == "moments" else 1e-12, atol=1e-12,
                msg=f"{cls.name} ({kind}): streamed spans of {n} in batches of {batch_size} "
                    f"{got[n].tolist()} differ from the stored path {expected[n].tolist()}")


def check_metric(metric: type[Metric] | str, **params) -> None:
    """Every metric check at once."""
    check_scores_per_block_and_span(metric, **params)
    check_streaming(metric, **params)
    check_orientation(metric, **params)
    check_unknown_parameter_refused(metric)
