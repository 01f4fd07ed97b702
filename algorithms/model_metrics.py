"""Model metrics: unit scores that need the model itself, not only its captured hidden states.

A *state* metric (:class:`estimators.Metric`) compares the hidden states entering and leaving a unit.
A *model* metric runs the model on the calibration windows: ``ppl`` removes each unit in turn and
measures the calibration loss (Shortened LLaMA's PPL criterion, SLEB's first step), ``taylor`` takes
one backward pass per batch (Shortened LLaMA's Taylor criterion). Both kinds share a grid's metric axis
(``metrics: [bi, ppl]``) and the metric contract: ``name``, ``version``, ``higher_is_important``,
parameters declared once by the constructor's signature, one float64 score per unit.

Their registry is :data:`algorithms.MODEL_METRICS` (entry-point group ``blockbench.model_metrics``),
apart from :data:`estimators.METRICS` because ``estimators`` knows nothing of models.

Units: with ``unit="attention"`` or ``"mlp"`` the scores are those of each block's branch (removed with
:func:`algorithms.models.units.skip_units`; the branch's parameters for ``taylor``); with
``unit="sublayer"`` one score per branch, ``2L`` in residual-stream order (attention of block 0, its MLP,
attention of block 1, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from algorithms.progress import Progress, report
from estimators.checks import check_choice

Tensor = torch.Tensor
#: the calibration loss (mean next-token NLL) of the model with a set of units removed
LossFn = Callable[[frozenset[int]], float]


@dataclass(frozen=True)
class ScoringTarget:
    """What a model metric scores: ``model`` (eval mode, on its device), the calibration windows
    ``input_ids`` ``(W, T)``, the ``unit`` kind, the batch size of forward passes, and optionally the
    shared calibration ``loss`` of removal sets (memoised: the ``loss`` search objective of the same
    model and windows, so a ``ppl`` scoring and a later SLEB search pay once for each set)."""

    model: nn.Module
    input_ids: Tensor
    unit: str = "block"
    batch_size: int = 4
    progress: Progress | None = None
    loss: LossFn | None = None

    def removal_loss(self) -> LossFn:
        """:attr:`loss`, or (without one) the mean calibration NLL computed here with the units masked."""
        if self.loss is not None:
            return self.loss
        from algorithms.models.nll import mean_nll
        from algorithms.models.units import skip_units

        def loss(removed: frozenset[int]) -> float:
            with skip_units(self.model, self.unit, sorted(removed)) as model:
                return mean_nll(model, self.input_ids, batch_size=self.batch_size)[0]

        return loss


class ModelMetric:
    """Base class of model metrics: set ``name``, ``version``, ``higher_is_important``; implement
    :meth:`score_units`. ``version`` enters every cell id: bump it when the numbers change."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    higher_is_important: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params = params

    def score_units(self, target: ScoringTarget) -> Tensor:
        """One score per block (or per block's branch, for attention / MLP units), shape ``(L,)``; ``(2L,)``
        for ``sublayer`` units; float64."""
        raise NotImplementedError

    def span_score(self, scores: Tensor, start: int, length: int, target: ScoringTarget) -> float:
        """Score of removing the run of blocks ``[start, start + length)`` together, in the metric's
        orientation (the ``proxy_span`` objective's term). Default: the sum of the run's scores, exact
        for a metric that is additive over units."""
        return float(scores[start : start + length].sum())

    def check_input(self, n_tokens: int, width: int) -> None:
        """Like :meth:`estimators.Metric.check_input`: a model metric takes any number of tokens."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": dict(self.params)}


def check_model_metric(cls: Any) -> str | None:
    """Why ``cls`` cannot be a model metric (the registry's contract check), or None."""
    if not isinstance(cls, type) or not issubclass(cls, ModelMetric):
        return f"{cls!r} is not a subclass of algorithms.model_metrics.ModelMetric"
    if not cls.name:
        return f"{cls.__name__} sets no name"
    if cls.score_units is ModelMetric.score_units:
        return f"{cls.__name__} does not implement score_units"
    if not isinstance(cls.higher_is_important, bool):
        return f"{cls.__name__}.higher_is_important must be a bool"
    return None


class RemovalLoss(ModelMetric):
    """Calibration NLL with the unit removed minus the dense NLL (Shortened LLaMA's PPL criterion,
    SLEB's first step): the log of the perplexity ratio; L + 1 forward passes over the calibration
    windows, masked in place (no copy of the model)."""

    name = "ppl"
    higher_is_important = True

    def __init__(self) -> None:
        super().__init__()

    def score_units(self, target: ScoringTarget) -> Tensor:
        loss = target.removal_loss()
        from algorithms.models.units import n_units

        n = n_units(target.model, target.unit)
        dense = loss(frozenset())
        out = []
        for i in range(n):
            out.append(loss(frozenset({i})) - dense)
            report(target.progress, "units removed one at a time", i + 1, n, "units")
        return torch.tensor(out, dtype=torch.float64)

    def span_score(self, scores: Tensor, start: int, length: int, target: ScoringTarget) -> float:
        """The loss of removing the whole run minus the dense loss (one more forward pass per run)."""
        if length == 1:
            return float(scores[start])
        loss = target.removal_loss()
        return loss(frozenset(range(start, start + length))) - loss(frozenset())


class TaylorImportance(ModelMetric):
    """First-order Taylor importance (Shortened LLaMA's Taylor criterion): the weights ``w`` of a unit
    times the gradient of the mean calibration NLL, one backward pass per batch, float32 accumulation.
    ``granularity: weight`` (the reference code): ``sum_w |w * dL/dw|``; ``unit``: ``|sum_w w * dL/dw|``,
    the first-order change of the loss when the unit's weights are scaled towards zero.

    Only parameters whose name ends in ``weight`` count (the reference code's choice: norms and
    projections, no biases). Shortened LLaMA's "Taylor+" adds a rule that keeps the first four and last
    two blocks: that is the method preset ``shortened-taylor`` (``protect``), not this metric."""

    name = "taylor"
    higher_is_important = True

    def __init__(self, granularity: Literal["weight", "unit"] = "weight") -> None:
        super().__init__(granularity=check_choice("granularity", granularity, ("weight", "unit")))
        self.granularity = granularity

    def score_units(self, target: ScoringTarget) -> Tensor:
        model, ids = target.model, target.input_ids
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"input_ids must have shape (W, T >= 2), got {tuple(ids.shape)}")
        groups = unit_weights(model, target.unit)
        from algorithms.models.placement import input_device

        device = input_device(model)
        ids = ids.clone()  # a tensor made under inference_mode cannot enter autograd
        total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        salience = [[torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in ps] for ps in groups]
        with _gradients_for(model, [p for ps in groups for p in ps]), torch.enable_grad():
            for start in range(0, ids.shape[0], target.batch_size):
                batch = ids[start : start + target.batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        batch[:, 1:].reshape(-1), reduction="sum")
                (nll / total_tokens).backward()  # the gradient of the mean NLL over every window
                with torch.no_grad():
                    for params, acc in zip(groups, salience, strict=True):
                        for p, a in zip(params, acc, strict=True):
                            if p.grad is not None:
                                a.add_(p.detach().float() * p.grad.float())
                                p.grad = None
                report(target.progress, "backward passes", min(start + target.batch_size, ids.shape[0]),
                       ids.shape[0], "windows")
        if self.granularity == "weight":
            values = [sum(float(a.abs().sum(dtype=torch.float64)) for a in acc) for acc in salience]
        else:
            values = [abs(sum(float(a.sum(dtype=torch.float64)) for a in acc)) for acc in salience]
        return torch.tensor(values, dtype=torch.float64)


def unit_weights(model: nn.Module, unit: str) -> list[list[nn.Parameter]]:
    """The parameters named ``*weight`` of every block's ``unit`` (the whole block, or its attention or
    MLP branch with the branch's norms), block by block; for ``sublayer`` the attention and MLP groups
    interleaved (stream order)."""
    from algorithms.models.blocks import get_blocks

    if unit == "sublayer":
        pairs = zip(unit_weights(model, "attention"), unit_weights(model, "mlp"), strict=True)
        return [group for pair in pairs for group in pair]
    blocks = get_blocks(model)
    if unit == "block":
        modules: list[list[nn.Module]] = [[b] for b in blocks]
    else:
        from algorithms.models.units import family_of

        names = family_of(model).branch(unit).names()
        modules = [[getattr(b, n) for n in names] for b in blocks]
    out = []
    for mods in modules:
        seen: dict[int, nn.Parameter] = {}
        for m in mods:
            for name, p in m.named_parameters():
                if name.endswith("weight"):
                    seen.setdefault(id(p), p)
        out.append(list(seen.values()))
    return out


@contextlib.contextmanager
def _gradients_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block exactly ``params`` require gradients (no other parameter of ``model`` gets a
    ``grad``); every parameter's ``requires_grad`` and ``grad`` are put back afterwards."""
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.grad = None
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)
