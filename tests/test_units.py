"""Sub-layer removal (attention or MLP branches), proven on tiny random models of each supported family.

The oracle is the dense architecture with every parameter of the removed branch set to zero (its core
and the norms around it): the real modules run and the branch adds exactly zero to the residual
stream. The pruned model (branch replaced by :class:`DroppedBranch`, nothing computed) must give the
same logits, generate the same text with and without the KV cache, and save and reload unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from algorithms.models.blocks import count_parameters, get_blocks
from algorithms.models.units import (
    FAMILIES,
    RECORD_ATTR,
    DroppedBranch,
    UnitError,
    family_of,
    load_pruned,
    n_units,
    pruned_units_copy,
    remove_units,
    save_pruned,
    skip_units,
    unit_parameters,
)
from tests.test_removal import N_LAYERS, assert_same, build, ids, logits

SUPPORTED = ["llama", "mistral", "qwen2", "gemma", "gemma3_text", "gpt2", "phi3"]
DROPS = {"attention": [[0], [1, 2, 5], list(range(N_LAYERS))], "mlp": [[0, 3], [5]]}
CASES = [(arch, kind, tuple(drop)) for arch in SUPPORTED for kind, drops in DROPS.items() for drop in drops]


def zeroed(dense, kind: str, drop) -> torch.nn.Module:
    """The oracle: a copy of the dense model whose removed branches have every parameter at zero."""
    oracle = copy.deepcopy(dense)
    branch = family_of(oracle).branch(kind)
    blocks = get_blocks(oracle)
    with torch.no_grad():
        for i in drop:
            for name in branch.names():
                for p in getattr(blocks[i], name).parameters():
                    p.zero_()
    return oracle


def test_every_supported_family_is_tested():
    assert set(SUPPORTED) <= set(FAMILIES)
    assert {"llama", "gpt2", "gemma3_text"} <= set(SUPPORTED)


@pytest.mark.parametrize(("arch", "kind", "drop"), CASES, ids=[f"{a}-{k}-{list(d)}" for a, k, d in CASES])
def test_removed_branch_matches_the_zeroed_oracle(arch, kind, drop):
    dense = build(arch)
    x = ids()
    before = logits(dense, x)
    pruned = pruned_units_copy(dense, kind, drop)
    assert_same(logits(pruned, x), logits(zeroed(dense, kind, drop), x), tol=1e-5)
    assert not torch.allclose(logits(pruned, x), before, atol=1e-4)  # the branch did matter
    assert_same(logits(dense, x), before, tol=0)  # the dense model is untouched
    blocks = get_blocks(pruned)
    core = family_of(pruned).branch(kind).core
    assert [isinstance(getattr(b, core), DroppedBranch) for b in blocks] == [i in drop for i in range(N_LAYERS)]
    assert len(blocks) == N_LAYERS
    assert getattr(pruned.config, RECORD_ATTR) == {kind: list(drop)}
    per_unit = unit_parameters(dense, kind)
    assert count_parameters(dense) - count_parameters(pruned) == sum(per_unit[i] for i in drop)


@pytest.mark.parametrize(("arch", "kind", "drop"), CASES, ids=[f"{a}-{k}-{list(d)}" for a, k, d in CASES])
def test_cached_generation_equals_uncached(arch, kind, drop):
    pruned = pruned_units_copy(build(arch), kind, drop)
    x = ids(batch=1, length=6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(x, use_cache=True, **kwargs)
        uncached = pruned.generate(x, use_cache=False, **kwargs)
        oracle = zeroed(build(arch), kind, drop).generate(x, use_cache=True, **kwargs)
    assert cached.tolist() == uncached.tolist() == oracle.tolist()
    if kind == "attention":  # a dropped attention holds no keys or values
        from transformers import DynamicCache

        cache = DynamicCache(config=pruned.config)
        with torch.no_grad():
            pruned(input_ids=x, cache=cache, use_cache=True)
        for i in drop:
            assert cache.layers[i].keys.numel() == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_save_reload(arch, tmp_path):
    dense = build(arch)
    pruned = remove_units(pruned_units_copy(dense, "attention", [1, 4]), "mlp", [2])
    x = ids()
    want = logits(pruned, x)
    save_pruned(pruned, tmp_path)
    again = load_pruned(tmp_path).eval()
    assert_same(logits(again, x), want, tol=1e-6)
    assert getattr(again.config, RECORD_ATTR) == {"attention": [1, 4], "mlp": [2]}
    assert count_parameters(again) == count_parameters(pruned)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers: same function
    assert_same(logits(plain, x), want, tol=1e-5)
    assert count_parameters(plain) == count_parameters(dense)  # ... at the dense model's size


def test_skip_units_restores_the_model():
    dense = build("llama")
    x = ids()
    before = logits(dense, x)
    with skip_units(dense, "attention", [0, 2]) as masked:
        assert_same(logits(masked, x), logits(pruned_units_copy(build("llama"), "attention", [0, 2]), x), tol=0)
    assert_same(logits(dense, x), before, tol=0)
    assert not hasattr(dense.config, RECORD_ATTR) or getattr(dense.config, RECORD_ATTR) is None
    with pytest.raises(RuntimeError), skip_units(dense, "mlp", [1]):
        raise RuntimeError("boom")
    assert_same(logits(dense, x), before, tol=0)


@pytest.mark.parametrize(("arch", "family"), [("gpt_neox", "gpt_neox"), ("falcon", "falcon"), ("opt", "opt")])
def test_refused_families_are_named(arch, family):
    model = build(arch)
    with pytest.raises(UnitError, match=f"model type '{family}'"):
        pruned_units_copy(model, "attention", [1])
    assert len(get_blocks(pruned_units_copy(model, "block", [1]))) == N_LAYERS - 1  # blocks still work


def test_bad_indices_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match="out of range"):
        remove_units(model, "mlp", [N_LAYERS])
    with pytest.raises(ValueError, match="unknown unit 'head'"):
        remove_units(model, "head", [1])
    remove_units(model, "mlp", [1])
    with pytest.raises(ValueError, match="the mlp of block 1 is removed already"):
        remove_units(model, "mlp", [1])


def test_validate_refuses_branch_units_for_a_parallel_residual_folder(tmp_path):
    """`bench validate` reads the folder's config.json: a GPT-NeoX model cannot lose one branch (exit 2,
    the model type named), and the same grid with units: [block] is fine as far as units go."""
    import yaml
    from transformers import GPTNeoXConfig
    from typer.testing import CliRunner

    from bench.cli import app
    from tests.conftest import SMALL_GRID

    folder = tmp_path / "neox"
    GPTNeoXConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  vocab_size=101).save_pretrained(folder)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**SMALL_GRID, "models": [str(folder)], "units": ["block", "attention"]}))
    result = CliRunner().invoke(app, ["validate", "--grid", str(grid)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert (f"units: ['attention'] for models[0] = '{folder}': cannot remove attention or MLP sub-layers from "
            "model type 'gpt_neox': its attention and MLP branches run in parallel") in text


def test_removals_are_hashable_and_equal_by_content():
    """The Ray driver keys evaluation tasks by (model, Removal): a healing's params dict must not break it."""
    from bench.config import ComponentSpec
    from bench.stages import Removal

    a = Removal((1, 2), "mlp", ComponentSpec(name="linear", params={"ridge": 0.1}), (("seed", 0),))
    b = Removal((1, 2), "mlp", ComponentSpec(name="linear", params={"ridge": 0.1}), (("seed", 0),))
    c = Removal((1, 2), "mlp", ComponentSpec(name="linear", params={"ridge": 0.2}), (("seed", 0),))
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c, Removal((1, 2)), Removal((1, 2), "mlp")}) == 4


# ---------------------------------------------------------------------------------------- sublayer
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_sublayer_units_match_the_zeroed_oracle(arch):
    """Sub-layers [1, 2, 5] are block 0's MLP, block 1's attention and block 2's MLP (stream order)."""
    dense = build(arch)
    x = ids()
    oracle = zeroed(zeroed(dense, "mlp", [0, 2]), "attention", [1])
    with skip_units(dense, "sublayer", [1, 2, 5]) as masked:
        assert_same(logits(masked, x), logits(oracle, x), tol=1e-6)
        masked_logits = logits(masked, x)
    pruned = pruned_units_copy(dense, "sublayer", [5, 1, 2])
    assert_same(logits(pruned, x), masked_logits, tol=0)
    both = remove_units(pruned_units_copy(dense, "attention", [1]), "mlp", [0, 2])
    assert_same(logits(pruned, x), logits(both, x), tol=0)
    assert getattr(pruned.config, RECORD_ATTR) == {"attention": [1], "mlp": [0, 2]}
    attention, mlp = unit_parameters(dense, "attention"), unit_parameters(dense, "mlp")
    assert unit_parameters(dense, "sublayer") == [size for pair in zip(attention, mlp, strict=True)
                                                 for size in pair]
    assert count_parameters(dense) - count_parameters(pruned) == mlp[0] + attention[1] + mlp[2]


def test_sublayer_counts_indices_and_whole_blocks():
    dense = build("llama")
    assert n_units(dense, "sublayer") == n_units(N_LAYERS, "sublayer") == 2 * N_LAYERS
    assert n_units(dense, "mlp") == n_units(N_LAYERS, "block") == N_LAYERS
    with pytest.raises(ValueError, match="out of range"):
        pruned_units_copy(dense, "sublayer", [2 * N_LAYERS])
    # both branches of block 3 (sub-layers 6 and 7) gone: the block passes the stream through unchanged,
    # which is the model without block 3
    x = ids()
    with skip_units(dense, "sublayer", [6, 7]) as masked:
        assert_same(logits(masked, x), logits(pruned_units_copy(build("llama"), "block", [3]), x), tol=1e-6)
    everything = pruned_units_copy(dense, "sublayer", range(2 * N_LAYERS))  # allowed: head and embedding stay
    assert len(get_blocks(everything)) == N_LAYERS


def test_sublayer_save_reload(tmp_path):
    dense = build("llama")
    pruned = pruned_units_copy(dense, "sublayer", [0, 3, 8])
    x = ids()
    save_pruned(pruned, tmp_path)
    again = load_pruned(tmp_path).eval()
    assert getattr(again.config, RECORD_ATTR) == {"attention": [0, 4], "mlp": [1]}
    assert_same(logits(again, x), logits(pruned, x), tol=1e-6)
    assert count_parameters(again) == count_parameters(pruned)
