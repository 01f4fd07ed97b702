"""The result store: one JSON record per cell, and content-addressed caches, under one results dir.

Layout::

    RESULTS/records/<cell_id>.json          one per finished (or failed) cell
    RESULTS/cache/hidden/<key>.safetensors  captured hidden states per (model, calibration, seed)
    RESULTS/cache/scores/<key>.json         metric scores per (hidden states, metric)
    RESULTS/cache/evaluations/<name>/<key>.json  one evaluation per (model, removed block set)
    RESULTS/cache/losses/<key>.jsonl        calibration losses of removal sets, one line per set, appended
                                            as each is computed (a search resumes from them)
    RESULTS/leaderboard.{md,csv}            written by ``bench report``

Every file is written to a temporary name in the same folder, fsynced and renamed into place, so a
reader (or a rerun after ``kill -9``) sees either the whole file or none; a journal (``.jsonl``) is
appended to instead, one verified line per value, so a line cut short by ``kill -9`` is all it can lose.
Files get the mode a plain ``open`` would give them (``0o666 & ~umask``: 0644 under umask 022, 0664 under
002), so a team sharing a results folder can read (and, with a group-writable umask, rerun) each other's
results. No pickle anywhere.

*Only what verifies is trusted.* Every cache entry carries its own key and a sha256 checksum of its
content; a JSON entry is ``{"blockbench_cache": 1, "kind", "key", "sha256", "payload"}`` with the
checksum of the payload's canonical JSON (sorted keys, no spaces); a safetensors entry keeps
``blockbench_key`` and ``blockbench_sha256`` in its metadata, the checksum of its tensors (name, dtype,
shape, bytes, in name order) and of its other metadata. An entry that does not parse, holds another
key or fails its checksum is a miss: a :class:`CacheWarning` names the file and the value is computed
again (never used, never a crash). A record is trusted only when it parses as the current schema and
its ``cell_id`` is its file's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; released by the kernel when the process dies, even by kill -9
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None

import torch
from safetensors.torch import load_file, save_file

from bench.records import CellRecord, RecordError, parse_record


class CacheWarning(UserWarning):
    """A cache entry or record that does not verify (unparsable, another key or cell, a wrong checksum,
    a payload missing what its stage needs): it is ignored and its value computed again. Shown on the
    command line (Python prints a ``UserWarning`` to stderr); the message names the file."""


def distrust(path: Path, why: str) -> None:
    """Warn that ``path`` is not trusted (and will be recomputed or rerun)."""
    warnings.warn(f"{path}: {why}; ignored, computed again", CacheWarning, stacklevel=3)


_UMASK_LINE = re.compile(rb"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)


def current_umask() -> int:
    """The process umask, read without changing it where the system says it (Linux
    ``/proc/self/status``); elsewhere set and restored at once (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status", "rb") as fh:
            match = _UMASK_LINE.search(fh.read())
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, fsynced, renamed):
    readers see the whole file or none. The one way blockbench writes an output file."""
    atomic_write(path, lambda fh: fh.write(data))


def read_memo(name: str) -> tuple[Path, dict[str, Any]]:
    """A JSON memo under ``cache_root()`` (``plan-parameters.json``, ``text-checks.json``): its path and
    contents, ``{}`` when it is missing, unreadable or not a mapping (a memo only saves work)."""
    from algorithms.models.zoo import cache_root

    path = cache_root() / name
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        memo = {}
    return path, memo if isinstance(memo, dict) else {}


def atomic_write(path: Path, write) -> None:
    """``write(fh)`` into a temporary file next to ``path``, then fsync, chmod to :func:`file_mode`
    (``mkstemp`` creates 0600, which the rename would keep) and rename over ``path``. A crash at any
    point leaves the old ``path`` (or none) and at most a hidden ``.<name>.*.tmp`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.chmod(tmp, file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); best effort where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def canonical_json(data: Any) -> bytes:
    """The one byte form of a JSON value whose checksum a cache entry carries: sorted keys, no spaces,
    ASCII, no NaN. Parsing it and dumping again gives the same bytes (floats round-trip exactly)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def payload_digest(payload: Any) -> str:
    """The sha256 (hex) of a JSON payload's canonical form: the checksum a cache entry or journal line
    carries."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of a safetensors entry: its other metadata (canonical JSON), then every tensor in name
    order as name, dtype, shape and raw bytes."""
    h = hashlib.sha256(canonical_json(meta))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the states
    return h.hexdigest()


#: the layout version of a JSON cache entry (the ``blockbench_cache`` field)
CACHE_FORMAT = 1
_KEY_META, _SUM_META = "blockbench_key", "blockbench_sha256"


def write_json(path: Path, data: Any) -> None:
    payload = json.dumps(_clean(data), indent=2, sort_keys=True, allow_nan=False).encode()
    atomic_write(path, lambda fh: fh.write(payload + b"\n"))


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (a cache miss, never a crash)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class ResultStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.cache_dir = self.root / "cache"

    # records ---------------------------------------------------------------------------------
    def record_path(self, cell_id: str) -> Path:
        return self.records_dir / f"{cell_id}.json"

    def read_record(self, cell_id: str) -> CellRecord | None:
        """The cell's record, or None when it is missing, damaged, of another schema, or holds another
        cell (its ``cell_id`` is not its file's name: a warning names the file, and the cell reruns)."""
        path = self.record_path(cell_id)
        data = read_json(path)
        try:
            record = parse_record(data, where=str(path)) if data is not None else None
        except RecordError:
            return None
        if record is not None and record.cell_id != cell_id:
            distrust(path, f"holds the record of cell {record.cell_id!r}, not of {cell_id!r}; the cell is rerun")
            return None
        return record

    def is_done(self, cell_id: str) -> bool:
        """True when the cell's record verifies (:meth:`read_record`) and says ``ok``."""
        record = self.read_record(cell_id)
        return record is not None and record.ok

    def write_record(self, record: CellRecord) -> Path:
        path = self.record_path(record.cell_id)
        write_json(path, record.to_json())
        return path

    @contextlib.contextmanager
    def claim(self, cell_id: str) -> Iterator[bool]:
        """Hold an exclusive lock on a cell while it runs: yields False when another process has it.

        Two ``bench run`` processes on one results dir thus never run the same cell twice; a lock
        held by a process that died is free again at once.
        """
        self.records_dir.mkdir(parents=True, exist_ok=True)
        # 0o666 & ~umask, like every file: a teammate's process can open (and lock) it too
        fd = os.open(self.records_dir / f".{cell_id}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            yield True
        finally:
            os.close(fd)

    def records(self) -> list[CellRecord]:
        """Every readable record of the current schema (sorted by cell id); see :meth:`unreadable`."""
        return self.scan()[0]

    def unreadable(self) -> list[str]:
        """Why each record file under ``records/`` that :meth:`records` skips cannot be read (older
        schema, damaged): one message per file, naming it and saying how to rerun."""
        return self.scan()[1]

    def scan(self) -> tuple[list[CellRecord], list[str]]:
        if not self.records_dir.is_dir():
            return [], []
        out, bad = [], []
        for path in sorted(self.records_dir.glob("*.json")):
            data = read_json(path)
            if data is None:
                continue  # a torn write is never read; the cell simply runs again
            try:
                record = parse_record(data, where=str(path))
            except RecordError as exc:
                bad.append(str(exc))
                continue
            if record.cell_id != path.stem:
                bad.append(f"{path}: holds the record of cell {record.cell_id!r}, not of {path.stem!r} (rerun the "
                           "grid to write this cell's own record)")
                continue
            out.append(record)
        return out, bad

    # caches ----------------------------------------------------------------------------------
    def cache_path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.cache_dir / kind / f"{key}{suffix}"

    def get_json(self, kind: str, key: str) -> Any | None:
        """The payload of a verified JSON cache entry, or None (a miss): missing, unparsable, another
        key or kind, or a checksum that does not match (each but the first warns, naming the file)."""
        path = self.cache_path(kind, key)
        if not path.is_file():
            return None
        entry = read_json(path)
        if not isinstance(entry, dict) or entry.get("blockbench_cache") != CACHE_FORMAT or "payload" not in entry:
            distrust(path, "not a blockbench cache entry (damaged, or written by another version)")
            return None
        if entry.get("key") != key or entry.get("kind") != kind:
            distrust(path, f"holds the entry of {entry.get('kind')!r} key {entry.get('key')!r}")
            return None
        try:
            digest = payload_digest(entry["payload"])
        except (TypeError, ValueError):
            digest = None
        if digest != entry.get("sha256"):
            distrust(path, "checksum mismatch (the payload was changed after it was written)")
            return None
        return entry["payload"]

    def put_json(self, kind: str, key: str, data: Any) -> None:
        """Write ``data`` as the cache entry ``kind``/``key`` with its key and checksum."""
        payload = _clean(data)
        write_json(self.cache_path(kind, key), {
            "blockbench_cache": CACHE_FORMAT, "kind": kind, "key": key,
            "sha256": payload_digest(payload), "payload": payload,
        })

    def journal(self, kind: str, key: str) -> Journal:
        """The append-only journal ``kind``/``key`` (``RESULTS/cache/<kind>/<key>.jsonl``)."""
        return Journal(self.cache_path(kind, key, ".jsonl"), kind, key)

    def distrust(self, kind: str, key: str, why: str, suffix: str = ".json") -> None:
        """Warn that a cache entry which verified holds a payload its stage cannot use (it is computed
        again and overwritten)."""
        distrust(self.cache_path(kind, key, suffix), why)

    def get_tensors(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """``(tensors, metadata)`` of a verified safetensors cache entry (the metadata without the
        entry's own key and checksum), or None (a miss, with a warning unless the file is missing)."""
        path = self.cache_path(kind, key, ".safetensors")
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            tensors = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged cache file is a miss; it is rebuilt
            distrust(path, "not a readable safetensors file")
            return None
        stored_key, stored_sum = meta.pop(_KEY_META, None), meta.pop(_SUM_META, None)
        if stored_key != key:
            distrust(path, f"holds the entry of key {stored_key!r}")
            return None
        if stored_sum != tensors_digest(tensors, meta):
            distrust(path, "checksum mismatch (the tensors or metadata were changed after they were written)")
            return None
        return tensors, meta

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Write ``tensors`` as the safetensors cache entry ``kind``/``key``, its key and checksum in the
        metadata; atomically, fsynced, with :func:`file_mode`."""
        if _KEY_META in meta or _SUM_META in meta:
            raise ValueError(f"metadata keys {_KEY_META!r} and {_SUM_META!r} are the store's own")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {**meta, _KEY_META: key, _SUM_META: tensors_digest(tensors, meta)}
        path = self.cache_path(kind, key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


class Journal:
    """An append-only cache: values computed one by one (the calibration losses of a search), each kept
    the moment it exists, so an interrupted run loses none of them.

    Every line is one JSON entry ``{"blockbench_journal": 1, "kind", "key", "sha256", "payload"}`` with
    the checksum of the payload's canonical JSON, as in a JSON cache entry; :meth:`read` returns the
    payloads of the lines that verify, in order, and warns once (naming the file and how many) about the
    others, which are skipped: a line cut short by ``kill -9``, another key's line, an edited one. Each
    :meth:`append` is one ``write`` to a file opened with ``O_APPEND``, then fsynced (after a line cut
    short it starts a new line): two processes appending to one journal interleave whole lines."""

    FORMAT = 1

    def __init__(self, path: Path, kind: str, key: str) -> None:
        self.path = path
        self.kind = kind
        self.key = key

    def read(self) -> list[Any]:
        """The payloads of every line that verifies (none when the file is missing)."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return []
        out, bad = [], 0
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                ok = (isinstance(entry, dict) and entry.get("blockbench_journal") == self.FORMAT
                      and entry.get("kind") == self.kind and entry.get("key") == self.key
                      and payload_digest(entry["payload"]) == entry.get("sha256"))
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                out.append(entry["payload"])
            else:
                bad += 1
        if bad:
            distrust(self.path, f"{bad} line(s) do not verify (cut short, another key, or changed after they "
                                "were written)")
        return out

    def append(self, payload: Any) -> None:
        """Append one entry holding ``payload`` (made JSON-safe: non-finite floats become null)."""
        payload = _clean(payload)
        line = canonical_json({"blockbench_journal": self.FORMAT, "kind": self.kind, "key": self.key,
                               "sha256": payload_digest(payload),
                               "payload": payload}) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, file_mode())
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short: start a new one
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
