"""Hook capture equals the model's own residual stream, and the last depth is the raw block output."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from algorithms.models.capture import capture_hidden_states, nonfinite_depths


def tiny_llama(layers=4):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_capture_matches_output_hidden_states_and_skips_final_norm():
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    states, stats = capture_hidden_states(model, ids, batch_size=2)
    assert states.shape == (5, 3, 10, 32) and states.dtype == torch.float32
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    for depth in range(4):
        torch.testing.assert_close(states[depth], out.hidden_states[depth])
    # transformers' last hidden state is after the final norm; ours is the raw output of block 3
    assert not torch.allclose(states[4], out.hidden_states[4])
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(states[4]), out.hidden_states[4])
    # the free calibration loss equals a direct computation
    logits = out.logits[:, :-1].reshape(-1, 97)
    nll = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)).item()
    assert abs(stats["calib_nll"] - nll) < 1e-5


def test_hooks_are_removed():
    model = tiny_llama()
    capture_hidden_states(model, torch.zeros(1, 4, dtype=torch.long))
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.layers)


def test_capture_and_mean_nll_report_windows_done():
    from algorithms.models.nll import mean_nll

    model = tiny_llama()
    ids = torch.randint(0, 97, (5, 8), generator=torch.Generator().manual_seed(0))
    calls = []
    capture_hidden_states(model, ids, batch_size=2, progress=lambda *a: calls.append(a))
    assert calls == [("windows", 2, 5, "windows"), ("windows", 4, 5, "windows"), ("windows", 5, 5, "windows")]
    calls.clear()
    mean_nll(model, ids, batch_size=3, progress=lambda *a: calls.append(a))
    assert calls == [("windows", 3, 5, "windows"), ("windows", 5, 5, "windows")]


def test_release_free_host_memory_runs_on_glibc_and_is_harmless_elsewhere():
    """The capture step calls it before allocating a group's states (README "Performance", the memory of
    configs/full.yaml): on Linux with glibc it calls malloc_trim and says so; elsewhere it does nothing."""
    import platform
    import sys

    from bench.stages import release_free_host_memory

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert release_free_host_memory() is expected


def test_nonfinite_depths_names_each_bad_depth_and_checks_one_depth_at_a_time(monkeypatch):
    """NaN at depth 1, -inf at depth 3, the largest float16 at depth 2 (finite): depths [1, 3]; and
    ``torch.isfinite`` never sees more than one depth (a whole-tensor check of full.yaml's 1.17 GB of
    states peaked 1.95 GB above them)."""
    states = torch.zeros(5, 2, 3, 4, dtype=torch.float16)
    states[1, 0, 2, 1] = float("nan")
    states[2] = 65504.0
    states[3, 1, 0, 3] = float("-inf")
    seen = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.shape) or real(t))
    assert nonfinite_depths(states) == [1, 3]
    assert seen == [torch.Size([2, 3, 4])] * 5
    assert nonfinite_depths(torch.zeros(3, 2, 2, 2)) == []
    assert nonfinite_depths(torch.zeros(2, 1, 1, 1, dtype=torch.int32)) == [0, 1]
