"""Leaderboards from result records: a pandas frame, rendered to the terminal, Markdown and CSV.

One row per (model, metric, selector, budget, unit, healing, method) (and calibration variant, when a grid
has several), ranked *within* each (model, budget): perplexities of models with different tokenizers are not
comparable, so ranks never cross models. Rows that remove attention or MLP branches (``unit``) or heal
after removal (``healing``) rank together with whole-block rows of the same budget: at one ``params``
budget, sub-layer methods compete with block methods. The ``unit`` and ``healing`` columns (and the mean
healing seconds) appear only when some row is not whole blocks without healing, and the ``method``
column only when some row ran a method preset, so a grid without those axes gets the same tables as
before them.

The evaluation columns are whatever the records' evaluations declare (:class:`Column`): each
aggregates over calibration seeds as its ``aggregate`` says, keeps its key (the leaderboard's mean
pruned perplexity is ``ppl_pruned``) and, when it has a ``spread``, gains ``<key>_std`` (std over
seeds, 0 with one seed). Headings, formats, directions and the terminal's choice of columns come from
the columns too, so a plugin evaluation's columns appear, rank and print with no edit here.

Rank groups (``rank_group``, printed after the rank: ``2 ab``): within each (model, budget), two rows
are *separable* when a paired t-test over the calibration seeds they share (the same seeds calibrate
every method, so seed s of one row pairs with seed s of the other) rejects equal means of the ranking
column at 5%, Holm-corrected over the pairs of that (model, budget); pairs sharing fewer than 3 seeds
are never separable (one or two seeds: every row shares group ``a``). Each maximal set of mutually
inseparable rows gets a letter, as in a compact letter display (:func:`rank_groups`).

The terminal table (:func:`render_terminal`) never cuts a cell: it keeps the columns that fit the console
whole, in :func:`terminal_priority` order, and names the others in a line after the table.

Ranking (``rank_by``): ``auto`` takes the column with the highest ``rank`` present (accuracy, then
perplexity, then KL for the built-ins); otherwise an evaluation name (its own ranking column), a column
key or a ``bench check`` measure name; the direction is the column's ``higher_is_better``.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text
from scipy import stats

from algorithms.evaluations.base import Column
from bench.records import (
    CellRecord,
    budget_labels,
    columns_by_evaluation,
    hidden_axes,
    method_text,
    records_frame,
    removed_text,
    row_order,
    varied_axes,
    with_default_axes,
)
from bench.stability import group_stability
from bench.store import ResultStore, write_bytes_atomic

GROUP = ["model", "budget", "metric", "selector", "unit", "healing", "method"]
#: the terminal's short names of units (as in the ``removed`` column's prefix)
TERMINAL_UNIT = {"attention": "attn", "sublayer": "sub"}
#: ties in rank are listed in this order (units block, attention, mlp; no healing first: :func:`row_order`;
#: metric × selector rows before method rows)
TIES = ["metric", "selector", "unit", "healing", "method"]
#: leaderboard and records-frame columns that are not evaluation columns: no evaluation column may take
#: one of these keys (nor ``<key>_std`` of a spread column)
CORE = ("rank", "rank_group", "model", "budget", "metric", "selector", "unit", "healing", "method", "healing_s",
        "calibration", "seed", "seeds", "k",
        "n_blocks", "params_kept", "scoring_s", "evaluations", "proxy_span", "distinct_sets", "typical_removed", "jaccard",
        "tau", "cell_id", "removed", "removed_set", "scores", "higher_is_important")


# ---------------------------------------------------------------------------------------- columns, ranking
def board_columns(board: pd.DataFrame) -> list[Column]:
    """The evaluation :class:`Column` specs of a leaderboard (or records frame), those it holds, in order."""
    return [c for c in board.attrs.get("columns", []) if c.key in board]


def evaluation_keys(records: list[CellRecord]) -> dict[str, list[str]]:
    """Each evaluation's name → its column keys, over the successful ``records``."""
    return {name: [c.key for c in columns] for name, columns in columns_by_evaluation(records).items()}


def _auto(columns: list[Column]) -> Column | None:
    """The highest ``rank`` (first in display order on ties); without one, the first column with a direction."""
    directional = [c for c in columns if c.higher_is_better is not None]
    ranked = [c for c in directional if c.rank is not None]
    if ranked:
        return max(ranked, key=lambda c: c.rank)  # max keeps the first of equal ranks
    return directional[0] if directional else None


def ranking_column(columns: list[Column], rank_by: str = "auto",
                   evaluations: dict[str, list[str]] | None = None) -> Column | None:
    """The column a leaderboard ranks by. ``rank_by``: ``auto``, a column key, an evaluation name (from
    ``evaluations``: name → column keys) or a ``bench check`` measure (a column's ``gate``), tried in
    that order. ``None`` only for ``auto`` when no column has a direction; :class:`ValueError` naming
    the choices when ``rank_by`` matches nothing that can rank."""
    if rank_by == "auto":
        return _auto(columns)
    by_key = {c.key: c for c in columns}
    if rank_by in by_key:
        column = by_key[rank_by]
        if column.higher_is_better is None:
            raise ValueError(f"rank_by: column {rank_by!r} ({column.label}) is a reference value with no "
                             "direction; it cannot rank")
        return column
    if evaluations and rank_by in evaluations and (
            own := _auto([by_key[k] for k in evaluations[rank_by] if k in by_key])):
        return own
    if gated := _auto([c for c in columns if c.gate == rank_by]):
        return gated
    directional = [c for c in columns if c.higher_is_better is not None]
    names = sorted(n for n, keys in (evaluations or {}).items()
                   if any(k in by_key and by_key[k].higher_is_better is not None for k in keys))
    gates = sorted({c.gate for c in directional if c.gate})
    raise ValueError(
        f"rank_by: unknown {rank_by!r}; choose from auto, an evaluation ({', '.join(names) or 'none'}), "
        f"a column ({', '.join(c.key for c in directional) or 'none'}) or a measure ({', '.join(gates) or 'none'})"
    )


def _check_keys(columns: list[Column]) -> None:
    taken = set(CORE)
    for c in columns:
        for key in (c.key, f"{c.key}_std") if c.spread else (c.key,):
            if key in taken:
                raise ValueError(f"evaluation column {c.key!r} ({c.label}) clashes with the leaderboard column "
                                 f"{key!r}; rename the column in its evaluation")
            taken.add(key)


# ---------------------------------------------------------------------------------------- rank groups
#: rank groups: the level of the paired test, family-wise over the pairs of one (model, budget) (Holm)
ALPHA = 0.05
#: rank groups: the fewest calibration seeds two rows must share before a difference can be claimed
MIN_SEEDS = 3


def paired_p_value(a: Mapping[int, float], b: Mapping[int, float], *, min_seeds: int = MIN_SEEDS) -> float | None:
    """Two-sided p-value of a paired t-test of ``a`` against ``b`` (seed → value) over the seeds both hold;
    ``None`` (no test) with fewer than ``min_seeds`` of them. Differences equal on every seed have no spread:
    p is 0 when they are not zero, 1 when they are."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < min_seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    if np.all(d == d[0]):
        return 0.0 if d[0] != 0 else 1.0
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    return float(2.0 * stats.t.sf(abs(t), d.size - 1))


def _maximal_cliques(n: int, adjacent: list[set[int]]) -> list[tuple[int, ...]]:
    """Every maximal clique of the graph on ``0..n-1`` (Bron–Kerbosch with pivot), each sorted, sorted."""
    found: list[tuple[int, ...]] = []

    def expand(clique: set[int], candidates: set[int], excluded: set[int]) -> None:
        if not candidates and not excluded:
            found.append(tuple(sorted(clique)))
            return
        pivot = min(candidates | excluded, key=lambda v: (-len(adjacent[v] & candidates), v))
        for v in sorted(candidates - adjacent[pivot]):
            expand(clique | {v}, candidates & adjacent[v], excluded & adjacent[v])
            candidates = candidates - {v}
            excluded = excluded | {v}

    expand(set(), set(range(n)), set())
    return sorted(found)


def rank_groups(seed_values: Sequence[Mapping[int, float]], *, alpha: float = ALPHA,
                min_seeds: int = MIN_SEEDS) -> list[str]:
    """Compact-letter rank groups of rows given best first, each as seed → value of the ranking column.

    Two rows are *separable* when a paired t-test over the seeds they share (:func:`paired_p_value`,
    at least ``min_seeds`` of them) rejects "no difference" at level ``alpha``, Holm-corrected over every
    tested pair of ``seed_values``. Each maximal set of mutually inseparable rows gets a letter (``a`` the
    set holding the first row, then in the order of their members); a row's group is its letters (``ab``:
    inseparable from some ``a`` rows and some ``b`` rows). Rows sharing a letter must not be read as
    ranked apart. A row with no values gets ``""``."""
    rows = [i for i, values in enumerate(seed_values) if values]
    tested = []
    for x, i in enumerate(rows):
        for j in rows[x + 1:]:
            p = paired_p_value(seed_values[i], seed_values[j], min_seeds=min_seeds)
            if p is not None:
                tested.append((p, i, j))
    separable = set()
    for step, (p, i, j) in enumerate(sorted(tested)):  # Holm's step-down
        if p > alpha / (len(tested) - step):
            break
        separable.add((i, j))
    position = {row: x for x, row in enumerate(rows)}
    adjacent = [{position[j] for j in rows if j != i and (min(i, j), max(i, j)) not in separable} for i in rows]
    letters = _letters(len(cliques := _maximal_cliques(len(rows), adjacent)))
    out = [""] * len(seed_values)
    for letter, clique in zip(letters, cliques, strict=True):
        for x in clique:
            out[rows[x]] += letter
    return out


def _letters(n: int) -> list[str]:
    """``a``..``z``, ``A``..``Z``; beyond 52 groups, ``.1.``, ``.2.``... (never ambiguous when joined)."""
    if n <= len(string.ascii_letters):
        return list(string.ascii_letters[:n])
    return [f".{i + 1}." for i in range(n)]


def _rank_group_column(runs: pd.DataFrame, agg: pd.DataFrame, group: list[str], within: list[str],
                       ranked: Column | None) -> list[str]:
    """Each leaderboard row's rank group (:func:`rank_groups`) within its ``within`` partition, from the
    seeds' values of the ranking column in ``runs`` (one row per record)."""
    out = [""] * len(agg)
    if ranked is None:
        return out
    per_seed: dict[tuple, dict[int, float]] = {}
    for key, value in runs.groupby(group + ["seed"], sort=False)[ranked.key].mean().items():
        if not pd.isna(value):
            per_seed.setdefault(tuple(key[:-1]), {})[int(key[-1])] = float(value)
    for _, part in agg.groupby(within, sort=False):
        ordered = part.sort_values(["rank", *TIES], kind="stable", key=row_order)
        values = [per_seed.get(tuple(row), {}) for row in ordered[group].itertuples(index=False)]
        for index, label in zip(ordered.index, rank_groups(values), strict=True):
            out[agg.index.get_loc(index)] = label
    return out


# ---------------------------------------------------------------------------------------- the board
def leaderboard(records: list[CellRecord], rank_by: str = "auto") -> pd.DataFrame:
    """One row per (model, budget, metric, selector, unit, healing, method) [and calibration variant]: every
    evaluation column aggregated over seeds (``<key>_std`` for spread columns), ranked within (model,
    budget), with its ``rank_group`` (letters, :func:`rank_groups`; ``""`` for a row without a ranking
    value). The ``unit``, ``healing`` and ``method`` columns are kept only when some row is not at its default
    (:func:`bench.records.varied_axes`), ``healing_s`` (mean healing seconds) only when some row healed. Its
    ``attrs``: ``columns`` (the evaluation :class:`Column` specs, in display order) and ``ranked_by``
    (the ranking column's key; ``None`` when no column has a direction: every row is rank 1)."""
    df = records_frame(records)
    if not df.empty:
        df = with_default_axes(df)
    if df.empty:
        board = pd.DataFrame()
        board.attrs.update(columns=[], ranked_by=None)
        return board
    columns = board_columns(df)
    _check_keys(columns)
    for key in [c.key for c in columns] + ["params_kept", "scoring_s", "evaluations", "proxy_span", "healing_s"]:
        df[key] = pd.to_numeric(df[key], errors="coerce")  # None (not measured) -> NaN
    measured = [c for c in columns if df[c.key].notna().any()]
    ranked = ranking_column(measured, rank_by, evaluation_keys(records))
    df = df.sort_values(["seed", "cell_id"], kind="stable")  # "typical" set: ties go to the lowest seed
    spec: dict[str, tuple[str, str]] = {}
    for c in columns:
        spec[c.key] = (c.key, c.aggregate)
        if c.spread:
            spec[f"{c.key}_std"] = (c.key, "std")
    # a grid with several calibration variants (a stability study) gets one row per variant
    group = GROUP + ["calibration"] if df["calibration"].nunique() > 1 else GROUP
    agg = df.groupby(group, sort=False).agg(
        seeds=("seed", "nunique"),
        k=("k", "first"),
        n_blocks=("n_blocks", "first"),
        **spec,
        params_kept=("params_kept", "mean"),
        scoring_s=("scoring_s", "mean"),
        evaluations=("evaluations", "mean"),
        proxy_span=("proxy_span", "mean"),
        healing_s=("healing_s", "mean"),
        distinct_sets=("removed", "nunique"),
        typical_removed=("removed", lambda s: Counter(s).most_common(1)[0][0]),
    ).reset_index()
    for c in columns:
        if c.spread:  # one seed: no spread (0); no value at all: no spread either (NaN)
            agg[f"{c.key}_std"] = agg[f"{c.key}_std"].where(agg[c.key].isna(), agg[f"{c.key}_std"].fillna(0.0))
    stab = group_stability(df, group)
    if not stab.empty:
        agg = agg.merge(stab, on=group, how="left")
    within = ["model", "budget"] + (["calibration"] if "calibration" in group else [])
    if ranked is None:
        agg["rank"] = 1
    else:
        agg["rank"] = agg.groupby(within)[ranked.key].rank(
            method="min", ascending=not ranked.higher_is_better, na_option="bottom").astype(int)
    # rows whose difference in the ranking column is within the seeds' noise share a rank group
    agg["rank_group"] = _rank_group_column(df, agg, group, within, ranked)
    board = agg.sort_values([*within, "rank", *TIES], key=row_order).reset_index(drop=True)
    # a grid without units, healing or methods: the columns it always had, in the order it always had them
    hidden = hidden_axes(board) + ([] if "healing" in varied_axes(board) else ["healing_s"])
    board = board.drop(columns=hidden)
    board.attrs.update(columns=columns, ranked_by=ranked.key if ranked is not None else None)
    return board


# ---------------------------------------------------------------------------------------- rendering
def _cells(board: pd.DataFrame, c: Column) -> list[str]:
    if not c.spread:
        return [c.format(v) for v in board[c.key]]
    std = board[f"{c.key}_std"] if f"{c.key}_std" in board else [None] * len(board)
    out = []
    for mean, s in zip(board[c.key], std, strict=True):
        text = c.format(mean)
        out.append(text if text == "–" or s is None or pd.isna(s) else f"{text} ± {c.format(s)}")
    return out


def _number(fmt: str):
    return lambda v: "–" if v is None or pd.isna(v) else format(v, fmt)


def _rank_cells(board: pd.DataFrame) -> list[str]:
    """``rank`` with its rank group after it (``2 ab``), or the rank alone when the row has none."""
    groups = board["rank_group"] if "rank_group" in board else [""] * len(board)
    if "seeds" in board and not (board["seeds"] >= MIN_SEEDS).any():
        groups = [""] * len(board)  # no row has seeds enough to separate anything: no letters to read
    return [f"{r} {g}" if isinstance(g, str) and g else str(r) for r, g in zip(board["rank"], groups, strict=True)]


def _table(board: pd.DataFrame, *, terminal: bool) -> tuple[pd.DataFrame, set[str], dict[str, str]]:
    """The board as strings (Markdown/CSV headings, or the terminal's), the headings to right-justify and
    each evaluation column's heading → its key."""
    out = pd.DataFrame({
        "rank": _rank_cells(board),
        "model": board["model"],
        "budget": budget_labels(board),
        "metric": board["metric"],
        "selector": board["selector"],
    })
    if "unit" in board:  # only when some row removes branches (leaderboard()); the terminal says attn
        out["unit"] = board["unit"].map(lambda u: TERMINAL_UNIT.get(u, u)) if terminal else board["unit"]
    if "healing" in board:  # only when some row heals
        out["healing"] = board["healing"]
    if "method" in board:  # only when some row ran a method preset: before the metric and selector it sets
        out.insert(3, "method", board["method"].map(method_text))
    if "calibration" in board:  # several calibration variants: one row each
        out.insert(3, "calibration", board["calibration"])
    right = {"evals", "seeds", "jaccard", "τ", "score s", "scoring s", "heal s", "healing s"}
    if not any(" " in cell for cell in out["rank"]):
        right.add("rank")  # bare numbers; with rank groups (``2 ab``) the rank is read from the left
    keys: dict[str, str] = {}
    for c in board_columns(board):
        if terminal and not c.terminal:
            continue
        heading = (c.short or c.label) if terminal else c.label
        if heading in out:  # two columns with one label: the second goes by its key
            heading = c.key
        out[heading] = _cells(board, c)
        keys[heading] = c.key
        if not c.spread:
            right.add(heading)
    if not terminal:
        out["params kept"] = board["params_kept"].map(_number(".1%"))
        out["span loss"] = board["proxy_span"].map(_number(".4f"))
    out["evals"] = board["evaluations"].map(_number(".0f"))
    out["seeds"] = board["seeds"]
    if not terminal:
        out["distinct sets"] = board["distinct_sets"]
    for col, label in (("jaccard", "jaccard"), ("tau", "τ")):  # stability over seeds (bench.stability)
        if col in board:
            out[label] = board[col].map(_number(".2f"))
    out["score s" if terminal else "scoring s"] = board["scoring_s"].map(_number(".3f"))
    if "healing_s" in board:
        out["heal s" if terminal else "healing s"] = board["healing_s"].map(_number(".2f"))
    units = board["unit"] if "unit" in board else ["block"] * len(board)
    out["removed" if terminal else "typical removed"] = [
        removed_text(blocks, unit) for blocks, unit in zip(board["typical_removed"], units, strict=True)]
    return out, right, keys


def display(board: pd.DataFrame, *, terminal: bool = False) -> pd.DataFrame:
    """The leaderboard as strings under the columns' labels, for Markdown and HTML; with ``terminal``, the
    terminal's table: only the columns marked ``terminal``, under their ``short`` headings, without
    params kept, span loss and distinct sets. The ``rank`` cells carry the rank group (``2 ab``)."""
    if board.empty:
        return pd.DataFrame()
    return _table(board, terminal=terminal)[0]


#: the terminal table's columns that come first when the terminal is too narrow for all of them
IDENTITY = ("rank", "model", "budget", "calibration", "method", "metric", "selector", "unit", "healing")
#: between two terminal columns: the box's divider and one space of padding
GUTTER = 2


def _heading(heading: str, values_width: int) -> tuple[str, int]:
    """The heading as printed (split at a space onto two lines when it is wider than the values) and the
    column width that holds it and the values whole."""
    width = cell_len(heading)
    if width <= values_width:
        return heading, values_width
    best = (heading, width)
    for i, ch in enumerate(heading):
        if ch == " ":
            top, bottom = heading[:i], heading[i + 1:]
            if (two := max(cell_len(top), cell_len(bottom))) < best[1]:
                best = (f"{top}\n{bottom}", two)
    return best[0], max(best[1], values_width)


def terminal_priority(shown: pd.DataFrame, keys: dict[str, str], ranked_by: str | None) -> list[str]:
    """The terminal table's headings in the order they are kept when not all fit: the row's identity
    (rank, model, budget, calibration, method, metric, selector, unit, healing), the ranking column, the other evaluation
    columns in display order, seeds, then the rest in display order."""
    order = [h for h in IDENTITY if h in shown]
    order += [h for h, key in keys.items() if key == ranked_by]
    order += [h for h in keys if h not in order]
    order += [h for h in ("seeds",) if h in shown and h not in order]
    return order + [h for h in shown.columns if h not in order]


def render_terminal(board: pd.DataFrame, console: Console, title: str = "blockbench leaderboard", *,
                    full_table: str | None = None) -> None:
    """The leaderboard as a rich table: the columns marked ``terminal``, under their short headings.

    No cell is ever cut: each column is as wide as its widest value (a heading wider than that wraps at a
    space onto two lines), and the columns are kept in :func:`terminal_priority` order while the table
    fits ``console.width``; the columns left out are named in one line after the table, with where the
    full table is (``full_table``, e.g. the path of ``leaderboard.md``; default: the results folder)."""
    if board.empty:
        console.print("no finished cells yet")
        return
    shown, right, keys = _table(board, terminal=True)
    cells = {h: [str(v) for v in shown[h]] for h in shown.columns}
    layout = {h: _heading(h, max(cell_len(v) for v in cells[h])) for h in shown.columns}
    kept: list[str] = []
    used = -GUTTER
    for h in terminal_priority(shown, keys, board.attrs.get("ranked_by")):
        if kept and used + GUTTER + layout[h][1] > console.width:
            break
        kept.append(h)
        used += GUTTER + layout[h][1]
    columns = [h for h in shown.columns if h in kept]
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for h in columns:
        table.add_column(Text(layout[h][0]), justify="right" if h in right else "left", width=layout[h][1],
                         no_wrap=True, overflow="fold")
    for i in range(len(shown)):
        table.add_row(*(Text(cells[h][i]) for h in columns))
    console.print(table)
    if left := [h for h in shown.columns if h not in kept]:
        where = full_table or "leaderboard.md and leaderboard.csv in the results folder"
        console.print(Text(f"Left out to fit {console.width} columns: {', '.join(left)}. Full table: {where}."))


def notes(board: pd.DataFrame) -> str:
    """The Markdown report's notes: the ranking, how seeds combine, each ranked or gated column's direction,
    then the fixed columns."""
    columns = board_columns(board)
    by_key = {c.key: c for c in columns}
    within = "model, budget and calibration variant" if "calibration" in board else "model and budget"
    ranked = by_key.get(board.attrs.get("ranked_by") or "")
    parts = [f"Ranks within each {within}" + (
        f", by `{ranked.label}` ({'higher' if ranked.higher_is_better else 'lower'} first)." if ranked
        else ": no column has a direction, so every row ranks 1.")]
    if ranked and "seeds" in board and (board["seeds"] >= MIN_SEEDS).any():
        parts.append(
            f"The letters after a rank are rank groups: rows that share a letter are not separable by "
            f"`{ranked.label}` within the noise over calibration seeds, so they must not be read as ranked apart. "
            f"Two rows are separable only when a paired t-test over the seeds they share (at least {MIN_SEEDS} "
            f"seeds; with fewer, no pair is separable) rejects equal means at {ALPHA:.0%}, Holm-corrected over the "
            f"pairs ranked together; each letter is a largest set of mutually inseparable rows (`a`: the set with "
            f"the first row).")
    elif ranked:
        parts.append(f"No row has {MIN_SEEDS} calibration seeds or more, so no rank is tested against the noise "
                     "over seeds (run more seeds for rank groups).")
    if columns:
        medians = [f"`{c.label}`" for c in columns if c.aggregate == "median"]
        spread = [f"`{c.label}`" for c in columns if c.spread]
        text = "Evaluation columns: the mean over calibration seeds"
        text += f" (the median for {', '.join(medians)})" if medians else ""
        text += f"; {', '.join(spread)}: ± the std over seeds" if spread else ""
        parts.append(text + ".")
        directions = []
        for c in columns:
            if c.higher_is_better is None or not (c.gate or c.rank is not None):
                continue
            what = f"`{c.label}`: {'higher' if c.higher_is_better else 'lower'} is better"
            directions.append(what + (f" (`bench check` measure `{c.gate}`)" if c.gate else ""))
        if directions:
            parts.append("; ".join(directions) + ".")
    if "jaccard" in board:
        parts.append("`jaccard`: mean overlap |A ∩ B| / |A ∪ B| of the removed block sets of two seeds (1 = every "
                     "seed removes the same blocks); `τ`: mean Kendall rank correlation of the block scores of two "
                     "seeds (`bench stability` for the full study).")
    if "unit" in board:
        parts.append("`unit`: what the row removes: whole blocks, or the attention (`attn`) or MLP (`mlp`) branch of "
                     "the chosen blocks, which keep their other branch, or sub-layers (`sub`: either branch, numbered 2i "
                     "for block i's attention and 2i+1 for its MLP); `typical removed` lists those blocks (sub-layer "
                     "indices) after that prefix and a budget's (k/n) counts units of the row's kind out of the "
                     "model's blocks (2L sub-layers). Rows "
                     "of every unit rank together within a budget (a `params` budget keeps the same share of "
                     "parameters whatever the unit).")
    if "healing" in board:
        parts.append("`healing`: what followed removal, before evaluation (`none`: nothing); `healing s`: its mean "
                     "seconds.")
    if "method" in board:
        parts.append("`method`: the method preset the row ran (`bench list methods`: its paper, and where it "
                     "deviates), with the metric and selector it sets; `–`: the grid's own metric × selector.")
    parts.append("`span loss`: the chosen set's proxy span objective (sum over its contiguous runs of the metric's "
                 "span importance; lower = the set the metric calls more removable), the common yardstick for "
                 "selectors. `evals`: objective evaluations the selector used.")
    return " ".join(parts)


def write_reports(board: pd.DataFrame, out_dir: Path, *, title: str) -> list[Path]:
    """``leaderboard.md`` (the table with its notes) and ``leaderboard.csv`` (every number) under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    write_bytes_atomic(csv_path, board.to_csv(index=False).encode())
    if board.empty:
        md = f"# {title}\n\n_no finished cells yet_\n"
    else:
        shown, right, _ = _table(board, terminal=False)
        # the columns' own formats as written (tabulate would reparse "0.1000" as 0.1)
        table = shown.to_markdown(index=False, disable_numparse=True,
                                  colalign=["right" if c in right else "left" for c in shown.columns])
        md = f"# {title}\n\n{notes(board)}\n\n{table}\n"
    write_bytes_atomic(md_path, md.encode())
    return [md_path, csv_path]


def build(results_dir: str | Path, cell_ids: set[str] | None = None,
          rank_by: str = "auto") -> tuple[pd.DataFrame, list[CellRecord]]:
    """Leaderboard of the records in ``results_dir`` (restricted to ``cell_ids`` when given), and the records."""
    records = ResultStore(results_dir).records()
    if cell_ids is not None:
        records = [r for r in records if r.cell_id in cell_ids]
    return leaderboard(records, rank_by=rank_by), records
