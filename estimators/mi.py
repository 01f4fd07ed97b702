"""Mutual-information metrics: thin :class:`Metric` classes over :mod:`estimators.functional_mi` and
:mod:`estimators.functional_renyi`.

Orientation. A block's score is the MI between its input and output (a span's: between the states
entering and leaving it). A block that changes little keeps its output almost a copy of its input,
so the MI is *high*; a block that rewrites the stream lowers it. High MI therefore marks a redundant
block (MI-PRUN prunes the blocks of highest input/output MI), and ``higher_is_important = False``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from estimators import functional_mi as F
from estimators import functional_renyi as R
from estimators.base import Metric, Tensor
from estimators.checks import check_bool, check_choice, check_float, check_int
from estimators.tensors import sample_depth_tokens

if TYPE_CHECKING:
    from estimators.streaming import Moments


class GaussianMI(Metric):
    """Gaussian (log-determinant) MI between a block's input and output, Wishart bias-corrected.

    High MI = the block barely changes the stream = redundant, so ``higher_is_important`` is False.
    Needs ``N >= 2 (dx + dy)`` tokens, or ``max_dim`` to project each side onto fewer dimensions.
    """

    name = "mi_gauss"
    version = "2"
    higher_is_important = False

    def __init__(self, bias_correction: bool = True, max_dim: int | None = None, seed: int = 0) -> None:
        super().__init__(
            bias_correction=check_bool("bias_correction", bias_correction),
            max_dim=check_int("max_dim", max_dim, 1, optional=True),
            seed=check_int("seed", seed, 0),
        )

    def prepare(self, z: Tensor) -> F.GaussSide:
        return F.gauss_side(z, **self.params)

    def compare(self, a: F.GaussSide, b: F.GaussSide) -> Tensor:
        return F.gauss_compare(a, b)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.mi_gauss(x, y, **self.params)

    def stream_kind(self) -> str:
        return "moments"

    def prepare_moments(self, moments: Moments) -> F.GaussSide:
        return F.gauss_moment_side(moments.n, moments.cov, **self.params)

    def compare_moments(self, a: F.GaussSide, b: F.GaussSide, cross: Tensor) -> Tensor:
        return F.gauss_moment_compare(a, b, cross)

    def check_input(self, n_tokens: int, width: int) -> None:
        d = min(width, self.params["max_dim"] or width)
        if n_tokens < 4 * d:
            raise ValueError(
                f"mi_gauss needs N >= 2*(dx+dy) = {4 * d} tokens at width {d}, but the calibration gives "
                f"{n_tokens} (samples x seq_len): raise samples or seq_len, or set max_dim <= {n_tokens // 4}"
            )


class KSGMI(Metric):
    """Kraskov–Stögbauer–Grassberger kNN MI between a block's input and output.

    Each side is projected to ``proj_dim`` dims (seeded Gaussian matrix) and at most ``n_tokens``
    tokens are used. High MI = redundant block, so ``higher_is_important`` is False.
    ``chunk_size`` only bounds memory: results do not depend on it. Distances are computed in
    ``precision`` (float32 by default; ``jitter=None`` picks the tie-breaking noise that survives it).
    """

    name = "mi_ksg"
    version = "2"
    higher_is_important = False

    def __init__(
        self,
        k: int = 3,
        algorithm: int = 1,
        proj_dim: int | None = 5,
        n_tokens: int | None = 2048,
        chunk_size: int = 512,
        jitter: float | None = None,
        precision: str = "float32",
        seed: int = 0,
    ) -> None:
        k = check_int("k", k, 1)
        if algorithm not in (1, 2) or isinstance(algorithm, bool):
            raise ValueError(f"algorithm must be 1 or 2, got {algorithm!r}")
        n_tokens = check_int("n_tokens", n_tokens, 1, optional=True)
        if n_tokens is not None and n_tokens <= k:
            raise ValueError(f"n_tokens must exceed k={k}, got {n_tokens}")
        super().__init__(
            k=k,
            algorithm=algorithm,
            proj_dim=check_int("proj_dim", proj_dim, 1, optional=True),
            n_tokens=n_tokens,
            chunk_size=check_int("chunk_size", chunk_size, 1),
            jitter=check_float("jitter", jitter, positive=False, optional=True),
            precision=check_choice("precision", precision, tuple(F.KSG_JITTER)),
            seed=check_int("seed", seed, 0),
        )

    def prepare(self, z: Tensor) -> F.KSGSide:
        return F.ksg_side(z, population=self.population, **self.params)

    def stream_kind(self) -> str:
        return "sample"

    def sample_spec(self) -> tuple[int | None, int]:
        return self.params["n_tokens"], self.params["seed"]

    def compare(self, a: F.KSGSide, b: F.KSGSide) -> Tensor:
        return F.ksg_compare(a, b)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.mi_ksg(x, y, **self.params)


class RenyiMI(Metric):
    """Matrix-based Rényi α-order MI (Giraldo et al. 2014; Yu et al. 2019) between a block's input and
    output, in bits: :func:`estimators.functional_renyi.mi_renyi`.

    Gaussian-kernel Gram matrices of a seeded sample of ``n_tokens`` tokens (the same tokens at every
    depth: :meth:`select_tokens` draws them once), normalised to trace 1; ``I = S(A_x) + S(A_y) -
    S(A_x ∘ A_y)`` from eigenvalues in float64. ``alpha`` > 0 is the order (1: von Neumann).
    ``sigma`` is the kernel width: a number, or ``"median"`` (default) for the median pairwise
    distance of each depth's sample separately, which makes the score blind to the growth of
    hidden-state norms with depth (a block that only rescales the stream scores ``I(X; X)``).
    Cost: an ``n x n`` eigenvalue decomposition per depth (prepared once) and one per scored pair,
    ``O(n^3)`` each.

    Orientation, as for ``mi_gauss`` (module docstring): high MI = the block's output keeps its input's
    token geometry = the block changes little = redundant, so ``higher_is_important`` is False. This is
    MI-PRUN's reading (prune the blocks of highest input/output MI). Any invertible block keeps the
    true MI maximal, so what such a ranking measures is this estimator: how much of the kernel
    neighbourhood structure of the tokens survives the block, at the scale ``sigma`` sets.
    """

    name = "mi_renyi"
    version = "1"
    higher_is_important = False
    #: fewer tokens than this cannot be scored (the estimate is bounded by ``log2 N`` bits)
    min_tokens = 4

    def __init__(
        self,
        alpha: float = R.DEFAULT_ALPHA,
        sigma: float | str = "median",
        n_tokens: int = R.DEFAULT_TOKENS,
        seed: int = 0,
    ) -> None:
        if isinstance(sigma, str):
            if sigma != "median":
                raise ValueError(f"sigma must be 'median' or a finite number > 0, got {sigma!r}")
        else:
            try:
                sigma = check_float("sigma", sigma, positive=True)
            except ValueError:
                raise ValueError(f"sigma must be 'median' or a finite number > 0, got {sigma!r}") from None
        super().__init__(
            alpha=check_float("alpha", alpha, positive=True),
            sigma=sigma,
            n_tokens=check_int("n_tokens", n_tokens, self.min_tokens),
            seed=check_int("seed", seed, 0),
        )

    def select_tokens(self, states: Tensor) -> Tensor:
        return sample_depth_tokens(
            states, self.params["n_tokens"], torch.Generator().manual_seed(self.params["seed"])
        )

    def prepare(self, z: Tensor) -> R.RenyiSide:
        return R.renyi_side(z, **self.params)

    def stream_kind(self) -> str:
        return "sample"

    def sample_spec(self) -> tuple[int | None, int]:
        return self.params["n_tokens"], self.params["seed"]

    def compare(self, a: R.RenyiSide, b: R.RenyiSide) -> Tensor:
        return R.renyi_compare(a, b)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return R.mi_renyi(x, y, **self.params)

    def check_input(self, n_tokens: int, width: int) -> None:
        if n_tokens < self.min_tokens:
            raise ValueError(
                f"mi_renyi needs at least {self.min_tokens} tokens, but the calibration gives {n_tokens} "
                f"(samples x seq_len): raise samples or seq_len"
            )
