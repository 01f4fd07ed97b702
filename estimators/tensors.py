"""Tensor helpers shared by the ``functional*`` modules: precision, layout, token sampling, chunking.

Hidden states arrive as ``(..., d)`` (any leading token shape) in any float dtype. Estimators work on
``(N, d)`` rows in float32 or wider (:func:`promote`, :func:`flatten_states`, :func:`flatten_tokens`),
draw token samples from a seeded CPU generator (:func:`sample_tokens`; the same tokens at every depth:
:func:`sample_depth_tokens`), bound memory by walking rows in chunks (:func:`row_chunks`), and keep
CUDA matmuls in full float32 (:func:`no_tf32`). A pair estimator split into a per-depth and a per-pair
part is put back together by :func:`on_both_sides`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

Tensor = torch.Tensor


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 precision for CUDA matmuls inside the block (TF32 keeps only 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def promote(x: Tensor) -> Tensor:
    """``x`` in float32 at least: half precision (and integers) become float32, float64 stays."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def flatten_tokens(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Reshape to ``(N, dx)`` and ``(N, dy)``; half precision is promoted to float32.

    The feature sizes may differ, the token (leading) shapes may not.
    """
    if x.dim() < 1 or y.dim() < 1 or x.shape[-1] == 0 or y.shape[-1] == 0:
        raise ValueError(f"hidden states need a feature dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"hidden states differ in token shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"hidden states are on different devices: {x.device} vs {y.device}")
    x, y = promote(x), promote(y)
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def flatten_states(z: Tensor) -> Tensor:
    """One depth's states as ``(N, d)``; half precision is promoted to float32, float64 stays."""
    if z.dim() < 1 or z.shape[-1] == 0:
        raise ValueError(f"hidden states need a feature dimension, got {tuple(z.shape)}")
    z = promote(z)
    return z.reshape(-1, z.shape[-1])


def sample_tokens(z: Tensor, n_tokens: int | None, generator: torch.Generator, population: int | None = None) -> Tensor:
    """At most ``n_tokens`` rows of ``z`` (N, d): a sample without replacement drawn from ``generator``
    (all rows, and no draw, when there are not more). Equal ``N`` and generator state pick equal rows.

    ``population``: ``z`` is already that sample, drawn from ``population`` rows (:func:`sample_rows`, as
    streamed scoring keeps it); it is returned as it is, and ``generator`` moves on exactly as the draw
    would have moved it, so what a caller draws from it next is what it would have drawn."""
    if population is not None:
        if n_tokens is not None and population > n_tokens:
            if z.shape[0] != n_tokens:
                raise ValueError(f"a sample of {n_tokens} of {population} rows has {z.shape[0]} rows")
            torch.randperm(population, generator=generator)
        elif z.shape[0] != population:
            raise ValueError(f"all {population} rows were kept, but the sample has {z.shape[0]}")
        return z
    if n_tokens is None or z.shape[0] <= n_tokens:
        return z
    return z[torch.randperm(z.shape[0], generator=generator)[:n_tokens].to(z.device)]


def sample_rows(population: int, n_tokens: int | None, seed: int) -> Tensor | None:
    """The rows (in draw order) :func:`sample_tokens` keeps of ``population`` rows with a generator
    seeded with ``seed``; None when it keeps them all (in their order)."""
    if n_tokens is None or population <= n_tokens:
        return None
    return torch.randperm(population, generator=torch.Generator().manual_seed(seed))[:n_tokens]


def sample_depth_tokens(states: Tensor, n_tokens: int | None, generator: torch.Generator) -> Tensor:
    """The same token sample at every depth of ``states`` ``(depths, ..., d)``, as ``(depths, 1, n, d)``:
    ``out[i, 0]`` holds the rows :func:`sample_tokens` would pick from ``states[i]`` flattened with a
    generator in ``generator``'s state (so a metric's ``select_tokens`` and its per-depth sampling agree),
    gathered once for all depths without copying the rest."""
    if states.dim() < 2 or states.shape[-1] == 0:
        raise ValueError(f"states need a depth and a feature dimension, got {tuple(states.shape)}")
    flat = states.reshape(states.shape[0], -1, states.shape[-1])
    if n_tokens is not None and flat.shape[1] > n_tokens:
        flat = flat[:, torch.randperm(flat.shape[1], generator=generator)[:n_tokens].to(states.device)]
    return flat[:, None]


def row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Slices ``[0, c), [c, 2c), ...`` covering ``range(n)``, ``c = chunk_size`` (the last one shorter)."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def on_both_sides(
    side: Callable[..., Any], compare: Callable[[Any, Any], Tensor], x: Tensor, y: Tensor, **params: Any
) -> Tensor:
    """``compare(side(x), side(y))``: a pair estimator from its per-depth part (which holds the
    parameters and their defaults) and its per-pair part, for the same tokens seen at two depths."""
    x, y = flatten_tokens(x, y)
    return compare(side(x, **params), side(y, **params))
