"""Importance metrics on hidden states: pure torch maths, no model code.

``METRICS`` is the registry; entries are lazy ``module:attr`` strings so listing is cheap. Other
distributions add metrics through the entry-point group ``blockbench.metrics``.
"""

from estimators.base import Metric
from estimators.registry import Registry, RegistryError

METRICS: Registry[type[Metric]] = Registry("metric", entry_point_group="blockbench.metrics", base=Metric)
METRICS.register("bi", "estimators.metrics:BlockInfluence")
METRICS.register("angular", "estimators.metrics:AngularDistance")
METRICS.register("mi_gauss", "estimators.mi:GaussianMI")
METRICS.register("mi_ksg", "estimators.mi:KSGMI")
METRICS.register("hsic", "estimators.kernel:HSIC")
METRICS.register("cka_linear", "estimators.kernel:LinearCKA")

__all__ = ["METRICS", "Metric", "Registry", "RegistryError"]
