"""Gaussian (log-det) and KSG mutual information against closed forms.

Every true value below is copied from /work/shared/known-answers.md (section named in the comment);
the Gaussian ones equal ``-1/2 sum_i log(1 - rho_i^2)`` over canonical correlations, re-derived in
``test_table_values_match_the_closed_form``. Samples use fixed seeds, so every test is deterministic;
tolerances leave at least ~3 standard deviations of the estimator's spread at the stated N.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators import METRICS
from estimators import functional_mi as F

# known-answers.md, "Gaussian mutual information": (case, X dims, Y dims, true MI in nats).
# "dense 0.5": joint covariance with unit variances and every off-diagonal entry 0.5.
# "two pairs": two correlated pairs at 0.8, rest independent (value holds for any d >= 2; d = 5 here).
GAUSSIAN_CASES = [
    ("bivariate 0.5", "canonical", [0.5], 1, 0.143841),
    ("bivariate 0.75", "canonical", [0.75], 1, 0.413339),
    ("dense 2x2", "dense", 0.5, 2, 0.293893),
    ("dense 3x3", "dense", 0.5, 3, 0.413339),
    ("dense 5x5", "dense", 0.5, 5, 0.592812),
    ("dense 25x25", "dense", 0.5, 25, 1.292184),
    ("dense 50x50", "dense", 0.5, 50, 1.624265),
    ("two pairs 0.8", "canonical", [0.8, 0.8], 5, 1.021651),
    ("canonical 0.9, 0.5", "canonical", [0.9, 0.5], 2, 0.974207),
    ("five canonical 0.99", "canonical", [0.99] * 5, 5, 9.7926),
]
# known-answers.md, "Gaussian mutual information": tolerance for a corrected estimate at N=5000.
GAUSS_TOL = 0.05
# Five canonical correlations of 0.99: the delta method gives sd(I) = sqrt(sum rho_i^2 / N)
# = sqrt(5 * 0.98 / 5000) = 0.031 nats, so 0.05 is only 1.6 sd (seeds 0-4 measured errors up to
# 0.067). 0.1 nats (1% of 9.79) is 3.2 sd.
GAUSS_TOL_HIGH_MI = 0.1
# known-answers.md, "Gaussian mutual information": plain log-det bias under independence is about
# dx*dy/(2N) = 0.5 nats at d=64, N=4096; the corrected estimate reads about 0.006 there.
INDEPENDENT_D, INDEPENDENT_N = 64, 4096

# known-answers.md, "Non-Gaussian MI (multivariate Student-t, identity dispersion)": (dx, dy, dof, MI).
STUDENT_T_CASES = [
    (1, 1, 1, 0.224171),
    (2, 2, 1, 0.431946),
    (2, 2, 2, 0.193147),
    (3, 3, 2, 0.290922),
    (3, 3, 3, 0.178712),
    (5, 5, 2, 0.448151),
    (5, 5, 3, 0.298544),
]
# known-answers.md, "kNN (KSG) MI": 1-d agreement with scikit-learn (k=3), closeness at N=5000 for
# 1-2 dims (bias ~ +0.01, sd < 0.01), and the dense 25x25 shortfall (~0.98 against 1.29).
SKLEARN_TOL = 1e-3
KSG_TOL = 0.05
KSG_DENSE25_SHORTFALL = 0.2


def covariance(kind: str, value, d: int) -> torch.Tensor:
    """Joint covariance of (X, Y), X and Y of d dims each."""
    if kind == "dense":
        return value * torch.ones(2 * d, 2 * d, dtype=torch.float64) + (1 - value) * torch.eye(
            2 * d, dtype=torch.float64
        )
    sigma = torch.eye(2 * d, dtype=torch.float64)
    for i, rho in enumerate(value):
        sigma[i, d + i] = sigma[d + i, i] = rho
    return sigma


def draw(sigma: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sigma.shape[0], generator=g, dtype=torch.float64)
    return z @ torch.linalg.cholesky(sigma).T


def gaussian_pair(
    kind: str, value, d: int, n: int = 5000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    z = draw(covariance(kind, value, d), n, seed)
    return z[:, :d], z[:, d:]


def student_t(dx: int, dy: int, dof: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multivariate t, identity dispersion: z / sqrt(chi2(dof) / dof) with one chi2 for X and Y."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dx + dy))
    t = torch.from_numpy(z / np.sqrt(rng.chisquare(dof, size=(n, 1)) / dof))
    return t[:, :dx], t[:, dx:]


# ----------------------------------------------------------------------------- Gaussian MI


@pytest.mark.parametrize("case", GAUSSIAN_CASES, ids=[c[0] for c in GAUSSIAN_CASES])
def test_table_values_match_the_closed_form(case):
    _, kind, value, d, truth = case
    sigma = covariance(kind, value, d)
    exact = 0.5 * (torch.logdet(sigma[:d, :d]) + torch.logdet(sigma[d:, d:]) - torch.logdet(sigma)).item()
    assert exact == pytest.approx(truth, abs=1e-4)


@pytest.mark.parametrize("case", GAUSSIAN_CASES, ids=[c[0] for c in GAUSSIAN_CASES])
def test_gaussian_mi_known_answers(case):
    name, kind, value, d, truth = case
    x, y = gaussian_pair(kind, value, d)
    tol = GAUSS_TOL_HIGH_MI if truth > 5 else GAUSS_TOL
    assert F.mi_gauss(x, y).item() == pytest.approx(truth, abs=tol)


def test_float32_input_matches_float64():
    x, y = gaussian_pair("dense", 0.5, 25)
    assert F.mi_gauss(x.float(), y.float()).item() == pytest.approx(F.mi_gauss(x, y).item(), abs=1e-4)


def test_independence_reads_zero_only_after_correction():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(INDEPENDENT_N, INDEPENDENT_D, generator=g)
    y = torch.randn(INDEPENDENT_N, INDEPENDENT_D, generator=g)
    corrected = F.mi_gauss(x, y).item()
    plain = F.mi_gauss(x, y, bias_correction=False).item()
    expected_bias = INDEPENDENT_D * INDEPENDENT_D / (2 * INDEPENDENT_N)  # 0.5 nats
    assert abs(corrected) < 0.05  # sd over seeds measured 0.014
    assert plain == pytest.approx(expected_bias, rel=0.1)
    # The gap is exactly the Wishart correction of the three log-dets.
    gap = 0.5 * (
        2 * F.wishart_logdet_bias(INDEPENDENT_D, INDEPENDENT_N)
        - F.wishart_logdet_bias(2 * INDEPENDENT_D, INDEPENDENT_N)
    )
    assert plain - corrected == pytest.approx(gap, abs=1e-9)


def test_wishart_correction_matches_monte_carlo():
    # E[logdet S] - logdet Sigma for the sample covariance of N=10 draws in 3 dims.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40000, 10, 3, generator=g, dtype=torch.float64)
    z = z - z.mean(1, keepdim=True)
    logdets = torch.logdet(z.transpose(1, 2) @ z / 9)
    se = logdets.std().item() / math.sqrt(logdets.numel())
    assert logdets.mean().item() == pytest.approx(F.wishart_logdet_bias(3, 10), abs=4 * se)


def test_refuses_too_few_tokens_and_suggests_max_dim():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 30, generator=g), torch.randn(100, 30, generator=g)
    with pytest.raises(ValueError, match=r"N=100, dx=30, dy=30.*max_dim"):
        F.mi_gauss(x, y)
    assert math.isfinite(F.mi_gauss(x, y, max_dim=10).item())


def test_max_dim_projection_keeps_a_common_basis():
    # y = x + noise in 64 dims: every direction has correlation 1/sqrt(2). A shared orthonormal
    # projection to 8 dims keeps 8 such canonical pairs: MI = -8/2 log(1/2) = 2.7726.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8000, 64, generator=g, dtype=torch.float64)
    y = x + torch.randn(8000, 64, generator=g, dtype=torch.float64)
    projected = F.mi_gauss(x, y, max_dim=8).item()
    assert projected == pytest.approx(4 * math.log(2), abs=0.1)
    assert projected < F.mi_gauss(x, y).item()  # data processing: never more than the full MI
    assert F.mi_gauss(x, y, max_dim=8, seed=1).item() != projected


def test_invariant_under_per_feature_affine_maps():
    x, y = gaussian_pair("dense", 0.5, 5)
    g = torch.Generator().manual_seed(2)
    scale = torch.exp(torch.empty(5, dtype=torch.float64).uniform_(-7, 7, generator=g))
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    shift = torch.randn(5, generator=g, dtype=torch.float64) * 100
    base = F.mi_gauss(x, y).item()
    assert F.mi_gauss(x * scale * sign + shift, y / scale - shift).item() == pytest.approx(base, abs=1e-9)


def test_constant_features_are_dropped():
    x, y = gaussian_pair("dense", 0.5, 3)
    padded = torch.cat([x, torch.full((x.shape[0], 1), 7.0, dtype=x.dtype)], dim=1)
    assert F.mi_gauss(padded, y).item() == pytest.approx(F.mi_gauss(x, y).item(), abs=1e-9)


# ----------------------------------------------------------------------------- KSG


def reference_ksg(x: np.ndarray, y: np.ndarray, k: int, algorithm: int) -> float:
    """Textbook KSG on full distance matrices (no preprocessing), for small N."""
    from scipy.special import digamma

    n = x.shape[0]
    dx = np.abs(x[:, None, :] - x[None, :, :]).max(-1)
    dy = np.abs(y[:, None, :] - y[None, :, :]).max(-1)
    np.fill_diagonal(dx, np.inf)
    np.fill_diagonal(dy, np.inf)
    dz = np.maximum(dx, dy)
    neighbours = np.argsort(dz, axis=1, kind="stable")[:, :k]
    if algorithm == 1:
        eps = np.take_along_axis(dz, neighbours, 1)[:, -1:]
        nx, ny = (dx < eps).sum(1), (dy < eps).sum(1)
        return digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1))
    ex = np.take_along_axis(dx, neighbours, 1).max(1, keepdims=True)
    ey = np.take_along_axis(dy, neighbours, 1).max(1, keepdims=True)
    nx, ny = (dx <= ex).sum(1), (dy <= ey).sum(1)
    return digamma(k) - 1 / k + digamma(n) - np.mean(digamma(nx) + digamma(ny))


def test_ksg_matches_scikit_learn_in_1d():
    sklearn_fs = pytest.importorskip("sklearn.feature_selection")
    # Same raw sample to both. Our preprocessing is scikit-learn's: divide by the (uncentred-scale)
    # std, add 1e-10 * max(1, mean|x|) * N(0, 1) noise. The noise draws differ, which changes a count
    # only at a distance tie within 1e-10, so jitter=0 must agree as well.
    x, y = gaussian_pair("canonical", [0.75], 1, n=2000, seed=0)
    reference = sklearn_fs.mutual_info_regression(x.numpy(), y[:, 0].numpy(), n_neighbors=3, random_state=0)[
        0
    ]
    assert F.mi_ksg(x, y, k=3).item() == pytest.approx(reference, abs=SKLEARN_TOL)
    assert F.mi_ksg(x, y, k=3, jitter=0.0).item() == pytest.approx(reference, abs=SKLEARN_TOL)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_matches_textbook_reference(algorithm, precision):
    x, y = gaussian_pair("canonical", [0.9, 0.5], 2, n=300, seed=4)
    ours = F.mi_ksg(x, y, k=4, algorithm=algorithm, jitter=0.0, precision=precision).item()
    std = lambda z: (z / z.std(0, unbiased=False)).numpy()  # noqa: E731 — the same scaling as ours
    assert ours == pytest.approx(reference_ksg(std(x), std(y), 4, algorithm), abs=1e-12)


@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_float32_distances_agree_with_float64(algorithm):
    # float32 max-norm distances change a count only at a relative distance tie within ~1e-7
    x, y = gaussian_pair("dense", 0.5, 3, n=3000, seed=8)
    fast = F.mi_ksg(x, y, algorithm=algorithm).item()
    exact = F.mi_ksg(x, y, algorithm=algorithm, precision="float64").item()
    assert fast == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ksg_propagates_nan(precision):
    x, y = gaussian_pair("dense", 0.5, 2, n=200, seed=9)
    x[17, 1] = float("nan")
    assert math.isnan(F.mi_ksg(x, y, precision=precision, jitter=0.0).item())


def test_ksg_default_jitter_breaks_ties_in_float32():
    # values on a 0.25 grid: thousands of exact distance ties. The default jitter (1e-6 in float32,
    # scikit-learn's 1e-10 in float64) breaks them in both precisions alike; 1e-10 is lost in float32,
    # where the ties then stay (measured: 1.597 and 1.591 with the defaults, 2.075 with 1e-10 in float32)
    g = torch.Generator().manual_seed(3)
    x = torch.round(torch.randn(2000, 2, generator=g, dtype=torch.float64) * 4) / 4
    y = torch.round((x + 0.5 * torch.randn(2000, 2, generator=g, dtype=torch.float64)) * 4) / 4
    reference = F.mi_ksg(x, y, precision="float64").item()
    assert F.mi_ksg(x, y).item() == pytest.approx(reference, abs=0.02)
    assert F.mi_ksg(x, y, jitter=1e-10).item() > reference + 0.3


KSG_GAUSSIAN = [c for c in GAUSSIAN_CASES if c[3] <= 2 or c[0] in ("dense 3x3", "dense 5x5")]


@pytest.mark.parametrize("case", KSG_GAUSSIAN, ids=[c[0] for c in KSG_GAUSSIAN])
def test_ksg_gaussian_low_dimensional(case):
    _, kind, value, d, truth = case
    x, y = gaussian_pair(kind, value, d)
    assert F.mi_ksg(x, y, n_tokens=None).item() == pytest.approx(truth, abs=KSG_TOL)


def test_ksg_algorithm_2_is_close_to_algorithm_1():
    x, y = gaussian_pair("dense", 0.5, 2)
    one = F.mi_ksg(x, y, n_tokens=None).item()
    two = F.mi_ksg(x, y, n_tokens=None, algorithm=2).item()
    assert two == pytest.approx(0.293893, abs=KSG_TOL)  # known-answers.md: dense 0.5, 2x2
    assert abs(one - two) < 0.03


def test_ksg_sees_student_t_dependence_that_gaussian_mi_misses():
    ksg, gauss = {}, {}
    for dx, dy, dof, truth in STUDENT_T_CASES:
        x, y = student_t(dx, dy, dof, 5000, seed=dx * 10 + dof)
        ksg[dx, dof] = F.mi_ksg(x, y, n_tokens=None).item()
        gauss[dx, dof] = F.mi_gauss(x, y).item()
        # Positive, and never above the truth: heavy tails make KSG underestimate (by 0.06-0.24).
        assert 0.05 < ksg[dx, dof] < truth + 0.03
    # At a fixed dimension fewer degrees of freedom mean more MI, and KSG keeps that order.
    assert ksg[2, 1] > ksg[2, 2] + 0.05
    assert ksg[3, 2] > ksg[3, 3] + 0.03
    assert ksg[5, 2] > ksg[5, 3] + 0.03
    # X and Y are uncorrelated, so the Gaussian estimator targets 0 (with dof <= 2 it is erratic:
    # infinite variance). With dof=3 it misses over half of the MI (measured 0.01 and 0.11 here,
    # 0.002-0.04 at other seeds) and reads below KSG.
    truths = {(dx, dof): truth for dx, _, dof, truth in STUDENT_T_CASES}
    for d in (3, 5):
        assert gauss[d, 3] < truths[d, 3] / 2
        assert ksg[d, 3] > gauss[d, 3]


def test_ksg_underestimates_dense_25x25():
    truth = 1.292184  # known-answers.md, Gaussian MI "dense 0.5 | 25 | 25"
    x, y = gaussian_pair("dense", 0.5, 25)
    full = F.mi_ksg(x, y, n_tokens=None, proj_dim=None).item()  # 50 joint dims: ~0.93
    projected = F.mi_ksg(x, y, n_tokens=None).item()  # 5 + 5 dims: loses information too
    assert 0.3 < full < truth - KSG_DENSE25_SHORTFALL
    assert 0.0 < projected < truth - KSG_DENSE25_SHORTFALL


@pytest.mark.parametrize("algorithm", [1, 2])
def test_ksg_chunking_is_exact(algorithm):
    x, y = gaussian_pair("dense", 0.5, 3, n=700, seed=5)
    whole = F.mi_ksg(x, y, algorithm=algorithm, chunk_size=700)
    chunked = F.mi_ksg(x, y, algorithm=algorithm, chunk_size=97)
    assert torch.equal(whole, chunked)


def test_ksg_token_cap_and_projection_are_seeded():
    x, y = gaussian_pair("dense", 0.5, 25, n=3000, seed=6)
    a = F.mi_ksg(x, y, n_tokens=1000, seed=1)
    assert torch.equal(a, F.mi_ksg(x, y, n_tokens=1000, seed=1))
    assert not torch.equal(a, F.mi_ksg(x, y, n_tokens=1000, seed=2))


# ----------------------------------------------------------------------------- metric classes

@pytest.mark.parametrize(
    "name, params, message",
    [
        ("mi_gauss", {"max_dim": 0}, "max_dim"),
        ("mi_gauss", {"bias_correction": "yes"}, "bias_correction"),
        ("mi_ksg", {"algorithm": 3}, "algorithm"),
        ("mi_ksg", {"k": 0}, "k must"),
        ("mi_ksg", {"n_tokens": 3}, "n_tokens"),
        ("mi_ksg", {"jitter": -1.0}, "jitter"),
        ("mi_ksg", {"proj_dim": 0}, "proj_dim"),
        ("mi_ksg", {"precision": "float16"}, "precision"),
    ],
)
def test_invalid_params_name_the_parameter(name, params, message):
    with pytest.raises(ValueError, match=message):
        METRICS.get(name)(**params)


def test_params_are_recorded():
    metric = METRICS.get("mi_ksg")(k=5, proj_dim=None)
    assert metric.describe()["params"]["k"] == 5
    assert metric.describe()["params"]["proj_dim"] is None
    assert METRICS.get("mi_gauss")().params == {"bias_correction": True, "max_dim": None, "seed": 0}


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py); run them all with .ci/gpu
def test_cuda_matches_cpu():
    x, y = gaussian_pair("dense", 0.5, 5, n=3000)
    for fn in (F.mi_gauss, F.mi_ksg):
        cpu = fn(x.float(), y.float())
        gpu = fn(x.float().cuda(), y.float().cuda())
        assert gpu.device.type == "cuda"
        assert gpu.item() == pytest.approx(cpu.item(), abs=1e-5)


def test_logdet_falls_back_to_eigenvalues_on_one_thread_and_restores_the_count():
    # a PSD matrix of rank 3 in 5 dims: Cholesky fails, the eigenvalue path floors the zero eigenvalues
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    singular = a @ a.T
    assert int(torch.linalg.cholesky_ex(singular)[1]) != 0
    threads = torch.get_num_threads()
    seen = []
    real = torch.linalg.eigvalsh
    try:
        torch.linalg.eigvalsh = lambda c: (seen.append(torch.get_num_threads()), real(c))[1]
        value = F._logdet_psd(singular)
    finally:
        torch.linalg.eigvalsh = real
    eig = real(singular)
    floor = eig.max() * 5 * torch.finfo(torch.float64).eps
    assert value == pytest.approx(float(torch.log(eig.clamp_min(floor)).sum()), rel=1e-12)
    assert seen == [1] and torch.get_num_threads() == threads
    full_rank = singular + torch.eye(5, dtype=torch.float64)  # Cholesky path: exact log-det
    assert float(F._logdet_psd(full_rank)) == pytest.approx(float(torch.logdet(full_rank)), rel=1e-12)
