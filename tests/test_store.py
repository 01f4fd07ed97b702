"""The result store trusts only what verifies, writes atomically and with the user's umask; each test
fails without the promise it names."""

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import store as store_module
from bench.records import CellRecord
from bench.store import (
    CacheWarning,
    ResultStore,
    atomic_write,
    current_umask,
    write_bytes_atomic,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def _record(cell_id: str, status: str = "ok") -> CellRecord:
    labels = {"model": "m", "metric": "bi", "selector": "topk", "budget": "4 blocks", "seed": 0,
              "calibration": "wikipedia/8×256"}
    return CellRecord(cell_id=cell_id, grid="g", spec={}, versions={}, env={}, labels=labels, status=status)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------ atomic writes

def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "out.json"
    write_bytes_atomic(path, b"old")

    def half_then_crash(fh):
        fh.write(b"new, half of it")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"  # a plain open(path, "wb") would have truncated it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # the temporary file is gone


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_json(path, {"v": 1})

    def no_rename(src, dst):
        raise OSError("the machine went down before the rename")

    monkeypatch.setattr(store_module.os, "replace", no_rename)
    with pytest.raises(OSError, match="before the rename"):
        write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(store_module.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    write_bytes_atomic(tmp_path / "f", b"x")
    assert calls[:2] == ["fsync", "replace"]


def test_kill_minus_9_mid_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "big.bin"
    write_bytes_atomic(path, b"old")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from bench.store import atomic_write\n"
         "def writer(fh):\n"
         "    fh.write(b'n' * (8 << 20)); fh.flush(); print('half', flush=True); time.sleep(60)\n"
         "atomic_write(Path(sys.argv[1]), writer)\n",
         str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "half"
    finally:
        child.kill()
        child.wait()
    assert path.read_bytes() == b"old"
    assert _visible(tmp_path) == ["big.bin"]  # only a hidden .big.bin.*.tmp may be left behind


# ------------------------------------------------------------------ file modes

@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_of_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        store = ResultStore(tmp_path)
        write_bytes_atomic(tmp_path / "leaderboard.md", b"# board\n")
        store.write_record(_record("cell"))
        store.put_json("scores", "k", {"scores": [1.0]})
        store.put_tensors("hidden", "k", {"states": torch.ones(2, 3)}, {"nll": "1.0"})
        with store.claim("cell") as mine:
            assert mine
        paths = [tmp_path / "leaderboard.md", store.record_path("cell"), store.cache_path("scores", "k"),
                 store.cache_path("hidden", "k", ".safetensors"), store.records_dir / ".cell.lock"]
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in paths} == {p.name: oct(mode) for p in paths}
    finally:
        os.umask(old)


# ------------------------------------------------------------------ JSON caches

def test_json_cache_entry_carries_its_key_and_checksum(tmp_path):
    store = ResultStore(tmp_path)
    payload = {"scores": [0.5, 0.25, float("nan")], "higher_is_important": True, "seconds": 1.5}
    store.put_json("scores", "abc", payload)
    entry = json.loads(store.cache_path("scores", "abc").read_text())
    assert set(entry) == {"blockbench_cache", "kind", "key", "sha256", "payload"}
    assert (entry["blockbench_cache"], entry["kind"], entry["key"]) == (1, "scores", "abc")
    assert entry["payload"]["scores"] == [0.5, 0.25, None]  # strict JSON: NaN is null
    assert store.get_json("scores", "abc") == entry["payload"]
    assert store.get_json("scores", "missing") is None  # a plain miss, no warning


def _edit(path: Path, change) -> None:
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry))


@pytest.mark.parametrize("damage", ["reversed", "hand_edited", "garbage", "torn", "other_key", "old_format",
                                    "no_checksum"])
def test_a_json_cache_entry_that_does_not_verify_is_a_miss_with_a_warning(tmp_path, damage):
    store = ResultStore(tmp_path)
    store.put_json("evaluations/perplexity", "key1", {"result": {"ppl": 21.5}, "seconds": 3.0})
    store.put_json("scores", "key1", {"scores": [3.0, 2.0, 1.0]})
    store.put_json("scores", "key2", {"scores": [9.0, 9.0, 9.0]})
    kind = "evaluations/perplexity" if damage == "hand_edited" else "scores"
    path = store.cache_path(kind, "key1")
    if damage == "reversed":
        _edit(path, lambda e: e["payload"]["scores"].reverse())
    elif damage == "hand_edited":
        _edit(path, lambda e: e["payload"]["result"].update(ppl=1.0))
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "torn":
        path.write_text(path.read_text()[:40])
    elif damage == "other_key":  # another entry copied over this one
        path.write_bytes(store.cache_path("scores", "key2").read_bytes())
    elif damage == "old_format":
        path.write_text(json.dumps({"scores": [3.0, 2.0, 1.0]}))
    elif damage == "no_checksum":
        _edit(path, lambda e: e.pop("sha256"))
    with pytest.warns(CacheWarning, match=str(path)):
        assert store.get_json(kind, "key1") is None
    assert store.get_json("scores", "key2") == {"scores": [9.0, 9.0, 9.0]}  # the others still verify


def test_a_json_entry_rewritten_after_a_miss_verifies_again(tmp_path):
    store = ResultStore(tmp_path)
    store.put_json("scores", "k", {"scores": [1.0]})
    store.cache_path("scores", "k").write_text("{")
    with pytest.warns(CacheWarning):
        assert store.get_json("scores", "k") is None
    store.put_json("scores", "k", {"scores": [2.0]})
    assert store.get_json("scores", "k") == {"scores": [2.0]}


# ------------------------------------------------------------------ safetensors caches

def _data_offset(path: Path) -> int:
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + header_len


def test_journal_keeps_each_appended_value_and_skips_lines_that_do_not_verify(tmp_path):
    store = ResultStore(tmp_path)
    journal = store.journal("losses", "k1")
    assert journal.path == tmp_path / "cache" / "losses" / "k1.jsonl" and journal.read() == []
    journal.append({"set": [3, 1], "value": 0.1 + 0.2})
    journal.append({"set": [2], "value": float("inf")})  # strict JSON: a non-finite value is null
    assert store.journal("losses", "k1").read() == [{"set": [3, 1], "value": 0.30000000000000004},
                                                    {"set": [2], "value": None}]
    lines = journal.path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b""
    other = store.journal("losses", "k2")
    other.append({"set": [5], "value": 1.0})
    edited = lines[0].replace(b"0.30000000000000004", b"0.25")
    assert edited != lines[0]
    cut = lines[1][: len(lines[1]) // 2]  # what kill -9 in the middle of a write can leave
    journal.path.write_bytes(b"\n".join([edited, other.path.read_bytes().rstrip(b"\n"), lines[1], cut]))
    with pytest.warns(CacheWarning, match=r"k1\.jsonl: 3 line\(s\) do not verify"):
        assert journal.read() == [{"set": [2], "value": None}]
    journal.append({"set": [4], "value": 2.0})  # after a cut line, on a line of its own
    with pytest.warns(CacheWarning, match="3 line"):
        assert journal.read()[-1] == {"set": [4], "value": 2.0}


def test_tensor_cache_round_trip_hides_the_stores_own_metadata(tmp_path):
    store = ResultStore(tmp_path)
    states = torch.randn(3, 2, 4, 5)
    store.put_tensors("hidden", "k", {"states": states}, {"nll": "2.5"})
    tensors, meta = store.get_tensors("hidden", "k")
    assert torch.equal(tensors["states"], states) and meta == {"nll": "2.5"}
    with pytest.raises(ValueError, match="blockbench_sha256"):
        store.put_tensors("hidden", "j", {"states": states}, {"blockbench_sha256": "x"})


@pytest.mark.parametrize("damage", ["zeroed", "metadata", "other_key", "garbage"])
def test_a_tensor_cache_that_does_not_verify_is_a_miss_with_a_warning(tmp_path, damage):
    store = ResultStore(tmp_path)
    states = torch.randn(3, 2, 64, 8) + 10.0  # no zero anywhere
    store.put_tensors("hidden", "k", {"states": states}, {"nll": "2.5"})
    store.put_tensors("hidden", "j", {"states": states * 2}, {"nll": "2.5"})
    path = store.cache_path("hidden", "k", ".safetensors")
    data = bytearray(path.read_bytes())
    if damage == "zeroed":
        start = _data_offset(path) + 1024
        data[start:start + 4096] = bytes(4096)
        path.write_bytes(bytes(data))
        # the file still loads: only the checksum tells the zeros from real hidden states
        assert (load_file(str(path))["states"] == 0).sum() == 1024
    elif damage == "metadata":
        path.write_bytes(bytes(data).replace(b'"nll":"2.5"', b'"nll":"1.5"'))
        assert load_file(str(path))["states"].shape == states.shape
    elif damage == "other_key":
        path.write_bytes(store.cache_path("hidden", "j", ".safetensors").read_bytes())
    else:
        path.write_bytes(b"\x00garbage")
    with pytest.warns(CacheWarning, match=str(path)):
        assert store.get_tensors("hidden", "k") is None
    assert torch.equal(store.get_tensors("hidden", "j")[0]["states"], states * 2)


# ------------------------------------------------------------------ records

def test_a_record_holding_another_cells_content_is_not_done(tmp_path):
    store = ResultStore(tmp_path)
    store.write_record(_record("aaa"))
    store.write_record(_record("bbb"))
    store.record_path("bbb").write_bytes(store.record_path("aaa").read_bytes())  # copied over by hand
    assert store.is_done("aaa")
    with pytest.warns(CacheWarning, match=str(store.record_path("bbb"))):
        assert store.read_record("bbb") is None
    with pytest.warns(CacheWarning):
        assert not store.is_done("bbb")
    records, bad = store.scan()
    assert [r.cell_id for r in records] == ["aaa"]
    assert bad == [f"{store.record_path('bbb')}: holds the record of cell 'aaa', not of 'bbb' (rerun the grid to "
                   "write this cell's own record)"]
