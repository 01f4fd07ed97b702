"""The one negative log-likelihood of blockbench: capture, perplexity and the ``loss`` objective all
call it, so "the calibration loss", "the held-out perplexity" and "the search objective" are the same
computation.

Protocol: each row of ``input_ids`` is scored on its own (no context carried over), every token but
the first is predicted, logits are promoted to float32 and the per-batch sums accumulated in float64.

Memory and time: the head computes the logits of the predicted positions only (``logits_to_keep``,
where the model's forward takes it), and the log-probabilities are formed :data:`CHUNK_ROWS` positions
at a time, so a batch holds one ``(B, T - 1, V)`` logits tensor instead of three (logits, their
shifted copy, their log-softmax). The sum is bit for bit the one of ``cross_entropy(logits[:, :-1]
.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")``: every row's log-softmax is the same, and
the picked log-probabilities are summed by the same ``nll_loss`` in the same order
(``tests/test_nll.py`` checks it on every architecture blockbench removes blocks from and on SmolLM2).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator

import torch

from algorithms.models.placement import input_device
from algorithms.progress import Progress, report

#: positions whose log-probabilities are formed at a time (a ``(CHUNK_ROWS, V)`` float32 tensor)
CHUNK_ROWS = 64


@functools.cache
def _keeps_logits(forward_of: type) -> bool:
    """Whether the forward of models of this class takes ``logits_to_keep`` (transformers' causal LMs)."""
    try:
        return "logits_to_keep" in inspect.signature(forward_of.forward).parameters
    except (TypeError, ValueError):
        return False


def batch_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of positions ``0 .. T - 2`` of one batch ``(B, T)``, ``(B, T - 1, V)`` in the model's
    dtype (the head runs on those positions only when the model allows it). Runs one forward pass."""
    if _keeps_logits(type(model)):
        keep = torch.arange(ids.shape[1] - 1)  # on the CPU: indexes the final states wherever they are
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    return model(input_ids=ids, use_cache=False).logits[:, :-1, :]


def log_prob_chunks(logits: torch.Tensor) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """``(b, rows, log_probs)`` over ``logits`` ``(B, P, V)``: the float32 log-softmax
    ``(len(rows), V)`` of ``logits[b, rows]``, :data:`CHUNK_ROWS` positions at a time, windows in
    order and positions in order within each (``rows`` has explicit ``start`` and ``stop``)."""
    batch, positions, _ = logits.shape
    for b in range(batch):
        for first in range(0, positions, CHUNK_ROWS):
            rows = slice(first, min(first + CHUNK_ROWS, positions))
            yield b, rows, torch.log_softmax(logits[b, rows].float(), dim=-1)


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (float32 sum, returned as a float) of ``targets`` ``(B, P)`` under ``logits``
    ``(B, P, V)``, log-probabilities formed in float32, :data:`CHUNK_ROWS` positions at a time."""
    batch, positions, _ = logits.shape
    picked = torch.empty((batch * positions, 1), dtype=torch.float32, device=logits.device)
    targets = targets.to(logits.device)
    for b, rows, log_probs in log_prob_chunks(logits):
        picked[b * positions + rows.start : b * positions + rows.stop] = log_probs.gather(1, targets[b, rows, None])
    # nll_loss over the picked column adds them in the order and grouping it uses over the full rows
    zeros = torch.zeros(batch * positions, dtype=torch.long, device=logits.device)
    return float(torch.nn.functional.nll_loss(picked, zeros, reduction="sum").double())


def batch_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) and the number of predicted tokens of one batch ``(B, T)``
    already on the model's device. Runs one forward pass (hooks on the model fire)."""
    targets = ids[:, 1:]
    return summed_nll(batch_logits(model, ids), targets), targets.numel()


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
