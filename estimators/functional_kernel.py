"""Kernel dependence measures between hidden states at two depths: HSIC and linear CKA (pure torch).

All HSIC variants here reduce to a few sums over an ``N x N`` pair of kernel matrices ``K``, ``L``
(see :class:`_GramStats`), gathered in row chunks so memory stays ``O(chunk_size * N)``, or, for
kernels given by explicit features ``K = Phi Phi^T`` (linear kernel, random Fourier features), in
``O(N * D + D^2)`` without any ``N x N`` matrix. Matmuls run with TF32 off; sums are float64.

Estimators (Song et al., 2012, "Feature selection via dependence maximization via HSIC"):

* unbiased: ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with ``K~``
  the kernel matrix with its diagonal set to 0; its mean is the population HSIC (0 if independent);
* biased: ``tr(K H L H) / (n-1)^2`` with ``H`` the centring matrix; positive even when independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from estimators.functional_mi import flatten_tokens, no_tf32

Tensor = torch.Tensor

#: Points used by the median heuristic (a seeded subsample when there are more).
MEDIAN_POINTS = 1024


def _row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


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


RowsFn = Callable[[slice], Tensor]


def _gram_sums(
    fns: list[RowsFn], pairs: list[tuple[int, int]], n: int, chunk_size: int, device: torch.device
) -> list[_PairSums]:
    """Exact sums for kernel matrices given by row blocks (``fn(rows)`` is ``(c, n)`` float64).

    Each kernel's rows are computed once per chunk, whatever the number of pairs using it.
    """
    products = [torch.zeros((), dtype=torch.float64, device=device) for _ in pairs]
    row_sums = [torch.empty(n, dtype=torch.float64, device=device) for _ in fns]
    diags = [torch.empty(n, dtype=torch.float64, device=device) for _ in fns]
    for rows in _row_chunks(n, chunk_size):
        local = torch.arange(rows.stop - rows.start, device=device)
        blocks = []
        for fn, row_sum, diag in zip(fns, row_sums, diags, strict=True):
            block = fn(rows)
            diag[rows] = block[local, local + rows.start]
            block[local, local + rows.start] = 0.0
            row_sum[rows] = block.sum(1)
            blocks.append(block)
        for product, (a, b) in zip(products, pairs, strict=True):
            product += (blocks[a] * blocks[b]).sum()
    return [
        _PairSums(p, row_sums[a], row_sums[b], diags[a], diags[b])
        for p, (a, b) in zip(products, pairs, strict=True)
    ]


def _feature_sums(
    fns: list[RowsFn], pairs: list[tuple[int, int]], n: int, chunk_size: int, device: torch.device
) -> list[_PairSums]:
    """The same sums for kernels ``K = Phi Phi^T`` given by feature rows, in two chunked passes.

    ``sum_ij K_ij L_ij = ||Phi^T Psi||_F^2`` and ``K 1 = Phi (Phi^T 1)``; the diagonal terms
    ``||phi_i||^2`` are taken out. Memory is ``O(chunk_size * D + D^2)``: no ``n x n`` matrix.
    """
    totals: list[Tensor] = []
    for rows in _row_chunks(n, chunk_size):
        sums = [fn(rows).to(torch.float64).sum(0) for fn in fns]
        totals = sums if not totals else [t + s for t, s in zip(totals, sums, strict=True)]
    cross = [
        torch.zeros(totals[a].numel(), totals[b].numel(), dtype=torch.float64, device=device)
        for a, b in pairs
    ]
    row_sums = [torch.empty(n, dtype=torch.float64, device=device) for _ in fns]
    diags = [torch.empty(n, dtype=torch.float64, device=device) for _ in fns]
    for rows in _row_chunks(n, chunk_size):
        feats = [fn(rows) for fn in fns]
        for feat, total, row_sum, diag in zip(feats, totals, row_sums, diags, strict=True):
            diag[rows] = (feat * feat).sum(1).to(torch.float64)
            row_sum[rows] = (feat.to(torch.float64) @ total) - diag[rows]
        for c, (a, b) in zip(cross, pairs, strict=True):
            c += (feats[a].T @ feats[b]).to(torch.float64)
    return [
        _PairSums((c * c).sum() - diags[a] @ diags[b], row_sums[a], row_sums[b], diags[a], diags[b])
        for c, (a, b) in zip(cross, pairs, strict=True)
    ]


def _normalise(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    return xy / (xx * yy).clamp_min(torch.finfo(torch.float64).tiny).sqrt()


def median_bandwidth(x: Tensor, *, seed: int = 0, max_points: int = MEDIAN_POINTS) -> float:
    """Median heuristic: the median Euclidean distance between distinct points of ``x`` (N, d).

    Uses a seeded subsample of ``max_points`` points when N is larger. Falls back to 1.0 when all
    points coincide.
    """
    if x.shape[0] > max_points:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        x = x[pick.to(x.device)]
    x = x.to(torch.float64)
    with no_tf32():
        dist = torch.cdist(x, x)  # float64, so the matmul form's cancellation is harmless
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    median = float(dist[i, j].median()) if i.numel() else 0.0
    return median if median > 0 else 1.0


def _gaussian_rows(z: Tensor, sq_norms: Tensor, sigma: float) -> Callable[[slice], Tensor]:
    """Rows ``exp(-||z_i - z_j||^2 / (2 sigma^2))`` of the Gaussian kernel matrix, float64."""

    def rows_fn(rows: slice) -> Tensor:
        cross = (z[rows] @ z.T).to(torch.float64)
        sq = (sq_norms[rows, None] + sq_norms[None, :] - 2.0 * cross).clamp_min(0.0)
        return torch.exp(sq / (-2.0 * sigma**2))

    return rows_fn


def _fourier_features(
    z: Tensor, sigma: float, n_features: int, generator: torch.Generator
) -> Callable[[slice], Tensor]:
    """Random Fourier features ``sqrt(2/D) cos(z W + b)``, ``W ~ N(0, 1/sigma^2)``, ``b ~ U[0, 2 pi)``.

    ``E[phi(a) . phi(b)] = exp(-||a - b||^2 / (2 sigma^2))``. Features are float64: HSIC is a small
    difference of sums of them.
    """
    w = (torch.randn(z.shape[1], n_features, generator=generator, dtype=torch.float64) / sigma).to(z.device)
    b = (torch.rand(n_features, generator=generator, dtype=torch.float64) * 2 * math.pi).to(z.device)
    scale = math.sqrt(2.0 / n_features)

    def rows_fn(rows: slice) -> Tensor:
        return scale * torch.cos(z[rows].to(torch.float64) @ w + b)

    return rows_fn


def hsic(
    x: Tensor,
    y: Tensor,
    *,
    sigma: float | None = None,
    normalized: bool = False,
    unbiased: bool = True,
    rff_features: int | None = 1024,
    n_exact: int = 4096,
    chunk_size: int = 1024,
    seed: int = 0,
) -> Tensor:
    """HSIC with Gaussian kernels ``exp(-||a - b||^2 / (2 sigma^2))``, unbiased by default.

    ``sigma=None`` takes the median heuristic separately for ``x`` and ``y``
    (:func:`median_bandwidth`); a number fixes it for both. Exact for ``N <= n_exact`` tokens;
    above that (when ``rff_features`` is not None) both kernels are replaced by ``rff_features``
    seeded random Fourier features, ``O(N * D * (d + D))`` instead of ``O(N^2 d)``. ``normalized``
    returns ``HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))``, scale-free and 1 for ``Y = X``.
    """
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive or None, got {sigma!r}")
    if rff_features is not None and rff_features < 1:
        raise ValueError(f"rff_features must be a positive int or None, got {rff_features!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x, y = flatten_tokens(x, y)
    n = x.shape[0]
    if n < (4 if unbiased else 2):
        raise ValueError(f"HSIC needs at least 4 tokens (unbiased) or 2 (biased), got N={n}")
    sides = []
    with no_tf32():
        for z in (x, y):
            z = z - z.mean(0)  # kernels are shift-invariant; centring helps the squared-norm trick
            sides.append((z, sigma if sigma is not None else median_bandwidth(z, seed=seed)))
        if rff_features is not None and n > n_exact:
            # Independent draws for every kernel copy: with one draw, HSIC(X, X) would pick up the
            # approximation's own variance (E[K^2] = K^2 + Var), which swamps it in high dimensions.
            generator = torch.Generator().manual_seed(seed)
            copies = 2 if normalized else 1
            fns = [_fourier_features(z, s, rff_features, generator) for _ in range(copies) for z, s in sides]
            pairs = [(0, 1), (0, 2), (1, 3)] if normalized else [(0, 1)]
            sums = _feature_sums(fns, pairs, n, chunk_size, x.device)
        else:
            fns = [_gaussian_rows(z, (z.to(torch.float64) ** 2).sum(1), s) for z, s in sides]
            pairs = [(0, 1), (0, 0), (1, 1)] if normalized else [(0, 1)]
            sums = _gram_sums(fns, pairs, n, chunk_size, x.device)
    values = [p.hsic(unbiased) for p in sums]
    return _normalise(*values) if normalized else values[0]


def _linear_sums(x: Tensor, y: Tensor, chunk_size: int, normalized: bool) -> list[_PairSums]:
    x, y = flatten_tokens(x, y)
    if x.shape[0] < 4:
        raise ValueError(f"linear HSIC/CKA needs at least 4 tokens, got N={x.shape[0]}")
    x, y = x - x.mean(0), y - y.mean(0)  # HSIC is shift-invariant; centring keeps the sums small
    pairs = [(0, 1), (0, 0), (1, 1)] if normalized else [(0, 1)]
    with no_tf32():
        return _feature_sums([lambda r: x[r], lambda r: y[r]], pairs, x.shape[0], chunk_size, x.device)


def linear_hsic(x: Tensor, y: Tensor, *, unbiased: bool = True, chunk_size: int = 16384) -> Tensor:
    """HSIC with the linear kernel: estimates ``||Sigma_xy||_F^2`` (unbiasedly by default).

    The biased form is exactly ``||S_xy||_F^2`` for the sample covariance ``S_xy`` (``1/(N-1)``).
    """
    return _linear_sums(x, y, chunk_size, normalized=False)[0].hsic(unbiased)


def cka_linear(x: Tensor, y: Tensor, *, debiased: bool = False, chunk_size: int = 16384) -> Tensor:
    """Linear CKA (Kornblith et al., 2019) on centred features, in [0, 1].

    ``||X'Y||_F^2 / (||X'X||_F ||Y'Y||_F)``, i.e. biased linear HSIC normalised; population value
    ``||Sigma_xy||^2 / (||Sigma_xx|| ||Sigma_yy||)``. ``debiased`` uses the unbiased HSIC in all
    three terms, which removes the ``O(d / N)`` floor that independent wide features read.
    """
    return _normalise(*(p.hsic(debiased) for p in _linear_sums(x, y, chunk_size, normalized=True)))
