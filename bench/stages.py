"""The stages of a cell, as public typed steps: load → capture → score → select → transform →
evaluate → record.

Read this first. A grid is a list of :class:`~bench.grid.Cell`; an executor (:mod:`bench.executors`)
decides *where* cells run, and every executor calls the same steps of one :class:`Pipeline`:

================  ==============================================  ================================
step              what it returns                                 shared by / cached under
================  ==============================================  ================================
``load``          :class:`LoadedModel` (model, tokenizer, info)   every cell of a model
``capture``       :class:`CapturedStates` (hooks on the blocks)   a calibration group; cache/hidden
``score``         :class:`Scores` (one per block, float64)        (states, metric); cache/scores
``select``        :class:`Selection` (the removed blocks)         per cell
``transform``     the model with the set removed (a context)      —
``evaluate``      :class:`SetEvaluation` (every evaluation)       (model, block set);
                                                                  cache/evaluations/<name>
``complete``      the cell's :class:`~bench.records.CellRecord`   records/<cell_id>.json
================  ==============================================  ================================

:meth:`Pipeline.select_cell` runs load → select for one cell and returns a record with status
``selected`` (or ``failed``); :meth:`Pipeline.evaluate` runs transform → evaluate for one block set
(``()`` is the dense model); :meth:`Pipeline.complete` joins them into the finished record. A failure
in any step becomes a failed record naming its stage; the grid goes on. "Any" includes a plugin that
calls ``sys.exit`` (:data:`CELL_FAILURES`); only ``KeyboardInterrupt`` (Ctrl-C) stops the grid.

*Trust*: a cache entry is used only when it verifies (its key and checksum, :mod:`bench.store`) and
holds what its step needs (hidden states of the group's shape, one finite score per block, an
evaluation result that is a mapping); anything else is a miss, computed again with a warning naming
the file.

*Identity*: every cache key hashes what decides the number it holds: the model's content fingerprint,
the resolved parameters and ``version`` of the metric or evaluation, the dtype, the device type, the
data's fingerprint, and for machine-dependent evaluations (speed) the machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from algorithms.evaluations import EVALUATIONS, EvalTarget, Evaluation
from algorithms.selectors import SELECTORS, SelectionProblem
from bench import __version__
from bench.config import NO_HEALING, ComponentSpec, GridConfig
from bench.grid import (
    PROTOCOL_VERSION,
    Cell,
    calibration_label,
    canonical_json,
    is_model_metric,
    metric_class,
    short_hash,
)
from bench.progress import Reporter
from bench.records import (
    CellRecord,
    EvaluationOutcome,
    HealingOutcome,
    Labels,
    ModelInfo,
    Parameters,
    SelectorOutcome,
)
from bench.store import ResultStore

#: objectives every chosen set is scored on in its record (lower = better set to remove)
PROXY_OBJECTIVES = ("proxy_sum", "proxy_span")
#: a hidden-state cache entry at least this large is announced before it is written
LARGE_CACHE_BYTES = 256 * 1024 * 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """The torch device a grid's ``device`` names (``auto``: CUDA when available, else the CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


class Timer:
    """Wall-clock timings per stage; synchronises CUDA so GPU work is inside the interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------- environment
def git_state(folder: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout blockbench runs from (asv-style): ``dirty`` is True when
    tracked files differ from the commit. ``(None, None)`` outside a git checkout (an installed wheel)."""
    cwd = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=5, check=False).stdout.strip()
        if not commit:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=False)
        return commit, bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, package versions and commit (with its ``dirty`` flag), recorded in every record."""
    versions = {}
    for pkg in ("torch", "transformers", "numpy", "safetensors", "lm_eval"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit, dirty = git_state()
    commit_of = "package" if commit else None
    if commit is None and _is_blockbench_checkout(Path.cwd()):  # `pip install .`, run from the clone
        commit, dirty = git_state(Path.cwd())
        commit_of = "working directory" if commit else None
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "blockbench": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        #: where the commit was read: the installed package's own checkout, or (an installed copy run from
        #: a clone of blockbench) the working directory, whose source the installed copy may not match
        "git_commit_of": commit_of,
        "packages": versions,
    }


def _is_blockbench_checkout(folder: Path) -> bool:
    try:
        return 'name = "blockbench"' in (folder / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False


def machine_key(env: dict[str, Any]) -> dict[str, Any]:
    """What identifies the machine of a timing (pytest-benchmark's ``machine_info``): results of a
    machine-dependent evaluation are cached under it, so another machine measures its own."""
    return {k: env.get(k) for k in ("host", "machine", "cpu_count", "device", "device_name")} | {
        "torch": env.get("packages", {}).get("torch")}


# ---------------------------------------------------------------------------------------- failures
#: what a failing step may raise and still only fail its cell: every ``Exception`` and a plugin's
#: ``sys.exit`` (``SystemExit``); ``KeyboardInterrupt`` and ``GeneratorExit`` are never caught
CELL_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


class StageError(Exception):
    """An exception raised inside a named stage, with its traceback kept for the failed record."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.stage = stage
        self.exc = exc
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class Lazy:
    """A stage's value computed on first use; a failure is remembered and re-raised to later users
    (every cell of a calibration group fails at ``capture`` once, not once per retry)."""

    def __init__(self, stage: str, fn: Callable[[], Any]) -> None:
        self.stage, self.fn = stage, fn
        self.value: Any = None
        self.error: StageError | None = None
        self.done = False

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        if not self.done:
            try:
                self.value = self.fn()
                self.done = True
            except StageError as exc:
                self.error = exc
                raise
            except CELL_FAILURES as exc:  # recorded in the cell's record
                self.error = StageError(self.stage, exc)
                raise self.error from exc
        return self.value


# ---------------------------------------------------------------------------------------- stage values
@dataclass
class LoadedModel:
    """The ``load`` step's output: the model in eval mode on the grid's device and dtype."""

    spec: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo
    seconds: float


@dataclass
class CapturedStates:
    """The ``capture`` step's output for one calibration group (model × calibration variant × seed).

    ``states[i]`` enters block ``i``, ``states[L]`` leaves the last block (hooks, never
    ``hidden_states[-1]``), float32 on the CPU; ``input_ids`` are the calibration windows. With
    ``sublayers`` (a group with attention or MLP units), ``states`` is the residual stream between the
    branches too, ``(2L + 1, ...)`` (:mod:`algorithms.models.capture`), and :meth:`blocks` its block
    states. ``block_key`` identifies the block states whichever way they were captured (block scores are
    cached under it, so adding sub-layer units to a grid does not recompute them)."""

    key: str
    #: None in a streamed group where every metric streams (``scoring: streamed``): nothing was stored
    states: torch.Tensor | None
    input_ids: torch.Tensor
    stats: dict[str, float]
    seconds: float
    cached: bool
    #: one host-to-device copy per group, shared by every metric (made on first use)
    device_states: torch.Tensor | None = None
    to_device_seconds: float = 0.0
    #: search objectives per (unit, metric label) (one ObjectiveFactory each; they share true-loss evaluations)
    objectives: dict[tuple[str, str], Any] = field(default_factory=dict)
    sublayers: bool = False
    block_key: str = ""
    #: the calibration loss of removal sets per unit kind, memoised: shared by model-metric scoring
    #: (``ppl``) and every search objective ``loss`` of the group
    losses: dict[str, Any] = field(default_factory=dict)
    #: streamed scoring (:meth:`Pipeline.capture` with ``scoring: streamed``): each streamed metric's scores
    #: (:attr:`bench.grid.Cell.stream_key` -> :class:`estimators.streaming.MetricStream`, from accumulators
    #: fed during capture and shared between metrics that keep the same state), and its share of their time
    streams: dict[str, Any] = field(default_factory=dict)
    stream_seconds: dict[str, float] = field(default_factory=dict)
    #: depths of the captured stream (``L + 1``, or ``2L + 1`` with ``sublayers``)
    depths: int = 0

    def __post_init__(self) -> None:
        if self.states is not None:
            self.depths = self.states.shape[0]
        if self.depths < 2:
            raise ValueError("captured states need the number of depths (states, or depths when none are stored)")

    def stored(self) -> torch.Tensor:
        """The stored states; a ``RuntimeError`` when the group streamed them instead."""
        if self.states is None:
            raise RuntimeError("this calibration group streamed its states (scoring: streamed) and stored none")
        return self.states

    def loss(self, model: torch.nn.Module, unit: str, batch_size: int) -> Any:
        """The group's memoised ``loss`` objective (:class:`algorithms.objectives.Objective`) for ``unit``."""
        if unit not in self.losses:
            from algorithms.objectives import ObjectiveFactory

            def prefix():  # the captured states enter each block as in the loss's own forward passes
                from algorithms.models.prefix import from_captured

                # streamed: nothing stored, every loss runs from the first block (same numbers, slower); so
                # do states kept in a narrower dtype than the model computes in (they are not its states)
                states = self.states
                if states is None or states.dtype not in (torch.float32, next(model.parameters()).dtype):
                    return None
                return from_captured(self.blocks(), batch_size)

            self.losses[unit] = ObjectiveFactory(model=model, input_ids=self.input_ids, batch_size=batch_size,
                                                 unit=unit, prefix=prefix).get("loss")
        return self.losses[unit]

    def on_device(self, device: torch.device) -> torch.Tensor:
        if self.device_states is None:
            timer = Timer(device)
            with timer.stage("to_device"):
                self.device_states = self.stored().to(device)
            self.to_device_seconds = timer.times["to_device"]
        return self.device_states

    def blocks(self, device: torch.device | None = None) -> torch.Tensor:
        """The block states ``(L + 1, ...)`` (on ``device`` when given)."""
        states = self.stored() if device is None else self.on_device(device)
        return states[0::2] if self.sublayers else states

    @property
    def n_blocks(self) -> int:
        return (self.depths - 1) // 2 if self.sublayers else self.depths - 1


@dataclass(frozen=True)
class StreamPlan:
    """:meth:`Pipeline.stream_plan`: per streamed metric key, a cell that names it and the longest span
    to accumulate; ``store``: a metric of the group cannot stream, so the states are stored as well."""

    metrics: dict[str, tuple[Cell, int]]
    store: bool


@dataclass
class Scores:
    """The ``score`` step's output: one score per block in the metric's own orientation."""

    values: torch.Tensor
    higher_is_important: bool
    seconds: float
    cached: bool


@dataclass
class Selection:
    """The ``select`` step's output: the removed blocks and what the selector spent on them."""

    k: int
    removed: tuple[int, ...]
    evaluations: int
    info: dict[str, Any]
    proxies: dict[str, float]
    seconds: float
    proxy_seconds: float
    #: read from ``cache/selections`` (``seconds`` are then those of the run that searched)
    cached: bool = False


@dataclass(frozen=True, eq=False)
class Removal:
    """What the ``transform`` step takes from a model: the ``unit`` (``block``, ``attention``, ``mlp``) of
    the blocks ``removed`` (``sublayer``: the sub-layers ``removed``, ``2i`` attention and ``2i + 1`` MLP
    of block ``i``), then an optional healing fitted on one calibration set. ``Removal(())`` is
    the dense model. Hashable: the evaluation of one removal is shared by every cell that chose it."""

    removed: tuple[int, ...]
    unit: str = "block"
    healing: ComponentSpec | None = None
    #: the calibration set the healing fits on, as sorted ``(key, value)`` pairs (None without healing)
    calibration: tuple[tuple[str, Any], ...] | None = None

    @classmethod
    def of(cls, cell: Cell, removed: tuple[int, ...] | list[int]) -> Removal:
        """The removal a cell's chosen units make (healed on the cell's calibration set)."""
        heals = cell.healing.name != NO_HEALING
        return cls(tuple(sorted(removed)), cell.unit, cell.healing if heals else None,
                   tuple(sorted(cell.calibration.items())) if heals else None)

    @property
    def dense(self) -> bool:
        return not self.removed

    def _key(self) -> str:
        healing = self.healing.model_dump() if self.healing is not None else None
        return canonical_json([list(self.removed), self.unit, healing, self.calibration])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Removal) and self._key() == other._key()

    def __hash__(self) -> int:  # a healing's params are a dict: hash the canonical form
        return hash(self._key())

    def identity(self) -> dict[str, Any]:
        """What enters cache keys: the set, and the unit and healing only when not the defaults (so the
        keys of plain block removal stay those of earlier versions)."""
        out: dict[str, Any] = {"removed": list(self.removed)}
        if self.unit != "block":
            out["unit"] = self.unit
        if self.healing is not None and self.removed:
            from algorithms.healing import HEALINGS

            out["healing"] = HEALINGS.get(self.healing.name)(self.healing.params).describe()
            out["healing_calibration"] = dict(self.calibration or ())
        return out


@dataclass
class EvalResult:
    """One evaluation of one block set (JSON-ready ``result``, cached on disk)."""

    name: str
    result: dict[str, Any]
    seconds: float | None
    cached: bool


@dataclass
class SetEvaluation:
    """The ``evaluate`` step's output for one block set of one model (``removed == ()``: dense)."""

    removed: tuple[int, ...]
    parameters: int
    results: dict[str, EvalResult]
    #: the healing's cost and report (``seconds``, ``trained_parameters``, ``info``, ``cached``), if healed
    healing: dict[str, Any] | None = None


@dataclass
class ModelMemo:
    """Per-model memory of the evaluate step: results by cache key, and each evaluation's dense
    reference (computed on first need)."""

    results: dict[str, SetEvaluation] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)


def release_free_host_memory() -> bool:
    """Hand the C allocator's free memory back to the system (glibc's ``malloc_trim(0)``); whether it ran.

    Called before each capture: by then the previous calibration group's states are freed, but glibc
    keeps much of what a grid's evaluations and the last capture freed in its heap, and the next group's
    states (hundreds of MB to GB, a fresh mapping) come on top of it. On ``configs/full.yaml``'s first two
    seeds this released 1.24 GB before the second capture and lowered its peak from 7.6 to 6.9 GB. Not
    glibc (macOS, musl): nothing happens."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


# ---------------------------------------------------------------------------------------- the pipeline
class Pipeline:
    """The steps of a cell for one grid on one results folder. Executors call its public methods;
    it holds no loop of its own. ``counters`` says how often each expensive step really ran in this
    process (``model_loads``, ``captures``, ``scorings``, ``measure:<evaluation>``)."""

    def __init__(self, config: GridConfig, store: ResultStore | str | Path, reporter: Reporter | None = None,
                 *, allow_remote_code: bool = False) -> None:
        self.config = config
        self.store = store if isinstance(store, ResultStore) else ResultStore(store)
        self.reporter = reporter or Reporter()
        self.allow_remote_code = allow_remote_code
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.env = environment(self.device)
        self.evaluations: dict[str, Evaluation] = {
            name: EVALUATIONS.get(name)(params) for name, params in config.evaluations.items()
        }
        self.counters: Counter[str] = Counter()
        #: seconds this process really spent per step (cache hits cost nothing), for the end-of-run summary
        self.seconds: Counter[str] = Counter()

    # ------------------------------------------------------------------ load
    def load(self, spec: dict[str, Any]) -> LoadedModel:
        """Load a model (zoo name, local folder or hub id) on the grid's device and dtype (dispatched by
        accelerate instead when the model sets ``device_map``)."""
        from algorithms.models.zoo import load_model

        if spec.get("trust_remote_code") and not self.allow_remote_code:
            raise PermissionError(f"model {spec['name']!r} sets trust_remote_code: true, which runs code shipped "
                                  "with the model; allow it with --allow-remote-code (Runner(allow_remote_code=True))")
        start = time.perf_counter()
        memory = spec.get("max_memory")
        model, tokenizer, info = load_model(spec["name"], device=str(self.device), dtype=self.dtype,
                                            trust_remote_code=spec["trust_remote_code"],
                                            progress=self.reporter.step(spec["name"]),
                                            device_map=spec.get("device_map"), offload_folder=spec.get("offload_folder"),
                                            # JSON keys are strings: accelerate wants GPU indices as ints
                                            max_memory=None if memory is None else
                                            {int(k) if str(k).isdigit() else k: v for k, v in memory.items()})
        self.counters["model_loads"] += 1
        self.seconds["load"] += time.perf_counter() - start
        model_info = ModelInfo(**{k: info[k] for k in ("name", "fingerprint", "n_blocks", "architecture",
                                                        "parameters")})
        return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, info=model_info,
                           seconds=time.perf_counter() - start)

    # ------------------------------------------------------------------ capture
    def capture(self, loaded: LoadedModel, calibration: dict[str, Any], *, sublayers: bool = False,
                cells: list[Cell] | None = None) -> CapturedStates:
        """Hidden states entering every block and leaving the last, from hooks, for one calibration set
        (``sublayers``: between the attention and MLP branches of every block too).

        With ``scoring: streamed`` and the group's ``cells``, every cell metric that streams is fed each
        batch as it leaves the model (:meth:`stream_plan`) and the states are not stored unless a metric
        cannot stream; the hidden-state cache is neither read nor written then."""
        from algorithms.data import calibration_batch, source_fingerprint
        from algorithms.models.capture import capture_hidden_states

        release_free_host_memory()  # the previous group's states are gone: hand their pages back first
        parts = {
            "model": loaded.info.fingerprint, "calibration": calibration,
            "source": source_fingerprint(calibration["source"]), "dtype": self.config.dtype,
            "device": self.device.type, "protocol": PROTOCOL_VERSION,
            **({"state_dtype": self.config.state_dtype} if self.config.state_dtype != "float32" else {}),
        }
        store_dtype = getattr(torch, self.config.state_dtype)
        block_key = short_hash(parts)
        key = short_hash({**parts, "resolution": "sublayer"}) if sublayers else block_key
        depths = 2 * loaded.info.n_blocks + 1 if sublayers else loaded.info.n_blocks + 1
        ids = calibration_batch(  # cheap; kept for the true-loss objective of search selectors
            loaded.tokenizer, calibration["source"], samples=calibration["samples"],
            seq_len=calibration["seq_len"], seed=calibration["seed"],
        )
        plan = self.stream_plan(loaded, cells or []) if self.config.scoring == "streamed" else None
        if plan is not None:
            return self._capture_streamed(loaded, ids, key, block_key, sublayers, depths, plan, store_dtype)
        cached = self.store.get_tensors("hidden", key) if self.config.cache_hidden_states else None
        if cached is not None:
            tensors, meta = cached
            why = _unusable_states(tensors, meta, depths, tuple(ids.shape), store_dtype)
            if why is None:
                return CapturedStates(key=key, states=tensors["states"], input_ids=ids,
                                      stats={k: float(v) for k, v in meta.items()}, seconds=0.0, cached=True,
                                      sublayers=sublayers, block_key=block_key)
            self.store.distrust("hidden", key, why, ".safetensors")
        timer = Timer(self.device)
        with timer.stage("capture"):
            states, stats = capture_hidden_states(loaded.model, ids, batch_size=self.config.calibration.batch_size,
                                                  sublayers=sublayers, progress=self.reporter.step("capture"),
                                                  store_dtype=store_dtype)
        self.counters["captures"] += 1
        self.seconds["capture"] += timer.times["capture"]
        self._check_finite(states)
        stats["capture_seconds"] = timer.times["capture"]
        if self.config.cache_hidden_states:
            size = states.numel() * states.element_size()
            if size >= LARGE_CACHE_BYTES:
                self.reporter.note(f"writing {size / 1e9:.2f} GB of hidden states to "
                                   f"{self.store.cache_dir / 'hidden'} for reruns (cache_hidden_states: false "
                                   "in the grid turns this off)")
            self.store.put_tensors("hidden", key, {"states": states}, {k: repr(v) for k, v in stats.items()})
        return CapturedStates(key=key, states=states, input_ids=ids, stats=stats, seconds=timer.times["capture"],
                              cached=False, sublayers=sublayers, block_key=block_key)

    def stream_plan(self, loaded: LoadedModel, cells: list[Cell]) -> StreamPlan | None:
        """What a streamed group accumulates: per streamed metric (:attr:`Cell.stream_key <bench.grid.Cell.stream_key>`) the
        metric, its stream and the longest span it needs (the cell's ``k``: a selector's runs and the
        shared ``proxy_span`` of a set of k units are at most k long; one step for attention or MLP
        branches, whose runs are single branches), and whether a metric needs the states stored. None
        when no cell streams."""
        metrics: dict[str, tuple[Cell, int]] = {}
        store = False
        for cell in cells:
            if cell.stream_kind is None:
                store = store or not is_model_metric(cell.metric.name)
                continue
            length = 1 if cell.unit in ("attention", "mlp") else self.resolve_k(cell, loaded)
            key = cell.stream_key
            metrics[key] = (cell, max(length, metrics[key][1] if key in metrics else 1))
        return StreamPlan(metrics=metrics, store=store) if metrics else None

    def _check_finite(self, states: torch.Tensor | None) -> None:
        from algorithms.models.capture import nonfinite_depths

        bad = [] if states is None else nonfinite_depths(states)
        if not bad:
            return
        hint = (" (state_dtype: float16 overflows above 65504: use bfloat16 or float32)"
                if states.dtype == torch.float16 else "")
        raise FloatingPointError(f"hidden states contain NaN or inf at depths {bad}{hint}")

    def _capture_streamed(self, loaded: LoadedModel, ids: torch.Tensor, key: str, block_key: str, sublayers: bool,
                          depths: int, plan: StreamPlan, store_dtype: torch.dtype) -> CapturedStates:
        from algorithms.models.capture import capture_hidden_states
        from estimators.streaming import shared_accumulators

        n_blocks = loaded.info.n_blocks
        requests = {}
        for name, (cell, length) in plan.metrics.items():
            stream_depths = n_blocks + 1 if cell.unit == "block" else 2 * n_blocks + 1
            requests[name] = (metric_class(cell.metric.name)(**cell.metric.params), stream_depths,
                              min(length, stream_depths - 1))
        feeds, streams = shared_accumulators(requests, samples=ids.shape[0], seq_len=ids.shape[1])
        feed_seconds = [0.0] * len(feeds)
        consumers = []
        for i, feed in enumerate(feeds):
            every = 2 if sublayers and feed.depths == n_blocks + 1 else 1  # block states of the sub-layer stream

            def consume(batch: torch.Tensor, rows: slice, feed=feed, i=i, every=every):
                timer = Timer(self.device)
                with timer.stage("update"):
                    feed.update(batch[::every], rows)
                feed_seconds[i] += timer.times["update"]

            consumers.append(consume)
        timer = Timer(self.device)
        with timer.stage("capture"):
            states, stats = capture_hidden_states(
                loaded.model, ids, batch_size=self.config.calibration.batch_size, sublayers=sublayers,
                progress=self.reporter.step("capture"), consumers=consumers, keep=plan.store, store_dtype=store_dtype)
        self.counters["captures"] += 1
        capture_seconds = timer.times["capture"] - sum(feed_seconds)
        # a shared accumulator's time is split between the metrics it serves
        spent = {id(feed): t for feed, t in zip(feeds, feed_seconds, strict=True)}
        users = Counter(id(s.accumulator) for s in streams.values())
        seconds = {name: spent[id(s.accumulator)] / users[id(s.accumulator)] for name, s in streams.items()}
        self.seconds["capture"] += capture_seconds
        self._check_finite(states)
        stats["capture_seconds"] = capture_seconds
        return CapturedStates(key=key, states=states, input_ids=ids, stats=stats, seconds=capture_seconds,
                              cached=False, sublayers=sublayers, block_key=block_key, streams=streams,
                              stream_seconds=seconds, depths=depths)

    # ------------------------------------------------------------------ score
    def score(self, captured: CapturedStates, cell: Cell, loaded: LoadedModel | None = None) -> Scores:
        """The cell's metric on every unit, once per (hidden states, resolved metric). A block compares the
        states entering and leaving it; an attention (MLP) branch the states entering and leaving the
        branch: the metric scores every step of the sub-layer stream once, and each branch kind takes
        its steps (cached once for both), ``sublayer`` all ``2L`` of them. A model metric (``ppl``, ``taylor``) runs ``loaded``'s model on
        the group's calibration windows instead, once per unit kind."""
        identity = cell.metric_identity
        cls = metric_class(cell.metric.name)
        if is_model_metric(cell.metric.name):
            if loaded is None:
                raise RuntimeError(f"metric {cell.metric.name!r} runs the model; score() needs the loaded model")
            return self._score_model(captured, cell, cls, loaded)
        sublayer = cell.unit != "block"
        if sublayer and not captured.sublayers:
            raise RuntimeError(f"unit {cell.unit!r} needs the sub-layer stream; this group captured blocks only")
        hidden = captured.key if sublayer else captured.block_key or captured.key
        key = short_hash({"hidden": hidden, "metric": identity, "device": self.device.type,
                          **({"scoring": "streamed"} if cell.streamed_scores else {})})
        steps = 2 * captured.n_blocks if sublayer else captured.n_blocks
        pick = {"block": slice(None), "attention": slice(0, None, 2), "mlp": slice(1, None, 2),
                "sublayer": slice(None)}[cell.unit]
        cached = self._cached_scores(key, steps, bool(cls.higher_is_important))
        if cached is not None:
            return Scores(values=cached.values[pick], higher_is_important=cached.higher_is_important,
                          seconds=cached.seconds, cached=True)
        timer = Timer(self.device)
        stream = captured.streams.get(cell.stream_key) if cell.stream_kind else None
        if stream is not None:  # accumulated during capture: the updates' time is the scoring's too
            with timer.stage("scoring"):
                values = stream.span_lengths([1])[1]
            seconds = timer.times["scoring"] + captured.stream_seconds[cell.stream_key]
        else:
            metric = cls(**cell.metric.params)
            states = captured.on_device(self.device) if sublayer else captured.blocks(self.device)
            with timer.stage("scoring"):
                values = metric.score_blocks(states).cpu()
            seconds = timer.times["scoring"]
        scores = self._store_scores(key, cell, cls, values, seconds)
        return Scores(values=scores.values[pick], higher_is_important=scores.higher_is_important,
                      seconds=scores.seconds, cached=False)

    def _group_loss(self, captured: CapturedStates, loaded: LoadedModel, unit: str) -> Any:
        """The group's memoised calibration loss for ``unit`` (:meth:`CapturedStates.loss`), kept in the
        journal ``cache/losses/<key>``: every value is appended the moment it is computed, and the first
        use in a process seeds the objective with the values already there. An interrupted search (a
        killed run, a session that ended) thus resumes where it stopped: it asks for the same sets in the
        same order and finds them memoised (values round-trip exactly: the same choice, bit for bit), and
        its record counts them as evaluations, not as computed. The key is the calibration group's
        (model, data, seed, dtype, device, protocol), the unit, the batch size and
        :data:`algorithms.objectives.LOSS_VERSION`."""
        from algorithms.objectives import LOSS_VERSION

        batch_size = self.config.calibration.batch_size
        fresh = unit not in captured.losses
        loss = captured.loss(loaded.model, unit, batch_size)
        if fresh:
            journal = self.store.journal("losses", short_hash({
                "calibration": captured.block_key or captured.key, "unit": unit, "batch_size": batch_size,
                "loss": LOSS_VERSION}))
            for entry in journal.read():
                try:
                    blocks = [int(b) for b in entry["set"]]
                    value = math.inf if entry["value"] is None else float(entry["value"])
                except (KeyError, TypeError, ValueError):
                    continue  # verified but not a loss entry: computed again when asked
                loss.seed(blocks, value)
            loss.on_new = lambda blocks, value: journal.append({"set": sorted(blocks), "value": value})
        return loss

    def _score_model(self, captured: CapturedStates, cell: Cell, cls: Any, loaded: LoadedModel) -> Scores:
        from algorithms.model_metrics import ScoringTarget
        from algorithms.models.units import n_units

        key = short_hash({"calibration": captured.block_key or captured.key, "metric": cell.metric_identity,
                          "unit": cell.unit, "device": self.device.type})
        cached = self._cached_scores(key, n_units(captured.n_blocks, cell.unit), bool(cls.higher_is_important))
        if cached is not None:
            return cached
        batch_size = self.config.calibration.batch_size
        target = ScoringTarget(model=loaded.model, input_ids=captured.input_ids, unit=cell.unit,
                               batch_size=batch_size, progress=self.reporter.step(cell.metric.label()),
                               loss=self._group_loss(captured, loaded, cell.unit))
        timer = Timer(self.device)
        with timer.stage("scoring"):
            values = cls(**cell.metric.params).score_units(target).to(torch.float64).cpu()
        return self._store_scores(key, cell, cls, values, timer.times["scoring"])

    def _cached_scores(self, key: str, n: int, higher_is_important: bool) -> Scores | None:
        cached = self.store.get_json("scores", key)
        if cached is None:
            return None
        why = _unusable_scores(cached, n, higher_is_important)
        if why is not None:
            self.store.distrust("scores", key, why)
            return None
        return Scores(values=torch.tensor(cached["scores"], dtype=torch.float64),
                      higher_is_important=cached["higher_is_important"], seconds=float(cached["seconds"]),
                      cached=True)

    def _store_scores(self, key: str, cell: Cell, cls: Any, values: torch.Tensor, seconds: float) -> Scores:
        self.counters["scorings"] += 1
        self.seconds["scoring"] += seconds
        if not torch.isfinite(values).all():
            bad = [i for i, s in enumerate(values.tolist()) if s != s or abs(s) == float("inf")]
            raise FloatingPointError(f"metric {cell.metric.name!r} gave non-finite scores for blocks {bad}")
        self.store.put_json("scores", key, {"scores": values.tolist(), "seconds": seconds,
                                            "device": str(self.device),
                                            "higher_is_important": cls.higher_is_important})
        return Scores(values=values, higher_is_important=bool(cls.higher_is_important), seconds=seconds,
                      cached=False)

    # ------------------------------------------------------------------ select
    def selection_key(self, cell: Cell, captured: CapturedStates, k: int) -> str:
        """What decides a cell's chosen set: its calibration group (model fingerprint, calibration,
        dtype, device type: the hidden-state key), metric, selector, ``k``, protected units and unit."""
        # the block-level key when the group also captured the sub-layer stream for other cells: the same
        # calibration, so the same selection (units and metrics are in the key themselves)
        return short_hash({"calibration": captured.block_key or captured.key, "metric": cell.metric_identity,
                           "selector": cell.selector_identity, "k": k, "protect": list(cell.protect),
                           "unit": cell.unit, "device": self.device.type, "protocol": PROTOCOL_VERSION,
                           **({"scoring": "streamed"} if cell.streamed_scores else {})})

    def select(self, cell: Cell, loaded: LoadedModel, captured: CapturedStates, scores: Scores) -> Selection:
        """The cell's selector on its scores; the chosen set is then scored on the shared proxies. Cached
        under ``cache/selections`` (:meth:`selection_key`): a search that ran once (SLEB's hundreds of
        forward passes) is read back when its cell is run again, e.g. after an interrupted run."""
        k = self.resolve_k(cell, loaded)
        key = self.selection_key(cell, captured, k)
        cached = self.store.get_json("selections", key)
        if cached is not None:
            why = _unusable_selection(cached, k, cell.n_units(loaded.info.n_blocks))
            if why is None:
                return Selection(k=k, removed=tuple(cached["removed"]), evaluations=cached["evaluations"],
                                 info=cached["info"], proxies=cached["proxies"], seconds=cached["seconds"],
                                 proxy_seconds=cached["proxy_seconds"], cached=True)
            self.store.distrust("selections", key, why)
        selection = self._select(cell, loaded, captured, scores, k)
        self.counters["selections"] += 1
        self.store.put_json("selections", key, {
            "removed": list(selection.removed), "evaluations": selection.evaluations, "info": selection.info,
            "proxies": selection.proxies, "seconds": selection.seconds, "proxy_seconds": selection.proxy_seconds,
            "k": k, "selector": cell.selector_identity, "metric": cell.metric_identity})
        return selection

    def _select(self, cell: Cell, loaded: LoadedModel, captured: CapturedStates, scores: Scores, k: int) -> Selection:
        n_blocks = loaded.info.n_blocks
        protected = cell.protected_units(n_blocks)  # sublayer: both branches of a protected block
        selector = SELECTORS.get(cell.selector.name)(**cell.selector.params)
        label = (cell.unit, cell.metric.label())
        if label not in captured.objectives:
            # one factory per (calibration group, unit, metric); they share the group's true-loss results
            from algorithms.objectives import ObjectiveFactory

            batch_size = self.config.calibration.batch_size
            loss = self._group_loss(captured, loaded, cell.unit)
            metric = metric_class(cell.metric.name)(**cell.metric.params)
            run_score = None
            if is_model_metric(cell.metric.name):  # runs of blocks scored by the model, not by states
                from algorithms.model_metrics import ScoringTarget

                target = ScoringTarget(model=loaded.model, input_ids=captured.input_ids, unit=cell.unit,
                                       batch_size=batch_size, loss=loss)
                values = scores.values

                def run_score(start: int, length: int) -> float:
                    return metric.span_score(values, start, length, target)

            stream = captured.streams.get(cell.stream_key) if cell.stream_kind else None
            span_scores = None if stream is None else (lambda n, stream=stream: stream.span_lengths([n])[n])
            captured.objectives[label] = ObjectiveFactory(
                model=loaded.model, input_ids=captured.input_ids,
                # sublayer: spans of sub-layers are compared on the full stream (2L + 1 depths)
                states=None if run_score is not None or stream is not None else (
                    (lambda: captured.on_device(self.device)) if cell.unit == "sublayer"
                    else (lambda: captured.blocks(self.device))),
                span_scores=span_scores,
                metric=metric, higher_is_important=scores.higher_is_important, block_scores=scores.values,
                batch_size=batch_size, fingerprint=captured.key, unit=cell.unit, loss=loss,
                run_score=run_score,
            )
        factory = captured.objectives[label]
        problem = SelectionProblem(
            n_blocks=cell.n_units(n_blocks), k=k, scores=scores.values, higher_is_important=scores.higher_is_important,
            protected=protected, seed=cell.calibration["seed"], objectives=factory,
            workdir=self.store.root / "optuna",
        )
        t0 = time.perf_counter()
        chosen = selector(problem)
        seconds = time.perf_counter() - t0
        removed = tuple(chosen.blocks)
        # every selector's choice scored on the same cheap proxies, so selectors compare on equal terms
        t0 = time.perf_counter()
        proxies = {kind: factory.get(kind)(removed) for kind in PROXY_OBJECTIVES}
        proxy_seconds = time.perf_counter() - t0
        self.seconds["selection"] += seconds + proxy_seconds
        return Selection(k=k, removed=removed, evaluations=chosen.evaluations, info=chosen.info, proxies=proxies,
                         seconds=seconds, proxy_seconds=proxy_seconds)

    def resolve_k(self, cell: Cell, loaded: LoadedModel) -> int:
        """How many units the cell removes (a ``params`` budget needs the loaded model's unit sizes)."""
        if "params" not in cell.budget:
            return cell.resolve_k(loaded.info.n_blocks)
        from algorithms.models.blocks import count_parameters
        from algorithms.models.units import unit_parameters

        return cell.resolve_k(loaded.info.n_blocks, unit_parameters(loaded.model, cell.unit),
                              count_parameters(loaded.model))

    # ------------------------------------------------------------------ transform
    @staticmethod
    def transform(model: torch.nn.Module, removed: tuple[int, ...], unit: str = "block") -> contextlib.AbstractContextManager:
        """The model without the ``unit`` of blocks ``removed``, for the duration of a ``with`` block: masked
        in place (bit-identical to removal, no copy of the model). Healing is applied by :meth:`evaluate`
        on a copy (:meth:`heal`)."""
        if unit == "block":
            from algorithms.models.masking import skip_blocks

            return skip_blocks(model, removed)
        from algorithms.models.units import skip_units

        return skip_units(model, unit, removed)

    def _masked(self, model: torch.nn.Module, removed: tuple[int, ...], unit: str) -> contextlib.AbstractContextManager:
        # ``transform(model, removed)`` for blocks: a replaced transform with that signature keeps working
        return self.transform(model, removed) if unit == "block" else self.transform(model, removed, unit)

    def heal(self, loaded: LoadedModel, removal: Removal) -> tuple[torch.nn.Module, dict[str, Any]]:
        """A copy of the model with ``removal``'s units removed and then healed on its calibration set;
        with the healing's cost and report (``seconds``, ``trained_parameters``, ``info``)."""
        from algorithms.data import calibration_batch
        from algorithms.healing import HEALINGS, HealTarget
        from algorithms.models.placement import is_dispatched
        from algorithms.models.units import pruned_units_copy

        assert removal.healing is not None and removal.calibration is not None
        if is_dispatched(loaded.model):
            raise ValueError(f"healing ({removal.healing.name}) trains a copy of the pruned model, which a model "
                             "dispatched by device_map cannot give; heal without device_map")
        calibration = dict(removal.calibration)
        ids = calibration_batch(loaded.tokenizer, calibration["source"], samples=calibration["samples"],
                                seq_len=calibration["seq_len"], seed=calibration["seed"])
        healing = HEALINGS.get(removal.healing.name)(removal.healing.params)
        self.reporter.stage(f"{removal.unit} {list(removal.removed)}: healing ({removal.healing.label()})")
        pruned = pruned_units_copy(loaded.model, removal.unit, removal.removed)
        timer = Timer(self.device)
        with timer.stage("healing"):
            outcome = healing.heal(HealTarget(dense=loaded.model, pruned=pruned, unit=removal.unit,
                                              removed=removal.removed, input_ids=ids.to(self.device),
                                              batch_size=self.config.calibration.batch_size,
                                              progress=self.reporter.step("healing")))
        pruned.eval()
        self.seconds["healing"] += timer.times["healing"]
        self.counters["healings"] += 1
        return pruned, {"name": removal.healing.name, "seconds": timer.times["healing"],
                        "trained_parameters": outcome.trained_parameters, "info": outcome.info}

    # ------------------------------------------------------------------ evaluate
    def evaluation_key(self, loaded: LoadedModel, removal: Removal | tuple[int, ...], evaluation: Evaluation) -> str:
        """Cache key of one evaluation of one removal: model content, the removal (set, and unit and
        healing when not the defaults), resolved evaluation (parameters and version), the contents of the
        data it reads, dtype, device type, protocol, and the machine for timings."""
        removal = _removal(removal)
        parts: dict[str, Any] = {
            "model": loaded.info.fingerprint, **removal.identity(), "evaluation": evaluation.describe(),
            "data": evaluation.data_fingerprint(), "dtype": self.config.dtype, "device": self.device.type,
            "protocol": PROTOCOL_VERSION,
        }
        if evaluation.machine_dependent:
            parts["machine"] = machine_key(self.env)
        return short_hash(parts)

    def healing_key(self, loaded: LoadedModel, removal: Removal) -> str:
        """Cache key of a healing's report (its cost and what it fitted)."""
        return short_hash({"model": loaded.info.fingerprint, **removal.identity(), "dtype": self.config.dtype,
                           "device": self.device.type, "protocol": PROTOCOL_VERSION})

    def evaluate(self, loaded: LoadedModel, removal: Removal | tuple[int, ...],
                 memo: ModelMemo | None = None) -> SetEvaluation:
        """Every evaluation of the grid on the model after ``removal`` (a block set is a removal of
        blocks; ``()``: the dense model, for the evaluations that measure it). A healed removal is healed
        once, on a copy, when an evaluation is not cached. Raises :class:`StageError` naming the
        evaluation (or ``healing``) that failed."""
        from algorithms.models.blocks import count_parameters

        memo = memo if memo is not None else ModelMemo()
        removal = _removal(removal)
        memo_key = short_hash({"model": loaded.info.fingerprint, **removal.identity()})
        if memo_key in memo.results:
            hit = memo.results[memo_key]
            return SetEvaluation(removal.removed, hit.parameters,
                                 {n: EvalResult(n, r.result, r.seconds, True) for n, r in hit.results.items()},
                                 None if hit.healing is None else {**hit.healing, "cached": True})
        with self._masked(loaded.model, removal.removed, removal.unit) as model:
            parameters = count_parameters(model)
        healed: Lazy | None = None
        healing: dict[str, Any] | None = None
        if removal.healing is not None:
            healed = Lazy("healing", lambda: self.heal(loaded, removal))
        results: dict[str, EvalResult] = {}
        try:
            for name, evaluation in self.evaluations.items():
                if removal.dense and not evaluation.measures_dense:
                    continue
                try:
                    results[name] = self._measure(loaded, removal, name, evaluation, memo, healed)
                except StageError:
                    raise
                except CELL_FAILURES as exc:  # recorded in the records of the cells that chose the set
                    raise StageError(name, exc) from exc
            if healed is not None:
                healing = self._healing_report(loaded, removal, healed)
        finally:
            if healed is not None and healed.done:
                healed.value = None  # the healed copy goes as soon as its evaluations are done
        out = SetEvaluation(removed=removal.removed, parameters=parameters, results=results, healing=healing)
        memo.results[memo_key] = out
        return out

    def _healing_report(self, loaded: LoadedModel, removal: Removal, healed: Lazy) -> dict[str, Any]:
        """The healing's report: from this run when it healed, else from its cache (healing again only
        when the report is missing: every evaluation was cached)."""
        key = self.healing_key(loaded, removal)
        if not healed.done:
            cached = self.store.get_json("healing", key)
            if isinstance(cached, dict) and _number(cached.get("seconds")) and isinstance(cached.get("info"), dict):
                return {**cached, "cached": True}
            if cached is not None:
                self.store.distrust("healing", key, "the cached healing report lacks 'seconds' or 'info'")
        report = healed.get()[1]
        self.store.put_json("healing", key, report)
        return {**report, "cached": False}

    def _measure(self, loaded: LoadedModel, removal: Removal, name: str, evaluation: Evaluation,
                 memo: ModelMemo, healed: Lazy | None = None) -> EvalResult:
        key = self.evaluation_key(loaded, removal, evaluation)
        kind = f"evaluations/{name}"
        cached = self.store.get_json(kind, key)
        if cached is not None:
            why = _unusable_result(cached)
            if why is None:
                return EvalResult(name, cached["result"], cached.get("seconds"), True)
            self.store.distrust(kind, key, why)
        what = f"{removal.unit}s" if removal.unit != "block" else "blocks"
        self.reporter.stage(f"{what} {list(removal.removed) or 'none'}: {name}")
        if name not in memo.references:
            start = time.perf_counter()
            memo.references[name] = evaluation.reference(loaded.model, loaded.tokenizer)
            self.seconds[name] += time.perf_counter() - start
        if healed is not None and not removal.dense:
            def transform(_model: torch.nn.Module, _removed: tuple[int, ...]) -> contextlib.AbstractContextManager:
                return contextlib.nullcontext(healed.get()[0])
        else:
            def transform(model: torch.nn.Module, removed: tuple[int, ...]) -> contextlib.AbstractContextManager:
                return self._masked(model, removed, removal.unit)
        target = EvalTarget(model=loaded.model, tokenizer=loaded.tokenizer, removed=removal.removed,
                            n_blocks=loaded.info.n_blocks, transform=transform,
                            reference=memo.references[name], unit=removal.unit,
                            healing=removal.healing.name if removal.healing is not None else None,
                            progress=self.reporter.step(name))
        timer = Timer(self.device)
        with timer.stage(name):
            result = evaluation.measure(target)
        self.counters[f"measure:{name}"] += 1
        self.seconds[name] += timer.times[name]
        self.store.put_json(kind, key, {"result": result, "seconds": timer.times[name],
                                        "evaluation": evaluation.describe(), **removal.identity()})
        return EvalResult(name, result, timer.times[name], False)

    # ------------------------------------------------------------------ records
    def header(self, cell: Cell) -> CellRecord:
        """A record that knows only the cell (status ``selected`` until a step fails or completes it)."""
        return CellRecord(
            cell_id=cell.cell_id, grid=cell.grid, spec=cell.spec(), versions=cell.versions(), env=self.env,
            labels=Labels(model=cell.model["name"], metric=cell.metric.label(), selector=cell.selector.label(),
                          budget=cell.budget_label, seed=cell.calibration["seed"],
                          calibration=calibration_label(cell.calibration), unit=cell.unit,
                          healing=cell.healing.label(), method=cell.method),
            status="selected",
        )

    def select_cell(self, cell: Cell, model: Lazy, captured: Lazy) -> CellRecord:
        """load → capture → score → select for one cell: a ``selected`` record, or a ``failed`` one.
        ``model`` and ``captured`` are the group's shared :class:`Lazy` values."""
        record = self.header(cell)
        stage = "load_model"
        try:
            self.reporter.stage(f"{cell.model['name']}: loading model")
            loaded: LoadedModel = model.get()
            record.model = loaded.info
            stage = "budget"
            self.resolve_k(cell, loaded)
            stage = "capture"
            self.reporter.stage(f"{cell.model['name']}: hidden states, {calibration_label(cell.calibration)}, "
                                f"seed {cell.calibration['seed']}")
            states: CapturedStates = captured.get()
            stage = "scoring"
            self.reporter.stage(f"{cell.metric.label()}: scoring")
            scores = self.score(states, cell, loaded)
            stage = "selection"
            selection = self.select(cell, loaded, states, scores)
        except CELL_FAILURES as exc:  # one failing cell never stops the grid (Ctrl-C does)
            return self.failed(record, exc, stage)
        record.k = selection.k
        record.removed_blocks = list(selection.removed)
        record.scores = scores.values.tolist()
        record.higher_is_important = scores.higher_is_important
        record.selector_result = SelectorOutcome(evaluations=selection.evaluations, info=selection.info,
                                                 proxies=selection.proxies)
        record.calibration_stats = dict(states.stats)
        record.timings = {"load_model": loaded.seconds, "capture": states.seconds, "scoring": scores.seconds,
                          "selection": selection.seconds, "proxies": selection.proxy_seconds}
        record.cache_hits = {"hidden": states.cached, "scores": scores.cached, "selection": selection.cached}
        return record

    def complete(self, selected: CellRecord, dense: SetEvaluation, pruned: SetEvaluation) -> CellRecord:
        """The finished record from a ``selected`` one and the evaluations of the dense model and its set."""
        record = selected.model_copy(deep=True)
        outcomes: dict[str, EvaluationOutcome] = {}
        timings = dict(selected.timings)
        cache_hits = dict(selected.cache_hits)
        for name, evaluation in self.evaluations.items():
            d, p = dense.results.get(name), pruned.results[name]
            outcomes[name] = EvaluationOutcome(
                name=name, version=evaluation.version, params=evaluation.describe()["params"],
                columns=[c.as_dict() for c in evaluation.columns()],
                values=evaluation.values(d.result if d else None, p.result),
                dense=d.result if d else None, pruned=p.result,
                seconds={"dense": d.seconds if d else None, "pruned": p.seconds}, cached=p.cached,
            )
            if d is not None and d.seconds is not None:
                timings[f"{name}_dense"] = d.seconds
            if p.seconds is not None:
                timings[f"{name}_pruned"] = p.seconds
            cache_hits[name] = p.cached
        if pruned.healing is not None:
            record.healing = HealingOutcome(**pruned.healing)
            timings["healing"] = pruned.healing["seconds"]
            cache_hits["healing"] = bool(pruned.healing.get("cached"))
        record.status = "ok"
        record.evaluations = outcomes
        record.parameters = Parameters(dense=dense.parameters, pruned=pruned.parameters,
                                       kept_share=pruned.parameters / dense.parameters)
        record.timings = timings
        record.cache_hits = cache_hits
        record.finished_at = _now()
        return record

    def run_cell(self, cell: Cell, model: Lazy, captured: Lazy, memo: ModelMemo) -> CellRecord:
        """Every step of one cell in this process (the local executor)."""
        selected = self.select_cell(cell, model, captured)
        if selected.status != "selected":
            return selected
        try:
            loaded = model.get()
            dense = self.evaluate(loaded, (), memo)
            pruned = self.evaluate(loaded, Removal.of(cell, selected.removed_blocks or ()), memo)
        except StageError as exc:
            return self.failed(selected, exc, exc.stage)
        return self.complete(selected, dense, pruned)

    @staticmethod
    def failed(record: CellRecord, exc: BaseException, stage: str) -> CellRecord:
        """``record`` marked failed at ``stage`` (a :class:`StageError` names its own stage)."""
        err = exc.exc if isinstance(exc, StageError) else exc
        tb = exc.tb if isinstance(exc, StageError) else traceback.format_exc()
        if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the next cell the memory back
        return failure(record, exc.stage if isinstance(exc, StageError) else stage, f"{type(err).__name__}: {err}", tb)


def _removal(removal: Removal | tuple[int, ...] | list[int]) -> Removal:
    """A block set as a :class:`Removal`; the dense model is ``Removal(())`` whatever unit or healing."""
    if not isinstance(removal, Removal):
        removal = Removal(tuple(sorted(removal)))
    return Removal(()) if removal.dense else removal


# ---------------------------------------------------------------------------------------- cached payloads
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def _unusable_states(tensors: dict[str, torch.Tensor], meta: dict[str, str], depths: int,
                     ids_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> str | None:
    """Why cached hidden states (``depths`` of them, in ``dtype``) cannot serve a calibration group (None:
    they can)."""
    from algorithms.models.capture import nonfinite_depths

    states = tensors.get("states")
    if states is None:
        return "no 'states' tensor"
    if states.dtype != dtype:
        return f"states in {states.dtype}, expected {dtype}"
    if states.dim() != 4 or tuple(states.shape[:3]) != (depths, *ids_shape):
        return (f"states of shape {tuple(states.shape)}, expected ({depths}, {ids_shape[0]}, {ids_shape[1]}, "
                "hidden)")
    if nonfinite_depths(states):
        return "states that are not finite floats"
    for k, v in meta.items():
        try:
            float(v)
        except (TypeError, ValueError):
            return f"calibration statistic {k!r} = {v!r} is not a number"
    return None


def _unusable_scores(cached: Any, n_blocks: int, higher_is_important: bool) -> str | None:
    """Why a cached scores payload cannot serve its metric (None: it can)."""
    if not isinstance(cached, dict):
        return f"scores payload is a {type(cached).__name__}, not a mapping"
    scores = cached.get("scores")
    if not isinstance(scores, list) or len(scores) != n_blocks:
        size = len(scores) if isinstance(scores, list) else type(scores).__name__
        return f"'scores' must list one score per block ({n_blocks}), got {size}"
    if not all(_number(v) for v in scores):
        return "'scores' holds a value that is not a finite number"
    if cached.get("higher_is_important") is not higher_is_important:
        return f"'higher_is_important' is {cached.get('higher_is_important')!r}, the metric says {higher_is_important}"
    if not _number(cached.get("seconds")):
        return "'seconds' is not a number"
    return None


def _unusable_result(cached: Any) -> str | None:
    """Why a cached evaluation payload cannot be used (None: it can)."""
    if not isinstance(cached, dict) or not isinstance(cached.get("result"), dict):
        return "the cached evaluation holds no 'result' mapping"
    seconds = cached.get("seconds")
    if seconds is not None and not _number(seconds):
        return "'seconds' is not a number"
    return None


def _unusable_selection(cached: Any, k: int, n_units: int) -> str | None:
    """Why a cached selection cannot be used (None: it can)."""
    if not isinstance(cached, dict):
        return "the cached selection is not a mapping"
    removed = cached.get("removed")
    if not (isinstance(removed, list) and all(isinstance(i, int) and 0 <= i < n_units for i in removed)
            and len(set(removed)) == len(removed) == k):
        return f"'removed' is not {k} distinct unit indices below {n_units}"
    if not isinstance(cached.get("info"), dict) or not isinstance(cached.get("proxies"), dict):
        return "'info' or 'proxies' is not a mapping"
    if not isinstance(cached.get("evaluations"), int) or not all(
            _number(cached.get(name)) for name in ("seconds", "proxy_seconds")):
        return "'evaluations', 'seconds' or 'proxy_seconds' is missing or not a number"
    return None


def failure(record: CellRecord, stage: str, error: str, tb: str) -> CellRecord:
    """A failed record: what ``record`` knew (the chosen blocks, when selection was done) and why."""
    return record.model_copy(update={"status": "failed", "stage": stage, "error": error, "traceback": tb,
                                     "timings": {}, "cache_hits": {}, "finished_at": _now()}, deep=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()
