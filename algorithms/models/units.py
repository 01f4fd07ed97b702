"""Pruning units: whole blocks, one residual branch (attention or MLP) of a block, or sub-layers.

A pre-norm decoder block adds two branches to the residual stream, one after the other::

    h = x + attention(x)        # the attention branch (norms included)
    y = h + mlp(h)              # the MLP branch

Removing the ``attention`` unit of block ``i`` keeps its MLP (``y = x + mlp(x)``); removing its ``mlp``
keeps its attention (``y = h``). This is what BlockPruner (arXiv 2406.10594) and "What Matters in
Transformers? Not All Attention is Needed" (arXiv 2406.15786) remove.

How a branch is removed (:func:`unit_changes`): its core module (``self_attn`` / ``mlp``) is replaced
by a :class:`DroppedBranch`, which adds nothing to the residual stream and computes nothing, and the
norms that only feed it (and, in sandwich-norm models such as Gemma-2/3, the norm applied to its
output: an RMS norm of zero is zero) by ``nn.Identity``; the branch's parameters are gone. A dropped
attention holds no keys or values: it appends a zero-width entry (``head_dim`` 0, no memory) to its
layer of the KV cache, so that the cache's count of positions stays right for every cache layout
transformers builds (the first layer's length gives the positions of new tokens; sliding layers keep
their own counts). The block list, ``layer_idx`` and every per-layer config field are unchanged.
The config records what was removed as ``blockbench_removed_units = {"attention": [...], "mlp":
[...]}`` (block numbering of the model it was removed from).

Unit kind ``sublayer`` (BlockPruner's mixed pool): index ``j`` in ``[0, 2L)`` counts the branches in
residual-stream order, ``j = 2i`` the attention branch of block ``i`` and ``j = 2i + 1`` its MLP branch;
removing sub-layers ``js`` removes the attention of ``{j // 2 : j even}`` and the MLP of
``{j // 2 : j odd}`` (:func:`split_sublayers`), so consecutive indices are consecutive steps of the
stream. A block whose two branches are both removed stays in the block list and computes nothing (it
passes the stream through unchanged).

The families whose two branches can be told apart are listed in :data:`FAMILIES` (verified by oracle
tests: a forward pass written by hand with the branches skipped); blocks whose branches run in
parallel from the same input (GPT-J, GPT-NeoX with ``use_parallel_residual``, Falcon, Phi-1/2, CodeGen,
Cohere) cannot lose one branch without changing the other, and are refused by name, as is any family
not listed.

Saving: :func:`save_pruned` writes the dense architecture with the removed branches' parameters set to
zero, plus the record. Plain ``transformers`` loads that folder and computes the same function (a
zeroed branch adds exactly zero), but at the dense model's cost; :func:`load_pruned` loads it and
drops the recorded branches again.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.models.blocks import Change, block_path, check_indices, get_blocks, removal_changes

#: what a grid's ``units:`` may name
UNIT_KINDS = ("block", "attention", "mlp", "sublayer")
#: the two branch kinds of a block (``sublayer`` units are either)
SUBLAYER_KINDS = ("attention", "mlp")
#: the config attribute that records removed branches
RECORD_ATTR = "blockbench_removed_units"


class UnitError(ValueError):
    """A model whose sub-layers cannot be removed (the family is named)."""


@dataclass(frozen=True)
class Branch:
    """Where one residual branch lives in a block: the norm before it (``None``: none), its core module,
    and the norm applied to its output before the residual add (``None``: none; Gemma-2/3, OLMo-2)."""

    pre: str | None
    core: str
    post: str | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.pre, self.core, self.post) if n is not None)


@dataclass(frozen=True)
class Family:
    """The two branches of a family's blocks, in the order they run."""

    attention: Branch
    mlp: Branch

    def branch(self, kind: str) -> Branch:
        return self.attention if kind == "attention" else self.mlp


_LLAMA = Family(Branch("input_layernorm", "self_attn"), Branch("post_attention_layernorm", "mlp"))
_SANDWICH = Family(Branch("input_layernorm", "self_attn", "post_attention_layernorm"),
                   Branch("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
#: ``config.model_type`` -> the layout of its blocks (each verified by tests/test_units.py)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "gpt2": Family(Branch("ln_1", "attn"), Branch("ln_2", "mlp")),
}
#: families whose attention and MLP read the same input and are summed (parallel residual)
PARALLEL_RESIDUAL = ("gptj", "gpt_neox", "falcon", "phi", "codegen", "cohere", "cohere2", "stablelm", "gpt_neox_japanese")


def model_type(model: nn.Module) -> str:
    """``config.model_type`` of a model (its decoder text config's for a composite model)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", None) or getattr(config, "model_type", None) or type(model).__name__)


def check_model_type(kind: str) -> Family:
    """The branch layout of ``config.model_type == kind``; :class:`UnitError` naming the family when
    sub-layers cannot be removed from it."""
    family = FAMILIES.get(kind)
    if family is None:
        if kind in PARALLEL_RESIDUAL:
            why = ("its attention and MLP branches run in parallel from the same input (parallel residual), so "
                   "one cannot be removed without changing the other")
        else:
            why = "its block layout has not been verified for sub-layer removal"
        raise UnitError(f"cannot remove attention or MLP sub-layers from model type {kind!r}: {why}; "
                        f"supported: {', '.join(sorted(FAMILIES))} (units: block works for every model)")
    return family


def family_of(model: nn.Module) -> Family:
    """The branch layout of ``model``'s blocks; :class:`UnitError` naming the family when sub-layers
    cannot be removed from it."""
    kind = model_type(model)
    family = check_model_type(kind)
    blocks = get_blocks(model)
    for kind_name in SUBLAYER_KINDS:
        missing = [n for n in family.branch(kind_name).names() if not hasattr(blocks[0], n)]
        if missing:
            raise UnitError(f"model type {kind!r}: block 0 has no {', '.join(missing)} (expected by the "
                            f"{kind_name} branch layout)")
    return family


class DroppedBranch(nn.Module):
    """Stands in for a removed attention or MLP core: returns zeros of its input's shape (the branch adds
    nothing to the residual stream) and holds no parameters.

    ``shapes`` keeps the names, shapes and dtypes of the parameters it replaced (with those of the norms
    removed with it), so :func:`save_pruned` can write them as zeros for plain transformers. A dropped
    attention appends a zero-width key and value to its layer of the KV cache (see the module doc).
    """

    def __init__(self, kind: str, layer_idx: int | None, shapes: dict[str, tuple[tuple[int, ...], str]]) -> None:
        super().__init__()
        self.kind = kind
        self.layer_idx = layer_idx
        self.shapes = shapes

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        zeros = torch.zeros_like(hidden_states)
        if self.kind == "mlp":
            return zeros
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if cache is not None and self.layer_idx is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache's own part
            empty = hidden_states.new_zeros((hidden_states.shape[0], 1, hidden_states.shape[1], 0))
            cache.update(empty, empty, self.layer_idx, kwargs={k: v for k, v in kwargs.items()
                                                               if k == "cache_position"})
        return zeros, None

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layer_idx={self.layer_idx}"


def _attention_layer_idx(module: nn.Module) -> int | None:
    value = getattr(module, "layer_idx", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shapes(block: nn.Module, names: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for name in names:
        for pname, p in getattr(block, name).named_parameters():
            out[f"{name}.{pname}"] = (tuple(p.shape), str(p.dtype).removeprefix("torch."))
    return out


def n_units(model_or_n_blocks: nn.Module | int, unit: str) -> int:
    """How many units of kind ``unit`` a model (or a model of that many blocks) has: its block count
    ``L``, or ``2L`` for ``sublayer``."""
    if unit not in UNIT_KINDS:
        raise ValueError(f"unknown unit {unit!r}; known: {', '.join(UNIT_KINDS)}")
    n = model_or_n_blocks if isinstance(model_or_n_blocks, int) else len(get_blocks(model_or_n_blocks))
    return 2 * n if unit == "sublayer" else n


def split_sublayers(indices: Iterable[int]) -> dict[str, list[int]]:
    """Sub-layer indices as the blocks whose branch goes: ``{"attention": [j // 2 for even j], "mlp":
    [j // 2 for odd j]}`` (sorted)."""
    js = sorted(set(int(j) for j in indices))
    return {"attention": [j // 2 for j in js if j % 2 == 0], "mlp": [j // 2 for j in js if j % 2 == 1]}


def _check_indices(model: nn.Module, unit: str, indices: Iterable[int] | int) -> list[int]:
    n = n_units(model, unit)
    # removing every attention (or every MLP) branch is allowed: the other branch of each block stays;
    # removing every sub-layer leaves blocks that compute nothing (embedding, final norm and head remain)
    return check_indices(indices, n, allow_all=unit != "block")


def unit_changes(model: nn.Module, unit: str, indices: Iterable[int] | int) -> list[Change]:
    """The attribute assignments that remove the ``unit`` (``block``, ``attention``, ``mlp`` or
    ``sublayer``) ``indices`` (current numbering: blocks, or sub-layers ``2i``/``2i + 1``). Everything is
    checked before anything is assigned."""
    if unit == "block":
        return removal_changes(model, indices)
    drop = _check_indices(model, unit, indices)
    if not drop:
        return []
    parts = split_sublayers(drop) if unit == "sublayer" else {unit: drop}
    family = family_of(model)
    blocks = get_blocks(model)
    changes: list[Change] = []
    for kind, which in parts.items():
        branch = family.branch(kind)
        for i in which:
            block = blocks[i]
            core = getattr(block, branch.core)
            if isinstance(core, DroppedBranch):
                raise ValueError(f"the {kind} of block {i} is removed already")
            stub = DroppedBranch(kind, _attention_layer_idx(core) if kind == "attention" else None,
                                 _shapes(block, branch.names()))
            changes.append((block, branch.core, stub))
            for norm in (branch.pre, branch.post):
                if norm is not None:
                    changes.append((block, norm, nn.Identity()))
    config = getattr(model, "config", None)
    if config is not None:
        record = {k: list(v) for k, v in (getattr(config, RECORD_ATTR, None) or {}).items()}
        for kind, which in parts.items():
            if which:
                record[kind] = sorted(set(record.get(kind, [])) | set(which))
        changes.append((config, RECORD_ATTR, {k: record[k] for k in SUBLAYER_KINDS if k in record}))
    return changes


def remove_units(model: nn.Module, unit: str, indices: Iterable[int] | int) -> nn.Module:
    """Remove the ``unit`` of blocks ``indices`` in place; return the model."""
    for obj, attr, value in unit_changes(model, unit, indices):
        setattr(obj, attr, value)
    return model


def pruned_units_copy(model: nn.Module, unit: str, indices: Iterable[int] | int) -> nn.Module:
    """A deep copy of ``model`` without the ``unit`` of blocks ``indices``; ``model`` is untouched."""
    _check_indices(model, unit, indices)
    if unit != "block":
        family_of(model)
    return remove_units(copy.deepcopy(model), unit, indices)


def skip_units(model: nn.Module, unit: str, indices: Iterable[int]) -> contextlib.AbstractContextManager:
    """Within the ``with`` block, ``model`` runs without the ``unit`` of blocks ``indices`` (no copy:
    the modules are swapped in place and put back on exit, even when the body raises)."""
    from algorithms.models.masking import applied

    return applied(model, unit_changes(model, unit, indices))


def unit_parameters(model: nn.Module, unit: str) -> list[int]:
    """Parameters of each block's ``unit`` (its norms included), block by block; for ``sublayer`` the
    ``2L`` branches in stream order (attention and MLP sizes interleaved)."""
    blocks = get_blocks(model)
    if unit == "block":
        return [sum(p.numel() for p in b.parameters()) for b in blocks]
    if unit == "sublayer":
        pairs = zip(unit_parameters(model, "attention"), unit_parameters(model, "mlp"), strict=True)
        return [size for pair in pairs for size in pair]
    branch = family_of(model).branch(unit)
    return [sum(p.numel() for name in branch.names() for p in getattr(b, name).parameters()) for b in blocks]


# ---------------------------------------------------------------------------------------- capture
def branch_output_module(model: nn.Module, block_index: int, kind: str) -> nn.Module:
    """The module whose output a ``kind`` branch adds to the residual stream (its post-norm when it
    has one, else its core)."""
    branch = family_of(model).branch(kind)
    return getattr(get_blocks(model)[block_index], branch.post or branch.core)


# ---------------------------------------------------------------------------------------- save / load
def save_pruned(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a sub-layer-pruned model so that plain transformers can load it: the removed branches'
    parameters are written as zeros (the branch then adds exactly zero); the config keeps the record,
    from which :func:`load_pruned` removes them again."""
    folder = Path(folder)
    blocks = get_blocks(model)
    block_prefix = block_path(model)
    state = {k: v for k, v in model.state_dict().items()}
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, DroppedBranch):
                for pname, (shape, dtype) in module.shapes.items():
                    state[f"{block_prefix}.{i}.{pname}"] = torch.zeros(shape, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_pruned(folder: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pruned` (or any model) and remove the branches its config
    records, so it runs at the pruned cost again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    record = getattr(model.config, RECORD_ATTR, None) or {}
    if record:
        setattr(model.config, RECORD_ATTR, None)
        for kind in SUBLAYER_KINDS:
            if record.get(kind):
                remove_units(model, kind, record[kind])
    return model
