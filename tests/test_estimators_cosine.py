"""Block Influence and angular distance against hand-computed values (known-answers.md, last section)."""

import math

import pytest
import torch

from estimators import METRICS
from estimators import functional as F

# Hand-computed: three tokens with cosines 0, 1/sqrt(2) and -1 between input and output.
X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
Y = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
BI_EXPECTED = 1 - (0.0 + 1 / math.sqrt(2) + -1.0) / 3  # 1.097631
ANGULAR_EXPECTED = (0.5 + 0.25 + 1.0) / 3  # arccos(.)/pi per token: 1/2, 1/4, 1


def test_block_influence_hand_values():
    assert F.block_influence(X[:1], Y[:1]).item() == pytest.approx(1.0, abs=1e-12)
    assert F.block_influence(X[1:2], Y[1:2]).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-7)
    assert F.block_influence(X, Y).item() == pytest.approx(BI_EXPECTED, abs=1e-7)
    assert F.block_influence(X, X).item() == pytest.approx(0.0, abs=1e-12)


def test_angular_distance_hand_values():
    assert F.angular_distance(X[1:2], Y[1:2]).item() == pytest.approx(0.25, abs=1e-7)
    assert F.angular_distance(X, Y).item() == pytest.approx(ANGULAR_EXPECTED, abs=1e-7)
    assert F.angular_distance(X, -X).item() == pytest.approx(1.0, abs=1e-12)


def test_zero_vector_gives_cosine_zero_not_nan():
    cos = F.token_cosine(torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.equal(cos, torch.zeros(2))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        F.block_influence(torch.ones(2, 3), torch.ones(2, 4))


def test_bf16_inputs_are_promoted():
    # known-answers.md: nearly identical states (true BI ~5e-5) give a negative BI (-5.5e-4) in bfloat16.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=g)
    y = x + 0.01 * torch.randn(512, 576, generator=g)
    xb, yb = x.bfloat16(), y.bfloat16()
    reference = F.block_influence(xb.double(), yb.double()).item()
    ours = F.block_influence(xb, yb).item()
    assert 0 < reference < 1e-3
    assert ours == pytest.approx(reference, abs=1e-6)
    naive_cos = torch.nn.functional.cosine_similarity(xb, yb, dim=-1)  # computed in bf16
    naive = 1 - naive_cos.mean().item()
    assert abs(naive - reference) > 10 * abs(ours - reference)


@pytest.mark.parametrize("name", ["bi", "angular"])
def test_invariant_under_common_positive_scale(name):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(5, 2, 8, 16, generator=g)
    metric = METRICS.get(name)()
    a = metric.score_blocks(states)
    b = metric.score_blocks(states * 37.5)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_scores_per_block_and_span():
    # states[i] enters block i. Depth 0 -> 1 rotates 90 degrees, 1 -> 2 is identity, 2 -> 3 flips.
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    depths = [e1, e2, e2, -e2]
    states = torch.stack([d.expand(1, 3, 2) for d in depths])  # (4, 1, 3, 2)
    bi = METRICS.get("bi")()
    ang = METRICS.get("angular")()
    torch.testing.assert_close(bi.score_blocks(states), torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(ang.score_spans(states, 2), torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ang.score_spans(states, 3), torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="span length"):
        ang.score_spans(states, 4)


def test_last_token_option():
    states = torch.zeros(2, 1, 3, 2)
    states[0, :, :, 0] = 1.0
    states[1, :, :2, 0] = 1.0  # first two tokens unchanged
    states[1, :, 2, 1] = 1.0  # last token turned 90 degrees
    all_tokens = METRICS.get("angular")().score_blocks(states).item()
    last = METRICS.get("angular")(tokens="last").score_blocks(states).item()
    assert all_tokens == pytest.approx(0.5 / 3)
    assert last == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tokens"):
        METRICS.get("angular")(tokens="first")
