"""Selectors against exhaustive search on small cases."""

import itertools

import pytest
import torch

from algorithms.selectors import SELECTORS, SelectionProblem


def exhaustive_best(redundancy, k, protected=frozenset()):
    free = [i for i in range(len(redundancy)) if i not in protected]
    return max(itertools.combinations(free, k), key=lambda s: sum(redundancy[i] for i in s))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("higher_is_important", [True, False])
def test_topk_equals_exhaustive_on_additive_objective(seed, higher_is_important):
    g = torch.Generator().manual_seed(seed)
    n = 10
    k = int(torch.randint(1, 6, (1,), generator=g))
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    protected = frozenset({0, n - 1}) if seed % 2 else frozenset()
    problem = SelectionProblem(n_blocks=n, k=k, scores=scores, higher_is_important=higher_is_important,
                               protected=protected)
    chosen = SELECTORS.get("topk")()(problem).blocks
    best = exhaustive_best(problem.redundancy.tolist(), k, protected)
    assert sorted(best) == chosen


def test_orientation_is_respected():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2], dtype=torch.float64)
    important = SelectionProblem(n_blocks=4, k=2, scores=scores, higher_is_important=True)
    redundant = SelectionProblem(n_blocks=4, k=2, scores=scores, higher_is_important=False)
    topk = SELECTORS.get("topk")()
    assert topk(important).blocks == [1, 3]
    assert topk(redundant).blocks == [0, 2]


def test_problem_validation():
    s = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot remove k=4 of 4"):
        SelectionProblem(n_blocks=4, k=4, scores=s, higher_is_important=True)
    with pytest.raises(ValueError, match="k=3 of 4 blocks with 2 protected"):
        SelectionProblem(n_blocks=4, k=3, scores=s, higher_is_important=True, protected=frozenset({0, 3}))
    with pytest.raises(ValueError, match=r"not finite for blocks \[2\]"):
        SelectionProblem(n_blocks=4, k=1, scores=torch.tensor([0, 1, float("nan"), 2.0]),
                         higher_is_important=True)
    with pytest.raises(TypeError, match="takes no parameter 'depth'"):
        SELECTORS.get("topk")(depth=3)
