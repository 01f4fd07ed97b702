"""Progress display for ``bench run``: a rich bar over cells with the current stage, or nothing."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Silent reporter (``--quiet`` / ``--json``); subclasses show progress."""

    def start(self, total: int, skipped: int) -> None: ...
    def stage(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def cell_done(self, cell: Any, record: Any) -> None: ...
    def cell_skipped(self, cell: Any) -> None: ...
    def finish(self) -> None: ...


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]cells"),
            BarColumn(),
            MofNCompleteColumn(),
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
        self.task = self.progress.add_task("", total=total)

    def stage(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)

    def note(self, text: str) -> None:
        """A line above the bar (something the user should know: a large file about to be written)."""
        self.console.print(text)

    def cell_done(self, cell: Any, record: Any) -> None:
        if record.status != "ok":
            self.console.print(f"[red]cell {record.cell_id} failed[/red] in {record.stage}: {record.error}")
        if self.task is not None:
            self.progress.advance(self.task)

    def cell_skipped(self, cell: Any) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def finish(self) -> None:
        if self.task is not None:
            self.progress.stop()
