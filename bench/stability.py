"""How much does the chosen block set depend on the calibration sample? Statistics over result records.

A stability study reruns scoring and selection for every calibration seed (and, with a grid's
``stability:`` section, every calibration variant: source × samples × seq_len). Per (model,
calibration variant, metric, selector, budget, unit, healing, method) this module reports, over the runs of
that group (``unit`` and ``healing`` columns only when some row is not whole blocks without healing,
``method`` only when some row ran a method preset; a sub-layer row's "blocks" are the blocks whose
attention or MLP branch was removed):

- ``jaccard_mean`` / ``jaccard_std``: |A ∩ B| / |A ∪ B| of the removed block sets, over all pairs of runs
  (1 = every seed removes the same blocks, 0 = no two seeds share a block);
- ``frequency``: for each block, the share of runs that removed it; ``always``: the blocks every run removed;
- ``tau_mean`` / ``rho_mean`` (and std): Kendall's τ and Spearman's ρ between the metric's block-score
  vectors of two runs, over all pairs (scipy.stats), i.e. whether the *ranking* of blocks is stable even
  where the cut-off at k changes the set;
- ``<key>_mean``, ``<key>_std``, ``<key>_ci_low``, ``<key>_ci_high`` for every evaluation column with a
  ``spread`` (``ppl_pruned``, ``acc_pruned``, ``kl`` for the built-ins, and any plugin's): mean, sample std
  and a percentile-bootstrap interval of the mean (seeded);
- ``distinct_sets``: how many different block sets the runs produced.

Pair statistics are means over the n(n−1)/2 pairs with the population std of the pair values (0 for two
runs); they need at least two runs and are NaN otherwise. When a grid has several calibration variants,
rows with calibration ``all`` pool every variant and seed of a method: how much the choice moves with the
calibration data as a whole. Everything here is a pure function of the records.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from algorithms.evaluations.base import Column
from bench.records import (
    CellRecord,
    budget_labels,
    hidden_axes,
    method_text,
    records_frame,
    removed_text,
    row_order,
    with_default_axes,
)
from bench.store import write_bytes_atomic

#: one stability row per these keys
KEY = ["model", "calibration", "metric", "selector", "budget", "unit", "healing", "method"]
#: calibration label of the rows that pool every calibration variant
POOLED = "all"
CONFIDENCE = 0.95
N_RESAMPLES = 9999


# ---------------------------------------------------------------------------------------- block sets
def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    a, b = set(a), set(b)
    return 1.0 if not (a or b) else len(a & b) / len(a | b)


def pairwise_jaccard(sets: Sequence[Iterable[int]]) -> list[float]:
    """Jaccard overlap of every pair of sets (n(n−1)/2 values)."""
    return [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


def jaccard_stats(sets: Sequence[Iterable[int]]) -> dict[str, float]:
    """Mean and std of the pairwise Jaccard overlaps (NaN with fewer than two sets)."""
    mean, std = _mean_std(pairwise_jaccard(sets))
    return {"jaccard_mean": mean, "jaccard_std": std}


def selection_frequency(sets: Sequence[Iterable[int]], n_blocks: int) -> np.ndarray:
    """Share of the sets that contain each block ``0 .. n_blocks-1``."""
    if not sets:
        raise ValueError("selection_frequency needs at least one block set")
    counts = np.zeros(n_blocks, dtype=np.float64)
    for s in sets:
        for b in set(s):
            if not 0 <= b < n_blocks:
                raise ValueError(f"block {b} is out of range for {n_blocks} blocks")
            counts[b] += 1
    return counts / len(sets)


def distinct_sets(sets: Sequence[Iterable[int]]) -> int:
    return len({frozenset(s) for s in sets})


# ---------------------------------------------------------------------------------------- score rankings
def rank_correlations(score_vectors: Sequence[Sequence[float]]) -> dict[str, float]:
    """Kendall's τ (tau-b) and Spearman's ρ between every pair of block-score vectors: mean and std.

    NaN with fewer than two vectors, or for a pair where a vector is constant (no ranking to compare)."""
    vectors = [np.asarray(v, dtype=np.float64) for v in score_vectors]
    if len({v.shape for v in vectors}) > 1:
        raise ValueError(f"score vectors differ in length: {sorted({len(v) for v in vectors})}")
    taus, rhos = [], []
    with warnings.catch_warnings():  # a constant vector: scipy warns and returns NaN, which we keep
        warnings.simplefilter("ignore")
        for a, b in itertools.combinations(vectors, 2):
            taus.append(float(stats.kendalltau(a, b).statistic))
            rhos.append(float(stats.spearmanr(a, b).statistic))
    tau_mean, tau_std = _mean_std(taus)
    rho_mean, rho_std = _mean_std(rhos)
    return {"tau_mean": tau_mean, "tau_std": tau_std, "rho_mean": rho_mean, "rho_std": rho_std}


# ---------------------------------------------------------------------------------------- outcomes
def summarize(values: Sequence[float], *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
              seed: int = 0) -> dict[str, float]:
    """Mean, sample std (ddof=1) and a percentile-bootstrap interval of the mean, seeded (scipy.stats).

    With fewer than two values the std and the interval are NaN. With few runs the interval is wide and
    coarse (three seeds: the bootstrap means take only ten values), which is the honest answer."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    out = {"mean": float(arr.mean()) if arr.size else math.nan, "std": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "n": int(arr.size)}
    if arr.size >= 2:
        out["std"] = float(arr.std(ddof=1))
        ci = stats.bootstrap((arr,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
        out["ci_low"], out["ci_high"] = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    return out


# ---------------------------------------------------------------------------------------- records → table
def runs_frame(records: list[CellRecord]) -> pd.DataFrame:
    """One row per successful record (:func:`bench.records.records_frame`: it carries each block set and
    score vector, and its ``unit`` and ``healing``), sorted by method, calibration variant in natural order,
    seed; ``attrs["columns"]`` as the records frame's."""
    df = records_frame(records)
    if df.empty:
        return df
    columns = df.attrs["columns"]
    df = with_default_axes(df)
    df = df.sort_values(["model", "budget", "metric", "selector", "unit", "healing", "method", "calibration", "seed",
                         "cell_id"], kind="stable", key=row_order).reset_index(drop=True)
    df.attrs["columns"] = columns
    return df


def spread_columns(frame: pd.DataFrame) -> list[Column]:
    """The evaluation columns with a ``spread`` that ``frame`` (a records frame) holds, in display order:
    the ones a stability table summarises."""
    return [c for c in frame.attrs.get("columns", []) if c.spread and c.key in frame]


def _group_row(g: pd.DataFrame, seed: int, columns: list[Column]) -> dict:
    sets = list(g["removed_set"])
    n_blocks = int(g["n_blocks"].iloc[0])
    freq = selection_frequency(sets, n_blocks)
    row = {
        "k": int(g["k"].iloc[0]), "n_blocks": n_blocks, "runs": len(g), "seeds": int(g["seed"].nunique()),
        "distinct_sets": distinct_sets(sets), **jaccard_stats(sets), **rank_correlations(list(g["scores"])),
    }
    for c in columns:
        values = [float(v) for v in pd.to_numeric(g[c.key], errors="coerce")]
        if any(not math.isnan(v) for v in values):
            s = summarize(values, seed=seed)
            row.update({f"{c.key}_{k}": v for k, v in s.items() if k != "n"})
    row["always"] = " ".join(str(b) for b in np.flatnonzero(freq == 1.0))
    row["ever"] = int((freq > 0).sum())
    row["frequency"] = tuple(round(float(f), 6) for f in freq)
    return row


#: statistics of every row: an evaluation column's ``<key>_mean`` etc. may not take one of these names
_FIXED = ("k", "n_blocks", "runs", "seeds", "distinct_sets", "jaccard_mean", "jaccard_std", "tau_mean", "tau_std",
          "rho_mean", "rho_std", "always", "ever", "frequency", *KEY)


def stability_frame(records: list[CellRecord], *, pooled: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per (model, calibration variant, metric, selector, budget, unit, healing, method) with the
    statistics above, plus, when the records hold several calibration variants and ``pooled``, one ``all`` row
    per method. The ``unit``, ``healing`` and ``method`` columns are kept only when some row is not at its default
    (:func:`bench.records.varied_axes`). ``attrs["columns"]``: the evaluation columns summarised (those with
    a ``spread``), in display order."""
    runs = runs_frame(records)
    if runs.empty:
        frame = pd.DataFrame(columns=[k for k in KEY if k not in ("unit", "healing", "method")])
        frame.attrs["columns"] = []
        return frame
    columns = spread_columns(runs)
    for c in columns:
        if clash := [f"{c.key}_{s}" for s in ("mean", "std", "ci_low", "ci_high") if f"{c.key}_{s}" in _FIXED]:
            raise ValueError(f"evaluation column {c.key!r} ({c.label}) clashes with the stability column {clash[0]!r}; "
                             "rename the column in its evaluation")
    rows = []
    for keys, g in runs.groupby(KEY, sort=False):
        rows.append(dict(zip(KEY, keys, strict=True)) | _group_row(g, seed, columns))
    if pooled and runs["calibration"].nunique() > 1:
        rest = [k for k in KEY if k != "calibration"]
        for keys, g in runs.groupby(rest, sort=False):
            rows.append(dict(zip(rest, keys, strict=True)) | {"calibration": POOLED} | _group_row(g, seed, columns))
    frame = pd.DataFrame(rows)
    order = {c: i for i, c in enumerate(dict.fromkeys(list(runs["calibration"]) + [POOLED]))}
    frame["_order"] = frame["calibration"].map(order)
    frame = frame.sort_values(["model", "budget", "metric", "selector", "unit", "healing", "method", "_order"],
                              kind="stable", key=row_order)
    frame = frame.drop(columns=["_order", *hidden_axes(frame)]).reset_index(drop=True)
    frame.attrs["columns"] = [c for c in columns if f"{c.key}_mean" in frame]
    return frame


def group_stability(runs: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Mean pairwise Jaccard and Kendall τ per ``group`` of a records frame (its ``removed_set`` and
    ``scores`` columns), for groups of two runs or more: the leaderboard's stability columns. τ is NaN
    where a record has no scores. ``unit``, ``healing`` and ``method`` in ``group`` take their defaults where
    ``runs`` has no such column."""
    runs = with_default_axes(runs)
    rows = []
    for keys, g in runs.groupby(group, sort=False):
        if len(g) < 2:
            continue
        vectors = list(g["scores"])
        rows.append(dict(zip(group, keys, strict=True)) | {
            "jaccard": jaccard_stats(list(g["removed_set"]))["jaccard_mean"],
            "tau": math.nan if any(v is None for v in vectors) else rank_correlations(vectors)["tau_mean"],
        })
    return pd.DataFrame(rows, columns=[*group, "jaccard", "tau"])


# ---------------------------------------------------------------------------------------- rendering
def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pm(mean: float, std: float, fmt: str) -> str:
    if _missing(mean):
        return "–"
    if _missing(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _ci(low: float, high: float, fmt: str) -> str:
    return "–" if _missing(low) or _missing(high) else f"[{format(low, fmt)}, {format(high, fmt)}]"


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """The stability table as strings, for Markdown, HTML and the terminal: each summarised evaluation
    column (``frame.attrs["columns"]``) as ``<label>`` (mean ± std) and ``<label> 95% CI``, in its format."""
    if frame.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "model": frame["model"],
        "calibration": frame["calibration"],
        "budget": budget_labels(frame),
        **({"method": frame["method"].map(method_text)} if "method" in frame else {}),
        "metric": frame["metric"],
        "selector": frame["selector"],
        **{axis: frame[axis] for axis in ("unit", "healing") if axis in frame},
        "runs": frame["runs"],
        "distinct sets": frame["distinct_sets"],
        "jaccard": [_pm(m, s, ".2f") for m, s in zip(frame["jaccard_mean"], frame["jaccard_std"], strict=True)],
        "τ": [_pm(m, s, ".2f") for m, s in zip(frame["tau_mean"], frame["tau_std"], strict=True)],
        "ρ": [_pm(m, s, ".2f") for m, s in zip(frame["rho_mean"], frame["rho_std"], strict=True)],
    })
    for c in frame.attrs.get("columns", []):
        if f"{c.key}_mean" not in frame:
            continue
        heading = c.label if c.label not in out else c.key
        out[heading] = [_pm(m, s, c.fmt) for m, s in zip(frame[f"{c.key}_mean"], frame[f"{c.key}_std"], strict=True)]
        out[f"{heading} {CONFIDENCE:.0%} CI"] = [
            _ci(lo, hi, c.fmt) for lo, hi in zip(frame[f"{c.key}_ci_low"], frame[f"{c.key}_ci_high"], strict=True)]
    units = frame["unit"] if "unit" in frame else ["block"] * len(frame)
    out["always removed"] = [removed_text(s, unit) if s else "–" for s, unit in zip(frame["always"], units, strict=True)]
    out["blocks ever removed"] = frame["ever"]
    return out


NOTES = (
    "Over the runs of each row (calibration seeds; `all` pools every calibration variant): `jaccard`, mean ± std "
    "over pairs of runs of |A ∩ B| / |A ∪ B| of the removed block sets (1 = always the same set); `τ`, `ρ`: "
    "Kendall's and Spearman's rank correlation between the metric's block scores of two runs, mean ± std over "
    "pairs; each evaluation column with a spread (pruned perplexity, accuracy, KL, ...): mean ± sample std with "
    f"a {CONFIDENCE:.0%} percentile-bootstrap interval of the mean (seeded); `always removed`: blocks every run "
    "removed; `blocks ever removed`: blocks any run removed."
)


def frequency_text(freq: Sequence[float]) -> str:
    """``"12:1 13:0.67"``: each block some run removed, with the share of runs."""
    return " ".join(f"{b}:{f:.3g}" for b, f in enumerate(freq) if f > 0)


def write_stability_reports(frame: pd.DataFrame, out_dir: Path, *, title: str) -> list[Path]:
    """``stability.md`` (the table with its notes) and ``stability.csv`` (every number, the selection
    frequency as ``block:share`` pairs) under ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "stability.md", out_dir / "stability.csv"
    csv = frame.copy()
    if "frequency" in csv:
        csv["frequency"] = csv["frequency"].map(frequency_text)
    write_bytes_atomic(csv_path, csv.to_csv(index=False).encode())
    # disable_numparse: the columns' own formats as written (tabulate would reparse "0.500" as 0.5)
    body = (display(frame).to_markdown(index=False, disable_numparse=True) if not frame.empty
            else "_no finished cells yet_")
    write_bytes_atomic(md_path, f"# {title}\n\n{NOTES}\n\n{body}\n".encode())
    return [md_path, csv_path]
