"""The ``bench`` command line: run, report, stability, validate, list, baseline save, check.

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


AllowRemoteOpt = Annotated[bool, typer.Option(
    "--allow-remote-code", help="let models with trust_remote_code: true run the code shipped with them")]


def _load(grid: Path, allow_remote_code: bool = False, *, reading: bool = False):
    """The validated grid and its cells; exit 2 on a config error, or on a model that wants to run its
    own code without ``--allow-remote-code`` (a grid file alone cannot turn that on), or on a ``device``
    this machine lacks (``run``, ``validate`` and ``stability`` only: ``report``, ``check`` and ``baseline
    save`` read results that may have been measured on another machine, and run no model code: they pass
    ``reading=True``)."""
    from bench.config import check_device
    from bench.grid import validate

    try:
        config = load_config(grid)
        if not reading:
            try:
                check_device(config.device)
            except ConfigError as exc:
                raise ConfigError(f"{grid}: {exc}") from None
        cells = validate(config, extras=not reading)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    trusting = [(i, m.name) for i, m in enumerate(config.models) if m.trust_remote_code]
    if trusting and not allow_remote_code and not reading:
        i, name = trusting[0]
        raise _fail(f"{grid}: models[{i}].trust_remote_code: model {name!r} asks to run code shipped with it; "
                    "the grid file alone cannot allow that: add --allow-remote-code to the command line")
    return config, cells


def _plan(config: GridConfig, cells) -> tuple[list, str]:
    """The grid's cost plan per model (:mod:`bench.plan`) and what the device has; exit 2 when a model's
    peak does not fit the device's memory, naming the knob to turn."""
    from bench.plan import validate_plan

    try:
        return validate_plan(config, cells)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _results_dir(config: GridConfig, results: Path | None) -> Path:
    return results if results is not None else Path("results") / config.name


def _runner(config: GridConfig, results: Path | None, *, quiet: bool, allow_remote_code: bool = False):
    """A runner on ``results`` (default ``results/<grid name>``) with a live display unless ``quiet``;
    returns it and its results folder. A device that is asked for but absent is a usage error."""
    import os

    from bench.progress import Reporter, RichReporter
    from bench.runner import Runner

    results_dir = _results_dir(config, results)
    # checked before any cell runs and before anything is written
    key = "--results" if results is not None else "results folder"
    if results_dir.exists() and not results_dir.is_dir():
        raise _fail(f"{key}: {str(results_dir)!r} is a file, not a folder")
    existing = results_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(f"{key}: {str(results_dir)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == results_dir else f"cannot be created: {str(existing)!r} is"
        raise _fail(f"{key}: {str(results_dir)!r} {where} read-only")
    try:
        runner = Runner(config, results_dir, reporter=Reporter() if quiet else RichReporter(err),
                        allow_remote_code=allow_remote_code)
    except RuntimeError as exc:  # e.g. CUDA asked for but absent
        raise _fail(str(exc)) from None
    return runner, results_dir


@app.command()
def run(
    grid: GridOpt = Path("configs/quick.yaml"),
    results: ResultsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON summary on stdout")] = False,
    report: Annotated[bool, typer.Option(help="print and write the leaderboard at the end")] = True,
    executor: Annotated[str, typer.Option(help="local (this process), ray (tasks on a Ray cluster), or a "
                                               "plugin's (bench list executors)")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (e.g. auto); none: start a local one")]
    = None,
    allow_remote_code: AllowRemoteOpt = False,
) -> None:
    """Run every unfinished cell of a grid, then print and write the leaderboard."""
    from bench.executors import EXECUTORS, ExecutorError
    from estimators.registry import RegistryError

    try:
        EXECUTORS.get(executor)
    except RegistryError as exc:
        raise _fail(f"--executor: {exc}") from None
    if address is not None and executor != "ray":
        raise _fail("--address: only used with --executor ray")
    config, cells = _load(grid, allow_remote_code)
    plans, _ = _plan(config, cells)
    if not (quiet or as_json):
        from bench.plan import summary_line

        for p in plans:
            err.print(summary_line(p), markup=False, highlight=False)
    runner, results_dir = _runner(config, results, quiet=quiet or as_json, allow_remote_code=allow_remote_code)
    try:
        summary = _run_resumably(runner, cells, results_dir, executor=executor, address=address)
    except ExecutorError as exc:  # Ray missing or its cluster unreachable
        raise _fail(str(exc)) from None
    board = None
    if report:
        from bench import report as rep

        board, _ = rep.build(results_dir, {c.cell_id for c in cells})
        rep.write_reports(board, results_dir, title=f"blockbench leaderboard: {config.name}")
        if not (quiet or as_json):
            rep.render_terminal(board, out, title=f"blockbench leaderboard: {config.name}",
                                full_table=str(results_dir / "leaderboard.md"))
    if as_json:
        payload = {
            "grid": config.name, "results": str(results_dir), "cells": summary.total,
            "skipped": summary.skipped, "ran": summary.ran, "failed": summary.failed,
            "elsewhere": summary.elsewhere,
            "failures": [
                {"cell_id": r.cell_id, "stage": r.stage, "error": r.error}
                for r in summary.records if r.status != "ok"
            ],
            "leaderboard": json.loads(board.to_json(orient="records")) if board is not None else None,
            "plan": [p.to_json() for p in plans],
        }
        print(json.dumps(payload, indent=2))
    elif not quiet:
        err.print(
            f"{summary.total} cells: {summary.skipped} already done, {summary.ran} run, "
            f"{summary.failed} failed"
            + (f", {summary.elsewhere} left to another process" if summary.elsewhere else "")
            + f". Records in {results_dir / 'records'}"
        )
        if spent := stage_times(runner.pipeline.seconds):
            err.print(f"time by step in this run: {spent}")
    raise typer.Exit(summary.exit_code)


def stage_times(seconds) -> str:
    """``load 1.2 s, capture 10.4 s, scoring 2.0 s, ...``: where this process spent its time (steps served
    by a cache cost nothing and are not listed); empty when nothing ran here."""
    order = ["load", "capture", "scoring", "selection"]
    names = order + sorted(k for k in seconds if k not in order)
    return ", ".join(f"{name} {seconds[name]:.1f} s" for name in names if seconds.get(name))


def _run_resumably(runner, cells, results_dir: Path, **run_options):
    """``runner.run(cells)``; on Ctrl-C or SIGTERM, say what is recorded and that a rerun resumes, exit 130."""
    import signal

    def terminate(signum, frame):  # SIGTERM ends the run the way Ctrl-C does: finished records stay
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return runner.run(cells, **run_options)
    except KeyboardInterrupt:
        done = sum(runner.store.is_done(c.cell_id) for c in cells)
        err.print(f"\ninterrupted: {done} of {len(cells)} cells are finished and recorded under "
                  f"{results_dir / 'records'}; the cell that was running is not. Rerun the same command to "
                  "resume: finished cells are skipped and cached stages reused.")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


GridFilterOpt = Annotated[Path | None, typer.Option("--grid", "-g", help="only this grid's cells")]


def _board(results: Path | None, grid: Path | None, rank_by: str = "auto"):
    """The leaderboard of ``results`` (only ``grid``'s cells when given), its folder and its title."""
    from bench import report as rep

    cell_ids = None
    title = "blockbench leaderboard"
    if grid is not None:
        config, cells = _load(grid, reading=True)
        cell_ids = {c.cell_id for c in cells}
        results = _results_dir(config, results)
        title += f": {config.name}"
    if results is None:
        raise _fail("give --results DIR or --grid FILE")
    if not (results / "records").is_dir():
        raise _fail(f"no records under {str(results)!r} (run 'bench run' first)")
    _check_readable(results)
    try:
        board, _ = rep.build(results, cell_ids, rank_by=rank_by)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return board, results, title


def _check_readable(results: Path) -> None:
    """Exit 2 when every record under ``results`` is of another schema (saying how to rerun); warn when
    only some are."""
    from bench.store import ResultStore

    records, bad = ResultStore(results).scan()
    if bad and not records:
        more = f" (and {len(bad) - 1} more like it)" if len(bad) > 1 else ""
        raise _fail(f"no readable records under {str(results)!r}: {bad[0]}{more}")
    if bad:
        err.print(f"warning: {len(bad)} record(s) under {results} skipped: {bad[0]}")


@app.command("report")
def report_cmd(
    results: ResultsOpt = None,
    grid: GridFilterOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the leaderboard as JSON")] = False,
    rank_by: Annotated[str, typer.Option(help="auto (the highest-priority ranking column present: accuracy, then "
                                              "perplexity, then KL), or an evaluation, column key or gate name "
                                              "(accuracy, perplexity, ppl, kl, top1, ...)")] = "auto",
    html: Annotated[bool, typer.Option("--html", help="also write report.html (one self-contained file with the "
                                                      "tables and figures inline) and figures/*.png")] = False,
) -> None:
    """Rebuild the leaderboard (terminal, leaderboard.md, leaderboard.csv) from the records."""
    from bench import report as rep

    if html:
        _check_plots("--html")
    board, results, title = _board(results, grid, rank_by)
    try:
        paths = rep.write_reports(board, results, title=title)
        if html:
            paths += _write_html(results, _grid_records(results, grid), board, title)
    except OSError as exc:  # a read-only or full results folder: still show the leaderboard
        paths, unwritten = [], f"{exc.strerror or exc}: {exc.filename or results}"
    else:
        unwritten = None
    if as_json:
        print(board.to_json(orient="records", indent=2))
    else:
        rep.render_terminal(board, out, title=title, full_table=str(paths[0]) if paths else None)
        if paths:
            err.print("written: " + ", ".join(str(p) for p in paths))
    if unwritten:
        err.print(f"warning: the leaderboard files could not be written ({unwritten}); shown here only")


def _grid_records(results: Path, grid: Path | None) -> list[dict]:
    """The records under ``results`` (only ``grid``'s cells when given; the grid is already validated)."""
    from bench.grid import expand
    from bench.store import ResultStore

    records = ResultStore(results).records()
    if grid is not None:
        ids = {c.cell_id for c in expand(load_config(grid))}
        records = [r for r in records if r.cell_id in ids]
    return records


def _check_plots(option: str, hint: str = "") -> None:
    """Exit 2 naming the ``plots`` extra when ``option`` asks for the HTML report and matplotlib is not
    installed (checked before anything runs or is written)."""
    from algorithms import extras

    if not extras.available("matplotlib"):
        from bench.html_report import FEATURE

        raise _fail(f"{option}: {extras.MissingExtra(extras.MATPLOTLIB, FEATURE)}{hint}")


def _write_html(results: Path, records: list[dict], board, title: str, frame=None) -> list[Path]:
    """``report.html`` and ``figures/*.png`` under ``results``, with the stability table (``bench.html_report``)."""
    from bench import html_report

    paths = html_report.write_html_report(results, records, board, title=title, frame=frame)
    return [paths["html"], *(p for k, p in paths.items() if k != "html")]


@app.command("stability")
def stability_cmd(
    grid: GridOpt,
    results: ResultsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the stability table as JSON")] = False,
    html: Annotated[bool, typer.Option("--html/--no-html", help="write report.html and figures/*.png")] = True,
    allow_remote_code: AllowRemoteOpt = False,
) -> None:
    """A stability study: run the grid over every calibration seed (and every calibration variant of its
    `stability:` section), reusing finished records, then write stability.md/.csv, the leaderboard and
    report.html with the figures."""
    from bench import report as rep
    from bench import stability

    config, cells = _load(grid, allow_remote_code)
    if html:
        _check_plots("--html", " (or pass --no-html)")
    _plan(config, cells)
    seeds = config.calibration.seeds
    if len(seeds) < 2:
        raise _fail(f"calibration.seeds: a stability study needs at least 2 seeds to compare, got {seeds}")
    runner, results_dir = _runner(config, results, quiet=quiet or as_json, allow_remote_code=allow_remote_code)
    summary = _run_resumably(runner, cells, results_dir)
    title = f"blockbench stability: {config.name}"
    board, records = rep.build(results_dir, {c.cell_id for c in cells})
    paths = rep.write_reports(board, results_dir, title=f"blockbench leaderboard: {config.name}")
    frame = stability.stability_frame(records)
    paths += stability.write_stability_reports(frame, results_dir, title=title)
    if html:
        paths += _write_html(results_dir, records, board, title, frame)
    if as_json:
        payload = {
            "grid": config.name, "results": str(results_dir), "cells": summary.total, "skipped": summary.skipped,
            "ran": summary.ran, "failed": summary.failed,
            "stability": json.loads(frame.to_json(orient="records", double_precision=15)),
            "files": [str(p) for p in paths],
        }
        print(json.dumps(payload, indent=2))
    elif not quiet:
        from rich.table import Table

        shown = stability.display(frame)
        table = Table(title=title)
        for col in shown.columns:
            table.add_column(col, justify="right" if col in ("runs", "distinct sets", "blocks ever removed") else "left",
                             no_wrap=col != "always removed", overflow="fold")
        for row in shown.itertuples(index=False):
            table.add_row(*(str(v) for v in row))
        out.print(table if not shown.empty else "no finished cells yet")
        err.print(f"{summary.total} cells: {summary.skipped} already done, {summary.ran} run, {summary.failed} failed. "
                  "written: " + ", ".join(str(p) for p in paths))
    raise typer.Exit(summary.exit_code)


@app.command()
def validate(grid: GridOpt, allow_remote_code: AllowRemoteOpt = False) -> None:
    """Check a grid config (keys, names, parameters, sources, budgets) without running it, and print its cost
    plan per model (from each model's config, no weights loaded); exit 2 when it does not fit the device."""
    from bench.plan import table

    config, cells = _load(grid, allow_remote_code)
    plans, where = _plan(config, cells)
    n_variants = len(config.calibration_variants())
    pairs = ((f"{len(config.units)} unit kind(s) × " if config.units != ["block"] else "")
             + (f"{len(config.healing)} healing(s) × " if [h.name for h in config.healing] != ["none"] else "")
             + f"{len(config.metrics)} metric(s) × {len(config.selectors)} selector(s)") if config.metrics else ""
    methods = f"{len(config.methods)} method(s)" if config.methods else ""
    # the methods are not crossed with units and healing (a preset fixes both)
    crossed = f"({pairs} + {methods})" if pairs and methods else pairs or methods
    out.print(
        f"{grid}: ok: {len(cells)} cells ({len(config.models)} model(s) × "
        + (f"{n_variants} calibration variant(s) × " if config.stability is not None else "")
        + f"{len(config.calibration.seeds)} seed(s) × {crossed} × "
        f"{len(config.budgets.items())} budget(s)); evaluations: {', '.join(config.evaluations)}"
    )
    for p in plans:
        out.print(table(p, where))


baseline_app = typer.Typer(no_args_is_help=True, help="Store the numbers `bench check` compares against.")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("save")
def baseline_save(
    out_file: Annotated[Path, typer.Option("--out", "-o", help="baseline JSON file to write")],
    results: ResultsOpt = None,
    grid: GridFilterOpt = None,
) -> None:
    """Save the current leaderboard's gated numbers (accuracy, perplexity, speedups, KL, ...) as a baseline,
    each row with the ids of the cells it was computed from; with --grid, the grid's name too, and every
    cell of the grid must have finished."""
    from bench import gate
    from bench.stages import environment, resolve_device

    if out_file.is_dir():
        raise _fail(f"--out {str(out_file)!r} is a folder: give a file path (e.g. {str(out_file / 'baseline.json')!r}); "
                    "nothing written")
    board, results, _ = _board(results, grid)  # the grid, when given, is validated here
    name, expected = _grid_identity(grid)
    try:
        payload = gate.save_baseline(board, out_file, grid=name, env=environment(resolve_device("cpu")),
                                     cells=gate.row_cells(_grid_records(results, grid)), expected=expected)
    except gate.GateError as exc:
        raise _fail(f"{exc}; nothing written") from None
    err.print(f"baseline of {len(payload['rows'])} rows written to {out_file}")


def _grid_identity(grid: Path | None):
    """``(name, cell ids per leaderboard row)`` of an already validated grid, or ``(None, None)``."""
    if grid is None:
        return None, None
    from bench import gate
    from bench.grid import expand

    config = load_config(grid)
    return config.name, gate.grid_cells(expand(config))


@app.command()
def check(
    baseline: Annotated[Path, typer.Option("--baseline", "-b", help="baseline JSON from 'bench baseline save'")],
    results: ResultsOpt = None,
    grid: GridFilterOpt = None,
    fail: Annotated[str | None, typer.Option(
        help="tolerances NAME:VALUE[%], NAME a gate measure (acc, ppl, speedup, kl, top1, a plugin's) or a column "
             "key; default: acc:1%,ppl:5%,speedup:5% for the measures the baseline has")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
) -> None:
    """Compare results with a baseline; exit 1 on a regression past a tolerance or a missing or incomplete
    cell, 2 when the baseline is empty or malformed, was computed from other cells or another grid, or
    nothing is compared."""
    from rich.table import Table

    from bench import gate

    where = f"baseline {str(baseline)!r}"
    try:
        given = gate.parse_fail(fail) if fail is not None else None
        stored = gate.load_baseline(baseline)
        tolerances = given if given is not None else gate.default_tolerances(stored)
    except gate.GateError as exc:
        raise _fail(str(exc)) from None
    board, results, _ = _board(results, grid)  # the grid, when given, is validated here
    name, grid_ids = _grid_identity(grid)
    try:
        warnings = gate.identity(stored, grid=name, cells=grid_ids, where=where)
        table = gate.compare(stored, board, tolerances, cells=gate.row_cells(_grid_records(results, grid)))
    except gate.GateError as exc:  # another grid or other cells, a measure the baseline lacks, nothing compared
        raise _fail(str(exc)) from None
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    bad = gate.failed(table)
    if as_json:
        print(table.to_json(orient="records", indent=2))
    else:
        view = Table(title=f"bench check against {baseline}")
        for col in table.columns:
            view.add_column(col, justify="left" if col in ("cell", "measure", "status") else "right")
        for row in table.itertuples(index=False):
            style = {"regression": "red", "missing": "red", "incomplete": "red", "improved": "green"}.get(row.status, "")
            cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
            view.add_row(*cells, style=style)
        out.print(view)
        moved = table[table["status"].isin(gate.FAILING)]
        for row in moved.itertuples(index=False):
            err.print(f"[red]{row.status}[/red]: {row.cell} {row.measure}: baseline {row.baseline:.4g}, "
                      f"now {row.current if row.current is None else format(row.current, '.4g')} "
                      f"(tolerance {row.tolerance})"
                      + (" from only some of its baseline cells" if row.status == "incomplete" else ""))
        err.print(f"{len(moved)} of {len(table)} checks failed" if bad else f"all {len(table)} checks passed")
    raise typer.Exit(1 if bad else 0)


class ListKind(str, Enum):
    metrics = "metrics"
    selectors = "selectors"
    evaluations = "evaluations"
    executors = "executors"
    healings = "healings"
    methods = "methods"
    models = "models"
    tasks = "tasks"


@app.command("list")
def list_cmd(
    kind: ListKind,
    pattern: Annotated[str, typer.Argument(help="shell wildcard, e.g. 'mi_*'")] = "*",
) -> None:
    """List registered metrics, selectors, evaluations, executors, healings, method presets (built-in and
    plugins), zoo models or accuracy tasks."""
    from rich.table import Table

    from estimators.registry import describe

    table = Table(title=kind.value)
    broken: dict[str, str] = {}
    if kind in (ListKind.metrics, ListKind.selectors, ListKind.evaluations, ListKind.executors, ListKind.healings):
        registries = _registries(kind)
        extra = {ListKind.metrics: ["high means", "scores from"], ListKind.evaluations: ["columns"]}.get(kind, [])
        for col in ["name", "origin", *extra, "description"]:
            table.add_column(col)
        rows = sorted((name, registry) for registry in registries for name in registry.list(pattern))
        for name, registry in rows:
            if (why := registry.error(name)) is not None:  # a broken plugin: shown, never fatal
                table.add_row(name, registry.origin(name), *([""] * len(extra)), f"[red]broken: {why}[/red]")
                continue
            obj = registry.get(name)
            if kind is ListKind.metrics:
                cells = ["important" if obj.higher_is_important else "redundant",
                         "the model" if registry is registries[-1] else "hidden states"]
            elif kind is ListKind.evaluations:
                cells = [_column_summary(obj)]
            else:
                cells = []
            table.add_row(name, registry.origin(name), *cells, describe(obj))
        broken = {k: v for registry in registries for k, v in registry.errors().items()
                  if k not in registry.list(pattern)}
    elif kind is ListKind.methods:
        broken = _list_methods(table, pattern)
    elif kind is ListKind.models:
        from algorithms.models.zoo import MODELS

        for col in ("name", "blocks", "description"):
            table.add_column(col)
        for name in MODELS.list(pattern):
            recipe = MODELS.get(name)
            table.add_row(name, str(recipe.n_blocks), recipe.description)
    else:
        from algorithms.evaluations.lmeval import TASKS, task_info

        for col in ("name", "origin", "documents", "split", "lm-eval task file"):
            table.add_column(col)
        for name in TASKS.list(pattern):
            if (why := TASKS.error(name)) is not None:  # a broken plugin task: shown, never fatal
                table.add_row(name, TASKS.origin(name), "", "", f"[red]broken: {why}[/red]")
                continue
            info = task_info(name)
            rows = f"{info['rows']:,}" if info["rows"] is not None else "?"
            table.add_row(name, TASKS.origin(name), rows, info["split"], info["yaml"])
        broken = {k: v for k, v in TASKS.errors().items() if k not in TASKS.list(pattern)}
    out.print(table)
    for name, why in broken.items():  # e.g. a plugin that clashes with a built-in name
        err.print(f"[red]plugin not loaded:[/red] {name}: {why}")


def _list_methods(table, pattern: str) -> dict[str, str]:
    """Fill ``table`` with the method presets matching ``pattern``: paper, arXiv id, what each expands to
    and where it deviates from the paper (a broken plugin preset: its row says why). Returns the broken
    entries the rows do not show (a plugin clashing with a built-in name)."""
    from rich.text import Text

    from algorithms import METHODS
    from algorithms.methods import method_preset
    from estimators.registry import RegistryError

    for col in ("name", "origin", "paper", "arXiv", "expands to", "deviations from the paper"):
        # the identity stays on a row's first line; the long texts wrap
        table.add_column(col, no_wrap=col in ("name", "origin", "arXiv"), overflow="fold")
    names = METHODS.list(pattern)
    for name in names:
        try:
            preset = method_preset(name)
        except RegistryError as exc:  # a broken plugin: shown, never fatal
            table.add_row(name, METHODS.origin(name), "", "", "", Text(f"broken: {exc}", style="red"))
            continue
        deviations = "\n".join(f"- {d}" for d in preset.deviations) or "–"
        # Text: a preset's texts are never read as rich markup ("protect: [0, -1]")
        table.add_row(name, METHODS.origin(name), Text(f"{preset.authors}: {preset.title}"), preset.arxiv,
                      Text(preset.expands_to()), Text(deviations))
    return {k: v for k, v in METHODS.errors().items() if k not in names}


def _registries(kind: ListKind) -> list:
    """The registries a ``bench list`` kind shows (metrics: those of hidden states, then of models)."""
    if kind is ListKind.metrics:
        from algorithms import MODEL_METRICS
        from estimators import METRICS

        return [METRICS, MODEL_METRICS]
    if kind is ListKind.selectors:
        from algorithms.selectors import SELECTORS

        return [SELECTORS]
    if kind is ListKind.evaluations:
        from algorithms.evaluations import EVALUATIONS

        return [EVALUATIONS]
    if kind is ListKind.healings:
        from algorithms.healing import HEALINGS

        return [HEALINGS]
    from bench.executors import EXECUTORS

    return [EXECUTORS]


def _column_summary(cls) -> str:
    """``ppl_pruned ↓, ppl_dense``: an evaluation's columns at its default parameters, with direction."""
    try:
        columns = cls().columns()
    except Exception:  # noqa: BLE001 - parameters without defaults (accuracy needs tasks)
        return "(depends on its parameters)"
    arrow = {True: " ↑", False: " ↓", None: ""}
    return ", ".join(f"{c.key}{arrow[c.higher_is_better]}" for c in columns)


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # pragma: no cover - commands catch their own
        err.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
