"""Shared dense prefix (issue 19, item 4): perplexity of the selectors grid's distinct block sets on
SmolLM2-135M, each set evaluated on its own (``prefix_memory_mb: 0``) against one dense pass whose
states every set starts from (the default), side by side in one run, with the same numbers asserted.

The block sets are the "typical removed" column of the committed leaderboard
``results/examples/selectors.md`` (``configs/selectors.yaml``: every selector × k = 2..4); the
perplexity protocol is that grid's (8 held-out windows of 512 tokens, batches of 4). Both rounds pay
for the dense model too: ``0`` measures it as one more set, the default in its recording pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.perf.conftest import NOTES, TIMINGS, record

pytestmark = [pytest.mark.slow, pytest.mark.download]

LEADERBOARD = Path(__file__).resolve().parents[2] / "results" / "examples" / "selectors.md"


def distinct_sets() -> list[tuple[int, ...]]:
    """The removed sets of the leaderboard's rows (``13-15,17`` is blocks 13, 14, 15 and 17)."""
    sets = set()
    for line in LEADERBOARD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[\d,\-]+", cells[-1]):
            continue
        blocks = []
        for part in cells[-1].split(","):
            lo, _, hi = part.partition("-")
            blocks += range(int(lo), int(hi or lo) + 1)
        sets.add(tuple(blocks))
    return sorted(sets)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algorithms.models import zoo

    path = zoo.resolve_model_path("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval(), AutoTokenizer.from_pretrained(path)


RESULTS: dict[str, list[float]] = {}


@pytest.mark.parametrize("impl", ["alone", "shared"])
def test_perplexity_of_the_selectors_grid_sets(benchmark, smollm2, impl):
    from algorithms.evaluations.base import EvalTarget
    from algorithms.evaluations.perplexity import Perplexity
    from algorithms.models.masking import skip_blocks

    model, tokenizer = smollm2
    sets = distinct_sets()
    assert len(sets) >= 8 and () not in sets
    evaluation = Perplexity({"seq_len": 512, "max_windows": 8, "batch_size": 4,
                             "prefix_memory_mb": 0 if impl == "alone" else 1024})

    def run() -> list[float]:
        reference = evaluation.reference(model, tokenizer)
        out = []
        for removed in [(), *sets]:
            target = EvalTarget(model, tokenizer, removed, 30, skip_blocks, reference=reference)
            out.append(evaluation.measure(target)["nll"])
        return out

    RESULTS[impl] = benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, "perplexity of the selectors grid's distinct sets", "ours" if impl == "shared" else impl)
    if len(RESULTS) == 2:
        assert RESULTS["alone"] == RESULTS["shared"]  # the same numbers, bit for bit
        times = TIMINGS.get("perplexity of the selectors grid's distinct sets", {})
        NOTES.append(f"{len(sets)} distinct sets + dense, first removed blocks "
                     f"{sorted(min(s) for s in sets)}; same NLL for every set: {RESULTS['alone'] == RESULTS['shared']}"
                     + (f"; alone/shared {times['alone'] / times['ours']:.2f}x" if len(times) == 2 else ""))
