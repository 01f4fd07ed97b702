"""Objectives and in-place block masking.

Masking is proven bit-identical to real removal (:func:`pruned_copy`) on tiny random models, and the
model is proven restored bit-for-bit afterwards; objectives are checked for memoisation, counting and
their definitions.
"""

import math

import pytest
import torch

from algorithms.evaluations.perplexity import perplexity
from algorithms.models.blocks import get_blocks, num_blocks, pruned_copy
from algorithms.models.masking import skip_blocks
from algorithms.objectives import Objective, ObjectiveFactory, runs
from estimators import METRICS
from tests.test_removal import N_LAYERS, build, ids

MASK_ARCHS = ["llama", "gemma3_text"]
DROPS = [[1, 2], [0, N_LAYERS - 1], [3], [0, 2, 4]]


def _snapshot(model):
    """Everything masking touches: block list object, layer indices, config values."""
    layers = get_blocks(model)
    idx = [(id(m), m.layer_idx) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    cfg = model.config
    return (id(layers), [id(b) for b in layers], idx, cfg.num_hidden_layers,
            list(getattr(cfg, "layer_types", None) or []), "blockbench_removed_blocks" in vars(cfg))


@pytest.mark.parametrize("arch", MASK_ARCHS)
@pytest.mark.parametrize("drop", DROPS, ids=str)
def test_masking_is_bit_identical_to_removal_and_restores_the_model(arch, drop):
    dense = build(arch)
    x = ids()
    before_state = _snapshot(dense)
    with torch.no_grad():
        before = dense(input_ids=x).logits
        pruned = pruned_copy(dense, drop)
        expected = pruned(input_ids=x).logits
        with skip_blocks(dense, drop) as masked:
            assert masked is dense
            assert num_blocks(dense) == N_LAYERS - len(drop) == dense.config.num_hidden_layers
            assert dense.config.blockbench_removed_blocks == drop
            if getattr(pruned.config, "layer_types", None) is not None:
                assert list(dense.config.layer_types) == list(pruned.config.layer_types)
            got = dense(input_ids=x).logits
        after = dense(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert _snapshot(dense) == before_state


@pytest.mark.parametrize("arch", MASK_ARCHS)
def test_generate_with_kv_cache_inside_the_mask_equals_removal(arch):
    dense = build(arch)
    prompt = ids(seed=3, batch=1, length=6)
    common = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = pruned_copy(dense, [1, 4]).generate(prompt, use_cache=True, **common)
        dense_before = dense.generate(prompt, use_cache=True, **common)
        with skip_blocks(dense, [1, 4]):
            cached = dense.generate(prompt, use_cache=True, **common)
            uncached = dense.generate(prompt, use_cache=False, **common)
        dense_after = dense.generate(prompt, use_cache=True, **common)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    assert torch.equal(dense_after, dense_before)


def test_masking_restores_on_exception():
    dense = build("gemma3_text")
    state = _snapshot(dense)
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(dense, [0, 3]):
        raise RuntimeError("boom")
    assert _snapshot(dense) == state


def test_masking_an_already_pruned_model_records_dense_numbering():
    pruned = pruned_copy(build("llama"), [0])
    with skip_blocks(pruned, [1]):  # current index 1 = dense block 2
        assert pruned.config.blockbench_removed_blocks == [0, 2]
    assert pruned.config.blockbench_removed_blocks == [0]


def test_masking_rejects_bad_indices_and_changes_nothing():
    dense = build("llama")
    state = _snapshot(dense)
    with pytest.raises(ValueError, match="out of range"), skip_blocks(dense, [N_LAYERS]):
        pass
    with skip_blocks(dense, []):  # nothing to skip
        assert num_blocks(dense) == N_LAYERS
    assert _snapshot(dense) == state


# ---------------------------------------------------------------------------------------- objectives


def test_runs():
    assert runs([5, 1, 2]) == [(1, 2), (5, 1)]
    assert runs([]) == []
    assert runs(range(3, 7)) == [(3, 4)]


def test_objective_memoises_and_counts_distinct_sets():
    calls = []
    obj = Objective(lambda s: calls.append(s) or float(sum(s)), name="t")
    assert obj([1, 2]) == 3.0 and obj((2, 1)) == 3.0 and obj({1, 2}) == 3.0
    assert obj([4]) == 4.0
    assert obj.evaluations == 2 == len(calls)
    view = obj.counter()
    view([1, 2]), view([1, 2]), view([7])
    assert view.evaluations == 2  # distinct sets this view asked for
    assert view.computed == 1  # only {7} was new to the shared cache
    assert obj.evaluations == 3
    nan = Objective(lambda s: float("nan"))
    assert nan([0]) == math.inf  # a broken set is never preferred


def test_on_new_hears_each_computed_value_once_and_never_a_seeded_one():
    heard = []
    obj = Objective(lambda s: float(sum(s)), name="t", anchor=lambda s: float(sum(s)) + 0.5)
    obj.on_new = lambda blocks, value: heard.append((sorted(blocks), value))
    obj.seed([9], 1.25)
    assert obj([9]) == 1.25 and obj([1, 2]) == 3.0 and obj([2, 1]) == 3.0
    obj.anchor([4])  # the anchor's own value is memoised (and heard) when new
    obj.anchor([1, 2])  # known already: not heard again
    assert heard == [([1, 2], 3.0), ([4], 4.5)]
    assert obj.evaluations == 2


def test_prepaid_sets_are_free():
    obj = Objective(lambda s: 1.0)
    view = obj.counter()
    view.prepaid([1, 2], 0.5)
    assert view([1, 2]) == 0.5 and view.evaluations == 0 and obj.evaluations == 0


@pytest.fixture(scope="module")
def tiny():
    model = build("llama")
    x = ids(seed=5, batch=5, length=10)
    from algorithms.models.capture import capture_hidden_states

    states, stats = capture_hidden_states(model, x)
    return model, x, states, stats


def test_proxy_objectives_follow_their_definitions(tiny):
    _, _, states, _ = tiny
    metric = METRICS.get("angular")()
    fac = ObjectiveFactory(states=states, metric=metric)
    imp = metric.score_blocks(states).tolist()  # angular: higher = important
    s2 = metric.score_spans(states, 2).tolist()
    s3 = metric.score_spans(states, 3).tolist()
    total, span = fac.get("proxy_sum"), fac.get("proxy_span")
    assert total([1, 4]) == pytest.approx(imp[1] + imp[4], abs=1e-12)
    assert span([1, 4]) == pytest.approx(imp[1] + imp[4], abs=1e-12)  # singletons: same as the sum
    assert span([1, 2, 4]) == pytest.approx(s2[1] + imp[4], abs=1e-12)
    assert span([0, 1, 2, 5]) == pytest.approx(s3[0] + imp[5], abs=1e-12)
    assert fac.get("proxy_span") is span  # memoised per kind
    # a metric where high = redundant flips the sign
    flipped = ObjectiveFactory(states=states, metric=metric, higher_is_important=False)
    assert flipped.get("proxy_span")([1, 2]) == pytest.approx(-s2[1], abs=1e-12)
    # block scores seed the singleton spans exactly
    seeded = ObjectiveFactory(block_scores=torch.tensor(imp, dtype=torch.float64), higher_is_important=True)
    assert seeded.get("proxy_sum")([2, 3]) == imp[2] + imp[3]
    with pytest.raises(ValueError, match="hidden states and a metric"):
        seeded.get("proxy_span")


def test_true_loss_equals_the_perplexity_protocol_on_a_removed_copy(tiny):
    model, x, _, stats = tiny
    fac = ObjectiveFactory(model=model, input_ids=x, batch_size=2)
    loss = fac.get("loss")
    assert loss([]) == pytest.approx(stats["calib_nll"], rel=1e-6)  # capture batches by 4
    expected = perplexity(pruned_copy(model, [1, 3]), x, batch_size=2)
    assert loss([1, 3]) == expected["nll"]  # bit-identical: same protocol, masking == removal
    assert loss([3, 1]) == expected["nll"] and loss.evaluations == 2
    ppl = ObjectiveFactory(model=model, input_ids=x, batch_size=2, true_loss="ppl").get("loss")
    assert ppl([1, 3]) == pytest.approx(expected["ppl"], rel=1e-12)
    assert num_blocks(model) == N_LAYERS  # the model is left as it was


def test_factories_share_the_true_loss_but_not_the_proxies(tiny):
    model, x, states, _ = tiny
    a = ObjectiveFactory(model=model, input_ids=x, states=states, metric=METRICS.get("bi")())
    b = ObjectiveFactory(model=model, input_ids=x, states=states, metric=METRICS.get("angular")(), share=a)
    assert a.get("loss") is b.get("loss")
    assert a.get("proxy_span") is not b.get("proxy_span")


def test_factory_errors_name_what_is_missing():
    fac = ObjectiveFactory()
    with pytest.raises(ValueError, match="needs model and input_ids"):
        fac.get("loss")
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        fac.get("nope")
    with pytest.raises(ValueError, match="true_loss"):
        ObjectiveFactory(true_loss="bits")
    custom = ObjectiveFactory(custom={"loss": lambda s: float(len(s))})
    assert custom.get("loss")([1, 2, 3]) == 3.0


def test_lazy_states_are_resolved_once(tiny):
    _, _, states, _ = tiny
    calls = []
    fac = ObjectiveFactory(states=lambda: calls.append(1) or states, metric=METRICS.get("bi")())
    fac.get("proxy_span")([1, 2])
    fac.get("proxy_span")([1, 2, 3])
    assert len(calls) == 1
