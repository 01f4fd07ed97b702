"""Speed measurement (algorithms.evaluations.timing): structure, the decode loop against generate(), exact ratios.

Timings are never asserted against thresholds (they are benchmarks, not tests); what is asserted is
what must hold on any machine: counts, sizes, ratios computed exactly, state restored.
"""

import json
import math
import statistics
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from algorithms.evaluations.timing import (
    compare_speed,
    decode_steps,
    expected_ceiling,
    measure_speed,
    paired_speedup,
    speedup,
)
from algorithms.models.blocks import count_parameters, num_blocks, pruned_copy, weight_bytes

FAST = {"prompt_lengths": (8, 16), "decode_tokens": 4, "repeats": 2, "warmup": 1}


def tiny_llama(layers=6, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def test_measure_speed_reports_every_figure_as_plain_json():
    model = tiny_llama()
    model.train()
    result = measure_speed(model, **FAST)
    assert model.training  # restored
    json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["threads"] == torch.get_num_threads()
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["weight_bytes"] == 4 * result["params"] + sum(b.numel() * b.element_size() for b in model.buffers())
    assert result["peak_bytes"] is None and result["peak_bytes_source"] is None  # CPU: no allocator statistic
    assert set(result["prefill"]) == {"8", "16"}
    for stats in result["prefill"].values():
        assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["iqr_s"] >= 0
    decode = result["decode"]
    assert (decode["prompt_length"], decode["tokens"]) == (8, 4)
    assert 0 < decode["tokens_per_s"]["min"] <= decode["tokens_per_s"]["median"] <= decode["tokens_per_s"]["max"]
    assert (result["repeats"], result["warmup"]) == (2, 1)


def test_threads_apply_during_the_measurement_only():
    before = torch.get_num_threads()
    seen = []
    model = tiny_llama(layers=2)
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        result = measure_speed(model, **FAST, threads=1)
    finally:
        hook.remove()
    assert result["threads"] == 1 and set(seen) == {1}
    assert torch.get_num_threads() == before  # restored


def test_tied_weights_count_once():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = tiny_llama(tie=False)
    head = untied.lm_head.weight
    assert count_parameters(model) == count_parameters(untied) - head.numel()
    assert weight_bytes(model) == weight_bytes(untied) - head.numel() * head.element_size()


def test_decode_loop_is_greedy_decoding_with_the_cache():
    model = tiny_llama()
    prompt = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        decoder = decode_steps(model, prompt, steps=6, extra={})
        decoder.run()
        first = list(decoder.produced)
        decoder.reset()
        for _ in range(6):  # step by step, as the timing does: the same tokens from the same cache state
            decoder.step()
        assert decoder.produced == first and len(first) == 6
        for _ in range(6):  # without reset(): still a fresh copy, never the cache the last run extended
            decoder.step()
        assert decoder.produced == first
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=7, min_new_tokens=7, pad_token_id=0)
    # the prefill predicts the first new token, each of the 6 decoding steps one more
    assert reference[0, 9:].tolist() == first


def test_every_timed_decode_makes_exactly_decode_tokens_single_token_steps():
    model = tiny_llama()
    steps = []
    hook = model.register_forward_pre_hook(lambda _m, args: steps.append(args[0].shape[1]))
    try:
        measure_speed(model, **{**FAST, "decode_tokens": 5, "repeats": 3, "warmup": 2})
    finally:
        hook.remove()
    # 5 one-token steps in each of the 2 warm-up and 3 timed runs; the rest are full prompts (8 or 16)
    assert steps.count(1) == 5 * (2 + 3)
    assert set(steps) == {1, 8, 16}


def test_compare_speed_measures_the_model_without_the_blocks_and_restores_it():
    model = tiny_llama(layers=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare_speed(model, [1, 2], **FAST)
    assert num_blocks(model) == 6 and model.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rebuilt = pruned_copy(model, [1, 2])  # block removal's own answer for the smaller model
    assert result["pruned"]["params"] == count_parameters(rebuilt)
    assert result["pruned"]["weight_bytes"] == weight_bytes(rebuilt)
    assert result["dense"]["params"] == count_parameters(model)
    ratios = result["speedup"]
    assert ratios["params"] == result["pruned"]["params"] / result["dense"]["params"] < 1
    assert set(ratios["prefill"]) == {"8", "16"}
    assert all(v > 0 and math.isfinite(v) for v in ratios["prefill"].values())
    # each speedup is the median of its stored back-to-back ratios: one per round, one per decoding step
    assert [len(ratios["ratios"]["prefill"][n]) for n in ("8", "16")] == [2, 2]
    assert len(ratios["ratios"]["decode"]) == 2 * 4
    for n in ("8", "16"):
        assert ratios["prefill"][n] == statistics.median(ratios["ratios"]["prefill"][n])
    assert ratios["decode"] == statistics.median(ratios["ratios"]["decode"])
    assert ratios["prefill_mean"] == pytest.approx(math.sqrt(ratios["prefill"]["8"] * ratios["prefill"]["16"]))
    json.dumps(result)


def test_dense_and_pruned_calls_alternate_back_to_back():
    """Every timed call of the dense model is next to the pruned model's same call (the same prompt
    length, or the same decoding step), and which goes first alternates from pair to pair."""
    model = tiny_llama(layers=6)
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, args: calls.append((len(m.model.layers), args[0].shape[1])))
    try:
        compare_speed(model, [1, 2], prompt_lengths=(8, 16), decode_tokens=3, repeats=2, warmup=1)
    finally:
        hook.remove()
    build, timed = calls[:2], calls[2:]
    assert build == [(6, 8), (4, 8)]  # each side's decoder prefills the first length's prompt, untimed
    pairs = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    per_round = [(8,), (16,), (1,), (1,), (1,)]  # prefill 8, prefill 16, then 3 decoding steps
    assert [p[0][1] for p in pairs] == [n for _ in range(1 + 2) for (n,) in per_round]
    for i, (first, second) in enumerate(pairs):
        assert first[1] == second[1]  # the same call
        assert (first[0], second[0]) == ((6, 4) if i % 2 == 0 else (4, 6))  # dense first, then pruned first


def test_paired_ratios_are_exact_when_the_machine_slows_down_in_bursts(monkeypatch):
    """A fake clock: every forward pass costs 1 ms per block it runs, times a slowdown of 3x during
    bursts of 5 calls that start every 15 calls, so some bursts begin or end between the two calls of
    a pair. Those few pairs' ratios are off by 3x; the median of the pairs is exactly 6 / 4 blocks."""
    import algorithms.evaluations.timing as timing

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    model = tiny_llama(layers=6)

    def tick(m, _args):
        slowdown = 3.0 if clock["calls"] % 15 < 5 else 1.0
        clock["now"] += 1e-3 * len(m.model.layers) * slowdown
        clock["calls"] += 1

    hook = model.register_forward_pre_hook(tick)
    try:
        result = compare_speed(model, [1, 2], prompt_lengths=(8,), decode_tokens=5, repeats=3, warmup=1)
    finally:
        hook.remove()
    ratios = result["speedup"]
    # By hand: calls 0-1 build the decoders; then 12 calls per round (a prefill pair, 5 decoding
    # pairs), pair p being calls 2p and 2p + 1, dense first when p is odd. Slow calls: 15-19, 30-34,
    # 45-49 in the timed rounds. Split pairs: 7 = (14 dense fast, 15 pruned slow), round 1's prefill:
    # 6 / 12 = 0.5; 17 = (34 dense slow, 35 pruned fast): 18 / 4 = 4.5; 22 = (44 pruned fast, 45 dense
    # slow): 4.5. Every other pair is 6 / 4 = 1.5, and the medians with them.
    assert ratios["ratios"]["prefill"]["8"] == pytest.approx([0.5, 1.5, 1.5])
    split = [r for r in ratios["ratios"]["decode"] if r != pytest.approx(1.5)]
    assert split == pytest.approx([4.5, 4.5]) and len(ratios["ratios"]["decode"]) == 15
    assert ratios["decode"] == pytest.approx(1.5)
    assert ratios["prefill"] == {"8": pytest.approx(1.5)}


def test_paired_speedup_of_given_times():
    from algorithms.evaluations.timing import Timings

    sizes = {"params": 100, "weight_bytes": 400}
    dense = Timings({"8": [0.2, 0.3, 0.9]}, [0.02, 0.05, 0.03, 0.04], tokens=2)
    pruned = Timings({"8": [0.1, 0.2, 0.3]}, [0.01, 0.04, 0.03, 0.02], tokens=2)
    assert dense.decode_runs() == pytest.approx([0.07, 0.07])  # each round's two steps summed
    ratios = paired_speedup(sizes, {"params": 80, "weight_bytes": 300}, dense, pruned)
    assert ratios["ratios"]["prefill"]["8"] == pytest.approx([2.0, 1.5, 3.0])
    assert ratios["prefill"]["8"] == pytest.approx(2.0) and ratios["prefill_mean"] == pytest.approx(2.0)
    assert ratios["ratios"]["decode"] == pytest.approx([2.0, 1.25, 1.0, 2.0])
    assert ratios["decode"] == pytest.approx(1.625)  # the median of four
    assert (ratios["params"], ratios["weight_memory"]) == (pytest.approx(0.8), pytest.approx(0.75))
    with pytest.raises(ValueError):  # unpaired lists are refused, never silently truncated
        paired_speedup(sizes, sizes, dense, Timings({"8": [0.1]}, [0.01], tokens=1))


def _fake(prefill, tps, params=100, nbytes=400, tokens=32):
    """Measurements whose medians are 3x slower than their best repeat (interference): ratios use the best."""
    return {"prefill": {k: {"min_s": v, "median_s": 3 * v * (1 + len(k))} for k, v in prefill.items()},
            "params": params, "weight_bytes": nbytes,
            "decode": {"tokens": tokens, "tokens_per_s": {"max": tps, "median": tps / 3 / tokens}}}


def test_speedup_ratios_are_exact():
    dense = _fake({"128": 0.2, "512": 0.9}, tps=30.0, params=135, nbytes=540)
    pruned = _fake({"128": 0.1, "512": 0.5}, tps=40.0, params=108, nbytes=432)
    ratios = speedup(dense, pruned)
    assert ratios["prefill"] == {"128": pytest.approx(2.0), "512": pytest.approx(1.8)}
    assert ratios["prefill_mean"] == pytest.approx(math.sqrt(2.0 * 1.8))  # geometric mean
    assert ratios["decode"] == pytest.approx(40 / 30)
    assert ratios["params"] == pytest.approx(0.8) and ratios["weight_memory"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="prompt lengths differ"):
        speedup(dense, _fake({"128": 0.1}, tps=40.0))
    with pytest.raises(ValueError, match="decode lengths differ"):
        speedup(dense, _fake({"128": 0.1, "512": 0.5}, tps=40.0, tokens=8))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt_lengths": ()}, "prompt_lengths"),
    ({"prompt_lengths": (8, 0)}, r"prompt_lengths\[1\]"),
    ({"prompt_lengths": (8, 8)}, "repeated"),
    ({"decode_tokens": 0}, "decode_tokens"),
    ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"repeats": 2.5}, "repeats"),
    ({"threads": 0}, "threads"),
])
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_speed(tiny_llama(layers=2), **{**FAST, **kwargs})


def test_expected_ceiling():
    assert expected_ceiling(30, 8) == pytest.approx(30 / 22)
    assert expected_ceiling(30, 0) == 1.0
    for bad in (30, -1, 2.0):
        with pytest.raises(ValueError, match="n_removed"):
            expected_ceiling(30, bad)


@pytest.mark.slow
@pytest.mark.download
def test_smollm2_with_a_quarter_of_its_blocks_removed():
    from algorithms.models import zoo

    model, _, _ = zoo.load_model("smollm2-135m")
    removed = [12, 13, 14, 15, 16, 17, 25]  # 7 of 30 blocks (configs/paper.yaml's 25%)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 test cores are shared: oversubscribed threads make the timings noise
    try:
        result = compare_speed(model, removed, prompt_lengths=(64, 256), decode_tokens=8, repeats=3, warmup=1)
    finally:
        torch.set_num_threads(threads)
    ratios = result["speedup"]
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert result["dense"]["params"] - result["pruned"]["params"] == 7 * block
    assert ratios["params"] == result["pruned"]["params"] / result["dense"]["params"] < 1
    assert result["pruned"]["weight_bytes"] < result["dense"]["weight_bytes"]
    for value in [*ratios["prefill"].values(), ratios["prefill_mean"], ratios["decode"]]:
        assert math.isfinite(value) and value > 0
    print(f"\nSmolLM2-135M without 7/30 blocks: prefill x{ratios['prefill_mean']:.2f} "
          f"({', '.join(f'{k}: x{v:.2f}' for k, v in ratios['prefill'].items())}), decode x{ratios['decode']:.2f}, "
          f"params {ratios['params']:.1%}; ceiling x{expected_ceiling(30, 7):.2f}")
