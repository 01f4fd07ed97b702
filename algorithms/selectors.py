"""Selectors turn block scores into the set of blocks to remove.

A selector is a small class (optuna-sampler style): set ``name`` and ``version``, take its options in
``__init__`` and implement :meth:`Selector.select`. It receives a :class:`SelectionProblem`, where
scores are already oriented as *redundancy* (high = safe to remove) so no selector guesses a sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from estimators.registry import Registry


@dataclass(frozen=True)
class SelectionProblem:
    """Everything a selector may use to pick ``k`` of ``n_blocks`` blocks."""

    n_blocks: int
    k: int
    scores: torch.Tensor  #: raw metric score per block, shape (n_blocks,)
    higher_is_important: bool
    protected: frozenset[int] = frozenset()
    seed: int = 0
    #: n -> span scores of every run of n blocks (raw metric orientation), for span-aware selectors
    span_scores: Callable[[int], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.scores.shape != (self.n_blocks,):
            raise ValueError(f"scores must have shape ({self.n_blocks},), got {tuple(self.scores.shape)}")
        free = self.n_blocks - len(self.protected)
        if not 1 <= self.k <= free or self.k >= self.n_blocks:
            raise ValueError(
                f"cannot remove k={self.k} of {self.n_blocks} blocks with {len(self.protected)} protected"
            )
        if not torch.isfinite(self.scores).all():
            bad = [i for i, s in enumerate(self.scores.tolist()) if not torch.isfinite(torch.tensor(s))]
            raise ValueError(f"scores are not finite for blocks {bad}")

    @property
    def redundancy(self) -> torch.Tensor:
        """Scores oriented so that a higher value means a more removable block."""
        return -self.scores if self.higher_is_important else self.scores

    @property
    def candidates(self) -> list[int]:
        return [i for i in range(self.n_blocks) if i not in self.protected]


@dataclass
class SelectionResult:
    blocks: list[int]
    evaluations: int = 0  #: objective evaluations the selector used (0 for one-shot rules)
    info: dict[str, Any] = field(default_factory=dict)


class Selector:
    """Base class of selectors."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"selector {self.name!r} takes no parameter {sorted(params)[0]!r}")
        self.params: dict[str, Any] = {}

    def select(self, problem: SelectionProblem) -> SelectionResult:
        raise NotImplementedError

    def __call__(self, problem: SelectionProblem) -> SelectionResult:
        result = self.select(problem)
        blocks = sorted(int(b) for b in result.blocks)
        if len(blocks) != problem.k or len(set(blocks)) != problem.k:
            raise RuntimeError(f"selector {self.name!r} returned {blocks}, not {problem.k} distinct blocks")
        if bad := [b for b in blocks if b in problem.protected or not 0 <= b < problem.n_blocks]:
            raise RuntimeError(f"selector {self.name!r} chose protected or invalid blocks {bad}")
        result.blocks = blocks
        return result


class TopK(Selector):
    """One-shot: remove the k most redundant blocks by score (ShortGPT). Ties go to the later block."""

    name = "topk"

    def select(self, problem: SelectionProblem) -> SelectionResult:
        red = problem.redundancy.tolist()
        order = sorted(problem.candidates, key=lambda i: (-red[i], -i))
        return SelectionResult(blocks=order[: problem.k])


SELECTORS: Registry[type[Selector]] = Registry("selector")
SELECTORS.register("topk", "algorithms.selectors:TopK")
