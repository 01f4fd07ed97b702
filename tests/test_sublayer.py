"""The ``sublayer`` unit (BlockPruner's mixed pool of 2L attention and MLP branches, ``2i`` attention and
``2i + 1`` MLP of block ``i``) in the model metrics, the objectives and the grid; the ``blockpruner``
preset. The forward-pass oracle of sub-layer removal is in tests/test_units.py."""

from __future__ import annotations

import pytest
import torch

from algorithms.methods import BLOCKPRUNER
from algorithms.model_metrics import RemovalLoss, ScoringTarget, TaylorImportance, unit_weights
from algorithms.models.nll import mean_nll
from algorithms.models.units import pruned_units_copy
from algorithms.objectives import ObjectiveFactory
from bench.config import ConfigError, parse_config
from bench.grid import expand, validate
from tests.test_removal import N_LAYERS, build, ids

BASE = {"name": "sublayer", "models": ["smollm2-135m"], "calibration": {"samples": 4, "seq_len": 128, "seeds": [0]},
        "device": "cpu"}


@pytest.fixture(scope="module")
def llama():
    return build("llama"), ids(seed=3, batch=5, length=12)


# ---------------------------------------------------------------------------------------- model metrics
def test_ppl_of_sublayers_equals_really_pruned_sublayers(llama):
    model, x = llama
    scores = RemovalLoss().score_units(ScoringTarget(model=model, input_ids=x, unit="sublayer", batch_size=5))
    dense = mean_nll(model, x, batch_size=5)[0]
    expected = [mean_nll(pruned_units_copy(model, "sublayer", [j]), x, batch_size=5)[0] - dense
                for j in range(2 * N_LAYERS)]
    assert scores.dtype == torch.float64 and scores.tolist() == expected
    # the even scores are the attention branches', the odd ones the MLPs'
    attention = RemovalLoss().score_units(ScoringTarget(model=model, input_ids=x, unit="attention", batch_size=5))
    mlp = RemovalLoss().score_units(ScoringTarget(model=model, input_ids=x, unit="mlp", batch_size=5))
    assert scores[0::2].tolist() == attention.tolist() and scores[1::2].tolist() == mlp.tolist()


def test_taylor_of_sublayers_interleaves_the_branch_groups(llama):
    model, x = llama
    groups = unit_weights(model, "sublayer")
    assert len(groups) == 2 * N_LAYERS
    assert groups[2] == unit_weights(model, "attention")[1] and groups[3] == unit_weights(model, "mlp")[1]
    scores = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=x, unit="sublayer", batch_size=5))
    attention = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=x, unit="attention", batch_size=5))
    mlp = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=x, unit="mlp", batch_size=5))
    assert scores[0::2].tolist() == attention.tolist() and scores[1::2].tolist() == mlp.tolist()


# ---------------------------------------------------------------------------------------- objectives
def test_loss_objective_on_sublayers_is_the_nll_of_the_pruned_copy(llama):
    model, x = llama
    factory = ObjectiveFactory(model=model, input_ids=x, batch_size=5, unit="sublayer")
    loss = factory.get("loss")
    for removed in ([1, 2, 5], [6, 7], [0, 11]):
        assert loss(removed) == mean_nll(pruned_units_copy(model, "sublayer", removed), x, batch_size=5)[0]
    assert factory.describe()["unit"] == "sublayer"


def test_proxy_span_of_sublayers_scores_runs_of_the_stream():
    """Sub-layers 1, 2 are consecutive steps of the stream (block 0's MLP, block 1's attention): one run,
    scored as the span from depth 1 to depth 3; attention units never form runs."""
    stream = torch.randn(2 * N_LAYERS + 1, 8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Gap:  # a span's score: the squared distance between the states entering and leaving it
        name, higher_is_important = "gap", True

        def score_span_lengths(self, states, lengths):
            return {n: ((states[n:] - states[:-n]) ** 2).sum(dim=(1, 2)) for n in lengths}

    factory = ObjectiveFactory(states=stream, metric=Gap(), higher_is_important=True, unit="sublayer")
    gap = lambda a, b: float(((stream[b] - stream[a]) ** 2).sum())  # noqa: E731
    assert factory.get("proxy_span")([1, 2, 5]) == pytest.approx(gap(1, 3) + gap(5, 6), rel=1e-12)
    assert factory.get("proxy_sum")([1, 2, 5]) == pytest.approx(gap(1, 2) + gap(2, 3) + gap(5, 6), rel=1e-12)
    blocks = ObjectiveFactory(states=stream[0::2], metric=Gap(), higher_is_important=True, unit="attention")
    assert blocks.get("proxy_span")([1, 2]) == blocks.get("proxy_sum")([1, 2])


# ---------------------------------------------------------------------------------------- grid
def test_a_sublayer_grid_and_the_blockpruner_preset_expand_and_validate():
    config = parse_config({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["sublayer"],
                           "methods": ["blockpruner"], "protect": [0, -1],
                           "budgets": {"ratios": [0.25], "blocks": [2]}})
    cells = validate(config)
    assert [(c.method, c.unit, c.metric.label(), c.selector.label(), c.budget) for c in cells] == [
        (None, "sublayer", "bi", "topk", {"ratio": 0.25}), (None, "sublayer", "bi", "topk", {"blocks": 2}),
        ("blockpruner", "sublayer", "ppl", "iterative(objective=loss)", {"ratio": 0.25}),
        ("blockpruner", "sublayer", "ppl", "iterative(objective=loss)", {"blocks": 2})]
    ratio = cells[2]
    # SmolLM2-135M: 30 blocks, 60 sub-layers; 0.25 * 60 = 15 sub-layers
    assert ratio.n_units(30) == 60 and ratio.resolve_k(30) == 15 and cells[3].resolve_k(30) == 2
    assert ratio.unit_noun == "sub-layers" and ratio.spec()["unit"] == "sublayer"
    # protect names blocks: blocks 0 and 29 keep both their branches
    assert ratio.resolve_protected(30) == {0, 29} and ratio.protected_units(30) == {0, 1, 58, 59}
    assert cells[0].resolve_k(18) == 9  # 0.25 * 36
    with pytest.raises(ConfigError, match=r"remove 57 sub-layers but the model has 60 sub-layers \(56 removable\)"):
        validate(parse_config({**BASE, "methods": ["blockpruner"], "protect": [0, -1], "budgets": {"blocks": [57]}}))
    assert validate(parse_config({**BASE, "methods": ["blockpruner"], "protect": [0, -1],
                                  "budgets": {"blocks": [56]}}))[0].resolve_k(30) == 56


def test_blockpruner_is_the_papers_method():
    assert (BLOCKPRUNER.unit, BLOCKPRUNER.metric.name, BLOCKPRUNER.selector.label()) == (
        "sublayer", "ppl", "iterative(objective=loss)")
    assert BLOCKPRUNER.citation() == "Zhong et al. 2024, arXiv 2406.10594"
    assert BLOCKPRUNER.title == "BlockPruner: Fine-grained Pruning for Large Language Models"
    assert any("budgets: params" in d for d in BLOCKPRUNER.deviations)


def test_healing_after_sublayer_removal_is_refused_by_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"^healing\[1\]: 'linear' with units: sublayer: healing after sublayer "
                                          r"removal is not supported yet"):
        validate(parse_config({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["block", "sublayer"],
                               "healing": ["none", "linear"], "budgets": {"blocks": [2]}}))
    # healing with other units next to a sublayer preset is fine
    validate(parse_config({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["mlp"],
                           "healing": ["linear"], "methods": ["blockpruner"], "budgets": {"blocks": [2]}}))
    import algorithms
    import bench.grid
    from algorithms.methods import Component, MethodPreset, check_method
    from estimators.registry import Registry

    registry = Registry("method", entry_point_group="blockbench.methods", check=check_method)
    registry.register("healed", MethodPreset(name="healed", title="t", authors="Doe 2025", arxiv="2501.00001",
                                             metric=Component("ppl"), selector=Component("topk"), unit="sublayer",
                                             healing=Component("linear")))
    monkeypatch.setattr(algorithms, "METHODS", registry)
    monkeypatch.setattr(bench.grid, "METHODS", registry)
    with pytest.raises(ConfigError, match=r"^methods\[0\]: method 'healed' expands to healing 'linear': healing "
                                          r"after sublayer removal is not supported yet"):
        validate(parse_config({**BASE, "methods": ["healed"], "budgets": {"blocks": [2]}}))


def test_expand_keeps_block_cells_apart_from_sublayer_cells():
    cells = expand(parse_config({**BASE, "metrics": ["bi"], "selectors": ["topk"], "units": ["block", "sublayer"],
                                 "budgets": {"ratios": [0.25]}}))
    assert [c.unit for c in cells] == ["block", "sublayer"]
    assert [c.resolve_k(30) for c in cells] == [8, 15] and cells[0].cell_id != cells[1].cell_id
