"""Block removal, proven by equivalence with a model built directly with the kept blocks.

Each architecture is a tiny random model built from its config (instant, no download).
"""

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from algorithms.blocks import (
    block_path,
    count_parameters,
    get_blocks,
    num_blocks,
    pruned_copy,
    remove_blocks,
)

V = 101
N_LAYERS = 6
ROPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, vocab_size=V)
CONFIGS = {
    "llama": lambda n: LlamaConfig(num_hidden_layers=n, **ROPE),
    "mistral": lambda n: MistralConfig(num_hidden_layers=n, sliding_window=None, **ROPE),
    "qwen2": lambda n: Qwen2Config(num_hidden_layers=n, **ROPE),
    "gemma": lambda n: GemmaConfig(num_hidden_layers=n, head_dim=8, **ROPE),
    # alternating sliding / full attention with a small window: a stale layer_types shows up at once
    "gemma3_text": lambda n: Gemma3TextConfig(
        num_hidden_layers=n, head_dim=8, sliding_window=4,
        layer_types=[("full_attention" if i % 3 == 2 else "sliding_attention") for i in range(n)], **ROPE,
    ),
    "gpt2": lambda n: GPT2Config(n_layer=n, n_embd=32, n_head=4, n_positions=64, vocab_size=V),
    "opt": lambda n: OPTConfig(num_hidden_layers=n, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                               max_position_embeddings=64, vocab_size=V, word_embed_proj_dim=32),
    "gpt_neox": lambda n: GPTNeoXConfig(num_hidden_layers=n, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, max_position_embeddings=64, vocab_size=V),
}
ARCHS = sorted(CONFIGS)


def build(arch, n=N_LAYERS, seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[arch](n)
    config.pad_token_id = config.eos_token_id = None
    config.bos_token_id = 0
    return AutoModelForCausalLM.from_config(config).eval()


def reference(model, drop):
    """A model built directly with the kept blocks, weights copied block by block."""
    n = num_blocks(model)
    keep = [i for i in range(n) if i not in drop]
    config = AutoConfig.for_model(**model.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None and len(config.layer_types) == n:
        config.layer_types = [model.config.layer_types[i] for i in keep]
    ref = AutoModelForCausalLM.from_config(config).eval()
    prefix = block_path(model) + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in drop:
                continue
            key = f"{prefix}{keep.index(int(idx))}.{rest}"
        state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref


def ids(seed=1, batch=2, length=12):
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


DROPS = [[1, 2], [0, N_LAYERS - 1], [3]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drop", DROPS, ids=str)
def test_pruned_equals_model_built_with_kept_blocks(arch, drop):
    dense = build(arch)
    pruned = pruned_copy(dense, drop)
    ref = reference(dense, drop)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=x).logits, ref(input_ids=x).logits, rtol=0, atol=0)
    assert num_blocks(pruned) == N_LAYERS - len(drop) == pruned.config.num_hidden_layers
    assert num_blocks(dense) == N_LAYERS  # the original is untouched
    with torch.no_grad():
        assert not torch.allclose(dense(input_ids=x).logits, pruned(input_ids=x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_idx_renumbered_and_config_sliced(arch):
    dense = build(arch)
    before = list(getattr(dense.config, "layer_types", None) or [])
    pruned = pruned_copy(dense, [1, 2])
    for new_idx, block in enumerate(get_blocks(pruned)):
        indices = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices == {new_idx}, (arch, new_idx, indices)
    if before:
        assert list(pruned.config.layer_types) == [before[i] for i in (0, 3, 4, 5)]
    assert pruned.config.blockbench_removed_blocks == [1, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_cache_equals_uncached_greedy(arch):
    pruned = pruned_copy(build(arch), [1, 4])
    prompt = ids(seed=3, batch=1, length=6)
    common = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(prompt, use_cache=True, **common)
        uncached = pruned.generate(prompt, use_cache=False, **common)
    assert cached.shape == (1, 16)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_gives_identical_logits(arch, tmp_path):
    pruned = pruned_copy(build(arch), [0, 2])
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=x).logits, again(input_ids=x).logits, rtol=0, atol=0)
    assert again.config.num_hidden_layers == N_LAYERS - 2
    assert getattr(again.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    assert again.config.blockbench_removed_blocks == [0, 2]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_removing_twice_equals_removing_the_union(arch):
    dense = build(arch)
    twice = remove_blocks(pruned_copy(dense, [0]), [1])  # current index 1 = dense block 2
    once = pruned_copy(dense, [0, 2])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(twice(input_ids=x).logits, once(input_ids=x).logits, rtol=0, atol=0)
    assert twice.config.blockbench_removed_blocks == [0, 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_drops_by_the_removed_blocks(arch):
    dense = build(arch)
    per_block = [sum(p.numel() for p in b.parameters()) for b in get_blocks(dense)]
    pruned = pruned_copy(dense, [1, 3])
    assert count_parameters(dense) - count_parameters(pruned) == per_block[1] + per_block[3]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [([6], "block index 6 is out of range for a model of 6 blocks"),
     ([-1], "block index -1 is out of range"),
     ([2, 2], "block index 2 is given twice"),
     ([0, 1, 2, 3, 4, 5], "cannot remove all 6 blocks"),
     ([1.5], "block index 1.5 is not an integer")],
)
def test_bad_indices(blocks, message):
    model = build("llama")
    with pytest.raises(ValueError, match=message):
        remove_blocks(model, blocks)
    assert num_blocks(model) == N_LAYERS  # nothing changed


def test_fallback_finder_on_unusual_path():
    class Config:
        num_hidden_layers = 3

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.trunk = nn.Module()
            self.trunk.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    model = Odd()
    assert block_path(model) == "trunk.stack"
    remove_blocks(model, [1])
    assert len(model.trunk.stack) == 2 and model.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="cannot find the block list of Linear"):
        block_path(nn.Linear(2, 2))
