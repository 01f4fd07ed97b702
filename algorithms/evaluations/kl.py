"""Agreement with the dense model: KL divergence of next-token distributions and top-1 agreement.

On fixed held-out windows (the perplexity protocol's windows: :func:`algorithms.data.heldout_windows`),
at every position that predicts a next token (``T - 1`` per window of ``T``), with ``p`` the dense
model's next-token distribution and ``q`` the pruned model's:

- ``kl``: mean over positions of KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), in nats;
- ``top1``: share of positions where both models' most likely next token is the same.

Log-probabilities are computed in float32 from the logits (whatever the model's dtype) and the sums
accumulated in float64. The dense model's log-probabilities are computed once per model (the
evaluation's :meth:`~KLDivergence.reference`) and kept in memory on the CPU for every block set
of that model: ``max_windows × (seq_len − 1) × vocabulary`` floats (200 MB for SmolLM2-135M at the
defaults), which is why the defaults are smaller than perplexity's. The same dense pass keeps the
states that pruned sets start from at their first removed block (``prefix_memory_mb``, as for
perplexity: :mod:`algorithms.models.prefix`; the same numbers, fewer blocks run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params

if TYPE_CHECKING:
    import torch

    from algorithms.models.prefix import PrefixReference


class KLParams(Params):
    source: str = "wikipedia"  #: its held-out split (never overlaps calibration)
    seq_len: int = Field(256, ge=2)
    max_windows: int = Field(4, ge=1)
    #: windows per forward pass: changes speed and memory, not the numbers (left out of identities)
    batch_size: int = Field(4, ge=1)
    #: megabytes for the dense states pruned sets start from (0: off); speed only (left out of identities)
    prefix_memory_mb: float = Field(512, ge=0)
    #: megabytes for the states of sets already measured, which later sets start from where they first
    #: differ (0: only the dense states); speed only (left out of identities)
    prefix_sets_mb: float = Field(512, ge=0)


def next_token_log_probs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Float32 log-probabilities ``(W, T - 1, V)`` on the CPU of every next-token prediction (formed
    :data:`~algorithms.models.nll.CHUNK_ROWS` positions at a time, straight into the result)."""
    import torch

    from algorithms.models.nll import batch_logits, log_prob_chunks
    from algorithms.models.placement import input_device

    device = input_device(model)
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            logits = batch_logits(model, windows[start : start + batch_size].to(device))
            if out is None:
                out = torch.empty((windows.shape[0], *logits.shape[1:]), dtype=torch.float32)
            for b, rows, log_probs in log_prob_chunks(logits):
                out[start + b, rows] = log_probs.cpu()
    assert out is not None
    return out


def kl_and_agreement(dense_log_probs: torch.Tensor, model: torch.nn.Module, windows: torch.Tensor,
                     batch_size: int) -> dict[str, float]:
    """Mean KL(dense ‖ model) and top-1 agreement over every next-token position of ``windows``: each
    position's KL summed over the vocabulary, :data:`~algorithms.models.nll.CHUNK_ROWS` positions at a
    time, then the batch's positions summed in float64 (the numbers of one whole-batch computation, bit
    for bit: ``tests/test_nll.py``)."""
    import torch

    from algorithms.models.nll import batch_logits, log_prob_chunks
    from algorithms.models.placement import input_device

    device = input_device(model)
    kl_sum, agree, positions = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            logits = batch_logits(model, windows[start : start + batch_size].to(device))
            kl = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
            for b, rows, log_q in log_prob_chunks(logits):
                log_p = dense_log_probs[start + b, rows].to(logits.device)
                kl[b, rows] = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
                agree += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum())
            kl_sum += float(kl.double().sum())
            positions += kl.numel()
    return {"kl": kl_sum / positions, "top1": agree / positions, "positions": positions}


class KLDivergence(Evaluation):
    """KL(dense ‖ pruned) of next-token distributions and top-1 agreement with the dense model."""

    name = "kl"
    version = "1"
    Params = KLParams
    measures_dense = False  # KL of the dense model with itself is 0 by definition
    speed_only = ("batch_size", "prefix_memory_mb", "prefix_sets_mb")

    def columns(self) -> list[Column]:
        return [
            Column("kl", "KL", False, fmt=".4f", spread=True, gate="kl", rank=5),
            Column("top1", "top-1 agree", True, fmt=".3f", gate="top1", short="top-1"),
        ]

    def _windows(self, tokenizer: Any) -> torch.Tensor:
        from algorithms.data import heldout_windows

        p = self.params
        return heldout_windows(tokenizer, p.source, seq_len=p.seq_len, max_windows=p.max_windows)

    def reference(self, model: torch.nn.Module, tokenizer: Any) -> PrefixReference:
        """The dense model's log-probabilities (``dense``) and its states for the shared prefix
        (``prefix``: ``None`` when ``prefix_memory_mb`` holds no depth)."""
        from algorithms.models.prefix import PrefixReference, dense_pass

        p, windows = self.params, self._windows(tokenizer)

        def run(m: torch.nn.Module) -> torch.Tensor:
            return next_token_log_probs(m, windows, p.batch_size)

        return dense_pass(model, windows, p.prefix_memory_mb, run, p.prefix_sets_mb) or PrefixReference(run(model), None)

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        reference = target.reference
        if reference is None:
            raise ValueError("kl needs the dense model's log-probabilities (its reference)")
        with target.pruned(reference) as model:
            return kl_and_agreement(reference.dense, model, self._windows(target.tokenizer),
                                    self.params.batch_size)

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        return {"kl": pruned["kl"], "top1": pruned["top1"]}
