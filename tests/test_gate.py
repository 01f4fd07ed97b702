"""The regression gate: tolerance grammar, comparison directions, and `bench check` catching a
deliberately worse selector on the real SmolLM2 (exit 1 naming the cell and the measure)."""

import json
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bench import gate
from bench.cli import app
from tests.conftest import SMALL_GRID

cli = CliRunner()


def test_tolerance_grammar():
    tols = gate.parse_fail("acc:1%,ppl:0.5, speedup:5%")
    assert [(t.measure, t.value, t.relative) for t in tols] == [("acc", 1.0, True), ("ppl", 0.5, False),
                                                                 ("speedup", 5.0, True)]
    assert tols[0].allowed(0.6) == pytest.approx(0.006) and tols[1].allowed(40.0) == 0.5
    for bad, message in [("acc", "NAME:VALUE"), ("acc:x%", "NAME:VALUE"), ("f1:1%", "unknown measure 'f1'"),
                         ("acc:1%,acc:2%", "given twice"), ("acc:-1%", "NAME:VALUE")]:
        with pytest.raises(gate.GateError, match=message):
            gate.parse_fail(bad)


def board(**values):
    row = {"model": "m", "metric": "bi", "selector": "topk", "budget": "25%", "seeds": 1,
           "acc_pruned": 0.60, "ppl_mean": 40.0, "prefill_speedup": 1.30, "decode_speedup": 1.25}
    return pd.DataFrame([{**row, **values}])


BASELINE = {"schema": 1, "rows": gate._rows(board())}


@pytest.mark.parametrize(("change", "measure", "status"), [
    ({}, None, "ok"),
    ({"acc_pruned": 0.595}, "acc_pruned", "ok"),  # -0.8% of 0.60: within 1%
    ({"acc_pruned": 0.59}, "acc_pruned", "regression"),  # -1.7%
    ({"acc_pruned": 0.70}, "acc_pruned", "improved"),
    ({"ppl_mean": 41.9}, "ppl_mean", "ok"),  # +4.75%
    ({"ppl_mean": 42.5}, "ppl_mean", "regression"),  # higher perplexity is worse
    ({"ppl_mean": 30.0}, "ppl_mean", "improved"),
    ({"decode_speedup": 1.15}, "decode_speedup", "regression"),  # slower is worse
    ({"prefill_speedup": 1.5}, "prefill_speedup", "improved"),
])
def test_only_the_harmful_direction_fails(change, measure, status):
    table = gate.compare(BASELINE, board(**change), gate.parse_fail("acc:1%,ppl:5%,speedup:5%"))
    assert len(table) == 4
    if measure is not None:
        assert table.set_index("measure").loc[measure, "status"] == status
        assert gate.failed(table) == (status == "regression")
    else:
        assert set(table["status"]) == {"ok"} and not gate.failed(table)


def test_missing_cells_and_values_fail_and_unmeasured_values_are_skipped():
    other = board(selector="fbs")
    table = gate.compare(BASELINE, other, gate.parse_fail("ppl:5%"))
    assert list(table["status"]) == ["missing"] and gate.failed(table)
    no_acc = board().drop(columns=["acc_pruned"])
    table = gate.compare(BASELINE, no_acc, gate.parse_fail("acc:1%"))
    assert list(table["status"]) == ["missing"]
    baseline_without_speed = {"schema": 1, "rows": gate._rows(board().drop(columns=["prefill_speedup",
                                                                                    "decode_speedup"]))}
    assert gate.compare(baseline_without_speed, board(), gate.parse_fail("speedup:5%")).empty


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
        "accuracy": {"tasks": ["piqa"], "limit": 20},
        "speed": {"prompt_lengths": [32], "decode_tokens": 4, "repeats": 2, "warmup": 1}}


@pytest.mark.slow
def test_check_passes_unchanged_and_fails_a_worse_selector(tmp_path, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    results = tmp_path / "results"
    baseline = tmp_path / "baseline.json"
    assert cli.invoke(app, ["run", "--grid", str(grid), "--results", str(results), "--quiet"]).exit_code == 0
    saved = cli.invoke(app, ["baseline", "save", "--results", str(results), "--out", str(baseline)])
    assert saved.exit_code == 0, saved.output
    stored = json.loads(baseline.read_text())
    assert stored["rows"][0]["values"].keys() >= {"acc_pruned", "ppl_mean", "prefill_speedup", "decode_speedup"}

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
    assert cli.invoke(app, ["run", "--grid", str(grid), "--results", str(results), "--quiet"]).exit_code == 0
    bad = cli.invoke(app, ["check", "--baseline", str(baseline), "--results", str(results),
                           "--fail", "acc:1%,ppl:5%,speedup:50%"])
    assert bad.exit_code == 1, bad.output
    text = " ".join(bad.output.split())
    assert "regression: smollm2-135m/bi/topk/4 blocks ppl_mean" in text, text
