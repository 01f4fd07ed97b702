"""The Ray executor: the same records as the local one, resumable after the driver is killed."""

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
from tests.conftest import SMALL_GRID, seed_cache

cli = CliRunner()

#: SMALL_GRID with top-k and Fast-Block-Select: 8 cells in 2 calibration groups, several distinct sets
GRID = {**SMALL_GRID, "name": "raytest", "selectors": ["topk", "fbs"]}
#: what may differ between two runs of the same cell: timings, the machine, and which stage a cache served
VOLATILE = ("timings", "env", "finished_at", "cache_hits")


def _records(results):
    out = {}
    for path in (results / "records").glob("*.json"):
        record = json.loads(path.read_text())
        for key in VOLATILE:
            record.pop(key, None)
        record["calibration_stats"].pop("capture_seconds", None)
        # objective values computed afresh rather than served by the group's memo (a cache statistic:
        # a resumed group holds fewer cells, so fewer sets were memoised before this one)
        record["selector_result"]["info"].pop("computed", None)
        for outcome in record["evaluations"].values():
            outcome.pop("seconds")
            outcome.pop("cached")
        out[record["cell_id"]] = record
    return out


def test_unknown_executor_and_stray_address_are_usage_errors(tmp_path, small_grid):
    results = tmp_path / "out"
    result = cli.invoke(app, ["run", "--grid", str(small_grid), "--results", str(results), "--executor", "dask"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --executor: unknown executor 'dask'."), result.output
    assert "Known: local, ray" in result.output
    result = cli.invoke(app, ["run", "--grid", str(small_grid), "--results", str(results), "--address", "auto"])
    assert result.exit_code == 2 and "--address: only used with --executor ray" in result.output
    assert not results.exists()


def test_missing_ray_is_a_usage_error_naming_the_extra(tmp_path, small_grid, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    results = tmp_path / "out"
    result = cli.invoke(app, ["run", "--grid", str(small_grid), "--results", str(results), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert "pip install 'blockbench[ray]'" in result.output
    assert not list(results.glob("records/*.json"))  # nothing run, nothing recorded


def test_an_address_nobody_answers_is_a_usage_error(tmp_path, small_grid):
    pytest.importorskip("ray")
    results = tmp_path / "out"
    result = cli.invoke(app, ["run", "--grid", str(small_grid), "--results", str(results), "--executor", "ray",
                              "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "--address '127.0.0.1:1': no Ray cluster answers there" in result.output
    assert not list(results.glob("records/*.json"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, small_grid_run):
    """The grid run uninterrupted by the local executor: the reference for the Ray run (whose every
    number is computed afresh). Its hidden states, scores and perplexities of top-k's sets are those of
    the session's SMALL_GRID run (same model, calibration and evaluation: same cache keys)."""
    results = tmp_path_factory.mktemp("local") / "results"
    seed_cache(results, small_grid_run)
    summary = Runner(parse_config(GRID), results).run()
    assert (summary.ran, summary.failed) == (8, 0)
    return results


@pytest.mark.slow
@pytest.mark.download
def test_ray_gives_the_local_records_and_resumes_after_the_driver_is_killed(tmp_path, local_run):
    """Ray on a local instance: kill -9 the driver (and its Ray instance) mid-grid, rerun; the finished
    records are kept byte for byte, and every record equals the local executor's."""
    pytest.importorskip("ray")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    results = tmp_path / "killed"
    command = [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid), "--results", str(results), "--quiet",
               "--executor", "ray"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = results / "records"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(records.glob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    proc.wait()
    before = {p.name: p.read_text() for p in records.glob("*.json")}
    assert 1 <= len(before) < 8, f"the run must be killed mid-grid, found {len(before)} records"
    for text in before.values():
        json.loads(text)  # every record on disk is whole

    rerun = subprocess.run(command[:-2] + ["--json", "--executor", "ray"], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert (summary["skipped"], summary["ran"], summary["failed"]) == (len(before), 8 - len(before), 0)
    assert summary["leaderboard"] is not None and len(summary["leaderboard"]) == 4
    assert {p.name: p.read_text() for p in records.glob("*.json") if p.name in before} == before

    clean = local_run  # uninterrupted, local
    # every number bit-identical: chosen blocks, scores, selector evaluations, perplexities, parameters
    assert _records(results) == _records(clean)
    ids = {c.cell_id for c in expand(parse_config(GRID))}
    cols = ["model", "budget", "metric", "selector", "ppl_pruned", "ppl_pruned_std", "typical_removed", "seeds"]
    assert (report.build(results, ids)[0][cols].to_dict("records")
            == report.build(clean, ids)[0][cols].to_dict("records"))
