"""The ``bench`` command line: run, report, validate, list.

Exit codes: 0 success, 1 some cells failed, 2 a usage or config error (nothing run, nothing written).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bench.config import ConfigError, GridConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark block-pruning methods for LLMs.")
err = Console(stderr=True)
out = Console()
if not out.is_terminal:  # piped or captured: no terminal width to respect, so never squeeze the table
    out = Console(width=200)

GridOpt = Annotated[Path, typer.Option("--grid", "-g", help="grid YAML file")]
ResultsOpt = Annotated[
    Path | None, typer.Option("--results", "-r", help="results dir (default: results/<grid name>)")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)  # plain text: never wrapped or styled
    return typer.Exit(code)


def _load(grid: Path):
    from bench.grid import validate

    try:
        config = load_config(grid)
        cells = validate(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    return config, cells


def _results_dir(config: GridConfig, results: Path | None) -> Path:
    return results if results is not None else Path("results") / config.name


@app.command()
def run(
    grid: GridOpt = Path("configs/quick.yaml"),
    results: ResultsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout")] = False,
    report: Annotated[bool, typer.Option(help="print and write the leaderboard at the end")] = True,
) -> None:
    """Run every unfinished cell of a grid, then print and write the leaderboard."""
    from bench.progress import Reporter, RichReporter
    from bench.runner import Runner

    config, cells = _load(grid)
    results_dir = _results_dir(config, results)
    reporter = Reporter() if (quiet or as_json) else RichReporter(err)
    try:
        runner = Runner(config, results_dir, reporter=reporter)
    except RuntimeError as exc:  # e.g. CUDA asked for but absent
        raise _fail(str(exc)) from None
    summary = runner.run(cells)
    board = None
    if report:
        from bench import report as rep

        board, _ = rep.build(results_dir, {c.cell_id for c in cells})
        rep.write_reports(board, results_dir, title=f"blockbench leaderboard: {config.name}")
        if not (quiet or as_json):
            rep.render_terminal(board, out, title=f"blockbench leaderboard: {config.name}")
    if as_json:
        payload = {
            "grid": config.name, "results": str(results_dir), "cells": summary.total,
            "skipped": summary.skipped, "ran": summary.ran, "failed": summary.failed,
            "elsewhere": summary.elsewhere,
            "failures": [
                {"cell_id": r["cell_id"], "stage": r["stage"], "error": r["error"]}
                for r in summary.records if r["status"] != "ok"
            ],
            "leaderboard": json.loads(board.to_json(orient="records")) if board is not None else None,
        }
        print(json.dumps(payload, indent=2))
    elif not quiet:
        err.print(
            f"{summary.total} cells: {summary.skipped} already done, {summary.ran} run, "
            f"{summary.failed} failed"
            + (f", {summary.elsewhere} left to another process" if summary.elsewhere else "")
            + f". Records in {results_dir / 'records'}"
        )
    raise typer.Exit(summary.exit_code)


@app.command("report")
def report_cmd(
    results: ResultsOpt = None,
    grid: Annotated[Path | None, typer.Option("--grid", "-g", help="only this grid's cells")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the leaderboard as JSON")] = False,
    rank_by: Annotated[str, typer.Option(help="auto (accuracy when measured, else perplexity), accuracy or ppl")]
    = "auto",
) -> None:
    """Rebuild the leaderboard (terminal, leaderboard.md, leaderboard.csv) from the records."""
    from bench import report as rep

    cell_ids = None
    title = "blockbench leaderboard"
    if grid is not None:
        config, cells = _load(grid)
        cell_ids = {c.cell_id for c in cells}
        results = _results_dir(config, results)
        title += f": {config.name}"
    if results is None:
        raise _fail("give --results DIR or --grid FILE")
    if not (results / "records").is_dir():
        raise _fail(f"no records under {str(results)!r} (run 'bench run' first)")
    if rank_by not in rep.RANK_BY:
        raise _fail(f"--rank-by must be one of {', '.join(rep.RANK_BY)}, got {rank_by!r}")
    try:
        board, _ = rep.build(results, cell_ids, rank_by=rank_by)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    paths = rep.write_reports(board, results, title=title)
    if as_json:
        print(board.to_json(orient="records", indent=2))
    else:
        rep.render_terminal(board, out, title=title)
        err.print("written: " + ", ".join(str(p) for p in paths))


@app.command()
def validate(grid: GridOpt) -> None:
    """Check a grid config (keys, names, parameters, sources, budgets) without running it."""
    config, cells = _load(grid)
    out.print(
        f"{grid}: ok: {len(cells)} cells ({len(config.models)} model(s) × {len(config.calibration.seeds)} seed(s) "
        f"× {len(config.metrics)} metric(s) × {len(config.selectors)} selector(s) × "
        f"{len(config.budgets.items())} budget(s))"
    )


class ListKind(str, Enum):
    metrics = "metrics"
    selectors = "selectors"
    models = "models"
    tasks = "tasks"


@app.command("list")
def list_cmd(
    kind: ListKind,
    pattern: Annotated[str, typer.Argument(help="shell wildcard, e.g. 'mi_*'")] = "*",
) -> None:
    """List registered metrics, selectors (built-in and plugins), zoo models or accuracy tasks."""
    from rich.table import Table

    from estimators.registry import describe

    table = Table(title=kind.value)
    broken: dict[str, str] = {}
    if kind in (ListKind.metrics, ListKind.selectors):
        if kind is ListKind.metrics:
            from estimators import METRICS as registry
        else:
            from algorithms.selectors import SELECTORS as registry
        columns = ["name", "origin", "high means", "description"] if kind is ListKind.metrics else \
            ["name", "origin", "description"]
        for col in columns:
            table.add_column(col)
        for name in registry.list(pattern):
            if (why := registry.error(name)) is not None:  # a broken plugin: shown, never fatal
                table.add_row(name, registry.origin(name), *([""] if kind is ListKind.metrics else []),
                              f"[red]broken: {why}[/red]")
                continue
            obj = registry.get(name)
            sign = ["important" if obj.higher_is_important else "redundant"] if kind is ListKind.metrics else []
            table.add_row(name, registry.origin(name), *sign, describe(obj))
        broken = {k: v for k, v in registry.errors().items() if k not in registry.list(pattern)}
    elif kind is ListKind.models:
        from algorithms.zoo import MODELS

        for col in ("name", "blocks", "description"):
            table.add_column(col)
        for name in MODELS.list(pattern):
            recipe = MODELS.get(name)
            table.add_row(name, str(recipe.n_blocks), recipe.description)
    else:
        import fnmatch

        from algorithms.accuracy import SUPPORTED_TASKS, task_info

        for col in ("name", "documents", "split", "lm-eval task file"):
            table.add_column(col)
        for name in sorted(t for t in SUPPORTED_TASKS if fnmatch.fnmatchcase(t, pattern)):
            info = task_info(name)
            table.add_row(name, f"{info['rows']:,}", info["split"], info["yaml"])
    out.print(table)
    for name, why in broken.items():  # e.g. a plugin that clashes with a built-in name
        err.print(f"[red]plugin not loaded:[/red] {name}: {why}")


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # pragma: no cover - commands catch their own
        err.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
