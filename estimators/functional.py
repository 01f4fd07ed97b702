"""Pure maths on hidden states (torchmetrics-style ``functional`` layer).

Every function takes two tensors of shape ``(..., d)`` — the same tokens seen at two depths — and
returns a 0-d float64 tensor. Inputs in half precision are promoted to float32 first: in bfloat16,
nearly identical states give a *negative* Block Influence (1 - cos with cos rounded above 1).
"""

from __future__ import annotations

import math

import torch

from estimators.tensors import promote

Tensor = torch.Tensor


def _flatten_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"hidden states need a feature dimension, got shape {tuple(x.shape)}")
    return promote(x).reshape(-1, x.shape[-1]), promote(y).reshape(-1, y.shape[-1])


def token_cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity per token (rows), computed in float32 or wider. Shape ``(N,)``.

    A zero vector has cosine 0 with anything (no direction), never NaN.
    """
    x, y = _flatten_pair(x, y)
    dot = (x * y).sum(-1)
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(dot))
    return cos.clamp(-1.0, 1.0)


def block_influence(x: Tensor, y: Tensor) -> Tensor:
    """ShortGPT's Block Influence: ``1 - mean_t cos(x_t, y_t)``. 0 for a block that changes nothing."""
    return 1.0 - token_cosine(x, y).double().mean()


def token_angles(x: Tensor, y: Tensor) -> Tensor:
    """``arccos(cos(x_t, y_t)) / pi`` per token, float64, shape ``(N,)``."""
    return torch.arccos(token_cosine(x, y).double()) / math.pi


def angular_distance(x: Tensor, y: Tensor) -> Tensor:
    """Gromov et al.'s angular distance, ``mean_t arccos(cos(x_t, y_t)) / pi`` in [0, 1]."""
    return token_angles(x, y).mean()
