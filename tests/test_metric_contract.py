"""The contract every registered metric and selector meets, built-in or plugin, through the same
published helpers a plugin author uses (estimators.testing, algorithms.testing)."""

import pytest

from algorithms import testing as selector_contract
from algorithms.selectors import SELECTORS
from estimators import METRICS
from estimators import testing as metric_contract


@pytest.mark.parametrize("name", METRICS.list())
def test_scores_per_block_and_span(name):
    metric_contract.check_scores_per_block_and_span(name)
    assert METRICS.get(name)().name == name


@pytest.mark.parametrize("name", METRICS.list())
def test_near_identity_block_is_the_more_redundant(name):
    metric_contract.check_orientation(name)


@pytest.mark.parametrize("name", METRICS.list())
def test_unknown_parameter_is_refused(name):
    metric_contract.check_unknown_parameter_refused(name)


SELECTOR_PARAMS = {"optuna": {"trials": 12}, "iterative": {"objective": "proxy_sum"}}


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
