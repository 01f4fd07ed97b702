"""Calibration and held-out text, tokenised into fixed-length windows.

Sources (a string in the grid config):

- ``wikipedia`` (default): the English Wikipedia excerpt shipped in gensim's test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, ~100 articles, 480K words),
  markup stripped with gensim's ``filter_wiki``.
- ``news``: the Lee news corpus in gensim's test data (``lee_background.cor``, one article per line).
- a local path: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line with a
  ``text`` field) or a folder of ``.txt`` files.
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset with a ``text`` column, when the ``datasets``
  package is installed and the user has access (never used by the built-in configs).

Every source is a list of documents. A document goes to the *held-out* part when a hash of its text
falls in the held-out share (default 20%), otherwise to the *calibration* part, so the two never
overlap and the split does not depend on document order.

Windowing protocol (shared by calibration and perplexity): documents of one part are joined with a
blank line, tokenised once without special tokens, and cut into consecutive non-overlapping windows
of ``seq_len`` tokens. When the tokenizer adds a BOS token by default (Gemma, Llama 2/3: these models
read text badly without it; Gemma-3-270M's perplexity goes from 57 to 23), every window starts with
BOS followed by ``seq_len - 1`` text tokens; otherwise (SmolLM2, GPT-2) no BOS is added. Calibration draws ``samples`` windows with a seeded generator;
perplexity takes the first ``max_windows`` windows in order.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import torch

Part = Literal["calibration", "heldout"]
HELDOUT_SHARE = 0.2
BUILTIN_SOURCES = ("wikipedia", "news")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


class DataError(ValueError):
    """A text source that cannot provide what was asked (missing file, too little text)."""


def _gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath

    path = Path(datapath(name))
    if not path.exists():  # pragma: no cover - depends on the gensim build
        raise DataError(f"gensim's test data has no {name}; reinstall gensim")
    return path


_WIKI_CLEAN = [
    (re.compile(r"'{2,}"), ""),  # bold/italic quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # headings
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n\s*(\n\s*)+"), "\n\n"),
]


def _wikipedia_documents() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(_gensim_file(WIKI_FILE), "rb") as fh:
        for _title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text)
            for pattern, repl in _WIKI_CLEAN:
                clean = pattern.sub(repl, clean)
            clean = "\n".join(line.strip() for line in clean.strip().splitlines())
            if len(clean.split()) >= 50:
                docs.append(clean)
    return docs


def _news_documents() -> list[str]:
    lines = _gensim_file(NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _file_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"text folder {str(path)!r} holds no .txt files")
        return [d for f in files for d in _file_documents(f)]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{n}: each JSONL line needs a string field 'text'")
            docs.append(obj["text"])
        return docs
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _hf_documents(spec: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"source {spec!r} needs the 'datasets' package: pip install 'blockbench[hf]'") from None
    name, _, split = spec[3:].partition("@")
    name, _, config = name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def check_source(source: str) -> None:
    """Raise :class:`DataError` if ``source`` names nothing readable (cheap: no tokenising)."""
    if source in BUILTIN_SOURCES or source.startswith("hf:"):
        return
    if not Path(source).expanduser().exists():
        raise DataError(
            f"text source {source!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}), "
            "an existing path, nor 'hf:NAME'"
        )


@functools.lru_cache(maxsize=8)
def load_documents(source: str) -> tuple[str, ...]:
    """All documents of a source, in a stable order."""
    check_source(source)
    if source == "wikipedia":
        docs = _wikipedia_documents()
    elif source == "news":
        docs = _news_documents()
    elif source.startswith("hf:"):
        docs = _hf_documents(source)
    else:
        docs = _file_documents(Path(source).expanduser())
    if not docs:
        raise DataError(f"text source {source!r} holds no documents")
    return tuple(docs)


def _is_heldout(doc: str) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_SHARE


def split_documents(source: str, part: Part) -> list[str]:
    """The calibration or held-out documents of ``source`` (disjoint by construction)."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    want_heldout = part == "heldout"
    docs = [d for d in load_documents(source) if _is_heldout(d) == want_heldout]
    if not docs:
        raise DataError(f"text source {source!r} has no {part} documents (too few documents to split)")
    return docs


def source_fingerprint(source: str) -> str:
    """A hash of the source's documents, so caches notice when a user's file changes."""
    h = hashlib.sha256()
    for doc in load_documents(source):
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _token_stream(tokenizer, source: str, part: Part) -> torch.Tensor:
    text = "\n\n".join(split_documents(source, part))
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def default_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by default (Gemma, Llama 2/3), else None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _windows(tokenizer, source: str, part: Part, seq_len: int) -> torch.Tensor:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream = _token_stream(tokenizer, source, part)
    bos = default_bos(tokenizer)
    width = seq_len - 1 if bos is not None else seq_len
    n = stream.numel() // width
    windows = stream[: n * width].view(n, width)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
    return windows


def calibration_batch(tokenizer, source: str, *, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from the calibration part, picked by ``seed``."""
    windows = _windows(tokenizer, source, "calibration", seq_len)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if samples > windows.shape[0]:
        raise DataError(
            f"calibration text of {source!r} is too short: {windows.shape[0]} windows of {seq_len} tokens "
            f"available, samples={samples} requested"
        )
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(windows.shape[0], generator=gen)[:samples]
    return windows[pick].clone()


def heldout_windows(tokenizer, source: str, *, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The first ``max_windows`` held-out windows of ``seq_len`` tokens (all when None)."""
    windows = _windows(tokenizer, source, "heldout", seq_len)
    if windows.shape[0] == 0:
        raise DataError(f"held-out text of {source!r} is shorter than one window of {seq_len} tokens")
    return windows[:max_windows].clone() if max_windows else windows.clone()
