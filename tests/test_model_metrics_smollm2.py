"""``ppl`` and ``taylor`` through the whole pipeline on the real SmolLM2-135M: the recorded scores are
the metric's own numbers on the group's calibration windows, SLEB (``iterative`` on ``loss``) starts from
the block ``ppl`` ranks first and reuses every single-removal loss ``ppl`` computed, and a rerun reads
the scores from the cache."""

from __future__ import annotations

import pytest
import torch

from algorithms.data import calibration_batch
from algorithms.model_metrics import RemovalLoss, ScoringTarget, TaylorImportance
from bench.config import parse_config
from bench.runner import Runner

pytestmark = [pytest.mark.slow, pytest.mark.download]

GRID = {
    "name": "model-metrics",
    "models": ["smollm2-135m"],
    "metrics": ["ppl", "taylor"],
    "selectors": ["topk", {"name": "iterative", "params": {"objective": "loss"}}],
    "budgets": {"blocks": [2]},
    "calibration": {"source": "wikipedia", "samples": 2, "seq_len": 64, "seeds": [0], "batch_size": 2},
    "perplexity": {"source": "wikipedia", "seq_len": 128, "max_windows": 2},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model-metrics")
    runner = Runner(parse_config(GRID), folder)
    summary = runner.run()
    records = {(r.labels.metric, r.labels.selector.split("(")[0]): r for r in runner.store.records()}
    return runner, summary, records, folder


def test_recorded_scores_are_the_metrics_own(run):
    runner, summary, records, _ = run
    assert summary.failed == 0 and len(records) == 4
    loaded = runner.pipeline.load({"name": "smollm2-135m", "trust_remote_code": False})
    ids = calibration_batch(loaded.tokenizer, "wikipedia", samples=2, seq_len=64, seed=0)
    target = ScoringTarget(model=loaded.model, input_ids=ids, batch_size=2)
    ppl = RemovalLoss().score_units(target)
    taylor = TaylorImportance().score_units(target)
    assert records["ppl", "topk"].scores == ppl.tolist()
    assert records["taylor", "topk"].scores == pytest.approx(taylor.tolist(), rel=1e-6)
    assert records["ppl", "topk"].higher_is_important is True
    # topk removes the k blocks whose removal costs the least calibration loss
    assert records["ppl", "topk"].removed_blocks == sorted(torch.argsort(ppl)[:2].tolist())
    assert records["taylor", "topk"].removed_blocks == sorted(torch.argsort(taylor)[:2].tolist())


def test_sleb_starts_where_ppl_ranks_first_and_shares_its_losses(run):
    runner, _, records, _ = run
    ppl = torch.tensor(records["ppl", "topk"].scores)
    sleb = records["ppl", "iterative"]
    first = int(torch.argmin(ppl))
    assert first in sleb.removed_blocks
    # 30 single removals, then 29 pairs with the first: distinct sets the search asked for
    assert sleb.selector_result.evaluations == 30 + 29
    assert runner.counters["scorings"] == 2
    # one memoised loss per group: ppl computed the dense model and the 30 singles, the first search
    # the 29 pairs, and the second search (same windows, other metric) found every set computed
    assert sleb.selector_result.info["computed"] == 29
    other = records["taylor", "iterative"]
    assert other.removed_blocks == sleb.removed_blocks
    assert other.selector_result.evaluations == 59 and other.selector_result.info["computed"] == 0


def test_rerun_reads_the_scores_from_the_cache(run):
    _, _, records, folder = run
    again = Runner(parse_config(GRID), folder)
    topk = [key for key in records if key[1] == "topk"]  # one-shot cells: no search to repeat
    for key in topk:
        (again.store.records_dir / f"{records[key].cell_id}.json").unlink()
    summary = again.run()
    assert summary.ran == 2 and again.counters["scorings"] == 0
    rerun = {(r.labels.metric, r.labels.selector.split("(")[0]): r for r in again.store.records()}
    assert {k: rerun[k].scores for k in topk} == {k: records[k].scores for k in topk}
    assert all(rerun[k].cache_hits["scores"] for k in topk)


def test_an_interrupted_search_resumes_from_the_loss_journal(run):
    """Every calibration loss of the group is appended to its journal (``cache/losses``) as it is
    computed. With SLEB's record and the cached selections gone, as after a session that ended in the
    middle of its search, a new runner seeds the loss from the journal: the same set, the same path and
    evaluations, nothing computed, nothing appended."""
    import shutil

    _, _, records, folder = run
    sleb = records["ppl", "iterative"]
    journals = sorted((folder / "cache" / "losses").glob("*.jsonl"))
    assert len(journals) == 1
    before = journals[0].read_bytes()
    assert before.count(b"\n") == 1 + 30 + 29  # the dense model, the 30 singles, 29 pairs with the first
    again = Runner(parse_config(GRID), folder)
    (again.store.records_dir / f"{sleb.cell_id}.json").unlink()
    shutil.rmtree(folder / "cache" / "selections")
    summary = again.run()
    assert summary.ran == 1 and summary.failed == 0
    rerun = again.store.read_record(sleb.cell_id)
    assert rerun.removed_blocks == sleb.removed_blocks
    assert rerun.selector_result.info["path"] == sleb.selector_result.info["path"]
    assert rerun.selector_result.evaluations == 59 and rerun.selector_result.info["computed"] == 0
    assert journals[0].read_bytes() == before
