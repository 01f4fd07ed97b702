"""A regression gate: compare a grid's leaderboard with a stored baseline and fail on what got worse.

``bench baseline save`` writes the leaderboard's numbers per (model, metric, selector, budget) to a
JSON file; ``bench check --baseline FILE --fail acc:1%,ppl:5%,speedup:5%`` compares the current
results with it and exits 1 on any regression past its tolerance, or on a baseline row with no result.

Tolerances use pytest-benchmark's ``--benchmark-compare-fail`` grammar: ``NAME:5%`` is relative to the
baseline value, ``NAME:0.01`` an absolute difference. Only the direction that hurts counts: accuracy
going down, perplexity going up, a speedup going down. Accuracy and perplexity are compared as values
(they do not depend on the machine); speed only as the pruned/dense ratios measured within each run,
never as absolute times, because machines differ.
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

SCHEMA = 1
KEY = ("model", "metric", "selector", "budget")
#: measure name in --fail -> (leaderboard columns, True when higher is better)
MEASURES: dict[str, tuple[tuple[str, ...], bool]] = {
    "acc": (("acc_pruned",), True),
    "ppl": (("ppl_mean",), False),
    "speedup": (("prefill_speedup", "decode_speedup"), True),
}
_TOLERANCE = re.compile(r"^(?P<name>[a-z_0-9]+):(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<pct>%?)$")


class GateError(ValueError):
    """Bad tolerance text or baseline file (a usage error, exit 2)."""


@dataclass(frozen=True)
class Tolerance:
    measure: str
    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return abs(baseline) * self.value / 100 if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"{self.value:g}"


def parse_fail(text: str) -> list[Tolerance]:
    """``"acc:1%,ppl:5%,speedup:0.05"`` → tolerances; names and numbers are checked."""
    out: list[Tolerance] = []
    for item in (part.strip() for part in text.split(",")):
        match = _TOLERANCE.match(item)
        if not match:
            raise GateError(f"--fail: {item!r} is not NAME:VALUE or NAME:VALUE% (e.g. acc:1%,ppl:0.5)")
        name = match["name"]
        if name not in MEASURES:
            raise GateError(f"--fail: unknown measure {name!r}; choose from {', '.join(MEASURES)}")
        if any(t.measure == name for t in out):
            raise GateError(f"--fail: {name!r} is given twice")
        out.append(Tolerance(name, float(match["value"]), bool(match["pct"])))
    return out


def _rows(board: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    columns = sorted({c for cols, _ in MEASURES.values() for c in cols if c in board})
    for record in board.to_dict(orient="records"):
        values = {c: float(record[c]) for c in columns if record.get(c) is not None and not pd.isna(record[c])}
        rows.append({**{k: record[k] for k in KEY}, "values": values, "seeds": int(record["seeds"])})
    return rows


def save_baseline(board: pd.DataFrame, path: Path, *, grid: str | None, env: dict[str, Any]) -> dict[str, Any]:
    """Write the leaderboard's gate numbers to ``path`` (JSON); returns what was written."""
    if board.empty:
        raise GateError("no finished cells to save as a baseline")
    payload = {
        "schema": SCHEMA, "grid": grid,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env, "rows": _rows(board),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return payload


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"baseline {str(path)!r} does not exist (write one with 'bench baseline save')") from None
    except (OSError, ValueError) as exc:
        raise GateError(f"baseline {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA or not isinstance(payload.get("rows"), list):
        raise GateError(f"baseline {str(path)!r} is not a blockbench baseline (schema {SCHEMA})")
    return payload


def compare(baseline: dict[str, Any], board: pd.DataFrame, tolerances: list[Tolerance]) -> pd.DataFrame:
    """One row per (baseline cell, checked column): values, change, allowance and ``status``
    (``ok``, ``regression``, ``missing``: the cell or the value is absent now, ``improved``)."""
    current = {tuple(r[k] for k in KEY): r["values"] for r in _rows(board)} if not board.empty else {}
    out = []
    for row in baseline["rows"]:
        key = tuple(row[k] for k in KEY)
        label = "/".join(str(k) for k in key)
        now = current.get(key)
        for tol in tolerances:
            columns, higher_better = MEASURES[tol.measure]
            for col in columns:
                if col not in row["values"]:
                    continue  # the baseline did not measure it (e.g. no accuracy section)
                base = row["values"][col]
                value = None if now is None else now.get(col)
                entry = {"cell": label, "measure": col, "baseline": base, "current": value,
                         "tolerance": str(tol), "allowed": tol.allowed(base)}
                if value is None or not math.isfinite(value):
                    entry.update(change=math.nan, status="missing")
                else:
                    worse = (base - value) if higher_better else (value - base)
                    status = "regression" if worse > entry["allowed"] else ("improved" if worse < 0 else "ok")
                    entry.update(change=value - base, status=status)
                out.append(entry)
    return pd.DataFrame(out, columns=["cell", "measure", "baseline", "current", "change", "tolerance", "allowed",
                                      "status"])


def failed(table: pd.DataFrame) -> bool:
    return bool(table["status"].isin(["regression", "missing"]).any()) if not table.empty else False
