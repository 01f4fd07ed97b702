"""Text sources, the calibration / held-out split and the windowing protocol."""

import json
import re

import pytest
import torch

from algorithms import data


class CharTokenizer:
    """One token per character: enough to check windowing without a model."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


TOK = CharTokenizer()


def test_wikipedia_excerpt_is_split_without_overlap():
    calib = data.split_documents("wikipedia", "calibration")
    held = data.split_documents("wikipedia", "heldout")
    assert len(calib) + len(held) == len(data.load_documents("wikipedia"))
    assert 80 <= len(calib) + len(held) <= 120  # ~100 cleaned articles
    assert set(calib).isdisjoint(held)
    assert 0.1 < len(held) / (len(calib) + len(held)) < 0.35
    words = sum(len(d.split()) for d in calib + held)
    assert words > 300_000
    assert "'''" not in calib[0] and "[[" not in calib[0]  # markup is gone


def test_news_source_reads_lee_corpus():
    docs = data.load_documents("news")
    assert len(docs) > 250 and all(d == d.strip() for d in docs)


def test_calibration_batch_is_seeded_and_from_calibration_part():
    a = data.calibration_batch(TOK, "wikipedia", samples=4, seq_len=64, seed=0)
    b = data.calibration_batch(TOK, "wikipedia", samples=4, seq_len=64, seed=0)
    c = data.calibration_batch(TOK, "wikipedia", samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    held = data.heldout_windows(TOK, "wikipedia", seq_len=64, max_windows=None)
    held_rows = {tuple(r) for r in held.tolist()}
    assert not any(tuple(r) in held_rows for r in a.tolist())


def test_heldout_windows_are_consecutive_and_capped():
    w = data.heldout_windows(TOK, "wikipedia", seq_len=32, max_windows=3)
    stream = data._token_stream(TOK, "wikipedia", "heldout")
    assert w.shape == (3, 32)
    assert torch.equal(w.reshape(-1), stream[:96])


def test_local_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(f"document number {i} " * 20 for i in range(40)))
    docs = data.load_documents(str(txt))
    assert len(docs) == 40
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 30}) for i in range(30)))
    assert len(data.load_documents(str(jsonl))) == 30
    batch = data.calibration_batch(TOK, str(jsonl), samples=2, seq_len=16, seed=3)
    assert batch.shape == (2, 16)


def test_bad_sources_and_too_short_text(tmp_path):
    with pytest.raises(data.DataError, match="nope.txt"):
        data.load_documents(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: .*'text'"):
        data.load_documents(str(bad))
    with pytest.raises(data.DataError, match=r"too short: \d+ windows of 100000 tokens available, samples=50"):
        data.calibration_batch(TOK, "news", samples=50, seq_len=100_000, seed=0)


def test_source_fingerprint_tracks_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("alpha beta\n\ngamma delta")
    first = data.source_fingerprint(str(f))
    data.load_documents.cache_clear()
    f.write_text("alpha beta\n\ngamma epsilon")
    assert data.source_fingerprint(str(f)) != first


class BosTokenizer(CharTokenizer):
    """Adds BOS (id 1) by default, as Gemma's and Llama 3's tokenizers do."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_bos_leads_every_window_when_the_tokenizer_adds_one():
    plain = data.heldout_windows(TOK, "wikipedia", seq_len=32, max_windows=3)
    with_bos = data.heldout_windows(BosTokenizer(), "wikipedia", seq_len=32, max_windows=3)
    assert with_bos.shape == (3, 32)
    assert (with_bos[:, 0] == 1).all()
    # the text tokens continue without gaps: 31 per window
    assert torch.equal(with_bos[:, 1:].reshape(-1), plain.reshape(-1)[:93])
    assert data.default_bos(TOK) is None and data.default_bos(BosTokenizer()) == 1


def test_hostile_text_sources_are_refused_before_tokenising(tmp_path, monkeypatch):
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\x00\x01\x02')
    with pytest.raises(data.DataError, match=r"is binary data, not text \(NUL byte at offset 15\)"):
        data.check_source(str(binary))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("naïve".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"is not UTF-8 text \(byte 0xef at offset 2\)"):
        data.check_source(str(latin))
    with pytest.raises(data.DataError, match="'/dev/zero' is not a regular file or a folder"):
        data.check_source("/dev/zero")
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as fh:
        fh.truncate(data.MAX_SOURCE_BYTES + 1)  # sparse: never read
    with pytest.raises(data.DataError, match="is larger than 256 MiB"):
        data.check_source(str(huge))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("word " * 100)
    monkeypatch.setattr(data, "MAX_SOURCE_BYTES", 1000)  # a folder's files count together
    with pytest.raises(data.DataError, match="holds more than"):
        data._file_documents(folder)
    monkeypatch.undo()
    assert len(data.load_documents(str(folder))) == 3
    (folder / "3.txt").mkdir()
    data.load_documents.cache_clear()
    with pytest.raises(data.DataError, match=r"3.txt' is not a regular file"):
        data.check_source(str(folder))


@pytest.mark.parametrize(("source", "message"), [
    ("hf:", "names no dataset"),
    ("hf:../../etc", "'../../etc' is not a Hugging Face dataset id"),
    ("hf:/etc/passwd", "is not a Hugging Face dataset id"),
    ("hf:a b", "is not a Hugging Face dataset id"),
    ("hf:owner/name/extra", "is not a Hugging Face dataset id"),
    ("hf:owner/name:", "'' is not a dataset config name"),
    ("hf:owner/name@tr ain", "'tr ain' is not a split"),
    ("hf:nobody/no-such-set:cfg@train[:10%]", "dataset 'nobody/no-such-set' is not in the local Hugging Face cache"),
])
def test_hf_names_are_checked_offline(source, message, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.check_source(source)


def test_hf_dataset_in_the_hub_cache_passes_the_check(tmp_path, monkeypatch):
    import importlib.util

    from huggingface_hub import constants

    if importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets is not installed")
    (tmp_path / "hub" / "datasets--someone--corpus" / "snapshots").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data.check_source("hf:someone/corpus@train")
