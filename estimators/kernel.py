"""Kernel dependence metrics: thin :class:`Metric` classes over :mod:`estimators.functional_kernel`.

Orientation, as for MI (:mod:`estimators.mi`): HSIC and CKA measure how strongly a block's output
depends on (is similar to) its input. A block that changes little scores high and is the one to
prune, so ``higher_is_important = False``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from estimators import functional_kernel as F
from estimators.base import Metric, Tensor
from estimators.checks import check_bool, check_float, check_int

if TYPE_CHECKING:
    from estimators.streaming import Moments


class HSIC(Metric):
    """Gaussian-kernel HSIC (unbiased, Song et al. 2012) between a block's input and output.

    ``normalized`` (default True here, unlike the functional) divides by
    ``sqrt(HSIC(X, X) HSIC(Y, Y))`` so scores compare across depths whose hidden-state scale differs.
    ``sigma=None`` is the median heuristic per side. ``n_tokens`` caps the tokens used (a seeded
    sample, the same at every depth). Above ``n_exact`` tokens the kernels are approximated with
    ``rff_features`` random Fourier features (``None`` keeps it exact). Each depth's kernel matrix is
    built once per scoring pass (:meth:`prepare`); exact kernels hold ``N^2`` floats per depth.
    """

    name = "hsic"
    version = "2"
    higher_is_important = False

    def __init__(
        self,
        sigma: float | None = None,
        normalized: bool = True,
        unbiased: bool = True,
        rff_features: int | None = 1024,
        n_exact: int = 4096,
        n_tokens: int | None = 2048,
        chunk_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__(
            sigma=check_float("sigma", sigma, positive=True, optional=True),
            normalized=check_bool("normalized", normalized),
            unbiased=check_bool("unbiased", unbiased),
            rff_features=check_int("rff_features", rff_features, 1, optional=True),
            n_exact=check_int("n_exact", n_exact, 0),
            n_tokens=check_int("n_tokens", n_tokens, 4, optional=True),
            chunk_size=check_int("chunk_size", chunk_size, 1),
            seed=check_int("seed", seed, 0),
        )

    def prepare(self, z: Tensor) -> F.KernelSide:
        return F.hsic_side(z, population=self.population, **self.params)

    def stream_kind(self) -> str:
        return "sample"

    def sample_spec(self) -> tuple[int | None, int]:
        return self.params["n_tokens"], self.params["seed"]

    def compare(self, a: F.KernelSide, b: F.KernelSide) -> Tensor:
        return F.hsic_compare(a, b)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.hsic(x, y, **self.params)


class LinearCKA(Metric):
    """Linear CKA (centred features) between a block's input and output; 1 = same up to rotation/scale.

    High similarity = redundant block, so ``higher_is_important`` is False. ``debiased`` uses
    unbiased HSIC terms (removes the ``O(d/N)`` floor of the plain estimator).
    """

    name = "cka_linear"
    version = "1"
    higher_is_important = False

    def __init__(self, debiased: bool = False) -> None:
        super().__init__(debiased=check_bool("debiased", debiased))

    def prepare(self, z: Tensor) -> F.KernelSide:
        return F.linear_side(z, normalized=True, unbiased=self.params["debiased"])

    def compare(self, a: F.KernelSide, b: F.KernelSide) -> Tensor:
        return F.hsic_compare(a, b)

    def pair(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cka_linear(x, y, **self.params)

    def stream_kind(self) -> str | None:
        # the debiased form needs every token's squared norm about the final mean: stored states
        return None if self.params["debiased"] else "moments"

    def prepare_moments(self, moments: Moments) -> Tensor:
        return moments.cov

    def compare_moments(self, a: Tensor, b: Tensor, cross: Tensor) -> Tensor:
        return F.cka_from_covariances(a, b, cross)
