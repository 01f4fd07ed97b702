"""Models dispatched by accelerate (``device_map``, issue 19 item 3), proven on CPU: a tiny model saved to
disk and loaded with some blocks on the CPU and others offloaded to disk (their parameters on the
``meta`` device, brought in by accelerate's hooks for each forward pass) gives the logits, pruned
logits, masked NLL, captured states and cached greedy continuations of the same model loaded whole;
the grid accepts ``device_map`` / ``max_memory`` / ``offload_folder`` on a model, keeps the cell ids
of grids without them, and refuses healing with a dispatched model."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from algorithms.models.blocks import get_blocks, pruned_copy
from algorithms.models.capture import capture_hidden_states
from algorithms.models.decoding import greedy_continuations
from algorithms.models.masking import skip_blocks
from algorithms.models.nll import mean_nll
from algorithms.models.placement import input_device, is_dispatched
from algorithms.models.prefix import recording
from algorithms.models.units import skip_units
from algorithms.models.zoo import load_model
from bench.config import ConfigError, parse_config
from bench.grid import expand
from tests.conftest import SMALL_GRID

V = 101
#: embeddings offloaded too: their parameters are on ``meta``, so the first parameter's device is no answer
MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
       "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
IDS = torch.randint(1, V, (3, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
    whole = AutoModelForCausalLM.from_config(config).eval()
    whole.save_pretrained(root / "model")
    tf.PreTrainedTokenizerFast(tokenizer_object=_tokenizer()).save_pretrained(root / "model")
    dispatched, _, info = load_model(str(root / "model"), device_map=MAP, offload_folder=str(root / "offload"))
    return whole, dispatched, info


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))


def test_the_map_is_applied_and_inputs_go_where_the_embeddings_run(models):
    whole, dispatched, info = models
    assert is_dispatched(dispatched) and not is_dispatched(whole)
    assert dispatched.model.embed_tokens.weight.device.type == "meta"  # offloaded
    assert {p.device.type for p in get_blocks(dispatched)[1].parameters()} == {"meta"}
    assert {p.device.type for p in get_blocks(dispatched)[0].parameters()} == {"cpu"}
    assert input_device(dispatched) == torch.device("cpu") == input_device(whole)
    assert info["n_blocks"] == 4 and info["parameters"] == sum(p.numel() for p in whole.parameters())


def test_logits_removal_and_masking_equal_the_whole_model(models):
    whole, dispatched, _ = models
    with torch.inference_mode():
        assert torch.equal(dispatched(input_ids=IDS).logits, whole(input_ids=IDS).logits)
        reference = pruned_copy(whole, [1, 2])(input_ids=IDS).logits
        with skip_blocks(dispatched, [1, 2]):
            assert len(get_blocks(dispatched)) == 2
            assert torch.equal(dispatched(input_ids=IDS).logits, reference)
        assert len(get_blocks(dispatched)) == 4
        assert torch.equal(dispatched(input_ids=IDS).logits, whole(input_ids=IDS).logits)  # restored
    with skip_units(dispatched, "attention", [1, 3]), skip_units(whole, "attention", [1, 3]):
        assert mean_nll(dispatched, IDS, batch_size=2) == mean_nll(whole, IDS, batch_size=2)


def test_capture_prefix_and_cached_generation_equal_the_whole_model(models):
    whole, dispatched, _ = models
    states, stats = capture_hidden_states(dispatched, IDS, batch_size=2)
    expected, expected_stats = capture_hidden_states(whole, IDS, batch_size=2)
    assert torch.equal(states, expected) and stats == expected_stats
    with recording(dispatched, [1, 2, 3]) as prefix:
        mean_nll(dispatched, IDS, batch_size=2)
    assert torch.equal(prefix.states[3][0], expected[3, :2])
    assert torch.equal(greedy_continuations(dispatched, IDS[:, :5], 6), greedy_continuations(whole, IDS[:, :5], 6))
    with skip_blocks(dispatched, [2]), skip_blocks(whole, [2]):
        assert torch.equal(greedy_continuations(dispatched, IDS[:, :5], 6), greedy_continuations(whole, IDS[:, :5], 6))


def test_the_grid_takes_placement_and_keeps_other_cell_ids():
    plain = parse_config(SMALL_GRID)
    placed = parse_config({**SMALL_GRID, "models": [{"name": "smollm2-135m", "device_map": "auto",
                                                      "max_memory": {0: "20GiB", "cpu": "60GiB"}}]})
    assert placed.models[0].max_memory == {0: "20GiB", "cpu": "60GiB"}
    assert expand(plain)[0].model == {"name": "smollm2-135m", "trust_remote_code": False}  # ids as before
    assert expand(placed)[0].model == {"name": "smollm2-135m", "trust_remote_code": False, "device_map": "auto",
                                       "max_memory": {"0": "20GiB", "cpu": "60GiB"}}
    assert {c.cell_id for c in expand(plain)}.isdisjoint(c.cell_id for c in expand(placed))


@pytest.mark.parametrize(("model", "extra", "message"), [
    ({"name": "smollm2-135m", "max_memory": {0: "1GiB"}}, {},
     r"\nmodels\[0\]\.max_memory: given without device_map; set device_map \(e.g. auto\) or leave max_memory out"),
    ({"name": "smollm2-135m", "device_map": "everywhere"}, {}, r"\nmodels\[0\]\.device_map\b"),
    ({"name": "smollm2-135m", "device_map": "auto"}, {"healing": ["lora"]},
     r"models\[0\]\.device_map: healing \(lora\) trains a copy of the pruned model"),
])
def test_bad_placement_names_the_key(model, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**SMALL_GRID, "models": [model], **extra})
