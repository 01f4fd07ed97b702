"""A regression gate: compare a grid's leaderboard with a stored baseline and fail on what got worse.

``bench baseline save`` writes the leaderboard's gated numbers per (model, metric, selector, budget) to
a JSON file; ``bench check --baseline FILE --fail acc:1%,ppl:5%,speedup:5%`` compares the current
results with it and exits 1 on any regression past its tolerance, or on a baseline row with no result.

Which numbers are gated, and which direction hurts, come from the evaluations' columns: every column
with a ``gate`` (a measure name: ``acc``, ``ppl``, ``speedup``, ``kl``, ``top1`` for the built-ins, or a
plugin's) is stored with its value, its measure and its direction, so a baseline is checked the same
way wherever it is read. A ``--fail`` name is a measure (every column under it) or one column's key
(``ppl_pruned:2%``); a column's own tolerance wins over its measure's.

Tolerances use pytest-benchmark's ``--benchmark-compare-fail`` grammar: ``NAME:5%`` is relative to the
baseline value, ``NAME:0.01`` an absolute difference. Only the direction that hurts counts: accuracy
going down, perplexity going up, a speedup going down. Speed is compared only as the pruned/dense
ratios measured within each run, never as absolute times, because machines differ.

Baselines of schema 1 (blockbench 0.1.0: values ``acc_pruned``, ``ppl_mean``, ``prefill_speedup``,
``decode_speedup`` as plain numbers) are read by translating them (``ppl_mean`` is ``ppl_pruned``).
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

from bench.store import write_bytes_atomic

SCHEMA = 2
KEY = ("model", "metric", "selector", "budget")
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


def baseline_rows(board: pd.DataFrame) -> list[dict[str, Any]]:
    """The leaderboard's gated numbers, one row per (model, metric, selector, budget): ``values`` maps each
    column key with a ``gate`` (from ``board.attrs["columns"]``) to ``{"value", "gate", "higher_is_better"}``;
    values not measured are left out."""
    if board.empty:
        return []
    gated = [c for c in board.attrs.get("columns", [])
             if c.gate and c.higher_is_better is not None and c.key in board]
    rows = []
    for record in board.to_dict(orient="records"):
        values = {
            c.key: {"value": float(record[c.key]), "gate": c.gate, "higher_is_better": bool(c.higher_is_better)}
            for c in gated if record.get(c.key) is not None and not pd.isna(record[c.key])
        }
        rows.append({**{k: record[k] for k in KEY}, "values": values, "seeds": int(record["seeds"])})
    return rows


def save_baseline(board: pd.DataFrame, path: Path, *, grid: str | None, env: dict[str, Any]) -> dict[str, Any]:
    """Write the leaderboard's gate numbers to ``path`` (JSON, atomically); returns what was written."""
    if board.empty:
        raise GateError("no finished cells to save as a baseline")
    payload = {
        "schema": SCHEMA, "grid": grid,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env, "rows": baseline_rows(board),
    }
    write_bytes_atomic(Path(path), (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    return payload


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def upgrade(payload: dict[str, Any], where: str = "baseline") -> dict[str, Any]:
    """A baseline in the current schema: schema 2 checked as it is, schema 1 translated (its value names
    through :data:`LEGACY`). :class:`GateError` for anything else."""
    if not isinstance(payload, dict) or payload.get("schema") not in (1, SCHEMA) or not isinstance(
            payload.get("rows"), list):
        raise GateError(f"{where} is not a blockbench baseline (schema 1 or {SCHEMA})")
    rows = []
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or any(k not in row for k in KEY) or not isinstance(row.get("values"), dict):
            raise GateError(f"{where}: rows[{i}] is not a baseline row (model, metric, selector, budget, values)")
        values: dict[str, dict[str, Any]] = {}
        for name, value in row["values"].items():
            if payload["schema"] == 1:
                if name not in LEGACY or not _number(value):
                    raise GateError(f"{where}: rows[{i}].values.{name}: not a schema-1 baseline value")
                key, gate, higher = LEGACY[name]
                values[key] = {"value": float(value), "gate": gate, "higher_is_better": higher}
            else:
                if not (isinstance(value, dict) and _number(value.get("value")) and isinstance(value.get("gate"), str)
                        and isinstance(value.get("higher_is_better"), bool)):
                    raise GateError(f"{where}: rows[{i}].values.{name}: expected {{value, gate, higher_is_better}}")
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


def compare(baseline: dict[str, Any], board: pd.DataFrame, tolerances: list[Tolerance]) -> pd.DataFrame:
    """One row per (baseline cell, checked column): values, change, allowance and ``status`` (``ok``,
    ``regression``, ``missing``: the cell or the value is absent now, ``improved``). Each column is
    checked under its own key's tolerance, else its measure's; the direction is the one stored in the
    baseline. :class:`GateError` when a tolerance names neither a measure nor a column of the baseline."""
    baseline = upgrade(baseline)
    gates, keys = measures(baseline)
    for tol in tolerances:
        if tol.measure not in gates and tol.measure not in keys:
            raise GateError(f"unknown measure {tol.measure!r}; the baseline has {', '.join(gates) or 'nothing'}"
                            + (f" (or one of its columns: {', '.join(keys)})" if keys else ""))
    by_name = {t.measure: t for t in tolerances}
    current = {tuple(r[k] for k in KEY): r["values"] for r in baseline_rows(board)}
    out = []
    for row in baseline["rows"]:
        key = tuple(row[k] for k in KEY)
        label = "/".join(str(k) for k in key)
        now = current.get(key)
        checked = [(col, stored, by_name.get(col) or by_name.get(stored["gate"]))
                   for col, stored in row["values"].items()]
        order = {id(t): i for i, t in enumerate(tolerances)}  # in the order --fail names them
        for col, stored, tol in sorted((c for c in checked if c[2] is not None), key=lambda c: order[id(c[2])]):
            base = stored["value"]
            value = None if now is None or col not in now else now[col]["value"]
            entry = {"cell": label, "measure": col, "baseline": base, "current": value,
                     "tolerance": str(tol), "allowed": tol.allowed(base)}
            if value is None or not math.isfinite(value):
                entry.update(change=math.nan, status="missing")
            else:
                worse = (base - value) if stored["higher_is_better"] else (value - base)
                status = "regression" if worse > entry["allowed"] else ("improved" if worse < 0 else "ok")
                entry.update(change=value - base, status=status)
            out.append(entry)
    return pd.DataFrame(out, columns=["cell", "measure", "baseline", "current", "change", "tolerance", "allowed",
                                      "status"])


def failed(table: pd.DataFrame) -> bool:
    return bool(table["status"].isin(["regression", "missing"]).any()) if not table.empty else False
