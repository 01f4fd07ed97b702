"""The real speed of a (pruned) model: prefill latency, decode throughput, size and memory.

:func:`measure_speed` times one model as it is now (inside :func:`algorithms.models.masking.skip_blocks` the
removed blocks are really gone from the forward pass):

- **prefill**: one forward pass over a batch-1 prompt of each length, with the KV cache built and only
  the last position's logits computed where the model supports ``logits_to_keep`` (as ``generate()``
  does), so the head's vocabulary projection is not charged once per prompt token;
- **decode**: greedy decoding with the KV cache, exactly ``decode_tokens`` new tokens after a prompt of
  the first length (no stop on EOS); only the decoding steps are timed, not the prefill before them;
- parameters and weight bytes (tied tensors counted once) and, on CUDA, the peak memory allocated
  during the measurement (``torch.cuda.max_memory_allocated``; ``None`` on CPU, where no allocator
  statistic isolates one model).

Each measurement runs ``warmup`` untimed times, then ``repeats`` timed times; the median, min, max and
inter-quartile range are kept. On CUDA the intervals are CUDA events with synchronisation. On a CPU
shared with other busy processes, use ``torch.set_num_threads(1)``: with more intra-op threads than
free cores, a small matmul was measured 50x slower and its timings swung by several times. Prompts are
fixed token ids drawn from the vocabulary with a seeded generator, the same for every model.

:func:`compare_speed` measures the dense model and the model without a block set *in the same process,
interleaved* (round ``i`` dense then pruned, round ``i + 1`` pruned then dense: measured one after the
other, whichever went first read about 10% slower on a 2-core CPU) and :func:`speedup` turns the two
into ratios; absolute times are never compared across runs or machines. Removing a share ``r`` of the blocks
cannot give more than ``1 / (1 - r)`` (:func:`expected_ceiling`): embeddings and the head remain.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from algorithms.models.blocks import count_parameters, weight_bytes
from estimators.checks import check_int


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "iqr": q[2] - q[0]}


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
           setup: Callable[[], Any] | None = None) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (CUDA events on GPU); ``setup``, when
    given, runs untimed before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _prompt(model: torch.nn.Module, length: int, seed: int, device: torch.device) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


def _prefill_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def decode_steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, extra: dict[str, Any]):
    """Prefill ``prompt``; return ``(reset, run, produced)``: ``reset`` (untimed) gives ``run`` a fresh
    copy of the cache state after the prompt, ``run`` greedily decodes ``steps`` tokens from it (so
    every timed repeat decodes the same tokens from the same position, and copying the cache is not
    timed), and ``produced`` holds the token ids of the last ``run``. The tokens stay on the device
    until the last step (no host synchronisation per step)."""
    import copy

    from algorithms.models.decoding import cache_keyword, cache_of

    keyword = cache_keyword(model)
    out = model(prompt, use_cache=True, **extra)
    cache = cache_of(out, keyword)
    first = out.logits[:, -1:].argmax(-1)
    produced: list[int] = []
    state: dict[str, Any] = {}

    def reset() -> None:
        state["past"] = copy.deepcopy(cache)

    def run() -> None:
        past = state.pop("past", None)
        if past is None:  # called without reset()
            past = copy.deepcopy(cache)
        token = first
        tokens = []
        for _ in range(steps):
            step = model(token, use_cache=True, **{keyword: past})
            past = cache_of(step, keyword)
            token = step.logits[:, -1:].argmax(-1)
            tokens.append(token)
        produced[:] = torch.cat(tokens, dim=1)[0].tolist()

    return reset, run, produced


def _check_options(prompt_lengths: Sequence[int], decode_tokens: int, repeats: int, warmup: int,
                   threads: int | None = None) -> list[int]:
    lengths = list(prompt_lengths)
    if not lengths:
        raise ValueError("prompt_lengths must name at least one prompt length")
    for i, length in enumerate(lengths):
        check_int(f"prompt_lengths[{i}]", length, 1)
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"prompt_lengths has repeated values: {lengths}")
    check_int("decode_tokens", decode_tokens, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if threads is not None:
        check_int("threads", threads, 1)
    return lengths


def _measure(
    model: torch.nn.Module,
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
    lengths: list[int],
    decode_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Time every variant of ``model`` (each a context that puts the model in that state), interleaved:
    round ``i`` runs the variants in order, round ``i + 1`` in reverse, so drift over time (warming
    caches, clock changes) does not favour whichever variant is measured first."""
    from algorithms.models.placement import input_device

    device = input_device(model)
    extra = _prefill_kwargs(model)
    plans: dict[str, list[tuple[str, Callable[[], Any], Callable[[], Any] | None]]] = {}
    static: dict[str, dict[str, Any]] = {}
    produced: dict[str, list[int]] = {}
    for name, enter in variants.items():  # build each variant's calls (and its decode cache) in its state
        with enter() as m:
            calls = []
            for length in lengths:
                ids = _prompt(m, length, seed, device)
                calls.append((str(length), lambda m=m, ids=ids: m(ids, use_cache=True, **extra), None))
            reset, run, produced[name] = decode_steps(m, _prompt(m, lengths[0], seed, device), decode_tokens, extra)
            calls.append(("decode", run, reset))
            plans[name] = calls
            static[name] = {"params": count_parameters(m), "weight_bytes": weight_bytes(m)}
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key, *_ in plans[name]} for name in variants}
    peaks: dict[str, int] = dict.fromkeys(variants, 0)
    order = list(variants)
    for round_ in range(warmup + repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            with variants[name]():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                for key, fn, setup in plans[name]:
                    seconds = _timed(fn, device, repeats=1, warmup=0, setup=setup)[0]
                    if round_ >= warmup:
                        times[name][key].append(seconds)
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], int(torch.cuda.max_memory_allocated(device)))
    out = {}
    for name in variants:
        if len(produced[name]) != decode_tokens:  # pragma: no cover - the loop always runs that many steps
            raise RuntimeError(f"{name}: decoded {len(produced[name])} tokens, expected {decode_tokens}")
        peak = peaks[name] if device.type == "cuda" else None
        out[name] = {
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),  # intra-op CPU threads: oversubscribed, timings mean little
            **static[name],
            "peak_bytes": peak,
            "peak_bytes_source": "torch.cuda.max_memory_allocated" if peak is not None else None,
            "prefill": {str(length): {f"{k}_s": v for k, v in _summary(times[name][str(length)]).items()}
                        for length in lengths},
            "decode": {"prompt_length": lengths[0], "tokens": decode_tokens,
                       "tokens_per_s": _summary([decode_tokens / t for t in times[name]["decode"]])},
            "repeats": repeats,
            "warmup": warmup,
        }
    return out


@contextlib.contextmanager
def _evaluation_mode(model: torch.nn.Module, threads: int | None = None) -> Iterator[None]:
    """Eval mode and inference mode, with ``threads`` intra-op CPU threads when given; all restored."""
    was_training, was_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
        torch.set_num_threads(was_threads)


def measure_speed(
    model: torch.nn.Module,
    prompt_lengths: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Prefill latency per prompt length, decode tokens/s, parameters and memory of ``model`` as it is.

    Returns plain JSON-ready values::

        {"device", "dtype", "threads", "params", "weight_bytes", "peak_bytes", "peak_bytes_source",
         "prefill": {"128": {"median_s", "min_s", "max_s", "iqr_s"}, ...},
         "decode": {"prompt_length", "tokens", "tokens_per_s": {"median", "min", "max", "iqr"}},
         "repeats", "warmup"}

    ``threads`` sets torch's intra-op CPU threads for the measurement (restored after); ``None`` keeps
    the current setting. One thread is the steadiest choice on a CPU shared with other work.
    """
    lengths = _check_options(prompt_lengths, decode_tokens, repeats, warmup, threads)
    with _evaluation_mode(model, threads):
        return _measure(model, {"model": lambda: contextlib.nullcontext(model)}, lengths, decode_tokens,
                        repeats, warmup, seed)["model"]


def compare_speed(
    model: torch.nn.Module,
    removed: Sequence[int],
    prompt_lengths: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
    transform: Callable[[torch.nn.Module, Sequence[int]], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """The dense ``model`` and the model without ``removed`` blocks, measured interleaved in this
    process: ``{"dense": ..., "pruned": ..., "speedup": speedup(dense, pruned)}`` (each side as
    :func:`measure_speed` returns it). ``transform(model, removed)`` is the context manager that
    removes the set (default: :func:`algorithms.models.masking.skip_blocks`)."""
    from algorithms.models.masking import skip_blocks

    lengths = _check_options(prompt_lengths, decode_tokens, repeats, warmup, threads)
    removed = sorted(set(removed))
    remove = transform or skip_blocks
    variants = {"dense": lambda: contextlib.nullcontext(model), "pruned": lambda: remove(model, removed)}
    with _evaluation_mode(model, threads):
        result = _measure(model, variants, lengths, decode_tokens, repeats, warmup, seed)
    return {**result, "speedup": speedup(result["dense"], result["pruned"])}


def speedup(dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Ratios of a pruned over a dense measurement from :func:`measure_speed` (same process, same options).

    ``prefill[length]`` = dense / pruned fastest latency (> 1 is faster), ``prefill_mean`` their
    geometric mean over lengths, ``decode`` = pruned / dense best tokens/s, ``params`` and
    ``weight_memory`` = pruned / dense (< 1 is smaller). Ratios use each side's fastest repeat, not
    its median: interference from other processes only ever adds time, so the minimum is the
    estimate least disturbed by it (as ``timeit`` advises); the medians and spreads stay in the
    measurements.
    """
    if set(dense["prefill"]) != set(pruned["prefill"]):
        raise ValueError(f"prompt lengths differ: dense {sorted(dense['prefill'])}, pruned {sorted(pruned['prefill'])}")
    if dense["decode"]["tokens"] != pruned["decode"]["tokens"]:
        raise ValueError(f"decode lengths differ: dense {dense['decode']['tokens']}, pruned {pruned['decode']['tokens']}")
    prefill = {length: dense["prefill"][length]["min_s"] / pruned["prefill"][length]["min_s"]
               for length in dense["prefill"]}
    return {
        "prefill": prefill,
        "prefill_mean": math.exp(sum(math.log(v) for v in prefill.values()) / len(prefill)),
        "decode": pruned["decode"]["tokens_per_s"]["max"] / dense["decode"]["tokens_per_s"]["max"],
        "params": pruned["params"] / dense["params"],
        "weight_memory": pruned["weight_bytes"] / dense["weight_bytes"],
    }


def expected_ceiling(n_blocks: int, n_removed: int) -> float:
    """Upper bound ``1 / (1 - r)`` on the speedup from removing ``n_removed`` of ``n_blocks`` blocks
    (``r`` = their share). The real speedup stays below it: embeddings, the final norm and the head
    remain, and at small sizes fixed per-call overheads do too."""
    check_int("n_blocks", n_blocks, 1)
    if isinstance(n_removed, bool) or not isinstance(n_removed, int) or not 0 <= n_removed < n_blocks:
        raise ValueError(f"n_removed must be an integer in [0, {n_blocks}), got {n_removed!r}")
    return n_blocks / (n_blocks - n_removed)
