"""The contract every registered metric meets, built-in or plugin: shapes, dtype, finiteness,
orientation on a near-identity block, and clear errors for bad parameters."""

import pytest
import torch

from estimators import METRICS
from estimators.base import Metric


@pytest.mark.parametrize("name", METRICS.list())
def test_scores_per_block_and_span(name):
    g = torch.Generator().manual_seed(7)
    states = torch.randn(5, 4, 64, 16, generator=g)  # L=4 blocks, N=256 tokens, d=16
    metric = METRICS.get(name)()
    assert isinstance(metric, Metric) and metric.name == name
    blocks = metric.score_blocks(states)
    spans = metric.score_spans(states, 2)
    assert blocks.shape == (4,) and spans.shape == (3,)
    assert blocks.dtype == spans.dtype == torch.float64
    assert torch.isfinite(blocks).all() and torch.isfinite(spans).all()
    # a span of one block is the block itself
    torch.testing.assert_close(metric.score_spans(states, 1), blocks)


@pytest.mark.parametrize("name", METRICS.list())
def test_near_identity_block_is_the_more_redundant(name):
    g = torch.Generator().manual_seed(8)
    s0 = torch.randn(4, 128, 16, generator=g)
    s1 = s0 + 0.1 * torch.randn(4, 128, 16, generator=g)  # block 0 barely changes the stream
    s2 = 0.3 * s1 + torch.randn(4, 128, 16, generator=g)  # block 1 rewrites it
    metric = METRICS.get(name)()
    scores = metric.score_blocks(torch.stack([s0, s1, s2]))
    redundancy = -scores if metric.higher_is_important else scores
    assert redundancy[0] > redundancy[1], (name, scores)


@pytest.mark.parametrize("name", METRICS.list())
def test_unknown_parameter_is_refused(name):
    with pytest.raises((TypeError, ValueError), match="no_such_option"):
        METRICS.get(name)(no_such_option=1)
