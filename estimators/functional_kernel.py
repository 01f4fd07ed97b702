"""Kernel dependence measures between hidden states at two depths: HSIC and linear CKA (pure torch).

All HSIC variants here reduce to a few sums over a pair of ``N x N`` kernel matrices ``K``, ``L``
(see :class:`_PairSums`): from the explicit matrices (Gaussian kernel, exact), or, for kernels given by
features ``K = Phi Phi^T`` (linear kernel, random Fourier features), in ``O(N * D + D^2)`` without any
``N x N`` matrix. Each depth's kernel, row sums and self-HSIC are computed once
(:func:`hsic_side`, :func:`linear_side`) and shared by every pair that uses the depth
(:func:`hsic_compare`): scoring L blocks builds L + 1 kernels, not 2L. Matmuls run with TF32 off.

Estimators (Song et al., 2012, "Feature selection via dependence maximization via HSIC"):

* unbiased: ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with ``K~``
  the kernel matrix with its diagonal set to 0; its mean is the population HSIC (0 if independent);
* biased: ``tr(K H L H) / (n-1)^2`` with ``H`` the centring matrix; positive even when independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from estimators.tensors import flatten_states, no_tf32, on_both_sides, row_chunks, sample_tokens

Tensor = torch.Tensor

#: Points used by the median heuristic (a seeded subsample when there are more).
MEDIAN_POINTS = 512


@dataclass
class _PairSums:
    """Sums over two ``n x n`` kernel matrices ``A``, ``B`` from which every HSIC estimate follows."""

    ab: Tensor  # sum_{i != j} A_ij B_ij
    a_rows: Tensor  # off-diagonal row sums of A, shape (n,)
    b_rows: Tensor
    a_diag: Tensor  # diag A, shape (n,)
    b_diag: Tensor

    def hsic(self, unbiased: bool) -> Tensor:
        n = self.a_rows.numel()
        if unbiased:
            a_sum, b_sum = self.a_rows.sum(), self.b_rows.sum()
            value = (
                self.ab + a_sum * b_sum / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (self.a_rows @ self.b_rows)
            )
            return value / (n * (n - 3))
        a_full, b_full = self.a_rows + self.a_diag, self.b_rows + self.b_diag  # diagonals back in
        value = (
            self.ab
            + self.a_diag @ self.b_diag
            - 2.0 / n * (a_full @ b_full)
            + a_full.sum() * b_full.sum() / n**2
        )
        return value / (n - 1) ** 2


@dataclass
class Kernel:
    """One symmetric ``n x n`` kernel matrix ``K`` as the HSIC sums need it: its off-diagonal row
    sums, its diagonal, and either its strict upper triangle (``upper``: row blocks, block ``k``
    holding rows ``a_k:b_k`` from column ``a_k`` on, zero on and below the diagonal) or features
    ``feats`` with ``K = feats feats^T`` (no ``n x n`` matrix)."""

    rows: Tensor  # off-diagonal row sums, (n,) float64
    diag: Tensor  # (n,) float64
    upper: list[Tensor] | None = None
    feats: Tensor | None = None  # (n, D)


def _feature_kernel(feats: Tensor, chunk_size: int) -> Kernel:
    """``K = feats feats^T``: ``K 1 = feats (feats^T 1)`` and ``diag K = ||feats_i||^2``, in O(n D)."""
    totals = sum(feats[rows].to(torch.float64).sum(0) for rows in row_chunks(feats.shape[0], chunk_size))
    diag = (feats * feats).sum(1).to(torch.float64)
    rows = torch.cat([feats[r].to(torch.float64) @ totals for r in row_chunks(feats.shape[0], chunk_size)])
    return Kernel(rows - diag, diag, feats=feats)


@lru_cache(maxsize=8)
def _on_or_below_diagonal(size: int, device: torch.device) -> Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def _gaussian_kernel(z: Tensor, sigma: float, chunk_size: int) -> Kernel:
    """The Gaussian kernel ``exp(-||z_i - z_j||^2 / (2 sigma^2))`` of ``z`` (n, d), in ``z``'s dtype.

    Only the upper triangle is built, ``chunk_size`` rows at a time: one matmul per row block that
    also folds in ``-||z_j||^2`` (``addmm``), then ``-||z_i||^2``, the clamp at 0 and ``exp`` in place.
    The diagonal is exactly 1. Row sums add each block's row and column sums (symmetry).
    """
    n = z.shape[0]
    scale = 0.5 / sigma**2
    sq = torch.linalg.vecdot(z, z) * scale  # ||z_i||^2 / (2 sigma^2), in the matmul's precision
    rows = torch.zeros(n, dtype=torch.float64, device=z.device)
    upper = []
    for chunk in row_chunks(n, chunk_size):
        a, b = chunk.start, chunk.stop
        # -(||z_i||^2 + ||z_j||^2 - 2 z_i.z_j) / (2 sigma^2), clamped at 0 against cancellation
        block = torch.addmm(sq[None, a:], z[a:b], z[a:].T, beta=-1.0, alpha=2.0 * scale)
        block.sub_(sq[a:b, None]).clamp_(max=0.0).exp_()
        block[:, : b - a].masked_fill_(_on_or_below_diagonal(b - a, z.device), 0.0)
        rows[a:b] += block.sum(1).to(torch.float64)
        rows[a:] += block.sum(0).to(torch.float64)
        upper.append(block)
    return Kernel(rows, torch.ones(n, dtype=torch.float64, device=z.device), upper=upper)


def _pair_sums(a: Kernel, b: Kernel, chunk_size: int) -> _PairSums:
    """The sums behind every HSIC estimate of the kernel pair ``(a, b)`` (both explicit or both features)."""
    if a.upper is not None and b.upper is not None:
        # sum_{i != j} A_ij B_ij = 2 sum_{i < j}: float32 dot products per row, float64 across rows
        if [t.shape for t in a.upper] != [t.shape for t in b.upper]:
            raise ValueError("HSIC sides were built with different token counts or chunk sizes")
        ab = 2.0 * sum(
            torch.linalg.vecdot(s, t).to(torch.float64).sum() for s, t in zip(a.upper, b.upper, strict=True)
        )
    elif a.feats is not None and b.feats is not None:
        # sum_{i != j} K_ij L_ij = ||Phi^T Psi||_F^2 - sum_i ||phi_i||^2 ||psi_i||^2
        cross = sum(
            (a.feats[r].T @ b.feats[r]).to(torch.float64) for r in row_chunks(a.feats.shape[0], chunk_size)
        )
        ab = (cross * cross).sum() - a.diag @ b.diag
    else:
        raise ValueError("HSIC sides differ in kind: one exact, one approximated (different token counts?)")
    return _PairSums(ab, a.rows, b.rows, a.diag, b.diag)


def _normalise(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    return xy / (xx * yy).clamp_min(torch.finfo(torch.float64).tiny).sqrt()


@lru_cache(maxsize=4)
def _upper_pairs(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    i, j = torch.triu_indices(m, m, offset=1, device=device)
    return i, j


def median_bandwidth(x: Tensor, *, seed: int = 0, max_points: int = MEDIAN_POINTS) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of ``x`` (N, d).

    Uses a seeded subsample of ``max_points`` points when N is larger, and ``x``'s precision
    (squared distances by the matmul identity, TF32 off). Falls back to 1.0 when all points coincide.
    """
    if x.shape[0] > max_points:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        x = x[pick.to(x.device)]
    x = x - x.mean(0)  # the identity below cancels less on centred points
    sq = torch.linalg.vecdot(x, x)
    with no_tf32():
        d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    i, j = _upper_pairs(x.shape[0], x.device)
    median = math.sqrt(float(d2[i, j].median())) if i.numel() else 0.0
    return median if median > 0 else 1.0


def _fourier_features(z: Tensor, sigma: float, n_features: int, generator: torch.Generator) -> Tensor:
    """Random Fourier features ``sqrt(2/D) cos(z W + b)``, ``W ~ N(0, 1/sigma^2)``, ``b ~ U[0, 2 pi)``.

    ``E[phi(a) . phi(b)] = exp(-||a - b||^2 / (2 sigma^2))``. Features are float64: HSIC is a small
    difference of sums of them.
    """
    w = (torch.randn(z.shape[1], n_features, generator=generator, dtype=torch.float64) / sigma).to(z.device)
    b = (torch.rand(n_features, generator=generator, dtype=torch.float64) * 2 * math.pi).to(z.device)
    return math.sqrt(2.0 / n_features) * torch.cos(z.to(torch.float64) @ w + b)


@dataclass
class KernelSide:
    """One depth's share of an HSIC estimate, computed once however many pairs use that depth.

    ``first`` is the kernel this depth brings as the ``x`` of a pair, ``second`` as its ``y``: the same
    matrix when exact; two independent random-feature draws when approximated, so that no pair (nor the
    self term ``first`` vs ``second``) multiplies an approximation by itself, whose ``E[K^2] = K^2 + Var``
    would swamp HSIC in high dimensions. ``self_hsic`` is ``HSIC(Z, Z)`` when normalising.
    """

    first: Kernel
    second: Kernel
    unbiased: bool
    chunk_size: int
    self_hsic: Tensor | None = None

    @property
    def n(self) -> int:
        return self.first.rows.numel()


def hsic_side(
    z: Tensor,
    *,
    sigma: float | None = None,
    normalized: bool = False,
    unbiased: bool = True,
    rff_features: int | None = 1024,
    n_exact: int = 4096,
    n_tokens: int | None = 2048,
    chunk_size: int = 128,
    seed: int = 0,
    population: int | None = None,
) -> KernelSide:
    """The per-depth part of :func:`hsic` for states ``z`` of shape ``(..., d)``; the defaults
    of :func:`hsic`'s parameters (documented there) are set here. ``population``: ``z`` is already the
    token sample, drawn from that many tokens (:func:`estimators.tensors.sample_tokens`)."""
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive or None, got {sigma!r}")
    if rff_features is not None and rff_features < 1:
        raise ValueError(f"rff_features must be a positive int or None, got {rff_features!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if n_tokens is not None and n_tokens < 4:
        raise ValueError(f"n_tokens must be an int >= 4 or None, got {n_tokens!r}")
    generator = torch.Generator().manual_seed(seed)
    z = sample_tokens(flatten_states(z), n_tokens, generator, population)
    n = z.shape[0]
    if n < (4 if unbiased else 2):
        raise ValueError(f"HSIC needs at least 4 tokens (unbiased) or 2 (biased), got N={n}")
    with no_tf32():
        z = z - z.mean(0)  # kernels are shift-invariant; centring helps the squared-norm identity
        bandwidth = sigma if sigma is not None else median_bandwidth(z, seed=seed)
        if rff_features is not None and n > n_exact:
            first, second = (
                _feature_kernel(_fourier_features(z, bandwidth, rff_features, generator), chunk_size)
                for _ in range(2)
            )
        else:
            first = second = _gaussian_kernel(z, bandwidth, chunk_size)
        side = KernelSide(first, second, unbiased, chunk_size)
        if normalized:
            side.self_hsic = _pair_sums(first, second, chunk_size).hsic(unbiased)
    return side


def hsic_compare(a: KernelSide, b: KernelSide) -> Tensor:
    """HSIC between two prepared depths; normalised when both sides carry their self-HSIC."""
    if a.n != b.n:
        raise ValueError(f"HSIC sides hold different token counts: {a.n} vs {b.n}")
    with no_tf32():
        value = _pair_sums(a.first, b.second, a.chunk_size).hsic(a.unbiased)
    if a.self_hsic is not None and b.self_hsic is not None:
        return _normalise(value, a.self_hsic, b.self_hsic)
    return value


def hsic(x: Tensor, y: Tensor, **params: Any) -> Tensor:
    """HSIC with Gaussian kernels ``exp(-||a - b||^2 / (2 sigma^2))``, unbiased by default; the
    parameters, with their defaults, are :func:`hsic_side`'s.

    ``sigma=None`` takes the median heuristic separately for ``x`` and ``y``
    (:func:`median_bandwidth`); a number fixes it for both. ``n_tokens`` keeps a seeded sample of that
    many tokens (the same tokens on both sides). Exact for ``N <= n_exact`` tokens: one ``N x N``
    kernel matrix per side in the inputs' precision (float32 states: float32 kernels, each row's
    products summed in float32, rows in float64), built ``chunk_size`` rows at a time. Above
    ``n_exact`` (when ``rff_features`` is not None) both kernels are replaced by ``rff_features``
    seeded random Fourier features in float64, ``O(N * D * (d + D))`` instead of ``O(N^2 d)``.
    ``normalized`` returns ``HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))``, scale-free and 1 for ``Y = X``.
    """
    return on_both_sides(hsic_side, hsic_compare, x, y, **params)


def linear_side(z: Tensor, *, normalized: bool, unbiased: bool, chunk_size: int = 16384) -> KernelSide:
    """The per-depth part of :func:`linear_hsic` / :func:`cka_linear`: centred features as the kernel."""
    z = flatten_states(z)
    if z.shape[0] < 4:
        raise ValueError(f"linear HSIC/CKA needs at least 4 tokens, got N={z.shape[0]}")
    with no_tf32():
        kernel = _feature_kernel(z - z.mean(0), chunk_size)  # shift-invariant; centring keeps sums small
        side = KernelSide(kernel, kernel, unbiased, chunk_size)
        if normalized:
            side.self_hsic = _pair_sums(kernel, kernel, chunk_size).hsic(unbiased)
    return side


def linear_hsic(x: Tensor, y: Tensor, *, unbiased: bool = True, chunk_size: int = 16384) -> Tensor:
    """HSIC with the linear kernel: estimates ``||Sigma_xy||_F^2`` (unbiasedly by default).

    The biased form is exactly ``||S_xy||_F^2`` for the sample covariance ``S_xy`` (``1/(N-1)``).
    """
    return on_both_sides(
        linear_side, hsic_compare, x, y, normalized=False, unbiased=unbiased, chunk_size=chunk_size
    )


def cka_linear(x: Tensor, y: Tensor, *, debiased: bool = False, chunk_size: int = 16384) -> Tensor:
    """Linear CKA (Kornblith et al., 2019) on centred features, in [0, 1].

    ``||X'Y||_F^2 / (||X'X||_F ||Y'Y||_F)``, i.e. biased linear HSIC normalised; population value
    ``||Sigma_xy||^2 / (||Sigma_xx|| ||Sigma_yy||)``. ``debiased`` uses the unbiased HSIC in all
    three terms, which removes the ``O(d / N)`` floor that independent wide features read.
    """
    return on_both_sides(
        linear_side, hsic_compare, x, y, normalized=True, unbiased=debiased, chunk_size=chunk_size
    )


def cka_from_covariances(cxx: Tensor, cyy: Tensor, cxy: Tensor) -> Tensor:
    """:func:`cka_linear` (``debiased=False``) from float64 covariances (ddof 1): on centred features the
    biased linear HSIC is exactly ``||C_xy||_F^2``, so CKA is ``||C_xy||^2 / (||C_xx|| ||C_yy||)``
    (streamed scoring sums the covariances batch by batch)."""
    return _normalise((cxy * cxy).sum(), (cxx * cxx).sum(), (cyy * cyy).sum())
