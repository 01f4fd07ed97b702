"""Method presets: what a grid's ``methods:`` expands to, that the metric × selector cells keep their ids,
the errors that name the key, ``bench list methods`` (built-ins and plugins, broken ones reported), and the
reports of records with a method."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import algorithms
import bench.grid
from algorithms.methods import ATTENTION_DROP, SHORTENED_TAYLOR, Component, MethodPreset, check_method
from bench import gate, report, stability
from bench.cli import app
from bench.config import ConfigError, parse_config
from bench.grid import expand, validate
from estimators.registry import Registry
from tests.records_factory import make_record
from tests.test_plugins import fake_distribution

ROOT = Path(__file__).resolve().parents[1]
cli = CliRunner()

BUILT_IN = {  # name: (paper, arXiv)
    "attention-drop": ("He et al. 2024: What Matters in Transformers? Not All Attention is Needed", "2406.15786"),
    "blockpruner": ("Zhong et al. 2024: BlockPruner: Fine-grained Pruning for Large Language Models", "2406.10594"),
    "cbo-like": ("Jansen, Rausch, Montero, Orús 2026: Block removal for large language models through constrained "
                 "binary optimization", "2602.00161"),
    "gromov": ("Gromov et al. 2024: The Unreasonable Ineffectiveness of the Deeper Layers", "2403.17887"),
    "mi-prun-gauss": ("Zhang et al. 2026: MI-PRUN: Optimize Large Language Model Pruning via Mutual Information",
                      "2601.07212"),
    "mi-prun-ksg": ("Zhang et al. 2026: MI-PRUN: Optimize Large Language Model Pruning via Mutual Information",
                    "2601.07212"),
    "mi-prun-renyi": ("Zhang et al. 2026: MI-PRUN: Optimize Large Language Model Pruning via Mutual Information",
                      "2601.07212"),
    "replaceme": ("Shopkhoev et al. 2025: ReplaceMe: Network Simplification via Layer Pruning and Linear "
                  "Transformations", "2505.02819"),
    "shortened-ppl": ("Kim et al. 2024: Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of "
                      "Retraining Methods", "2402.02834"),
    "shortened-taylor": ("Kim et al. 2024: Shortened LLaMA: Depth Pruning for Large Language Models with Comparison "
                         "of Retraining Methods", "2402.02834"),
    "shortgpt": ("Men et al. 2024: ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
                 "2403.03853"),
    "sleb": ("Song et al. 2024: SLEB: Streamlining LLMs through Redundancy Verification and Elimination of "
             "Transformer Blocks", "2402.09025"),
}
EXPANDS_TO = {
    "attention-drop": "metric: bi, selector: topk, unit: attention, healing: none, protect: []",
    "blockpruner": "metric: ppl, selector: iterative(objective=loss), unit: sublayer, healing: none, protect: []",
    "cbo-like": "metric: ppl, selector: ising(objective=loss), unit: block, healing: none, protect: []",
    "gromov": "metric: angular(tokens=last), selector: span, unit: block, healing: none, protect: []",
    "mi-prun-gauss": "metric: mi_gauss, selector: fbs, unit: block, healing: none, protect: []",
    "mi-prun-ksg": "metric: mi_ksg, selector: fbs, unit: block, healing: none, protect: []",
    "mi-prun-renyi": "metric: mi_renyi, selector: fbs, unit: block, healing: none, protect: []",
    "replaceme": "metric: angular, selector: span, unit: block, healing: linear, protect: []",
    "shortened-ppl": "metric: ppl, selector: topk, unit: block, healing: none, protect: []",
    "shortened-taylor": "metric: taylor, selector: topk, unit: block, healing: none, protect: [0, 1, 2, 3, -2, -1]",
    "shortgpt": "metric: bi, selector: topk, unit: block, healing: none, protect: []",
    "sleb": "metric: ppl, selector: iterative(objective=loss), unit: block, healing: none, protect: []",
}
KNOWN = ", ".join(sorted(BUILT_IN))

BASE = {"name": "presets", "models": ["smollm2-135m"], "budgets": {"ratios": [0.25], "blocks": [2]},
        "calibration": {"samples": 4, "seq_len": 128, "seeds": [0, 1]}, "device": "cpu"}


def preset(name, metric=Component("bi"), selector=Component("topk"), **fields):
    return MethodPreset(name=name, title="A test preset", authors="Doe et al. 2025", arxiv="2501.00001",
                        metric=metric, selector=selector, **fields)


@pytest.fixture
def methods(monkeypatch):
    """A fresh method registry with the built-ins, in place of ``algorithms.METHODS``; returns its ``add``."""
    registry = Registry("method", entry_point_group="blockbench.methods", check=check_method)
    for name in algorithms.METHODS.list():
        registry.register(name, algorithms.METHODS.get(name))
    monkeypatch.setattr(algorithms, "METHODS", registry)
    monkeypatch.setattr(bench.grid, "METHODS", registry)
    return registry


# ---------------------------------------------------------------------------------------- expansion
def test_methods_expand_to_their_own_cells_not_crossed_with_units_and_healing():
    config = parse_config({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["block", "attention"],
                           "healing": ["none", "linear"], "protect": [0],
                           "methods": ["shortgpt", "attention-drop", {"name": "replaceme"}]})
    cells = expand(config)
    # per seed: 2 units × 2 healings × 1 metric × 1 selector × 2 budgets, then 3 methods × 2 budgets
    assert len(cells) == 2 * (8 + 6)
    got = [(c.calibration["seed"], c.method, c.metric.label(), c.selector.label(), c.unit, c.healing.label(),
            c.protect, c.budget) for c in cells if c.method is not None]
    assert got == [
        (seed, method, metric, selector, unit, healing, (0,), budget)
        for seed in (0, 1)
        for method, metric, selector, unit, healing in [
            ("shortgpt", "bi", "topk", "block", "none"), ("attention-drop", "bi", "topk", "attention", "none"),
            ("replaceme", "angular", "span", "block", "linear")]
        for budget in ({"ratio": 0.25}, {"blocks": 2})]
    pairs = [(c.calibration["seed"], c.unit, c.healing.label(), c.budget) for c in cells if c.method is None]
    assert pairs == [(seed, unit, healing, budget) for seed in (0, 1) for unit in ("block", "attention")
                     for healing in ("none", "linear") for budget in ({"ratio": 0.25}, {"blocks": 2})]
    # within each seed the metric × selector cells come first, then the method cells
    assert [c.method for c in cells[:14]] == [None] * 8 + ["shortgpt"] * 2 + ["attention-drop"] * 2 + ["replaceme"] * 2


def test_the_metric_x_selector_cells_keep_their_ids_when_methods_are_added():
    plain = {**BASE, "metrics": ["bi", {"name": "angular", "params": {"tokens": "last"}}], "selectors": ["topk"],
             "protect": [0, -1]}
    before = expand(parse_config(plain))
    after = expand(parse_config({**plain, "methods": ["shortgpt", "gromov"]}))
    assert [c.cell_id for c in after if c.method is None] == [c.cell_id for c in before]
    assert all("method" not in c.spec() for c in before)
    # a method cell is its metric × selector cell with the method's name added: the same numbers, its own id
    pair = next(c for c in before if c.metric.name == "bi" and c.budget == {"blocks": 2} and c.calibration["seed"] == 0)
    method = next(c for c in after if c.method == "shortgpt" and c.budget == {"blocks": 2} and c.calibration["seed"] == 0)
    assert method.protect == (-1, 0) and pair.protect == (0, -1)  # a preset's cell: the sorted union
    spec = method.spec()
    assert spec.pop("method") == "shortgpt"
    assert spec == {**pair.spec(), "protect": [-1, 0]}
    assert method.cell_id != pair.cell_id


def test_a_presets_protected_blocks_join_the_grids(methods):
    methods.register("keep-ends", preset("keep-ends", protect=(-1, 0, 1)))
    cells = expand(parse_config({**BASE, "methods": ["keep-ends", "shortgpt"], "protect": [3, 0]}))
    assert [(c.method, c.protect) for c in cells[:4]] == [("keep-ends", (-1, 0, 1, 3))] * 2 + [("shortgpt", (0, 3))] * 2
    assert SHORTENED_TAYLOR.protect == (0, 1, 2, 3, -2, -1)
    assert ATTENTION_DROP.unit == "attention" and ATTENTION_DROP.deviations == ()


def test_a_grid_of_methods_only_needs_no_metrics_or_selectors():
    config = parse_config({**BASE, "methods": ["gromov"]})
    assert (config.metrics, config.selectors) == ([], [])
    cells = validate(config)
    assert [(c.method, c.metric.label(), c.selector.label(), c.budget) for c in cells] == [
        ("gromov", "angular(tokens=last)", "span", {"ratio": 0.25}), ("gromov", "angular(tokens=last)", "span",
                                                                       {"blocks": 2})] * 2


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("grid", "message"), [
    ({"methods": [{"name": "shortgpt", "params": {"k": 2}}]},
     "methods[0].params: a method preset takes no parameters (it fixes its metric, selector, unit and healing); to "
     "change them, list its metric and selector under metrics and selectors instead"),
    ({"methods": ["gromov", {"name": "shortgpt", "params": {}}]}, "methods[1].params: a method preset takes no "
     "parameters (it fixes its metric, selector, unit and healing); to change them, list its metric and selector "
     "under metrics and selectors instead"),
    ({"metrics": ["bi"]}, "selectors: required when metrics are given (every metric is crossed with every selector); "
     "or leave out metrics and list methods"),
    ({"metrics": ["bi"], "methods": ["shortgpt"]}, "selectors: required when metrics are given (every metric is "
     "crossed with every selector); or leave out metrics and list methods"),
    ({"selectors": ["topk"]}, "metrics: required when selectors are given (every metric is crossed with every "
     "selector); or leave out selectors and list methods"),
    ({}, "metrics: required: give metrics and selectors, or methods (presets: bench list methods), or both"),
    ({"methods": ["shortgpt", "gromov", "shortgpt"]}, "methods[2]: method 'shortgpt' is listed twice (also methods[0])"),
    ({"methods": []}, "methods: List should have at least 1 item after validation, not 0"),
    ({"method": ["shortgpt"], "metrics": ["bi"], "selectors": ["topk"]},
     "method: unknown key Did you mean 'methods' or 'models'?"),
])
def test_grid_mistakes_name_the_key(grid, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **grid})
    assert str(err.value) == f"<config>: invalid grid config\n{message}"


def test_an_unknown_method_suggests_the_close_names():
    with pytest.raises(ConfigError) as err:
        validate(parse_config({**BASE, "methods": ["gromov", "shortgtp"]}))
    assert str(err.value) == ("methods[1].name: unknown method 'shortgtp'. Did you mean 'shortgpt' or 'shortened-ppl' "
                              f"or 'shortened-taylor'? Known: {KNOWN}")


def test_bench_validate_exits_2_on_an_unknown_method(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**BASE, "metrics": ["bi"], "selectors": ["topk"], "methods": ["shortgtp"]}))
    result = cli.invoke(app, ["validate", "--grid", str(path)])
    assert result.exit_code == 2
    assert result.output == ("error: methods[0].name: unknown method 'shortgtp'. Did you mean 'shortgpt' or "
                             f"'shortened-ppl' or 'shortened-taylor'? Known: {KNOWN}\n")


def test_bench_validate_counts_the_method_cells(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["block", "mlp"],
                                    "methods": ["shortgpt", "gromov"]}))
    result = cli.invoke(app, ["validate", "--grid", str(path)])
    assert result.exit_code == 0, result.output
    # the console wraps the long path's line: compared with its whitespace normalised (the cost plan follows)
    def first_line(out: str) -> str:
        return " ".join(out.split("plan: ")[0].split())

    assert first_line(result.stdout) == (f"{path}: ok: 16 cells (1 model(s) × 2 seed(s) × (2 unit kind(s) × 1 "
                                         "metric(s) × 1 selector(s) + 2 method(s)) × 2 budget(s)); evaluations: "
                                         "perplexity")
    path.write_text(yaml.safe_dump({**BASE, "methods": ["gromov"]}))
    result = cli.invoke(app, ["validate", "--grid", str(path)])
    assert first_line(result.stdout) == (f"{path}: ok: 4 cells (1 model(s) × 2 seed(s) × 1 method(s) × 2 "
                                         "budget(s)); evaluations: perplexity")


def test_what_a_preset_expands_to_is_checked_like_the_grids_own_components(methods):
    from estimators.metrics import AngularDistance

    methods.register("no-metric", preset("no-metric", metric=Component("no_such_metric")))
    methods.register("no-selector", preset("no-selector", selector=Component("topkk")))
    methods.register("bad-params", preset("bad-params", metric=Component("angular", {"tokens": "first"})))
    methods.register("bad-healing", preset("bad-healing", healing=Component("linear", {"ridge": -1.0})))
    methods.register("keep-most", preset("keep-most", protect=tuple(range(29))))
    methods.register("alias", methods.get("shortgpt"))
    with pytest.raises(ValueError) as angular:
        AngularDistance(tokens="first")
    from algorithms.healing.linear import LinearHealing

    with pytest.raises(ValueError) as ridge:
        LinearHealing({"ridge": -1.0})
    from algorithms import MODEL_METRICS
    from estimators import METRICS

    cases = {
        "no-metric": "methods[1]: method 'no-metric' expands to metric 'no_such_metric': unknown metric "
                     f"'no_such_metric'. Known: {', '.join(sorted(METRICS.list() + MODEL_METRICS.list()))}",
        "no-selector": "methods[1]: method 'no-selector' expands to selector 'topkk': unknown selector 'topkk'. Did "
                       "you mean 'topk'? Known: exhaustive, fbs, ising, iterative, optuna, span, topk",
        "bad-params": f"methods[1]: method 'bad-params' expands to metric 'angular(tokens=first)': {angular.value}",
        "bad-healing": f"methods[1]: method 'bad-healing' expands to healing 'linear(ridge=-1.0)': {ridge.value}",
        "keep-most": "budgets: budget {'blocks': 2} asks to remove 2 blocks but the model has 30 (1 removable) "
                     "(models[0] = 'smollm2-135m') (methods[1] = 'keep-most')",
        "alias": "methods[1].name: method 'alias' from built-in cannot be used: the preset it names is called "
                 "'shortgpt'; register it under that name",
    }
    for name, message in cases.items():
        grid = {**BASE, "budgets": {"blocks": [2]}, "calibration": {"samples": 4, "seq_len": 128, "seeds": [0]},
                "methods": ["shortgpt", name]}
        with pytest.raises(ConfigError) as err:
            validate(parse_config(grid))
        assert str(err.value) == message, name


def test_a_preset_is_checked_when_it_is_made():
    with pytest.raises(ValueError, match=r"^method 'x': unit must be one of block, attention, mlp, sublayer, got 'head'$"):
        preset("x", unit="head")
    with pytest.raises(ValueError, match=r"^method 'x': protect must be a tuple of block indices, got \(0, True\)$"):
        preset("x", protect=(0, True))
    with pytest.raises(ValueError, match=r"^method 'x': metric must be an algorithms.methods.Component, got 'bi'$"):
        preset("x", metric="bi")
    assert check_method(preset("x")) is None
    assert check_method("shortgpt") == "it is a builtins.str, not an algorithms.methods.MethodPreset"
    assert preset("x", protect=[2, -1]).protect == (2, -1)
    with pytest.raises(TypeError):
        ATTENTION_DROP.metric.params["tokens"] = "last"  # shared by every grid: read-only


# ---------------------------------------------------------------------------------------- bench list methods
def merged_rows(text: str) -> dict[str, list[str]]:
    """The body rows of a rich table by their first cell, each cell's wrapped lines joined with spaces."""
    rows: dict[str, list[str]] = {}
    last = None
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0]:
            last = rows[cells[0]] = cells
        else:
            assert last is not None
            for i, cell in enumerate(cells):
                if cell:
                    last[i] = f"{last[i]} {cell}".strip()
    return rows


def test_bench_list_methods_shows_paper_arxiv_expansion_and_deviations():
    result = cli.invoke(app, ["list", "methods"])
    assert result.exit_code == 0, result.output
    rows = merged_rows(result.stdout)
    assert sorted(rows) == sorted(BUILT_IN)  # no blockpruner: it needs a mixed pool of sub-layers
    for name, (paper, arxiv) in BUILT_IN.items():
        deviations = " ".join(f"- {d}" for d in algorithms.METHODS.get(name).deviations) or "–"
        assert rows[name] == [name, "built-in", paper, arxiv, EXPANDS_TO[name], deviations], name
    assert rows["sleb"][5] == ("- Calibration is the grid's (the paper: 128 × 2048 tokens of WikiText-2). - The loss "
                               "is the mean calibration NLL (the logarithm of the paper's perplexity: the same choice "
                               "at each step).")
    result = cli.invoke(app, ["list", "methods", "mi-*"])
    assert sorted(merged_rows(result.stdout)) == ["mi-prun-gauss", "mi-prun-ksg", "mi-prun-renyi"]


PLUGIN = """
from algorithms.methods import Component, MethodPreset

KEEP_ENDS = MethodPreset(
    name="keep-ends", title="Keeping the ends", authors="Doe et al. 2025", arxiv="2501.00001",
    metric=Component("angular", {"tokens": "last"}), selector=Component("topk"), protect=(0, -1),
    deviations=("Made up for a test.",))
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "plugin-presets", {"blockbench.methods": {
        "keep-ends": "bb_presets:KEEP_ENDS", "broken-preset": "bb_no_such_module:X", "not-a-preset": "json:dumps",
        "alias": "bb_presets:KEEP_ENDS"}}, {"bb_presets.py": PLUGIN})
    fake_distribution(site, "plugin-shadow-preset", {"blockbench.methods": {"shortgpt": "bb_presets:KEEP_ENDS"}})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_plugin_preset_is_listed_and_broken_ones_are_reported(plugin_site):
    env = {**os.environ, "COLUMNS": "250",
           "PYTHONPATH": os.pathsep.join([str(plugin_site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", "from bench.cli import main; main()", "list", "methods"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = merged_rows(result.stdout)
    origin = "plugin: plugin-presets 0.1"
    assert rows["keep-ends"] == ["keep-ends", origin, "Doe et al. 2025: Keeping the ends", "2501.00001",
                                 "metric: angular(tokens=last), selector: topk, unit: block, healing: none, "
                                 "protect: [0, -1]", "- Made up for a test."]
    assert rows["broken-preset"] == ["broken-preset", origin, "", "", "", (
        f"broken: method 'broken-preset' from {origin} (bb_no_such_module:X) cannot be used: ModuleNotFoundError: No "
        "module named 'bb_no_such_module'")]
    assert rows["not-a-preset"][5] == (f"broken: method 'not-a-preset' from {origin} (json:dumps) cannot be used: it "
                                       "is a builtins.function, not an algorithms.methods.MethodPreset")
    assert rows["alias"][5] == (f"broken: method 'alias' from {origin} cannot be used: the preset it names is called "
                                "'keep-ends'; register it under that name")
    # the built-ins are all there, the one a plugin tried to take unchanged
    assert set(BUILT_IN) <= set(rows) and rows["shortgpt"][:4] == ["shortgpt", "built-in", *BUILT_IN["shortgpt"]]
    assert " ".join(result.stderr.split()) == (
        "plugin not loaded: shortgpt (plugin-shadow-preset 0.1): method 'shortgpt' is registered twice: by built-in and "
        "by plugin: plugin-shadow-preset 0.1")


def test_a_plugin_preset_runs_in_a_grid(plugin_site, methods):
    config = parse_config({**BASE, "budgets": {"blocks": [2]}, "methods": ["keep-ends"], "protect": [5]})
    cells = expand(config)
    assert [(c.method, c.metric.label(), c.selector.label(), c.protect) for c in cells] == [
        ("keep-ends", "angular(tokens=last)", "topk", (-1, 0, 5))] * 2
    with pytest.raises(ConfigError) as err:
        expand(parse_config({**BASE, "methods": ["broken-preset"]}))
    assert str(err.value) == ("methods[0].name: method 'broken-preset' from plugin: plugin-presets 0.1 "
                              "(bb_no_such_module:X) cannot be used: ModuleNotFoundError: No module named "
                              "'bb_no_such_module'")


# ---------------------------------------------------------------------------------------- reports
def _records():
    """bi/topk as the grid's pair and as shortgpt (the same numbers), attention-drop, over two seeds."""
    out = []
    for seed in (0, 1):
        for i, (method, unit, removed, ppl) in enumerate([(None, None, (3, 4), 30.0), ("shortgpt", None, (3, 4), 30.0),
                                                          ("attention-drop", "attention", (1, 2), 20.0)]):
            out.append(make_record(3 * seed + i, removed=removed, values={"ppl_pruned": ppl + seed, "ppl_dense": 10.0},
                                   scores=[6, 5, 1, 2, 4, 3], seed=seed, method=method, unit=unit))
    return out


def test_the_leaderboard_has_a_method_column_only_when_some_row_ran_a_preset(tmp_path):
    records = _records()
    board = report.leaderboard(records)
    assert list(board.columns[:7]) == ["model", "budget", "metric", "selector", "unit", "method", "seeds"]
    assert list(zip(board["rank"], board["unit"], board["method"], board["ppl_pruned"], strict=True)) == [
        (1, "attention", "attention-drop", 20.5), (2, "block", "", 30.5), (2, "block", "shortgpt", 30.5)]
    shown = report.display(board)
    assert list(shown.columns[:7]) == ["rank", "model", "budget", "method", "metric", "selector", "unit"]
    assert list(shown["method"]) == ["attention-drop", "–", "shortgpt"]
    assert list(report.display(board, terminal=True)["method"]) == ["attention-drop", "–", "shortgpt"]
    md_path, csv_path = report.write_reports(board, tmp_path, title="methods")
    assert csv_path.read_text().splitlines()[0].startswith("model,budget,metric,selector,unit,method,seeds,")
    assert csv_path.read_text().splitlines()[2].startswith("m,2 blocks,bi,topk,block,,2,")
    header = next(line for line in md_path.read_text().splitlines() if line.startswith("|") and "rank" in line)
    assert [c.strip() for c in header.split("|")[1:8]] == ["rank", "model", "budget", "method", "metric", "selector",
                                                         "unit"]
    assert [line.split("|")[4].strip() for line in md_path.read_text().splitlines()[-3:]] == [
        "attention-drop", "–", "shortgpt"]
    assert ("`method`: the method preset the row ran (`bench list methods`: its paper, and where it deviates), with "
            "the metric and selector it sets; `–`: the grid's own metric × selector.") in report.notes(board)
    # without a preset: no method column anywhere, as before presets existed
    plain = report.leaderboard([r for r in records if r.labels.method is None])
    assert "method" not in plain and "method" not in report.display(plain)
    assert "`method`" not in report.notes(plain)


def test_stability_gate_and_figures_key_rows_by_method():
    records = _records()
    frame = stability.stability_frame(records)
    assert list(zip(frame["unit"], frame["method"], frame["runs"], strict=True)) == [
        ("block", "", 2), ("block", "shortgpt", 2), ("attention", "attention-drop", 2)]
    assert list(stability.display(frame).columns[:6]) == ["model", "calibration", "budget", "method", "metric",
                                                          "selector"]
    assert list(stability.display(frame)["method"]) == ["–", "shortgpt", "attention-drop"]
    assert "method" not in stability.stability_frame(records[:1] + records[3:4])
    board = report.leaderboard(records)
    rows = gate.baseline_rows(board, gate.row_cells(records))
    assert [(r.get("unit"), r.get("method"), r["cells"]) for r in rows] == [
        ("attention", "attention-drop", ["cell002", "cell005"]), (None, None, ["cell000", "cell003"]),
        (None, "shortgpt", ["cell001", "cell004"])]  # a row writes the unit only when it is not a block
    assert [gate.label(gate.row_key(r)) for r in rows] == [
        "m/bi/topk/2 blocks/attention/attention-drop", "m/bi/topk/2 blocks", "m/bi/topk/2 blocks/shortgpt"]
    table = gate.compare({"schema": 2, "grid": "test", "rows": rows}, board, gate.parse_fail("ppl:1%"),
                         cells=gate.row_cells(records))
    assert list(zip(table["cell"], table["status"], strict=True)) == [
        ("m/bi/topk/2 blocks/attention/attention-drop", "ok"), ("m/bi/topk/2 blocks", "ok"),
        ("m/bi/topk/2 blocks/shortgpt", "ok")]
    from bench import html_report

    runs = stability.runs_frame(records)
    curves = html_report.curves_figure(runs, html_report.curves_column(runs))
    assert curves.axes[0].get_legend_handles_labels()[1] == [
        "bi/topk", "shortgpt (bi/topk)", "attention-drop (bi/topk [attention])"]
    assert [t.get_text() for t in html_report.frequency_figure(frame).axes[0].get_yticklabels()] == [
        "bi/topk", "shortgpt (bi/topk)", "attention-drop (bi/topk [attention])"]


def test_a_method_record_keeps_its_method_and_others_write_none():
    records = _records()
    assert records[1].labels.method == "shortgpt" and records[1].to_json()["labels"]["method"] == "shortgpt"
    assert "method" not in records[0].to_json()["labels"]  # records of grids without methods are as they were


def test_a_presets_unit_is_refused_for_a_model_that_cannot_lose_a_branch(tmp_path):
    """attention-drop removes attention branches: a GPT-NeoX folder (parallel residual) is refused naming the
    method; shortgpt, whole blocks, is fine there as far as units go."""
    from transformers import GPTNeoXConfig

    folder = tmp_path / "neox"
    GPTNeoXConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  vocab_size=101).save_pretrained(folder)
    grid = {**BASE, "models": [str(folder)], "budgets": {"blocks": [2]}, "methods": ["shortgpt", "attention-drop"]}
    from algorithms.models.units import UnitError, check_model_type

    with pytest.raises(UnitError) as why:
        check_model_type("gpt_neox")
    with pytest.raises(ConfigError) as err:
        validate(parse_config(grid))
    assert str(err.value) == f"methods[1]: 'attention' for models[0] = '{folder}': {why.value}"
    assert str(why.value).startswith("cannot remove attention or MLP sub-layers from model type 'gpt_neox'")
