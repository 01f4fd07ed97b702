"""Third-party metrics and selectors through entry points: lazy loading, broken plugins reported by
name without breaking anything else, clashing names naming both distributions, and the example plugin
package installed and run through `bench list` and `bench run`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from estimators.base import Metric
from estimators.registry import Registry, RegistryError
from tests.conftest import SMALL_GRID, seed_cache

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "blockbench-example-plugin"


def fake_distribution(site: Path, name: str, entry_points: dict[str, dict[str, str]],
                      modules: dict[str, str] | None = None) -> None:
    """A minimal installed distribution (a dist-info folder) on a sys.path entry, without pip."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for filename, source in (modules or {}).items():
        (site / filename).write_text(source)


GOOD = """
from estimators.metrics import BlockInfluence
class Good(BlockInfluence):
    '''A fine plugin metric.'''
    name = "good"
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "plugin-good", {"blockbench.metrics": {"good": "bb_good:Good"}}, {"bb_good.py": GOOD})
    fake_distribution(site, "plugin-broken", {"blockbench.metrics": {"broken": "bb_no_such_module:Thing"}})
    fake_distribution(site, "plugin-notametric", {"blockbench.metrics": {"notametric": "json:dumps"}})
    fake_distribution(site, "plugin-one", {"blockbench.metrics": {"twice": "bb_good:Good"}})
    fake_distribution(site, "plugin-two", {"blockbench.metrics": {"twice": "bb_good:Good"}})
    fake_distribution(site, "plugin-shadow", {"blockbench.metrics": {"bi": "bb_good:Good"}})
    monkeypatch.syspath_prepend(str(site))
    return site


def fresh_metrics() -> Registry:
    registry = Registry("metric", entry_point_group="blockbench.metrics", base=Metric)
    registry.register("bi", "estimators.metrics:BlockInfluence")
    return registry


def test_plugins_load_lazily_with_their_distribution_as_origin(site):
    registry = fresh_metrics()
    assert "bb_good" not in sys.modules
    names = registry.list()
    assert {"good", "broken", "notametric", "twice", "bi"} <= set(names)
    assert "bb_good" not in sys.modules  # listing imports nothing
    assert registry.origin("good") == "plugin: plugin-good 0.1"
    assert registry.get("good").name == "good"
    assert registry.list("go*") == ["good"]


def test_a_broken_plugin_is_named_and_breaks_nothing_else(site):
    registry = fresh_metrics()
    with pytest.raises(RegistryError, match=r"'broken' from plugin: plugin-broken 0.1 .*ModuleNotFoundError"):
        registry.get("broken")
    with pytest.raises(RegistryError, match=r"'notametric' .*not a subclass of estimators.base.Metric"):
        registry.get("notametric")
    assert registry.get("good").name == "good" and registry.get("bi").name == "bi"
    errors = registry.errors()
    assert set(errors) >= {"broken", "notametric", "twice"}
    assert "good" not in errors and "bi" not in errors


def test_clashing_names_name_both_distributions(site):
    registry = fresh_metrics()
    with pytest.raises(RegistryError) as err:
        registry.get("twice")
    assert "plugin-one 0.1" in str(err.value) and "plugin-two 0.1" in str(err.value)
    # a plugin cannot take a built-in's name: the built-in stays, the plugin is reported
    assert registry.get("bi").__module__ == "estimators.metrics"
    clash = [why for name, why in registry.errors().items() if name.startswith("bi ")]
    assert clash and "built-in" in clash[0] and "plugin-shadow 0.1" in clash[0]


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _bench(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-c", "from bench.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_bench_list_and_validate_with_broken_plugins(site, tmp_path):
    env = {**_env(site), "COLUMNS": "250"}
    listed = _bench("list", "metrics", env=env)
    assert listed.returncode == 0, listed.stderr
    out = " ".join(listed.stdout.split())
    assert "good" in out and "plugin-good 0.1" in out and "mi_gauss" in out
    assert "broken: metric 'broken'" in out
    assert "plugin-shadow" in listed.stderr  # a clash with a built-in is reported, not fatal
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**SMALL_GRID, "metrics": ["bi", "broken"]}))
    result = _bench("validate", "--grid", str(grid), env=env)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "metrics[1]" in text and "plugin-broken" in text, text


@pytest.fixture(scope="module")
def example_installed():
    """The example plugin package installed into this environment (removed again afterwards)."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # built from a copy: pip's build folders and egg-info never land in the source tree
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / EXAMPLE.name
        shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        subprocess.run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", str(copy)], check=True,
                       timeout=600)
    yield
    subprocess.run([*pip, "uninstall", "-q", "-y", "blockbench-example-plugin"], check=True, timeout=600)


@pytest.mark.slow
@pytest.mark.download
def test_example_plugin_is_listed_and_runs_in_a_grid(example_installed, tmp_path, small_grid_run):
    env = {**os.environ, "COLUMNS": "250"}
    for kind, name in (("metrics", "rel_change"), ("selectors", "spread")):
        listed = _bench("list", kind, env=env)
        assert listed.returncode == 0, listed.stderr
        line = next(row for row in listed.stdout.splitlines() if f" {name} " in row)
        assert "blockbench-example-plugin 0.1.0" in line
    listed = _bench("list", "evaluations", env=env)
    line = next(row for row in listed.stdout.splitlines() if " nll_gap " in row)
    assert [c.strip() for c in line.strip("│").split("│")][:3] == ["nll_gap", "plugin: blockbench-example-plugin 0.1.0",
                                                                   "nll_gap ↓"]
    grid = {**SMALL_GRID, "name": "plugin", "metrics": ["rel_change", "bi"],
            "selectors": ["topk", {"name": "spread", "params": {"gap": 1}}],
            "calibration": {**SMALL_GRID["calibration"], "seeds": [0]},
            "nll_gap": {"seq_len": 64, "max_windows": 2}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    seed_cache(tmp_path / "results", small_grid_run)  # the built-in steps SMALL_GRID ran: read, not computed
    result = _bench("run", "--grid", str(path), "--results", str(tmp_path / "results"), "--json", env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert (summary["cells"], summary["failed"]) == (4, 0)
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "records").glob("*.json")]
    labels = {(r["labels"]["metric"], r["labels"]["selector"]) for r in records}
    assert ("rel_change", "spread(gap=1)") in labels or ("rel_change", "spread") in {
        (m, s.split("(")[0]) for m, s in labels}
    for r in records:
        assert r["status"] == "ok" and len(r["removed_blocks"]) == 4
        if r["labels"]["selector"].startswith("spread"):
            blocks = r["removed_blocks"]
            assert all(b - a > 1 for a, b in zip(blocks, blocks[1:], strict=False)), blocks  # no two adjacent
        if r["labels"]["metric"] == "rel_change":
            assert r["versions"]["metric"] == "1" and all(s > 0 for s in r["scores"])
        # the plugin evaluation: its own section, its own column, its number from its own results
        gap = r["evaluations"]["nll_gap"]
        assert gap["values"]["nll_gap"] == gap["pruned"]["nll"] - gap["dense"]["nll"] > 0
        assert r["spec"]["evaluations"]["nll_gap"] == {"name": "nll_gap", "version": "1",
                                                       "params": {"seq_len": 64, "max_windows": 2}}
    # a leaderboard column with its label, direction and ± spread, with no edit to blockbench
    lines = (tmp_path / "results" / "leaderboard.md").read_text().splitlines()
    header = next([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))
    assert "NLL gap" in header
    assert "`NLL gap`: lower is better (`bench check` measure `nll_gap`)" in "\n".join(lines)
