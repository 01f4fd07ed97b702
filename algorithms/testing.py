"""The contract every selector meets, built-in or plugin (``from algorithms.testing import
check_selector``): on small random problems, with and without protected blocks and in both score
orientations, it returns ``k`` distinct unprotected blocks, deterministically, and refuses an unknown
parameter by name. The metric contract is in :mod:`estimators.testing`.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from algorithms.objectives import ObjectiveFactory
from algorithms.selectors import SelectionProblem, Selector


def _selector_class(selector: type[Selector] | str) -> type[Selector]:
    if isinstance(selector, str):
        from algorithms.selectors import SELECTORS

        return SELECTORS.get(selector)
    return selector


def problems(seed: int = 0) -> list[SelectionProblem]:
    """Small problems with block scores, span scores and the proxy objectives."""
    out = []
    for i, (n, k, protect, important) in enumerate(itertools.product((8, 11), (1, 3), (False, True), (True, False))):
        g = torch.Generator().manual_seed(seed * 100 + i)
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        spans = {m: torch.rand(n - m + 1, generator=g, dtype=torch.float64) for m in range(2, n + 1)}
        spans[1] = scores

        def span_scores(m: int, spans=spans) -> torch.Tensor:
            return spans[m]

        out.append(SelectionProblem(
            n_blocks=n, k=k, scores=scores, higher_is_important=important,
            protected=frozenset({0, n - 1}) if protect else frozenset(), seed=seed, span_scores=span_scores,
            objectives=ObjectiveFactory(block_scores=scores, higher_is_important=important,
                                        span_scores=span_scores),
        ))
    return out


def check_selector(selector: type[Selector] | str, **params: Any) -> None:
    """Every selector check at once; ``params`` configure the selector as a grid file would."""
    cls = _selector_class(selector)
    assert cls.name, f"{cls.__name__} sets no `name`"
    for problem in problems():
        first = cls(**params)(problem)  # Selector.__call__ also checks count, distinctness and range
        assert len(first.blocks) == problem.k == len(set(first.blocks)), first.blocks
        assert not set(first.blocks) & problem.protected, f"chose protected blocks {first.blocks}"
        assert first.evaluations >= 0
        again = cls(**params)(problem)
        assert again.blocks == first.blocks, f"not deterministic: {first.blocks} then {again.blocks}"
    try:
        cls(**params, no_such_option=1)
    except (TypeError, ValueError) as exc:
        assert "no_such_option" in str(exc), f"the error does not name the option: {exc}"
    else:
        raise AssertionError(f"{cls.__name__} accepted an unknown parameter 'no_such_option'")
