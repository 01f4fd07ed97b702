"""Where a grid's cells run: ``local`` (in this process, :meth:`bench.runner.Runner.run`) or ``ray``.

The Ray executor keeps the expensive stages shared, as the local one does, by splitting a cell in the
runner's three parts:

1. one **selection task per calibration group** (model × calibration set × seed): it loads the model,
   captures the hidden states once, scores every metric of the group and runs every selector of it;
2. one **evaluation task per distinct block set** of a model, the dense model included: perplexity,
   accuracy and speed when the grid asks for them, however many cells chose that set;
3. the **driver** completes each cell's record once its set and the dense model are evaluated, and
   writes it through the same atomic record store, so resume and the leaderboard work unchanged.

Tasks ask Ray for the grid's ``resources`` (``num_cpus``, ``num_gpus``). Caches (hidden states, scores,
evaluations) are written by the tasks under the results folder *as seen on the node that runs them*:
on a cluster, point ``--results`` at a shared filesystem to share caches across nodes; records are
always written by the driver. Ray is an optional extra (``pip install blockbench[ray]``), imported
only when this executor is chosen.
"""

from __future__ import annotations

import contextlib
import itertools
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import GridConfig
from bench.grid import Cell, expand, short_hash

if TYPE_CHECKING:
    from bench.runner import Runner, RunSummary

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """The executor cannot start (Ray missing, or its cluster unreachable): a usage error."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'blockbench[ray]'") from None
    return ray


def _worker_runner(config_json: dict[str, Any], results_dir: str) -> Runner:
    from bench.runner import Runner

    return Runner(GridConfig.model_validate(config_json), results_dir)


def select_group(config_json: dict[str, Any], results_dir: str, cell_ids: list[str]) -> list[dict[str, Any]]:
    """Part 1 for one calibration group (a Ray task): the cells' selected (or failed) records."""
    from bench.runner import _Lazy

    runner = _worker_runner(config_json, results_dir)
    wanted = set(cell_ids)
    cells = [c for c in expand(runner.config) if c.cell_id in wanted]
    model = _Lazy("load_model", lambda: runner._load_model(cells[0].model))
    hidden = _Lazy("capture", lambda: runner._hidden_states(model.get(), cells[0].calibration))
    return [runner._select(cell, model, hidden) for cell in cells]


def evaluate_set(config_json: dict[str, Any], results_dir: str, model_spec: dict[str, Any],
                 removed: tuple[int, ...]) -> dict[str, Any]:
    """Part 2 for one block set of one model (a Ray task): ``{"result": ...}`` or ``{"error": ...}``
    with the stage, so the driver fails exactly the cells that chose the set."""
    from bench.runner import _StageError

    runner = _worker_runner(config_json, results_dir)
    try:
        try:
            loaded = runner._load_model(model_spec)
        except Exception as exc:  # noqa: BLE001 - reported in the records of the cells that need it
            raise _StageError("load_model", exc) from exc
        return {"result": runner._evaluate_set(loaded, tuple(removed), {})}
    except _StageError as exc:
        return _error(exc.stage, exc.exc, exc.tb)


def _error(stage: str, exc: BaseException, tb: str) -> dict[str, Any]:
    """An evaluation that failed, as the driver turns it into failed records."""
    return {"error": {"stage": stage, "exc": f"{type(exc).__name__}: {exc}", "traceback": tb}}


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


def _set_key(cell_model: dict[str, Any], removed: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    return short_hash(cell_model), tuple(removed)


def run_ray(runner: Runner, pending: list[Cell], summary: RunSummary, address: str | None = None) -> None:
    """Run ``pending`` cells on a Ray cluster (a local one when ``address`` is None), writing each record
    from this driver as soon as its set and its model's dense evaluation are done."""
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - e.g. no cluster at that address
            raise ExecutorError(f"--address {address!r}: cannot reach a Ray cluster: {exc}") from None
        started_here = True
    res = runner.config.resources
    options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": 0}
    select_task = ray.remote(select_group).options(**options)
    evaluate_task = ray.remote(evaluate_set).options(**options)
    config_json = runner.config.model_dump(mode="json")
    results_dir = str(Path(runner.store.root).resolve())
    try:
        with contextlib.ExitStack() as claims:
            mine: list[Cell] = []
            for cell in pending:  # the driver holds each cell's lock until its record is written
                if not claims.enter_context(runner.store.claim(cell.cell_id)) or runner.store.is_done(cell.cell_id):
                    summary.elsewhere += 1
                    runner.reporter.cell_skipped(cell)
                    continue
                mine.append(cell)
            by_id = {c.cell_id: c for c in mine}
            group_refs = {}
            for _, group in itertools.groupby(mine, key=lambda c: (c.model["name"], short_hash(c.calibration))):
                ids = [c.cell_id for c in group]
                group_refs[select_task.remote(config_json, results_dir, ids)] = ids
            eval_refs: dict[Any, tuple] = {}
            evaluated: dict[tuple, dict[str, Any]] = {}
            submitted: set[tuple] = set()
            waiting: list[dict[str, Any]] = []

            def finish(record: dict[str, Any]) -> None:
                runner.store.write_record(record)
                summary.records.append(record)
                summary.ran += 1
                summary.failed += record["status"] != "ok"
                runner.reporter.cell_done(by_id[record["cell_id"]], record)

            def need(cell: Cell, removed: tuple[int, ...]) -> tuple:
                key = _set_key(cell.model, removed)
                if key not in submitted:
                    submitted.add(key)
                    eval_refs[evaluate_task.remote(config_json, results_dir, cell.model, removed)] = key
                return key

            while group_refs or eval_refs:
                ready, _ = ray.wait([*group_refs, *eval_refs], num_returns=1)
                ref = ready[0]
                if ref in group_refs:
                    ids = group_refs.pop(ref)
                    try:
                        selected = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task itself died (e.g. a worker crash)
                        selected = [_lost(runner, by_id[i], exc) for i in ids]
                    for record in selected:
                        if record["status"] != "selected":
                            finish(record)
                            continue
                        cell = by_id[record["cell_id"]]
                        record["_keys"] = (need(cell, ()), need(cell, tuple(record["removed_blocks"])))
                        waiting.append(record)
                else:
                    key = eval_refs.pop(ref)
                    try:
                        evaluated[key] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task itself died
                        evaluated[key] = _error("evaluation", exc, traceback.format_exc())
                still = []
                for record in waiting:
                    dense_key, pruned_key = record["_keys"]
                    if dense_key not in evaluated or pruned_key not in evaluated:
                        still.append(record)
                        continue
                    selected = {k: v for k, v in record.items() if k != "_keys"}
                    dense, pruned = evaluated[dense_key], evaluated[pruned_key]
                    error = dense.get("error") or pruned.get("error")
                    if error is not None:
                        finish(runner._failure(selected, error["stage"], error["exc"], error["traceback"]))
                    else:
                        finish(runner._complete(selected, dense["result"], pruned["result"]))
                waiting = still
    finally:
        if started_here:
            ray.shutdown()


def _lost(runner: Runner, cell: Cell, exc: BaseException) -> dict[str, Any]:
    """The failed record of a cell whose selection task died without returning."""
    return runner._failure(runner._header(cell), "selection_task", f"{type(exc).__name__}: {exc}",
                           traceback.format_exc())
