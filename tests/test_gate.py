"""The regression gate: tolerance grammar, comparison directions, and `bench check` catching a
deliberately worse selector on the real SmolLM2 (exit 1 naming the cell and the measure)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bench import gate, report
from bench.cli import app
from tests.conftest import SMALL_GRID, seed_cache
from tests.records_factory import make_record, units_grid

cli = CliRunner()


def test_tolerance_grammar():
    tols = gate.parse_fail("acc:1%,ppl:0.5, speedup:5%")
    assert [(t.measure, t.value, t.relative) for t in tols] == [("acc", 1.0, True), ("ppl", 0.5, False),
                                                                 ("speedup", 5.0, True)]
    assert tols[0].allowed(0.6) == pytest.approx(0.006) and tols[1].allowed(40.0) == 0.5
    # any measure or column name parses (the baseline decides what exists): a plugin's, a column key
    assert [(t.measure, t.value, t.relative) for t in gate.parse_fail("f1:1%,ppl_pruned:.5,acc:piqa:2%")] == [
        ("f1", 1.0, True), ("ppl_pruned", 0.5, False), ("acc:piqa", 2.0, True)]
    for bad, message in [("acc", "NAME:VALUE"), ("acc:x%", "NAME:VALUE"), ("acc:1%,acc:2%", "given twice"),
                         ("acc:-1%", "NAME:VALUE"), (":1%", "NAME:VALUE")]:
        with pytest.raises(gate.GateError, match=message):
            gate.parse_fail(bad)


def board(selector="topk", *, acc=0.60, ppl=40.0, prefill=1.30, decode=1.25, kl=None, top1=None):
    """A one-row leaderboard from one record of the built-in evaluations (None: not measured)."""
    values = {"ppl_pruned": ppl, "ppl_dense": 10.0}
    if acc is not None:
        values |= {"acc_pruned": acc, "acc_dense": 0.7, "acc_retained": acc / 0.7, "acc:piqa": acc}
    if prefill is not None:
        values |= {"prefill_speedup": prefill, "decode_speedup": decode}
    if kl is not None:
        values |= {"kl": kl, "top1": top1}
    record = make_record(0, removed=(1, 2), scores=[6, 1, 2, 3, 4, 5], values=values, model="m", metric="bi",
                         selector=selector, budget="25%")
    return report.leaderboard([record])


BASELINE = {"schema": 2, "rows": gate.baseline_rows(board())}


def test_baseline_rows_store_value_measure_and_direction_per_gated_column():
    assert BASELINE["rows"] == [{
        "model": "m", "metric": "bi", "selector": "topk", "budget": "25%", "seeds": 1,
        "values": {
            "acc_pruned": {"value": 0.60, "gate": "acc", "higher_is_better": True},
            "ppl_pruned": {"value": 40.0, "gate": "ppl", "higher_is_better": False},
            "prefill_speedup": {"value": 1.30, "gate": "speedup", "higher_is_better": True},
            "decode_speedup": {"value": 1.25, "gate": "speedup", "higher_is_better": True},
        },
    }]  # dense values, retained share and per-task scores have no gate: not stored


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "baseline.json"
    payload = gate.save_baseline(board(), path, grid="g", env={"host": "h"})
    stored = json.loads(path.read_text())
    assert stored == payload and stored["schema"] == 2 and stored["grid"] == "g"
    assert gate.load_baseline(path)["rows"] == BASELINE["rows"]
    assert [p.name for p in path.parent.iterdir()] == ["baseline.json"]  # no temporary file left
    with pytest.raises(gate.GateError, match="no finished cells"):
        gate.save_baseline(report.leaderboard([]), path, grid=None, env={})


@pytest.mark.parametrize(("change", "measure", "status"), [
    ({}, None, "ok"),
    ({"acc": 0.595}, "acc_pruned", "ok"),  # -0.8% of 0.60: within 1%
    ({"acc": 0.59}, "acc_pruned", "regression"),  # -1.7%
    ({"acc": 0.70}, "acc_pruned", "improved"),
    ({"acc": 0.605}, "acc_pruned", "ok"),  # +0.8%: better, but within the tolerance, so not called improved
    ({"ppl": 41.9}, "ppl_pruned", "ok"),  # +4.75%
    ({"ppl": 42.5}, "ppl_pruned", "regression"),  # higher perplexity is worse
    ({"ppl": 30.0}, "ppl_pruned", "improved"),
    ({"decode": 1.15}, "decode_speedup", "regression"),  # slower is worse
    ({"prefill": 1.5}, "prefill_speedup", "improved"),
    ({"decode": 1.30}, "decode_speedup", "ok"),  # +4% of 1.25: within 5%
])
def test_only_the_harmful_direction_fails(change, measure, status):
    table = gate.compare(BASELINE, board(**change), gate.parse_fail("acc:1%,ppl:5%,speedup:5%"))
    assert list(table["measure"]) == ["acc_pruned", "ppl_pruned", "prefill_speedup", "decode_speedup"]
    statuses = dict(zip(table["measure"], table["status"], strict=True))
    expected = {m: "ok" for m in statuses} | ({measure: status} if measure else {})
    assert statuses == expected
    assert gate.failed(table) == (status == "regression")


def test_missing_cells_and_values_fail():
    table = gate.compare(BASELINE, board(selector="fbs"), gate.parse_fail("ppl:5%"))
    assert list(table["status"]) == ["missing"] and gate.failed(table)
    table = gate.compare(BASELINE, board(acc=None), gate.parse_fail("acc:1%"))
    assert list(zip(table["measure"], table["status"], strict=True)) == [("acc_pruned", "missing")]
    assert table["current"].isna().all()


def test_a_measure_the_baseline_lacks_is_a_usage_error():
    without_speed = {"schema": 2, "rows": gate.baseline_rows(board(prefill=None))}
    with pytest.raises(gate.GateError) as info:
        gate.compare(without_speed, board(), gate.parse_fail("acc:1%,speedup:5%"))
    assert str(info.value) == ("unknown measure 'speedup'; the baseline has acc, ppl "
                               "(or one of its columns: acc_pruned, ppl_pruned)")
    # without --fail, bench check gates only the default measures the baseline has
    tols = gate.default_tolerances(without_speed)
    assert [(t.measure, str(t)) for t in tols] == [("acc", "1%"), ("ppl", "5%")]
    assert len(gate.compare(without_speed, board(), tols)) == 2


def test_per_column_tolerances_and_column_keys_win_over_their_measure():
    base = {"schema": 2, "rows": gate.baseline_rows(board(kl=0.10, top1=0.90))}
    assert {k: v["gate"] for k, v in base["rows"][0]["values"].items()} == {
        "acc_pruned": "acc", "ppl_pruned": "ppl", "kl": "kl", "top1": "top1", "prefill_speedup": "speedup",
        "decode_speedup": "speedup"}
    now = board(kl=0.115, top1=0.89, ppl=41.0)
    table = gate.compare(base, now, gate.parse_fail("kl:0.01,top1:2%"))
    # KL: lower is better, +0.015 is past 0.01; top-1 agreement: -1.1% is within 2%
    assert list(zip(table["measure"], table["status"], strict=True)) == [("kl", "regression"), ("top1", "ok")]
    assert table.set_index("measure").loc["kl", "allowed"] == 0.01
    # ppl_pruned's own tolerance (1%) wins over ppl's (50%): +2.5% fails
    table = gate.compare(base, now, gate.parse_fail("ppl:50%,ppl_pruned:1%"))
    checked = list(zip(table["measure"], table["tolerance"], table["status"], strict=True))
    assert checked == [("ppl_pruned", "1%", "regression")]
    # one speedup column alone
    table = gate.compare(base, board(decode=1.0, kl=0.1, top1=0.9), gate.parse_fail("decode_speedup:5%"))
    assert list(zip(table["measure"], table["status"], strict=True)) == [("decode_speedup", "regression")]


def test_schema_1_baseline_is_read_and_compared():
    # the CI baseline as blockbench 0.1.0 wrote it (results/baselines/ci.json until 0.2.0), kept as test data
    stored = gate.load_baseline(Path(__file__).parent / "data" / "baseline-schema1.json")
    assert stored["schema"] == 2 and len(stored["rows"]) == 4
    row = stored["rows"][0]
    assert (row["model"], row["metric"], row["selector"], row["budget"]) == ("smollm2-135m", "angular", "topk",
                                                                          "4 blocks")
    assert row["values"] == {
        "acc_pruned": {"value": 0.74, "gate": "acc", "higher_is_better": True},
        "decode_speedup": {"value": 1.1311107561676244, "gate": "speedup", "higher_is_better": True},
        "ppl_pruned": {"value": 42.00141595141644, "gate": "ppl", "higher_is_better": False},
        "prefill_speedup": {"value": 1.1244359689179766, "gate": "speedup", "higher_is_better": True},
    }
    assert gate.measures(stored) == (["acc", "ppl", "speedup"],
                                     ["acc_pruned", "decode_speedup", "ppl_pruned", "prefill_speedup"])

    def current(ppl):
        values = {"ppl_pruned": ppl, "ppl_dense": 20.0, "acc_pruned": 0.74, "acc_dense": 0.8,
                  "acc_retained": 0.74 / 0.8, "acc:piqa": 0.74, "prefill_speedup": 1.1244359689179766,
                  "decode_speedup": 1.1311107561676244}
        return report.leaderboard([make_record(0, removed=(3, 4, 5, 6), values=values, model="smollm2-135m",
                                               metric="angular", selector="topk", budget="4 blocks", n_blocks=30)])

    tols = gate.parse_fail("acc:1%,ppl:5%,speedup:5%")
    table = gate.compare(stored, current(42.00141595141644), tols)
    angular = table[table["cell"] == "smollm2-135m/angular/topk/4 blocks"]
    assert list(zip(angular["measure"], angular["status"], strict=True)) == [
        ("acc_pruned", "ok"), ("ppl_pruned", "ok"), ("decode_speedup", "ok"), ("prefill_speedup", "ok")]
    assert set(table[table["cell"] != "smollm2-135m/angular/topk/4 blocks"]["status"]) == {"missing"}
    worse = gate.compare(stored, current(45.0), gate.parse_fail("ppl:5%"))  # +7.1%: perplexity up is worse
    assert worse.iloc[0][["cell", "measure", "status"]].tolist() == [
        "smollm2-135m/angular/topk/4 blocks", "ppl_pruned", "regression"]
    with pytest.raises(gate.GateError, match=r"^unknown measure 'kl'; the baseline has acc, ppl, speedup "):
        gate.compare(stored, current(42.0), gate.parse_fail("kl:0.01"))


ROW = {"model": "m", "metric": "bi", "selector": "topk", "budget": "1",
       "values": {"ppl_pruned": {"value": 40.0, "gate": "ppl", "higher_is_better": False}}}


@pytest.mark.parametrize(("payload", "message"), [
    ({"schema": 3, "rows": []}, " is not a blockbench baseline (schema 1 or 2)"),
    ({"schema": 2, "rows": []}, " has no rows: nothing to compare with"),
    ({"schema": 1, "rows": []}, " has no rows: nothing to compare with"),
    ({"schema": 1, "rows": [{"model": "m", "metric": "bi", "selector": "topk", "budget": "1",
                             "values": {"kl": 0.1}}]}, ": rows[0].values.kl: not a schema-1 baseline value"),
    ({"schema": 1, "rows": [{**ROW, "values": {"ppl_mean": "40"}}]},
     ": rows[0].values.ppl_mean: not a schema-1 baseline value"),
    ({"schema": 2, "rows": [{"model": "m", "metric": "bi", "selector": "topk", "budget": "1",
                             "values": {"kl": 0.1}}]},
     ": rows[0].values.kl: expected {value, gate, higher_is_better}"),
    ({"schema": 2, "rows": [{"model": "m", "values": {}}]}, ": rows[0].metric: missing"),
    ({"schema": 2, "rows": [ROW, 3]}, ": rows[1]: expected a mapping (model, metric, selector, budget, values), got int"),
    ({"schema": 2, "rows": [{**ROW, "budget": 4}]}, ": rows[0].budget: expected a non-empty string, got 4"),
    ({"schema": 2, "rows": [{k: v for k, v in ROW.items() if k != "values"}]}, ": rows[0].values: missing"),
    ({"schema": 2, "rows": [{**ROW, "values": [1.0]}]}, ": rows[0].values: expected a mapping, got list"),
    ({"schema": 2, "rows": [{**ROW, "values": {}}]}, ": rows[0].values: empty (nothing to compare)"),
    ({"schema": 2, "rows": [{**ROW, "values": {"kl": {"gate": "kl", "higher_is_better": False}}}]},
     ": rows[0].values.kl.value: expected a finite number, got None"),
    ({"schema": 2, "rows": [{**ROW, "values": {"kl": {"value": "0.1", "gate": "kl", "higher_is_better": False}}}]},
     ": rows[0].values.kl.value: expected a finite number, got '0.1'"),
    ({"schema": 2, "rows": [{**ROW, "values": {"kl": {"value": float("nan"), "gate": "kl",
                                                      "higher_is_better": False}}}]},
     ": rows[0].values.kl.value: expected a finite number, got nan"),
    ({"schema": 2, "rows": [{**ROW, "values": {"kl": {"value": 0.1, "gate": "kl", "higher_is_better": 0}}}]},
     ": rows[0].values.kl.higher_is_better: expected true or false, got 0"),
    ({"schema": 2, "rows": [ROW, ROW]}, ": rows[1]: m/bi/topk/1 again (also rows[0])"),
    ({"schema": 2, "rows": [{**ROW, "seeds": 0}]}, ": rows[0].seeds: expected a positive integer, got 0"),
    ({"schema": 2, "rows": [{**ROW, "cells": ["a"]}, {**ROW, "budget": "2"}]},
     ": rows[1].cells: missing (rows[0] has cell ids): every row records its cells or none does"),
    ({"schema": 2, "rows": [{**ROW, "cells": []}]}, ": rows[0].cells: expected a list of distinct cell ids, got []"),
    ({"schema": 2, "grid": 3, "rows": [ROW]}, ": grid: expected a grid name or null, got 3"),
])
def test_malformed_baselines_are_refused(tmp_path, payload, message):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(gate.GateError) as info:
        gate.load_baseline(path)
    assert str(info.value).startswith(f"baseline {str(path)!r}{message}")


def test_nothing_compared_is_an_error():
    only_kl = {"schema": 2, "rows": [{**ROW, "values": {"kl": {"value": 0.1, "gate": "kl", "higher_is_better": False}}}]}
    assert gate.default_tolerances(only_kl) == []  # none of acc, ppl, speedup
    with pytest.raises(gate.GateError, match=r"^nothing to compare: no tolerance given for the baseline's measures "
                                             r"\(kl\); name them with --fail \(e\.g\. --fail kl:1%\)$"):
        gate.compare(only_kl, board(kl=0.1, top1=0.9), [])


def test_rows_keep_their_cells_and_other_cells_are_not_comparable():
    records = [make_record(i, removed=(1, 2), values={"ppl_pruned": 40.0, "ppl_dense": 10.0}, seed=i,
                           budget="25%") for i in range(2)]
    cells = gate.row_cells(records)
    assert cells == {("m", "bi", "topk", "25%"): ["cell000", "cell001"]}
    stored = {"schema": 2, "grid": "g", "rows": gate.baseline_rows(report.leaderboard(records), cells)}
    assert stored["rows"][0]["cells"] == ["cell000", "cell001"] and stored["rows"][0]["seeds"] == 2
    tols = gate.parse_fail("ppl:5%")
    assert list(gate.compare(stored, report.leaderboard(records), tols, cells=cells)["status"]) == ["ok"]
    # one seed's cell failed: the row is incomplete (a failure), whatever its number
    table = gate.compare(stored, report.leaderboard(records[:1]), tols, cells=gate.row_cells(records[:1]))
    assert list(table["status"]) == ["incomplete"] and gate.failed(table)
    # a cell the baseline row was not computed from (other parameters, versions, device): not comparable
    other = records[:1] + [make_record(7, removed=(1, 2), values={"ppl_pruned": 40.0, "ppl_dense": 10.0}, seed=1,
                                       budget="25%")]
    with pytest.raises(gate.GateError) as info:
        gate.compare(stored, report.leaderboard(other), tols, cells=gate.row_cells(other))
    assert str(info.value) == ("baseline row m/bi/topk/25% was computed from other cells: rerun `bench baseline save` "
                               "(now also from cell007, which the baseline row was not)")
    # without cell ids to compare (the caller gave none) the numbers alone are compared
    assert list(gate.compare(stored, report.leaderboard(other), tols)["status"]) == ["ok"]


def test_identity_checks_the_grid_name_and_its_cells():
    key = ("m", "bi", "topk", "25%")
    stored = {"schema": 2, "grid": "g", "rows": [{**BASELINE["rows"][0], "cells": ["a", "b"]}]}
    assert gate.identity(stored, grid="g", cells={key: ["b", "a"]}) == []
    assert gate.identity(stored) == []  # nothing to check it against
    with pytest.raises(gate.GateError, match=r"^baseline is of grid 'g', not 'h': check against that grid's "):
        gate.identity(stored, grid="h", cells={key: ["a", "b"]})
    with pytest.raises(gate.GateError) as info:
        gate.identity(stored, grid="g", cells={key: ["a", "c"]})
    assert str(info.value) == ("baseline row m/bi/topk/25% was computed from other cells: rerun `bench baseline save` "
                               "(grid 'g' has c that the baseline lacks; the baseline has b that the grid lacks)")
    with pytest.raises(gate.GateError, match=r"^baseline row m/bi/topk/25% is not a row of grid 'g': rerun "):
        gate.identity(stored, grid="g", cells={("m", "bi", "fbs", "25%"): ["a", "b"]})
    with pytest.raises(gate.GateError, match=r"^grid 'g' has rows the baseline lacks \(m/bi/fbs/25%\): rerun "):
        gate.identity(stored, grid="g", cells={key: ["a", "b"], ("m", "bi", "fbs", "25%"): ["c"]})
    # no grid name: a warning; no cell ids (schema 1, or schema 2 as first written): only the name is checked
    assert gate.identity({**stored, "grid": None}, grid="g", cells={key: ["a", "b"]}) == [
        "baseline names no grid: not checked against grid 'g'"]
    old = {"schema": 2, "grid": "g", "rows": BASELINE["rows"]}
    [warning] = gate.identity(old, grid="g", cells={key: ["x"]})
    assert warning.startswith("baseline records no cell ids (schema 1, or saved before they were recorded)")
    with pytest.raises(gate.GateError, match=r"^baseline is of grid 'g', not 'h'"):
        gate.identity(old, grid="h")


def test_save_refuses_a_folder_and_an_unfinished_grid(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(gate.GateError, match=r"^baseline '.*/out' is a folder: give a file path"):
        gate.save_baseline(board(), folder, grid=None, env={})
    target = tmp_path / "b.json"
    cells = {("m", "bi", "topk", "25%"): ["cell000"]}
    with pytest.raises(gate.GateError, match=r"^1 cell\(s\) of grid 'g' have no finished record \(cell001\)"):
        gate.save_baseline(board(), target, grid="g", env={}, cells=cells,
                           expected={("m", "bi", "topk", "25%"): ["cell000", "cell001"]})
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(gate.GateError, match=r"^cannot write baseline '.*/file/b.json': "):
        gate.save_baseline(board(), blocked / "b.json", grid=None, env={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"] and not any(folder.iterdir())


def test_bad_baseline_and_bad_tolerance_are_usage_errors(tmp_path):
    (tmp_path / "records").mkdir()
    missing = cli.invoke(app, ["check", "--baseline", str(tmp_path / "none.json"), "--results", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"rows": 3}))
    result = cli.invoke(app, ["check", "--baseline", str(junk), "--results", str(tmp_path)])
    assert result.exit_code == 2 and "not a blockbench baseline" in result.output
    result = cli.invoke(app, ["check", "--baseline", str(junk), "--results", str(tmp_path), "--fail", "acc:one"])
    assert result.exit_code == 2 and "'acc:one'" in result.output


GRID = {**SMALL_GRID, "name": "gate", "metrics": ["bi"], "selectors": ["topk"],
        "calibration": {**SMALL_GRID["calibration"], "seeds": [0]},
        "accuracy": {"tasks": ["piqa"], "limit": 8},
        "speed": {"prompt_lengths": [32], "decode_tokens": 4, "repeats": 2, "warmup": 1}}


@pytest.mark.slow
@pytest.mark.download
def test_check_passes_unchanged_and_fails_a_worse_selector(tmp_path, monkeypatch, small_grid_run):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    results = tmp_path / "results"
    seed_cache(results, small_grid_run)  # capture, scores and perplexities of top-k's set: SMALL_GRID's
    baseline = tmp_path / "baseline.json"
    assert cli.invoke(app, ["run", "--grid", str(grid), "--results", str(results), "--quiet"]).exit_code == 0
    saved = cli.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(baseline)])
    assert saved.exit_code == 0, saved.output
    stored = json.loads(baseline.read_text())
    assert stored["rows"][0]["values"].keys() >= {"acc_pruned", "ppl_pruned", "prefill_speedup", "decode_speedup"}

    # run again from scratch records (the caches stay): nothing moved, the gate passes
    shutil.rmtree(results / "records")
    assert cli.invoke(app, ["run", "--grid", str(grid), "--results", str(results), "--quiet"]).exit_code == 0
    ok = cli.invoke(app, ["check", "--baseline", str(baseline), "--results", str(results),
                          "--fail", "acc:1%,ppl:1%,speedup:50%"])
    assert ok.exit_code == 0, ok.output
    assert "all 4 checks passed" in ok.output

    # a deliberate regression: top-k now removes the most *important* blocks
    from algorithms import selectors

    def worst(self, problem):
        red = problem.redundancy.tolist()
        return selectors.SelectionResult(blocks=sorted(problem.candidates, key=lambda i: red[i])[: problem.k])

    monkeypatch.setattr(selectors.TopK, "select", worst)
    shutil.rmtree(results / "records")
    # changed code under the same selector version: its cached selections would be served (as cached
    # scores are for a metric), so a real change bumps the version; here the cache goes instead
    shutil.rmtree(results / "cache" / "selections")
    assert cli.invoke(app, ["run", "--grid", str(grid), "--results", str(results), "--quiet"]).exit_code == 0
    bad = cli.invoke(app, ["check", "--baseline", str(baseline), "--results", str(results),
                           "--fail", "acc:1%,ppl:5%,speedup:50%"])
    assert bad.exit_code == 1, bad.output
    text = " ".join(bad.output.split())
    assert "regression: smollm2-135m/bi/topk/4 blocks ppl_pruned" in text, text


def test_the_committed_ci_baseline_gates_kl_and_top1():
    """results/baselines/ci.json (what CI's gate compares with) holds every gated column of configs/ci.yaml,
    with the direction its evaluation declares."""
    stored = gate.load_baseline(Path(__file__).resolve().parent.parent / "results" / "baselines" / "ci.json")
    assert stored["schema"] == 2 and stored["grid"] == "ci" and len(stored["rows"]) == 4
    assert gate.measures(stored) == (["acc", "kl", "ppl", "speedup", "top1"],
                                     ["acc_pruned", "decode_speedup", "kl", "ppl_pruned", "prefill_speedup", "top1"])
    directions = {key: v["higher_is_better"] for key, v in stored["rows"][0]["values"].items()}
    assert directions == {"acc_pruned": True, "decode_speedup": True, "kl": False, "ppl_pruned": False,
                          "prefill_speedup": True, "top1": True}
    # each row keeps the ids of the cells it was computed from: exactly configs/ci.yaml's cells, one per row
    from bench.config import load_config
    from bench.grid import expand

    cells = {}
    for cell in expand(load_config(Path(__file__).resolve().parent.parent / "configs" / "ci.yaml")):
        key = (cell.model["name"], cell.metric.label(), cell.selector.label(), cell.budget_label)
        cells.setdefault(key, []).append(cell.cell_id)
    assert all(len(row["cells"]) == 1 for row in stored["rows"])
    assert gate.identity(stored, grid="ci", cells=cells) == []
    with pytest.raises(gate.GateError, match=r"^baseline is of grid 'ci', not 'quick'"):
        gate.identity(stored, grid="quick")


# ------------------------------------------------------------------ the commands, on records of a real grid
CELL_GRID = {**SMALL_GRID, "name": "gate", "metrics": ["bi"], "device": "cpu"}  # 2 seeds: 2 cells, 1 row
ROW_LABEL = "smollm2-135m/bi/topk/4 blocks"


def grid_file(folder: Path, **change) -> Path:
    path = folder / f"{change.get('name', CELL_GRID['name'])}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**CELL_GRID, **change}))
    return path


def write_records(results: Path, grid: Path, ppl: float = 40.0, *, seeds=(0, 1)) -> list[str]:
    """Records of ``grid``'s cells (their real ids), as `bench run` would leave them."""
    from bench.config import load_config
    from bench.grid import expand
    from bench.store import ResultStore

    store = ResultStore(results)
    ids = []
    for i, cell in enumerate(expand(load_config(grid))):
        seed = cell.calibration["seed"]
        if seed not in seeds:
            continue
        record = make_record(i, removed=(3, 4, 5, 6), values={"ppl_pruned": ppl, "ppl_dense": 20.0},
                             model="smollm2-135m", metric="bi", selector="topk", budget="4 blocks", seed=seed,
                             samples=4, seq_len=128, n_blocks=30)
        store.write_record(record.model_copy(update={"cell_id": cell.cell_id}))
        ids.append(cell.cell_id)
    return ids


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A results folder of the grid's two cells and a baseline saved from it with --grid. The grid's check
    that its data sources hold enough text (seconds of tokenizing per command) is left out."""
    from bench import grid as grid_module

    monkeypatch.setattr(grid_module, "_check_text_length", lambda *args, **kwargs: None)
    grid = grid_file(tmp_path)
    results = tmp_path / "results"
    ids = write_records(results, grid)
    baseline = tmp_path / "baseline.json"
    result = cli.invoke(app, ["baseline", "save", "--grid", str(grid), "--results", str(results),
                              "--out", str(baseline)])
    assert result.exit_code == 0, result.output
    return {"grid": grid, "results": results, "baseline": baseline, "ids": ids, "root": tmp_path}


def check(saved, *args) -> tuple[int, str, list[str]]:
    before = tree(saved["root"])
    result = cli.invoke(app, ["check", "--baseline", str(saved["baseline"]), "--results", str(saved["results"]),
                              *args])
    assert tree(saved["root"]) == before  # bench check writes nothing
    return result.exit_code, result.output, before


def test_save_records_grid_name_and_cells_and_check_passes(saved):
    stored = json.loads(saved["baseline"].read_text())
    assert stored["schema"] == 2 and stored["grid"] == "gate"
    assert [(r["seeds"], r["cells"]) for r in stored["rows"]] == [(2, sorted(saved["ids"]))]
    for args in ([], ["--grid", str(saved["grid"])]):
        code, output, _ = check(saved, *args)
        assert code == 0 and "all 1 checks passed" in output, output
        assert "warning" not in output


def test_check_on_another_grid_or_other_cells_is_a_usage_error(saved):
    renamed = grid_file(saved["root"], name="other")  # the same cells under another name
    code, output, _ = check(saved, "--grid", str(renamed))
    assert code == 2 and output.startswith(f"error: baseline {str(saved['baseline'])!r} is of grid 'gate', not "
                                           "'other': "), output
    # the grid now measures perplexity differently: other cell ids, and records of them
    changed = grid_file(saved["root"], perplexity={**CELL_GRID["perplexity"], "max_windows": 8})
    write_records(saved["results"], changed)
    code, output, _ = check(saved, "--grid", str(changed))
    assert code == 2 and output.startswith(f"error: baseline row {ROW_LABEL} was computed from other cells: rerun "
                                           "`bench baseline save` (grid 'gate' has "), output
    # without --grid the row now mixes the new cells with the old ones: not comparable either
    code, output, _ = check(saved)
    assert code == 2 and output.startswith(f"error: baseline row {ROW_LABEL} was computed from other cells: rerun "
                                           "`bench baseline save` (now also from "), output


def test_check_of_an_unfinished_row_fails(saved):
    (saved["results"] / "records" / f"{saved['ids'][1]}.json").unlink()  # seed 1's cell did not finish
    code, output, _ = check(saved, "--grid", str(saved["grid"]))
    assert code == 1 and "1 of 1 checks failed" in output, output
    assert f"incomplete: {ROW_LABEL} ppl_pruned" in " ".join(output.split())


def test_check_of_an_old_baseline_warns_that_cells_are_not_checked(saved):
    stored = json.loads(saved["baseline"].read_text())
    for row in stored["rows"]:
        del row["cells"]
    saved["baseline"].write_text(json.dumps(stored))
    code, output, _ = check(saved, "--grid", str(saved["grid"]))
    assert code == 0 and "all 1 checks passed" in output, output
    assert f"warning: baseline {str(saved['baseline'])!r} records no cell ids" in output


@pytest.mark.parametrize(("rows", "message"), [
    ([], " has no rows: nothing to compare with"),
    ([3], ": rows[0]: expected a mapping"),
    ([{**ROW, "values": "x"}], ": rows[0].values: expected a mapping, got str"),
    ([{**ROW, "values": {"ppl_pruned": {"gate": "ppl", "higher_is_better": False}}}],
     ": rows[0].values.ppl_pruned.value: expected a finite number, got None"),
    ([{k: v for k, v in ROW.items() if k != "selector"}], ": rows[0].selector: missing"),
])
def test_check_of_an_empty_or_malformed_baseline_is_a_usage_error(saved, rows, message):
    saved["baseline"].write_text(json.dumps({"schema": 2, "grid": "gate", "rows": rows}))
    code, output, _ = check(saved)
    assert code == 2 and output.startswith(f"error: baseline {str(saved['baseline'])!r}{message}"), output
    assert "passed" not in output


def test_check_comparing_nothing_or_an_absent_measure_is_a_usage_error(saved):
    code, output, _ = check(saved, "--fail", "acc:1%")  # the grid measures no accuracy
    assert code == 2 and output.startswith("error: unknown measure 'acc'; the baseline has ppl "), output
    stored = json.loads(saved["baseline"].read_text())
    stored["rows"][0]["values"] = {"kl": {"value": 0.1, "gate": "kl", "higher_is_better": False}}
    saved["baseline"].write_text(json.dumps(stored))
    code, output, _ = check(saved)  # the default tolerances (acc, ppl, speedup) apply to none of its values
    assert code == 2 and output.startswith("error: nothing to compare: no tolerance given for the baseline's "
                                           "measures (kl); name them with --fail"), output
    assert "passed" not in output


def test_save_refuses_a_folder_an_unfinished_grid_and_an_empty_board(saved):
    folder = saved["root"] / "taken"
    folder.mkdir()
    before = tree(saved["root"])
    result = cli.invoke(app, ["baseline", "save", "--results", str(saved["results"]), "--out", str(folder)])
    assert result.exit_code == 2 and result.output.startswith(f"error: --out {str(folder)!r} is a folder: give a "
                                                              "file path"), result.output
    assert tree(saved["root"]) == before  # no folder.tmp, nothing in it
    (saved["results"] / "records" / f"{saved['ids'][1]}.json").unlink()
    before = tree(saved["root"])
    out = saved["root"] / "new.json"
    result = cli.invoke(app, ["baseline", "save", "--grid", str(saved["grid"]), "--results", str(saved["results"]),
                              "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith(
        f"error: 1 cell(s) of grid 'gate' have no finished record ({saved['ids'][1]}): finish them with 'bench run' "
        "before saving a baseline; nothing written"), result.output
    (saved["results"] / "records" / f"{saved['ids'][0]}.json").unlink()
    result = cli.invoke(app, ["baseline", "save", "--results", str(saved["results"]), "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith(
        "error: no finished cells to save as a baseline; nothing written"), result.output
    assert tree(saved["root"]) == [p for p in before if p != f"results/records/{saved['ids'][0]}.json"]


# ---------------------------------------------------------------------------------------- units and healing
UNIT_ROWS = [("attention", "linear"), ("attention", "none"), ("block", "linear"), ("block", "none")]


def test_a_units_baseline_round_trips_and_catches_a_regression_in_one_row(tmp_path):
    records = units_grid()
    cells = gate.row_cells(records)
    assert cells == {
        ("m", "bi", "topk", "params 90%"): ["cell000", "cell001", "cell002"],
        ("m", "bi", "topk", "params 90%", "block", "linear"): ["cell003", "cell004", "cell005"],
        ("m", "bi", "topk", "params 90%", "attention", "none"): ["cell006", "cell007", "cell008"],
        ("m", "bi", "topk", "params 90%", "attention", "linear"): ["cell009", "cell010", "cell011"]}
    saved = gate.save_baseline(report.leaderboard(records), tmp_path / "b.json", grid="units", env={}, cells=cells,
                               expected=cells)
    # unit and healing are written only where they are not the defaults
    assert [(r.get("unit"), r.get("healing"), r["cells"][0]) for r in saved["rows"]] == [
        ("attention", "linear", "cell009"), ("attention", None, "cell006"), (None, "linear", "cell003"),
        (None, None, "cell000")]
    assert [sorted(r) for r in saved["rows"]][3] == ["budget", "cells", "metric", "model", "seeds", "selector",
                                                     "values"]
    stored = gate.load_baseline(tmp_path / "b.json")
    assert stored["rows"] == saved["rows"]
    assert gate.identity(stored, grid="units", cells=cells) == []
    tols = gate.parse_fail("acc:1%")
    same = gate.compare(stored, report.leaderboard(records), tols, cells=cells)
    assert list(same["cell"]) == ["m/bi/topk/params 90%/attention/linear", "m/bi/topk/params 90%/attention",
                                  "m/bi/topk/params 90%/linear", "m/bi/topk/params 90%"]
    assert list(same["status"]) == ["ok"] * 4 and not gate.failed(same)
    # the attention rows healed worse: only that row regresses (the others, ranked with it, are unchanged)
    worse = units_grid(shift={("attention", "linear"): -0.125})
    table = gate.compare(stored, report.leaderboard(worse), tols, cells=gate.row_cells(worse))
    assert list(zip(table["cell"], table["status"], strict=True)) == [
        ("m/bi/topk/params 90%/attention/linear", "regression"), ("m/bi/topk/params 90%/attention", "ok"),
        ("m/bi/topk/params 90%/linear", "ok"), ("m/bi/topk/params 90%", "ok")]
    assert table.loc[0, "change"] == -0.125 and gate.failed(table)
    # a row of the units grid the baseline lacks is another grid's row
    with pytest.raises(gate.GateError, match=r"^grid 'units' has rows the baseline lacks "
                                             r"\(m/bi/topk/params 90%/attention/linear\): rerun "):
        gate.identity({**stored, "rows": stored["rows"][1:]}, grid="units", cells=cells)


def test_an_old_baseline_without_unit_and_healing_matches_the_default_rows():
    records = units_grid()
    default = report.leaderboard(records[:3])
    old = {"schema": 2, "grid": "units", "rows": gate.baseline_rows(default, gate.row_cells(records[:3]))}
    assert not {"unit", "healing"} & set(old["rows"][0])
    # the same rows a default-only board always gave: the key and label texts unchanged
    assert gate.row_key(old["rows"][0]) == ("m", "bi", "topk", "params 90%")
    assert gate.label(gate.row_key(old["rows"][0])) == "m/bi/topk/params 90%"
    # against the board of the units grid it finds its row (block, none), not one of the others
    table = gate.compare(old, report.leaderboard(records), gate.parse_fail("acc:1%,ppl:1%"),
                         cells=gate.row_cells(records))
    assert list(zip(table["cell"], table["measure"], table["status"], table["current"], strict=True)) == [
        ("m/bi/topk/params 90%", "acc_pruned", "ok", 0.28125), ("m/bi/topk/params 90%", "ppl_pruned", "ok", 37.1875)]
    # default values written out explicitly are the same row; an empty unit is refused by index and field
    explicit = {**old, "rows": [{**old["rows"][0], "unit": "block", "healing": "none"}]}
    assert list(gate.compare(explicit, default, gate.parse_fail("acc:1%"))["status"]) == ["ok"]
    with pytest.raises(gate.GateError, match=r"^baseline: rows\[0\]\.unit: expected a non-empty string, got ''$"):
        gate.upgrade({**old, "rows": [{**old["rows"][0], "unit": ""}]})


def test_grid_cells_key_units_and_healing_as_the_records_do():
    from bench.config import ComponentSpec
    from bench.grid import Cell

    def cell(unit="block", healing="none"):
        return Cell(grid="g", model={"name": "m"}, calibration={"source": "wikipedia", "samples": 8, "seq_len": 64,
                                                                "seed": 0},
                    metric=ComponentSpec(name="bi"), selector=ComponentSpec(name="topk"), budget={"blocks": 2},
                    protect=(), evaluations=(), dtype="float32", device="cpu", unit=unit,
                    healing=ComponentSpec(name=healing))

    cells = [cell(), cell("attention"), cell("mlp", "linear")]
    # the healing's identity as the registry would resolve it (only its label keys the row here)
    cells[2].__dict__["healing_identity"] = {"name": "linear", "version": "1", "params": {}}
    assert gate.grid_cells(cells) == {
        ("m", "bi", "topk", "2 blocks"): [cells[0].cell_id],
        ("m", "bi", "topk", "2 units", "attention", "none"): [cells[1].cell_id],
        ("m", "bi", "topk", "2 units", "mlp", "linear"): [cells[2].cell_id]}
