"""Where a model runs: on one device, or dispatched by accelerate over several (``device_map``).

A model loaded with ``device_map`` (``auto``, ``balanced``, ``sequential`` or an explicit
``{module: device}`` map, with ``max_memory`` per device) has its blocks on different devices, some
perhaps offloaded to the CPU or disk (their parameters then sit on PyTorch's ``meta`` device and
accelerate's hooks bring the weights in for each forward pass). Everything in blockbench that feeds a
model asks :func:`input_device` where its inputs go instead of reading the first parameter's device,
which is ``meta`` for an offloaded embedding. Block removal and masking swap the block list and
renumber the blocks as for any model: accelerate's hooks live on the blocks themselves, so the kept
blocks keep theirs (``tests/test_placement.py`` checks logits, removal, masking, capture and cached
generation of a tiny model dispatched over the CPU and disk against the same model loaded whole).
"""

from __future__ import annotations

import torch
from torch import nn


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` with a device map (``hf_device_map`` set by ``from_pretrained``)."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module) -> torch.device:
    """The device a model's input ids go to: where its input embeddings run (their accelerate hook's
    execution device for a dispatched model), else its first parameter's device."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if embeddings is not None:
        hook = getattr(embeddings, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
