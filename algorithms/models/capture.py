"""Capture the hidden state entering every block and leaving the last one, with forward hooks.

``hidden_states[-1]`` of transformers' ``output_hidden_states`` is taken *after* the final norm, so it
is not the last block's output; hooks on the blocks themselves give the raw residual stream at every
depth. The result is one tensor ``(L + 1, samples, seq_len, d)`` in float32 on the CPU:
``states[i]`` enters block ``i`` and ``states[L]`` leaves block ``L - 1``.

With ``sublayers=True`` the residual stream is captured between the two branches of every block as
well: ``(2L + 1, samples, seq_len, d)`` with ``states[2i] = x_i`` (entering block ``i``),
``states[2i + 1] = h_i = x_i + attention_i`` (after its attention branch, before its MLP) and
``states[2L]`` leaving the last block, so attention ``i`` maps ``states[2i]`` to ``states[2i + 1]`` and
MLP ``i`` maps ``states[2i + 1]`` to ``states[2i + 2]``; ``states[0::2]`` are the block states. ``h_i``
is the output of the attention branch's last module (a hook on it) added to ``x_i``: the same addition
the block performs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from algorithms.models.blocks import get_blocks, hidden_tensor
from algorithms.models.nll import batch_nll
from algorithms.models.placement import input_device
from algorithms.progress import Progress, report


@torch.inference_mode()
def capture_hidden_states(
    model, input_ids: torch.Tensor, *, batch_size: int = 4, store_dtype: torch.dtype = torch.float32,
    sublayers: bool = False, progress: Progress | None = None,
    consumers: Sequence[Callable[[torch.Tensor, slice], None]] = (), keep: bool = True,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Run ``input_ids`` (``(samples, seq_len)``) through ``model`` and return ``(states, stats)``
    (``sublayers``: the stream between the branches too, see the module doc).

    ``consumers`` are called with each batch's states ``(depths, b, seq_len, d)`` (``store_dtype``, on
    the model's input device) and the sample ``rows`` they hold, as they leave the model: streamed
    scoring (:mod:`estimators.streaming`). ``keep=False`` stores nothing (``states`` is None), so memory
    does not grow with the calibration tokens.

    ``stats`` holds the calibration loss of the dense model on the same tokens (a free by-product:
    ``nll`` and ``ppl``), measured by :func:`algorithms.models.nll.batch_nll`, the one NLL of blockbench.
    """
    blocks = get_blocks(model)
    n_blocks = len(blocks)
    device = input_device(model)
    samples, seq_len = input_ids.shape
    states: torch.Tensor | None = None
    current: dict[int, torch.Tensor] = {}

    def pre_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            current[index] = hidden.detach()

        return hook

    def post_hook(_module, _args, output):
        current[n_blocks] = hidden_tensor(output).detach()

    def branch_hook(index):
        def hook(_module, _args, output):
            current[("attention", index)] = hidden_tensor(output).detach()

        return hook

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post_hook))
    if sublayers:
        from algorithms.models.units import branch_output_module

        handles += [branch_output_module(model, i, "attention").register_forward_hook(branch_hook(i))
                    for i in range(n_blocks)]
    depths = 2 * n_blocks + 1 if sublayers else n_blocks + 1
    expected = n_blocks + 1 + (n_blocks if sublayers else 0)
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, samples, batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            current.clear()
            nll, n = batch_nll(model, ids)
            total_nll += nll
            total_tokens += n
            if len(current) != expected:
                raise RuntimeError(f"captured {len(current)} hidden states, expected {expected}")
            rows = slice(start, start + ids.shape[0])
            if consumers:  # one tensor per batch, in stream order: what the consumers see
                batch = torch.stack([_depth(current, depth, sublayers).to(store_dtype) for depth in range(depths)])
                for consume in consumers:
                    consume(batch, rows)
            if keep:
                if states is None:
                    d = current[0].shape[-1]
                    states = torch.empty((depths, samples, seq_len, d), dtype=store_dtype)
                for depth in range(depths):
                    states[depth, rows] = (batch[depth] if consumers else _depth(current, depth, sublayers)).to(
                        "cpu", store_dtype)
            report(progress, "windows", rows.stop, samples, "windows")
    finally:
        for h in handles:
            h.remove()
    mean_nll = total_nll / total_tokens
    return states, {"calib_nll": mean_nll, "calib_ppl": float(torch.tensor(mean_nll).exp())}


def _depth(current: dict, depth: int, sublayers: bool) -> torch.Tensor:
    """The state at ``depth`` of the captured stream from one batch's hooks."""
    if not sublayers:
        return current[depth]
    if depth % 2 == 0:
        return current[depth // 2]
    i = depth // 2
    return current[i] + current[("attention", i)]  # the attention branch's output: h_i = x_i + a_i


def nonfinite_depths(states: torch.Tensor) -> list[int]:
    """The depths (first index) of ``states`` holding a NaN or an infinity, checked one depth at a time:
    ``torch.isfinite`` of the whole tensor builds about two float-sized temporaries of it (1.95 GB on
    top of ``configs/full.yaml``'s 1.17 GB of states), one depth's worth instead. Not floating point:
    every depth."""
    if not states.is_floating_point():
        return list(range(states.shape[0]))
    return [depth for depth in range(states.shape[0]) if not bool(torch.isfinite(states[depth]).all())]
