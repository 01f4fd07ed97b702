"""What a healing method is: a repair of a pruned model, run after removal and before evaluation.

A :class:`Healing` declares ``name`` (its registry name and grid value), ``version`` (bump it when
the weights it produces change: it enters the cache key of every healed model) and ``Params``, a
pydantic model of its parameters (unknown keys refused, defaults filled, frozen), so the *resolved*
parameters (:meth:`Healing.describe`) are its identity.

:meth:`Healing.heal` receives a :class:`HealTarget` (the dense model, read-only; the pruned copy,
modified *in place*; what was removed; calibration token ids) and returns a :class:`HealOutcome`
(wall-clock seconds, trained parameters, a JSON-ready ``info`` dict). "No healing" is not a method:
the pipeline skips this step.
"""

from __future__ import annotations

import abc
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from algorithms.params import Parameterised, Params
from algorithms.progress import Progress, report

if TYPE_CHECKING:  # torch is imported by whoever heals; reading a grid does not need it
    import torch

#: the pruning units a target may name (``algorithms.models.units.UNIT_KINDS``, repeated here so that
#: reading this module imports no torch)
UNITS = ("block", "attention", "mlp")


@dataclass
class HealTarget:
    """What :meth:`Healing.heal` receives.

    ``dense``: the dense model, read-only (activations are taken from it). ``pruned``: a deep copy of
    it with the ``unit`` (``block``, ``attention`` or ``mlp``) of the blocks ``removed`` (dense
    numbering, sorted) taken out; healing modifies this object in place. ``input_ids``: calibration
    text, a LongTensor ``(samples, seq_len)``, read ``batch_size`` rows per forward pass.
    ``progress``: an :data:`algorithms.progress.Progress` callback told how the work advances, or None.
    """

    dense: torch.nn.Module
    pruned: torch.nn.Module
    unit: str
    removed: tuple[int, ...]
    input_ids: torch.Tensor
    batch_size: int = 4
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(map(repr, UNITS))}, got {self.unit!r}")
        try:
            removed = tuple(operator.index(i) for i in self.removed if not isinstance(i, bool))
        except TypeError:
            raise ValueError(f"removed must be block indices (ints), got {self.removed!r}") from None
        if len(removed) != len(tuple(self.removed)) or list(removed) != sorted(set(removed)) or any(
            i < 0 for i in removed
        ):
            raise ValueError(f"removed must be sorted, distinct block indices >= 0, got {self.removed!r}")
        self.removed = removed
        shape = tuple(getattr(self.input_ids, "shape", ()))
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1 or getattr(self.input_ids, "is_floating_point",
                                                                         lambda: True)():
            raise ValueError(f"input_ids must be an integer tensor (samples, seq_len), got shape {shape}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    def report(self, done: int, total: int) -> None:
        """Tell ``progress`` (when set) that ``done`` of ``total`` steps are finished."""
        report(self.progress, "healing", done, total, "steps")


@dataclass
class HealOutcome:
    """What healing did: wall-clock ``seconds``, the number of parameters it trained
    (``trained_parameters``; 0 for a closed-form fit) and ``info``, a JSON-ready dict of what it
    fitted and how well (each method documents its keys)."""

    seconds: float
    trained_parameters: int
    info: dict[str, Any] = field(default_factory=dict)


class Healing(Parameterised, abc.ABC):
    """Base class of healing methods (registry ``algorithms.healing.HEALINGS``, plugin group
    ``blockbench.healings``). Subclasses set ``name``, ``version``, ``Params`` and implement
    :meth:`heal`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = Params

    def describe(self) -> dict[str, Any]:
        """The resolved identity: name, version and every parameter with its default filled in."""
        return {"name": self.name, "version": self.version, "params": self.params.model_dump(mode="json")}

    @abc.abstractmethod
    def heal(self, target: HealTarget) -> HealOutcome:
        """Repair ``target.pruned`` in place (reading ``target.dense`` only) and say what was done."""


def check_healing(obj: type[Healing]) -> str | None:
    """The registry's check of a :class:`Healing` subclass: why it cannot be used, or None."""
    if not obj.name:
        return f"{obj.__name__} has no name"
    if not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
        return f"{obj.__name__}.Params is not a pydantic model"
    if getattr(obj.heal, "__isabstractmethod__", False):
        return f"{obj.__name__} does not implement heal()"
    return None
