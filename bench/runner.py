"""Run a grid: cells in model → calibration seed order, with every expensive stage cached and shared.

Stages per cell and what is shared:

- model: loaded once per model (and only if some cell of it is unfinished);
- hidden states: captured once per (model, calibration source, samples, seq_len, seed), kept in
  memory for the group and on disk (``cache/hidden``) for reruns;
- scores: once per (hidden states, metric) (``cache/scores``);
- selection: per cell (cheap for one-shot selectors);
- perplexity: once per (model, removed block set) (``cache/eval``), the dense model included,
  however many cells chose that set.

A cell that raises is written as a failed record (stage, error, traceback) and the grid goes on.
``Runner.run(executor="ray")`` runs the same stages as Ray tasks (:mod:`bench.executors`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from algorithms.evaluations.lmeval import accuracy_score
from algorithms.selectors import SELECTORS, SelectionProblem
from bench import __version__
from bench.config import GridConfig
from bench.grid import PROTOCOL_VERSION, Cell, calibration_label, expand, short_hash
from bench.progress import Reporter
from bench.store import ResultStore
from estimators import METRICS

#: objectives every chosen set is scored on in its record (lower = better set to remove)
PROXY_OBJECTIVES = ("proxy_sum", "proxy_span")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
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
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5, check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, package versions and commit, recorded in every record (asv-style)."""
    versions = {}
    for pkg in ("torch", "transformers", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "blockbench": __version__,
        "git_commit": _git_commit(),
        "packages": versions,
    }


@dataclass
class RunSummary:
    total: int
    skipped: int
    ran: int = 0
    failed: int = 0
    #: cells left to another ``bench run`` process working on the same results dir
    elsewhere: int = 0
    records: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class _StageError(Exception):
    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.stage = stage
        self.exc = exc
        self.tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class _Lazy:
    """A value computed on first use; a failure is remembered and re-raised for later users."""

    def __init__(self, stage: str, fn) -> None:
        self.stage, self.fn = stage, fn
        self.value = None
        self.error: _StageError | None = None
        self.done = False

    def get(self):
        if self.error is not None:
            raise self.error
        if not self.done:
            try:
                self.value = self.fn()
                self.done = True
            except Exception as exc:  # noqa: BLE001 - recorded in the cell's record
                self.error = _StageError(self.stage, exc)
                raise self.error from exc
        return self.value


class Runner:
    def __init__(self, config: GridConfig, results_dir: str | Path, reporter: Reporter | None = None) -> None:
        self.config = config
        self.store = ResultStore(results_dir)
        self.reporter = reporter or Reporter()
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.env = environment(self.device)
        #: how often each expensive stage really ran in this process (tests read it)
        self.counters = {"model_loads": 0, "captures": 0, "scorings": 0, "evaluations": 0, "accuracy_runs": 0}

    # ------------------------------------------------------------------ expensive shared stages
    def _load_model(self, spec: dict) -> dict:
        from algorithms.models.zoo import load_model

        start = time.perf_counter()
        model, tokenizer, info = load_model(
            spec["name"], device=str(self.device), dtype=self.dtype, trust_remote_code=spec["trust_remote_code"]
        )
        self.counters["model_loads"] += 1
        return {"model": model, "tokenizer": tokenizer, "info": info, "seconds": time.perf_counter() - start}

    def _hidden_states(self, loaded: dict, calibration: dict) -> dict:
        from algorithms.data import calibration_batch, source_fingerprint
        from algorithms.models.capture import capture_hidden_states

        key = short_hash({
            "model": loaded["info"]["fingerprint"], "calibration": calibration,
            "source": source_fingerprint(calibration["source"]), "dtype": self.config.dtype,
            "protocol": PROTOCOL_VERSION,
        })
        cached = self.store.get_tensors("hidden", key) if self.config.cache_hidden_states else None
        ids = calibration_batch(  # cheap; kept for the true-loss objective of search selectors
            loaded["tokenizer"], calibration["source"], samples=calibration["samples"],
            seq_len=calibration["seq_len"], seed=calibration["seed"],
        )
        if cached is not None:
            tensors, meta = cached
            return {"key": key, "states": tensors["states"], "stats": {k: float(v) for k, v in meta.items()},
                    "seconds": 0.0, "cached": True, "ids": ids}
        timer = Timer(self.device)
        with timer.stage("capture"):
            states, stats = capture_hidden_states(
                loaded["model"], ids, batch_size=self.config.calibration.batch_size
            )
        self.counters["captures"] += 1
        if not torch.isfinite(states).all():
            bad = sorted({int(i) for i in (~torch.isfinite(states)).nonzero()[:, 0].tolist()})
            raise FloatingPointError(f"hidden states contain NaN or inf at depths {bad}")
        stats["capture_seconds"] = timer.times["capture"]
        if self.config.cache_hidden_states:
            self.store.put_tensors("hidden", key, {"states": states}, {k: repr(v) for k, v in stats.items()})
        return {"key": key, "states": states, "stats": stats, "seconds": timer.times["capture"], "cached": False,
                "ids": ids}

    def _scores(self, hidden: dict, metric_spec) -> dict:
        cls = METRICS.get(metric_spec.name)
        key = short_hash({"hidden": hidden["key"], "metric": metric_spec.model_dump(), "version": cls.version})
        cached = self.store.get_json("scores", key)
        if cached is not None:
            return {**cached, "scores": torch.tensor(cached["scores"], dtype=torch.float64), "cached": True}
        metric = cls(**metric_spec.params)
        timer = Timer(self.device)
        if "device_states" not in hidden:  # one host-to-device copy per group, shared by every metric
            with timer.stage("to_device"):
                hidden["device_states"] = hidden["states"].to(self.device)
            hidden["to_device_seconds"] = timer.times["to_device"]
        with timer.stage("scoring"):
            scores = metric.score_blocks(hidden["device_states"]).cpu()
        self.counters["scorings"] += 1
        if not torch.isfinite(scores).all():
            bad = [i for i, s in enumerate(scores.tolist()) if s != s or abs(s) == float("inf")]
            raise FloatingPointError(f"metric {metric_spec.name!r} gave non-finite scores for blocks {bad}")
        out = {"scores": scores.tolist(), "seconds": timer.times["scoring"], "device": str(self.device),
               "higher_is_important": cls.higher_is_important}
        self.store.put_json("scores", key, out)
        return {**out, "scores": scores, "cached": False}

    def _evaluate(self, loaded: dict, removed: tuple[int, ...], memo: dict) -> dict:
        from algorithms.data import heldout_windows, source_fingerprint
        from algorithms.evaluations.perplexity import perplexity
        from algorithms.models.blocks import count_parameters
        from algorithms.models.masking import skip_blocks

        ppl_spec = self.config.perplexity
        key = short_hash({
            "model": loaded["info"]["fingerprint"], "removed": list(removed), "dtype": self.config.dtype,
            "perplexity": ppl_spec.model_dump(exclude={"batch_size"}),
            "source": source_fingerprint(ppl_spec.source), "protocol": PROTOCOL_VERSION,
        })
        if key in memo:
            return {**memo[key], "cached": True}
        cached = self.store.get_json("eval", key)
        if cached is not None:
            memo[key] = cached
            return {**cached, "cached": True}
        windows = heldout_windows(
            loaded["tokenizer"], ppl_spec.source, seq_len=ppl_spec.seq_len, max_windows=ppl_spec.max_windows
        )
        timer = Timer(self.device)
        # the blocks are masked in place for the evaluation (bit-identical to removal, no model copy)
        with skip_blocks(loaded["model"], removed) as model, timer.stage("perplexity"):
            result = perplexity(model, windows, batch_size=ppl_spec.batch_size)
            result["parameters"] = count_parameters(model)
        self.counters["evaluations"] += 1
        result["seconds"] = timer.times["perplexity"]
        result["removed"] = list(removed)
        self.store.put_json("eval", key, result)
        memo[key] = result
        return {**result, "cached": False}

    def _eval_key(self, loaded: dict, removed: tuple[int, ...], spec) -> str:
        return short_hash({"model": loaded["info"]["fingerprint"], "removed": list(removed),
                           "dtype": self.config.dtype, "spec": spec.model_dump(), "protocol": PROTOCOL_VERSION})

    def _accuracy(self, loaded: dict, removed: tuple[int, ...], memo: dict) -> dict:
        """lm-eval accuracy of the model without ``removed``: once per block set (dense included)."""
        from algorithms.evaluations.lmeval import evaluate_tasks
        from algorithms.models.masking import skip_blocks

        spec = self.config.accuracy
        key = "acc-" + self._eval_key(loaded, removed, spec)
        if key in memo:
            return memo[key]
        result = self.store.get_json("accuracy", key)
        if result is None:
            timer = Timer(self.device)
            with skip_blocks(loaded["model"], removed) as model, timer.stage("accuracy"):
                tasks = evaluate_tasks(model, loaded["tokenizer"], list(spec.tasks), limit=spec.limit,
                                       num_fewshot=spec.num_fewshot, batch_size=spec.batch_size, seed=spec.seed)
            self.counters["accuracy_runs"] += 1
            result = {"tasks": tasks, "score": accuracy_score(tasks), "seconds": timer.times["accuracy"]}
            self.store.put_json("accuracy", key, result)
        memo[key] = result
        return result

    def _speed(self, loaded: dict, removed: tuple[int, ...]) -> dict:
        """Speedup of the pruned over the dense model, measured back to back in this process."""
        from algorithms.evaluations.speed import compare_speed

        spec = self.config.speed
        key = "speed-" + self._eval_key(loaded, removed, spec)
        if (cached := self.store.get_json("speed", key)) is not None:
            return cached
        # dense and pruned interleaved in this process: a ratio, never a stored absolute time
        result = compare_speed(loaded["model"], removed, prompt_lengths=tuple(spec.prompt_lengths),
                               decode_tokens=spec.decode_tokens, repeats=spec.repeats, warmup=spec.warmup,
                               threads=spec.threads)
        n = loaded["info"]["n_blocks"]
        result["dense"]["n_blocks"], result["pruned"]["n_blocks"] = n, n - len(removed)
        self.store.put_json("speed", key, result)
        return result

    # ------------------------------------------------------------------ one cell, in three parts
    # A cell is (1) selected: model, hidden states, scores, selection; (2) its block set and the dense
    # model are evaluated, once per distinct set (perplexity, accuracy, speed); (3) completed into its
    # record. The local executor runs the three in a row; the Ray executor (bench.executors) runs (1)
    # as one task per calibration group and (2) as one task per distinct set, and (3) on the driver.

    def _header(self, cell: Cell) -> dict[str, Any]:
        return {
            "schema": 1, "cell_id": cell.cell_id, "grid": cell.grid, "spec": cell.spec(),
            "versions": cell.versions(), "env": self.env,
            "labels": {"model": cell.model["name"], "metric": cell.metric.label(),
                       "selector": cell.selector.label(), "budget": cell.budget_label,
                       "seed": cell.calibration["seed"], "calibration": calibration_label(cell.calibration)},
        }

    @staticmethod
    def _failed(record: dict[str, Any], exc: BaseException, stage: str) -> dict[str, Any]:
        """``record`` marked failed at ``stage`` (a ``_StageError`` names its own stage)."""
        err = exc.exc if isinstance(exc, _StageError) else exc
        tb = exc.tb if isinstance(exc, _StageError) else traceback.format_exc()
        if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the next cell the memory back
        return Runner._failure(record, exc.stage if isinstance(exc, _StageError) else stage,
                               f"{type(err).__name__}: {err}", tb)

    @staticmethod
    def _failure(record: dict[str, Any], stage: str, error: str, tb: str) -> dict[str, Any]:
        """A failed record: what ``record`` knew (the chosen blocks, when selection was done) and why."""
        return {
            **{k: v for k, v in record.items() if k not in ("timings", "cache_hits")},
            "status": "failed", "stage": stage, "error": error, "traceback": tb,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        }

    def _select(self, cell: Cell, model: _Lazy, hidden: _Lazy) -> dict[str, Any]:
        """Part 1: the cell's header with the chosen blocks (``status: selected``), or a failed record."""
        record = self._header(cell)
        stage = "load_model"
        try:
            self.reporter.stage(f"{cell.model['name']}: loading model")
            loaded = model.get()
            info = loaded["info"]
            n_blocks = info["n_blocks"]
            record["model"] = {k: info[k] for k in ("name", "fingerprint", "n_blocks", "architecture", "parameters")}
            stage = "budget"
            k = cell.resolve_k(n_blocks)
            protected = cell.resolve_protected(n_blocks)
            stage = "capture"
            self.reporter.stage(f"{cell.model['name']}: hidden states, {calibration_label(cell.calibration)}, "
                                f"seed {cell.calibration['seed']}")
            hs = hidden.get()
            stage = "scoring"
            self.reporter.stage(f"{cell.metric.label()}: scoring")
            scored = self._scores(hs, cell.metric)
            stage = "selection"
            selector = SELECTORS.get(cell.selector.name)(**cell.selector.params)
            # objectives for search selectors: one factory per (calibration group, metric), kept in the
            # group's hidden-state dict; factories of one group share the true-loss cache
            factories = hs.setdefault("objective_factories", {})
            if cell.metric.label() not in factories:
                from algorithms.objectives import ObjectiveFactory

                factories[cell.metric.label()] = ObjectiveFactory(
                    model=loaded["model"], input_ids=hs["ids"],
                    states=lambda: hs["device_states"] if "device_states" in hs
                    else hs.setdefault("device_states", hs["states"].to(self.device)),
                    metric=METRICS.get(cell.metric.name)(**cell.metric.params),
                    higher_is_important=scored["higher_is_important"], block_scores=scored["scores"],
                    batch_size=self.config.calibration.batch_size, fingerprint=hs["key"],
                    share=next(iter(factories.values()), None),
                )
            problem = SelectionProblem(
                n_blocks=n_blocks, k=k, scores=scored["scores"],
                higher_is_important=scored["higher_is_important"], protected=protected,
                seed=cell.calibration["seed"], objectives=factories[cell.metric.label()],
                workdir=self.store.root / "optuna",
            )
            t0 = time.perf_counter()
            chosen = selector(problem)
            selection_seconds = time.perf_counter() - t0
            removed = tuple(chosen.blocks)
            # every selector's choice scored on the same cheap proxies, so selectors compare on equal terms
            # (the first cell of a group that needs spans of a new length pays for scoring them: "proxies")
            t0 = time.perf_counter()
            proxies = {kind: factories[cell.metric.label()].get(kind)(removed) for kind in PROXY_OBJECTIVES}
            proxy_seconds = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one failing cell never stops the grid
            return self._failed(record, exc, stage)
        record.update({
            "status": "selected",
            "k": k,
            "removed_blocks": list(removed),
            "scores": scored["scores"].tolist(),
            "higher_is_important": scored["higher_is_important"],
            "selector_result": {"evaluations": chosen.evaluations, "info": chosen.info, "proxies": proxies},
            "calibration_stats": {k2: v for k2, v in hs["stats"].items()},
            "timings": {"load_model": loaded["seconds"], "capture": hs["seconds"], "scoring": scored["seconds"],
                        "selection": selection_seconds, "proxies": proxy_seconds},
            "cache_hits": {"hidden": hs["cached"], "scores": scored["cached"]},
        })
        return record

    def _evaluate_set(self, loaded: dict, removed: tuple[int, ...], memo: dict) -> dict[str, Any]:
        """Part 2: perplexity, and accuracy and speed when the grid asks, of the model without
        ``removed`` (``()``: the dense model, never timed for speed). Raises ``_StageError``."""
        stage = "evaluation"
        try:
            self.reporter.stage(f"blocks {list(removed) or 'none'}: perplexity")
            out: dict[str, Any] = {"ppl": self._evaluate(loaded, removed, memo)}
            if self.config.accuracy is not None:
                stage = "accuracy"
                self.reporter.stage(f"blocks {list(removed) or 'none'}: accuracy")
                out["accuracy"] = self._accuracy(loaded, removed, memo)
            if self.config.speed is not None and removed:
                stage = "speed"
                self.reporter.stage(f"blocks {list(removed)}: speed")
                out["speed"] = self._speed(loaded, removed)
        except _StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the records of the cells that chose the set
            raise _StageError(stage, exc) from exc
        return out

    def _complete(self, selected: dict[str, Any], dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
        """Part 3: the finished record from part 1 and the part-2 results of the dense model and the set."""
        record = {k: v for k, v in selected.items() if k not in ("timings", "cache_hits")}
        ppl_dense, ppl_pruned = dense["ppl"], pruned["ppl"]
        extra: dict[str, Any] = {}
        if "accuracy" in pruned:
            acc_dense, acc_pruned = dense["accuracy"], pruned["accuracy"]
            extra["accuracy"] = {
                "dense": acc_dense, "pruned": acc_pruned,
                "retained": acc_pruned["score"] / acc_dense["score"] if acc_dense["score"] else None,
            }
        if "speed" in pruned:
            extra["speed"] = pruned["speed"]
        record.update({
            "status": "ok",
            "ppl": {"dense": ppl_dense["ppl"], "pruned": ppl_pruned["ppl"], "tokens": ppl_pruned["tokens"]},
            "parameters": {"dense": ppl_dense["parameters"], "pruned": ppl_pruned["parameters"],
                           "kept_share": ppl_pruned["parameters"] / ppl_dense["parameters"]},
            "timings": {**selected["timings"], "perplexity_dense": ppl_dense["seconds"],
                        "perplexity_pruned": ppl_pruned["seconds"]},
            "cache_hits": {**selected["cache_hits"], "eval": ppl_pruned["cached"]},
            **extra,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        })
        return record

    def _run_cell(self, cell: Cell, model: _Lazy, hidden: _Lazy, eval_memo: dict) -> dict:
        """All three parts in this process."""
        selected = self._select(cell, model, hidden)
        if selected["status"] != "selected":
            return selected
        try:
            loaded = model.get()
            dense = self._evaluate_set(loaded, (), eval_memo)
            pruned = self._evaluate_set(loaded, tuple(selected["removed_blocks"]), eval_memo)
        except _StageError as exc:
            return self._failed(selected, exc, exc.stage)
        return self._complete(selected, dense, pruned)

    # ------------------------------------------------------------------ the grid
    def run(self, cells: list[Cell] | None = None, executor: str = "local", address: str | None = None) -> RunSummary:
        """Run the unfinished ``cells`` (all the grid's by default) in this process (``executor="local"``)
        or as Ray tasks (``"ray"``, on the cluster at ``address``; see :mod:`bench.executors`)."""
        cells = cells if cells is not None else expand(self.config)
        pending = [c for c in cells if not self.store.is_done(c.cell_id)]
        summary = RunSummary(total=len(cells), skipped=len(cells) - len(pending))
        if executor not in ("local", "ray"):
            raise ValueError(f"executor {executor!r}: choose local or ray")
        self.reporter.start(len(pending), summary.skipped)
        if executor == "ray":
            from bench.executors import run_ray

            try:
                run_ray(self, pending, summary, address)
            finally:
                self.reporter.finish()
            return summary
        try:
            for _, model_cells in itertools.groupby(pending, key=lambda c: c.model["name"]):
                model_cells = list(model_cells)
                model = _Lazy("load_model", lambda spec=model_cells[0].model: self._load_model(spec))
                eval_memo: dict = {}
                for _, group in itertools.groupby(model_cells, key=lambda c: short_hash(c.calibration)):
                    group = list(group)
                    hidden = _Lazy(
                        "capture",
                        lambda cal=group[0].calibration, m=model: self._hidden_states(m.get(), cal),
                    )
                    for cell in group:
                        with self.store.claim(cell.cell_id) as mine:
                            if not mine or self.store.is_done(cell.cell_id):
                                summary.elsewhere += 1  # another process runs or just ran it
                                self.reporter.cell_skipped(cell)
                                continue
                            record = self._run_cell(cell, model, hidden, eval_memo)
                            self.store.write_record(record)
                        summary.records.append(record)
                        summary.ran += 1
                        summary.failed += record["status"] != "ok"
                        self.reporter.cell_done(cell, record)
        finally:
            self.reporter.finish()
        return summary
