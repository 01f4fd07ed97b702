"""The contract every registered metric and selector meets, built-in or plugin, through the same
published helpers a plugin author uses (estimators.testing, algorithms.testing)."""

import pytest
import torch

from algorithms import testing as selector_contract
from algorithms.selectors import SELECTORS
from estimators import METRICS
from estimators import testing as metric_contract
from estimators.base import Metric


@pytest.mark.parametrize("name", METRICS.list())
def test_scores_per_block_and_span(name):
    metric_contract.check_scores_per_block_and_span(name)
    assert METRICS.get(name)().name == name


@pytest.mark.parametrize("name", METRICS.list())
def test_near_identity_block_is_the_more_redundant(name):
    metric_contract.check_orientation(name)


@pytest.mark.parametrize("name", METRICS.list())
def test_streamed_scores_equal_stored_scores(name):
    metric_contract.check_streaming(name)


@pytest.mark.parametrize("name", METRICS.list())
def test_unknown_parameter_is_refused(name):
    metric_contract.check_unknown_parameter_refused(name)


SELECTOR_PARAMS = {"optuna": {"trials": 12}, "iterative": {"objective": "proxy_sum"}, "ising": {"objective": "proxy_sum"}}


@pytest.mark.parametrize("name", SELECTORS.list())
def test_selector_contract(name):
    selector_contract.check_selector(name, **SELECTOR_PARAMS.get(name, {}))
    assert SELECTORS.get(name).name == name


def test_the_contract_catches_a_wrong_sign_and_a_silent_option():
    from estimators.metrics import BlockInfluence

    class WrongSign(BlockInfluence):
        name = "wrong_sign"
        higher_is_important = False  # BI is high for important blocks: this lies

    with pytest.raises(AssertionError, match="check the sign"):
        metric_contract.check_orientation(WrongSign)

    from estimators.base import Metric

    class Lenient(BlockInfluence):
        name = "lenient"

        def __init__(self, **params):
            Metric.__init__(self, **params)
            self.tokens = "all"

    with pytest.raises(AssertionError, match="accepted an unknown parameter"):
        metric_contract.check_unknown_parameter_refused(Lenient)

    from algorithms.selectors import SelectionResult, Selector

    class Protected(Selector):
        name = "protected"

        def select(self, problem):
            return SelectionResult(blocks=list(range(problem.k)))  # ignores protected blocks

    with pytest.raises(RuntimeError, match="protected or invalid"):
        selector_contract.check_selector(Protected)



def _counting_metric(broken: bool = False) -> type[Metric]:
    """A cosine metric with per-depth work (unit-normalised tokens) that counts its preparations."""

    class Counting(Metric):
        name = "counting"
        prepared = 0

        def __init__(self):
            super().__init__()

        def prepare(self, z):
            type(self).prepared += 1
            return torch.nn.functional.normalize(z.double(), dim=-1)

        def compare(self, a, b):
            value = 1.0 - (a * b).sum(-1).mean()
            return 2 * value if broken else value  # a broken compare disagrees with pair()

        def pair(self, x, y):
            return 1.0 - torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean()

    return Counting


def test_score_spans_prepares_each_depth_once():
    cls = _counting_metric()
    states = torch.randn(7, 2, 8, 4, generator=torch.Generator().manual_seed(0))  # 6 blocks, 7 depths
    blocks = cls().score_blocks(states)
    assert cls.prepared == 7  # not 2 x 6
    cls.prepared = 0
    assert cls().score_spans(states, 3).shape == (4,) and cls.prepared == 7
    expected = [cls().pair(states[i], states[i + 1]).item() for i in range(6)]
    assert blocks.tolist() == pytest.approx(expected, rel=1e-12)
    metric_contract.check_scores_per_block_and_span(cls)


def test_several_span_lengths_share_one_pass():
    cls = _counting_metric()
    states = torch.randn(9, 2, 8, 4, generator=torch.Generator().manual_seed(1))  # 8 blocks, 9 depths
    together = cls().score_span_lengths(states, [3, 1, 4, 3])
    assert sorted(together) == [1, 3, 4] and cls.prepared == 9  # not 3 x 9
    for n, scores in together.items():
        assert torch.equal(scores, cls().score_spans(states, n))
    assert cls().score_span_lengths(states, []) == {}
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="span length"):
            cls().score_span_lengths(states, [1, bad])


def test_a_subclass_that_scores_spans_its_own_way_keeps_it():
    class OwnSpans(_counting_metric()):
        def score_spans(self, states, n=1):
            return torch.full((states.shape[0] - n,), float(n), dtype=torch.float64)

    class Logged(_counting_metric()):
        calls: list[int] = []

        def score_spans(self, states, n=1):  # the usual wrapper: do something, then the base class
            self.calls.append(n)
            return super().score_spans(states, n)

    states = torch.randn(5, 2, 8, 4, generator=torch.Generator().manual_seed(2))
    assert {n: v.tolist() for n, v in OwnSpans().score_span_lengths(states, [1, 2]).items()} == {
        1: [1.0] * 4, 2: [2.0] * 3}
    logged = Logged().score_span_lengths(states, [2, 1])
    assert Logged.calls == [1, 2] and torch.equal(logged[2], Logged().score_spans(states, 2))


def test_the_contract_catches_a_compare_that_disagrees_with_pair():
    with pytest.raises(AssertionError, match="check prepare/compare"):
        metric_contract.check_scores_per_block_and_span(_counting_metric(broken=True))
