"""The cost plan of a grid: what each model's cells will cost, from the model's config alone.

:func:`plan` estimates, per model and without loading a weight (the model is built on PyTorch's meta
device from its ``config.json``), the orders of magnitude a grid drives and which knob drives them;
:func:`check_memory` refuses a grid whose peak does not fit the device (``bench validate``, ``bench run``
and ``bench stability`` call :func:`validate_plan`, exit 2). Every figure is a short formula (``L``
blocks, ``d`` width, ``F`` MLP width, ``V`` vocabulary, ``S`` calibration samples, ``T`` their length,
``B`` calibration batch size):

- weights: parameters × bytes of the grid's ``dtype`` (tied tensors counted once);
- hidden states of one calibration group: ``depths × S × T × d × 4`` bytes (float32, 2 with
  ``state_dtype: float16`` or ``bfloat16``; ``depths`` is
  ``L + 1``, or ``2L + 1`` when the grid removes attention or MLP branches), held on the CPU and copied
  once to the device when a metric scores hidden states; with ``scoring: streamed`` instead what the
  streamed metrics keep (:func:`_fill_stream`), the states only when a metric cannot stream;
- activations of one calibration batch: ``B × T × max(MLP_COPIES × max(d, F), V) × 4`` bytes plus
  ``2 × CHUNK_ROWS × V × 4`` (a block's MLP, or the NLL's logits of the predicted positions and one chunk
  of their log-probabilities, :mod:`algorithms.models.nll`);
- ``taylor`` adds a gradient and a float32 accumulator per weight: parameters × (dtype bytes + 4);
- activations of one evaluation batch (perplexity, KL): as a calibration batch's, with the
  evaluation's ``batch_size`` and ``seq_len`` (KL forms its log-probabilities in the same chunks); the
  largest of all activations is in the peak;
- what perplexity and KL keep on the host between sets: the dense states entering each block
  (``L × max_windows × seq_len × d`` × dtype bytes, within ``prefix_memory_mb``), the states of sets
  measured before (within ``prefix_sets_mb``, at most one dense-sized copy per pruned set) and KL's dense
  log-probabilities (``max_windows × (seq_len - 1) × V × 4``); in the peak when the device is the
  host's memory (a CPU grid), where they sit beside everything else;
- peak on the device (capture, scoring and evaluation): weights + hidden states (when scored there) +
  the larger activations (+ taylor's gradients) (+ the evaluations' host memory on a CPU grid); a
  model with ``device_map`` has its weights placed by accelerate (within its ``max_memory``), so they
  are left out of the peak;
- calibration windows forwarded: capture ``S`` per group; ``ppl`` ``(L + 1) × S`` and ``taylor`` ``S``
  (forward and backward) per group and unit kind; a search selector with the ``loss`` objective its
  worst-case number of evaluated sets × ``S`` per cell (:func:`search_evaluations`; the proxies run no
  model); objectives are memoised per group, so the real count is often far lower;
- block sets to evaluate: at most one per cell, plus the dense model once;
- held-out windows: perplexity ``max_windows`` per set (dense included), KL ``max_windows`` per pruned
  set plus its dense reference; speed ``2 × (warmup + repeats) × (prompt lengths + decode_tokens)``
  timed forward passes per pruned set; accuracy ``tasks × limit`` documents per set (lm-eval sends one
  or more requests per document: a multiple-choice document one per choice); generation
  ``prompts × new_tokens`` decoding steps per set (the dense model included). Perplexity and KL
  keep their shared prefix on the host (above), not on a CUDA device.

These are estimates: their point is the order of magnitude and the knob, not the byte. A zoo model not
built yet is planned from the sizes its recipe records (:class:`algorithms.models.zoo.ModelRecipe`); a
model whose config is not on disk otherwise (a hub id) is "unknown until loaded" and not checked.

Device memory: free CUDA memory (``torch.cuda.mem_get_info``) for a CUDA grid, otherwise the machine's
available RAM (``MemAvailable`` of ``/proc/meminfo``, or ``psutil``); the environment variable
``BLOCKBENCH_DEVICE_MEMORY`` (bytes, or a size such as ``24GB`` or ``80GiB``) overrides it, to plan for
another machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.config import ConfigError, GridConfig

#: a block's MLP holds this many ``(B, T, F)`` float32 tensors at once (gate, up, their product); the
#: NLL and KL hold one ``(B, T - 1, V)`` logits tensor and a chunk of log-probabilities
MLP_COPIES = 3
#: the environment variable that overrides the detected device memory
MEMORY_ENV = "BLOCKBENCH_DEVICE_MEMORY"
#: memo of parameter counts per config.json, so validating an unchanged grid builds no model again
PLAN_MEMO = "plan-parameters.json"
_MEMO_KEPT = 256
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class ModelPlan:
    """What one model's cells will cost (None: not known before the model is loaded)."""

    index: int
    name: str
    dtype: str
    n_blocks: int | None = None
    width: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None
    weight_bytes: int | None = None
    #: calibration groups (variants × seeds), each captured once
    groups: int = 0
    depths: int | None = None
    #: hidden states of the largest calibration group, and the config keys of its samples and seq_len
    state_bytes: int | None = None
    state_keys: tuple[str, str] = ("calibration.samples", "calibration.seq_len")
    state_samples: int = 0
    state_seq_len: int = 0
    #: whether a metric scores hidden states (they are then copied to the device)
    states_on_device: bool = True
    #: ``scoring: streamed``: whether a metric still needs the states stored (it cannot stream), and what
    #: the streamed metrics of one group keep (:mod:`estimators.streaming`) plus one capture batch
    states_stored: bool = True
    stream_bytes: int = 0
    #: the grid's ``state_dtype``: what the states are kept in
    state_dtype: str = "float32"
    activation_bytes: int | None = None
    #: one evaluation batch's activations (the largest of perplexity's and KL's) and the knob for it
    evaluation_activation_bytes: int = 0
    evaluation_knob: str = ""
    #: what perplexity and KL keep on the host between sets (shared prefix, KL's dense log-probabilities)
    host_bytes: int = 0
    #: the device is the host's memory (not CUDA): ``host_bytes`` is in the peak
    host_device: bool = True
    taylor_bytes: int = 0
    #: the model sets ``device_map``: accelerate places its weights (within ``max_memory``), so they are
    #: not in the peak of the device that captures and scores
    dispatched: bool = False
    peak_bytes: int | None = None
    cells: int = 0
    #: at most this many distinct block sets are evaluated (the dense model included)
    block_sets: int = 0
    #: calibration windows forwarded: capture, model metrics, search selectors (None: a plugin's, unknown)
    calibration_windows: dict[str, int | None] = field(default_factory=dict)
    #: per evaluation, over every block set: held-out windows (perplexity, kl), timed forward passes
    #: (speed), lm-eval documents (accuracy); None: unknown (a plugin's, a task without a limit not on disk)
    evaluation_passes: dict[str, int | None] = field(default_factory=dict)
    note: str | None = None

    @property
    def known(self) -> bool:
        return self.peak_bytes is not None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state_keys": list(self.state_keys)}

    def terms(self) -> list[tuple[str, int, str]]:
        """The peak's terms ``(what, bytes, knob)``, largest first."""
        activations, knob = self.activation_bytes or 0, "calibration.batch_size"
        if self.evaluation_activation_bytes > activations:
            activations, knob = self.evaluation_activation_bytes, self.evaluation_knob
        out = [("weights", 0 if self.dispatched else self.weight_bytes or 0, "dtype"),
               ("hidden states", self.state_bytes if self.states_on_device and self.states_stored else 0, "states"),
               ("streamed scoring", self.stream_bytes, "stream"),
               ("activations", activations, knob),
               ("evaluations' shared prefix", self.host_bytes if self.host_device else 0, "prefix"),
               ("taylor gradients", self.taylor_bytes, "taylor")]
        return sorted((t for t in out if t[1]), key=lambda t: -t[1])


def human_bytes(n: float | None) -> str:
    """``696 GB``, ``12.6 MB``: three significant digits, decimal units."""
    if n is None:
        return "?"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def human_count(n: float | None) -> str:
    """``70.6 B``, ``135 M``, ``1,536``."""
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n):,}"


# ----------------------------------------------------------------------------------------- the model
def _folder(name: str) -> Path | None:
    """The model's folder when its config.json is on disk (a local folder, a zoo model built before)."""
    from algorithms.models.zoo import MODELS, cache_root

    folder = cache_root() / "models" / name if name in MODELS else Path(name).expanduser()
    return folder if (folder / "config.json").is_file() else None


def _config_int(data: dict[str, Any], *keys: str) -> int | None:
    data = data.get("text_config", data) if isinstance(data.get("text_config"), dict) else data
    for key in keys:
        if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
            return data[key]
    return None


def count_parameters(folder: Path) -> int:
    """Parameters of the model in ``folder`` built on the meta device from its config.json (no weight
    read), memoised under ``cache_root()/plan-parameters.json`` by the config's bytes and the transformers
    version. Raises whatever transformers raises for a config it cannot build."""
    from importlib.metadata import version

    raw = (folder / "config.json").read_bytes()
    key = hashlib.sha256(raw + b"\0" + version("transformers").encode()).hexdigest()[:32]
    from bench.store import read_memo

    path, memo = read_memo(PLAN_MEMO)
    if isinstance(memo.get(key), int):
        return memo[key]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from algorithms.models.blocks import count_parameters as count

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    n = count(model)
    memo.pop(key, None)
    memo[key] = n
    memo = dict(list(memo.items())[-_MEMO_KEPT:])
    from bench.store import write_bytes_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(memo, indent=0).encode())
    except OSError:  # an unwritable memo only costs the next build
        pass
    return n


# ----------------------------------------------------------------------------------------- selectors
def search_evaluations(selector: Any, n_blocks: int, protected: frozenset[int], k: int) -> int | None:
    """The most sets a selector asks its objective for, on ``n_blocks`` with ``protected`` and ``k``:
    ``topk`` 0; ``iterative`` ``sum_{j<k} (n - j)``; ``span`` the runs of ``k`` free blocks
    (``<= L - k + 1``); ``exhaustive`` ``C(n, k)``; ``ising`` ``1 + n + pairs`` (``adjacent``: pairs at most
    ``window`` apart, ``~ n × window``; ``all``: ``C(n, 2)``; ``top``: ``C(candidates, 2)``); ``optuna``
    ``trials``; ``fbs`` ``1 + max_iters × (candidates + 1)``. ``n`` is the free blocks. None for a
    plugin's selector (unknown)."""
    from algorithms.ising import Ising, measured_pairs
    from algorithms.selectors import Exhaustive, FastBlockSelect, Iterative, OptunaSearch, Span, TopK

    free = [b for b in range(n_blocks) if b not in protected]
    n = len(free)
    if type(selector) is TopK:
        return 0
    if type(selector) is Iterative:
        return sum(n - j for j in range(k))
    if type(selector) is Span:
        return sum(1 for s in range(n_blocks - k + 1) if not any(b in protected for b in range(s, s + k)))
    if type(selector) is Exhaustive:
        return math.comb(n, k)
    if type(selector) is Ising:
        zeros = dict.fromkeys(free, 0.0)
        return 1 + n + len(measured_pairs(free, zeros, selector.pairs, selector.window, selector.candidates))
    if type(selector) is OptunaSearch:
        return selector.trials
    if type(selector) is FastBlockSelect:
        return 1 + selector.max_iters * (selector.candidates + 1)
    return None


def _costs_forward_passes(selector: Any) -> bool:
    """Whether a selector's objective runs the model (the ``loss``; the proxies cost microseconds)."""
    return getattr(selector, "objective", None) == "loss"


# ----------------------------------------------------------------------------------------- the plan
def plan(config: GridConfig, cells: list | None = None) -> list[ModelPlan]:
    """One :class:`ModelPlan` per model of ``config`` (``cells``: its expanded cells, computed when not
    given). Reads config.json files only; the grid is assumed valid (:func:`bench.grid.validate`)."""
    from algorithms.models.zoo import MODELS, model_block_count, model_width
    from bench.grid import component_spec, device_type, expand, is_model_metric, method_presets

    cells = expand(config) if cells is None else cells
    presets = method_presets(config)
    variants = config.calibration_variants()
    groups = len(variants) * len(config.calibration.seeds)
    sublayers = (bool(config.metrics) and any(u != "block" for u in config.units)) or any(
        p.unit != "block" for p in presets)
    metric_names = [m.name for m in config.metrics] + [component_spec(p.metric).name for p in presets]
    # on a CUDA device the states are copied there only for a metric that scores them; elsewhere they
    # are in the same memory whatever scores them
    on_device = device_type(config.device) != "cuda" or any(not is_model_metric(n) for n in metric_names)
    taylor = "taylor" in metric_names
    out = []
    for i, model in enumerate(config.models):
        p = ModelPlan(index=i, name=model.name, dtype=config.dtype, groups=groups, states_on_device=on_device,
                      state_dtype=config.state_dtype, host_device=device_type(config.device) != "cuda",
                      dispatched=model.device_map is not None)
        mine = [c for c in cells if c.model["name"] == model.name]
        p.cells = len(mine)
        p.block_sets = len(mine) + 1
        try:
            p.n_blocks, p.width = model_block_count(model.name), model_width(model.name)
        except (ValueError, OSError):
            pass
        folder = _folder(model.name)
        data: dict[str, Any] = {}
        if folder is not None:
            try:
                data = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                data = {}
        p.intermediate_size = _config_int(data, "intermediate_size", "n_inner", "ffn_dim")
        p.vocab_size = _config_int(data, "vocab_size")
        recipe = MODELS.get(model.name) if model.name in MODELS else None
        if folder is None and recipe is not None and recipe.parameters is not None:
            # a zoo model not built yet: its recipe records the sizes of the model it builds
            p.intermediate_size, p.vocab_size = recipe.intermediate_size, recipe.vocab_size
            p.parameters = recipe.parameters
        elif folder is None:
            p.note = "unknown until built" if recipe is not None else "unknown until loaded"
        elif model.trust_remote_code:
            p.note = "unknown until loaded (the model ships its own code)"
        else:
            try:
                p.parameters = count_parameters(folder)
            except Exception as exc:  # noqa: BLE001 - a config transformers cannot build: known once loaded
                p.note = f"unknown until loaded (config.json builds no model here: {type(exc).__name__})"
        if p.parameters is not None:
            p.weight_bytes = p.parameters * DTYPE_BYTES[config.dtype]
            p.taylor_bytes = p.parameters * (DTYPE_BYTES[config.dtype] + 4) if taylor else 0
        if p.n_blocks is not None and p.width is not None:
            _fill_sizes(p, config, variants, sublayers)
            _fill_passes(p, config, mine)
            if config.scoring == "streamed":
                _fill_stream(p, config, mine)
            _fill_evaluation_memory(p, config)
        if p.parameters is not None and p.state_bytes is not None and p.activation_bytes is not None:
            p.peak_bytes = sum(size for _, size, _ in p.terms())
        _fill_evaluations(p, config)
        out.append(p)
    return out


def _fill_sizes(p: ModelPlan, config: GridConfig, variants: list, sublayers: bool) -> None:
    assert p.n_blocks is not None and p.width is not None
    p.depths = 2 * p.n_blocks + 1 if sublayers else p.n_blocks + 1
    largest = max(variants, key=lambda v: v[0]["samples"] * v[0]["seq_len"])
    variant, keys = largest
    p.state_bytes = p.depths * variant["samples"] * variant["seq_len"] * p.width * DTYPE_BYTES[config.state_dtype]
    p.state_keys = (keys["samples"], keys["seq_len"])
    p.state_samples, p.state_seq_len = variant["samples"], variant["seq_len"]
    longest = max(v["seq_len"] for v, _ in variants)
    p.activation_bytes = batch_activation_bytes(p, config.calibration.batch_size, longest)


def batch_activation_bytes(p: ModelPlan, batch: int, seq_len: int) -> int:
    """The largest activations of one forward batch of ``batch × seq_len`` tokens, float32: a block's MLP
    (:data:`MLP_COPIES` ``(B, T, max(d, F))`` tensors) or the ``(B, T, V)`` logits, plus one chunk of
    log-probabilities and its float32 input (:mod:`algorithms.models.nll`)."""
    from algorithms.models.nll import CHUNK_ROWS

    assert p.width is not None
    vocab = p.vocab_size or 0
    mlp = MLP_COPIES * max(p.width, p.intermediate_size or 0)
    return batch * seq_len * max(mlp, vocab) * 4 + 2 * CHUNK_ROWS * vocab * 4


def _fill_stream(p: ModelPlan, config: GridConfig, cells: list) -> None:
    """What streamed scoring keeps per group: per streamed metric and stream, ``tokens`` sums (small),
    ``moments`` ``(depths + (depths - 1) k) d²`` float64 sums (``k``: the longest span, the cell's budget;
    one set per stream, shared by every moment metric), a ``sample`` ``depths × n_tokens × d`` floats (one
    per stream, ``n_tokens`` and seed); plus one capture batch of every depth. The states stay stored
    only when a hidden-state metric cannot stream."""
    from bench.grid import is_model_metric

    assert p.n_blocks is not None and p.width is not None and p.depths is not None
    streams: dict[str, tuple[Any, int, int]] = {}  # key -> (metric, depths, longest span)
    p.states_stored = False
    for cell in cells:
        if cell.stream_kind is None:
            p.states_stored = p.states_stored or not is_model_metric(cell.metric.name)
            continue
        depths = p.n_blocks + 1 if cell.unit == "block" else 2 * p.n_blocks + 1
        try:
            k = 1 if cell.unit in ("attention", "mlp") else cell.resolve_k(p.n_blocks)
        except (KeyError, TypeError, ValueError):  # a params budget: known once loaded; the worst case
            k = depths - 1
        key = cell.stream_key
        metric = streams[key][0] if key in streams else _metric_of(cell)
        streams[key] = (metric, depths, max(k, streams[key][2] if key in streams else 1))
    # metrics that keep the same state share it (estimators.streaming.shared_accumulators), kept for the
    # longest span any of them needs: the moments of every token per stream, a token sample per stream,
    # n_tokens and seed; token sums are each metric's own
    longest: dict[tuple, int] = {}
    for metric, depths, k in streams.values():
        kind = metric.stream_kind()
        key = (kind, depths, *(metric.sample_spec() if kind == "sample" else ()), *((id(metric),) if kind == "tokens" else ()))
        longest[key] = max(longest.get(key, 1), min(k, depths - 1))
    tokens = p.state_samples * p.state_seq_len
    total = 0
    for (kind, depths, *rest), k in longest.items():
        if kind == "moments":
            total += (depths + (depths - 1) * k) * p.width**2 * 8
        elif kind == "sample":
            total += depths * min(rest[0] or tokens, tokens) * p.width * DTYPE_BYTES[config.state_dtype]
        else:
            total += (depths - 1) * k * 8
    if streams:  # the batch every consumer sees
        total += p.depths * config.calibration.batch_size * p.state_seq_len * p.width * DTYPE_BYTES[config.state_dtype]
    p.stream_bytes = total


def _metric_of(cell: Any) -> Any:
    from bench.grid import metric_class

    return metric_class(cell.metric.name)(**cell.metric.params)


def _fill_passes(p: ModelPlan, config: GridConfig, cells: list) -> None:
    """Calibration windows forwarded by capture, model metrics and search selectors."""
    from algorithms.selectors import SELECTORS
    from bench.grid import canonical_json, is_model_metric

    assert p.n_blocks is not None
    capture = metrics = 0
    search: int | None = 0
    seen_groups: set[str] = set()
    scored: set[str] = set()
    for cell in cells:
        group = canonical_json(cell.calibration)
        samples = cell.calibration["samples"]
        if group not in seen_groups:
            seen_groups.add(group)
            capture += samples
        if is_model_metric(cell.metric.name):
            key = canonical_json([group, cell.metric_identity, cell.unit])
            if key not in scored:  # scores are computed once per group, metric and unit kind
                scored.add(key)
                metrics += (p.n_blocks + 1) * samples if cell.metric.name == "ppl" else samples
        selector = SELECTORS.get(cell.selector.name)(**cell.selector.params)
        if not _costs_forward_passes(selector) or search is None:
            continue
        try:
            k = cell.resolve_k(p.n_blocks, *_unit_sizes(config, p, cell))
        except ConfigError:
            search = None
            continue
        evaluations = search_evaluations(selector, p.n_blocks, cell.resolve_protected(p.n_blocks), k)
        search = None if evaluations is None else search + evaluations * samples
    p.calibration_windows = {"capture": capture, "model metrics": metrics, "search": search}


def _unit_sizes(config: GridConfig, p: ModelPlan, cell: Any) -> tuple[list[int] | None, int | None]:
    """Per-unit parameter counts and the total, for a ``params`` budget (built on the meta device)."""
    if "params" not in cell.budget:
        return None, None
    from bench.grid import unit_sizes as sizes

    return sizes(config, [("units", cell.unit)], p.index, p.name).get(cell.unit, (None, None))


def _fill_evaluation_memory(p: ModelPlan, config: GridConfig) -> None:
    """Perplexity's and KL's batch activations and what they keep on the host between sets (see the
    module's formulas): the dense states within ``prefix_memory_mb``, measured sets' within
    ``prefix_sets_mb``, KL's dense log-probabilities."""
    assert p.n_blocks is not None and p.width is not None
    pruned = max(p.block_sets - 1, 0)
    for name in ("perplexity", "kl"):
        params = config.evaluations.get(name)
        if params is None:
            continue
        activations = batch_activation_bytes(p, params.batch_size, params.seq_len)
        if activations > p.evaluation_activation_bytes:
            p.evaluation_activation_bytes, p.evaluation_knob = activations, f"{name}.batch_size"
        budget = int(params.prefix_memory_mb * 2**20)
        if params.max_windows is None:  # every window of the text: as much as the budget allows
            dense = budget
        else:
            dense = min(budget, p.n_blocks * params.max_windows * params.seq_len * p.width
                        * DTYPE_BYTES[config.dtype])
        earlier = min(int(params.prefix_sets_mb * 2**20), pruned * dense) if dense else 0
        p.host_bytes += dense + earlier
        if name == "kl":
            p.host_bytes += params.max_windows * (params.seq_len - 1) * (p.vocab_size or p.width) * 4


def _fill_evaluations(p: ModelPlan, config: GridConfig) -> None:
    pruned = p.block_sets - 1
    passes: dict[str, int | None] = {}
    for name, params in config.evaluations.items():
        if name == "perplexity":
            passes[name] = None if params.max_windows is None else params.max_windows * p.block_sets
        elif name == "kl":
            passes[name] = params.max_windows * (pruned + 1)  # every pruned set, and the dense reference
        elif name == "speed":
            passes[name] = 2 * (params.warmup + params.repeats) * (len(params.prompt_lengths)
                                                                   + params.decode_tokens) * pruned
        elif name == "generation":
            passes[name] = params.prompts * params.new_tokens * p.block_sets
        elif name == "accuracy":
            documents = _documents(params)
            passes[name] = None if documents is None else documents * p.block_sets
        else:
            passes[name] = None  # a plugin's: unknown
    p.evaluation_passes = passes


def _documents(params: Any) -> int | None:
    """Documents of one accuracy run: ``tasks × limit``, or each task's document count without a limit."""
    if params.limit is not None:
        return len(params.tasks) * params.limit
    from algorithms.evaluations.lmeval import task_info

    total = 0
    for task in params.tasks:
        local = {name: f.source() for name, f in params.task_files.items()}
        try:
            rows = task_info(task, local)["rows"]
        except Exception:  # noqa: BLE001 - a task whose data is not on disk yet
            return None
        if rows is None:
            return None
        total += rows
    return total


# ----------------------------------------------------------------------------------------- memory
def parse_size(text: str) -> int:
    """Bytes from ``25769803776``, ``24GB``, ``24 GiB``, ``1.5e9``; ``ValueError`` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{MEMORY_ENV}={text!r} is not a size: give bytes or e.g. 24GB, 80GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def device_memory(config: GridConfig) -> tuple[int | None, str]:
    """``(bytes, where)`` the grid's device has for capture, scoring and evaluation: :data:`MEMORY_ENV`
    when set, free CUDA memory for a CUDA grid, else the machine's available RAM; ``(None, ...)`` when
    unknown."""
    from bench.grid import device_type

    kind = device_type(config.device)
    if (given := os.environ.get(MEMORY_ENV)) is not None:
        try:
            return parse_size(given), f"the {kind} has {human_bytes(parse_size(given))} ({MEMORY_ENV})"
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind == "cuda":
        import torch

        index = int(config.device.partition(":")[2] or 0) if config.device.startswith("cuda:") else 0
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"cuda:{index} has {human_bytes(free)} free"
    available = _available_ram()
    where = "the cpu" if kind == "cpu" else f"the {kind} (shared with the cpu)"
    return available, f"{where} has {human_bytes(available)} available"


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _advice(p: ModelPlan, config: GridConfig, knob: str) -> str:
    if knob == "states":
        return f"lower {p.state_keys[0]} or {p.state_keys[1]}" + (
            "" if config.scoring == "streamed" else ", or set scoring: streamed")
    if knob == "stream":
        return ("score fewer moment metrics (mi_gauss, cka_linear: (L + 1 + L·k) d×d float64 sums each) "
                "or lower their n_tokens (sample metrics)")
    if knob == "taylor":
        return "drop the taylor metric"
    if knob == "prefix":
        return ("lower prefix_memory_mb and prefix_sets_mb of perplexity and kl (they change speed, not the "
                "numbers)")
    if knob.endswith(".batch_size"):
        return f"lower {knob}"
    return "set dtype: bfloat16" if DTYPE_BYTES[config.dtype] > 2 else "choose a smaller model"


def check_memory(config: GridConfig, plans: list[ModelPlan], available: int | None, where: str) -> None:
    """:class:`ConfigError` naming the model and the knob to turn when a plan's peak exceeds ``available``
    bytes (``where`` says whose, e.g. ``the cpu has 24 GB available``); nothing when unknown."""
    if available is None:
        return
    for p in plans:
        if p.peak_bytes is None or p.peak_bytes <= available:
            continue
        parts = []
        for what, size, knob in p.terms():
            if knob == "states":
                extra = f": {p.state_keys[0]} × {p.state_keys[1]}"
            elif knob == "stream":
                extra = " (scoring: streamed)"
            elif knob == "dtype":
                extra = f" at {config.dtype}"
            elif knob.endswith(".batch_size"):
                extra = f": {knob}"
            elif knob == "prefix":
                extra = ": prefix_memory_mb + prefix_sets_mb"
            else:
                extra = ""
            parts.append(f"{what} {human_bytes(size)}{extra}")
        raise ConfigError(
            f"models[{p.index}] = {p.name!r}: the plan needs {human_bytes(p.peak_bytes)} of memory for capture, "
            f"scoring and evaluation ({', '.join(parts)}), {where}: {_advice(p, config, p.terms()[0][2])}, or run on a "
            "larger device")


def validate_plan(config: GridConfig, cells: list | None = None) -> tuple[list[ModelPlan], str]:
    """The grid's plan, checked against the device's memory; returns the plans and what the device has."""
    plans = plan(config, cells)
    available, where = device_memory(config)
    check_memory(config, plans, available, where)
    return plans, where


# ----------------------------------------------------------------------------------------- display
def _windows(p: ModelPlan) -> str:
    return ", ".join(f"{k} {human_count(v)}" for k, v in p.calibration_windows.items() if v != 0) or "–"


def summary_line(p: ModelPlan) -> str:
    """One line of a model's plan (``bench run``)."""
    if p.parameters is None:
        head = f"parameters {p.note or 'unknown'}"
    else:
        head = f"{human_count(p.parameters)} parameters ({human_bytes(p.weight_bytes)} at {p.dtype}"
        head += ", placed by device_map)" if p.dispatched else ")"
    held = (f"hidden states {human_bytes(p.state_bytes)}" if p.states_stored
            else f"streamed scoring {human_bytes(p.stream_bytes)} (no states stored)")
    return (f"plan: {p.name}: {head}, {held} per group × {p.groups}, "
            f"peak ~{human_bytes(p.peak_bytes)}; {p.cells} cells, ≤ {p.block_sets} block sets; "
            f"calibration windows: {_windows(p)}")


def table(p: ModelPlan, where: str) -> Any:
    """A compact rich table of one model's plan (``bench validate``)."""
    from rich.table import Table

    t = Table(title=f"plan: {p.name}", title_justify="left", show_header=True)
    t.add_column("estimate", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("from", overflow="fold")
    if p.parameters is None:
        t.add_row("parameters", p.note or "unknown", "")
    else:
        shape = f" ({p.n_blocks} blocks, d {p.width}, F {p.intermediate_size or '?'}, V {p.vocab_size or '?'})"
        t.add_row("parameters", f"{p.parameters:,}", "config.json on the meta device" + shape)
        t.add_row("weights", human_bytes(p.weight_bytes), f"{DTYPE_BYTES[p.dtype]} B each ({p.dtype})")
    if p.state_bytes is not None:
        t.add_row("hidden states / group", human_bytes(p.state_bytes),
                  f"{p.depths} depths × {p.state_samples} × {p.state_seq_len} × {p.width} × "
                  f"{DTYPE_BYTES[p.state_dtype]} B ({p.state_dtype}) "
                  f"({p.state_keys[0]} × {p.state_keys[1]}); {p.groups} group(s)")
        t.add_row("activations / batch", human_bytes(p.activation_bytes),
                  f"calibration.batch_size × seq_len × max({MLP_COPIES}·max(d, F), V) × 4 B + a chunk of "
                  "log-probs")
    if p.stream_bytes:
        stored = "states stored too (a metric cannot stream)" if p.states_stored else "no states stored"
        t.add_row("streamed scoring / group", human_bytes(p.stream_bytes),
                  f"moments (L+1+L·k)·d²·8 B, samples depths·n_tokens·d·4 B, one batch; {stored}")
    if p.evaluation_activation_bytes:
        t.add_row("evaluation activations / batch", human_bytes(p.evaluation_activation_bytes),
                  f"{p.evaluation_knob} × seq_len × max({MLP_COPIES}·max(d, F), V) × 4 B + a chunk")
    if p.host_bytes:
        t.add_row("evaluations' shared prefix (host)", human_bytes(p.host_bytes),
                  "dense states within prefix_memory_mb + measured sets' within prefix_sets_mb (+ kl's dense "
                  "log-probs)" + ("; in the peak: the device is the host" if p.host_device else "; not on the GPU"))
    if p.taylor_bytes:
        t.add_row("taylor gradients", human_bytes(p.taylor_bytes), "parameters × (dtype bytes + 4)")
    if p.peak_bytes is not None:
        states = ("states + " if p.states_on_device and p.states_stored else "") + (
            "streamed scoring + " if p.stream_bytes else "")
        weights = "(weights placed by device_map) " if p.dispatched else "weights + "
        prefix = " + shared prefix" if p.host_device and p.host_bytes else ""
        t.add_row("peak (capture, scoring, evaluation)", human_bytes(p.peak_bytes),
                  f"{weights}{states}the larger activations{prefix}; {where}")
    t.add_row("cells / block sets", f"{p.cells} / ≤ {p.block_sets}", "one set per cell at most, dense once")
    if p.calibration_windows:
        t.add_row("calibration windows", _windows(p), "capture S per group, ppl (L+1)·S, search: worst-case sets × S")
    for name, n in p.evaluation_passes.items():
        what = _EVALUATION_UNITS.get(name, "passes (a plugin's: unknown)")
        t.add_row(name, human_count(n), what)
    return t


_EVALUATION_UNITS = {
    "perplexity": "held-out windows: max_windows × block sets",
    "kl": "held-out windows: max_windows × (pruned sets + dense reference)",
    "speed": "timed forward passes: 2 × (warmup + repeats) × (prompt lengths + decode_tokens) × pruned sets",
    "accuracy": "lm-eval documents: tasks × limit × block sets",
    "generation": "decoding steps: prompts × new_tokens × block sets",
}
