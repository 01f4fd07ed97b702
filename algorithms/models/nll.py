"""The one negative log-likelihood of blockbench: capture, perplexity and the ``loss`` objective all
call it, so "the calibration loss", "the held-out perplexity" and "the search objective" are the same
computation.

Protocol: each row of ``input_ids`` is scored on its own (no context carried over), every token but
the first is predicted, logits are promoted to float32 and the per-batch sums accumulated in float64.
"""

from __future__ import annotations

import math

import torch

from algorithms.models.placement import input_device
from algorithms.progress import Progress, report


def batch_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens of one batch ``(B, T)``
    already on the model's device. Runs one forward pass (hooks on the model fire)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return float(nll.double()), ids[:, 1:].numel()


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 4,
             progress: Progress | None = None) -> tuple[float, int]:
    """Mean next-token NLL of ``model`` over the rows of ``input_ids`` ``(W, T >= 2)`` and the number
    of predicted tokens, ``W * (T - 1)`` (``progress``: told the windows done)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape (W, T >= 2), got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = input_device(model)
    total, tokens = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        nll, n = batch_nll(model, input_ids[start : start + batch_size].to(device))
        total += nll
        tokens += n
        report(progress, "windows", min(start + batch_size, input_ids.shape[0]), input_ids.shape[0], "windows")
    return total / tokens, tokens


def perplexity_of(mean: float) -> float:
    """``exp(mean NLL)``, ``inf`` past float range."""
    return math.exp(mean) if mean < 700 else math.inf
