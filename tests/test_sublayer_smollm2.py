"""BlockPruner (``methods: [blockpruner]``: ``ppl`` on the 60 sub-layers, ``iterative`` on the calibration
loss) end to end on the real SmolLM2-135M, with a state-metric ``sublayer`` cell next to it (``bi`` scores
the 60 steps of the sub-layer stream). Small: 2 × 64 calibration tokens, 2 sub-layers removed."""

from __future__ import annotations

import pytest
import torch

from algorithms.models.blocks import count_parameters
from algorithms.models.units import pruned_units_copy, unit_parameters
from bench.config import parse_config
from bench.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.download]

GRID = {
    "name": "blockpruner",
    "models": ["smollm2-135m"],
    "methods": ["blockpruner"],
    "metrics": ["bi"],
    "selectors": ["topk"],
    "units": ["sublayer"],
    "budgets": {"blocks": [2]},
    "calibration": {"source": "wikipedia", "samples": 2, "seq_len": 64, "seeds": [0], "batch_size": 2},
    "perplexity": {"source": "wikipedia", "seq_len": 128, "max_windows": 2},
    "device": "cpu",
}


def test_blockpruner_removes_the_sublayers_its_scores_and_loss_pick(tmp_path):
    runner = Runner(parse_config(GRID), tmp_path)
    summary = runner.run()
    assert summary.failed == 0
    records = {r.labels.method or r.labels.metric: r for r in runner.store.records()}
    bp, bi = records["blockpruner"], records["bi"]
    assert bp.labels.unit == bi.labels.unit == "sublayer"
    # one score per sub-layer (2 × 30), the removal-loss of each; the first pick is the cheapest
    assert len(bp.scores) == len(bi.scores) == 60 and bp.k == 2
    assert len(bp.removed_blocks) == 2 and all(0 <= j < 60 for j in bp.removed_blocks)
    first = int(torch.argmin(torch.tensor(bp.scores)))
    assert bp.selector_result.info["order"][0] == first and first in bp.removed_blocks
    # 60 singles (shared with ppl's scoring), then 59 pairs with the first
    assert bp.selector_result.evaluations == 60 + 59
    # bi topk: the two most redundant steps of the stream
    assert bi.removed_blocks == sorted(torch.argsort(torch.tensor(bi.scores))[:2].tolist())
    loaded = runner.pipeline.load({"name": "smollm2-135m", "trust_remote_code": False})
    sizes = unit_parameters(loaded.model, "sublayer")
    dense = count_parameters(loaded.model)
    for record in (bp, bi):
        assert record.parameters.dense == dense
        assert record.parameters.pruned == dense - sum(sizes[j] for j in record.removed_blocks)
        pruned = pruned_units_copy(loaded.model, "sublayer", record.removed_blocks)
        assert count_parameters(pruned) == record.parameters.pruned
