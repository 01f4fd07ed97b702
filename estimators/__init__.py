"""Importance metrics on hidden states: pure torch maths, no model code.

``METRICS`` is the registry; entries are lazy ``module:attr`` strings so listing is cheap. Other
distributions add metrics through the entry-point group ``blockbench.metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from estimators.registry import Registry, RegistryError

if TYPE_CHECKING:
    from estimators.base import Metric

# the base class is named, not imported: importing the registry (to read a grid, to list names) does not
# import torch; a metric's module is imported when its name is used
METRICS: Registry[type[Metric]] = Registry("metric", entry_point_group="blockbench.metrics",
                                           base="estimators.base:Metric")
METRICS.register("bi", "estimators.metrics:BlockInfluence")
METRICS.register("angular", "estimators.metrics:AngularDistance")
METRICS.register("mi_gauss", "estimators.mi:GaussianMI")
METRICS.register("mi_ksg", "estimators.mi:KSGMI")
METRICS.register("mi_renyi", "estimators.mi:RenyiMI")
METRICS.register("hsic", "estimators.kernel:HSIC")
METRICS.register("cka_linear", "estimators.kernel:LinearCKA")

__all__ = ["METRICS", "Metric", "Registry", "RegistryError"]


def __getattr__(name: str) -> Any:
    if name == "Metric":
        from estimators.base import Metric

        return Metric
    raise AttributeError(f"module 'estimators' has no attribute {name!r}")
