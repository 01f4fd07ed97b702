"""Matrix-based Rényi α-order entropy and mutual information between hidden states at two depths.

Giraldo, Rao and Príncipe (2014), "Measures of entropy from data using infinitely divisible kernels";
Yu et al. (2019), "Multivariate extension of matrix-based Rényi's α-order entropy functional". The
estimator most used for layer representations in the information-bottleneck literature: no density
is fitted; entropies are read off the eigenvalues of a normalised Gram matrix of the tokens.

For ``n`` tokens ``z_1..z_n`` of one depth:

* ``K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2))`` (Gaussian kernel, so ``K_ii = 1``);
* ``A = K / tr(K) = K / n``, symmetric PSD with trace 1;
* ``S_α(A) = 1/(1 - α) log2 tr(A^α) = 1/(1 - α) log2 sum_i λ_i^α`` over the eigenvalues of ``A``
  (``α = 1``: the von Neumann entropy ``-sum_i λ_i log2 λ_i``, the limit α → 1), in bits,
  between 0 (all tokens identical: ``A = 11'/n``, one eigenvalue 1) and ``log2 n`` (all tokens far
  apart: ``A = I/n``);
* joint entropy ``S_α(A_x, A_y) = S_α(A_x ∘ A_y / tr(A_x ∘ A_y))`` (Hadamard product: the Gram
  matrix of the product kernel on the concatenated states);
* ``I_α(X; Y) = S_α(A_x) + S_α(A_y) - S_α(A_x, A_y)``.

Yu et al. show ``max(S_α(A_x), S_α(A_y)) <= S_α(A_x, A_y) <= S_α(A_x) + S_α(A_y)``, so
``0 <= I_α <= min(S_α(A_x), S_α(A_y))``. Unlike Shannon MI, ``I_α(X; X) = S_α(A) + S_α(A) -
S_α(A ∘ A)`` is *not* ``S_α(A)`` in general: ``A ∘ A`` normalised is ``A`` at kernel width
``sigma / sqrt(2)``, whose entropy is larger unless every ``K_ij`` is 0 or 1 (tokens in coincident
clusters that do not see each other), so ``I_α(X; X) <= S_α(A)``, with equality only there.

Each depth's Gram matrix and entropy are computed once (:func:`renyi_side`) and shared by every pair
that uses the depth (:func:`renyi_compare`): both are ``O(n^3)`` in the token sample (one eigenvalue
decomposition per depth, one per compared pair) and ``O(n^2 d)`` for the distances. Everything runs in
float64 on the states' device, so the estimate is invariant to orthogonal maps and translations of
either side to rounding (~1e-13), and, with ``sigma="median"``, to rescaling either side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from estimators.functional_kernel import median_bandwidth
from estimators.tensors import flatten_states, on_both_sides, sample_tokens

Tensor = torch.Tensor

#: The order used when none is given: close to Shannon (α → 1) while keeping the Rényi form.
DEFAULT_ALPHA = 1.01
#: Tokens drawn per depth when none is given: every entropy costs an ``n x n`` eigenvalue decomposition.
DEFAULT_TOKENS = 512


def renyi_entropy(a: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Matrix-based Rényi α-order entropy, in bits, of a symmetric PSD matrix ``a`` (n, n) normalised
    to trace 1 here: ``1/(1 - α) log2 sum_i λ_i^α`` over its eigenvalues, ``-sum_i λ_i log2 λ_i``
    when ``α == 1``.

    Eigenvalues come from ``eigvalsh`` in float64; those at or below ``n * eps * λ_max`` (rounding:
    they would be exactly 0, or are negative) count as 0, which matters for ``α < 1`` where each
    would otherwise add its ``λ^α >> λ``. Returns a 0-d float64 tensor on ``a``'s device.

    >>> round(float(renyi_entropy(torch.eye(4), alpha=2.0)), 12)  # four equal eigenvalues: log2 4
    2.0
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"renyi_entropy needs a square non-empty matrix, got shape {tuple(a.shape)}")
    a = a.to(torch.float64)
    a = a / torch.diagonal(a).sum()
    eig = torch.linalg.eigvalsh(a)
    floor = eig.max().clamp_min(0.0) * a.shape[0] * torch.finfo(torch.float64).eps
    eig = torch.where(eig > floor, eig, torch.zeros_like(eig))
    if alpha == 1.0:
        return -torch.special.xlogy(eig, eig).sum() / torch.log(torch.tensor(2.0, dtype=torch.float64))
    return torch.log2((eig**alpha).sum()) / (1.0 - alpha)


def gaussian_gram(z: Tensor, sigma: float) -> Tensor:
    """The Gaussian Gram matrix ``exp(-||z_i - z_j||^2 / (2 sigma^2))`` of ``z`` (n, d), float64.

    Distances are taken from coordinate differences (``cdist`` without the ``||a||^2 + ||b||^2 - 2 a.b``
    matmul shortcut, whose cancellation loses the small distances of tokens far from the origin), so
    every entry is exact to rounding and the diagonal is exactly 1. ``O(n^2 d)``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    z = z.to(torch.float64)
    dist = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.exp((dist * dist) * (-0.5 / sigma**2))


@dataclass
class RenyiSide:
    """One depth's share of :func:`mi_renyi`: the Gram matrix ``gram`` (n, n) float64 with unit diagonal
    (None when the states were not finite: every MI with them is NaN), its entropy ``entropy`` (bits),
    the kernel width ``sigma`` used, and ``alpha``."""

    n: int
    alpha: float
    sigma: float
    entropy: Tensor
    gram: Tensor | None


def renyi_side(
    z: Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    sigma: float | str = "median",
    n_tokens: int | None = DEFAULT_TOKENS,
    seed: int = 0,
) -> RenyiSide:
    """The per-depth part of :func:`mi_renyi` for states ``z`` of shape ``(..., d)``; the defaults
    of :func:`mi_renyi`'s parameters (documented there) are set here."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not (sigma == "median" or (not isinstance(sigma, (str, bool)) and sigma > 0)):
        raise ValueError(f"sigma must be 'median' or a number > 0, got {sigma!r}")
    if n_tokens is not None and n_tokens < 2:
        raise ValueError(f"n_tokens must be an int >= 2 or None, got {n_tokens!r}")
    z = sample_tokens(flatten_states(z), n_tokens, torch.Generator().manual_seed(seed))
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"Rényi MI needs at least 2 tokens, got N={n}")
    if not bool(torch.isfinite(z).all()):
        nan = torch.full((), float("nan"), dtype=torch.float64, device=z.device)
        return RenyiSide(n, float(alpha), float("nan"), nan, None)
    z = z.to(torch.float64)
    width = median_bandwidth(z, seed=seed, max_points=n) if sigma == "median" else float(sigma)
    gram = gaussian_gram(z, width)
    return RenyiSide(n, float(alpha), width, renyi_entropy(gram, alpha), gram)


def renyi_compare(a: RenyiSide, b: RenyiSide) -> Tensor:
    """Rényi MI between two prepared depths: ``S(A) + S(B) - S(A ∘ B)`` (see :func:`mi_renyi`)."""
    if a.n != b.n:
        raise ValueError(f"Rényi MI sides hold different token counts: {a.n} vs {b.n}")
    if a.alpha != b.alpha:
        raise ValueError(f"Rényi MI sides were built with different alpha: {a.alpha} vs {b.alpha}")
    if a.gram is None or b.gram is None:
        device = (a.gram if a.gram is not None else b.entropy).device
        return torch.full((), float("nan"), dtype=torch.float64, device=device)
    return a.entropy + b.entropy - renyi_entropy(a.gram * b.gram, a.alpha)


def mi_renyi(x: Tensor, y: Tensor, **params: Any) -> Tensor:
    """Matrix-based Rényi α-order mutual information ``S_α(A_x) + S_α(A_y) - S_α(A_x ∘ A_y)`` in bits
    (module docstring); the parameters, with their defaults, are :func:`renyi_side`'s.

    ``alpha`` (> 0; 1 is the von Neumann/Shannon-like limit, the default 1.01 stays close to it) is
    the order. ``sigma`` is the Gaussian kernel width ``exp(-||a - b||^2 / (2 sigma^2))``: a number
    used at both depths, or ``"median"`` (the default) for the median heuristic taken *per depth*:
    sigma = the median Euclidean distance between distinct sampled tokens of that depth
    (:func:`estimators.functional_kernel.median_bandwidth`), which makes the estimate invariant to
    the scale of each side (hidden-state norms grow with depth). ``n_tokens`` keeps a sample of that
    many tokens drawn without replacement from a generator seeded with ``seed``, the same tokens at
    both depths (all tokens when there are not more; ``None``: all, at ``O(N^3)``).
    Returns a 0-d float64 tensor on the inputs' device; NaN when either side is not finite.

    >>> x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    >>> bool(mi_renyi(x, x) <= renyi_side(x).entropy + 1e-12)  # I(X; X) <= S(X), equal only for 0/1 Grams
    True
    """
    return on_both_sides(renyi_side, renyi_compare, x, y, **params)
