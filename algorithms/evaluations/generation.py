"""Agreement of greedy generation with the dense model: does the pruned model still *write* what the
dense model writes?

Protocol: the prompts are the first ``prompts`` held-out windows of ``prompt_len`` tokens
(:func:`algorithms.data.heldout_windows`, the perplexity protocol's split, never calibration). Each
model continues every prompt with ``new_tokens`` greedy tokens using the KV cache
(:func:`algorithms.models.decoding.greedy_continuations`: arg-max, no end-of-sequence stop, no
sampling or penalties), so every pruned model's cached generation runs too. The dense continuations
are computed once per model (the evaluation's :meth:`~Generation.reference`). Per prompt, the
*agreeing prefix* is the number of leading generated tokens equal to the dense model's (``new_tokens``
when all are). Columns:

- ``gen agree``: mean agreeing prefix ÷ ``new_tokens`` (1 = every continuation identical);
- ``gen exact``: share of prompts whose whole continuation equals the dense one;
- ``gen prefix``: mean agreeing prefix in tokens.

Greedy continuations diverge for good after the first different token, which is why agreement is
measured up to it (positions after a divergence compare different contexts). A multiple-choice
task scores one log-likelihood per choice and never asks the model to write: this is the generative
side next to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params

if TYPE_CHECKING:
    import torch


class GenerationParams(Params):
    source: str = "wikipedia"  #: its held-out split (never overlaps calibration)
    prompts: int = Field(16, ge=1)
    prompt_len: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=1)
    #: prompts per batch: changes speed and memory, not the tokens (left out of identities)
    batch_size: int = Field(8, ge=1)


class Generation(Evaluation):
    """Greedy continuations of held-out prompts compared with the dense model's (KV cache on)."""

    name = "generation"
    version = "1"
    Params = GenerationParams
    speed_only = ("batch_size",)

    def columns(self) -> list[Column]:
        return [
            Column("gen_agree", "gen agree", True, fmt=".3f", spread=True, gate="generation", rank=3),
            Column("gen_exact", "gen exact", True, fmt=".3f"),
            Column("gen_prefix", "gen prefix", True, fmt=".1f", terminal=False),
        ]

    def _prompts(self, tokenizer: Any) -> torch.Tensor:
        from algorithms.data import heldout_windows

        p = self.params
        prompts = heldout_windows(tokenizer, p.source, seq_len=p.prompt_len, max_windows=p.prompts)
        if prompts.shape[0] < p.prompts:
            raise ValueError(f"generation.prompts = {p.prompts}, but {p.source!r}'s held-out text has only "
                             f"{prompts.shape[0]} windows of {p.prompt_len} tokens")
        return prompts

    def _continue(self, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
        from algorithms.models.decoding import greedy_continuations

        p = self.params
        return greedy_continuations(model, self._prompts(tokenizer), p.new_tokens, batch_size=p.batch_size)

    def reference(self, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
        """The dense model's continuations ``(prompts, new_tokens)``."""
        return self._continue(model, tokenizer)

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.models.decoding import agreeing_prefix

        dense = target.reference if target.reference is not None else self._continue(target.model, target.tokenizer)
        if not target.removed:
            tokens = dense
        else:
            with target.pruned() as model:
                tokens = self._continue(model, target.tokenizer)
        prefix = agreeing_prefix(dense, tokens)
        return {"prefix": prefix.tolist(), "new_tokens": self.params.new_tokens,
                "exact": int((prefix == tokens.shape[1]).sum()), "tokens": tokens.tolist()}

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        prefix, n = pruned["prefix"], pruned["new_tokens"]
        mean = sum(prefix) / len(prefix)
        return {"gen_agree": mean / n, "gen_exact": pruned["exact"] / len(prefix), "gen_prefix": mean}
