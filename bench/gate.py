"""A regression gate: compare a grid's leaderboard with a stored baseline and fail on what got worse.

``bench baseline save`` writes the leaderboard's gated numbers per (model, metric, selector, budget,
unit, healing, method) to a JSON file; ``bench check --baseline FILE --fail acc:1%,ppl:5%,speedup:5%`` compares
the current results with it and exits 1 on any regression past its tolerance, or on a baseline row with
no result.

Which numbers are gated, and which direction hurts, come from the evaluations' columns: every column
with a ``gate`` (a measure name: ``acc``, ``ppl``, ``speedup``, ``kl``, ``top1`` for the built-ins, or a
plugin's) is stored with its value, its measure and its direction, so a baseline is checked the same
way wherever it is read. A ``--fail`` name is a measure (every column under it) or one column's key
(``ppl_pruned:2%``); a column's own tolerance wins over its measure's.

Tolerances use pytest-benchmark's ``--benchmark-compare-fail`` grammar: ``NAME:5%`` is relative to the
baseline value, ``NAME:0.01`` an absolute difference. Only the direction that hurts counts: accuracy
going down, perplexity going up, a speedup going down. Speed is compared only as the pruned/dense
ratios measured within each run, never as absolute times, because machines differ.

A row's ``unit`` (``block``, ``attention``, ``mlp``) and ``healing`` (``none`` or a healing's label) are
written only when they are not ``block`` / ``none``, and read as those defaults when absent: baselines
saved before grids had these axes match their rows unchanged, and a default row is named as it always
was (``m/bi/topk/25%``; ``m/bi/topk/params 90%/attention/linear`` otherwise). A row of a method preset
also writes its ``method`` (named last: ``m/bi/topk/25%/shortgpt``); a metric × selector row has none.

Baselines of schema 1 (blockbench 0.1.0: values ``acc_pruned``, ``ppl_mean``, ``prefill_speedup``,
``decode_speedup`` as plain numbers) are read by translating them (``ppl_mean`` is ``ppl_pruned``).

A number is only comparable with one computed from the same cells. Each baseline row keeps ``cells``,
the ids of the cells (:attr:`bench.grid.Cell.cell_id`: resolved parameters, versions, evaluations,
dtype, device type) its numbers were aggregated from, and the baseline keeps the grid's name. A current
row built from a cell the baseline row was not is another measurement, not a regression: a usage error
(:class:`GateError`, exit 2), as is a grid whose name or cells differ from the baseline's
(:func:`identity`). A current row built from only some of its baseline cells (a seed failed) is
``incomplete``, a failure like a missing one. Baselines without ``cells`` (schema 1, and schema 2 as
written before them) are compared by labels only, with a warning.

Nothing is ever passed silently: a baseline without rows, a malformed row (named by index and field), a
comparison that checks nothing, are all :class:`GateError`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.records import DEFAULT_HEALING, DEFAULT_METHOD, DEFAULT_UNIT
from bench.store import write_bytes_atomic

SCHEMA = 2
#: what every baseline row names
KEY = ("model", "metric", "selector", "budget")
#: what a row names only when it is not the default (the grid's ``units`` and ``healing`` axes, and the
#: method preset): a row's key is its :data:`KEY` values, then unit and healing when one of the three is
#: not its default, then the method when there is one (:func:`make_key`)
AXES: tuple[tuple[str, str], ...] = (("unit", DEFAULT_UNIT), ("healing", DEFAULT_HEALING), ("method", DEFAULT_METHOD))
#: schema 1's value names -> (column key, measure, higher is better)
LEGACY: dict[str, tuple[str, str, bool]] = {
    "acc_pruned": ("acc_pruned", "acc", True),
    "ppl_mean": ("ppl_pruned", "ppl", False),
    "prefill_speedup": ("prefill_speedup", "speedup", True),
    "decode_speedup": ("decode_speedup", "speedup", True),
}
#: ``bench check``'s tolerances when ``--fail`` is not given (:func:`default_tolerances`)
DEFAULT_FAIL = "acc:1%,ppl:5%,speedup:5%"
_TOLERANCE = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.:\-]*?):(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<pct>%?)$")


class GateError(ValueError):
    """Bad tolerance text or baseline file, or a tolerance the baseline cannot check (a usage error, exit 2)."""


@dataclass(frozen=True)
class Tolerance:
    measure: str  #: a measure (a column's ``gate``) or a column key
    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return abs(baseline) * self.value / 100 if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"{self.value:g}"


def parse_fail(text: str) -> list[Tolerance]:
    """``"acc:1%,ppl:5%,speedup:0.05"`` → tolerances. Only the syntax is checked here (any measure or column
    name is accepted); :func:`compare` checks each name against the baseline."""
    out: list[Tolerance] = []
    for item in (part.strip() for part in text.split(",")):
        match = _TOLERANCE.match(item)
        if not match:
            raise GateError(f"--fail: {item!r} is not NAME:VALUE or NAME:VALUE% (e.g. acc:1%,ppl:0.5)")
        name = match["name"]
        if any(t.measure == name for t in out):
            raise GateError(f"--fail: {name!r} is given twice")
        out.append(Tolerance(name, float(match["value"]), bool(match["pct"])))
    return out


def make_key(model: str, metric: str, selector: str, budget: str, unit: str = DEFAULT_UNIT,
             healing: str = DEFAULT_HEALING, method: str | None = DEFAULT_METHOD) -> tuple:
    """A row's key: ``(model, metric, selector, budget)`` for whole blocks without healing or method (the
    key rows always had), ``(model, metric, selector, budget, unit, healing)`` for other units or a
    healing, and ``(..., unit, healing, method)`` for a method preset's row (``method``: None or ``""``
    for none)."""
    if method:
        return (model, metric, selector, budget, unit, healing, method)
    if (unit, healing) == (DEFAULT_UNIT, DEFAULT_HEALING):
        return (model, metric, selector, budget)
    return (model, metric, selector, budget, unit, healing)


def row_key(row: dict[str, Any]) -> tuple:
    """A baseline or leaderboard row's key (:func:`make_key`), the unit, the healing and the method at their
    defaults where the row does not name them."""
    return make_key(*(row[k] for k in KEY), *(row.get(k, default) for k, default in AXES))


def label(key: tuple) -> str:
    """A row key as the gate names it: ``m/bi/topk/25%``, then the unit, the healing and the method where
    they are not the defaults (``m/bi/topk/params 90%/attention/linear``, ``m/bi/topk/params 90%/linear``,
    ``m/bi/topk/25%/shortgpt``)."""
    extra = [k for k, (_, default) in zip(key[len(KEY):], AXES, strict=False) if k != default]
    return "/".join(str(k) for k in (*key[:len(KEY)], *extra))


def row_cells(records: list[Any]) -> dict[tuple, list[str]]:
    """The ids of the successful records per row key (:func:`make_key`: model, metric, selector, budget, then
    unit and healing when either is not the default, and the method of a preset's row): the cells each
    leaderboard row is aggregated from (records as :class:`bench.records.CellRecord`)."""
    out: dict[tuple, set[str]] = {}
    for r in records:
        if r.ok:
            key = make_key(r.labels.model, r.labels.metric, r.labels.selector, r.labels.budget, r.labels.unit,
                           r.labels.healing, r.labels.method)
            out.setdefault(key, set()).add(r.cell_id)
    return {key: sorted(ids) for key, ids in out.items()}


def grid_cells(cells: list[Any]) -> dict[tuple, list[str]]:
    """The ids of a grid's cells (:class:`bench.grid.Cell`) per row key (:func:`make_key`), labelled as
    their records are."""
    out: dict[tuple, set[str]] = {}
    for c in cells:
        key = make_key(c.model["name"], c.metric.label(), c.selector.label(), c.budget_label, c.unit,
                       c.healing.label(), c.method)
        out.setdefault(key, set()).add(c.cell_id)
    return {key: sorted(ids) for key, ids in out.items()}


def _ids(ids: list[str] | set[str], most: int = 4) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:most]) + (f" and {len(ids) - most} more" if len(ids) > most else "") if ids else "none"


def baseline_rows(board: pd.DataFrame, cells: dict[tuple, list[str]] | None = None) -> list[dict[str, Any]]:
    """The leaderboard's gated numbers, one row per (model, metric, selector, budget, unit, healing, method),
    the unit, the healing and the method written only when not the defaults (:data:`AXES`): ``values`` maps each
    column key with a ``gate`` (from ``board.attrs["columns"]``) to ``{"value", "gate", "higher_is_better"}``;
    values not measured are left out. With ``cells`` (:func:`row_cells` of the board's records) each row
    also keeps ``cells``: the ids of the cells it was computed from. :class:`GateError` when two rows share
    a key (a grid with calibration variants)."""
    if board.empty:
        return []
    gated = [c for c in board.attrs.get("columns", [])
             if c.gate and c.higher_is_better is not None and c.key in board]
    rows = []
    seen: dict[tuple, int] = {}
    for record in board.to_dict(orient="records"):
        key = row_key(record)
        if key in seen:
            raise GateError(f"the leaderboard has several rows for {label(key)} (calibration variants?): the gate "
                            "compares one row per model/metric/selector/budget/unit/healing/method")
        seen[key] = len(rows)
        values = {
            c.key: {"value": float(record[c.key]), "gate": c.gate, "higher_is_better": bool(c.higher_is_better)}
            for c in gated if record.get(c.key) is not None and not pd.isna(record[c.key])
        }
        row = {**{k: record[k] for k in KEY},
               **{k: value for (k, default), value in zip(AXES, key[len(KEY):], strict=False) if value != default},
               "values": values, "seeds": int(record["seeds"])}
        if cells is not None:
            if key not in cells:
                raise GateError(f"no records for leaderboard row {label(key)}")
            row["cells"] = list(cells[key])
        rows.append(row)
    return rows


def save_baseline(board: pd.DataFrame, path: Path, *, grid: str | None, env: dict[str, Any],
                  cells: dict[tuple, list[str]] | None = None,
                  expected: dict[tuple, list[str]] | None = None) -> dict[str, Any]:
    """Write the leaderboard's gate numbers to ``path`` (JSON, atomically); returns what was written.
    ``grid``: the grid's name; ``cells``: :func:`row_cells` of the board's records (each row keeps its
    cell ids); ``expected``: :func:`grid_cells` of the grid, every one of which must have a finished
    record. :class:`GateError` (nothing written) for an empty board, a row with no gated value, a grid
    not finished, or a ``path`` that is a folder or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise GateError(f"baseline {str(path)!r} is a folder: give a file path (e.g. {str(path / 'baseline.json')!r})")
    if board.empty:
        raise GateError("no finished cells to save as a baseline")
    rows = baseline_rows(board, cells)
    if empty := [label(row_key(r)) for r in rows if not r["values"]]:
        raise GateError(f"leaderboard row {empty[0]} has no gated value (accuracy, perplexity, speedup, ...): "
                        "nothing to compare it by")
    if expected is not None:
        have = cells or {}
        unfinished = sorted(i for key, ids in expected.items() for i in set(ids) - set(have.get(key, ())))
        if unfinished:
            raise GateError(f"{len(unfinished)} cell(s) of grid {grid!r} have no finished record ({_ids(unfinished)}): "
                            "finish them with 'bench run' before saving a baseline")
    payload = {
        "schema": SCHEMA, "grid": grid,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env, "rows": rows,
    }
    try:
        write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise GateError(f"cannot write baseline {str(path)!r}: {exc.strerror or exc}") from None
    return payload


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def upgrade(payload: dict[str, Any], where: str = "baseline") -> dict[str, Any]:
    """A baseline in the current schema: schema 2 checked as it is, schema 1 translated (its value names
    through :data:`LEGACY`). :class:`GateError` for anything else, for a baseline with no rows and for any
    malformed row (named by its index and field): nothing is skipped."""
    if not isinstance(payload, dict) or payload.get("schema") not in (1, SCHEMA) or not isinstance(
            payload.get("rows"), list):
        raise GateError(f"{where} is not a blockbench baseline (schema 1 or {SCHEMA})")
    if not payload["rows"]:
        raise GateError(f"{where} has no rows: nothing to compare with (save one from finished results with "
                        "'bench baseline save')")
    if payload.get("grid") is not None and not isinstance(payload["grid"], str):
        raise GateError(f"{where}: grid: expected a grid name or null, got {payload['grid']!r}")
    rows = []
    keys: dict[tuple, int] = {}
    with_cells = None
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict):
            raise GateError(f"{where}: rows[{i}]: expected a mapping (model, metric, selector, budget, values), "
                            f"got {type(row).__name__}")
        for k in KEY:
            if k not in row:
                raise GateError(f"{where}: rows[{i}].{k}: missing")
            if not isinstance(row[k], str) or not row[k]:
                raise GateError(f"{where}: rows[{i}].{k}: expected a non-empty string, got {row[k]!r}")
        for k, _ in AXES:
            if k in row and (not isinstance(row[k], str) or not row[k]):
                raise GateError(f"{where}: rows[{i}].{k}: expected a non-empty string, got {row[k]!r}")
        key = row_key(row)
        if key in keys:
            raise GateError(f"{where}: rows[{i}]: {label(key)} again (also rows[{keys[key]}])")
        keys[key] = i
        if "values" not in row:
            raise GateError(f"{where}: rows[{i}].values: missing")
        if not isinstance(row["values"], dict):
            raise GateError(f"{where}: rows[{i}].values: expected a mapping, got {type(row['values']).__name__}")
        if not row["values"]:
            raise GateError(f"{where}: rows[{i}].values: empty (nothing to compare)")
        if "seeds" in row and not (isinstance(row["seeds"], int) and not isinstance(row["seeds"], bool)
                                   and row["seeds"] > 0):
            raise GateError(f"{where}: rows[{i}].seeds: expected a positive integer, got {row['seeds']!r}")
        if payload["schema"] == SCHEMA:
            has = "cells" in row
            if with_cells is None:
                with_cells = has
            elif has != with_cells:
                raise GateError(f"{where}: rows[{i}].cells: " + ("missing (rows[0] has cell ids)" if with_cells else
                                "unexpected (rows[0] has none)") + ": every row records its cells or none does")
            if has and not (isinstance(row["cells"], list) and row["cells"]
                            and all(isinstance(c, str) and c for c in row["cells"])
                            and len(set(row["cells"])) == len(row["cells"])):
                raise GateError(f"{where}: rows[{i}].cells: expected a list of distinct cell ids, got {row['cells']!r}")
        elif "cells" in row:
            raise GateError(f"{where}: rows[{i}].cells: schema 1 has no cell ids")
        values: dict[str, dict[str, Any]] = {}
        for name, value in row["values"].items():
            if payload["schema"] == 1:
                if name not in LEGACY or not _finite(value):
                    raise GateError(f"{where}: rows[{i}].values.{name}: not a schema-1 baseline value")
                key_, gate, higher = LEGACY[name]
                values[key_] = {"value": float(value), "gate": gate, "higher_is_better": higher}
            else:
                if not isinstance(value, dict):
                    raise GateError(f"{where}: rows[{i}].values.{name}: expected {{value, gate, higher_is_better}}")
                if not _finite(value.get("value")):
                    raise GateError(f"{where}: rows[{i}].values.{name}.value: expected a finite number, "
                                    f"got {value.get('value')!r}")
                if not (isinstance(value.get("gate"), str) and value["gate"]):
                    raise GateError(f"{where}: rows[{i}].values.{name}.gate: expected a measure name, "
                                    f"got {value.get('gate')!r}")
                if not isinstance(value.get("higher_is_better"), bool):
                    raise GateError(f"{where}: rows[{i}].values.{name}.higher_is_better: expected true or false, "
                                    f"got {value.get('higher_is_better')!r}")
                values[name] = {"value": float(value["value"]), "gate": value["gate"],
                                "higher_is_better": value["higher_is_better"]}
        rows.append({**row, "values": values})
    return {**payload, "schema": SCHEMA, "rows": rows}


def load_baseline(path: Path) -> dict[str, Any]:
    """The baseline at ``path`` in the current schema (schema 1 translated); :class:`GateError` when it is
    missing, not JSON or not a baseline."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"baseline {str(path)!r} does not exist (write one with 'bench baseline save')") from None
    except (OSError, ValueError) as exc:
        raise GateError(f"baseline {str(path)!r} is not readable JSON: {exc}") from None
    return upgrade(payload, where=f"baseline {str(path)!r}")


def measures(baseline: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The measure names and the column keys a baseline holds (each sorted): what ``--fail`` may name."""
    rows = upgrade(baseline)["rows"]
    gates = sorted({v["gate"] for r in rows for v in r["values"].values()})
    keys = sorted({k for r in rows for k in r["values"]})
    return gates, keys


def default_tolerances(baseline: dict[str, Any], text: str = DEFAULT_FAIL) -> list[Tolerance]:
    """The tolerances of ``text`` whose measure the baseline holds: ``bench check`` without ``--fail``
    checks accuracy, perplexity and speedups where the baseline has them (other measures, a plugin's
    included, only when ``--fail`` names them)."""
    gates, keys = measures(baseline)
    return [t for t in parse_fail(text) if t.measure in gates or t.measure in keys]


def has_cells(baseline: dict[str, Any]) -> bool:
    """Whether the baseline's rows keep the ids of the cells they were computed from."""
    return all("cells" in r for r in upgrade(baseline)["rows"])


def identity(baseline: dict[str, Any], *, grid: str | None = None, cells: dict[tuple, list[str]] | None = None,
             where: str = "baseline") -> list[str]:
    """Check that the baseline was computed from the grid being checked: the same ``grid`` name and, per
    row, the same cells (``cells``: :func:`grid_cells` of the grid). :class:`GateError` naming the first
    difference; returns warnings for what cannot be checked (a baseline without a grid name or without
    cell ids)."""
    baseline = upgrade(baseline, where)
    warnings = []
    if grid is not None:
        if baseline.get("grid") is None:
            warnings.append(f"{where} names no grid: not checked against grid {grid!r}")
        elif baseline["grid"] != grid:
            raise GateError(f"{where} is of grid {baseline['grid']!r}, not {grid!r}: check against that grid's "
                            "baseline, or rerun `bench baseline save --grid FILE`")
    if not has_cells(baseline):
        warnings.append(f"{where} records no cell ids (schema 1, or saved before they were recorded): its rows are "
                        "compared by label only, not checked against the cells they were computed from; rerun "
                        "`bench baseline save` to record them")
        return warnings
    if cells is not None:
        for row in baseline["rows"]:
            key = row_key(row)
            if key not in cells:
                raise GateError(f"baseline row {label(key)} is not a row of grid {grid!r}: rerun `bench baseline save`")
            if set(cells[key]) != set(row["cells"]):
                raise GateError(f"baseline row {label(key)} was computed from other cells: rerun `bench baseline save` "
                                f"(grid {grid!r} has {_ids(set(cells[key]) - set(row['cells']))} that the baseline "
                                f"lacks; the baseline has {_ids(set(row['cells']) - set(cells[key]))} that the grid "
                                "lacks)")
        known = {row_key(r) for r in baseline["rows"]}
        if extra := [label(key) for key in cells if key not in known]:
            raise GateError(f"grid {grid!r} has rows the baseline lacks ({', '.join(extra[:4])}"
                            + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
                            + "): rerun `bench baseline save`")
    return warnings


def compare(baseline: dict[str, Any], board: pd.DataFrame, tolerances: list[Tolerance],
            cells: dict[tuple, list[str]] | None = None) -> pd.DataFrame:
    """One row per (baseline cell, checked column): values, change, allowance and ``status`` (``ok``,
    ``regression``, ``missing``: the cell or the value is absent now, ``incomplete``: the current row
    comes from only some of the baseline row's cells, ``improved``: better by more than the tolerance).
    Each column is checked under its own key's tolerance, else its measure's; the direction is the one
    stored in the baseline.

    ``cells`` (:func:`row_cells` of the board's records) is checked against the cell ids the baseline
    rows keep (when they do). :class:`GateError` when a tolerance names neither a measure nor a column of
    the baseline, when a current row was computed from a cell its baseline row was not, or when nothing
    at all is compared."""
    baseline = upgrade(baseline)
    gates, keys = measures(baseline)
    if not tolerances:
        raise GateError(f"nothing to compare: no tolerance given for the baseline's measures ({', '.join(gates)}); "
                        "name them with --fail (e.g. --fail " + ",".join(f"{g}:1%" for g in gates) + ")")
    for tol in tolerances:
        if tol.measure not in gates and tol.measure not in keys:
            raise GateError(f"unknown measure {tol.measure!r}; the baseline has {', '.join(gates) or 'nothing'}"
                            + (f" (or one of its columns: {', '.join(keys)})" if keys else ""))
    by_name = {t.measure: t for t in tolerances}
    current = {row_key(r): r["values"] for r in baseline_rows(board)}
    out = []
    for row in baseline["rows"]:
        key = row_key(row)
        now = current.get(key)
        incomplete = False
        if now is not None and cells is not None and "cells" in row:
            had, has = set(row["cells"]), set(cells.get(key, ()))
            if has - had:
                raise GateError(f"baseline row {label(key)} was computed from other cells: rerun `bench baseline save` "
                                f"(now also from {_ids(has - had)}, which the baseline row was not)")
            incomplete = has != had
        checked = [(col, stored, by_name.get(col) or by_name.get(stored["gate"]))
                   for col, stored in row["values"].items()]
        order = {id(t): i for i, t in enumerate(tolerances)}  # in the order --fail names them
        for col, stored, tol in sorted((c for c in checked if c[2] is not None), key=lambda c: order[id(c[2])]):
            base = stored["value"]
            value = None if now is None or col not in now else now[col]["value"]
            entry = {"cell": label(key), "measure": col, "baseline": base, "current": value,
                     "tolerance": str(tol), "allowed": tol.allowed(base)}
            if value is None or not math.isfinite(value):
                entry.update(change=math.nan, status="missing")
            else:
                worse = (base - value) if stored["higher_is_better"] else (value - base)
                # symmetric: "improved" only past the tolerance too, so noise never reads as progress
                status = "regression" if worse > entry["allowed"] else ("improved" if -worse > entry["allowed"] else "ok")
                entry.update(change=value - base, status="incomplete" if incomplete else status)
            out.append(entry)
    if not out:
        raise GateError("nothing to compare: no value of the baseline's rows falls under "
                        + ", ".join(f"{t.measure}:{t}" for t in tolerances))
    return pd.DataFrame(out, columns=["cell", "measure", "baseline", "current", "change", "tolerance", "allowed",
                                      "status"])


FAILING = ("regression", "missing", "incomplete")


def failed(table: pd.DataFrame) -> bool:
    return bool(table["status"].isin(FAILING).any()) if not table.empty else False
