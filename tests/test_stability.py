"""Stability studies: the statistics on hand-built inputs, the config and CLI errors, and a real study on
SmolLM2-135M (2 metrics, 3 seeds, 2 calibration sources) that writes the figures and the HTML report."""

import base64
import json
import math
import re

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from bench import html_report, report
from bench.cli import app
from bench.config import parse_config
from bench.grid import calibration_label, expand
from bench.stability import (
    POOLED,
    distinct_sets,
    jaccard,
    jaccard_stats,
    pairwise_jaccard,
    rank_correlations,
    runs_frame,
    selection_frequency,
    stability_frame,
    summarize,
)
from bench.stability import display as stability_display
from tests.conftest import SMALL_GRID, seed_cache
from tests.records_factory import make_record

cli = CliRunner()


# ---------------------------------------------------------------------------------------- hand-built inputs
def test_jaccard_identical_disjoint_and_partial():
    assert jaccard([1, 2, 3], [3, 2, 1]) == 1.0
    assert jaccard([1, 2], [3, 4]) == 0.0
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5  # 2 shared of 4
    assert jaccard([], []) == 1.0
    assert pairwise_jaccard([[1, 2], [1, 2], [3, 4]]) == [1.0, 0.0, 0.0]


def test_jaccard_stats_over_pairs():
    same = jaccard_stats([[12, 13, 14], [14, 13, 12], [12, 13, 14]])
    assert same == {"jaccard_mean": 1.0, "jaccard_std": 0.0}
    apart = jaccard_stats([[0, 1], [2, 3], [4, 5]])
    assert apart == {"jaccard_mean": 0.0, "jaccard_std": 0.0}
    mixed = jaccard_stats([[1, 2], [1, 2], [3, 4]])  # pairs: 1, 0, 0
    assert mixed["jaccard_mean"] == pytest.approx(1 / 3)
    assert mixed["jaccard_std"] == pytest.approx(math.sqrt(2) / 3)  # population std of (1, 0, 0)
    one = jaccard_stats([[1, 2]])
    assert math.isnan(one["jaccard_mean"]) and math.isnan(one["jaccard_std"])


def test_selection_frequency_and_distinct_sets():
    sets = [(1, 2), (2, 3), (4, 2)]
    np.testing.assert_allclose(selection_frequency(sets, 5), [0, 1 / 3, 1, 1 / 3, 1 / 3])
    assert distinct_sets(sets) == 3 and distinct_sets([(1, 2), (2, 1), (1, 3)]) == 2
    with pytest.raises(ValueError, match="block 7 is out of range for 5 blocks"):
        selection_frequency([(7,)], 5)
    with pytest.raises(ValueError, match="at least one"):
        selection_frequency([], 5)


def test_rank_correlations_known_values():
    same = rank_correlations([[0.1, 0.5, 0.2, 0.9], [0.1, 0.5, 0.2, 0.9], [1, 5, 2, 9]])
    assert same["tau_mean"] == pytest.approx(1.0) and same["rho_mean"] == pytest.approx(1.0)
    assert same["tau_std"] == pytest.approx(0.0)
    reversed_ = rank_correlations([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    assert reversed_["tau_mean"] == pytest.approx(-1.0) and reversed_["rho_mean"] == pytest.approx(-1.0)
    # one swapped neighbour pair among 4: 5 concordant, 1 discordant pair -> tau = 4/6;
    # rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    swap = rank_correlations([[1, 2, 3, 4], [1, 3, 2, 4]])
    assert swap["tau_mean"] == pytest.approx(2 / 3) and swap["rho_mean"] == pytest.approx(0.8)
    assert math.isnan(rank_correlations([[1, 2, 3]])["tau_mean"])
    with pytest.raises(ValueError, match="differ in length"):
        rank_correlations([[1, 2, 3], [1, 2]])


def test_summarize_mean_std_and_seeded_bootstrap():
    values = [80.0, 84.0, 85.0, 83.0, 90.0]
    s = summarize(values, seed=0)
    assert s["mean"] == pytest.approx(84.4) and s["std"] == pytest.approx(np.std(values, ddof=1))
    assert s["n"] == 5
    assert min(values) <= s["ci_low"] < s["mean"] < s["ci_high"] <= max(values)
    assert summarize(values, seed=0) == s  # seeded: the same interval every time
    narrow = summarize(values, confidence=0.5, seed=0)
    assert s["ci_low"] <= narrow["ci_low"] and narrow["ci_high"] <= s["ci_high"]
    flat = summarize([47.5, 47.5, 47.5])
    assert (flat["std"], flat["ci_low"], flat["ci_high"]) == (0.0, 47.5, 47.5)
    single = summarize([3.0])
    assert single["mean"] == 3.0 and all(math.isnan(single[k]) for k in ("std", "ci_low", "ci_high"))


def _record(i, *, removed, scores, ppl, seed, metric="bi", selector="topk", source="wikipedia", samples=8,
            acc=None):
    values = {"ppl_pruned": ppl, "ppl_dense": 10.0}
    if acc is not None:
        values |= {"acc_pruned": acc, "acc_dense": 0.6, "acc_retained": acc / 0.6, "acc:piqa": acc}
    return make_record(i, removed=removed, scores=scores, values=values, seed=seed, metric=metric,
                       selector=selector, source=source, samples=samples)


def _hand_built():
    """bi: the same set and ranking for all three seeds; angular: three disjoint sets."""
    bi = [_record(i, removed=(2, 3), scores=[6, 5, 1, 2, 4, 3], ppl=20.0 + i, seed=i, acc=0.5) for i in range(3)]
    angular = [
        _record(10 + i, metric="angular", removed=rem, scores=sc, ppl=p, seed=i, acc=a)
        for i, (rem, sc, p, a) in enumerate([((0, 1), [1, 2, 3, 4, 5, 6], 30.0, 0.4),
                                             ((2, 3), [6, 5, 1, 2, 4, 3], 40.0, 0.45),
                                             ((4, 5), [6, 5, 4, 3, 2, 1], 50.0, 0.5)])
    ]
    return bi + angular


def test_stability_frame_on_hand_built_records():
    frame = stability_frame(_hand_built()).set_index("metric")
    assert list(frame["calibration"]) == ["wikipedia/8×64"] * 2  # one variant: no pooled rows
    bi, ang = frame.loc["bi"], frame.loc["angular"]
    assert (bi["jaccard_mean"], bi["distinct_sets"]) == (1.0, 1)
    assert bi["tau_mean"] == pytest.approx(1.0) and bi["rho_mean"] == pytest.approx(1.0)
    assert bi["always"] == "2 3" and bi["ever"] == 2 and bi["frequency"] == (0, 0, 1, 1, 0, 0)
    assert (ang["jaccard_mean"], ang["distinct_sets"], ang["always"], ang["ever"]) == (0.0, 3, "", 6)
    assert ang["frequency"] == pytest.approx((1 / 3,) * 6, abs=1e-6)
    assert ang["tau_mean"] < 0.5  # rankings 1: ascending, 3: descending
    assert ang["ppl_pruned_mean"] == 40.0 and ang["ppl_pruned_std"] == pytest.approx(10.0)
    assert ang["ppl_pruned_ci_low"] < 40.0 < ang["ppl_pruned_ci_high"]
    assert ang["acc_pruned_mean"] == pytest.approx(0.45) and bi["acc_pruned_mean"] == 0.5
    assert bi["acc_pruned_std"] == 0.0
    # only the columns with a spread are summarised: no dense, retained or per-task statistics
    assert not [c for c in frame.columns if c.startswith(("ppl_dense", "acc_dense", "acc_retained", "acc:"))]
    assert [c.key for c in frame.attrs["columns"]] == ["acc_pruned", "ppl_pruned"]


def test_stability_display_uses_each_columns_label_and_format():
    frame = stability_frame(_hand_built())
    shown = stability_display(frame)
    assert list(shown.columns) == ["model", "calibration", "budget", "metric", "selector", "runs", "distinct sets",
                                   "jaccard", "τ", "ρ", "acc", "acc 95% CI", "ppl (pruned)", "ppl (pruned) 95% CI",
                                   "always removed", "blocks ever removed"]
    ang = shown[shown["metric"] == "angular"].iloc[0]
    assert ang["ppl (pruned)"] == "40.00 ± 10.00"  # ppl's format: two decimals
    assert ang["acc"] == "0.450 ± 0.050"  # accuracy's: three
    assert re.fullmatch(r"\[\d\d\.\d\d, \d\d\.\d\d\]", ang["ppl (pruned) 95% CI"])
    assert (ang["budget"], ang["always removed"]) == ("2 blocks (2/6)", "–")
    bi = shown[shown["metric"] == "bi"].iloc[0]
    assert (bi["acc 95% CI"], bi["always removed"], bi["jaccard"]) == ("[0.500, 0.500]", "2,3", "1.00 ± 0.00")


def test_stability_reports_keep_each_columns_format(tmp_path):
    from bench.stability import write_stability_reports

    md_path, csv_path = write_stability_reports(stability_frame(_hand_built()), tmp_path, title="s")
    lines = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    bi = dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")], strict=True))
    assert (bi["metric"], bi["acc"], bi["acc 95% CI"], bi["ppl (pruned)"]) == (
        "bi", "0.500 ± 0.000", "[0.500, 0.500]", "21.00 ± 1.00")
    csv_header = csv_path.read_text().splitlines()[0].split(",")
    assert {"ppl_pruned_mean", "ppl_pruned_ci_low", "acc_pruned_std", "frequency"} <= set(csv_header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stability.csv", "stability.md"]


def test_stability_without_accuracy_has_no_accuracy_columns():
    records = [_record(i, removed=(2, 3), scores=[6, 5, 1, 2, 4, 3], ppl=20.0 + i, seed=i) for i in range(2)]
    frame = stability_frame(records)
    assert [c.key for c in frame.attrs["columns"]] == ["ppl_pruned"]
    assert not [c for c in frame.columns if c.startswith("acc")]
    assert list(stability_display(frame).columns)[10:12] == ["ppl (pruned)", "ppl (pruned) 95% CI"]
    assert frame.iloc[0]["ppl_pruned_mean"] == 20.5


def test_pooled_rows_across_calibration_variants_and_leaderboard_columns():
    wiki = [_record(i, removed=(2, 3), scores=[6, 5, 1, 2, 4, 3], ppl=20.0, seed=i) for i in range(2)]
    news = [_record(5 + i, removed=(1, 2), scores=[6, 1, 2, 5, 4, 3], ppl=30.0, seed=i, source="news")
            for i in range(2)]
    frame = stability_frame(wiki + news)
    assert list(frame["calibration"]) == ["news/8×64", "wikipedia/8×64", POOLED]
    pooled = frame.iloc[-1]
    assert pooled["runs"] == 4 and pooled["seeds"] == 2 and pooled["distinct_sets"] == 2
    # pairs: 2 within-variant (J = 1) and 4 across (J = |{2}| / |{1, 2, 3}| = 1/3)
    assert pooled["jaccard_mean"] == pytest.approx((2 * 1 + 4 / 3) / 6)
    assert pooled["always"] == "2" and pooled["ppl_pruned_mean"] == 25.0
    assert frame.iloc[0]["jaccard_mean"] == frame.iloc[1]["jaccard_mean"] == 1.0

    board = report.leaderboard(wiki + news)
    assert list(board["calibration"]) == ["news/8×64", "wikipedia/8×64"]
    assert list(board["rank"]) == [1, 1]  # ranks are within a calibration variant
    assert list(board["jaccard"]) == [1.0, 1.0] and list(board["tau"]) == pytest.approx([1.0, 1.0])
    shown = report.display(board)
    assert list(shown.columns[:6]) == ["rank", "model", "budget", "calibration", "metric", "selector"]
    assert list(shown["jaccard"]) == ["1.00", "1.00"] and list(shown["τ"]) == ["1.00", "1.00"]

    one = report.leaderboard(wiki)  # one variant: the quick-grid layout, no calibration column
    assert "calibration" not in one and one["jaccard"].tolist() == [1.0]
    single = report.leaderboard(wiki[:1])  # one seed: no stability columns at all
    assert "jaccard" not in single and "tau" not in single


def test_html_report_is_self_contained(tmp_path):
    records = _hand_built()
    board = report.leaderboard(records)
    paths = html_report.write_html_report(tmp_path, records, board, title="hand <built>")
    page = paths["html"].read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(html_report.FIGURES) == 4
    for name, data in zip(html_report.FIGURES, images, strict=True):
        assert base64.b64decode(data) == paths[name].read_bytes()
        assert paths[name].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert "hand &lt;built&gt;" in page  # escaped
    assert "<h2>Leaderboard</h2>" in page and "<h2>Stability over calibration samples</h2>" in page
    assert page.count("<table") == 2
    # the curves draw the ranking column (accuracy here: the highest rank), with its dense value at 0
    column = html_report.curves_column(runs_frame(records))
    assert (column.key, column.dense_key, column.log_scale) == ("acc_pruned", "acc_dense", False)


def test_curves_fall_back_to_perplexity_and_skip_without_a_direction(tmp_path):
    records = [_record(i, removed=(2, 3), scores=[6, 5, 1, 2, 4, 3], ppl=20.0 + i, seed=i) for i in range(2)]
    column = html_report.curves_column(runs_frame(records))
    assert (column.key, column.dense_key, column.log_scale) == ("ppl_pruned", "ppl_dense", True)
    assert set(html_report.draw_figures(records)) == set(html_report.FIGURES)
    from algorithms.evaluations.base import Column, Evaluation

    class Reference(Evaluation):  # a column with no direction: nothing to draw curves of
        name = "reference"

        def columns(self):
            return [Column("ref", "reference", None)]

        def measure(self, target):
            raise NotImplementedError

        def values(self, dense, pruned):
            raise NotImplementedError

    plain = [make_record(i, removed=(2, 3), scores=[6, 5, 1, 2, 4, 3], values={"ref": 1.0}, seed=i,
                         evaluations=[Reference()]) for i in range(2)]
    assert html_report.curves_column(runs_frame(plain)) is None
    assert set(html_report.draw_figures(plain)) == {"importance", "frequency", "stability"}


# ---------------------------------------------------------------------------------------- config and CLI
def _write(tmp_path, data):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stability_variants_expand_into_cells_and_keep_the_main_ids():
    plain = parse_config(SMALL_GRID)
    study = parse_config({**SMALL_GRID, "stability": {"samples": [4, 8], "sources": ["wikipedia", "news"]}})
    cells = expand(study)
    assert len(cells) == 4 * len(expand(plain))
    assert {calibration_label(c.calibration) for c in cells} == {
        "wikipedia/4×128", "wikipedia/8×128", "news/4×128", "news/8×128"}
    assert {c.cell_id for c in expand(plain)} <= {c.cell_id for c in cells}  # finished records are reused
    # cells of one variant and seed are adjacent: hidden states are captured once per group
    groups = [(c.calibration["source"], c.calibration["samples"], c.calibration["seed"]) for c in cells]
    starts = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    assert len(starts) == len(set(groups)) == 4 * 2


@pytest.mark.parametrize(("stability", "message"), [
    ({"samples": [8, 0]}, "stability.samples[1]: Input should be greater than or equal to 1 (got 0)"),
    ({"seq_lens": [128, 1]}, "stability.seq_lens[1]: Input should be greater than or equal to 2 (got 1)"),
    ({"samples": [8, 8]}, "stability.samples: 8 listed twice"),
    ({"sources": []}, "stability.sources: List should have at least 1 item"),
    ({"seeds": [0, 1]}, "stability.seeds: unknown key"),
    ({"sources": ["wikipedia", "/no/such/corpus.txt"]}, "stability.sources[1]: text source '/no/such/corpus.txt'"),
    ({"sources": ["news"], "samples": [4, 5000]}, "stability.samples[1]: calibration text of 'news' is too short"),
])
@pytest.mark.download
def test_bad_stability_sections_exit_2_naming_the_key(tmp_path, stability, message, smollm2_on_disk):
    results = tmp_path / "out"
    grid = _write(tmp_path, {**SMALL_GRID, "stability": stability})
    for command in (["validate", "--grid", str(grid)],
                    ["stability", "--grid", str(grid), "--results", str(results)],
                    ["run", "--grid", str(grid), "--results", str(results)]):
        result = cli.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert message in " ".join(result.output.split()), result.output
    assert not results.exists()


def test_too_few_tokens_in_one_variant_names_it(tmp_path):
    grid = {**SMALL_GRID, "metrics": [{"name": "mi_gauss", "params": {"max_dim": 64}}],
            "calibration": {**SMALL_GRID["calibration"], "samples": 4, "seq_len": 128},
            "stability": {"samples": [4, 1]}}  # 1 x 128 = 128 tokens < 2 * (64 + 64)
    result = cli.invoke(app, ["validate", "--grid", str(_write(tmp_path, grid))])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "metrics[0].params: mi_gauss needs N >= 2*(dx+dy) = 256 tokens" in text
    assert "calibration variant wikipedia/1×128" in text and "stability.samples[1] = 1" in text


def test_stability_needs_two_seeds_and_writes_nothing(tmp_path):
    results = tmp_path / "out"
    grid = _write(tmp_path, {**SMALL_GRID, "calibration": {**SMALL_GRID["calibration"], "seeds": [0]}})
    result = cli.invoke(app, ["stability", "--grid", str(grid), "--results", str(results)])
    assert result.exit_code == 2
    assert "calibration.seeds: a stability study needs at least 2 seeds to compare, got [0]" in result.output
    assert not results.exists()


# ---------------------------------------------------------------------------------------- a real study
STUDY = {**SMALL_GRID, "name": "stability-e2e", "calibration": {**SMALL_GRID["calibration"], "seeds": [0, 1, 2]},
         "stability": {"sources": ["wikipedia", "news"]}}  # 2 metrics x 3 seeds x 2 sources = 12 cells


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_grid_run):
    root = tmp_path_factory.mktemp("stability")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(STUDY))
    # SMALL_GRID's cells are the study's wikipedia cells of seeds 0 and 1: their hidden states, scores and
    # perplexities are read from the session's run of it; seed 2 and the news cells are computed here
    seed_cache(root / "results", small_grid_run)
    result = cli.invoke(app, ["stability", "--grid", str(grid), "--results", str(root / "results"), "--json"])
    return {"grid": grid, "results": root / "results", "result": result}


@pytest.mark.slow
@pytest.mark.download
def test_real_study_writes_tables_figures_and_html(study):
    result, results = study["result"], study["results"]
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["cells"], payload["ran"], payload["failed"]) == (12, 12, 0)
    for name in ("stability.md", "stability.csv", "leaderboard.md", "report.html"):
        assert (results / name).is_file(), name
    page = (results / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4
    for name, data in zip(html_report.FIGURES, images, strict=True):
        png = (results / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000 and base64.b64decode(data) == png
    assert "http" not in page and "<script" not in page
    assert "wikipedia/4×128" in page and "news/4×128" in page
    md = (results / "stability.md").read_text()
    assert "| smollm2-135m | all" in md and "news/4×128" in md


@pytest.mark.slow
@pytest.mark.download
def test_real_study_statistics_match_the_records(study):
    from bench.store import ResultStore

    records = [r for r in ResultStore(study["results"]).records() if r.status == "ok"]
    assert len(records) == 12
    rows = json.loads(study["result"].stdout)["stability"]
    assert len(rows) == 2 * 2 + 2  # (2 variants + pooled) x 2 metrics
    for row in rows:
        mine = [r for r in records if r.labels.metric == row["metric"]
                and (row["calibration"] == POOLED or r.labels.calibration == row["calibration"])]
        assert row["runs"] == len(mine) == (6 if row["calibration"] == POOLED else 3)
        sets = [frozenset(r.removed_blocks) for r in mine]
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
        assert row["jaccard_mean"] == pytest.approx(np.mean([len(a & b) / len(a | b) for a, b in pairs]))
        assert row["distinct_sets"] == len(set(sets))
        counts = np.zeros(30)
        for s in sets:
            counts[list(s)] += 1
        assert row["frequency"] == pytest.approx(list(counts / len(sets)), abs=1e-6)
        assert row["always"] == " ".join(str(b) for b in range(30) if counts[b] == len(sets))
        ppl = [r.value("ppl_pruned") for r in mine]
        assert row["ppl_pruned_mean"] == pytest.approx(np.mean(ppl))
        assert row["ppl_pruned_std"] == pytest.approx(np.std(ppl, ddof=1))
        assert row["ppl_pruned_ci_low"] <= row["ppl_pruned_mean"] <= row["ppl_pruned_ci_high"]
        assert min(ppl) - 1e-9 <= row["ppl_pruned_ci_low"] and row["ppl_pruned_ci_high"] <= max(ppl) + 1e-9
        assert 0.0 <= row["jaccard_mean"] <= 1.0 and 1 <= row["distinct_sets"] <= row["runs"]
        # the two cosine metrics rank SmolLM2's blocks consistently across calibration samples
        assert 0.5 < row["tau_mean"] <= 1.0 and 0.5 < row["rho_mean"] <= 1.0
        assert row["k"] == 4 and row["ever"] >= 4


@pytest.mark.slow
@pytest.mark.download
def test_real_study_reruns_nothing_and_report_html_rebuilds(study):
    result = cli.invoke(app, ["stability", "--grid", str(study["grid"]), "--results", str(study["results"]),
                              "--json", "--no-html"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["skipped"], payload["ran"]) == (12, 0)
    assert payload["stability"] == json.loads(study["result"].stdout)["stability"]
    html = study["results"] / "report.html"
    html.unlink()
    result = cli.invoke(app, ["report", "--grid", str(study["grid"]), "--results", str(study["results"]), "--html"])
    assert result.exit_code == 0, result.output
    assert html.read_text().count("data:image/png;base64,") == 4
    board = (study["results"] / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"calibration", "jaccard", "tau"} <= set(board)
