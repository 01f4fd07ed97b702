"""Units and healing through the whole pipeline on the real SmolLM2-135M: one grid of block / attention /
MLP units x no healing / linear healing at one share of parameters kept, checked against direct
computations (scores from the captured sub-layer stream, k from the parameter counts, perplexity of a
pruned copy, the parameters really kept)."""

import json
import shutil

import pytest
import torch
import yaml

from algorithms.data import calibration_batch, heldout_windows
from algorithms.evaluations.perplexity import perplexity
from algorithms.models.blocks import count_parameters
from algorithms.models.capture import capture_hidden_states
from algorithms.models.units import pruned_units_copy, unit_parameters
from bench.config import load_config
from bench.runner import Runner
from estimators import METRICS

pytestmark = [pytest.mark.slow, pytest.mark.download]

GRID = {
    "name": "units-e2e",
    "models": ["smollm2-135m"],
    "metrics": ["bi"],
    "selectors": ["topk"],
    "units": ["block", "attention", "mlp"],
    "healing": ["none", "linear"],
    "budgets": {"params": [0.9]},
    "calibration": {"source": "wikipedia", "samples": 16, "seq_len": 256, "seeds": [0]},
    "perplexity": {"source": "wikipedia", "seq_len": 256, "max_windows": 4},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def units_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    runner = Runner(load_config(grid), root / "results")
    summary = runner.run()
    loaded = runner.pipeline.load(summary.records[0].spec["model"])
    return {"summary": summary, "runner": runner, "loaded": loaded, "results": root / "results"}


def _by(records, unit, healing):
    (record,) = [r for r in records if r.labels.unit == unit and r.labels.healing == healing]
    return record


def test_every_unit_and_healing_runs_once(units_run):
    summary, runner = units_run["summary"], units_run["runner"]
    assert (summary.total, summary.ran, summary.failed) == (6, 6, 0), [r.error for r in summary.records]
    # one sub-layer capture serves all three unit kinds; block and branch scores come from one scoring each
    # of the block stream and of the sub-layer stream; each healed removal is healed once
    counters = dict(runner.counters)
    assert counters["captures"] == 1 and counters["scorings"] == 2 and counters["healings"] == 3
    assert counters["measure:perplexity"] == 1 + 6


def test_k_and_parameters_follow_the_params_budget(units_run):
    records, model = units_run["summary"].records, units_run["loaded"].model
    total = count_parameters(model)
    for unit in ("block", "attention", "mlp"):
        sizes = unit_parameters(model, unit)
        k = max(1, round(0.1 * total / (sum(sizes) / len(sizes))))
        for healing in ("none", "linear"):
            r = _by(records, unit, healing)
            assert r.k == k == len(r.removed_blocks), (unit, r.k, k)
            assert r.parameters.dense == total
            assert r.parameters.pruned == total - sum(sizes[i] for i in r.removed_blocks)
            assert r.labels.budget == "params 90%"
    # SmolLM2-135M: a block is 3.54M parameters, its attention 0.88M, its MLP 2.65M
    assert [_by(records, u, "none").k for u in ("block", "attention", "mlp")] == [4, 15, 5]


def test_branch_scores_are_the_metric_on_the_branch_ends(units_run):
    runner, loaded = units_run["runner"], units_run["loaded"]
    records = units_run["summary"].records
    ids = calibration_batch(loaded.tokenizer, "wikipedia", samples=16, seq_len=256, seed=0)
    stream, _ = capture_hidden_states(loaded.model, ids, batch_size=4, sublayers=True)
    bi = METRICS.get("bi")()
    for unit, first in (("attention", 0), ("mlp", 1)):
        want = [float(bi.pair(stream[2 * i + first], stream[2 * i + first + 1])) for i in range(30)]
        torch.testing.assert_close(torch.tensor(_by(records, unit, "none").scores, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
    blocks = _by(records, "block", "none")
    want = [float(bi.pair(stream[2 * i], stream[2 * i + 2])) for i in range(30)]
    torch.testing.assert_close(torch.tensor(blocks.scores, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    # top-k removes the k most redundant branches (lowest BI)
    for unit in ("attention", "mlp"):
        r = _by(records, unit, "none")
        order = sorted(range(30), key=lambda i: (r.scores[i], i))
        assert sorted(r.removed_blocks) == sorted(order[: r.k])
    assert runner.pipeline.config.units == ["block", "attention", "mlp"]


def test_perplexity_of_a_removed_branch_set_equals_a_pruned_copy(units_run):
    loaded, records = units_run["loaded"], units_run["summary"].records
    windows = heldout_windows(loaded.tokenizer, "wikipedia", seq_len=256, max_windows=4)
    for unit in ("attention", "mlp"):
        r = _by(records, unit, "none")
        copy = pruned_units_copy(loaded.model, unit, r.removed_blocks)
        want = perplexity(copy, windows)["ppl"]
        assert r.evaluations["perplexity"].values["ppl_pruned"] == pytest.approx(want, rel=1e-6)


def test_linear_healing_is_recorded_and_lowers_perplexity(units_run):
    records = units_run["summary"].records
    for unit in ("block", "attention", "mlp"):
        plain, healed = _by(records, unit, "none"), _by(records, unit, "linear")
        assert healed.removed_blocks == plain.removed_blocks  # healing does not change what is removed
        assert plain.healing is None
        assert healed.healing.name == "linear" and healed.healing.trained_parameters == 0
        assert healed.healing.seconds > 0 and healed.timings["healing"] == healed.healing.seconds
        assert healed.parameters == plain.parameters  # folded into existing weights: no new parameters
        before = plain.evaluations["perplexity"].values["ppl_pruned"]
        after = healed.evaluations["perplexity"].values["ppl_pruned"]
        runs = healed.healing.info["runs"]
        assert all(r["tokens"] == 16 * 256 for r in runs if "unhealed" not in r)
        if unit == "block":  # 4096 tokens are few for a 576 x 576 map: the README's table shows how it grows
            assert after < 1.25 * before, (before, after)
        else:  # a branch is far closer to linear: a large gain already
            assert after < 0.8 * before, (unit, before, after)


def test_linear_healing_with_too_few_tokens_fails_its_cells_by_name(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "units": ["mlp"], "healing": ["linear"],
                                    "calibration": {"samples": 2, "seq_len": 128, "seeds": [0]}}))
    summary = Runner(load_config(grid), tmp_path / "results").run()
    (record,) = summary.records
    assert record.status == "failed" and record.stage == "healing"
    assert "has 256 tokens: the least-squares problem is underdetermined" in record.error


def test_ray_executor_gives_the_same_units_and_healing_records(units_run, tmp_path):
    """The Ray executor keys evaluation tasks by removal (unit + healing + calibration): same records.
    The Ray run starts from the local run's caches less the healed evaluations: the capture, scores and
    unhealed perplexities are read (their keys name the unit), the healing and the healed perplexity are
    computed again in a Ray task."""
    pytest.importorskip("ray")
    local = {r.cell_id: r for r in units_run["summary"].records}
    cache = tmp_path / "ray" / "cache"
    shutil.copytree(units_run["results"] / "cache", cache, ignore=shutil.ignore_patterns("healing"))
    for path in (cache / "evaluations").rglob("*.json"):
        if "healing" in json.loads(path.read_text())["payload"]:
            path.unlink()
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "units": ["mlp"]}))  # two of the six cells: none and linear
    summary = Runner(load_config(grid), tmp_path / "ray").run(executor="ray")
    assert (summary.ran, summary.failed) == (2, 0), [r.error for r in summary.records]
    healed = _by(summary.records, "mlp", "linear")
    assert healed.cache_hits == {"hidden": True, "scores": True, "selection": True, "perplexity": False,
                                 "healing": False}
    assert _by(summary.records, "mlp", "none").cache_hits == {"hidden": True, "scores": True, "selection": True,
                                                              "perplexity": True}
    for r in summary.records:
        mine = local[r.cell_id]
        assert (r.labels.unit, r.labels.healing, r.removed_blocks) == (mine.labels.unit, mine.labels.healing,
                                                                      mine.removed_blocks)
        assert r.evaluations["perplexity"].values["ppl_pruned"] == pytest.approx(
            mine.evaluations["perplexity"].values["ppl_pruned"], rel=1e-5)
        assert (r.healing is None) == (mine.healing is None)
