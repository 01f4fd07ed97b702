"""Shared dense prefix: evaluate many block sets of one model without recomputing the blocks they keep.

A set whose first removed block is ``f`` runs blocks ``0 .. f-1`` exactly as the dense model does, so
the state entering block ``f`` on fixed windows is the dense model's. :func:`recording` keeps those
states while the dense model runs its windows (one pass, which is also the dense model's own
evaluation); :func:`resumed` then runs a pruned model from a kept depth ``c <= f``: blocks ``0 .. c-1``
are skipped (taken out of the block list the way :func:`algorithms.models.masking.skip_blocks` takes
out any block) and the state recorded at ``c`` is fed to the first remaining block, batch by batch.
The numbers are the ones the pruned model computes from its embeddings (the same operations on the
same inputs: ``tests/test_prefix.py`` checks bit-identity on every architecture blockbench removes
blocks from, and on SmolLM2).

Memory: one ``(batch, seq_len, d)`` tensor per batch and kept depth, in the model's dtype, on the CPU
(moved to the model's device batch by batch). :func:`from_captured` makes the same from captured hidden
states (views, no copy; their float32 copies of lower-precision states convert back exactly). :func:`checkpoint_depths` keeps every depth when they
fit the budget and every ``s``-th depth otherwise (a set then resumes from the deepest kept depth at or
before its first removed block).

Conditions: the windows are fed in the same batches, in the same order, as when they were recorded
(checked: a batch of another shape is refused); the model is not healed (healing changes the kept
blocks' weights: the caller does not resume then); and no block stores its own position in its
weights (GPT-2's ``scale_attn_by_inverse_layer_idx``, whose renumbering rescales the query weights:
:func:`shareable` says no, and :func:`resumed` then runs the model whole).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from algorithms.models.blocks import get_blocks
from algorithms.models.masking import skip_blocks


@dataclass
class PrefixStates:
    """The dense model's states entering the blocks at ``depths``, one tensor per batch of windows
    (``states[depth][b]``: batch ``b``, in the model's dtype, on the CPU)."""

    depths: tuple[int, ...]
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    #: the units removed in the model that ran the windows (``unit`` numbering; empty: the dense model). A
    #: model without other units enters block ``d`` in the same state as long as both remove the same
    #: units of the blocks before ``d`` (:meth:`resume_depth`)
    removed: frozenset[int] = frozenset()
    unit: str = "block"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for batches in self.states.values() for t in batches)

    def start(self, first_removed: int | None) -> int:
        """The deepest kept depth at or before ``first_removed`` (``0``: nothing to share)."""
        if first_removed is None:
            return 0
        return max((d for d in self.depths if d <= first_removed), default=0)

    def resume_depth(self, removed: Iterable[int], unit: str = "block") -> int:
        """The deepest kept depth at which a model without the ``unit`` units ``removed`` enters that block
        in the state kept here: both remove the same units of every block before it (``0``: none)."""
        removed = frozenset(int(u) for u in removed)
        if self.removed and unit != self.unit:  # dense states serve every unit kind; others their own
            return 0
        differ = removed ^ self.removed
        if not differ:
            return max(self.depths, default=0)
        return self.start(min(unit_block(unit, u) for u in differ))


def unit_block(unit: str, index: int) -> int:
    """The block a unit index belongs to (sub-layers ``2i``/``2i + 1`` belong to block ``i``)."""
    return index // 2 if unit == "sublayer" else index


def checkpoint_depths(n_blocks: int, bytes_per_depth: int, budget_bytes: int) -> tuple[int, ...]:
    """Depths ``1 .. n_blocks - 1`` to keep within ``budget_bytes``: all of them when they fit, every
    ``s``-th otherwise (the fewest skipped blocks for the memory), none when one does not fit."""
    if n_blocks < 2 or bytes_per_depth <= 0 or budget_bytes < bytes_per_depth:
        return ()
    wanted = n_blocks - 1
    stride = max(1, math.ceil(wanted * bytes_per_depth / budget_bytes))
    return tuple(range(stride, n_blocks, stride))


def shareable(model: nn.Module) -> bool:
    """Whether skipping leading blocks leaves the remaining blocks' numbers unchanged: not when a
    block's weights depend on its position (GPT-2 with ``scale_attn_by_inverse_layer_idx``)."""
    return not any(getattr(m, "scale_attn_by_inverse_layer_idx", False) for m in model.modules())


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def recording(model: nn.Module, depths: Iterable[int], removed: Iterable[int] = (),
              unit: str = "block") -> Iterator[PrefixStates]:
    """While the ``with`` block runs ``model`` batch by batch, keep the state entering each block of
    ``depths``; yields the :class:`PrefixStates` being filled. ``model`` is the dense model, or one that
    runs without the ``unit`` units ``removed`` (``depths`` in dense numbering; removed blocks keep none)."""
    removed = frozenset(int(u) for u in removed)
    gone = removed if unit == "block" else frozenset()
    n_dense = len(get_blocks(model)) + len(gone)
    kept = tuple(sorted(set(depths) - gone))
    bad = [d for d in kept if not 0 < d < n_dense]
    if bad:
        raise ValueError(f"depths {bad} are not between 1 and {n_dense - 1} (the blocks of the model)")
    prefix = PrefixStates(depths=kept, states={d: [] for d in kept}, removed=removed, unit=unit)
    blocks = get_blocks(model)
    with _keeping({d: _dense_block(blocks, gone, d) for d in kept}, prefix):
        yield prefix


def _dense_block(blocks: Sequence[nn.Module], gone: frozenset[int], depth: int) -> nn.Module:
    """Block ``depth`` (dense numbering) of a model whose block list lacks the blocks ``gone``."""
    return blocks[depth - sum(1 for g in gone if g < depth)]


@contextlib.contextmanager
def _keeping(targets: dict[int, nn.Module], prefix: PrefixStates) -> Iterator[None]:
    """Append the state entering each module of ``targets`` (depth -> block) to ``prefix.states[depth]``
    while the ``with`` block runs. The hooks go after any pre-hook already on a block (a fed state is
    the one kept)."""

    def hook(depth: int):
        def keep(_module, args, kwargs):
            prefix.states[depth].append(_hidden_arg(args, kwargs).detach().to("cpu", copy=True))

        return keep

    handles = [block.register_forward_pre_hook(hook(d), with_kwargs=True) for d, block in targets.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def resumed_recording(model: nn.Module, source: PrefixStates, depths: Iterable[int], removed: Iterable[int],
                      unit: str = "block") -> Iterator[tuple[nn.Module, PrefixStates]]:
    """:func:`resumed_without` that also keeps the states of ``model`` (running without the ``unit`` units
    ``removed``) entering the blocks of ``depths`` (dense numbering): those before the depth it starts at
    are ``source``'s (the same tensors: both models agree up to there), the others are recorded while the
    ``with`` block runs the windows. Yields the model and its :class:`PrefixStates` (complete once the
    block has run every batch). A greedy search keeps the states of the set chosen so far this way, and
    an evaluation those of the sets it measured: a set that differs from one of them only at a later
    block starts there."""
    removed = frozenset(int(u) for u in removed)
    gone = removed if unit == "block" else frozenset()
    start = source.resume_depth(removed, unit)
    kept = tuple(sorted(set(depths) - gone))
    prefix = PrefixStates(depths=kept, states={d: [] for d in kept}, removed=removed, unit=unit)
    blocks = get_blocks(model)
    targets = {}
    for d in kept:
        if d <= start and d in source.states:
            prefix.states[d] = list(source.states[d])
        else:
            targets[d] = _dense_block(blocks, gone, d)
    with resumed_without(model, source, removed, unit) as started, _keeping(targets, prefix):
        yield started, prefix


@contextlib.contextmanager
def resumed(model: nn.Module, prefix: PrefixStates, first_changed: int | None) -> Iterator[nn.Module]:
    """Within the ``with`` block, ``model`` (a pruned model whose blocks before ``first_changed``, the
    first block its removal touched in dense numbering, are the dense model's) skips its leading blocks
    up to the deepest kept depth at or before ``first_changed`` and starts from the states
    :func:`recording` kept there, one batch per forward pass in recording order. ``first_changed``
    ``None`` (the dense model), no kept depth before it, or a model that is not :func:`shareable`: the
    model runs as it is."""
    n_blocks = len(get_blocks(model))
    depth = 0 if first_changed is None else prefix.start(min(first_changed, n_blocks - 1))
    with _fed(model, prefix, depth, depth) as started:
        yield started


@contextlib.contextmanager
def resumed_without(model: nn.Module, prefix: PrefixStates, removed: Iterable[int],
                    unit: str = "block") -> Iterator[nn.Module]:
    """Like :func:`resumed` for ``model`` running without the ``unit`` units ``removed`` (dense
    numbering), from states kept on the dense model or on a model without other units
    (:attr:`PrefixStates.removed`): it starts at :meth:`PrefixStates.resume_depth`, the deepest kept depth
    before which both remove the same units."""
    removed = frozenset(int(u) for u in removed)
    deepest = prefix.resume_depth(removed, unit)
    n_blocks = len(get_blocks(model))
    depth, skip = 0, 0
    # any kept depth up to the deepest will do: the deepest that leaves a block to feed. ``skip``: the
    # leading blocks still in ``model``'s list (removed blocks are out of it; removed branches are not)
    for d in sorted((d for d in prefix.depths if d <= deepest), reverse=True):
        left = d - sum(1 for b in removed if b < d) if unit == "block" else d
        if left < n_blocks:
            depth, skip = d, left
            break
    with _fed(model, prefix, depth, skip) as started:
        yield started


@contextlib.contextmanager
def _fed(model: nn.Module, prefix: PrefixStates, depth: int, skip: int) -> Iterator[nn.Module]:
    """``model`` without its first ``skip`` blocks, the states kept at ``depth`` fed to the next one."""
    if depth == 0 or skip >= len(get_blocks(model)) or not shareable(model):
        yield model
        return
    batches = prefix.states[depth]
    calls = 0

    def feed(_module, args, kwargs):
        nonlocal calls
        if calls >= len(batches):
            raise RuntimeError(f"more forward passes than the {len(batches)} batches recorded")
        incoming = _hidden_arg(args, kwargs)
        state = batches[calls]
        if state.shape != incoming.shape:
            raise RuntimeError(f"batch {calls} has shape {tuple(incoming.shape)}, recorded "
                               f"{tuple(state.shape)}: feed the windows in the batches they were recorded in")
        calls += 1
        state = state.to(device=incoming.device, dtype=incoming.dtype)  # a float32 copy of bf16 states: exact
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    with skip_blocks(model, range(skip)):
        handle = get_blocks(model)[0].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            yield model
        finally:
            handle.remove()


def from_captured(states: torch.Tensor, batch_size: int) -> PrefixStates:
    """The prefix states of captured block states ``(L + 1, samples, seq_len, d)`` (states entering each
    block, :func:`algorithms.models.capture.capture_hidden_states`) for the same samples fed in batches
    of ``batch_size``, as capture fed them: views of ``states``, every depth ``1 .. L - 1``."""
    depths = tuple(range(1, states.shape[0] - 1))
    return PrefixStates(depths=depths, states={d: list(states[d].split(batch_size)) for d in depths})


def depths_within(model: nn.Module, windows: torch.Tensor, budget_mb: float) -> tuple[int, ...]:
    """The depths :func:`recording` keeps for ``windows`` ``(W, T)`` within ``budget_mb`` megabytes
    (:func:`checkpoint_depths` with the model's width and dtype)."""
    width = model.get_input_embeddings().weight.shape[-1]
    itemsize = next(model.parameters()).element_size()
    per_depth = windows.numel() * width * itemsize
    return checkpoint_depths(len(get_blocks(model)), per_depth, int(budget_mb * 2**20))


@dataclass
class PrefixReference:
    """An evaluation's dense pass over its windows: the dense model's result and the states kept on
    the way (an evaluation's :meth:`~algorithms.evaluations.base.Evaluation.reference`).

    ``earlier``: the states of sets measured since, at the same depths, newest last, within
    ``earlier_bytes`` (the bytes they do not share with the dense states; the oldest go first). A set
    starts from whichever of them lets it start deepest: ``{13, 14, 17, 25}`` after ``{13, 14, 17}`` runs
    from block 25, not 13 (a trie of removed sets, walked in the order the sets come)."""

    dense: Any
    prefix: PrefixStates | None
    earlier: list[PrefixStates] = field(default_factory=list)
    earlier_bytes: int = 0

    def source(self, removed: Iterable[int], unit: str = "block") -> PrefixStates | None:
        """The kept states from which a model without ``removed`` starts deepest (``None``: none kept)."""
        removed = frozenset(removed)
        kept = [p for p in (self.prefix, *self.earlier) if p is not None]
        return max(kept, key=lambda p: p.resume_depth(removed, unit), default=None)

    def own_bytes(self, states: PrefixStates) -> int:
        """Bytes of ``states`` not shared with the dense states."""
        dense = {id(t) for batches in (self.prefix.states.values() if self.prefix else ()) for t in batches}
        return sum(t.numel() * t.element_size() for b in states.states.values() for t in b if id(t) not in dense)

    def keep(self, states: PrefixStates) -> None:
        """Add a measured set's states (newest), dropping the oldest past :attr:`earlier_bytes`."""
        if self.earlier_bytes <= 0 or self.own_bytes(states) > self.earlier_bytes:
            return
        self.earlier = [p for p in self.earlier if p.removed != states.removed or p.unit != states.unit]
        self.earlier.append(states)
        while sum(self.own_bytes(p) for p in self.earlier) > self.earlier_bytes:
            self.earlier.pop(0)


def dense_pass(model: nn.Module, windows: torch.Tensor, budget_mb: float,
               run: Callable[[nn.Module], Any], earlier_mb: float = 0) -> PrefixReference | None:
    """``run(model)`` (the dense model's measurement of ``windows``, batch by batch) while keeping its
    states at the depths that fit ``budget_mb`` (:func:`depths_within`); ``None``, without running,
    when no depth fits (sharing off). ``earlier_mb``: how much the states of measured sets may keep
    (:attr:`PrefixReference.earlier`; 0: none)."""
    depths = depths_within(model, windows, budget_mb)
    if not depths:
        return None
    with recording(model, depths) as prefix:
        dense = run(model)
    return PrefixReference(dense, prefix, earlier_bytes=int(earlier_mb * 2**20))
