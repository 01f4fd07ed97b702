"""Model adapters, block removal, hidden-state capture, data, selectors, method presets and evaluations.

``SELECTORS``, ``MODEL_METRICS`` and ``METHODS`` live here, not in :mod:`algorithms.selectors` /
:mod:`algorithms.model_metrics` / :mod:`algorithms.methods`, so that reading a grid (names checked
against the registries) imports no torch; an entry's module is imported when its name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from estimators.registry import Registry

if TYPE_CHECKING:
    from algorithms.methods import MethodPreset
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


def _check_method(obj: object) -> str | None:
    from algorithms.methods import check_method

    return check_method(obj)


#: built-in method presets (``algorithms.methods``: a paper's metric × selector, unit, healing, protected
#: blocks); entries are objects, not classes, so the registry checks them with ``check``, not ``base``.
#: Other distributions add a ``MethodPreset`` under the entry-point group ``blockbench.methods``
METHODS: Registry[MethodPreset] = Registry("method", entry_point_group="blockbench.methods", check=_check_method)
METHODS.register("shortgpt", "algorithms.methods:SHORTGPT")
METHODS.register("gromov", "algorithms.methods:GROMOV")
METHODS.register("sleb", "algorithms.methods:SLEB")
METHODS.register("shortened-ppl", "algorithms.methods:SHORTENED_PPL")
METHODS.register("shortened-taylor", "algorithms.methods:SHORTENED_TAYLOR")
METHODS.register("mi-prun-gauss", "algorithms.methods:MI_PRUN_GAUSS")
METHODS.register("mi-prun-renyi", "algorithms.methods:MI_PRUN_RENYI")
METHODS.register("mi-prun-ksg", "algorithms.methods:MI_PRUN_KSG")
METHODS.register("cbo-like", "algorithms.methods:CBO_LIKE")
METHODS.register("attention-drop", "algorithms.methods:ATTENTION_DROP")
METHODS.register("replaceme", "algorithms.methods:REPLACEME")
METHODS.register("blockpruner", "algorithms.methods:BLOCKPRUNER")
