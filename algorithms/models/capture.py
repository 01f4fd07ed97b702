"""Capture the hidden state entering every block and leaving the last one, with forward hooks.

``hidden_states[-1]`` of transformers' ``output_hidden_states`` is taken *after* the final norm, so it
is not the last block's output; hooks on the blocks themselves give the raw residual stream at every
depth. The result is one tensor ``(L + 1, samples, seq_len, d)`` in float32 on the CPU:
``states[i]`` enters block ``i`` and ``states[L]`` leaves block ``L - 1``.
"""

from __future__ import annotations

import torch

from algorithms.models.blocks import get_blocks
from algorithms.models.nll import batch_nll


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find the hidden state in a block's {type(value).__name__}")


@torch.inference_mode()
def capture_hidden_states(
    model, input_ids: torch.Tensor, *, batch_size: int = 4, store_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run ``input_ids`` (``(samples, seq_len)``) through ``model`` and return ``(states, stats)``.

    ``stats`` holds the calibration loss of the dense model on the same tokens (a free by-product:
    ``nll`` and ``ppl``), measured by :func:`algorithms.models.nll.batch_nll`, the one NLL of blockbench.
    """
    blocks = get_blocks(model)
    n_blocks = len(blocks)
    device = next(model.parameters()).device
    samples, seq_len = input_ids.shape
    states: torch.Tensor | None = None
    current: dict[int, torch.Tensor] = {}

    def pre_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            current[index] = hidden.detach()

        return hook

    def post_hook(_module, _args, output):
        current[n_blocks] = _first_tensor(output).detach()

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post_hook))
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, samples, batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            current.clear()
            nll, n = batch_nll(model, ids)
            total_nll += nll
            total_tokens += n
            if len(current) != n_blocks + 1:
                raise RuntimeError(f"captured {len(current)} hidden states, expected {n_blocks + 1}")
            if states is None:
                d = current[0].shape[-1]
                states = torch.empty((n_blocks + 1, samples, seq_len, d), dtype=store_dtype)
            for depth, hidden in current.items():
                states[depth, start : start + ids.shape[0]] = hidden.to("cpu", store_dtype)
    finally:
        for h in handles:
            h.remove()
    assert states is not None
    mean_nll = total_nll / total_tokens
    return states, {"calib_nll": mean_nll, "calib_ppl": float(torch.tensor(mean_nll).exp())}
