"""Figures (matplotlib, Agg, PNG) and one self-contained HTML report of a results dir.

``write_html_report`` draws four figures from the records, saves them under ``RESULTS/figures/`` and
writes ``RESULTS/report.html`` with the leaderboard, the stability table and the figures inlined as
``data:image/png;base64`` images: one file, no scripts, no external URL, opens offline.

- ``importance.png``: block importance, blocks × metrics (one row per metric and calibration variant),
  the metric's score oriented so that high = important, averaged over seeds, as a rank scaled to [0, 1];
- ``frequency.png``: selection frequency, blocks × methods: the share of seeds that removed each block;
- ``stability.png``: mean pairwise Jaccard of the removed sets and mean Kendall τ of the block scores per
  method, error bars ± std over pairs of seeds;
- ``curves.png``: the ranking column (the evaluation column with the highest ``rank`` the records hold:
  accuracy, else perplexity, else KL for the built-ins) against the share of blocks removed, per method,
  the dense model at 0 when the column names its dense counterpart (``dense_key``), a log scale when
  the column asks for one (``log_scale``), error bars ± std over seeds.

A method is ``metric/selector``; a row that removes attention or MLP branches or heals after removal
adds them in brackets (``bi/topk [attention +linear]``, ``bi/topk [+lora(steps=30)]``), so every
(unit, healing) combination is its own series; rows of whole blocks without healing are labelled as
they always were. A method preset's row is its name, then what it sets in parentheses
(``replaceme (angular/span [+linear])``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from algorithms import extras
from algorithms.evaluations.base import Column
from bench import stability as stab
from bench.records import DEFAULT_HEALING, DEFAULT_METHOD, DEFAULT_UNIT, CellRecord, with_default_axes
from bench.report import display, notes, ranking_column
from bench.store import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: what needs matplotlib, in the message of :class:`~algorithms.extras.MissingExtra`
FEATURE = "the HTML report (report.html and figures/*.png: bench report --html, bench stability)"


def require_matplotlib():
    """matplotlib, imported (Agg canvas, no display); :class:`~algorithms.extras.MissingExtra` naming the
    ``plots`` extra when it is not installed. Imported here, not with this module, so that ``bench
    report`` without ``--html`` needs no matplotlib."""
    mpl = extras.require("matplotlib", feature=FEATURE, extra="plots")
    for name in ("figure", "ticker", "backends.backend_agg"):  # the submodules used below
        extras.require(f"matplotlib.{name}", feature=FEATURE, extra="plots")
    return mpl


def _new_figure(**kwargs) -> Figure:
    return require_matplotlib().figure.Figure(**kwargs)


FIGURES = ("importance", "frequency", "stability", "curves")
CAPTIONS = {
    "importance": (
        "Block importance, blocks × metrics. Each row is one metric (and calibration variant): its block scores "
        "oriented so that high = important, averaged over seeds, shown as the block's rank within the row scaled "
        "to 0–1. Dark blocks are the ones the metric would remove first; rows that look alike mean the metrics "
        "(or calibration sets) agree."
    ),
    "frequency": (
        "Selection frequency, blocks × methods: the share of calibration seeds whose chosen set removed the block. "
        "A stable method shows k solid cells (1.0) and nothing else; a spread of pale cells means the set depends "
        "on the calibration sample."
    ),
    "stability": (
        "Stability per method over calibration seeds: mean pairwise Jaccard overlap of the removed block sets "
        "(1 = every seed removes the same blocks) and mean Kendall τ between the block-score rankings of two "
        "seeds; error bars ± std over pairs. A high τ with a lower Jaccard means the ranking is stable but "
        "blocks near the cut-off at k swap."
    ),
    "curves": (
        "The ranking evaluation column against the share of blocks removed, per method (the dense model at 0 "
        "where the column has a dense counterpart), mean ± std over seeds."
    ),
}


# ---------------------------------------------------------------------------------------- figure helpers
def _png(fig: Figure) -> bytes:
    require_matplotlib().backends.backend_agg.FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no "Software" text chunk: the PNG carries no URL either
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _axes_suffix(unit: str = DEFAULT_UNIT, healing: str = DEFAULT_HEALING) -> str:
    """`` [attention +linear]``: the unit and the healing where they are not the defaults; ``""`` else."""
    parts = ([unit] if unit != DEFAULT_UNIT else []) + ([f"+{healing}"] if healing != DEFAULT_HEALING else [])
    return f" [{' '.join(parts)}]" if parts else ""


def _method_label(metric: str, selector: str, unit: str = DEFAULT_UNIT, healing: str = DEFAULT_HEALING,
                  method: str = DEFAULT_METHOD) -> str:
    """``bi/topk [attention]``, or for a method preset's row ``attention-drop (bi/topk [attention])``."""
    label = f"{metric}/{selector}" + _axes_suffix(unit, healing)
    return f"{method} ({label})" if method != DEFAULT_METHOD else label


def _method(row) -> str:
    return _method_label(row["metric"], row["selector"], row.get("unit", DEFAULT_UNIT),
                         row.get("healing", DEFAULT_HEALING), row.get("method", DEFAULT_METHOD))


def _variant_suffix(label: str, several: bool) -> str:
    return f" · {label}" if several else ""


def _block_axis(ax, n_blocks: int) -> None:
    step = 1 if n_blocks <= 32 else 2 if n_blocks <= 64 else 4
    ax.set_xticks(range(0, n_blocks, step))
    ax.set_xticklabels([str(i) for i in range(0, n_blocks, step)], fontsize=7)
    ax.set_xlabel("block")


def _heat(fig: Figure, ax, matrix: np.ndarray, rows: list[str], title: str, cbar: str, cmap: str) -> None:
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    _block_axis(ax, matrix.shape[1])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.03, pad=0.01)


def importance_figure(runs: pd.DataFrame) -> Figure:
    """Blocks × metrics heatmap of normalised importance, one panel per model (one row per metric and
    unit: attention and MLP branches have scores of their own; healing, after selection, changes none)."""
    scored = with_default_axes(runs).drop_duplicates(["model", "calibration", "metric", "unit", "seed"])
    models = list(dict.fromkeys(scored["model"]))
    several = scored["calibration"].nunique() > 1
    panels = []
    for model in models:
        sub = scored[scored["model"] == model]
        rows, labels = [], []
        for (metric, unit, cal), g in sub.groupby(["metric", "unit", "calibration"], sort=False):
            oriented = np.array([np.asarray(s) if hi else -np.asarray(s)
                                 for s, hi in zip(g["scores"], g["higher_is_important"], strict=True)])
            # the rank of the seed-averaged score, scaled to 0..1: a few extreme blocks (block 0 is often
            # ten times more important than any other) would otherwise flatten the rest of the row
            ranks = stats.rankdata(oriented.mean(axis=0), method="average") - 1.0
            rows.append(ranks / max(len(ranks) - 1, 1))
            labels.append(metric + _axes_suffix(unit) + _variant_suffix(cal, several))
        panels.append((model, np.vstack(rows), labels))
    height = sum(0.35 * len(p[2]) + 1.2 for p in panels)
    fig = _new_figure(figsize=(10, max(2.5, height)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (model, matrix, labels) in zip(axes, panels, strict=True):
        _heat(fig, ax, matrix, labels, f"{model}: block importance rank per metric (0 = least, 1 = most important)",
              "normalised importance rank", "viridis")
    return fig


def frequency_figure(frame: pd.DataFrame) -> Figure:
    """Blocks × methods heatmap of the share of seeds removing each block, one panel per (model, budget)."""
    frame = frame[frame["calibration"] != stab.POOLED]
    several = frame["calibration"].nunique() > 1
    panels = []
    for (model, budget), g in frame.groupby(["model", "budget"], sort=False):
        matrix = np.vstack([np.asarray(f) for f in g["frequency"]])
        labels = [_method(r) + _variant_suffix(r["calibration"], several) for _, r in g.iterrows()]
        n = int(g["n_blocks"].iloc[0])
        # rows of several units at one params budget remove different numbers of units
        size = f"{int(g['k'].iloc[0])}/{n} blocks" if g["k"].nunique() == 1 else f"{n} blocks"
        panels.append((f"{model}, {budget} ({size}): share of seeds removing each block", matrix, labels))
    height = sum(0.35 * len(p[2]) + 1.2 for p in panels)
    fig = _new_figure(figsize=(10, max(2.5, height)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, matrix, labels) in zip(axes, panels, strict=True):
        _heat(fig, ax, matrix, labels, title, "selection frequency", "Blues")
        if several:  # a line between methods, each method's calibration variants grouped inside
            methods = [label.split(" · ")[0] for label in labels]
            for i in range(1, len(methods)):
                if methods[i] != methods[i - 1]:
                    ax.axhline(i - 0.5, color="0.35", linewidth=0.8)
    return fig


def stability_figure(frame: pd.DataFrame) -> Figure:
    """Bars of mean pairwise Jaccard and Kendall τ per method (± std over pairs), one bar per variant."""
    frame = frame[frame["calibration"] != stab.POOLED].copy()
    prefix_model = frame["model"].nunique() > 1
    prefix_budget = frame["budget"].nunique() > 1
    frame["x"] = [
        (f"{r['model']}\n" if prefix_model else "") + _method(r) + (f"\n{r['budget']}" if prefix_budget else "")
        for _, r in frame.iterrows()
    ]
    xs = list(dict.fromkeys(frame["x"]))
    variants = list(dict.fromkeys(frame["calibration"]))
    width = 0.8 / len(variants)
    fig = _new_figure(figsize=(max(6.0, 1.1 * len(xs) + 2), 5.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (col, label) in zip(axes, (("jaccard", "mean pairwise Jaccard"), ("tau", "mean Kendall τ")),
                                strict=True):
        for j, variant in enumerate(variants):
            sub = frame[frame["calibration"] == variant].set_index("x").reindex(xs)
            pos = np.arange(len(xs)) - 0.4 + width * (j + 0.5)
            ax.bar(pos, sub[f"{col}_mean"], width, yerr=sub[f"{col}_std"], capsize=3,
                   label=variant if len(variants) > 1 else None)
        ax.set_ylabel(label)
        ax.set_ylim(min(0.0, float(np.nanmin(frame[f"{col}_mean"]) - 0.1)) if frame[f"{col}_mean"].notna().any()
                    else 0.0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(xs)))
    axes[1].set_xticklabels(xs, fontsize=8, rotation=30 if len(xs) > 6 else 0, ha="right" if len(xs) > 6 else "center")
    axes[0].set_title("stability over calibration seeds (error bars: ± std over pairs of seeds)", fontsize=10)
    if len(variants) > 1:
        axes[0].legend(title="calibration", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def curves_column(runs: pd.DataFrame) -> Column | None:
    """The column the curves figure draws: the ranking column of ``--rank-by auto`` among the evaluation
    columns ``runs`` (a records frame) measured; ``None`` when none has a direction."""
    measured = [c for c in runs.attrs.get("columns", []) if c.key in runs and runs[c.key].notna().any()]
    return ranking_column(measured)


def curves_figure(runs: pd.DataFrame, column: Column) -> Figure:
    """``column`` against the share of blocks removed, per method; one panel per (model, calibration
    variant); the dense model at 0 when ``column.dense_key`` is measured."""
    dense = column.dense_key if column.dense_key in runs and runs[column.dense_key].notna().any() else None
    values = pd.to_numeric(runs[column.key], errors="coerce")
    log = column.log_scale and bool((values.dropna() > 0).all())
    runs = with_default_axes(runs).assign(share=runs["k"] / runs["n_blocks"], _value=values)
    panels = list(runs.groupby(["model", "calibration"], sort=False))
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    ticker = require_matplotlib().ticker
    fig = _new_figure(figsize=(5.2 * ncols + 1, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, ((model, cal), g) in zip(axes, panels, strict=False):
        base = float(pd.to_numeric(g[dense], errors="coerce").mean()) if dense else math.nan
        for (metric, selector, unit, healing, method), m in g.groupby(["metric", "selector", "unit", "healing", "method"],
                                                                      sort=False):
            pts = m.groupby("share")["_value"].agg(["mean", "std"]).fillna({"std": 0.0}).sort_index()
            x, y, e = pts.index.to_numpy(), pts["mean"].to_numpy(), pts["std"].to_numpy()
            if not math.isnan(base):
                x, y, e = np.concatenate([[0.0], x]), np.concatenate([[base], y]), np.concatenate([[0.0], e])
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=_method_label(metric, selector, unit, healing, method))
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.xaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("share of blocks removed")
        ax.set_ylabel(column.label + (" (log scale)" if log else ""))
        ax.set_title(f"{model} · {cal}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{column.label} vs share of blocks removed" + (" (dense at 0)" if dense else ""), fontsize=10)
    return fig


def draw_figures(records: list[CellRecord], frame: pd.DataFrame | None = None) -> dict[str, bytes]:
    """The figures as PNG bytes (none when no record succeeded; no curves when no evaluation column has a
    direction)."""
    runs = stab.runs_frame(records)
    if runs.empty:
        return {}
    frame = stab.stability_frame(records) if frame is None else frame
    figs = {"importance": importance_figure(runs), "frequency": frequency_figure(frame),
            "stability": stability_figure(frame)}
    if (column := curves_column(runs)) is not None:
        figs["curves"] = curves_figure(runs, column)
    return {name: _png(fig) for name, fig in figs.items()}


# ---------------------------------------------------------------------------------------- the HTML file
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { font-size: 0.85rem; color: #444; max-width: 900px; }
.scroll { overflow-x: auto; }
"""


def render_html(*, title: str, board_display: pd.DataFrame, stability_display: pd.DataFrame,
                figures: dict[str, bytes], n_records: int, ranking_note: str = "") -> str:
    """The report as one HTML string: tables and images inline, no scripts, no external URL."""
    def table(df: pd.DataFrame) -> str:
        if df.empty:
            return "<p class='note'>no finished cells yet</p>"
        return "<div class='scroll'>" + df.to_html(index=False, escape=True, border=0) + "</div>"

    parts = [
        "<!DOCTYPE html>", "<html lang='en'>", "<head>", "<meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{n_records} finished records. {html.escape(ranking_note)}</p>",
        "<h2>Leaderboard</h2>", table(board_display),
        "<h2>Stability over calibration samples</h2>",
        f"<p class='note'>{html.escape(stab.NOTES)}</p>", table(stability_display),
        "<h2>Figures</h2>",
    ]
    for name in FIGURES:
        if name not in figures:
            continue
        data = base64.b64encode(figures[name]).decode("ascii")
        parts.append(f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_html_report(results_dir: str | Path, records: list[CellRecord], board: pd.DataFrame, *,
                      title: str, frame: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``figures/<name>.png`` and ``report.html`` under ``results_dir``; returns their paths."""
    results_dir = Path(results_dir)
    frame = stab.stability_frame(records) if frame is None else frame
    figures = draw_figures(records, frame)
    paths: dict[str, Path] = {}
    for name, png in figures.items():
        path = results_dir / "figures" / f"{name}.png"
        write_bytes_atomic(path, png)
        paths[name] = path
    page = render_html(
        title=title, board_display=display(board), stability_display=stab.display(frame), figures=figures,
        n_records=sum(r.ok for r in records), ranking_note=notes(board) if not board.empty else "",
    ).encode("utf-8")
    paths["html"] = results_dir / "report.html"
    write_bytes_atomic(paths["html"], page)
    return paths
