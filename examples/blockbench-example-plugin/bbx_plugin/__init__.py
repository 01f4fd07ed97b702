"""An example blockbench plugin: a metric (``rel_change``), a selector (``spread``) and an evaluation
(``nll_gap``).

Install it next to blockbench (``pip install examples/blockbench-example-plugin``) and the names
appear in ``bench list`` and can be used in any grid file (``nll_gap:`` as a section of its own).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from algorithms.evaluations import Column, EvalTarget, Evaluation, Params
from algorithms.selectors import SelectionProblem, SelectionResult, Selector
from estimators.base import Metric


class RelativeChange(Metric):
    """Relative update of the residual stream, mean over tokens of |y - x| / |x|; high = important."""

    name = "rel_change"
    version = "1"  # bump when the numbers change: it enters every cell id
    higher_is_important = True

    def __init__(self, eps: float = 1e-6) -> None:  # named options only: a typo is an error
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        super().__init__(eps=eps)
        self.eps = eps

    def pair(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # never score in bf16/fp16
        x, y = x.to(dtype), y.to(dtype)
        change = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(self.eps)
        return change.mean()


class Spread(Selector):
    """The k most redundant blocks, no two adjacent where possible (spreads the damage out)."""

    name = "spread"
    version = "1"

    def __init__(self, gap: int = 1) -> None:
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap must be a non-negative integer, got {gap!r}")
        super().__init__()
        self.params = {"gap": gap}
        self.gap = gap

    def select(self, problem: SelectionProblem) -> SelectionResult:
        redundancy = problem.redundancy.tolist()
        order = sorted(problem.candidates, key=lambda i: (-redundancy[i], i))
        chosen: list[int] = []
        for block in order:  # first pass: keep `gap` blocks between chosen ones
            if len(chosen) < problem.k and all(abs(block - c) > self.gap for c in chosen):
                chosen.append(block)
        for block in order:  # not enough room: fill with the next most redundant
            if len(chosen) < problem.k and block not in chosen:
                chosen.append(block)
        return SelectionResult(blocks=sorted(chosen), info={"gap": self.gap})


class NLLGapParams(Params):
    """The grid section ``nll_gap:``; unknown keys are refused, every default enters the cell id."""

    seq_len: int = Field(128, ge=2)
    max_windows: int = Field(4, ge=1)


class NLLGap(Evaluation):
    """Held-out next-token NLL of the pruned model minus the dense model's (nats); lower is better."""

    name = "nll_gap"
    version = "1"  # bump when the numbers change: it enters every cell id and cache key
    Params = NLLGapParams

    def columns(self) -> list[Column]:
        return [Column("nll_gap", "NLL gap", higher_is_better=False, fmt=".3f", spread=True, gate="nll_gap")]

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.data import heldout_windows
        from algorithms.models.nll import mean_nll

        windows = heldout_windows(target.tokenizer, "wikipedia", seq_len=self.params.seq_len,
                                  max_windows=self.params.max_windows)
        with target.pruned() as model:  # the dense model when target.removed is empty
            nll, tokens = mean_nll(model, windows)
        return {"nll": nll, "tokens": tokens}

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        return {"nll_gap": pruned["nll"] - dense["nll"]}
