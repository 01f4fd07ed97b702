"""Perplexity on fixed held-out windows, with one documented protocol.

Protocol: the windows come from :func:`algorithms.data.heldout_windows` (non-overlapping, stride =
window length; a BOS token leads each window when the tokenizer adds one by default). Each window is
scored on its own (no context carried over); every token but the first in a window is predicted, so
``W`` windows of ``T`` tokens give ``W * (T - 1)`` predictions. Perplexity is ``exp`` of the mean
negative log-likelihood over all of them (:func:`algorithms.models.nll.mean_nll`, accumulated in
float64). Perplexities of models with different tokenizers are not comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params

if TYPE_CHECKING:
    import torch


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


class Perplexity(Evaluation):
    """Held-out perplexity, exp(mean next-token NLL) over fixed windows; always measured."""

    name = "perplexity"
    version = "1"
    Params = PerplexityParams
    speed_only = ("batch_size",)

    def columns(self) -> list[Column]:
        return [
            Column("ppl_pruned", "ppl (pruned)", False, fmt=".2f", spread=True, gate="ppl", rank=10,
                   short="ppl pruned", dense_key="ppl_dense", log_scale=True),
            Column("ppl_dense", "ppl (dense)", None, fmt=".2f", short="dense"),
        ]

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.data import heldout_windows

        p = self.params
        windows = heldout_windows(target.tokenizer, p.source, seq_len=p.seq_len, max_windows=p.max_windows)
        with target.pruned() as model:
            return perplexity(model, windows, batch_size=p.batch_size, progress=target.progress)

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        return {"ppl_pruned": pruned["ppl"], "ppl_dense": dense["ppl"] if dense else None}
