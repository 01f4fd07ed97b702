"""Find a decoder-only model's block list and remove blocks from it correctly.

Removal is where other tools go wrong, so it does four things:

1. keeps the surviving blocks, in order, in a new ``nn.ModuleList``;
2. renumbers every ``layer_idx`` (attention modules index the KV cache with it: a stale one makes
   ``generate()`` read another layer's keys);
3. sets ``num_hidden_layers`` (Llama-style models loop over ``layers[:num_hidden_layers]``) and
   slices every per-layer config list such as Gemma-3's and Qwen2's ``layer_types`` (the forward pass
   and ``DynamicCache(config=...)`` read them by position; a stale one breaks masks and reloads);
4. records the removed blocks, in the dense model's numbering, as ``config.blockbench_removed_blocks``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

#: dotted paths of the block list in the architectures we know (checked in order)
KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma-3, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers around a text model
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom, CodeGen
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "layers",
)
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")


def _resolve(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _n_layers(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None) if config is not None else None


def block_path(model: nn.Module) -> str:
    """Dotted attribute path of the block ``ModuleList`` (e.g. ``"model.layers"``)."""
    expected = _n_layers(model)
    for path in KNOWN_PATHS:
        found = _resolve(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0 and (expected is None or len(found) == expected):
            return path
    candidates = [
        (len(mod), name)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (expected is None or len(mod) == expected)
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the block list of {type(model).__name__}: no nn.ModuleList of "
            f"{expected if expected is not None else 'any'} blocks"
        )
    return max(candidates, key=lambda c: (c[0], -c[1].count(".")))[1]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return _resolve(model, block_path(model))


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each tensor counted once (tied embeddings are shared)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips duplicates of the same Parameter
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _configs(model: nn.Module) -> list:
    """Every distinct config object reachable from the model's modules (they are usually one)."""
    out, ids = [], set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers") and id(cfg) not in ids:
            ids.add(id(cfg))
            out.append(cfg)
    return out


def _validate(blocks: Iterable[int], n: int) -> list[int]:
    blocks = list(blocks)
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, (int,)) and not (
            isinstance(b, torch.Tensor) and b.dim() == 0 and not b.is_floating_point()
        ):
            raise ValueError(f"block index {b!r} is not an integer")
    blocks = [int(b) for b in blocks]
    if bad := [b for b in blocks if not 0 <= b < n]:
        raise ValueError(f"block index {bad[0]} is out of range for a model of {n} blocks")
    if len(set(blocks)) != len(blocks):
        dup = next(b for b in blocks if blocks.count(b) > 1)
        raise ValueError(f"block index {dup} is given twice")
    if len(blocks) >= n:
        raise ValueError(f"cannot remove all {n} blocks")
    return sorted(blocks)


def removal_changes(model: nn.Module, blocks: Iterable[int]) -> list[tuple[object, str, object]]:
    """The attribute assignments ``(object, name, value)`` that remove ``blocks`` from ``model``.

    The single source of the removal rules: :func:`remove_blocks` applies them for good and
    :func:`algorithms.masking.skip_blocks` applies them for the duration of a ``with`` block.
    """
    path = block_path(model)
    layers: nn.ModuleList = _resolve(model, path)
    n = len(layers)
    drop = _validate(blocks, n)
    if not drop:
        return []
    keep = [i for i in range(n) if i not in drop]
    changes: list[tuple[object, str, object]] = []
    for new_idx, old_idx in enumerate(keep):
        for module in layers[old_idx].modules():
            for attr in _LAYER_INDEX_ATTRS:
                if isinstance(getattr(module, attr, None), int):
                    changes.append((module, attr, new_idx))
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    changes.append((parent, attr, nn.ModuleList([layers[i] for i in keep])))
    for cfg in _configs(model):
        previous = list(getattr(cfg, "blockbench_removed_blocks", None) or [])
        # map current indices back to the dense model's numbering
        dense_kept = [i for i in range(n + len(previous)) if i not in set(previous)]
        removed_dense = sorted(previous + [dense_kept[i] for i in drop])
        for key, value in list(vars(cfg).items()):
            if key.startswith("_") or key == "blockbench_removed_blocks":
                continue
            if isinstance(value, (list, tuple)) and len(value) == n and n > 1:
                changes.append((cfg, key, type(value)(value[i] for i in keep)))
        changes.append((cfg, "num_hidden_layers", len(keep)))
        changes.append((cfg, "blockbench_removed_blocks", removed_dense))
    return changes


def remove_blocks(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """Remove ``blocks`` (indices in the model's *current* numbering) in place; return the model."""
    for obj, attr, value in removal_changes(model, blocks):
        setattr(obj, attr, value)
    return model


def pruned_copy(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """A deep copy of ``model`` with ``blocks`` removed; ``model`` itself is untouched."""
    clone = copy.deepcopy(model)
    return remove_blocks(clone, blocks)
