"""Importance metrics on hidden states: pure torch maths, no model code.

``METRICS`` is the registry; entries are lazy ``module:attr`` strings so listing is cheap. Other
distributions add metrics through the entry-point group ``blockbench.metrics``.
"""

from estimators.base import Metric
from estimators.registry import Registry, RegistryError


def _is_metric(obj: object) -> str | None:
    if isinstance(obj, type) and issubclass(obj, Metric):
        return None
    return f"{obj!r} is not a subclass of estimators.base.Metric"


METRICS: Registry[type[Metric]] = Registry("metric", entry_point_group="blockbench.metrics", check=_is_metric)
METRICS.register("bi", "estimators.metrics:BlockInfluence")
METRICS.register("angular", "estimators.metrics:AngularDistance")
METRICS.register("mi_gauss", "estimators.mi:GaussianMI")
METRICS.register("mi_ksg", "estimators.mi:KSGMI")
METRICS.register("hsic", "estimators.kernel:HSIC")
METRICS.register("cka_linear", "estimators.kernel:LinearCKA")

__all__ = ["METRICS", "Metric", "Registry", "RegistryError"]
