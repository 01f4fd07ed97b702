"""The record of one cell, and records as a frame: the results format.

A record is a :class:`CellRecord` (pydantic) written as ``records/<cell_id>.json``. Its ``schema``
says which layout it has; :func:`parse_record` reads the current one and refuses older ones with a
message that says how to rerun (records of blockbench 0.1.0 have no ``schema`` 2: their cell ids
hashed the YAML as written, so they cannot be matched to today's cells).

Layout (``status`` ``ok``; a ``failed`` record keeps what was known and adds ``stage``, ``error``,
``traceback``)::

    schema, cell_id, grid, spec, versions, env, labels{model, metric, selector, budget, seed, calibration,
                                                       unit, healing, method}
    model{name, fingerprint, n_blocks, architecture, parameters}
    k, removed_blocks, scores, higher_is_important, calibration_stats
    selector_result{evaluations, info, proxies{proxy_sum, proxy_span}}
    parameters{dense, pruned, kept_share}
    evaluations{<name>: {name, version, params, columns[...], values{<column key>: number}, dense, pruned,
                         seconds{dense, pruned}, cached}}
    timings{load_model, capture, scoring, selection, proxies, <evaluation>_dense, <evaluation>_pruned}
    cache_hits{hidden, scores, selection, <evaluation>}, finished_at

Every evaluation's ``columns`` (key, label, direction, aggregation, format, gate measure, ranking
priority) travel in the record, so reports read directions and columns from the evaluation that
produced them, even when that evaluation's plugin is not installed where the report is built.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from algorithms.evaluations.base import Column

#: bump when the record layout changes; readers refuse other values with a message
RECORD_SCHEMA = 2


#: a record's unit and healing labels when its grid has no ``units`` / ``healing`` axis (``"none"`` is
#: :data:`bench.config.NO_HEALING`); reports, stability tables and the gate show and store these two
#: labels only where some row differs from them, so the outputs of grids without the axes are unchanged
DEFAULT_UNIT = "block"
DEFAULT_HEALING = "none"
#: the records frame's ``method`` of a metric × selector cell (no method preset); its ``method`` column is
#: shown, like ``unit`` and ``healing``, only where some row ran a preset
DEFAULT_METHOD = ""
#: the axes whose columns the reports show only where some row is not at the default, in column order
AXES = (("unit", DEFAULT_UNIT), ("healing", DEFAULT_HEALING), ("method", DEFAULT_METHOD))
#: the pruning units in the order reports list them
UNITS = ("block", "attention", "mlp", "sublayer")
#: the ``removed`` cells of sub-layer rows: the blocks whose branch was removed (``sublayer``: the
#: sub-layer indices, 2i attention and 2i + 1 MLP of block i), after this prefix
UNIT_PREFIX = {"attention": "attn ", "mlp": "mlp ", "sublayer": "sub "}


class RecordError(ValueError):
    """A record this version of blockbench cannot read (older schema, damaged fields)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Labels(_Model):
    model: str
    metric: str
    selector: str
    budget: str
    seed: int
    calibration: str
    #: what was removed (``block``, ``attention``, ``mlp``) and what followed (``none``, a healing's label)
    unit: str = DEFAULT_UNIT
    healing: str = DEFAULT_HEALING
    #: the method preset the cell ran (``shortgpt``); None for a metric × selector cell, and then not
    #: written, so the records of grids without methods are as they were
    method: str | None = None

    @model_serializer(mode="wrap")
    def _without_no_method(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("method") is None:
            data.pop("method", None)
        return data


class ModelInfo(_Model):
    name: str
    fingerprint: str
    n_blocks: int
    architecture: str | None = None
    parameters: int | None = None


class SelectorOutcome(_Model):
    evaluations: int = 0
    info: dict[str, Any] = Field(default_factory=dict)
    proxies: dict[str, float | None] = Field(default_factory=dict)


class Parameters(_Model):
    dense: int
    pruned: int
    kept_share: float


class HealingOutcome(_Model):
    """What healing the pruned model cost and did (``info``: the healing's own report)."""

    name: str
    seconds: float
    trained_parameters: int
    info: dict[str, Any] = Field(default_factory=dict)
    cached: bool = False


class EvaluationOutcome(_Model):
    """One evaluation of a cell: its identity, its columns and their values, the raw results."""

    name: str
    version: str
    params: dict[str, Any] = Field(default_factory=dict)
    columns: list[dict[str, Any]]
    values: dict[str, float | None]
    dense: dict[str, Any] | None = None
    pruned: dict[str, Any]
    seconds: dict[str, float | None] = Field(default_factory=dict)
    cached: bool = False

    def column_specs(self) -> list[Column]:
        return [Column.from_dict(c) for c in self.columns]


class CellRecord(_Model):
    """One cell's result (see the module docstring for the layout)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: int = Field(RECORD_SCHEMA, alias="schema")
    cell_id: str
    grid: str
    spec: dict[str, Any]
    versions: dict[str, Any]
    env: dict[str, Any]
    labels: Labels
    status: Literal["selected", "ok", "failed"]
    model: ModelInfo | None = None
    k: int | None = None
    removed_blocks: list[int] | None = None
    scores: list[float] | None = None
    higher_is_important: bool | None = None
    calibration_stats: dict[str, float] = Field(default_factory=dict)
    selector_result: SelectorOutcome | None = None
    parameters: Parameters | None = None
    healing: HealingOutcome | None = None
    evaluations: dict[str, EvaluationOutcome] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    cache_hits: dict[str, bool] = Field(default_factory=dict)
    stage: str | None = None
    error: str | None = None
    traceback: str | None = None
    finished_at: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, key: str) -> float | None:
        """The value of column ``key`` from whichever evaluation produced it (None when none did)."""
        for outcome in self.evaluations.values():
            if key in outcome.values:
                return outcome.values[key]
        return None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse_record(data: Any, *, where: str = "record") -> CellRecord:
    """A :class:`CellRecord` from parsed JSON; :class:`RecordError` for another schema or bad fields."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: not a JSON object")
    schema = data.get("schema")
    if schema != RECORD_SCHEMA:
        raise RecordError(
            f"{where}: record schema {schema!r} (written by blockbench 0.1.0 or another version); this version "
            f"reads schema {RECORD_SCHEMA}. Cell ids changed with it, so these records match no cell of today's "
            "grids: rerun the grid (`bench run --grid FILE`, optionally with a new --results folder) and delete "
            "the old records folder when you no longer need it"
        )
    try:
        return CellRecord.model_validate(data)
    except ValidationError as exc:
        raise RecordError(f"{where}: damaged record: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


# ---------------------------------------------------------------------------------------- records → frame
def calibration_order(col: pd.Series) -> pd.Series:
    """``sort_values`` key: calibration variants in natural order (the numbers in a label compared as
    numbers: wikipedia/8×128 before wikipedia/32×128); other columns as they are. The leaderboard and
    the stability tables both sort with it."""
    if col.name != "calibration":
        return col
    return col.map(lambda label: tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(label))))


def row_order(col: pd.Series) -> pd.Series:
    """``sort_values`` key of the reports' rows: calibration variants as :func:`calibration_order`, units
    in :data:`UNITS` order (block, attention, mlp), no healing before any healing; other columns as they
    are."""
    if col.name == "unit":
        return col.map(lambda u: (UNITS.index(u) if u in UNITS else len(UNITS), str(u)))
    if col.name == "healing":
        return col.map(lambda h: (h != DEFAULT_HEALING, str(h)))
    return calibration_order(col)


def with_default_axes(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``unit``, ``healing`` and ``method`` columns (their defaults where it has none: a
    frame of a grid without these axes, or of an older blockbench)."""
    missing = {k: v for k, v in AXES if k not in frame}
    if not missing:
        return frame
    out = frame.assign(**missing)
    out.attrs = dict(frame.attrs)
    return out


def varied_axes(frame: pd.DataFrame) -> list[str]:
    """Which of ``unit``, ``healing`` and ``method`` some row of ``frame`` holds at other than its
    default, in that order: the reports' columns for them are shown only then."""
    return [k for k, default in AXES if k in frame and bool((frame[k] != default).any())]


def hidden_axes(frame: pd.DataFrame) -> list[str]:
    """The axis columns of ``frame`` that every row holds at its default (dropped from the reports)."""
    shown = varied_axes(frame)
    return [k for k, _ in AXES if k in frame and k not in shown]


def method_text(method: str) -> str:
    """A report's ``method`` cell: the preset's name, ``–`` for a metric × selector row."""
    return method if method != DEFAULT_METHOD else "–"


def removed_text(blocks: str, unit: str = DEFAULT_UNIT) -> str:
    """The removed set as the reports print it: :func:`compact_blocks`, after ``attn `` / ``mlp `` when
    the removed units are attention or MLP branches of those blocks (``"attn 3,12-14"``)."""
    return UNIT_PREFIX.get(unit, "" if unit == DEFAULT_UNIT else f"{unit} ") + compact_blocks(blocks)


def columns_by_evaluation(records: list[CellRecord]) -> dict[str, list[Column]]:
    """Each evaluation's name → its columns (each key once, in the evaluation's order), over the
    successful ``records``, evaluations in the order first seen."""
    per_eval: dict[str, list[Column]] = {}
    for r in records:
        if not r.ok:
            continue
        for name, outcome in r.evaluations.items():
            cols = per_eval.setdefault(name, [])
            known = {c.key for c in cols}
            cols.extend(c for c in outcome.column_specs() if c.key not in known)
    return per_eval


def record_columns(records: list[CellRecord]) -> list[Column]:
    """Every evaluation column the successful ``records`` carry, once each, evaluations in ranking
    order (highest ``rank`` first: accuracy, perplexity, KL, then unranked ones such as speed), columns
    in each evaluation's own order."""
    per_eval = columns_by_evaluation(records)

    def priority(cols: list[Column]) -> int:
        ranks = [c.rank for c in cols if c.rank is not None]
        return max(ranks) if ranks else -1

    ordered = sorted(per_eval.items(), key=lambda item: -priority(item[1]))  # stable: first seen first
    return [c for _, cols in ordered for c in cols]


def records_frame(records: list[CellRecord]) -> pd.DataFrame:
    """One row per successful record: labels, the chosen set, selector statistics and every evaluation
    column's value. ``frame.attrs["columns"]`` holds the evaluation :class:`Column` specs in display
    order (empty frame: none)."""
    rows = []
    for r in records:
        if not r.ok:
            continue
        assert r.model is not None and r.removed_blocks is not None and r.selector_result is not None
        row = {
            "cell_id": r.cell_id,
            "model": r.labels.model, "metric": r.labels.metric, "selector": r.labels.selector,
            "budget": r.labels.budget, "seed": r.labels.seed, "calibration": r.labels.calibration,
            "unit": r.labels.unit, "healing": r.labels.healing,
            "method": r.labels.method if r.labels.method is not None else DEFAULT_METHOD,
            "healing_s": r.healing.seconds if r.healing is not None else None,
            "k": r.k,
            "n_blocks": r.model.n_blocks,
            "removed": " ".join(str(b) for b in r.removed_blocks),
            "params_kept": r.parameters.kept_share if r.parameters is not None else None,
            "scoring_s": r.timings.get("scoring"),
            "evaluations": r.selector_result.evaluations,
            "proxy_span": r.selector_result.proxies.get("proxy_span"),
            # for the stability statistics (leaderboard columns and bench stability)
            "removed_set": tuple(r.removed_blocks),
            "scores": tuple(r.scores) if r.scores is not None else None,
            "higher_is_important": bool(r.higher_is_important),
        }
        for outcome in r.evaluations.values():
            row.update(outcome.values)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["columns"] = record_columns(records)
    return frame


def compact_blocks(blocks: str) -> str:
    """``"3 12 13 14 26"`` → ``"3,12-14,26"``."""
    nums = [int(b) for b in blocks.split()]
    runs: list[list[int]] = []
    for b in nums:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def budget_labels(frame: pd.DataFrame) -> list[str]:
    """``25% (8/30)``: each row's budget with the blocks it removes out of the model's."""
    return [f"{b} ({k}/{n})" for b, k, n in zip(frame["budget"], frame["k"], frame["n_blocks"], strict=True)]
