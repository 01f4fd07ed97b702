"""Healing after removal: the registry and the built-ins.

``HEALINGS`` maps a grid's ``healing:`` value to a :class:`~algorithms.healing.base.Healing` class
(lazy ``module:Class`` entries): ``linear`` (ReplaceMe-style, a least-squares linear map folded into
the weights, training-free) and ``lora`` (LoRA fine-tuning on calibration text with ``peft``, merged
into the weights). ``none`` is not an entry: the pipeline skips healing then. Other distributions add
methods through the entry-point group ``blockbench.healings``.
"""

from algorithms.healing.base import Healing, HealOutcome, HealTarget, Params, check_healing
from estimators.registry import Registry

HEALINGS: Registry[type[Healing]] = Registry(
    "healing", entry_point_group="blockbench.healings", base=Healing, check=check_healing
)
HEALINGS.register("linear", "algorithms.healing.linear:LinearHealing")
HEALINGS.register("lora", "algorithms.healing.lora:LoraHealing")

__all__ = ["HEALINGS", "HealOutcome", "HealTarget", "Healing", "Params", "check_healing"]
