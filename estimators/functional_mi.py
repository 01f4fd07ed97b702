"""Mutual-information estimators between hidden states at two depths (pure torch, CPU or CUDA).

* :func:`mi_gauss` — Gaussian MI from log-determinants of the joint and marginal correlation
  matrices, with the exact Wishart finite-sample bias correction.
* :func:`mi_ksg` — Kraskov–Stögbauer–Grassberger k-nearest-neighbour MI (algorithms 1 and 2), brute
  force with row-chunked max-norm distances, after a seeded random projection of each side.

Both take ``x`` of shape ``(..., dx)`` and ``y`` of shape ``(..., dy)`` with the same leading shape
(the same tokens) and return a 0-d float64 tensor in nats on the inputs' device. Randomness (token
subsampling, projections, jitter) comes from a CPU ``torch.Generator`` seeded with ``seed``, so a
result does not depend on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor
_digamma = torch.special.digamma


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 precision for CUDA matmuls inside the block (TF32 keeps only 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def flatten_tokens(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape to ``(N, dx)`` and ``(N, dy)``; half precision is promoted to float32.

    The feature sizes may differ, the token (leading) shapes may not.
    """
    if x.dim() < 1 or y.dim() < 1 or x.shape[-1] == 0 or y.shape[-1] == 0:
        raise ValueError(f"hidden states need a feature dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"hidden states differ in token shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"hidden states are on different devices: {x.device} vs {y.device}")
    x = x if x.dtype == torch.float64 else x.to(torch.float32)
    y = y if y.dtype == torch.float64 else y.to(torch.float32)
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


# --------------------------------------------------------------------------- Gaussian (log-det) MI


def wishart_logdet_bias(d: int, n: int) -> float:
    """``E[logdet S] - logdet Sigma`` for the sample covariance ``S`` of ``n`` Gaussian draws in ``d`` dims.

    ``(n - 1) S`` is Wishart with ``nu = n - 1`` degrees of freedom, which gives
    ``sum_{i=1..d} psi((nu - i + 1) / 2) + d * log(2 / nu)`` exactly (negative: ``logdet S`` is low).
    """
    nu = n - 1
    if d < 1 or nu < d:
        raise ValueError(f"the Wishart correction needs 1 <= d <= N - 1, got d={d}, N={n}")
    half = (nu - torch.arange(d, dtype=torch.float64)) / 2.0
    return float(_digamma(half).sum()) + d * math.log(2.0 / nu)


#: below this size the CPU eigenvalue fallback runs on one thread: measured on 2 cores, one thread was as
#: fast as two on an idle machine (1152 x 1152: 0.11 vs 0.13 s) and 10-15x faster when another process
#: held a core (0.11 vs 1.2-17.5 s: LAPACK's threads wait on the busy core); larger matrices keep them all
EIGVALSH_ONE_THREAD_MAX = 2048


def _eigvalsh(c: Tensor) -> Tensor:
    if c.device.type != "cpu" or c.shape[0] > EIGVALSH_ONE_THREAD_MAX or torch.get_num_threads() == 1:
        return torch.linalg.eigvalsh(c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(c)
    finally:
        torch.set_num_threads(threads)


def _logdet_psd(c: Tensor) -> Tensor:
    """log-determinant of a symmetric PSD float64 matrix: Cholesky, eigenvalues if that fails."""
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0:
        return 2.0 * torch.log(torch.diagonal(chol)).sum()
    eig = _eigvalsh(c)
    floor = eig.max().clamp_min(torch.finfo(torch.float64).tiny) * c.shape[0] * torch.finfo(torch.float64).eps
    return torch.log(eig.clamp_min(floor)).sum()


def _moments(x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Column mean and (ddof=1) standard deviation in float64, one chunked pass, shifted for stability."""
    shift = x[0].to(torch.float64)
    total = torch.zeros_like(shift)
    squares = torch.zeros_like(shift)
    for rows in _row_chunks(x.shape[0], chunk_size):
        centred = x[rows].to(torch.float64) - shift
        total += centred.sum(0)
        squares += (centred * centred).sum(0)
    n = x.shape[0]
    mean_shifted = total / n
    var = (squares - n * mean_shifted**2).clamp_min(0.0) / max(n - 1, 1)
    return shift + mean_shifted, var.sqrt()


def _random_orthonormal(d: int, k: int, generator: torch.Generator) -> Tensor:
    """``(d, k)`` matrix with orthonormal columns, Haar-distributed (QR of a Gaussian, signs fixed)."""
    g = torch.randn(d, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def mi_gauss(
    x: Tensor,
    y: Tensor,
    *,
    bias_correction: bool = True,
    max_dim: int | None = None,
    seed: int = 0,
    chunk_size: int = 16384,
) -> Tensor:
    """Gaussian mutual information ``1/2 (logdet Cx + logdet Cy - logdet Cxy)`` in nats.

    Features are standardised (so this equals the canonical-correlation formula
    ``-1/2 sum log(1 - rho_i^2)``) and dropped when constant. The joint covariance is accumulated
    over row chunks with float32 (or float64) matmuls, TF32 off, summed and factorised in float64.
    With ``bias_correction`` each log-det has its exact Wishart bias subtracted
    (:func:`wishart_logdet_bias`, ``nu = N - 1``); without it, independent data read about
    ``dx * dy / (2N)`` nats. The corrected estimate may be slightly negative; it is not clamped.

    ``max_dim`` projects each side with more features onto ``max_dim`` dims by a seeded Haar-random
    orthonormal matrix (after standardising). A random rather than PCA projection is used because it
    is independent of the data: the projected sample is still Gaussian with a Wishart covariance, so
    the correction stays exact, and the result is a lower bound on the full MI (data processing).
    Sides of equal width share one matrix: hidden states at two depths live in the same residual
    basis, and independent matrices would mix unrelated directions and read almost no MI.
    Raises ``ValueError`` when ``N < 2 (dx + dy)``: there every canonical correlation nears 1.
    """
    if max_dim is not None and max_dim < 1:
        raise ValueError(f"max_dim must be a positive int or None, got {max_dim!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x, y = flatten_tokens(x, y)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"Gaussian MI needs at least 2 tokens, got N={n}")
    generator = torch.Generator().manual_seed(seed)
    sides = []
    shared: dict[int, Tensor] = {}  # one projection per width: same-width sides keep a common basis
    for side in (x, y):
        mean, std = _moments(side, chunk_size)
        keep: Tensor | None = std > 0
        d = int(keep.sum())
        if d == 0:  # a constant side shares no information with anything
            return torch.zeros((), dtype=torch.float64, device=x.device)
        proj = None
        if max_dim is not None and d > max_dim:  # constant features stay as zero columns
            keep, std = None, torch.where(std > 0, std, torch.ones_like(std))
            if side.shape[1] not in shared:
                shared[side.shape[1]] = _random_orthonormal(side.shape[1], max_dim, generator)
            proj = shared[side.shape[1]].to(device=side.device, dtype=side.dtype)
            d = max_dim
        elif d == side.shape[1]:
            keep = None
        else:
            mean, std = mean[keep], std[keep]
        sides.append((side, keep, mean.to(side.dtype), std.to(side.dtype), proj, d))
    dx, dy = sides[0][-1], sides[1][-1]
    if n < 2 * (dx + dy):
        raise ValueError(
            f"Gaussian MI needs N >= 2*(dx+dy) tokens but got N={n}, dx={dx}, dy={dy}: every canonical "
            f"correlation would read near 1. Use fewer dimensions (max_dim={max(1, n // 4)} or less) "
            f"or more tokens (at least {2 * (dx + dy)})."
        )
    joint = torch.zeros(dx + dy, dx + dy, dtype=torch.float64, device=x.device)
    with no_tf32():
        for rows in _row_chunks(n, chunk_size):
            parts = []
            for side, keep, mean, std, proj, _ in sides:
                chunk = side[rows] if keep is None else side[rows][:, keep]
                z = (chunk - mean) / std
                parts.append(z @ proj if proj is not None else z)
            z = torch.cat(parts, dim=1)
            joint += (z.T @ z).to(torch.float64)
    joint /= n - 1
    scale = torch.diagonal(joint).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
    corr = joint * scale[:, None] * scale[None, :]
    terms = [_logdet_psd(corr[:dx, :dx]), _logdet_psd(corr[dx:, dx:]), _logdet_psd(corr)]
    if bias_correction:
        terms = [t - wishart_logdet_bias(d, n) for t, d in zip(terms, (dx, dy, dx + dy), strict=True)]
    return 0.5 * (terms[0] + terms[1] - terms[2])


# --------------------------------------------------------------------------- KSG kNN MI


def _standardise(z: Tensor) -> Tensor:
    """Centre and scale each column to unit variance; constant columns become zeros."""
    std = z.std(0)
    return (z - z.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def _scale_and_jitter(z: Tensor, jitter: float, generator: torch.Generator) -> Tensor:
    """scikit-learn's KSG preprocessing: divide by the uncentred-scale std, add tiny noise."""
    std = z.std(0, unbiased=False)  # sklearn.preprocessing.scale(with_mean=False)
    z = z / torch.where(std > 0, std, torch.ones_like(std))
    if jitter > 0:  # sklearn: 1e-10 * max(1, mean|x|) * N(0, 1), per column
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device)
        z = z + jitter * z.abs().mean(0).clamp_min(1.0) * noise
    return z


def _maxnorm_rows(rows: Tensor, z: Tensor, fused: bool = False) -> Tensor:
    """Chebyshev distances from each of ``rows`` (c, p) to every point of ``z`` (N, p): (c, N).

    Both paths compute ``max_c |rows_c - z_c|`` exactly (a subtraction, then exact abs and max), so
    they agree bit for bit on finite inputs; ``torch.cdist`` skips NaNs where the loop propagates
    them, so callers ask for ``fused`` only on finite inputs. ``fused`` runs ``torch.cdist(p=inf)``,
    one kernel, 2-15x faster on the CPU than a pass per coordinate; on CUDA the per-coordinate
    kernels are kept (the fused path is not measured there).
    """
    if fused:
        return torch.cdist(rows, z, p=math.inf)
    dist = (rows[:, :1] - z[:, 0]).abs_()
    for c in range(1, z.shape[1]):
        torch.maximum(dist, (rows[:, c : c + 1] - z[:, c]).abs_(), out=dist)
    return dist


def ksg_counts(x: Tensor, y: Tensor, k: int, algorithm: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per-point marginal neighbour counts ``(n_x, n_y)`` of KSG, computed ``chunk_size`` rows at a time.

    Algorithm 1 counts points strictly inside the joint k-th-neighbour max-norm radius; algorithm 2
    counts points within (``<=``) each marginal's largest distance among the k joint neighbours.
    Each row is computed independently, so the counts do not depend on ``chunk_size``.
    """
    n = x.shape[0]
    nx = torch.empty(n, dtype=torch.int64, device=x.device)
    ny = torch.empty(n, dtype=torch.int64, device=x.device)
    fused = x.device.type == "cpu" and bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())
    dtype = torch.promote_types(x.dtype, y.dtype)
    joint_buffer = torch.empty(min(chunk_size, n), n, dtype=dtype, device=x.device)  # reused by every chunk
    for rows in _row_chunks(n, chunk_size):
        dist_x = _maxnorm_rows(x[rows], x, fused)
        dist_y = _maxnorm_rows(y[rows], y, fused)
        local = torch.arange(rows.stop - rows.start, device=x.device)
        dist_x[local, local + rows.start] = math.inf  # a point is not its own neighbour
        dist_y[local, local + rows.start] = math.inf
        joint = torch.maximum(dist_x, dist_y, out=joint_buffer[: rows.stop - rows.start])
        radius, idx = torch.topk(joint, k, dim=1, largest=False, sorted=True)
        if algorithm == 1:
            eps = radius[:, -1:]
            nx[rows] = torch.count_nonzero(dist_x < eps, dim=1)
            ny[rows] = torch.count_nonzero(dist_y < eps, dim=1)
        else:
            eps_x = dist_x.gather(1, idx).amax(1, keepdim=True)
            eps_y = dist_y.gather(1, idx).amax(1, keepdim=True)
            nx[rows] = torch.count_nonzero(dist_x <= eps_x, dim=1)
            ny[rows] = torch.count_nonzero(dist_y <= eps_y, dim=1)
    return nx, ny


def mi_ksg(
    x: Tensor,
    y: Tensor,
    *,
    k: int = 3,
    algorithm: int = 1,
    proj_dim: int | None = 5,
    n_tokens: int | None = 4096,
    chunk_size: int = 512,
    jitter: float = 1e-10,
    seed: int = 0,
) -> Tensor:
    """Kraskov–Stögbauer–Grassberger MI in nats with the max-norm in the joint space.

    Algorithm 1: ``psi(k) + psi(N) - <psi(n_x + 1) + psi(n_y + 1)>``;
    algorithm 2: ``psi(k) - 1/k + psi(N) - <psi(n_x) + psi(n_y)>``.

    Preprocessing, in order: at most ``n_tokens`` tokens by seeded sampling without replacement;
    each side wider than ``proj_dim`` is standardised and projected by a seeded Gaussian matrix to
    ``proj_dim`` dims (kNN estimators fail badly above ~10 joint dims, so the default 5 + 5 keeps
    them usable; the projection can only lose information; equal-width sides share one matrix, as
    in :func:`mi_gauss`); finally, as scikit-learn's ``mutual_info_regression`` does, each
    coordinate is divided by its (ddof=0, uncentred) standard deviation and
    ``jitter * max(1, mean|z|) * N(0, 1)`` noise is added to break ties. So in 1-d this matches
    scikit-learn up to its own 1e-10 jitter draws. Unlike scikit-learn, negative values are not
    clamped to 0. Distances are float64; memory is ``O(chunk_size * N)``.
    """
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if algorithm not in (1, 2):
        raise ValueError(f"algorithm must be 1 or 2, got {algorithm!r}")
    if proj_dim is not None and proj_dim < 1:
        raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x, y = flatten_tokens(x, y)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n_tokens is not None and n > n_tokens:
        keep = torch.randperm(n, generator=generator)[:n_tokens].to(x.device)
        x, y, n = x[keep], y[keep], n_tokens
    if n <= k:
        raise ValueError(f"KSG needs more tokens than neighbours, got N={n}, k={k}")
    sides = []
    shared: dict[int, Tensor] = {}  # one projection per width: same-width sides keep a common basis
    for z in (x.to(torch.float64), y.to(torch.float64)):
        if proj_dim is not None and z.shape[1] > proj_dim:
            if z.shape[1] not in shared:
                shared[z.shape[1]] = torch.randn(
                    z.shape[1], proj_dim, generator=generator, dtype=torch.float64
                )
            z = _standardise(z) @ shared[z.shape[1]].to(z.device)
        sides.append(z)
    x, y = (_scale_and_jitter(z, jitter, generator) for z in sides)
    nx, ny = ksg_counts(x, y, k, algorithm, chunk_size)
    offset = 1 if algorithm == 1 else 0
    marginal = _digamma(nx.to(torch.float64) + offset) + _digamma(ny.to(torch.float64) + offset)
    const = _digamma(torch.tensor([float(k), float(n)], dtype=torch.float64)).sum().item()
    if algorithm == 2:
        const -= 1.0 / k
    return const - marginal.mean()
