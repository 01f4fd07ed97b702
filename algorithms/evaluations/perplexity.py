"""Perplexity on fixed windows, with one documented protocol.

Protocol: the windows come from :func:`algorithms.data.heldout_windows` (non-overlapping, stride =
window length; a BOS token leads each window when the tokenizer adds one by default). Each window is scored on its own (no context carried over); every
token but the first in a window is predicted, so ``W`` windows of ``T`` tokens give ``W * (T - 1)``
predictions. Perplexity is ``exp`` of the mean negative log-likelihood over all of them, accumulated
in float64.
"""

from __future__ import annotations

import math

import torch


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4) -> dict[str, float]:
    """Return ``{"ppl", "nll", "tokens"}`` of ``model`` on ``windows`` (LongTensor ``(W, T)``)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (W, T >= 2), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll.double())
        total_tokens += ids[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens}
