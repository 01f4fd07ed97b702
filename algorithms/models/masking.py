"""Skip blocks temporarily, in place, without copying the model.

:func:`skip_blocks` is a context manager that makes the model behave exactly like
:func:`algorithms.models.blocks.pruned_copy` would for the duration of a ``with`` block, then restores every
change, even when the body raises:

- the block ``nn.ModuleList`` is swapped for a new one holding the kept blocks (the same module
  objects: no weight is copied), and the original list object is put back on exit;
- every ``layer_idx``-style attribute of the kept blocks is renumbered (the KV cache is indexed with
  it) and the original values are restored on exit;
- every config reachable from the model gets ``num_hidden_layers`` and each per-layer list (such as
  Gemma-3's ``layer_types``) sliced, and ``blockbench_removed_blocks`` set, as
  :func:`~algorithms.models.blocks.remove_blocks` does; the original attribute objects are restored on exit
  (an attribute that did not exist is deleted again).

The changes are exactly those :func:`~algorithms.models.blocks.removal_changes` lists for
:func:`~algorithms.models.blocks.remove_blocks`, so the two cannot drift apart. Not thread-safe: nothing else may run the model while it is masked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from algorithms.models.blocks import Change, removal_changes

_MISSING = object()


@contextlib.contextmanager
def skip_blocks(model: nn.Module, blocks: Iterable[int]) -> Iterator[nn.Module]:
    """Within the ``with`` block, ``model`` runs without ``blocks`` (current numbering); yields it."""
    with applied(model, removal_changes(model, blocks)):
        yield model


@contextlib.contextmanager
def applied(model: nn.Module, changes: Iterable[Change]) -> Iterator[nn.Module]:
    """Within the ``with`` block, every ``(object, attribute, value)`` of ``changes`` is assigned; on exit
    each attribute gets its original object back (or is deleted again), even when the body raises."""
    saved: list[tuple[object, str, object]] = []
    try:
        for obj, attr, value in changes:
            saved.append((obj, attr, getattr(obj, attr, _MISSING)))
            setattr(obj, attr, value)
        yield model
    finally:
        # undo in reverse order, so an attribute changed twice ends with its original value
        for obj, attr, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)
