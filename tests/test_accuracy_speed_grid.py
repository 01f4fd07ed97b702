"""A grid with `accuracy:` and `speed:` sections on the real SmolLM2-135M: each distinct block set (the
dense model included) is scored by lm-eval once, speed is a same-process ratio, and the leaderboard
carries accuracy and speedup columns ranked by accuracy."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from bench import report
from bench.cli import app
from bench.config import load_config
from bench.runner import Runner
from tests.conftest import SMALL_GRID

pytestmark = pytest.mark.slow

TASKS = ["piqa", "arc_easy"]
GRID = {
    **SMALL_GRID,
    "name": "acc-speed",
    "accuracy": {"tasks": TASKS, "limit": 16, "batch_size": 8, "seed": 0},
    "speed": {"prompt_lengths": [32], "decode_tokens": 4, "repeats": 2, "warmup": 1},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    config = load_config(grid)
    runner = Runner(config, root / "results")
    summary = runner.run()
    return {"grid": grid, "config": config, "results": root / "results", "summary": summary, "runner": runner}


def test_dense_and_each_distinct_set_are_scored_once(run):
    summary, runner = run["summary"], run["runner"]
    assert (summary.total, summary.ran, summary.failed) == (4, 4, 0), [r.get("error") for r in summary.records]
    distinct = {tuple(r["removed_blocks"]) for r in summary.records}
    assert runner.counters["accuracy_runs"] == 1 + len(distinct)  # not 2 per cell
    dense = [r["accuracy"]["dense"] for r in summary.records]
    assert all(d == dense[0] for d in dense)  # one dense evaluation shared by every cell
    by_set = {}
    for r in summary.records:
        acc = r["accuracy"]
        assert list(acc["pruned"]["tasks"]) == TASKS
        for side in ("dense", "pruned"):
            for metrics in acc[side]["tasks"].values():
                assert metrics["n"] == 16 and 0.0 <= metrics["acc"] <= 1.0
            assert 0.0 <= acc[side]["score"] <= 1.0
        assert acc["retained"] == pytest.approx(acc["pruned"]["score"] / acc["dense"]["score"])
        by_set.setdefault(tuple(r["removed_blocks"]), []).append(acc["pruned"])
    for results in by_set.values():  # cells that chose the same set share its one evaluation
        assert all(x == results[0] for x in results)


def test_speed_is_a_same_process_ratio_with_parameter_counts(run):
    for r in run["summary"].records:
        speed = r["speed"]
        dense, pruned = speed["dense"], speed["pruned"]
        assert (dense["n_blocks"], pruned["n_blocks"]) == (30, 26)
        assert speed["speedup"]["params"] == pytest.approx(pruned["params"] / dense["params"])
        assert speed["speedup"]["params"] == pytest.approx(r["parameters"]["kept_share"])
        assert speed["speedup"]["prefill_mean"] > 0 and speed["speedup"]["decode"] > 0
        json.dumps(speed)  # stored as plain JSON


def test_leaderboard_has_accuracy_and_speed_columns_ranked_by_accuracy(run):
    board, _ = report.build(run["results"])
    assert board.attrs["ranked_by"] == "accuracy"
    for col in ("acc_pruned", "acc_std", "acc_dense", "acc_retained", "acc:piqa", "acc:arc_easy",
                "prefill_speedup", "decode_speedup"):
        assert col in board and board[col].notna().all(), col
    for _, group in board.groupby(["model", "budget"]):
        best = group.loc[group["rank"] == 1, "acc_pruned"].iloc[0]
        assert best == group["acc_pruned"].max()
    by_ppl, _ = report.build(run["results"], rank_by="ppl")
    assert by_ppl.attrs["ranked_by"] == "ppl"
    for _, group in by_ppl.groupby(["model", "budget"]):
        assert group.loc[group["rank"] == 1, "ppl_mean"].iloc[0] == group["ppl_mean"].min()
    result = CliRunner().invoke(app, ["report", "--results", str(run["results"])])
    assert result.exit_code == 0, result.output
    md = (run["results"] / "leaderboard.md").read_text()
    for header in ("| acc ", "retained", "piqa", "arc_easy", "prefill ×", "decode ×", "mean downstream accuracy"):
        assert header in md, header
    bad = CliRunner().invoke(app, ["report", "--results", str(run["results"]), "--rank-by", "speed"])
    assert bad.exit_code == 2 and "speed" in bad.output


def test_rerun_recomputes_no_accuracy_or_speed(run):
    runner = Runner(run["config"], run["results"])
    summary = runner.run()
    assert (summary.skipped, summary.ran) == (4, 0)
    assert runner.counters["accuracy_runs"] == 0
