"""Progress display for ``bench run``: a rich bar over cells with the current stage, or nothing.

Long steps inside a cell (a model's download and conversion, lm-eval's requests) show a second row
under the cells bar: :meth:`Reporter.step` gives the plain callback (:data:`algorithms.progress.Progress`)
that the lower layers accept as their ``progress`` argument.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def _ignore(label: str, done: float, total: float | None, unit: str) -> None:
    return None


class Reporter:
    """Silent reporter (``--quiet`` / ``--json``); subclasses show progress."""

    def start(self, total: int, skipped: int) -> None: ...
    def stage(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...

    def step(self, description: str = "") -> Any:
        """A :data:`algorithms.progress.Progress` callback ``(label, done, total, unit)`` for the
        sub-progress of one long step (pass it as ``progress=`` to ``load_model``, ``fetch_wheel``,
        ``evaluate_tasks``, or ``EvalTarget``). Its row goes away when the step completes, at the next
        :meth:`stage`, or at :meth:`finish`. Silent here."""
        return _ignore

    def cell_done(self, cell: Any, record: Any) -> None: ...
    def cell_skipped(self, cell: Any) -> None: ...
    def finish(self) -> None: ...


def format_amount(done: float, total: float | None, unit: str) -> str:
    """``12.3/93.0 MB`` for bytes (``unit`` ``"B"``), ``42/120 requests`` for counts; the total left out
    when it is not known (``12.3 MB``)."""
    if unit == "B":
        return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total is not None else f"{done / 1e6:.1f} MB"
    amount = f"{done:.0f}/{total:.0f}" if total is not None else f"{done:.0f}"
    return f"{amount} {unit}" if unit else amount


class _AmountColumn(ProgressColumn):
    """Done / total of a row in its unit (cells: ``3/6``; a download: ``12.3/93.0 MB``)."""

    def render(self, task: Task) -> Text:
        return Text(format_amount(task.completed, task.total, task.fields.get("unit", "")), style="progress.download")


class _Step:
    """The callback :meth:`RichReporter.step` hands out: one row under the cells bar, made on its first
    call, relabelled when the label changes, removed when done reaches a known total."""

    def __init__(self, reporter: RichReporter, description: str) -> None:
        self.reporter, self.description = reporter, description
        self.row: TaskID | None = None
        self.label = ""

    def __call__(self, label: str, done: float, total: float | None = None, unit: str = "") -> None:
        with self.reporter.lock:
            if self.reporter.closed(self):
                return
            text = f"{self.description}: {label}" if self.description else label
            progress = self.reporter.progress
            if self.row is None or label != self.label:
                self._remove()
                self.row = progress.add_task(text, total=total, completed=done, kind="  ↳", unit=unit)
                self.label = label
            else:
                progress.update(self.row, completed=done, total=total, description=text, unit=unit)
            if total is not None and done >= total:
                self._remove()

    def _remove(self) -> None:
        if self.row is not None:
            self.reporter.progress.remove_task(self.row)
            self.row = None

    def close(self) -> None:
        with self.reporter.lock:
            self._remove()


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.lock = threading.RLock()  # a step's callback may run on another thread (the download watcher)
        self.steps: list[_Step] = []
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[kind]}"),
            BarColumn(),
            _AmountColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),  # from the cells done so far: shown once the first cells finished
            TextColumn("{task.description}"),
            console=self.console,
            transient=False,
        )
        self.task = None

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            self.console.print(f"{skipped} finished cell(s) found in the results dir: skipped")
        if total == 0:
            return
        self.progress.start()
        self.task = self.progress.add_task("", total=total, kind="cells", unit="")

    def stage(self, text: str) -> None:
        self._close_steps()
        if self.task is not None:
            self.progress.update(self.task, description=text)

    def step(self, description: str = "") -> _Step | Any:
        if self.task is None:  # no display running (nothing to run)
            return _ignore
        with self.lock:
            step = _Step(self, description)
            self.steps.append(step)
            return step

    def closed(self, step: _Step) -> bool:
        return step not in self.steps

    def _close_steps(self) -> None:
        with self.lock:
            for step in self.steps:
                step.close()
            self.steps.clear()

    def note(self, text: str) -> None:
        """A line above the bar (something the user should know: a large file about to be written)."""
        self.console.print(text)

    def cell_done(self, cell: Any, record: Any) -> None:
        self._close_steps()
        if record.status != "ok":
            self.console.print(f"[red]cell {record.cell_id} failed[/red] in {record.stage}: {record.error}")
        if self.task is not None:
            self.progress.advance(self.task)

    def cell_skipped(self, cell: Any) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def finish(self) -> None:
        self._close_steps()
        if self.task is not None:
            self.progress.stop()
