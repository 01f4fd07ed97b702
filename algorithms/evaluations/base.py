"""What an evaluation is: a measurement of a (pruned) model that becomes leaderboard columns.

An :class:`Evaluation` declares, once, everything the rest of blockbench needs to know about it:

- ``name`` (its grid section and registry name) and ``version`` (bump it when its numbers change:
  it enters every cell id and cache key that holds them);
- ``Params``, a pydantic model of its grid section (unknown keys refused, defaults filled), so the
  *resolved* parameters are its identity;
- :meth:`columns`: the leaderboard columns it produces, each with its direction (higher or lower is
  better), how seeds aggregate, how it prints and which ``bench check --fail`` measure it belongs to.
  Reports, the regression gate, stability studies and the HTML report read these, never a list of
  their own; records carry them, so a results folder renders without the plugin that made it.

Call order, for one model (the pipeline in ``bench.stages`` does this; a plugin author implements the
three abstract methods and, when needed, :meth:`reference`):

1. ``reference(model, tokenizer)`` once per model on the dense model (default: ``None``); the value
   is kept in memory and handed to every :meth:`measure` of that model (KL keeps the dense
   next-token distributions there);
2. ``measure(target)`` once per distinct removed block set, the dense model (``target.removed ==
   ()``) included when ``measures_dense``; the result is a JSON-ready dict, cached on disk by the
   pipeline under a key of the model, the set and this evaluation's identity;
3. ``values(dense, pruned)`` turns the dense and the pruned results into one number per column for
   a cell's record (cheap, never cached).

``target.pruned()`` is the *transform* stage: a context manager giving the model with the set removed
(today the blocks are masked in place, bit-identical to removal, no copy). An evaluation that needs
the dense and the pruned model side by side (speed) uses ``target.model`` and ``target.pruned``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel

from algorithms.params import Parameterised, Params

if TYPE_CHECKING:  # torch is imported by whoever measures; reading a grid's sections does not need it
    import torch

    from algorithms.models.prefix import PrefixReference, PrefixStates
    from algorithms.progress import Progress

Aggregate = Literal["mean", "median"]


@dataclass(frozen=True)
class Column:
    """One leaderboard column an evaluation produces.

    ``key`` names the value in records and frames (``ppl_pruned``); ``label`` is its Markdown/CSV
    heading and ``short`` its terminal heading. ``higher_is_better`` is its direction (``None``: a
    reference value such as the dense model's, never ranked or gated). ``aggregate`` says how the
    calibration seeds of one leaderboard row combine; ``spread`` adds ``± std`` over them. ``fmt`` is a
    format spec (``".2f"``, ``".1%"``). ``gate`` is the ``bench check --fail`` measure it is checked
    under (``None``: never gated); ``rank`` its priority as the leaderboard's ranking column (the
    highest present ranks under ``--rank-by auto``; ``None``: never). ``dense_key`` names the column
    holding the dense model's value of the same quantity (figures draw it as the reference).
    ``terminal``: shown in the terminal table (per-task scores are not: Markdown and CSV only).
    """

    key: str
    label: str
    higher_is_better: bool | None
    fmt: str = ".3f"
    aggregate: Aggregate = "mean"
    spread: bool = False
    gate: str | None = None
    rank: int | None = None
    short: str | None = None
    dense_key: str | None = None
    log_scale: bool = False
    terminal: bool = True

    def format(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        return format(value, self.fmt)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Column:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EvalTarget:
    """What :meth:`Evaluation.measure` receives: the dense model object, its tokenizer, the blocks whose
    ``unit`` is removed (``()`` for the dense model; ``unit`` is ``block``, ``attention``, ``mlp`` or ``sublayer``),
    the transform that removes them (and heals, when the cell heals), and the evaluation's dense
    reference (:meth:`Evaluation.reference`). ``progress``, when given, is where a long
    :meth:`Evaluation.measure` reports its sub-progress (:mod:`algorithms.progress`; accuracy: lm-eval's
    requests done / total)."""

    model: torch.nn.Module
    tokenizer: Any
    removed: tuple[int, ...]
    n_blocks: int
    transform: Callable[[torch.nn.Module, tuple[int, ...]], contextlib.AbstractContextManager]
    reference: Any = None
    unit: str = "block"
    healing: str | None = None
    progress: Progress | None = None

    @property
    def device(self) -> torch.device:
        from algorithms.models.placement import input_device

        return input_device(self.model)

    @property
    def first_block(self) -> int | None:
        """The first block (dense numbering) the removal touches; ``None`` for the dense model."""
        if not self.removed:
            return None
        first = min(self.removed)
        return first // 2 if self.unit == "sublayer" else first

    @contextlib.contextmanager
    def pruned(self, prefix: PrefixStates | PrefixReference | None = None) -> Iterator[torch.nn.Module]:
        """The model with ``removed`` taken out for the duration of the block (the transform stage).

        ``prefix``: states kept on the windows the body will feed, in the same batches — the dense
        model's (:func:`algorithms.models.prefix.recording`), or an evaluation's reference holding them
        and those of sets measured before (:class:`~algorithms.models.prefix.PrefixReference`). The
        pruned model then starts from them where its blocks stop agreeing with theirs instead of
        recomputing the blocks it shares (same numbers); with a reference, the states of this set are
        kept for the sets that follow once the body has run every window. Ignored for a healed model
        (healing changes the blocks before it)."""
        from algorithms.models.prefix import PrefixReference, resumed_recording, resumed_without

        reference = prefix if isinstance(prefix, PrefixReference) else None
        source = reference.source(self.removed, self.unit) if reference is not None else prefix
        with self.transform(self.model, self.removed) as model:
            if source is None or self.healing is not None:
                yield model
                return
            if reference is None or reference.earlier_bytes <= 0 or not self.removed:
                with resumed_without(model, source, self.removed, self.unit) as shortened:
                    yield shortened
                return
            with resumed_recording(model, source, reference.prefix.depths, self.removed, self.unit) as (shortened, kept):
                yield shortened
            reference.keep(kept)


class Evaluation(Parameterised, abc.ABC):
    """Base class of evaluations (registry ``algorithms.evaluations.EVALUATIONS``, plugin group
    ``blockbench.evaluations``). Subclasses set ``name``, ``version``, ``Params`` and implement
    :meth:`columns`, :meth:`measure` and :meth:`values`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = Params
    #: measure the dense model once per model (``values`` then receives its result as ``dense``)
    measures_dense: ClassVar[bool] = True
    #: results depend on the machine (timings): the machine enters the cache key
    machine_dependent: ClassVar[bool] = False
    #: parameters that change how fast it runs, not what it measures: left out of :meth:`describe`
    speed_only: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> dict[str, Any]:
        """The resolved identity: name, version and every parameter with its default filled in."""
        params = self.params.model_dump(mode="json", exclude=set(self.speed_only))
        return {"name": self.name, "version": self.version, "params": params}

    def data_fingerprint(self) -> dict[str, Any]:
        """The contents of the data this evaluation reads that its parameters only *name* (a text
        source's fingerprint): enters cache keys, so an edited file is measured again. Default: the
        fingerprint of a ``source`` parameter when there is one."""
        source = getattr(self.params, "source", None)
        if not isinstance(source, str):
            return {}
        from algorithms.data import source_fingerprint

        return {"source": source_fingerprint(source)}

    @abc.abstractmethod
    def columns(self) -> list[Column]:
        """The leaderboard columns, in display order."""

    def reference(self, model: torch.nn.Module, tokenizer: Any) -> Any:
        """Computed once per model on the dense model and handed to every :meth:`measure`."""
        return None

    @abc.abstractmethod
    def measure(self, target: EvalTarget) -> dict[str, Any]:
        """Measure ``target`` (the dense model when ``target.removed`` is empty); JSON-ready."""

    @abc.abstractmethod
    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        """One value per column key for a cell, from the dense and the pruned results."""


def check_evaluation(obj: type[Evaluation]) -> str | None:
    """The registry's check of an :class:`Evaluation` subclass: why it cannot be used, or None."""
    if not obj.name:
        return f"{obj.__name__} has no name"
    if not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
        return f"{obj.__name__}.Params is not a pydantic model"
    return None
