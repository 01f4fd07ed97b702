"""Where a grid's cells run: the executor registry (``local``, ``ray``, plugins in the entry-point group
``blockbench.executors``). Every executor schedules the same public steps of
:class:`bench.stages.Pipeline`; none has stages of its own.

- ``local``: this process, cells in model → calibration group order; a model is loaded once, hidden
  states captured once per calibration group, each distinct block set evaluated once per model.
- ``ray``: the same sharing as Ray tasks:

  1. one **selection task per calibration group** (model × calibration set × seed): it loads the
     model, captures the hidden states once, scores every metric of the group and runs every
     selector of it (:func:`select_group`);
  2. one **evaluation task per distinct block set** of a model, the dense model included: every
     evaluation of the grid, however many cells chose that set (:func:`evaluate_set`);
  3. the **driver** completes each cell's record once its set and the dense model are evaluated, and
     writes it through the same atomic record store, so resume and the leaderboard work unchanged.

  Tasks ask Ray for the grid's ``resources`` (``num_cpus``, ``num_gpus``). Caches are written by the
  tasks under the results folder *as seen on the node that runs them*: on a cluster, point ``--results``
  at a shared filesystem. Ray is an optional extra (``pip install blockbench[ray]``), imported only
  when this executor is chosen.

A plugin executor subclasses :class:`Executor` and implements :meth:`Executor.run`.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from algorithms import extras
from bench.config import config_sections, parse_config
from bench.grid import Cell, expand, short_hash
from bench.records import CellRecord
from bench.stages import CELL_FAILURES, Lazy, ModelMemo, Pipeline, Removal, SetEvaluation, StageError, failure
from estimators.registry import Registry


class ExecutorError(RuntimeError):
    """The executor cannot start (Ray missing, or its cluster unreachable): a usage error."""


@dataclass
class RunSummary:
    """What a run did: cells in the grid, skipped as finished, run here, failed, left to another process."""

    total: int
    skipped: int
    ran: int = 0
    failed: int = 0
    #: cells left to another ``bench run`` process working on the same results dir
    elsewhere: int = 0
    records: list[CellRecord] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, record: CellRecord) -> None:
        self.records.append(record)
        self.ran += 1
        self.failed += record.status != "ok"


class Executor(abc.ABC):
    """Base of executors: ``run`` every pending cell through ``pipeline``, claiming each cell in the
    store while it runs, writing each record as soon as it is done and counting it in ``summary``."""

    name: ClassVar[str] = ""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    @abc.abstractmethod
    def run(self, pipeline: Pipeline, cells: list[Cell], summary: RunSummary) -> None:
        """Run ``cells`` (none finished yet when the run started)."""


class LocalExecutor(Executor):
    """This process: a model loaded once, hidden states captured once per calibration group."""

    name = "local"

    def __init__(self, address: str | None = None) -> None:
        if address is not None:
            raise ExecutorError("--address: only used with --executor ray")
        super().__init__(address)

    def run(self, pipeline: Pipeline, cells: list[Cell], summary: RunSummary) -> None:
        store, reporter = pipeline.store, pipeline.reporter
        for _, model_cells in itertools.groupby(cells, key=lambda c: c.model["name"]):
            model_cells = list(model_cells)
            model = Lazy("load_model", lambda spec=model_cells[0].model: pipeline.load(spec))
            memo = ModelMemo()
            for _, group in itertools.groupby(model_cells, key=lambda c: short_hash(c.calibration)):
                group = list(group)
                captured = Lazy("capture", lambda cal=group[0].calibration, m=model, group=group:
                                pipeline.capture(m.get(), cal, **capture_options(group)))
                for cell in group:
                    with store.claim(cell.cell_id) as mine:
                        if not mine or store.is_done(cell.cell_id):
                            summary.elsewhere += 1  # another process runs or just ran it
                            reporter.cell_skipped(cell)
                            continue
                        record = pipeline.run_cell(cell, model, captured, memo)
                        store.write_record(record)
                    summary.add(record)
                    reporter.cell_done(cell, record)


# ---------------------------------------------------------------------------------------- Ray
def select_group(config_json: dict[str, Any], results_dir: str, cell_ids: list[str],
                 allow_remote_code: bool = False) -> list[dict[str, Any]]:
    """Selection for one calibration group (a Ray task): the cells' selected (or failed) records."""
    pipeline = Pipeline(parse_config(config_json), results_dir, allow_remote_code=allow_remote_code)
    wanted = set(cell_ids)
    cells = [c for c in expand(pipeline.config) if c.cell_id in wanted]
    model = Lazy("load_model", lambda: pipeline.load(cells[0].model))
    captured = Lazy("capture", lambda: pipeline.capture(model.get(), cells[0].calibration, **capture_options(cells)))
    return [pipeline.select_cell(cell, model, captured).to_json() for cell in cells]


def needs_sublayers(cells: list[Cell]) -> bool:
    """Whether a calibration group captures the stream between the branches (a cell removes branches)."""
    return any(c.unit != "block" for c in cells)


def capture_options(cells: list[Cell]) -> dict[str, Any]:
    """:meth:`Pipeline.capture`'s keywords for a calibration group: ``sublayers`` when a cell removes
    branches, the ``cells`` when the grid streams scoring. Only what is needed is passed: a block-only,
    stored grid calls ``capture(loaded, calibration)`` as before."""
    return {**({"sublayers": True} if needs_sublayers(cells) else {}),
            **({"cells": cells} if cells and cells[0].scoring == "streamed" else {})}


def evaluate_set(config_json: dict[str, Any], results_dir: str, model_spec: dict[str, Any],
                 removed: Removal | tuple[int, ...], allow_remote_code: bool = False) -> SetEvaluation | dict[str, Any]:
    """Evaluation of one removal of one model (a Ray task): the :class:`SetEvaluation`, or
    ``{"stage", "exc", "traceback"}`` so the driver fails exactly the cells that chose the set."""
    pipeline = Pipeline(parse_config(config_json), results_dir, allow_remote_code=allow_remote_code)
    try:
        try:
            loaded = pipeline.load(model_spec)
        except CELL_FAILURES as exc:  # reported in the records of the cells that need it
            raise StageError("load_model", exc) from exc
        return pipeline.evaluate(loaded, removed if isinstance(removed, Removal) else tuple(removed))
    except StageError as exc:
        return _error(exc.stage, exc.exc, exc.tb)


def _error(stage: str, exc: BaseException, tb: str) -> dict[str, Any]:
    return {"stage": stage, "exc": f"{type(exc).__name__}: {exc}", "traceback": tb}


def _check_reachable(address: str | None) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes); ``auto``,
    ``ray://`` and no address are left to Ray."""
    import socket

    if not address or address == "auto" or "://" in address or address.count(":") != 1:
        return
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise ExecutorError(f"--address {address!r}: no Ray cluster answers there ({exc})") from None


def _import_ray():
    return extras.require("ray", feature="--executor ray", extra="ray")


class RayExecutor(Executor):
    """Ray tasks: one per calibration group (selection), one per distinct block set (evaluation)."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        super().__init__(address)
        try:
            _import_ray()
        except extras.MissingExtra as exc:
            raise ExecutorError(str(exc)) from None

    def run(self, pipeline: Pipeline, cells: list[Cell], summary: RunSummary) -> None:
        ray = _import_ray()

        started_here = False
        if not ray.is_initialized():
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - e.g. no cluster at that address
                raise ExecutorError(f"--address {self.address!r}: cannot reach a Ray cluster: {exc}") from None
            started_here = True
        try:
            self._run(ray, pipeline, cells, summary)
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _run(ray: Any, pipeline: Pipeline, cells: list[Cell], summary: RunSummary) -> None:
        store, reporter = pipeline.store, pipeline.reporter
        res = pipeline.config.resources
        options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": 0}
        select_task = ray.remote(select_group).options(**options)
        evaluate_task = ray.remote(evaluate_set).options(**options)
        config_json = config_sections(pipeline.config)
        results_dir = str(Path(store.root).resolve())
        remote_code = pipeline.allow_remote_code
        with contextlib.ExitStack() as claims:
            mine: list[Cell] = []
            for cell in cells:  # the driver holds each cell's lock until its record is written
                if not claims.enter_context(store.claim(cell.cell_id)) or store.is_done(cell.cell_id):
                    summary.elsewhere += 1
                    reporter.cell_skipped(cell)
                    continue
                mine.append(cell)
            by_id = {c.cell_id: c for c in mine}
            group_refs: dict[Any, list[str]] = {}
            for _, group in itertools.groupby(mine, key=lambda c: (c.model["name"], short_hash(c.calibration))):
                ids = [c.cell_id for c in group]
                group_refs[select_task.remote(config_json, results_dir, ids, remote_code)] = ids
            eval_refs: dict[Any, tuple] = {}
            evaluated: dict[tuple, SetEvaluation | dict[str, Any]] = {}
            submitted: set[tuple] = set()
            waiting: list[tuple[CellRecord, tuple, tuple]] = []

            def finish(record: CellRecord) -> None:
                store.write_record(record)
                summary.add(record)
                reporter.cell_done(by_id[record.cell_id], record)

            def need(cell: Cell, removed: Removal) -> tuple:
                key = (short_hash(cell.model), removed)
                if key not in submitted:
                    submitted.add(key)
                    eval_refs[evaluate_task.remote(config_json, results_dir, cell.model, removed, remote_code)] = key
                return key

            while group_refs or eval_refs:
                ready, _ = ray.wait([*group_refs, *eval_refs], num_returns=1)
                ref = ready[0]
                if ref in group_refs:
                    ids = group_refs.pop(ref)
                    try:
                        selected = [CellRecord.model_validate(r) for r in ray.get(ref)]
                    except Exception as exc:  # noqa: BLE001 - the task itself died (e.g. a worker crash)
                        selected = [failure(pipeline.header(by_id[i]), "selection_task",
                                            f"{type(exc).__name__}: {exc}", traceback.format_exc()) for i in ids]
                    for record in selected:
                        if record.status != "selected":
                            finish(record)
                            continue
                        cell = by_id[record.cell_id]
                        waiting.append((record, need(cell, Removal(())),
                                        need(cell, Removal.of(cell, record.removed_blocks or ()))))
                else:
                    key = eval_refs.pop(ref)
                    try:
                        evaluated[key] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task itself died
                        evaluated[key] = _error("evaluation", exc, traceback.format_exc())
                still = []
                for record, dense_key, pruned_key in waiting:
                    if dense_key not in evaluated or pruned_key not in evaluated:
                        still.append((record, dense_key, pruned_key))
                        continue
                    dense, pruned = evaluated[dense_key], evaluated[pruned_key]
                    error = next((e for e in (dense, pruned) if isinstance(e, dict)), None)
                    if error is not None:
                        finish(failure(record, error["stage"], error["exc"], error["traceback"]))
                    else:
                        finish(pipeline.complete(record, dense, pruned))
                waiting = still


EXECUTORS: Registry[type[Executor]] = Registry("executor", entry_point_group="blockbench.executors", base=Executor)
EXECUTORS.register("local", "bench.executors:LocalExecutor")
EXECUTORS.register("ray", "bench.executors:RayExecutor")
