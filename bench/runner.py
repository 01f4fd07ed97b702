"""Run a grid: plan the unfinished cells and hand them to an executor.

:class:`Runner` is the entry point a script or the CLI uses::

    runner = Runner(load_config("configs/quick.yaml"), "results/quick")
    summary = runner.run()                       # local executor
    summary = runner.run(executor="ray")         # the same steps as Ray tasks

The steps of a cell (load → capture → score → select → transform → evaluate → record) are the public
methods of :class:`bench.stages.Pipeline`; *where* they run is an executor from
:data:`bench.executors.EXECUTORS`. A cell that raises is written as a failed record (stage, error,
traceback) and the grid goes on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.config import GridConfig
from bench.executors import EXECUTORS, ExecutorError, RunSummary
from bench.grid import Cell, expand
from bench.progress import Reporter
from bench.stages import Pipeline
from estimators.registry import RegistryError

__all__ = ["Runner", "RunSummary"]


class Runner:
    """A grid on a results folder: ``run`` skips finished cells and gives the rest to an executor."""

    def __init__(self, config: GridConfig, results_dir: str | Path, reporter: Reporter | None = None, *,
                 allow_remote_code: bool = False) -> None:
        self.config = config
        self.pipeline = Pipeline(config, results_dir, reporter, allow_remote_code=allow_remote_code)
        self.store = self.pipeline.store
        self.reporter = self.pipeline.reporter

    @property
    def counters(self) -> Counter[str]:
        """How often each expensive step really ran in this process (``model_loads``, ``captures``,
        ``scorings``, ``measure:<evaluation>``)."""
        return self.pipeline.counters

    def run(self, cells: list[Cell] | None = None, executor: str = "local", address: str | None = None) -> RunSummary:
        """Run the unfinished ``cells`` (all the grid's by default) with the executor named ``executor``
        (``address``: the Ray cluster for ``ray``). :class:`ExecutorError` when it cannot start."""
        try:
            runner_cls = EXECUTORS.get(executor)
        except RegistryError as exc:
            raise ExecutorError(f"--executor: {exc}") from None
        chosen = runner_cls(address)
        cells = cells if cells is not None else expand(self.config)
        pending = [c for c in cells if not self.store.is_done(c.cell_id)]
        summary = RunSummary(total=len(cells), skipped=len(cells) - len(pending))
        self.reporter.start(len(pending), summary.skipped)
        try:
            chosen.run(self.pipeline, pending, summary)
        finally:
            self.reporter.finish()
        return summary
