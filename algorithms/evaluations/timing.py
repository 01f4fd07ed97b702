"""The real speed of a (pruned) model: prefill latency, decode throughput, size and memory.

:func:`measure_speed` times one model as it is now (inside :func:`algorithms.models.masking.skip_blocks` the
removed blocks are really gone from the forward pass):

- **prefill**: one forward pass over a batch-1 prompt of each length, with the KV cache built and only
  the last position's logits computed where the model supports ``logits_to_keep`` (as ``generate()``
  does), so the head's vocabulary projection is not charged once per prompt token;
- **decode**: greedy decoding with the KV cache, exactly ``decode_tokens`` new tokens after a prompt of
  the first length (no stop on EOS); each decoding step is timed on its own (the prefill before them
  and the copy of the cache are not timed), and a run's time is the sum of its steps;
- parameters and weight bytes (tied tensors counted once) and, on CUDA, the peak memory allocated
  during the measurement (``torch.cuda.max_memory_allocated``; ``None`` on CPU, where no allocator
  statistic isolates one model).

Each measurement runs ``warmup`` untimed rounds, then ``repeats`` timed ones; the median, min, max and
inter-quartile range are kept. On CUDA the intervals are CUDA events, synchronised around each timed
call (a decoding step too). On a CPU shared with other busy processes, use
``torch.set_num_threads(1)``: with more intra-op threads than free cores, a small matmul was measured
50x slower and its timings swung by several times. Prompts are fixed token ids drawn from the
vocabulary with a seeded generator, the same for every model.

:func:`compare_speed` measures the dense model and the model without a block set *in the same process,
interleaved call by call*: the dense and the pruned prefill of each length back to back, then the
decoding steps in turn (dense step 1, pruned step 1, pruned step 2, dense step 2, ...; the order
alternates because whichever went first read about 10% slower on a 2-core CPU).
:func:`paired_speedup` takes the median of the paired ratios: a shared CPU's speed drifts over
seconds, and only calls milliseconds apart see the same machine. Absolute times are never compared
across runs or machines. Removing a share ``r`` of the blocks cannot give more than ``1 / (1 - r)``
(:func:`expected_ceiling`): embeddings and the head remain.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events with synchronisation on either side on GPU,
    ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prompt(model: torch.nn.Module, length: int, seed: int, device: torch.device) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


def _prefill_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class Decoder:
    """Greedy decoding with the KV cache from a prefilled prompt, one step at a time.

    :meth:`reset` (untimed) restores a fresh copy of the cache state after the prompt, so every timed
    repeat decodes the same tokens from the same position and copying the cache is never timed;
    :meth:`step` decodes one token; :meth:`run` decodes ``steps`` tokens from a fresh state. The tokens
    stay on the device until the last step of a run (no host synchronisation per step), then
    ``produced`` holds that run's token ids."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, steps: int, extra: dict[str, Any]):
        from algorithms.models.decoding import cache_keyword, cache_of

        self.model, self.steps, self._cache_of = model, steps, cache_of
        self.keyword = cache_keyword(model)
        out = model(prompt, use_cache=True, **extra)
        self._prompt_cache = cache_of(out, self.keyword)
        self._first = out.logits[:, -1:].argmax(-1)
        self.produced: list[int] = []
        self._past: Any = None
        self._token = self._first
        self._tokens: list[torch.Tensor] = []

    def reset(self) -> None:
        import copy

        self._past = copy.deepcopy(self._prompt_cache)
        self._token, self._tokens = self._first, []

    def step(self) -> None:
        if self._past is None:  # a step without reset(): start from a fresh copy, never a used cache
            self.reset()
        out = self.model(self._token, use_cache=True, **{self.keyword: self._past})
        self._past = self._cache_of(out, self.keyword)
        self._token = out.logits[:, -1:].argmax(-1)
        self._tokens.append(self._token)
        if len(self._tokens) == self.steps:
            self.produced[:] = torch.cat(self._tokens, dim=1)[0].tolist()
            self._past = None

    def run(self) -> None:
        self.reset()
        for _ in range(self.steps):
            self.step()


def decode_steps(model: torch.nn.Module, prompt: torch.Tensor, steps: int, extra: dict[str, Any]) -> Decoder:
    """Prefill ``prompt`` and return its :class:`Decoder` for ``steps`` greedy tokens."""
    return Decoder(model, prompt, steps, extra)


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


@dataclasses.dataclass
class Timings:
    """Raw seconds of one variant, in the order measured: ``prefill[length]`` one per timed round,
    ``decode_steps`` one per decoding step (round by round, ``tokens`` per round)."""

    prefill: dict[str, list[float]]
    decode_steps: list[float]
    tokens: int

    def decode_runs(self) -> list[float]:
        """Each round's decoding time: the sum of its steps."""
        steps = self.decode_steps
        return [sum(steps[i : i + self.tokens]) for i in range(0, len(steps), self.tokens)]


def _measure(
    model: torch.nn.Module,
    variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
    lengths: list[int],
    decode_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Timings]]:
    """Time every variant of ``model`` (each a context that puts the model in that state), interleaved
    call by call: in every round, each prompt length is prefilled by every variant back to back, then
    the variants take their decoding steps in turn (step ``t`` of every variant before step ``t + 1``
    of any). The order of the variants alternates from one pair of calls to the next, so neither is
    always measured first. Calls timed seconds apart see different machines (a shared CPU's speed was
    measured drifting by 20% over seconds); calls tens of milliseconds apart see the same one, which
    is what makes their ratio steady (:func:`compare_speed`)."""
    from algorithms.models.placement import input_device

    device = input_device(model)
    extra = _prefill_kwargs(model)
    prefills: dict[str, dict[str, Callable[[], Any]]] = {}
    decoders: dict[str, Decoder] = {}
    static: dict[str, dict[str, Any]] = {}
    for name, enter in variants.items():  # build each variant's calls (and its decode cache) in its state
        with enter() as m:
            prefills[name] = {}
            for length in lengths:
                ids = _prompt(m, length, seed, device)
                prefills[name][str(length)] = lambda m=m, ids=ids: m(ids, use_cache=True, **extra)
            decoders[name] = decode_steps(m, _prompt(m, lengths[0], seed, device), decode_tokens, extra)
            static[name] = {"params": count_parameters(m), "weight_bytes": weight_bytes(m)}
    times = {name: Timings({str(n): [] for n in lengths}, [], decode_tokens) for name in variants}
    peaks: dict[str, int] = dict.fromkeys(variants, 0)
    order = list(variants)
    calls = 0

    def each_variant() -> Iterator[str]:  # the next pair of calls, in alternating order
        nonlocal calls
        calls += 1
        yield from (order if calls % 2 else order[::-1])

    def timed(name: str, fn: Callable[[], Any]) -> float:
        with variants[name]():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _seconds(fn, device)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], int(torch.cuda.max_memory_allocated(device)))
        return seconds

    for round_ in range(warmup + repeats):
        keep = round_ >= warmup
        for length in map(str, lengths):
            for name in each_variant():
                seconds = timed(name, prefills[name][length])
                if keep:
                    times[name].prefill[length].append(seconds)
        for name in variants:
            decoders[name].reset()  # untimed: a fresh copy of the cache after the prompt
        for _ in range(decode_tokens):
            for name in each_variant():
                seconds = timed(name, decoders[name].step)
                if keep:
                    times[name].decode_steps.append(seconds)
    out = {}
    for name in variants:
        produced = decoders[name].produced
        if len(produced) != decode_tokens:  # pragma: no cover - every round decodes that many steps
            raise RuntimeError(f"{name}: decoded {len(produced)} tokens, expected {decode_tokens}")
        peak = peaks[name] if device.type == "cuda" else None
        out[name] = {
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),  # intra-op CPU threads: oversubscribed, timings mean little
            **static[name],
            "peak_bytes": peak,
            "peak_bytes_source": "torch.cuda.max_memory_allocated" if peak is not None else None,
            "prefill": {length: {f"{k}_s": v for k, v in _summary(t).items()}
                        for length, t in times[name].prefill.items()},
            "decode": {"prompt_length": lengths[0], "tokens": decode_tokens,
                       "tokens_per_s": _summary([decode_tokens / t for t in times[name].decode_runs()])},
            "repeats": repeats,
            "warmup": warmup,
        }
    return out, times


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
        out, _ = _measure(model, {"model": lambda: contextlib.nullcontext(model)}, lengths, decode_tokens,
                          repeats, warmup, seed)
    return out["model"]


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
    """The dense ``model`` and the model without ``removed`` blocks, measured interleaved call by call in
    this process: ``{"dense": ..., "pruned": ..., "speedup": paired_speedup(...)}`` (each side as
    :func:`measure_speed` returns it). ``transform(model, removed)`` is the context manager that
    removes the set (default: :func:`algorithms.models.masking.skip_blocks`)."""
    from algorithms.models.masking import skip_blocks

    lengths = _check_options(prompt_lengths, decode_tokens, repeats, warmup, threads)
    removed = sorted(set(removed))
    remove = transform or skip_blocks
    variants = {"dense": lambda: contextlib.nullcontext(model), "pruned": lambda: remove(model, removed)}
    with _evaluation_mode(model, threads):
        result, times = _measure(model, variants, lengths, decode_tokens, repeats, warmup, seed)
    return {**result, "speedup": paired_speedup(result["dense"], result["pruned"], times["dense"], times["pruned"])}


def _sizes(dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, float]:
    return {"params": pruned["params"] / dense["params"], "weight_memory": pruned["weight_bytes"] / dense["weight_bytes"]}


def _geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def paired_speedup(dense: dict[str, Any], pruned: dict[str, Any], dense_times: Timings,
                   pruned_times: Timings) -> dict[str, Any]:
    """Speedups from calls timed back to back (:func:`compare_speed`): the median over pairs of dense
    seconds / pruned seconds (> 1 is faster).

    ``prefill[length]``: over the ``repeats`` pairs of prefills of that length; ``prefill_mean``: their
    geometric mean over lengths; ``decode``: over the ``repeats × decode_tokens`` pairs of decoding
    steps (one token each, same position, same cache length), ``decode_iqr`` the spread of those
    ratios; ``params`` and ``weight_memory``: pruned / dense (< 1 is smaller). ``ratios`` keeps every
    paired ratio. Why pairs: on a shared 2-core VM the CPU's own speed drifted by 20% over seconds
    (thread CPU time moved with wall time, so nothing was descheduled). Each side's fastest of 9 whole
    runs, a run a third of a second, gave decode speedups of 0.96-1.19 for one block set; the median of
    paired steps, 1.11-1.13 (README, "Grid files").
    """
    ratios = {
        "prefill": {length: [d / p for d, p in zip(dense_times.prefill[length], pruned_times.prefill[length], strict=True)]
                    for length in dense_times.prefill},
        "decode": [d / p for d, p in zip(dense_times.decode_steps, pruned_times.decode_steps, strict=True)],
    }
    prefill = {length: statistics.median(r) for length, r in ratios["prefill"].items()}
    decode = _summary(ratios["decode"])
    return {"prefill": prefill, "prefill_mean": _geometric_mean(list(prefill.values())),
            "decode": decode["median"], "decode_iqr": decode["iqr"], **_sizes(dense, pruned),
            "estimator": "median of back-to-back pairs", "ratios": ratios}


def speedup(dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Ratios of two measurements from separate :func:`measure_speed` calls (same process, same options),
    for models :func:`compare_speed` cannot pair (e.g. a really pruned copy beside the dense model).

    ``prefill[length]`` = dense / pruned fastest latency (> 1 is faster), ``prefill_mean`` their
    geometric mean over lengths, ``decode`` = pruned / dense best tokens/s, ``params`` and
    ``weight_memory`` = pruned / dense (< 1 is smaller). Ratios use each side's fastest repeat, not
    its median: interference from other processes only ever adds time, so the minimum is the
    estimate least disturbed by it (as ``timeit`` advises). Measured seconds apart, these ratios are
    far noisier than :func:`paired_speedup`'s.
    """
    if set(dense["prefill"]) != set(pruned["prefill"]):
        raise ValueError(f"prompt lengths differ: dense {sorted(dense['prefill'])}, pruned {sorted(pruned['prefill'])}")
    if dense["decode"]["tokens"] != pruned["decode"]["tokens"]:
        raise ValueError(f"decode lengths differ: dense {dense['decode']['tokens']}, pruned {pruned['decode']['tokens']}")
    prefill = {length: dense["prefill"][length]["min_s"] / pruned["prefill"][length]["min_s"]
               for length in dense["prefill"]}
    return {
        "prefill": prefill,
        "prefill_mean": _geometric_mean(list(prefill.values())),
        "decode": pruned["decode"]["tokens_per_s"]["max"] / dense["decode"]["tokens_per_s"]["max"],
        **_sizes(dense, pruned),
    }


def expected_ceiling(n_blocks: int, n_removed: int) -> float:
    """Upper bound ``1 / (1 - r)`` on the speedup from removing ``n_removed`` of ``n_blocks`` blocks
    (``r`` = their share). The real speedup stays below it: embeddings, the final norm and the head
    remain, and at small sizes fixed per-call overheads do too."""
    check_int("n_blocks", n_blocks, 1)
    if isinstance(n_removed, bool) or not isinstance(n_removed, int) or not 0 <= n_removed < n_blocks:
        raise ValueError(f"n_removed must be an integer in [0, {n_blocks}), got {n_removed!r}")
    return n_blocks / (n_blocks - n_removed)
