"""The result store: one JSON record per cell, and content-addressed caches, under one results dir.

Layout::

    RESULTS/records/<cell_id>.json          one per finished (or failed) cell
    RESULTS/cache/hidden/<key>.safetensors  captured hidden states per (model, calibration, seed)
    RESULTS/cache/scores/<key>.json         metric scores per (hidden states, metric)
    RESULTS/cache/eval/<key>.json           perplexity per (model, removed block set)
    RESULTS/leaderboard.{md,csv}            written by ``bench report``

Every file is written to a temporary name in the same folder and renamed into place, so a reader
(or a rerun after ``kill -9``) sees either the whole file or none. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
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


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, fsynced, renamed):
    readers see the whole file or none. The one way blockbench writes an output file."""
    _atomic_write(path, lambda fh: fh.write(data))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def write_json(path: Path, data: Any) -> None:
    payload = json.dumps(_clean(data), indent=2, sort_keys=True, allow_nan=False).encode()
    _atomic_write(path, lambda fh: fh.write(payload + b"\n"))


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
        """The cell's record, or None when it is missing, damaged or of another schema."""
        data = read_json(self.record_path(cell_id))
        try:
            return parse_record(data, where=str(self.record_path(cell_id))) if data is not None else None
        except RecordError:
            return None

    def is_done(self, cell_id: str) -> bool:
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
        fd = os.open(self.records_dir / f".{cell_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
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
                out.append(parse_record(data, where=str(path)))
            except RecordError as exc:
                bad.append(str(exc))
        return out, bad

    # caches ----------------------------------------------------------------------------------
    def cache_path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.cache_dir / kind / f"{key}{suffix}"

    def get_json(self, kind: str, key: str) -> Any | None:
        return read_json(self.cache_path(kind, key))

    def put_json(self, kind: str, key: str, data: Any) -> None:
        write_json(self.cache_path(kind, key), data)

    def get_tensors(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        path = self.cache_path(kind, key, ".safetensors")
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            return load_file(str(path)), meta
        except Exception:  # noqa: BLE001 - a damaged cache file is a miss; it is rebuilt
            return None

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        path = self.cache_path(kind, key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
