"""Calibration and held-out text, tokenised into fixed-length windows.

Sources (a string in the grid config):

- ``wikipedia`` (default): the English Wikipedia excerpt shipped in gensim's test data
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, ~100 articles, 480K words),
  markup stripped with gensim's ``filter_wiki``.
- ``news``: the Lee news corpus in gensim's test data (``lee_background.cor``, one article per line).
- a local path: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line with a
  ``text`` field) or a folder of ``.txt`` files. Only regular files are read (never ``/dev/zero`` or a
  pipe), at most :data:`MAX_SOURCE_BYTES` in all, and they must be UTF-8 text without NUL bytes.
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset with a ``text`` column, when the ``datasets``
  package is installed and the dataset is in the local Hugging Face cache already (never used by the
  built-in configs). ``NAME`` is a hub id (``owner/name``: letters, digits, ``-``, ``_``, ``.``);
  :func:`check_source` (``bench validate``) never reaches the network.

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
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, Literal

import torch

Part = Literal["calibration", "heldout"]
HELDOUT_SHARE = 0.2
BUILTIN_SOURCES = ("wikipedia", "news")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
#: the most bytes a local text source (a file, or a folder's .txt files together) may hold: 256 MiB
MAX_SOURCE_BYTES = 256 * 2**20
_HF_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_-])?"
_HF_NAME = re.compile(rf"{_HF_PART}(?:/{_HF_PART})?")
_HF_CONFIG = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_HF_SPLIT = re.compile(r"[A-Za-z0-9_.:%+\[\]-]{1,100}")


class DataError(ValueError):
    """A text source that cannot provide what was asked (missing file, too little text)."""


def _gensim_file(name: str) -> Path:
    """A file of gensim's test data (``gensim/test/test_data``, what ``gensim.test.utils.datapath``
    gives), found without importing gensim (1-2 s)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - gensim is a dependency
        raise DataError("gensim is not installed; the built-in text sources come from its test data")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
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


def _read_text(path: Path, budget: int | None = None) -> str:
    """A regular file's UTF-8 text (a leading BOM dropped): :class:`DataError` for anything else, for more
    than ``budget`` bytes (default :data:`MAX_SOURCE_BYTES`), for a NUL byte or for bytes that are not UTF-8."""
    budget = MAX_SOURCE_BYTES if budget is None else budget
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a pipe must not block the open
    except OSError as exc:
        raise DataError(f"text source {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"text source {str(path)!r} is not a regular file")
        raw = fh.read(budget + 1)
    if len(raw) > budget:
        raise DataError(f"text source {str(path)!r} is larger than {MAX_SOURCE_BYTES // 2**20} MiB "
                        "(algorithms.data.MAX_SOURCE_BYTES)")
    if (nul := raw.find(b"\0")) >= 0:
        raise DataError(f"text source {str(path)!r} is binary data, not text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"text source {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start})") from None


def _file_documents(path: Path, budget: int | None = None) -> list[str]:
    budget = MAX_SOURCE_BYTES if budget is None else budget
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"text folder {str(path)!r} holds no .txt files")
        docs = []
        for f in files:
            if not f.is_file():
                raise DataError(f"text source {str(f)!r} is not a regular file")
            if (budget := budget - f.stat().st_size) < 0:
                raise DataError(f"text folder {str(path)!r} holds more than {MAX_SOURCE_BYTES // 2**20} MiB of "
                                ".txt files (algorithms.data.MAX_SOURCE_BYTES)")
            docs += _file_documents(f, budget + f.stat().st_size)
        return docs
    text = _read_text(path, budget)
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
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
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _hf_parts(spec: str) -> tuple[str, str | None, str]:
    """``(name, config, split)`` of ``hf:NAME[:CONFIG][@SPLIT]``; :class:`DataError` for a name that is
    not a hub id (an empty one, ``..``, a path, odd characters)."""
    name, at, split = spec[3:].partition("@")
    name, colon, config = name.partition(":")
    form = "hf:NAME[:CONFIG][@SPLIT]"
    if not name:
        raise DataError(f"text source {spec!r} names no dataset: write {form}")
    if not _HF_NAME.fullmatch(name) or ".." in name:
        raise DataError(f"text source {spec!r}: {name!r} is not a Hugging Face dataset id (owner/name of "
                        "letters, digits, '-', '_', '.'); a local file or folder is given by its path")
    if colon and not _HF_CONFIG.fullmatch(config):
        raise DataError(f"text source {spec!r}: {config!r} is not a dataset config name ({form})")
    if at and not _HF_SPLIT.fullmatch(split):
        raise DataError(f"text source {spec!r}: {split!r} is not a split such as train or train[:10%] ({form})")
    return name, config or None, split or "train"


def _hf_cached(name: str) -> bool:
    """Whether dataset ``name`` is in the local Hugging Face caches (the hub's or the datasets library's):
    what an offline load can find. Looks at folder names only: no network."""
    import importlib.util

    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    if (hub / "snapshots").is_dir():
        return True
    if importlib.util.find_spec("datasets") is None:
        return False
    folder = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    wanted = {name.replace("/", "___").lower(), name.split("/")[-1].lower()}
    try:
        return any(entry.is_dir() and entry.name.lower() in wanted for entry in folder.iterdir())
    except OSError:
        return False


def _check_hf(spec: str) -> tuple[str, str | None, str]:
    from algorithms import extras

    name, config, split = _hf_parts(spec)
    if not extras.HF_DATASETS.available():
        raise DataError(f"source {spec!r} {extras.needs((extras.HF_DATASETS,))}")
    if not _hf_cached(name):
        raise DataError(f"text source {spec!r}: dataset {name!r} is not in the local Hugging Face cache; "
                        f"download it once (python -c \"import datasets; datasets.load_dataset('{name}')\") "
                        "or give a local file")
    return name, config, split


def _hf_documents(spec: str) -> list[str]:
    name, config, split = _check_hf(spec)
    import datasets

    ds = datasets.load_dataset(name, config, split=split)
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def _source_path(source: str) -> Path:
    """The file or folder a local source names: :class:`DataError` when it is missing, or is neither a
    regular file nor a folder (``/dev/zero``, a pipe), or holds more than :data:`MAX_SOURCE_BYTES`."""
    path = Path(source).expanduser()
    if not source or not path.exists():
        raise DataError(
            f"text source {source!r} is neither a built-in ({', '.join(BUILTIN_SOURCES)}), "
            "an existing path, nor 'hf:NAME'"
        )
    if not path.is_file() and not path.is_dir():
        raise DataError(f"text source {source!r} is not a regular file or a folder")
    if path.is_file() and path.stat().st_size > MAX_SOURCE_BYTES:
        raise DataError(f"text source {source!r} is larger than {MAX_SOURCE_BYTES // 2**20} MiB "
                        "(algorithms.data.MAX_SOURCE_BYTES)")
    return path


def check_source(source: str) -> None:
    """Raise :class:`DataError` if ``source`` names nothing readable, without tokenising or any network:
    a built-in; an ``hf:`` dataset id found in the local cache; a local file or folder, read once (and
    kept for the run) to check its size, its text (UTF-8, no NUL bytes) and its JSONL lines."""
    if source in BUILTIN_SOURCES:
        return
    if source.startswith("hf:"):
        _check_hf(source)
        return
    _source_path(source)
    load_documents(source)


@functools.lru_cache(maxsize=8)
def load_documents(source: str) -> tuple[str, ...]:
    """All documents of a source, in a stable order."""
    if source == "wikipedia":
        docs = _wikipedia_documents()
    elif source == "news":
        docs = _news_documents()
    elif source.startswith("hf:"):
        docs = _hf_documents(source)
    else:
        docs = _file_documents(_source_path(source))
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


#: a file changed less than this long ago has no :func:`source_version` (file times are coarse)
_RACY_NS = 2_000_000_000


def file_versions(paths: list[Path]) -> list[list[Any]] | None:
    """``[path, size, mtime_ns, inode]`` of each file: a cheap stand-in for their contents in memo keys
    (what git's index and the zoo's digest memo key on). None when a file is missing or changed less
    than two seconds ago (a rewrite within the clock's granularity could keep its time)."""
    now = time.time_ns()
    out: list[list[Any]] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            return None
        if now - st.st_mtime_ns < _RACY_NS:
            return None
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def source_version(source: str) -> list[list[Any]] | None:
    """The versions (:func:`file_versions`) of the files a source reads, without reading them: a
    built-in's gensim file, a local file, a folder's ``.txt`` files. None when that is not known cheaply
    (``hf:`` datasets, a missing path, a file changed moments ago): then nothing may be memoised."""
    if source == "wikipedia":
        return file_versions([_gensim_file(WIKI_FILE)])
    if source == "news":
        return file_versions([_gensim_file(NEWS_FILE)])
    if source.startswith("hf:"):
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return file_versions(sorted(path.glob("*.txt")))
    return file_versions([path]) if path.is_file() else None


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
