"""Reliability promises, each proven by a test that fails without it."""

import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.config import ConfigError, parse_config
from bench.records import CellRecord
from bench.runner import Runner
from bench.store import ResultStore, write_json
from tests.conftest import SMALL_GRID

# ------------------------------------------------------------------ config fuzzing

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
nested = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
KEYS = ["name", "models", "metrics", "selectors", "budgets", "calibration", "perplexity", "protect",
        "device", "dtype", "cache_hidden_states"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(nested, st.dictionaries(st.sampled_from(KEYS), nested, max_size=8)))
def test_config_loader_accepts_or_raises_its_own_error(data):
    try:
        parse_config(data)
    except ConfigError as exc:  # a message naming the key of every problem, never a traceback from deep inside
        _check_message(str(exc))


_PART = r"""(?:[\w-]+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
#: a key path (``metrics[1].name``; odd keys quoted: ``budgets.':'``), then the message
KEYED_LINE = re.compile(rf"^(?:<root>|{_PART}(?:\.{_PART}|\[\d+\])*): \S")


def _check_message(message: str) -> None:
    first, *rest = message.split("\n")
    if not rest:
        assert first.startswith("<config>: the grid must be a mapping of keys, got "), first
        return
    assert first == "<config>: invalid grid config", first
    for line in rest:
        assert KEYED_LINE.match(line), line


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), nested, max_size=8))
def test_fuzzed_real_configs_too(data):
    base = {**SMALL_GRID, **data}
    try:
        parse_config(base)
    except ConfigError as exc:
        _check_message(str(exc))


# ------------------------------------------------------------------ atomic files and locks

def _record(cell_id: str, status: str = "ok") -> dict:
    labels = {"model": "m", "metric": "bi", "selector": "topk", "budget": "4 blocks", "seed": 0,
              "calibration": "wikipedia/8×256"}
    return CellRecord(cell_id=cell_id, grid="g", spec={}, versions={}, env={}, labels=labels,
                      status=status).to_json()


def test_half_written_files_are_never_read(tmp_path):
    store = ResultStore(tmp_path)
    write_json(store.record_path("abc"), _record("abc"))
    assert store.is_done("abc")
    store.record_path("def").write_text('{"cell_id": "def", "status": "o')  # a torn write
    assert not store.is_done("def")
    assert [r.cell_id for r in store.records()] == ["abc"]
    # temp files of an interrupted write are not records
    (store.records_dir / ".ghi.json.123.tmp").write_text("{}")
    assert len(store.records()) == 1
    # a record of blockbench 0.1.0 (no schema 2) is not done, not listed, and reported with how to rerun
    old = {k: v for k, v in _record("old").items() if k != "schema"}
    write_json(store.record_path("old"), old)
    assert not store.is_done("old")
    assert [r.cell_id for r in store.records()] == ["abc"]
    (why,) = store.unreadable()
    assert why.startswith(f"{store.record_path('old')}: record schema None (written by blockbench 0.1.0")
    assert why.endswith("rerun the grid (`bench run --grid FILE`, optionally with a new --results folder) and "
                        "delete the old records folder when you no longer need it")
    # a damaged tensor cache is a miss, not a crash
    path = store.cache_path("hidden", "k", ".safetensors")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    assert store.get_tensors("hidden", "k") is None


def test_a_claimed_cell_is_refused_to_a_second_claimant(tmp_path):
    store = ResultStore(tmp_path)
    with store.claim("cell") as first:
        with store.claim("cell") as second:
            assert first and not second
        with store.claim("other") as third:
            assert third
    with store.claim("cell") as again:
        assert again  # released on exit


# ------------------------------------------------------------------ kill -9 and two processes

@pytest.mark.slow
@pytest.mark.download
def test_a_cell_locked_by_another_process_is_left_to_it(tmp_path):
    config = parse_config({**SMALL_GRID, "metrics": ["bi"], "calibration": {**SMALL_GRID["calibration"],
                                                                           "seeds": [0]}})
    store = ResultStore(tmp_path)
    from bench.grid import expand

    (cell,) = expand(config)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(store.records_dir / f".{cell.cell_id}.lock")],
        stdout=subprocess.PIPE, text=True,
    )
    store.records_dir.mkdir(parents=True, exist_ok=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        summary = Runner(config, tmp_path).run()
        assert (summary.ran, summary.elsewhere) == (0, 1)
        assert not store.record_path(cell.cell_id).exists()
    finally:
        holder.kill()
        holder.wait()
    summary = Runner(config, tmp_path).run()  # the lock died with its process
    assert summary.ran == 1 and store.is_done(cell.cell_id)
