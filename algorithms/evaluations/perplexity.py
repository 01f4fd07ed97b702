"""Perplexity on fixed held-out windows, with one documented protocol.

Protocol: the windows come from :func:`algorithms.data.heldout_windows` (non-overlapping, stride =
window length; a BOS token leads each window when the tokenizer adds one by default). Each window is
scored on its own (no context carried over); every token but the first in a window is predicted, so
``W`` windows of ``T`` tokens give ``W * (T - 1)`` predictions. Perplexity is ``exp`` of the mean
negative log-likelihood over all of them (:func:`algorithms.models.nll.mean_nll`, accumulated in
float64). Perplexities of models with different tokenizers are not comparable.

Shared prefix: the dense model's pass (the evaluation's :meth:`~Perplexity.reference`) keeps the state
entering each block on these windows (up to ``prefix_memory_mb``), and every pruned set of the model
starts from the state at its first removed block instead of recomputing the blocks it shares with the
dense model (:mod:`algorithms.models.prefix`; the same numbers, fewer blocks run). The states of the sets
measured since are kept too (up to ``prefix_sets_mb``): a set that agrees with one of them up to a later
block starts there (``{13, 14, 17, 25}`` after ``{13, 14, 17}`` runs from block 25).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params

if TYPE_CHECKING:
    import torch

    from algorithms.models.prefix import PrefixReference


def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4, progress=None) -> dict[str, float]:
    """Return ``{"ppl", "nll", "tokens"}`` of ``model`` on ``windows`` (LongTensor ``(W, T)``;
    ``progress``: an :data:`algorithms.progress.Progress` told the windows done)."""
    from algorithms.models.nll import mean_nll, perplexity_of

    nll, tokens = mean_nll(model, windows, batch_size=batch_size, progress=progress)
    return {"ppl": perplexity_of(nll), "nll": nll, "tokens": tokens}


class PerplexityParams(Params):
    source: str = "wikipedia"  #: its held-out split, which never overlaps calibration
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(16, ge=1)
    #: windows per forward pass: changes speed and memory, not the number (left out of identities)
    batch_size: int = Field(4, ge=1)
    #: megabytes for the dense states pruned sets start from (0: every set runs every kept block);
    #: changes speed, not the number (left out of identities)
    prefix_memory_mb: float = Field(1024, ge=0)
    #: megabytes for the states of sets already measured, which later sets start from where they first
    #: differ (0: only the dense states); speed only (left out of identities)
    prefix_sets_mb: float = Field(1024, ge=0)


class Perplexity(Evaluation):
    """Held-out perplexity, exp(mean next-token NLL) over fixed windows; always measured."""

    name = "perplexity"
    version = "1"
    Params = PerplexityParams
    speed_only = ("batch_size", "prefix_memory_mb", "prefix_sets_mb")

    def columns(self) -> list[Column]:
        return [
            Column("ppl_pruned", "ppl (pruned)", False, fmt=".2f", spread=True, gate="ppl", rank=10,
                   short="ppl pruned", dense_key="ppl_dense", log_scale=True),
            Column("ppl_dense", "ppl (dense)", None, fmt=".2f", short="dense"),
        ]

    def _windows(self, tokenizer: Any) -> torch.Tensor:
        from algorithms.data import heldout_windows

        p = self.params
        return heldout_windows(tokenizer, p.source, seq_len=p.seq_len, max_windows=p.max_windows)

    def reference(self, model: torch.nn.Module, tokenizer: Any) -> PrefixReference | None:
        """The dense model's perplexity and its states for the shared prefix (``None`` when
        ``prefix_memory_mb`` holds no depth)."""
        from algorithms.models.prefix import dense_pass

        p, windows = self.params, self._windows(tokenizer)
        return dense_pass(model, windows, p.prefix_memory_mb,
                          lambda m: perplexity(m, windows, batch_size=p.batch_size), p.prefix_sets_mb)

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.models.prefix import PrefixReference

        reference = target.reference if isinstance(target.reference, PrefixReference) else None
        if reference is not None and not target.removed:
            return dict(reference.dense)
        windows = self._windows(target.tokenizer)
        with target.pruned(reference) as model:
            return perplexity(model, windows, batch_size=self.params.batch_size, progress=target.progress)

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        return {"ppl_pruned": pruned["ppl"], "ppl_dense": dense["ppl"] if dense else None}
