"""Shared dense prefix (algorithms.models.prefix): a pruned model started from the dense model's
recorded states at its first removed block gives bit-identical numbers to the same pruned model run
from its embeddings, on every architecture blockbench removes blocks from (tiny random models, no
download) and for every unit kind; and the perplexity and KL evaluations use it without changing a
number or an identity."""

from __future__ import annotations

import contextlib

import pytest
import torch

from algorithms.evaluations.base import EvalTarget
from algorithms.evaluations.kl import KLDivergence
from algorithms.evaluations.perplexity import Perplexity
from algorithms.models.blocks import get_blocks
from algorithms.models.masking import skip_blocks
from algorithms.models.nll import mean_nll
from algorithms.models.prefix import (
    PrefixReference,
    PrefixStates,
    checkpoint_depths,
    recording,
    resumed,
    shareable,
)
from algorithms.models.units import skip_units
from tests.test_removal import ALL, N_LAYERS, V, build
from tests.test_units import SUPPORTED

#: 5 windows of 12 tokens in batches of 2: the last batch is smaller (a shape the feed must follow)
WINDOWS = torch.randint(1, V, (5, 12), generator=torch.Generator().manual_seed(3))
BATCH = 2
#: removed blocks, first removed block 0, 1, 3 and 5 (the last: the pruned model has 5 blocks left)
SETS = [(0, 4), (1, 2), (3,), (3, 4, 5), (5,)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


def record_all(model) -> PrefixStates:
    with recording(model, range(1, N_LAYERS)) as prefix:
        mean_nll(model, WINDOWS, batch_size=BATCH)
    return prefix


def transform(unit: str):
    if unit == "block":
        return lambda model, removed: skip_blocks(model, removed)
    return lambda model, removed: skip_units(model, unit, removed)


def both_ways(model, prefix, unit, removed, run):
    """``run(model)`` on the pruned model from its embeddings, then started from ``prefix``."""
    plain = EvalTarget(model, None, removed, N_LAYERS, transform(unit), unit=unit)
    with plain.pruned() as pruned:
        whole = run(pruned)
    with plain.pruned(prefix) as pruned:
        kept = len(get_blocks(pruned))
        shared = run(pruned)
    return whole, shared, kept


@pytest.mark.parametrize("arch", sorted(ALL))
@pytest.mark.parametrize("removed", SETS)
def test_resumed_block_removal_is_bit_identical(arch, removed):
    model = build(arch)
    prefix = record_all(model)
    whole, shared, kept = both_ways(model, prefix, "block", removed,
                                    lambda m: mean_nll(m, WINDOWS, batch_size=BATCH))
    assert shared == whole  # exact: the same operations on the same inputs
    first = min(removed)
    skipped = 0 if not shareable(model) else min(first, N_LAYERS - len(removed) - 1)
    assert kept == N_LAYERS - len(removed) - skipped  # the shared blocks really were not run


@pytest.mark.parametrize("arch", SUPPORTED)
@pytest.mark.parametrize(("unit", "removed"), [("attention", (2, 5)), ("mlp", (4,)), ("sublayer", (7, 8, 11))])
def test_resumed_unit_removal_is_bit_identical(arch, unit, removed):
    model = build(arch)
    prefix = record_all(model)
    logits = []

    def run(m):
        with torch.inference_mode():
            logits.append(torch.cat([m(input_ids=WINDOWS[i : i + BATCH], use_cache=False).logits for i in range(0, 5, BATCH)]))

    _, _, kept = both_ways(model, prefix, unit, removed, run)
    assert torch.equal(logits[0], logits[1])
    first_block = removed[0] // 2 if unit == "sublayer" else removed[0]
    assert kept == N_LAYERS - first_block


def test_the_model_is_restored_and_hooks_removed():
    model = build("llama")
    blocks = list(get_blocks(model))
    prefix = record_all(model)
    assert all(not b._forward_pre_hooks for b in blocks)  # recording's hooks are gone
    with skip_blocks(model, (3, 4)) as pruned, resumed(pruned, prefix, 3):
        assert len(get_blocks(model)) == 1 and get_blocks(model)[0] is blocks[5]
        assert [b.self_attn.layer_idx for b in get_blocks(model)] == [0]
    assert list(get_blocks(model)) == blocks and model.config.num_hidden_layers == N_LAYERS
    assert [b.self_attn.layer_idx for b in blocks] == list(range(N_LAYERS))
    assert all(not b._forward_pre_hooks for b in blocks)


def test_states_kept_are_the_ones_entering_each_block():
    model = build("llama")
    prefix = record_all(model)
    assert [len(prefix.states[d]) for d in prefix.depths] == [3] * (N_LAYERS - 1)  # 3 batches
    assert [tuple(t.shape) for t in prefix.states[2]] == [(2, 12, 32), (2, 12, 32), (1, 12, 32)]
    with torch.inference_mode():
        hidden = model(input_ids=WINDOWS[:2], output_hidden_states=True).hidden_states
    assert torch.equal(prefix.states[2][0], hidden[2])  # hidden_states[i] enters block i (i < L)
    assert prefix.nbytes == (N_LAYERS - 1) * 5 * 12 * 32 * 4


def test_batches_fed_in_another_shape_are_refused():
    model = build("llama")
    prefix = record_all(model)
    with skip_blocks(model, (4,)) as pruned, resumed(pruned, prefix, 4):
        with pytest.raises(RuntimeError, match=r"batch 0 has shape \(3, 12, 32\), recorded \(2, 12, 32\)"):
            mean_nll(pruned, WINDOWS, batch_size=3)
    with skip_blocks(model, (4,)) as pruned, resumed(pruned, prefix, 4):
        mean_nll(pruned, WINDOWS, batch_size=BATCH)
        with pytest.raises(RuntimeError, match="more forward passes than the 3 batches recorded"):
            mean_nll(pruned, WINDOWS[:1], batch_size=BATCH)


def test_depths_outside_the_model_are_refused():
    with pytest.raises(ValueError, match=r"depths \[0, 6\] are not between 1 and 5"):
        with recording(build("llama"), [0, 2, 6]):
            pass


@pytest.mark.parametrize(("n", "per", "budget", "depths"), [
    (30, 10, 290, tuple(range(1, 30))),  # all 29 fit exactly
    (30, 10, 289, tuple(range(2, 30, 2))),  # one byte short: every second depth
    (30, 10, 100, (3, 6, 9, 12, 15, 18, 21, 24, 27)),  # ceil(290 / 100) = 3
    (30, 10, 10, (29,)),  # one depth fits: stride 29
    (30, 10, 9, ()),  # none fits
    (1, 10, 1000, ()),  # one block: nothing before it to share
])
def test_checkpoint_depths_fit_the_budget(n, per, budget, depths):
    assert checkpoint_depths(n, per, budget) == depths
    assert len(depths) * per <= budget


def test_resuming_from_the_nearest_kept_depth_before_the_first_removed_block():
    prefix = PrefixStates(depths=(3, 6, 9))
    assert [prefix.start(f) for f in (None, 0, 2, 3, 5, 6, 29)] == [0, 0, 0, 3, 3, 6, 9]
    model = build("llama")
    with recording(model, (2, 4)) as sparse:
        mean_nll(model, WINDOWS, batch_size=BATCH)
    with skip_blocks(model, (3, 5)) as pruned:
        whole = mean_nll(pruned, WINDOWS, batch_size=BATCH)
        with resumed(pruned, sparse, 3):
            assert len(get_blocks(pruned)) == 2  # from depth 2: blocks 2 and 4 run
            assert mean_nll(pruned, WINDOWS, batch_size=BATCH) == whole


def test_gpt2_with_position_dependent_weights_is_run_whole():
    model = build("gpt2_inverse_scale")
    assert not shareable(model) and shareable(build("gpt2"))
    prefix = record_all(model)
    with skip_blocks(model, (3,)) as pruned, resumed(pruned, prefix, 3):
        assert len(get_blocks(pruned)) == N_LAYERS - 1


class Tokenizer:
    """What ``heldout_windows`` is never asked for here: the evaluations' windows are patched."""


@pytest.mark.parametrize("budget", [0, 1024])
def test_perplexity_and_kl_evaluations_share_the_prefix_with_the_same_numbers(monkeypatch, budget):
    import algorithms.data as data

    monkeypatch.setattr(data, "heldout_windows", lambda *a, **k: WINDOWS)
    model = build("llama")
    ppl = Perplexity({"batch_size": BATCH, "prefix_memory_mb": budget})
    kl = KLDivergence({"batch_size": BATCH, "prefix_memory_mb": budget})
    ppl_ref, kl_ref = ppl.reference(model, Tokenizer()), kl.reference(model, Tokenizer())

    def target(removed, reference, prune=skip_blocks):
        return EvalTarget(model, Tokenizer(), removed, N_LAYERS, lambda m, r: prune(m, r), reference=reference)

    def alone(removed):  # measured without any shared state
        with skip_blocks(model, removed) as pruned:
            return mean_nll(pruned, WINDOWS, batch_size=BATCH)

    if budget == 0:
        assert ppl_ref is None and kl_ref.prefix is None  # sharing off: the evaluations run every block
    else:
        assert ppl_ref.prefix.depths == tuple(range(1, N_LAYERS)) == kl_ref.prefix.depths
        assert ppl.measure(target((), ppl_ref)) == ppl_ref.dense  # the dense pass is the dense result
    dense = mean_nll(model, WINDOWS, batch_size=BATCH)
    assert ppl.measure(target((), ppl_ref))["nll"] == dense[0]
    for removed in [(2, 3), (5,)]:
        assert ppl.measure(target(removed, ppl_ref))["nll"] == alone(removed)[0]
        with_prefix = kl.measure(target(removed, kl_ref))
        without = kl.measure(target(removed, PrefixReference(kl_ref.dense, None)))
        assert with_prefix == without and with_prefix["kl"] > 0


@pytest.mark.parametrize(("unit", "sets", "first_run", "first_run_dense_only"), [
    # block sets in the order they come, and the first block each runs (dense numbering) with the states of
    # the sets before it kept, and with the dense states only. {1,2,4} after {1,2}: block 5 (the only kept
    # block after 4); {1,3}: nothing in common with {1,2} past block 1; {1,2,5}: from {1,2} at block 4 (at 5
    # nothing would be left to run); {0,5}: nothing in common with anyone, runs from its embeddings.
    ("block", [(1, 2), (1, 2, 4), (1, 3), (1, 2, 5), (0, 5)], [3, 5, 2, 4, 1], [3, 3, 2, 3, 1]),
    # sub-layers 2i / 2i + 1 of block i: {3,4,9} after {3,4} starts at block 4; {3,8} differs from it at 4
    ("sublayer", [(3, 4), (3, 4, 9), (3, 8)], [1, 4, 2], [1, 1, 1]),
])
def test_sets_start_from_the_states_of_sets_measured_before(monkeypatch, unit, sets, first_run, first_run_dense_only):
    """The trie of removed sets: an evaluation keeps the states of the sets it measured, and a set that
    agrees with one of them up to a later block starts there. Same numbers as each set measured alone."""
    import algorithms.data as data

    monkeypatch.setattr(data, "heldout_windows", lambda *a, **k: WINDOWS)
    model = build("llama")
    ways = {"trie": Perplexity({"batch_size": BATCH}),
            "dense_only": Perplexity({"batch_size": BATCH, "prefix_sets_mb": 0})}
    refs = {way: evaluation.reference(model, Tokenizer()) for way, evaluation in ways.items()}
    prune = transform(unit)
    ran = {way: [] for way in ways}
    for removed in sets:
        values = {}
        for way, evaluation in ways.items():
            calls, handles = block_calls(model)
            values[way] = evaluation.measure(EvalTarget(model, Tokenizer(), removed, N_LAYERS, prune, unit=unit,
                                                        reference=refs[way]))["nll"]
            for h in handles:
                h.remove()
            ran[way].append(min(i for i, c in enumerate(calls) if c))
        with prune(model, removed) as pruned:
            assert values["trie"] == values["dense_only"] == mean_nll(pruned, WINDOWS, batch_size=BATCH)[0]
    assert ran == {"trie": first_run, "dense_only": first_run_dense_only}
    assert [p.removed for p in refs["trie"].earlier] == [frozenset(r) for r in sets]
    assert refs["dense_only"].earlier == []


def test_the_states_of_earlier_sets_stay_within_their_budget():
    """Each kept set costs the bytes it does not share with the dense states; the oldest go first."""
    model = build("llama")
    with recording(model, range(1, N_LAYERS)) as dense:
        mean_nll(model, WINDOWS, batch_size=BATCH)
    per_depth = WINDOWS.numel() * model.config.hidden_size * 4
    reference = PrefixReference(None, dense, earlier_bytes=5 * per_depth)
    for removed in [(3,), (4,), (2,)]:  # own depths: 4, 5 (block 4 kept), 3, 4, 5 -> 2, 1, 3 depths
        target = EvalTarget(model, None, removed, N_LAYERS, skip_blocks, reference=reference)
        with target.pruned(reference) as pruned:
            mean_nll(pruned, WINDOWS, batch_size=BATCH)
    assert [reference.own_bytes(p) // per_depth for p in reference.earlier] == [1, 3]
    assert [p.removed for p in reference.earlier] == [frozenset({4}), frozenset({2})]


def test_healed_targets_never_resume():
    """A healed model's kept blocks are not the dense model's: the target ignores the prefix."""
    model = build("llama")
    prefix = record_all(model)
    target = EvalTarget(model, None, (3,), N_LAYERS, lambda m, r: contextlib.nullcontext(m), healing="lora")
    with target.pruned(prefix) as pruned:
        assert len(get_blocks(pruned)) == N_LAYERS


def test_prefix_memory_is_a_speed_setting_not_an_identity():
    assert Perplexity({"prefix_memory_mb": 0, "prefix_sets_mb": 0}).describe() == Perplexity().describe()
    assert KLDivergence({"prefix_memory_mb": 0, "prefix_sets_mb": 7}).describe() == KLDivergence().describe()
    assert not {"prefix_memory_mb", "prefix_sets_mb"} & set(Perplexity().describe()["params"])


@pytest.mark.slow
@pytest.mark.download
def test_smollm2_perplexity_with_the_shared_prefix_is_bit_identical(smollm2_on_disk):
    """The real model on real held-out text: perplexity of sets whose first removed block is 0, 13 and
    27, started from the dense pass's states, equals each set run from its embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_on_disk, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_on_disk)
    shared = Perplexity({"seq_len": 128, "max_windows": 3, "batch_size": 2})
    alone = Perplexity({"seq_len": 128, "max_windows": 3, "batch_size": 2, "prefix_memory_mb": 0})
    reference = shared.reference(model, tokenizer)
    assert reference.prefix.depths == tuple(range(1, 30))
    for removed in [(0, 5), (13, 14, 17), (27, 28, 29)]:
        def measure(evaluation, ref, removed=removed):
            return evaluation.measure(EvalTarget(model, tokenizer, removed, 30, skip_blocks, reference=ref))

        assert measure(shared, reference) == measure(alone, None)


def loss_objectives(model, unit: str):
    """The calibration ``loss`` objective started from the captured hidden states, and the same run whole."""
    from algorithms.models.capture import capture_hidden_states
    from algorithms.models.prefix import from_captured
    from algorithms.objectives import ObjectiveFactory

    states, _ = capture_hidden_states(model, WINDOWS, batch_size=BATCH, sublayers=unit == "sublayer")
    blocks = states[0::2] if unit == "sublayer" else states
    shared = ObjectiveFactory(model=model, input_ids=WINDOWS, batch_size=BATCH, unit=unit,
                              prefix=lambda: from_captured(blocks, BATCH)).get("loss")
    return shared, ObjectiveFactory(model=model, input_ids=WINDOWS, batch_size=BATCH, unit=unit).get("loss")


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize(("unit", "sets"), [
    ("block", [(0,), (2,), (3, 4), (1, 5), (4, 5)]),
    ("attention", [(2,), (3, 5)]),
    ("sublayer", [(5,), (6, 9), (11,)]),
])
def test_the_search_loss_started_from_captured_states_is_bit_identical(arch, unit, sets):
    """SLEB-style searches evaluate the calibration loss of many sets: started from the captured hidden
    states (the dense model's states on the same windows and batches) it is the loss run whole."""
    model = build(arch)
    shared, whole = loss_objectives(model, unit)
    for removed in sets:
        assert shared(removed) == whole(removed)
    assert shared(()) == whole(())  # the dense model: nothing to start from


def test_captured_prefix_states_are_views_split_like_the_batches():
    from algorithms.models.prefix import from_captured

    states = torch.arange(7 * 5 * 2 * 3, dtype=torch.float32).reshape(7, 5, 2, 3)
    prefix = from_captured(states, 2)
    assert prefix.depths == (1, 2, 3, 4, 5)
    assert [t.shape[0] for t in prefix.states[3]] == [2, 2, 1]
    assert all(t.data_ptr() == states[3, 2 * i].data_ptr() for i, t in enumerate(prefix.states[3]))  # no copy


def block_calls(model) -> tuple[list[int], list]:
    """Per-block forward counters (dense numbering) and their hook handles."""
    calls = [0] * N_LAYERS
    handles = []
    for i, block in enumerate(get_blocks(model)):
        def count(_m, _a, i=i):
            calls[i] += 1
        handles.append(block.register_forward_pre_hook(count))
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize(("unit", "path"), [
    ("block", [3, 1, 4]),          # the anchor {3, 1} starts after the removed block 1; {1, 3} + 4 resumes at 4
    ("attention", [4, 2, 5]),
    ("sublayer", [9, 4, 7, 1]),    # sub-layers: block 4's MLP, block 2's attention, ...
])
def test_a_greedy_search_anchored_on_its_chosen_set_gives_the_same_losses(arch, unit, path):
    """SLEB and BlockPruner add one unit at a time: with the states of the model without the chosen set
    kept (Objective.anchor), each set tried next starts at its new unit's block. Every loss is the one
    run whole, and the blocks before the new unit are really not run."""
    from algorithms.models.prefix import unit_block
    from algorithms.models.units import n_units

    model = build(arch)
    anchored, whole = loss_objectives(model, unit)
    chosen: list[int] = []
    for step in path:
        anchored.anchor(chosen)
        for u in range(n_units(model, unit)):
            if u in chosen:
                continue
            tried = [*chosen, u]
            calls, handles = block_calls(model)
            value = anchored(tried)
            for h in handles:
                h.remove()
            assert value == whole(tried), (tried, value, whole(tried))
            first = unit_block(unit, u)
            ran = [i for i, c in enumerate(calls) if c]
            gone = set(tried) if unit == "block" else set()
            expect = [i for i in range(N_LAYERS) if i not in gone and i >= first] if chosen else None
            if expect is not None and expect and ran != expect:
                # the fed block is the first one left at or after the new unit's block
                pytest.fail(f"{tried}: blocks run {ran}, expected {expect}")
        chosen.append(step)
    assert anchored.cached(chosen[:-1]) == whole(chosen[:-1])
    assert anchored.anchors == len(path) - 1  # one anchor pass per step after the first
