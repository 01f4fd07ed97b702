"""Text sources, the calibration / held-out split and the windowing protocol."""

import json

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
