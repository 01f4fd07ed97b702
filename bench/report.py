"""Leaderboards from result records: a pandas frame, rendered to the terminal, Markdown and CSV.

One row per (model, metric, selector, budget) with mean ± std over calibration seeds, ranked by mean
pruned perplexity *within* each (model, budget): perplexities of models with different tokenizers
are not comparable, so ranks never cross models.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from bench.store import ResultStore

GROUP = ["model", "budget", "metric", "selector"]


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful record."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        rows.append({
            "cell_id": r["cell_id"],
            **{k: r["labels"][k] for k in ("model", "metric", "selector", "budget", "seed")},
            "k": r["k"],
            "n_blocks": r["model"]["n_blocks"],
            "removed": " ".join(str(b) for b in r["removed_blocks"]),
            "ppl_dense": r["ppl"]["dense"],
            "ppl_pruned": r["ppl"]["pruned"],
            "params_kept": r["parameters"]["kept_share"],
            "scoring_s": r["timings"]["scoring"],
            "evaluations": r["selector_result"]["evaluations"],
            "proxy_span": r["selector_result"].get("proxies", {}).get("proxy_span"),
        })
    return pd.DataFrame(rows)


def leaderboard(records: list[dict]) -> pd.DataFrame:
    df = records_frame(records)
    if df.empty:
        return df
    df = df.sort_values(["seed", "cell_id"], kind="stable")  # "typical" set: ties go to the lowest seed
    agg = df.groupby(GROUP, sort=False).agg(
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
    ).reset_index()
    agg["ppl_std"] = agg["ppl_std"].fillna(0.0)
    agg["rank"] = agg.groupby(["model", "budget"])["ppl_mean"].rank(method="min").astype(int)
    return agg.sort_values(["model", "budget", "rank", "metric", "selector"]).reset_index(drop=True)


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


def _display(board: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "rank": board["rank"],
        "model": board["model"],
        "budget": [f"{b} ({k}/{n})" for b, k, n in zip(board["budget"], board["k"], board["n_blocks"], strict=True)],
        "metric": board["metric"],
        "selector": board["selector"],
        "ppl (pruned)": [f"{m:.2f} ± {s:.2f}" for m, s in zip(board["ppl_mean"], board["ppl_std"], strict=True)],
        "ppl (dense)": board["ppl_dense"].map(lambda v: f"{v:.2f}"),
        "params kept": board["params_kept"].map(lambda v: f"{v:.1%}"),
        "span loss": board["proxy_span"].map(lambda v: f"{v:.4f}"),
        "evals": board["evaluations"].map(lambda v: f"{v:.0f}"),
        "seeds": board["seeds"],
        "distinct sets": board["distinct_sets"],
        "scoring s": board["scoring_s"].map(lambda v: f"{v:.3f}"),
        "typical removed": board["typical_removed"].map(compact_blocks),
    })
    return out


def render_terminal(board: pd.DataFrame, console: Console, title: str = "blockbench leaderboard") -> None:
    if board.empty:
        console.print("no finished cells yet")
        return
    shown = _display(board).drop(columns=["params kept", "distinct sets", "span loss"])
    shown = shown.rename(columns={"ppl (pruned)": "ppl pruned", "ppl (dense)": "dense", "scoring s": "score s",
                                  "typical removed": "removed"})
    table = Table(title=title, show_lines=False, pad_edge=False)
    for col in shown.columns:
        table.add_column(col, justify="right" if col in ("rank", "seeds", "dense", "score s") else "left",
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
    md = (
        f"# {title}\n\nPerplexity on held-out text (mean ± std over calibration seeds); rank within each "
        "model and budget, lower perplexity first. `span loss`: the chosen set's proxy span objective "
        "(sum over its contiguous runs of the metric's span importance; lower = the set the metric "
        "calls more removable), the common yardstick for selectors. `evals`: objective evaluations "
        "the selector used.\n\n"
        f"{body}\n"
    ).encode()
    _atomic_write(md_path, lambda fh: fh.write(md))
    return [md_path, csv_path]


def build(results_dir: str | Path, cell_ids: set[str] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Leaderboard of the records in ``results_dir`` (restricted to ``cell_ids`` when given)."""
    records = ResultStore(results_dir).records()
    if cell_ids is not None:
        records = [r for r in records if r["cell_id"] in cell_ids]
    return leaderboard(records), records
