"""Matrix-based Rényi α-order entropy and MI (``mi_renyi``) against its definition and its properties.

Definitions (Giraldo, Rao and Príncipe 2014; Yu et al. 2019), re-derived in the tests that use them:
``A = K / tr(K)`` for a Gaussian Gram matrix ``K``; ``S_α(A) = 1/(1 - α) log2 sum_i λ_i(A)^α`` (bits;
``α = 1``: ``-sum λ log2 λ``); ``I_α = S_α(A_x) + S_α(A_y) - S_α(A_x ∘ A_y / tr(A_x ∘ A_y))``.
Samples use fixed seeds; every case is small (at most 512 tokens).
"""

from __future__ import annotations

import math

import pytest
import torch

from estimators import METRICS
from estimators import functional_renyi as R
from estimators.functional_kernel import median_bandwidth
from estimators.tensors import flatten_states, sample_tokens
from estimators.testing import check_metric

ALPHAS = [0.5, 1.0, 1.01, 2.0, 3.0]


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _correlated(rho: float, n: int = 512, d: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = rho x + sqrt(1 - rho^2) eps``, x and eps independent standard Gaussian, (n, d) each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, rho * x + math.sqrt(1 - rho**2) * eps


# --------------------------------------------------------------------------- entropy: closed forms


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [1, 3, 7, 64])
def test_entropy_of_identity_over_n_is_log2_n(n, alpha):
    # A = I/n: n eigenvalues 1/n, sum_i (1/n)^α = n^(1-α), so S_α = log2(n^(1-α)) / (1-α) = log2 n
    # for every α (α = 1: -n (1/n) log2(1/n) = log2 n)
    assert float(R.renyi_entropy(torch.eye(n, dtype=torch.float64) / n, alpha)) == pytest.approx(
        math.log2(n), abs=1e-12
    )
    # the trace normalisation is the function's: K = I (far-apart tokens) reads the same
    assert float(R.renyi_entropy(torch.eye(n, dtype=torch.float64), alpha)) == pytest.approx(
        math.log2(n), abs=1e-12
    )


@pytest.mark.parametrize("alpha", ALPHAS)
def test_entropy_of_identical_points_is_zero(alpha):
    # K = 11' (all distances 0): A = 11'/n has eigenvalues 1, 0, ..., 0 and S_α = log2(1) / (1-α) = 0.
    # For α < 1 the rounding-level eigenvalues (~1e-17) must count as 0, or each adds λ^0.5 ~ 3e-9.
    ones = torch.ones(50, 50, dtype=torch.float64)
    assert abs(float(R.renyi_entropy(ones, alpha))) < 1e-12
    same = torch.full((50, 4), 3.25, dtype=torch.float64)
    gram = R.gaussian_gram(same, 1.0)
    assert torch.equal(gram, ones)
    for sigma in ("median", 0.5):  # median of zero distances falls back to 1.0
        assert abs(float(R.renyi_side(same, alpha=alpha, sigma=sigma).entropy)) < 1e-12
        assert abs(float(R.mi_renyi(same, _gaussian(50, 4, 0), alpha=alpha, sigma=sigma))) < 1e-12


def test_three_point_example_by_hand():
    # x: 1-d points 0, 1, 1000 with sigma = 1, K_ij = exp(-(x_i - x_j)^2 / 2):
    #         [ 1  c  0 ]
    #   K_x = [ c  1  0 ]   c = exp(-1/2); exp(-999^2/2) and exp(-1000^2/2) underflow to exactly 0.
    #         [ 0  0  1 ]
    # Eigenvalues of K_x: the 2x2 block [[1, c], [c, 1]] gives 1 + c (vector (1, 1)) and 1 - c (vector
    # (1, -1)); the third is 1. tr K_x = 3, so A_x = K_x / 3 has eigenvalues (1+c)/3, (1-c)/3, 1/3.
    # α = 2: sum λ^2 = ((1+c)^2 + (1-c)^2 + 1) / 9 = (3 + 2c^2) / 9 = (3 + 2/e) / 9, and
    #   S_2(A_x) = -log2((3 + 2/e) / 9) = log2(9 / 3.7357589) = log2(2.4091430) = 1.268524
    # y: points 0, 0, 1000: K_y = [[1, 1, 0], [1, 1, 0], [0, 0, 1]], eigenvalues 2, 0, 1, A_y: 2/3, 0, 1/3;
    #   S_2(A_y) = -log2(4/9 + 1/9) = log2(9/5).
    # Joint: K_x ∘ K_y = K_x (K_y is 1 where K_x is not 0), so S_2(joint) = S_2(A_x) and
    #   I_2(X; Y) = S_2(A_x) + S_2(A_y) - S_2(A_x) = log2(9/5) = 0.848.
    # α = 1: S_1(A_x) = -sum λ log2 λ over ((1+c)/3, (1-c)/3, 1/3).
    c = math.exp(-0.5)
    x = torch.tensor([[0.0], [1.0], [1000.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [0.0], [1000.0]], dtype=torch.float64)
    k_x = torch.tensor([[1, c, 0], [c, 1, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(R.gaussian_gram(x, 1.0), k_x, rtol=0, atol=1e-15)
    eig = sorted([(1 + c) / 3, (1 - c) / 3, 1 / 3])
    torch.testing.assert_close(torch.linalg.eigvalsh(k_x / 3), torch.tensor(eig, dtype=torch.float64))
    s2_x = math.log2(9 / (3 + 2 / math.e))
    assert s2_x == pytest.approx(1.268524, abs=1e-6)
    assert float(R.renyi_side(x, alpha=2.0, sigma=1.0).entropy) == pytest.approx(s2_x, abs=1e-12)
    assert float(R.renyi_side(y, alpha=2.0, sigma=1.0).entropy) == pytest.approx(math.log2(9 / 5), abs=1e-12)
    assert float(R.mi_renyi(x, y, alpha=2.0, sigma=1.0)) == pytest.approx(math.log2(9 / 5), abs=1e-12)
    s1_x = -sum(v * math.log2(v) for v in eig)
    assert float(R.renyi_side(x, alpha=1.0, sigma=1.0).entropy) == pytest.approx(s1_x, abs=1e-12)


def test_alpha_one_is_the_limit_of_the_renyi_form():
    a = R.gaussian_gram(_gaussian(100, 3, 1), 1.5)
    shannon = float(R.renyi_entropy(a, 1.0))
    assert float(R.renyi_entropy(a, 1.0 + 1e-6)) == pytest.approx(shannon, abs=1e-5)
    assert float(R.renyi_entropy(a, 1.0 - 1e-6)) == pytest.approx(shannon, abs=1e-5)
    # and S_α is non-increasing in α
    values = [float(R.renyi_entropy(a, alpha)) for alpha in ALPHAS]
    assert values == sorted(values, reverse=True)


# --------------------------------------------------------------------------- MI: properties


@pytest.mark.parametrize("sigma", ["median", 1.3])
def test_mi_is_symmetric(sigma):
    x, y = _correlated(0.7, n=200, d=3, seed=2)
    assert float(R.mi_renyi(x, y, sigma=sigma)) == float(R.mi_renyi(y, x, sigma=sigma))  # bit for bit


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 2.0])
def test_mi_of_a_variable_with_itself(alpha):
    # A ∘ A normalised is the Gram matrix at width sigma / sqrt(2) (exp(-d^2/(2s^2))^2 = exp(-d^2/s^2)),
    # so I(X; X) = 2 S(A at sigma) - S(A at sigma/sqrt 2): exactly, not S(A) as for Shannon MI.
    x = _gaussian(120, 3, 3)
    sigma = 1.7
    s = float(R.renyi_side(x, alpha=alpha, sigma=sigma).entropy)
    s_narrow = float(R.renyi_side(x, alpha=alpha, sigma=sigma / math.sqrt(2)).entropy)
    self_mi = float(R.mi_renyi(x, x, alpha=alpha, sigma=sigma))
    assert self_mi == pytest.approx(2 * s - s_narrow, abs=1e-10)
    assert self_mi < s - 1e-3  # strictly below S(A): a narrower kernel has more entropy
    # MI(X; X) = H(X) holds when the Gram matrix has only 0/1 entries: 3 clusters of 4 coincident
    # tokens, 100 apart at sigma = 1 (exp(-5000) = 0): K ∘ K = K, so the joint is A itself, and A has three
    # eigenvalues 4/12, so I(X; X) = S(A_x) = log2 3.
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]], dtype=torch.float64)
    clusters = centres.repeat_interleave(4, 0)
    assert float(R.renyi_side(clusters, alpha=alpha, sigma=1.0).entropy) == pytest.approx(
        math.log2(3), abs=1e-12
    )
    assert float(R.mi_renyi(clusters, clusters, alpha=alpha, sigma=1.0)) == pytest.approx(
        math.log2(3), abs=1e-12
    )


@pytest.mark.parametrize("alpha", [0.5, 1.01, 2.0])
def test_mi_lies_between_zero_and_the_smaller_entropy(alpha):
    # Yu et al. 2019: max(S(A_x), S(A_y)) <= S(A_x ∘ A_y) <= S(A_x) + S(A_y)
    for seed, rho in [(4, 0.0), (5, 0.5), (6, 0.95)]:
        x, y = _correlated(rho, n=150, d=3, seed=seed)
        sx, sy = (float(R.renyi_side(z, alpha=alpha).entropy) for z in (x, y))
        mi = float(R.mi_renyi(x, y, alpha=alpha))
        assert -1e-12 <= mi <= min(sx, sy) + 1e-12


@pytest.mark.parametrize("sigma", ["median", 1.3])
def test_invariant_to_orthogonal_maps_and_translations(sigma):
    x, y = _correlated(0.8, n=200, d=4, seed=7)
    q, _ = torch.linalg.qr(_gaussian(4, 4, 8))  # a random orthogonal matrix
    shift = torch.tensor([10.0, -3.0, 0.5, 7.0], dtype=torch.float64)
    base = float(R.mi_renyi(x, y, sigma=sigma))
    assert float(R.mi_renyi(x, y @ q, sigma=sigma)) == pytest.approx(base, abs=1e-10)
    assert float(R.mi_renyi(x @ q.T, y, sigma=sigma)) == pytest.approx(base, abs=1e-10)
    assert float(R.mi_renyi(x + shift, y - 2 * shift, sigma=sigma)) == pytest.approx(base, abs=1e-10)


def test_median_width_is_per_depth_so_rescaling_a_side_changes_nothing():
    x, y = _correlated(0.8, n=200, d=4, seed=9)
    base = float(R.mi_renyi(x, y))
    assert float(R.mi_renyi(x, 8.0 * y)) == pytest.approx(
        base, abs=1e-10
    )  # hidden-state norms grow with depth
    assert R.renyi_side(8.0 * y).sigma == pytest.approx(8.0 * median_bandwidth(y, max_points=200), rel=1e-12)
    # a fixed width is not scale-free: the rescaled side's Gram matrix tends to the identity
    assert float(R.mi_renyi(x, 8.0 * y, sigma=1.0)) != pytest.approx(
        float(R.mi_renyi(x, y, sigma=1.0)), abs=1e-3
    )


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0])
def test_monotone_in_dependence_for_gaussian_pairs(alpha):
    rhos = (0.0, 0.5, 0.9, 0.99)
    values = [float(R.mi_renyi(*_correlated(rho, n=512, d=2, seed=11), alpha=alpha)) for rho in rhos]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


def test_non_finite_states_give_nan():
    x, y = _correlated(0.5, n=32, d=2, seed=12)
    y[3, 1] = float("nan")
    assert math.isnan(float(R.mi_renyi(x, y)))
    assert math.isnan(float(R.mi_renyi(y, x)))


def test_float32_states_match_float64():
    x, y = _correlated(0.7, n=256, d=8, seed=13)
    assert float(R.mi_renyi(x.float(), y.float())) == pytest.approx(float(R.mi_renyi(x, y)), abs=1e-5)


# --------------------------------------------------------------------------- the metric


def test_metric_contract_at_other_parameters():
    check_metric("mi_renyi", alpha=1.0, sigma=4.0, n_tokens=100)
    check_metric("mi_renyi", alpha=2.0, n_tokens=64, seed=3)


def test_same_tokens_at_every_depth_and_pair_on_raw_states_agrees():
    states = torch.randn(4, 3, 40, 8, generator=torch.Generator().manual_seed(14))  # 120 tokens, 3 blocks
    metric = METRICS.get("mi_renyi")(n_tokens=50, seed=5)
    picked = metric.select_tokens(states)
    assert picked.shape == (4, 1, 50, 8)
    for depth in range(4):  # what select_tokens keeps is what pair() samples from a raw depth
        expected = sample_tokens(flatten_states(states[depth]), 50, torch.Generator().manual_seed(5))
        assert torch.equal(picked[depth, 0], expected)
    blocks = metric.score_blocks(states)
    raw = torch.stack([metric.pair(states[i], states[i + 1]) for i in range(3)])
    assert torch.equal(blocks, raw)
    # fewer tokens than n_tokens: all of them, in order
    assert torch.equal(
        METRICS.get("mi_renyi")(n_tokens=500).select_tokens(states)[:, 0], states.reshape(4, 120, 8)
    )


def test_the_near_identity_block_scores_higher():
    # higher_is_important is False, as for mi_gauss: a block whose output is nearly its input keeps high MI
    g = torch.Generator().manual_seed(15)
    s0 = torch.randn(2, 100, 16, generator=g)
    s1 = s0 + 0.1 * torch.randn(2, 100, 16, generator=g)
    s2 = 0.3 * s1 + torch.randn(2, 100, 16, generator=g)
    scores = METRICS.get("mi_renyi")().score_blocks(torch.stack([s0, s1, s2]))
    assert METRICS.get("mi_renyi").higher_is_important is False
    assert METRICS.get("mi_renyi").higher_is_important == METRICS.get("mi_gauss").higher_is_important
    assert scores[0] > scores[1]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "1"}, "alpha"),
        ({"sigma": "mean"}, "sigma"),
        ({"sigma": 0}, "sigma"),
        ({"sigma": -2.0}, "sigma"),
        ({"sigma": None}, "sigma"),
        ({"sigma": True}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"n_tokens": 3}, "n_tokens"),
        ({"n_tokens": None}, "n_tokens"),
        ({"n_tokens": 64.0}, "n_tokens"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_refused_naming_them(params, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        METRICS.get("mi_renyi")(**params)


def test_check_input_refuses_too_few_tokens():
    metric = METRICS.get("mi_renyi")()
    with pytest.raises(ValueError, match="at least 4 tokens.*gives 3"):
        metric.check_input(3, 576)
    metric.check_input(4, 576)


def test_functional_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        R.mi_renyi(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="different token counts"):
        R.renyi_compare(R.renyi_side(_gaussian(10, 2, 0)), R.renyi_side(_gaussian(11, 2, 0)))
    with pytest.raises(ValueError, match="alpha"):
        R.renyi_entropy(torch.eye(3), 0.0)
