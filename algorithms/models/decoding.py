"""Greedy decoding with the KV cache, written out (no ``generate()``): what every pruned model's cached
generation is checked and measured with.

Protocol of :func:`greedy_continuations`: the prompts ``(N, P)`` (equal lengths, so no padding) run in
batches; the prompt is prefilled with the cache on, then each step feeds the last token alone with the
cache and takes the arg-max of its logits. Exactly ``new_tokens`` tokens per prompt: no stop at an
end-of-sequence token, no sampling, no repetition penalty (a model's ``generation_config`` is not read,
so nothing in it changes the tokens). Ties in the arg-max go to the lowest token id (``torch.argmax``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from algorithms.models.placement import input_device


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: transformers renamed ``past_key_values`` to
    ``cache`` (5.24; the old name still works there, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any, keyword: str) -> Any:
    """The KV cache a forward pass returned (under ``keyword`` or ``past_key_values``)."""
    return output[keyword] if keyword in output.keys() else output.past_key_values


@torch.inference_mode()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, *,
                         batch_size: int = 8) -> torch.Tensor:
    """The ``new_tokens`` greedy tokens after each prompt, ``(N, new_tokens)`` on the CPU."""
    if prompts.dim() != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must have shape (N, P >= 1), got {tuple(prompts.shape)}")
    if new_tokens < 1 or batch_size < 1:
        raise ValueError(f"new_tokens and batch_size must be at least 1, got {new_tokens} and {batch_size}")
    device = input_device(model)
    keyword = cache_keyword(model)
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size].to(device)
        step = model(input_ids=ids, use_cache=True)
        tokens = [step.logits[:, -1].argmax(-1)]
        for _ in range(new_tokens - 1):
            step = model(input_ids=tokens[-1][:, None], use_cache=True, **{keyword: cache_of(step, keyword)})
            tokens.append(step.logits[:, -1].argmax(-1))
        out.append(torch.stack(tokens, dim=1).cpu())
    return torch.cat(out)


def agreeing_prefix(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading tokens of ``other`` equal ``reference`` (both ``(N, M)``): ``M`` when
    the rows are identical, the position of the first difference otherwise."""
    if reference.shape != other.shape:
        raise ValueError(f"continuations of different shapes: {tuple(reference.shape)} and {tuple(other.shape)}")
    differs = reference != other
    first = differs.int().argmax(dim=1)
    return torch.where(differs.any(dim=1), first, torch.full_like(first, reference.shape[1]))
