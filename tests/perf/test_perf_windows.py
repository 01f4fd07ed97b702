"""How many held-out windows a leaderboard's perplexity needs: SmolLM2-135M's distinct pruned sets of the
committed leaderboards (``results/examples/selectors.md`` and ``generative.md``) scored on the first 16
and on all 64 windows of 512 tokens (the perplexity protocol of ``configs/full.yaml``; the first 16
windows are a prefix of the 64), with the numbers compared: the rank correlation, the share of set pairs
ordered alike, and the largest relative change of a perplexity.

``configs/full.yaml`` measures every distinct set's perplexity, most of the grid's wall time; this is the
evidence for how many windows it keeps. Run: ``BLOCKBENCH_PERF=1 pytest tests/perf/test_perf_windows.py
--benchmark-only -s``."""

from __future__ import annotations

import itertools

import pytest

from tests.perf.conftest import NOTES, leaderboard_sets

pytestmark = [pytest.mark.slow, pytest.mark.download]


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def test_sixteen_windows_rank_the_sets_as_sixty_four_do(benchmark):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algorithms.evaluations.base import EvalTarget
    from algorithms.evaluations.perplexity import Perplexity
    from algorithms.models import zoo
    from algorithms.models.masking import skip_blocks

    path = zoo.resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sets = sorted(leaderboard_sets("selectors.md") | leaderboard_sets("generative.md"))
    assert len(sets) >= 12 and () not in sets
    ppl: dict[int, list[float]] = {}

    def measure() -> None:
        for windows in (16, 64):
            evaluation = Perplexity({"seq_len": 512, "max_windows": windows})
            reference = evaluation.reference(model, tokenizer)
            ppl[windows] = [evaluation.measure(EvalTarget(model, tokenizer, removed, 30, skip_blocks,
                                                          reference=reference))["ppl"] for removed in sets]

    benchmark.pedantic(measure, rounds=1, iterations=1)
    few, many = ppl[16], ppl[64]
    n = len(sets)
    r_few, r_many = _ranks(few), _ranks(many)
    spearman = 1 - 6 * sum((a - b) ** 2 for a, b in zip(r_few, r_many, strict=True)) / (n * (n * n - 1))
    pairs = list(itertools.combinations(range(n), 2))
    alike = sum((few[i] < few[j]) == (many[i] < many[j]) for i, j in pairs)
    # pairs whose 64-window perplexities differ by more than 5%: the differences a leaderboard reports
    clear = [(i, j) for i, j in pairs if max(many[i], many[j]) / min(many[i], many[j]) > 1.05]
    clear_alike = sum((few[i] < few[j]) == (many[i] < many[j]) for i, j in clear)
    change = max(abs(a / b - 1) for a, b in zip(few, many, strict=True))
    NOTES.append(f"windows: {n} sets, 16 vs 64 windows of 512 tokens: Spearman {spearman:.3f}, pairs ordered "
                 f"alike {alike}/{len(pairs)}, of pairs more than 5% apart {clear_alike}/{len(clear)}; largest "
                 f"relative change of a perplexity {change:.1%}")
    for removed, a, b in zip(sets, few, many, strict=True):
        NOTES.append(f"  {removed}: 16 windows {a:.2f}, 64 windows {b:.2f}")
    assert clear_alike == len(clear), "16 windows reorder sets whose perplexities differ by more than 5%"
