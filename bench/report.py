"""Leaderboards from result records: a pandas frame, rendered to the terminal, Markdown and CSV.

One row per (model, metric, selector, budget) with mean ± std over calibration seeds, ranked *within*
each (model, budget): perplexities of models with different tokenizers are not comparable, so ranks
never cross models. The rank follows mean downstream accuracy (higher first) when the grid measured
it, else mean pruned perplexity (lower first); ``rank_by`` chooses explicitly.

Optional columns appear when the records carry them: accuracy (mean headline score over tasks, each
task's score, the share of the dense model's score retained) and speed (prefill and decode speedup of
the pruned over the dense model, measured back to back).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from algorithms.evaluations.lmeval import headline
from bench.grid import calibration_label
from bench.store import ResultStore

GROUP = ["model", "budget", "metric", "selector"]
RANK_BY = ("auto", "accuracy", "ppl")


def _optional_columns(r: dict) -> dict:
    row: dict = {}
    if (acc := r.get("accuracy")) is not None:
        row["acc_dense"] = acc["dense"]["score"]
        row["acc_pruned"] = acc["pruned"]["score"]
        row["acc_retained"] = acc["retained"]
        for task, metrics in acc["pruned"]["tasks"].items():
            row[f"acc:{task}"] = headline(metrics)
    if (speed := r.get("speed")) is not None:
        row["prefill_speedup"] = speed["speedup"]["prefill_mean"]
        row["decode_speedup"] = speed["speedup"]["decode"]
    return row


def _calibration(r: dict) -> str:
    """The record's calibration variant (source/samples×seq_len); records written before it was a label
    carry it in their spec."""
    if label := r["labels"].get("calibration"):
        return label
    cal = r.get("spec", {}).get("calibration")
    return calibration_label(cal) if cal else "?"


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful record."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        rows.append({
            "cell_id": r["cell_id"],
            **{k: r["labels"][k] for k in ("model", "metric", "selector", "budget", "seed")},
            "calibration": _calibration(r),
            "k": r["k"],
            "n_blocks": r["model"]["n_blocks"],
            "removed": " ".join(str(b) for b in r["removed_blocks"]),
            "ppl_dense": r["ppl"]["dense"],
            "ppl_pruned": r["ppl"]["pruned"],
            "params_kept": r["parameters"]["kept_share"],
            "scoring_s": r["timings"]["scoring"],
            "evaluations": r["selector_result"]["evaluations"],
            "proxy_span": r["selector_result"].get("proxies", {}).get("proxy_span"),
            **_optional_columns(r),
            # for the stability statistics (leaderboard columns and bench stability)
            "removed_set": tuple(r["removed_blocks"]),
            "scores": tuple(r["scores"]) if r.get("scores") is not None else None,
            "higher_is_important": bool(r.get("higher_is_important")),
        })
    return pd.DataFrame(rows)


def leaderboard(records: list[dict], rank_by: str = "auto") -> pd.DataFrame:
    """Mean ± std over seeds per (model, budget, metric, selector), ranked within (model, budget)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    df = records_frame(records)
    if df.empty:
        return df
    has_acc = "acc_pruned" in df and df["acc_pruned"].notna().any()
    if rank_by == "accuracy" and not has_acc:
        raise ValueError("rank_by='accuracy' but no record has accuracy (add an `accuracy:` section to the grid)")
    df = df.sort_values(["seed", "cell_id"], kind="stable")  # "typical" set: ties go to the lowest seed
    optional = {}
    for col in df.columns:
        if col.startswith("acc") or col.endswith("_speedup"):
            optional[col] = (col, "mean")
    if has_acc:
        optional["acc_std"] = ("acc_pruned", "std")
    # a grid with several calibration variants (a stability study) gets one row per variant
    group = GROUP + ["calibration"] if df["calibration"].nunique() > 1 else GROUP
    agg = df.groupby(group, sort=False).agg(
        seeds=("seed", "nunique"),
        k=("k", "first"),
        n_blocks=("n_blocks", "first"),
        ppl_dense=("ppl_dense", "mean"),
        ppl_mean=("ppl_pruned", "mean"),
        ppl_std=("ppl_pruned", "std"),
        params_kept=("params_kept", "mean"),
        scoring_s=("scoring_s", "mean"),
        evaluations=("evaluations", "mean"),
        proxy_span=("proxy_span", "mean"),
        distinct_sets=("removed", "nunique"),
        typical_removed=("removed", lambda s: Counter(s).most_common(1)[0][0]),
        **optional,
    ).reset_index()
    agg["ppl_std"] = agg["ppl_std"].fillna(0.0)
    agg = _join_stability(agg, df, group)
    if has_acc:
        agg["acc_std"] = agg["acc_std"].fillna(0.0)
    by_acc = rank_by == "accuracy" or (rank_by == "auto" and has_acc)
    key, ascending = ("acc_pruned", False) if by_acc else ("ppl_mean", True)
    within = ["model", "budget"] + (["calibration"] if "calibration" in group else [])
    agg["rank"] = agg.groupby(within)[key].rank(method="min", ascending=ascending).astype(int)
    agg.attrs["ranked_by"] = "accuracy" if by_acc else "ppl"
    return agg.sort_values([*within, "rank", "metric", "selector"], key=calibration_order).reset_index(drop=True)


def calibration_order(col: pd.Series) -> pd.Series:
    """``sort_values`` key: calibration variants in natural order (the numbers in a label compared as
    numbers: wikipedia/8×128 before wikipedia/32×128); other columns as they are. The leaderboard and
    the stability tables both sort with it."""
    if col.name != "calibration":
        return col
    return col.map(lambda label: tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(label))))


def _join_stability(agg: pd.DataFrame, df: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """``jaccard`` (mean pairwise overlap of the removed sets) and ``tau`` (mean Kendall τ of the block
    scores) over the seeds of each row, for rows with two seeds or more: "accurate but erratic" shows."""
    from bench.stability import group_stability

    stab = group_stability(df, group)
    return agg if stab.empty else agg.merge(stab, on=group, how="left")


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


def _display(board: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "rank": board["rank"],
        "model": board["model"],
        "budget": budget_labels(board),
        "metric": board["metric"],
        "selector": board["selector"],
    })
    if "calibration" in board:  # several calibration variants: one row each
        out.insert(3, "calibration", board["calibration"])
    if "acc_pruned" in board:
        out["acc"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(board["acc_pruned"], board["acc_std"], strict=True)]
        out["acc (dense)"] = board["acc_dense"].map(lambda v: f"{v:.3f}")
        out["retained"] = board["acc_retained"].map(lambda v: f"{v:.1%}")
        for col in sorted(c for c in board.columns if c.startswith("acc:")):
            out[col.removeprefix("acc:")] = board[col].map(lambda v: f"{v:.3f}")
    out["ppl (pruned)"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(board["ppl_mean"], board["ppl_std"], strict=True)]
    out["ppl (dense)"] = board["ppl_dense"].map(lambda v: f"{v:.2f}")
    for col, label in (("prefill_speedup", "prefill ×"), ("decode_speedup", "decode ×")):
        if col in board:
            out[label] = board[col].map(lambda v: f"{v:.2f}")
    out["params kept"] = board["params_kept"].map(lambda v: f"{v:.1%}")
    out["span loss"] = board["proxy_span"].map(lambda v: f"{v:.4f}")
    out["evals"] = board["evaluations"].map(lambda v: f"{v:.0f}")
    out["seeds"] = board["seeds"]
    out["distinct sets"] = board["distinct_sets"]
    for col, label in (("jaccard", "jaccard"), ("tau", "τ")):  # stability over seeds (bench.stability)
        if col in board:
            out[label] = board[col].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
    out["scoring s"] = board["scoring_s"].map(lambda v: f"{v:.3f}")
    out["typical removed"] = board["typical_removed"].map(compact_blocks)
    return out


def render_terminal(board: pd.DataFrame, console: Console, title: str = "blockbench leaderboard") -> None:
    if board.empty:
        console.print("no finished cells yet")
        return
    shown = _display(board).drop(columns=["params kept", "distinct sets", "span loss"])
    shown = shown.drop(columns=[c for c in shown.columns if c.startswith("acc (") or
                                ("acc_pruned" in board and f"acc:{c}" in board)])  # per-task: md/csv only
    shown = shown.rename(columns={"ppl (pruned)": "ppl pruned", "ppl (dense)": "dense", "scoring s": "score s",
                                  "typical removed": "removed"})
    table = Table(title=title, show_lines=False, pad_edge=False)
    for col in shown.columns:
        table.add_column(col, justify="right" if col in ("rank", "seeds", "dense", "score s", "retained", "prefill ×",
                                                         "decode ×") else "left",
                         no_wrap=col != "removed", overflow="fold")
    for row in shown.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)


def write_reports(board: pd.DataFrame, out_dir: Path, *, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    from bench.store import _atomic_write

    csv_bytes = board.to_csv(index=False).encode()
    _atomic_write(csv_path, lambda fh: fh.write(csv_bytes))
    body = _display(board).to_markdown(index=False) if not board.empty else "_no finished cells yet_"
    ranked = ("mean downstream accuracy, higher first" if board.attrs.get("ranked_by") == "accuracy"
              else "lower perplexity first")
    notes = ""
    if "acc_pruned" in board:
        notes += ("`acc`: mean over tasks of lm-eval's acc_norm (acc where a task has no acc_norm), "
                  "pruned model, mean ± std over seeds; `retained`: pruned / dense. ")
    if "jaccard" in board:
        notes += ("`jaccard`: mean overlap |A ∩ B| / |A ∪ B| of the removed block sets of two seeds (1 = every "
                  "seed removes the same blocks); `τ`: mean Kendall rank correlation of the block scores of two "
                  "seeds (`bench stability` for the full study). ")
    if "prefill_speedup" in board:
        notes += ("`prefill ×`, `decode ×`: speedup of the pruned over the dense model, measured back to back "
                  "in one process (geometric mean over prompt lengths for prefill; decode in tokens/s). ")
    md = (
        f"# {title}\n\nPerplexity on held-out text (mean ± std over calibration seeds); rank within each "
        f"model and budget, {ranked}. {notes}`span loss`: the chosen set's proxy span objective "
        "(sum over its contiguous runs of the metric's span importance; lower = the set the metric "
        "calls more removable), the common yardstick for selectors. `evals`: objective evaluations "
        "the selector used.\n\n"
        f"{body}\n"
    ).encode()
    _atomic_write(md_path, lambda fh: fh.write(md))
    return [md_path, csv_path]


def build(results_dir: str | Path, cell_ids: set[str] | None = None,
          rank_by: str = "auto") -> tuple[pd.DataFrame, list[dict]]:
    """Leaderboard of the records in ``results_dir`` (restricted to ``cell_ids`` when given)."""
    records = ResultStore(results_dir).records()
    if cell_ids is not None:
        records = [r for r in records if r["cell_id"] in cell_ids]
    return leaderboard(records, rank_by=rank_by), records
