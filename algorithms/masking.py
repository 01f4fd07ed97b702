"""Skip blocks temporarily, in place, without copying the model.

:func:`skip_blocks` is a context manager that makes the model behave exactly like
:func:`algorithms.blocks.pruned_copy` would for the duration of a ``with`` block, then restores every
change, even when the body raises:

- the block ``nn.ModuleList`` is swapped for a new one holding the kept blocks (the same module
  objects: no weight is copied), and the original list object is put back on exit;
- every ``layer_idx``-style attribute of the kept blocks is renumbered (the KV cache is indexed with
  it) and the original values are restored on exit;
- every config reachable from the model gets ``num_hidden_layers`` and each per-layer list (such as
  Gemma-3's ``layer_types``) sliced, and ``blockbench_removed_blocks`` set, as
  :func:`~algorithms.blocks.remove_blocks` does; the original attribute objects are restored on exit
  (an attribute that did not exist is deleted again).

The rules of what to change are those of :func:`~algorithms.blocks.remove_blocks`, whose helpers are
reused, so the two stay in step. Not thread-safe: nothing else may run the model while it is masked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from algorithms.blocks import _LAYER_INDEX_ATTRS, _configs, _resolve, _validate, block_path

_MISSING = object()


@contextlib.contextmanager
def skip_blocks(model: nn.Module, blocks: Iterable[int]) -> Iterator[nn.Module]:
    """Within the ``with`` block, ``model`` runs without ``blocks`` (current numbering); yields it."""
    path = block_path(model)
    layers: nn.ModuleList = _resolve(model, path)
    n = len(layers)
    drop = _validate(blocks, n)
    if not drop:
        yield model
        return
    keep = [i for i in range(n) if i not in drop]
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model

    saved_idx: list[tuple[nn.Module, str, int]] = []
    saved_cfg: list[tuple[object, str, object]] = []
    try:
        for new_idx, old_idx in enumerate(keep):
            for module in layers[old_idx].modules():
                for name in _LAYER_INDEX_ATTRS:
                    value = getattr(module, name, None)
                    if isinstance(value, int):
                        saved_idx.append((module, name, value))
                        setattr(module, name, new_idx)
        setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
        for cfg in _configs(model):
            previous = list(getattr(cfg, "blockbench_removed_blocks", None) or [])
            dense_kept = [i for i in range(n + len(previous)) if i not in set(previous)]
            removed_dense = sorted(previous + [dense_kept[i] for i in drop])
            for key, value in list(vars(cfg).items()):
                if key.startswith("_") or key == "blockbench_removed_blocks":
                    continue
                if isinstance(value, (list, tuple)) and len(value) == n and n > 1:
                    saved_cfg.append((cfg, key, value))
                    setattr(cfg, key, type(value)(value[i] for i in keep))
            saved_cfg.append((cfg, "num_hidden_layers", cfg.num_hidden_layers))
            cfg.num_hidden_layers = len(keep)
            saved_cfg.append((cfg, "blockbench_removed_blocks", vars(cfg).get("blockbench_removed_blocks", _MISSING)))
            cfg.blockbench_removed_blocks = removed_dense
        yield model
    finally:
        # undo in reverse order, so an attribute saved twice ends with its first (original) value
        for cfg, key, value in reversed(saved_cfg):
            if value is _MISSING:
                if key in vars(cfg):
                    delattr(cfg, key)
            else:
                setattr(cfg, key, value)
        if getattr(parent, attr) is not layers:
            setattr(parent, attr, layers)
        for module, name, value in reversed(saved_idx):
            setattr(module, name, value)
