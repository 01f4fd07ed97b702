"""The ``generation`` evaluation and its decoder, on tiny random models (no download): greedy decoding
with the KV cache equals arg-max decoding without any cache, for dense and pruned models of every
architecture; agreement is counted up to the first different token; the evaluation's numbers equal a
direct computation. The same on the real SmolLM2 through a grid: tests/test_accuracy_speed_grid.py."""

from __future__ import annotations

import pytest
import torch

from algorithms.evaluations import EVALUATIONS
from algorithms.evaluations.base import EvalTarget
from algorithms.evaluations.generation import Generation
from algorithms.models.blocks import pruned_copy
from algorithms.models.decoding import agreeing_prefix, greedy_continuations
from algorithms.models.masking import skip_blocks
from tests.test_removal import ARCHS, N_LAYERS, V, build

PROMPTS = torch.randint(1, V, (5, 7), generator=torch.Generator().manual_seed(11))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


def uncached_greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Arg-max decoding the long way: the whole sequence through the model at every step, no cache."""
    ids = prompts.clone()
    with torch.inference_mode():
        for _ in range(new_tokens):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, prompts.shape[1]:]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cached_greedy_equals_uncached_for_dense_and_pruned_models(arch):
    model = build(arch)
    for drop in [(), (1, 4)]:
        pruned = pruned_copy(model, drop) if drop else model
        cached = greedy_continuations(pruned, PROMPTS, 6, batch_size=2)  # batches of 2, 2 and 1
        assert cached.shape == (5, 6) and cached.dtype == torch.long
        assert torch.equal(cached, uncached_greedy(pruned, PROMPTS, 6))


def test_agreeing_prefix_counts_up_to_the_first_difference():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    other = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4], [5, 5, 5, 6]])
    assert agreeing_prefix(ref, other).tolist() == [4, 1, 0, 3]  # later agreement does not count
    with pytest.raises(ValueError, match=r"continuations of different shapes: \(4, 4\) and \(4, 3\)"):
        agreeing_prefix(ref, other[:, :3])


def test_bad_decoding_arguments_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match=r"prompts must have shape \(N, P >= 1\), got \(7,\)"):
        greedy_continuations(model, PROMPTS[0], 4)
    with pytest.raises(ValueError, match="new_tokens and batch_size must be at least 1, got 0 and 8"):
        greedy_continuations(model, PROMPTS, 0)


@pytest.fixture
def windows(monkeypatch):
    """The evaluation's prompts are PROMPTS (a tiny model has no tokenizer)."""
    import algorithms.data as data

    monkeypatch.setattr(data, "heldout_windows", lambda tokenizer, source, seq_len, max_windows: PROMPTS[:max_windows])
    return PROMPTS


def test_evaluation_equals_a_direct_computation(windows):
    model = build("llama")
    evaluation = Generation({"prompts": 5, "prompt_len": 7, "new_tokens": 12, "batch_size": 2})
    reference = evaluation.reference(model, None)
    dense_tokens = uncached_greedy(model, windows, 12)
    assert torch.equal(reference, dense_tokens)

    dense = evaluation.measure(EvalTarget(model, None, (), N_LAYERS, skip_blocks, reference=reference))
    assert dense["prefix"] == [12] * 5 and dense["exact"] == 5
    assert evaluation.values(None, dense) == {"gen_agree": 1.0, "gen_exact": 1.0, "gen_prefix": 12.0}

    removed = (1, 2, 3)
    pruned = evaluation.measure(EvalTarget(model, None, removed, N_LAYERS, skip_blocks, reference=reference))
    pruned_tokens = uncached_greedy(pruned_copy(model, removed), windows, 12)
    expected = []
    for d, p in zip(dense_tokens.tolist(), pruned_tokens.tolist(), strict=True):
        n = next((i for i, (a, b) in enumerate(zip(d, p, strict=True)) if a != b), 12)
        expected.append(n)
    assert pruned["prefix"] == expected and pruned["tokens"] == pruned_tokens.tolist()
    assert min(expected) < 12  # three of six random blocks gone: some continuation differs
    values = evaluation.values(dense, pruned)
    assert values["gen_prefix"] == pytest.approx(sum(expected) / 5)
    assert values["gen_agree"] == pytest.approx(sum(expected) / 60)
    assert values["gen_exact"] == pytest.approx(sum(n == 12 for n in expected) / 5)
    # the model is whole again after the measurement
    assert torch.equal(greedy_continuations(model, windows, 12), dense_tokens)


def test_too_few_held_out_windows_are_named(windows):
    evaluation = Generation({"prompts": 9, "prompt_len": 7})
    with pytest.raises(ValueError, match=r"generation.prompts = 9, but 'wikipedia''s held-out text has only 5"):
        evaluation.reference(build("llama"), None)


def test_registered_with_its_columns_and_identity():
    assert EVALUATIONS.get("generation") is Generation
    keys = [c.key for c in Generation().columns()]
    assert keys == ["gen_agree", "gen_exact", "gen_prefix"]
    assert Generation().describe() == {"name": "generation", "version": "1", "params": {
        "source": "wikipedia", "prompts": 16, "prompt_len": 64, "new_tokens": 32}}
    with pytest.raises(ValueError, match="new_tokens"):
        Generation({"new_tokens": 0})
