"""Model adapters, block removal, hidden-state capture, data, selectors and evaluations.

``SELECTORS`` and ``MODEL_METRICS`` live here, not in :mod:`algorithms.selectors`, so that reading a grid (names checked
against the registry) imports no torch; a selector's module is imported when its name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from estimators.registry import Registry

if TYPE_CHECKING:
    from algorithms.model_metrics import ModelMetric
    from algorithms.selectors import Selector

#: built-in selectors; other distributions add theirs through the entry-point group ``blockbench.selectors``
SELECTORS: Registry[type[Selector]] = Registry("selector", entry_point_group="blockbench.selectors",
                                               base="algorithms.selectors:Selector")
SELECTORS.register("topk", "algorithms.selectors:TopK")
SELECTORS.register("iterative", "algorithms.selectors:Iterative")
SELECTORS.register("span", "algorithms.selectors:Span")
SELECTORS.register("fbs", "algorithms.selectors:FastBlockSelect")
SELECTORS.register("exhaustive", "algorithms.selectors:Exhaustive")
SELECTORS.register("optuna", "algorithms.selectors:OptunaSearch")
SELECTORS.register("ising", "algorithms.ising:Ising")


def _check_model_metric(obj: object) -> str | None:
    from algorithms.model_metrics import check_model_metric

    return check_model_metric(obj)


#: metrics that need the model, not only hidden states (:mod:`algorithms.model_metrics`); a grid's
#: ``metrics:`` names entries of this registry and of :data:`estimators.METRICS` alike
MODEL_METRICS: Registry[type[ModelMetric]] = Registry("metric", entry_point_group="blockbench.model_metrics",
                                                      check=_check_model_metric)
MODEL_METRICS.register("ppl", "algorithms.model_metrics:RemovalLoss")
MODEL_METRICS.register("taylor", "algorithms.model_metrics:TaylorImportance")
