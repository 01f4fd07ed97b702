"""Block removal, proven on tiny random models of each architecture (built from a config: no download).

The oracle is a model built *directly* with the kept blocks: a config with fewer layers (and the
per-layer lists sliced by hand), the dense weights copied in with block ``old`` renamed to ``new``.
A pruned model must give its logits, generate the same text with and without the KV cache, and save
and reload unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from algorithms.models.blocks import (
    block_path,
    count_parameters,
    get_blocks,
    num_blocks,
    pruned_copy,
    remove_blocks,
)

V = 101  # vocabulary
N_LAYERS = 6  # blocks of every dense model (test_objectives imports it, with build and ids)
F, S = "full_attention", "sliding_attention"
ROPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    vocab_size=V,
)


def _neo(n: int, types: list[str] | None) -> PretrainedConfig:
    """GPT-Neo; the dense model's layer types in the usual compressed form, a reference's explicit."""
    compressed = [[["global", "local"], n // 2]] if types is None else [[[t], 1] for t in types]
    return tf.GPTNeoConfig(
        num_layers=n,
        hidden_size=32,
        num_heads=4,
        max_position_embeddings=64,
        vocab_size=V,
        window_size=4,
        attention_types=compressed,
    )


# arch -> (config factory taking (n_layers, per-layer types or None), dense per-layer types, block path)
Factory = Callable[[int, "list[str] | None"], PretrainedConfig]
ARCHS: dict[str, tuple[Factory, list[str] | None, str]] = {
    "llama": (lambda n, t: tf.LlamaConfig(num_hidden_layers=n, **ROPE), None, "model.layers"),
    # one global sliding window (4 < the 12-token inputs, so the mask matters)
    "mistral": (
        lambda n, t: tf.MistralConfig(num_hidden_layers=n, sliding_window=4, **ROPE),
        None,
        "model.layers",
    ),
    # per-layer sliding / full attention: a stale layer_types gives the wrong mask or cache layer
    "qwen2": (
        lambda n, t: tf.Qwen2Config(
            num_hidden_layers=n, use_sliding_window=True, sliding_window=4, layer_types=t, **ROPE
        ),
        [F, S, S, F, S, F],
        "model.layers",
    ),
    "gemma": (lambda n, t: tf.GemmaConfig(num_hidden_layers=n, head_dim=8, **ROPE), None, "model.layers"),
    "gemma3_text": (
        lambda n, t: tf.Gemma3TextConfig(
            num_hidden_layers=n, head_dim=8, sliding_window=4, layer_types=t, **ROPE
        ),
        [S, S, F, S, S, F],
        "model.layers",
    ),
    "gpt2": (
        lambda n, t: tf.GPT2Config(n_layer=n, n_embd=32, n_head=4, n_positions=64, vocab_size=V),
        None,
        "transformer.h",
    ),
    "opt": (
        lambda n, t: tf.OPTConfig(
            num_hidden_layers=n,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            vocab_size=V,
            word_embed_proj_dim=32,
        ),
        None,
        "model.decoder.layers",
    ),
    "gpt_neox": (
        lambda n, t: tf.GPTNeoXConfig(
            num_hidden_layers=n,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            vocab_size=V,
        ),
        None,
        "gpt_neox.layers",
    ),
}
# more families, checked for equivalence and reload only
EXTRA: dict[str, tuple[Factory, list[str] | None, str]] = {
    "phi3": (lambda n, t: tf.Phi3Config(num_hidden_layers=n, pad_token_id=0, **ROPE), None, "model.layers"),
    "falcon": (
        lambda n, t: tf.FalconConfig(
            num_hidden_layers=n, hidden_size=32, num_attention_heads=4, vocab_size=V
        ),
        None,
        "transformer.h",
    ),
    "bloom": (
        lambda n, t: tf.BloomConfig(n_layer=n, hidden_size=32, n_head=4, vocab_size=V),
        None,
        "transformer.h",
    ),
    # per-layer global / local attention, stored run-length encoded in attention_types
    "gpt_neo": (_neo, None, "transformer.h"),
    # GPT-2 whose attention scale depends on layer_idx, baked in at __init__
    "gpt2_inverse_scale": (
        lambda n, t: tf.GPT2Config(
            n_layer=n, n_embd=32, n_head=4, n_positions=64, vocab_size=V, scale_attn_by_inverse_layer_idx=True
        ),
        None,
        "transformer.h",
    ),
}
ALL = {**ARCHS, **EXTRA}
NAMES = sorted(ARCHS)
DROPS = [[1, 2], [0, N_LAYERS - 1], [3]]


def make_config(arch: str, n: int = N_LAYERS, types: list[str] | None = None) -> PretrainedConfig:
    factory, dense_types, _ = ALL[arch]
    config = factory(n, types if types is not None else dense_types)
    config.pad_token_id = config.eos_token_id = None  # never stop generating early
    config.bos_token_id = 0
    return config


def build(arch: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(arch)).eval()


def kept(drop: list[int], n: int = N_LAYERS) -> list[int]:
    return [i for i in range(n) if i not in drop]


def reference(arch: str, dense: PreTrainedModel, drop: list[int]) -> PreTrainedModel:
    """A model built with the kept blocks only; block ``old`` of the dense weights becomes ``new``."""
    keep = kept(drop)
    types = ["global", "local"] * (N_LAYERS // 2) if arch == "gpt_neo" else ALL[arch][1]
    ref = AutoModelForCausalLM.from_config(make_config(arch, len(keep), types and [types[i] for i in keep]))
    prefix = ALL[arch][2] + "."
    state = {}
    for key, value in dense.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix) :].split(".", 1)
            if int(old) in drop:
                continue
            key = f"{prefix}{keep.index(int(old))}.{rest}"
        state[key] = value
    ref.load_state_dict(state, strict=True)
    if arch == "gpt2_inverse_scale":  # each block keeps the attention scale it was trained with
        for new, old in enumerate(keep):
            ref.transformer.h[new].attn.scaling = dense.transformer.h[old].attn.scaling
    return ref.eval()


def ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(1, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def assert_same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def layer_indices(model: nn.Module) -> list[set[int]]:
    """For each block, the ``layer_idx``/``layer_id`` values found inside it."""
    return [
        {
            getattr(m, a)
            for m in block.modules()
            for a in ("layer_idx", "layer_id")
            if isinstance(getattr(m, a, None), int)
        }
        for block in get_blocks(model)
    ]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.mark.parametrize("arch", sorted(ALL))
def test_block_path_of_each_architecture(arch):
    model = build(arch)
    assert block_path(model) == ALL[arch][2]
    assert num_blocks(model) == N_LAYERS and get_blocks(model) is model.get_submodule(ALL[arch][2])


@pytest.mark.parametrize("drop", DROPS, ids=str)
@pytest.mark.parametrize("arch", NAMES)
def test_pruned_equals_model_built_with_kept_blocks(arch, drop):
    dense = build(arch)
    pruned = pruned_copy(dense, drop)
    x = ids()
    assert_same(logits(pruned, x), logits(reference(arch, dense, drop), x))
    assert num_blocks(pruned) == pruned.config.num_hidden_layers == N_LAYERS - len(drop)
    assert not torch.allclose(logits(dense, x), logits(pruned, x))  # removal did something


@pytest.mark.parametrize("arch", sorted(EXTRA))
def test_more_architectures_equal_reference_and_reload(arch, tmp_path):
    dense = build(arch)
    pruned = pruned_copy(dense, [1, 2])
    x = ids()
    tol = 1e-5 if arch == "gpt2_inverse_scale" else 1e-6  # there the scale is folded into the weights
    assert_same(logits(pruned, x), logits(reference(arch, dense, [1, 2]), x), tol)
    pruned.save_pretrained(tmp_path)
    assert_same(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), x), logits(pruned, x), 0)


@pytest.mark.parametrize("arch", NAMES)
def test_generate_with_kv_cache_equals_uncached_greedy(arch):
    dense = build(arch)
    drop = [1, 4]
    pruned = pruned_copy(dense, drop)
    prompt = ids(seed=3, batch=1, length=6)
    common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(prompt, use_cache=True, **common)
        uncached = pruned.generate(prompt, use_cache=False, **common)
        expected = reference(arch, dense, drop).generate(prompt, use_cache=False, **common)
    assert cached.shape == (1, 14)  # 8 new tokens past the window of 4: sliding caches roll over
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("arch", NAMES)
def test_save_and_reload_gives_identical_model(arch, tmp_path):
    pruned = pruned_copy(build(arch), [0, 2])
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    assert_same(logits(again, x), logits(pruned, x), 0)
    assert again.config.num_hidden_layers == num_blocks(again) == N_LAYERS - 2
    types = ALL[arch][1]
    assert getattr(again.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
    if types:
        assert list(again.config.layer_types) == [types[i] for i in kept([0, 2])]
    assert again.config.blockbench_removed_blocks == [0, 2]
    assert layer_indices(again) == layer_indices(pruned)


@pytest.mark.parametrize("arch", NAMES)
def test_layer_idx_renumbered_and_original_untouched(arch):
    dense = build(arch)
    snapshot = copy.deepcopy(dense.config.to_dict())
    x = ids()
    before = logits(dense, x)
    pruned = pruned_copy(dense, [1, 2])
    assert layer_indices(pruned) == [{i} for i in range(N_LAYERS - 2)]
    for i, block in enumerate(get_blocks(pruned)):
        attention = [m for m in block.modules() if type(m).__name__.endswith("Attention")]
        assert attention and all(m.layer_idx == i for m in attention), (arch, i)
    # the dense model: same blocks, same numbering, same config, same logits
    assert layer_indices(dense) == [{i} for i in range(N_LAYERS)]
    assert dense.config.to_dict() == snapshot and not hasattr(dense.config, "blockbench_removed_blocks")
    assert_same(logits(dense, x), before, 0)
    assert not {id(b) for b in get_blocks(dense)} & {id(b) for b in get_blocks(pruned)}  # copies


@pytest.mark.parametrize("arch", NAMES)
def test_parameter_count_drops_by_the_removed_blocks(arch):
    dense = build(arch)
    per_block = [sum(p.numel() for p in b.parameters()) for b in get_blocks(dense)]
    unique = {p.data_ptr(): p.numel() for p in dense.state_dict().values() if p.is_floating_point()}
    assert count_parameters(dense) == sum(unique.values())  # tied embeddings counted once
    pruned = pruned_copy(dense, [1, 3])
    assert count_parameters(dense) - count_parameters(pruned) == per_block[1] + per_block[3]


@pytest.mark.parametrize("arch", NAMES)
def test_removing_twice_equals_removing_the_union(arch):
    dense = build(arch)
    # {4} then current [0, 4]: current 4 is dense 5, so the union is dense {0, 4, 5}
    twice = remove_blocks(pruned_copy(dense, [4]), [0, 4])
    once = pruned_copy(dense, [0, 4, 5])
    x = ids()
    assert_same(logits(twice, x), logits(once, x), 0)
    assert twice.config.blockbench_removed_blocks == once.config.blockbench_removed_blocks == [0, 4, 5]
    assert getattr(twice.config, "layer_types", None) == getattr(once.config, "layer_types", None)
    assert layer_indices(twice) == [{0}, {1}, {2}]
    # {0} then current {1} (dense 2)
    assert remove_blocks(pruned_copy(dense, [0]), [1]).config.blockbench_removed_blocks == [0, 2]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([6], "block index 6 is out of range for a model of 6 blocks"),
        ([0, -1], "block index -1 is out of range for a model of 6 blocks"),
        ([2, 3, 2], "block index 2 is given twice .*6 blocks"),
        ([0, 1, 2, 3, 4, 5], "cannot remove all 6 blocks"),
        ([1.5], "block index 1.5 is not an integer .*6 blocks"),
        (["1"], "block index '1' is not an integer"),
        ([True], "block index True is not an integer"),
    ],
)
def test_bad_indices_raise_and_change_nothing(blocks, message):
    model = build("gemma3_text")
    snapshot = model.config.to_dict()
    for call in (remove_blocks, pruned_copy):
        with pytest.raises(ValueError, match=message):
            call(model, blocks)
    assert num_blocks(model) == N_LAYERS and model.config.to_dict() == snapshot
    assert layer_indices(model) == [{i} for i in range(N_LAYERS)]


def test_an_inconsistent_removal_record_is_refused():
    model = build("llama")
    model.config.blockbench_removed_blocks = [2, 2]  # not distinct dense indices
    with pytest.raises(
        ValueError, match=r"blockbench_removed_blocks=\[2, 2\] does not fit a model of 6 blocks"
    ):
        remove_blocks(model, [0])
    assert num_blocks(model) == N_LAYERS


def test_integer_like_indices_and_empty_removal():
    model = build("llama")
    assert num_blocks(pruned_copy(model, [torch.tensor(1), 2])) == N_LAYERS - 2
    assert num_blocks(pruned_copy(model, 3)) == N_LAYERS - 1
    same = pruned_copy(model, [])
    assert num_blocks(same) == N_LAYERS and not hasattr(same.config, "blockbench_removed_blocks")


def test_qwen2_window_threshold_and_sliding_flag_follow_the_kept_blocks():
    # layers < max_window_layers use full attention: F F S S S S
    torch.manual_seed(0)
    config = tf.Qwen2Config(
        num_hidden_layers=N_LAYERS, use_sliding_window=True, sliding_window=4, max_window_layers=2, **ROPE
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.layer_types == [F, F, S, S, S, S] and model.model.has_sliding_layers
    pruned = pruned_copy(model, [1, 2, 3])
    assert pruned.config.layer_types == [F, S, S] and pruned.config.max_window_layers == 1
    # the threshold alone rebuilds the same layer types
    rebuilt = {k: v for k, v in pruned.config.to_dict().items() if k != "layer_types"}
    assert tf.Qwen2Config(**rebuilt).layer_types == pruned.config.layer_types
    assert not pruned_copy(model, [2, 3, 4, 5]).model.has_sliding_layers  # only full attention left


def test_gpt_neo_attention_types_follow_the_kept_blocks():
    pruned = pruned_copy(build("gpt_neo"), [1])  # global local global local global local
    assert pruned.config.attention_layers == ["global", "global", "local", "global", "local"]
    # the compressed form alone (what older configs are rebuilt from) gives the same layers
    rebuilt = {k: v for k, v in pruned.config.to_dict().items() if k != "attention_layers"}
    assert tf.GPTNeoConfig(**rebuilt).attention_layers == pruned.config.attention_layers


def test_multimodal_wrapper_prunes_the_language_model_only(tmp_path):
    text = dict(ROPE, num_hidden_layers=N_LAYERS, head_dim=8, sliding_window=4, layer_types=[S, S, F] * 2)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=N_LAYERS,
        image_size=28,
        patch_size=14,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=V - 1,
        boi_token_index=V - 3,
        eoi_token_index=V - 2,
    )
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    assert block_path(model) == "model.language_model.layers"
    pruned = pruned_copy(model, [1, 2])
    assert pruned.config.text_config.num_hidden_layers == N_LAYERS - 2
    assert pruned.config.text_config.layer_types == [S, S, S, F]
    assert pruned.config.vision_config.num_hidden_layers == N_LAYERS  # the vision tower is untouched
    assert len(pruned.model.vision_tower.get_submodule("encoder.layers")) == N_LAYERS
    assert (
        pruned.config.blockbench_removed_blocks
        == pruned.config.text_config.blockbench_removed_blocks
        == [1, 2]
    )
    prompt = ids(seed=3, batch=1, length=6) % (V - 3)
    common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(prompt, use_cache=True, **common)
        assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **common))
    pruned.save_pretrained(tmp_path)
    again = tf.Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_same(logits(again, prompt), logits(pruned, prompt), 0)


def test_fallback_finder_on_an_unusual_path():
    class Config:
        num_hidden_layers = 3

    class Block(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layer_id = i

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.trunk = nn.Module()
            self.trunk.stack = nn.ModuleList([Block(i) for i in range(3)])
            self.norms = nn.ModuleList([nn.LayerNorm(4) for _ in range(3)])  # same length, fewer parameters
            self.layers = nn.ModuleList([nn.Linear(4, 4)])  # a known path of the wrong length

    model = Odd()
    assert block_path(model) == "trunk.stack"
    remove_blocks(model, [1])
    assert len(model.trunk.stack) == 2 and model.config.num_hidden_layers == 2
    assert [b.layer_id for b in model.trunk.stack] == [0, 1]
    assert model.config.blockbench_removed_blocks == [1]
    with pytest.raises(ValueError, match="cannot find the block list of Linear"):
        block_path(nn.Linear(2, 2))
    model.config.num_hidden_layers = 7
    with pytest.raises(ValueError, match=r"cannot find the block list of Odd: no nn.ModuleList of 7 entries"):
        block_path(model)


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py); run them all with .ci/gpu
@pytest.mark.parametrize("arch", NAMES)
def test_cuda(arch):
    dense = build(arch).cuda()
    pruned = pruned_copy(dense, [0, 3])
    x = ids().cuda()
    ref = reference(arch, dense, [0, 3]).cuda()
    assert_same(logits(pruned, x), logits(ref, x), 1e-4)
    common = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(x[:1, :6], use_cache=True, **common)
        uncached = pruned.generate(x[:1, :6], use_cache=False, **common)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------- mixture-of-experts layouts
MOE_SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
# name -> config with 6 layers whose dense-MLP / expert layout is encoded the family's own way
MOE: dict[str, Callable[[], PretrainedConfig]] = {
    # experts where (i + 1) % 2 == 0 and i not in [3]: dense, moe, dense, dense, dense, moe
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(
        num_hidden_layers=6, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], **MOE_SIZES
    ),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        num_hidden_layers=6, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8,
        decoder_sparse_step=2, mlp_only_layers=[3], **MOE_SIZES
    ),
    # an index list: experts on layers 1, 3, 5
    "llama4_text": lambda: tf.Llama4TextConfig(
        num_hidden_layers=6, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1, head_dim=8,
        interleave_moe_layer_step=2, **MOE_SIZES
    ),
    # experts on every layer: moe_layers = [0..5] has the length of a per-layer list, but is not one
    "llama4_all_moe": lambda: tf.Llama4TextConfig(
        num_hidden_layers=6, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1, head_dim=8,
        interleave_moe_layer_step=1, **MOE_SIZES
    ),
    # a dense prefix: the first 2 layers dense
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        num_hidden_layers=6, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, **{**MOE_SIZES, "num_key_value_heads": 4}
    ),
    # a range: experts on layers 2..4
    "ernie4_5_moe": lambda: tf.Ernie4_5_MoeConfig(
        num_hidden_layers=6, moe_intermediate_size=16, moe_num_experts=4, moe_k=2, moe_layer_start_index=2,
        moe_layer_end_index=4, moe_layer_interval=1, **MOE_SIZES
    ),
}


def mlp_kinds(model: nn.Module) -> list[str]:
    """Each block's feed-forward class: a dense MLP or a mixture of experts."""
    return [type(getattr(b, "mlp", None) or b.feed_forward).__name__ for b in get_blocks(model)]


@pytest.mark.parametrize("drop", [[1], [0, 3], [1, 2], [4, 5]], ids=str)
@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_layout_follows_the_kept_blocks_and_reloads(name, drop, tmp_path):
    """The oracle is the pruned model saved and rebuilt from its own config: every weight must find its
    module (no missing or unexpected key), each block keeps its dense or expert feed-forward, and the
    logits are identical."""
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(MOE[name]()).eval()
    kinds = mlp_kinds(dense)
    assert len(set(kinds)) == (1 if name == "llama4_all_moe" else 2)  # the layout is not trivial
    pruned = pruned_copy(dense, drop)
    assert mlp_kinds(pruned) == [kinds[i] for i in kept(drop)]
    pruned.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert mlp_kinds(reloaded) == mlp_kinds(pruned)
    x = ids()
    assert_same(logits(reloaded.eval(), x), logits(pruned, x), 0)


def test_moe_index_lists_are_renumbered_not_sliced():
    pruned = pruned_copy(AutoModelForCausalLM.from_config(MOE["llama4_all_moe"]()), [1])
    assert pruned.config.moe_layers == [0, 1, 2, 3, 4]  # sliced, it would read [0, 2, 3, 4, 5]
    pruned = pruned_copy(AutoModelForCausalLM.from_config(MOE["qwen2_moe"]()), [0, 3])
    assert (pruned.config.decoder_sparse_step, pruned.config.mlp_only_layers) == (1, [1, 2])
    pruned = pruned_copy(AutoModelForCausalLM.from_config(MOE["ernie4_5_moe"]()), [0, 3])
    assert (pruned.config.moe_layer_start_index, pruned.config.moe_layer_end_index) == (1, 2)


def test_layouts_removal_cannot_describe_are_refused():
    ernie = MOE["ernie4_5_moe"]()
    ernie.moe_layer_interval = 2
    model = AutoModelForCausalLM.from_config(ernie)
    with pytest.raises(ValueError, match="moe_layer_interval"):
        remove_blocks(model, [1])
    assert num_blocks(model) == 6  # nothing changed
    jamba = tf.JambaConfig(num_hidden_layers=4, num_experts=2, attn_layer_period=2, attn_layer_offset=1,
                           expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=1,
                           mamba_dt_rank=4, **MOE_SIZES)
    model = AutoModelForCausalLM.from_config(jamba)
    with pytest.raises(ValueError, match="attn_layer_period"):
        remove_blocks(model, [1])
    assert num_blocks(model) == 4
