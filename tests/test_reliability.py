"""Reliability promises, each proven by a test that fails without it."""

import contextlib
import json
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from algorithms.evaluations.base import Column, Evaluation
from algorithms.selectors import SELECTORS, Selector
from bench.config import ConfigError, parse_config
from bench.records import CellRecord, ModelInfo
from bench.runner import Runner
from bench.stages import CapturedStates, LoadedModel
from bench.store import CacheWarning, ResultStore, write_json
from estimators import METRICS
from estimators.base import Metric
from tests.conftest import SMALL_GRID, seed_cache

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
    with pytest.warns(CacheWarning, match=r"k\.safetensors: not a readable safetensors file; ignored, computed again"):
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
def test_a_cell_locked_by_another_process_is_left_to_it(tmp_path, small_grid_run):
    config = parse_config({**SMALL_GRID, "metrics": ["bi"], "calibration": {**SMALL_GRID["calibration"],
                                                                           "seeds": [0]}})
    seed_cache(tmp_path, small_grid_run)  # the cell's steps are SMALL_GRID's: read, not computed
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


# ------------------------------------------------------------------ a fast grid on a fake model
# load and capture replaced by an 8-block stand-in and random hidden states, the evaluation by one that
# counts its calls: every other step (scoring, selection, caches, records, executor) is the real one

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))


class FakePPL(Evaluation):
    """A stand-in perplexity: 10 plus the sum of the removed blocks."""

    name = "fakeppl"

    def columns(self):
        return [Column("ppl_pruned", "ppl (pruned)", False, rank=1)]

    def data_fingerprint(self):
        return {}

    def measure(self, target):
        return {"ppl": 10.0 + sum(target.removed)}

    def values(self, dense, pruned):
        return {"ppl_pruned": pruned["ppl"]}


def fake_runner(root, evaluation: Evaluation | None = None, capture_hook=None, **grid) -> Runner:
    runner = Runner(parse_config({**SMALL_GRID, **grid}), root)
    pipeline = runner.pipeline

    def load(spec):
        pipeline.counters["model_loads"] += 1
        return LoadedModel(spec, _Tiny(), None, ModelInfo(name=spec["name"], fingerprint="tiny", n_blocks=8), 0.0)

    def capture(loaded, calibration):
        if capture_hook is not None:
            capture_hook(calibration)
        pipeline.counters["captures"] += 1
        g = torch.Generator().manual_seed(calibration["seed"])
        states = torch.randn(9, 2, 5, 4, generator=g).cumsum(0)
        return CapturedStates(key=f"h{calibration['seed']}", states=states, input_ids=torch.zeros(2, 5).long(),
                              stats={}, seconds=0.0, cached=False)

    pipeline.load, pipeline.capture = load, capture
    pipeline.transform = lambda model, removed: contextlib.nullcontext(model)
    pipeline.evaluations = {"fakeppl": evaluation or FakePPL()}
    return runner


def _numbers(store: ResultStore) -> dict[str, tuple]:
    return {r.cell_id: (r.removed_blocks, r.scores, r.evaluations["fakeppl"].values) for r in store.records()}


def _rewrite(path, change) -> None:
    """Edit a cache entry by hand (its checksum left as it was)."""
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry))


@pytest.mark.parametrize("damage", ["reversed", "empty", "short", "flipped", "nan", "torn"])
def test_damaged_score_caches_are_recomputed_with_the_right_numbers(tmp_path, damage):
    runner = fake_runner(tmp_path)
    assert runner.run().failed == 0
    store = runner.store
    before = _numbers(store)
    paths = sorted((store.cache_dir / "scores").glob("*.json"))
    assert len(paths) == 4
    for path in paths:
        key = path.stem
        if damage == "reversed":  # a hand edit: the checksum no longer matches
            _rewrite(path, lambda e: e["payload"]["scores"].reverse())
        elif damage == "empty":  # verifies, but holds nothing a metric needs
            store.put_json("scores", key, {})
        elif damage == "short":
            payload = store.get_json("scores", key)
            store.put_json("scores", key, {**payload, "scores": payload["scores"][:-1]})
        elif damage == "flipped":
            payload = store.get_json("scores", key)
            store.put_json("scores", key, {**payload, "higher_is_important": not payload["higher_is_important"]})
        elif damage == "nan":
            payload = store.get_json("scores", key)
            store.put_json("scores", key, {**payload, "scores": [float("nan")] * len(payload["scores"])})
        else:
            path.write_text(path.read_text()[:50])
    for path in store.records_dir.glob("*.json"):
        path.unlink()
    again = fake_runner(tmp_path)
    with pytest.warns(CacheWarning) as caught:
        summary = again.run()
    assert (summary.ran, summary.failed) == (4, 0)
    assert again.counters["scorings"] == 4 and again.counters["measure:fakeppl"] == 0
    assert {str(p) for p in paths} <= {str(w.message).split(": ")[0] for w in caught}
    assert _numbers(store) == before
    assert all(store.get_json("scores", p.stem) is not None for p in paths)  # rewritten, verified again


def test_a_selection_is_searched_once_whatever_the_evaluations(tmp_path):
    """Cells that differ only in what is measured (here perplexity's windows: other cell ids) share their
    selections through cache/selections: nothing is searched again, the same sets are chosen."""
    first = fake_runner(tmp_path)
    assert first.run().failed == 0 and first.counters["selections"] == 4
    again = fake_runner(tmp_path, perplexity={"max_windows": 3})
    summary = again.run()
    assert summary.ran == 4 and again.counters["selections"] == 0
    assert {r.cell_id for r in summary.records}.isdisjoint(r.cell_id for r in first.store.records()
                                                           if r.spec["evaluations"]["perplexity"]["params"]
                                                           ["max_windows"] != 3)
    old = {(r.labels.metric, r.labels.seed): r for r in first.store.records()
           if r.spec["evaluations"]["perplexity"]["params"]["max_windows"] != 3}
    for r in summary.records:
        mine = old[(r.labels.metric, r.labels.seed)]
        assert r.cache_hits["selection"] is True and mine.cache_hits["selection"] is False
        assert r.removed_blocks == mine.removed_blocks
        assert r.selector_result == mine.selector_result and r.timings["selection"] == mine.timings["selection"]


@pytest.mark.parametrize("damage", ["hand_edited", "not_a_mapping", "wrong_k", "repeated"])
def test_damaged_selection_caches_are_searched_again(tmp_path, damage):
    runner = fake_runner(tmp_path)
    runner.run()
    store = runner.store
    before = _numbers(store)
    paths = sorted((store.cache_dir / "selections").glob("*.json"))
    assert len(paths) == 4
    for path in paths:
        payload = store.get_json("selections", path.stem)
        if damage == "hand_edited":
            _rewrite(path, lambda e: e["payload"].update(removed=[0, 1, 2, 5]))
        elif damage == "not_a_mapping":
            store.put_json("selections", path.stem, [1, 2])
        elif damage == "wrong_k":
            store.put_json("selections", path.stem, {**payload, "removed": payload["removed"][:-1]})
        else:
            store.put_json("selections", path.stem, {**payload, "removed": [payload["removed"][0]] * 4})
    for path in store.records_dir.glob("*.json"):
        path.unlink()
    again = fake_runner(tmp_path)
    with pytest.warns(CacheWarning) as caught:
        summary = again.run()
    assert (summary.ran, summary.failed) == (4, 0) and again.counters["selections"] == 4
    assert {str(p) for p in paths} <= {str(w.message).split(": ")[0] for w in caught}
    assert _numbers(store) == before


@pytest.mark.parametrize("damage", ["hand_edited", "not_a_mapping"])
def test_damaged_evaluation_caches_are_recomputed_with_the_right_numbers(tmp_path, damage):
    runner = fake_runner(tmp_path)
    runner.run()
    store = runner.store
    before = _numbers(store)
    paths = sorted((store.cache_dir / "evaluations" / "fakeppl").glob("*.json"))
    for path in paths:
        if damage == "hand_edited":
            _rewrite(path, lambda e: e["payload"]["result"].update(ppl=1.0))
        else:  # checksummed, but not what an evaluation result is
            store.put_json("evaluations/fakeppl", path.stem, {"result": [1.0], "seconds": 0.1})
    for path in store.records_dir.glob("*.json"):
        path.unlink()
    again = fake_runner(tmp_path)
    with pytest.warns(CacheWarning) as caught:
        again.run()
    assert again.counters["measure:fakeppl"] == len(paths) and again.counters["scorings"] == 0
    assert {str(p) for p in paths} <= {str(w.message).split(": ")[0] for w in caught}
    assert _numbers(store) == before


def test_a_record_holding_another_cells_content_is_rerun(tmp_path):
    runner = fake_runner(tmp_path)
    runner.run()
    store = runner.store
    before = _numbers(store)
    first, second = sorted(before)[:2]
    store.record_path(second).write_bytes(store.record_path(first).read_bytes())
    again = fake_runner(tmp_path)
    with pytest.warns(CacheWarning, match=re.escape(str(store.record_path(second)))):
        summary = again.run()
    assert (summary.skipped, summary.ran) == (3, 1) and [r.cell_id for r in summary.records] == [second]
    assert store.read_record(second).cell_id == second and _numbers(store) == before


# ------------------------------------------------------------------ plugins never end the grid

class ExitMetric(Metric):
    """A plugin metric that ends the process (as a script's ``main`` might)."""

    name = "exit_metric"

    def pair(self, x, y):
        sys.exit(3)


class ExitSelector(Selector):
    name = "exit_selector"

    def select(self, problem):
        sys.exit(3)


class ExitOnPruned(FakePPL):
    """Fine on the dense model, ``SystemExit(3)`` on every block set holding block 3."""

    def measure(self, target):
        if 3 in target.removed:
            raise SystemExit(3)
        return super().measure(target)


class InterruptMetric(Metric):
    name = "interrupt_metric"

    def pair(self, x, y):
        raise KeyboardInterrupt


def _plugin(monkeypatch, registry, cls) -> None:
    monkeypatch.setattr(registry, "_entries", {**registry._entries, cls.name: cls})
    monkeypatch.setattr(registry, "_origins", {**registry._origins, cls.name: "test"})


def _failures(summary) -> list[tuple[str, str]]:
    return sorted((r.stage, r.error) for r in summary.records if r.status != "ok")


def test_a_metric_plugin_calling_sys_exit_fails_its_cells_and_the_grid_goes_on(tmp_path, monkeypatch):
    _plugin(monkeypatch, METRICS, ExitMetric)
    summary = fake_runner(tmp_path, metrics=["exit_metric", "bi"]).run()
    assert summary.ran == 4 and _failures(summary) == [("scoring", "SystemExit: 3")] * 2
    assert {r.labels.metric for r in summary.records if r.ok} == {"bi"}
    assert all("sys.exit(3)" in r.traceback for r in summary.records if not r.ok)
    assert summary.exit_code == 1


def test_a_selector_plugin_calling_sys_exit_fails_its_cells(tmp_path, monkeypatch):
    _plugin(monkeypatch, SELECTORS, ExitSelector)
    summary = fake_runner(tmp_path, metrics=["bi"], selectors=["exit_selector", "topk"]).run()
    assert summary.ran == 4 and _failures(summary) == [("selection", "SystemExit: 3")] * 2
    assert {r.labels.selector for r in summary.records if r.ok} == {"topk"}


def test_an_evaluation_or_capture_calling_sys_exit_fails_only_the_cells_that_need_it(tmp_path):
    summary = fake_runner(tmp_path / "eval", evaluation=ExitOnPruned()).run()
    failed = [r for r in summary.records if not r.ok]
    assert summary.ran == 4 and failed and len(failed) < 4
    assert all(r.stage == "fakeppl" and r.error == "SystemExit: 3" and 3 in r.removed_blocks for r in failed)

    def exit_on_seed_0(calibration):  # inside the shared Lazy capture of a calibration group
        if calibration["seed"] == 0:
            sys.exit(3)

    summary = fake_runner(tmp_path / "capture", capture_hook=exit_on_seed_0).run()
    assert summary.ran == 4 and _failures(summary) == [("capture", "SystemExit: 3")] * 2
    assert {r.labels.seed for r in summary.records if r.ok} == {1}


def test_ctrl_c_in_a_plugin_still_stops_the_grid(tmp_path, monkeypatch):
    _plugin(monkeypatch, METRICS, InterruptMetric)
    runner = fake_runner(tmp_path, metrics=["interrupt_metric", "bi"])
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert runner.store.records() == []


# ------------------------------------------------------------------ the real grid, its caches damaged

@pytest.mark.slow
@pytest.mark.download
def test_damaged_caches_and_a_misplaced_record_on_the_real_grid(tmp_path, small_grid_run):
    """SmolLM2: zeros in one hidden-states cache, hand-edited scores, a selection and perplexities, a
    record holding another cell: the rerun recomputes exactly those and gets the first run's numbers (the first run is the
    session's run of SMALL_GRID, copied as it finished)."""
    config = parse_config(SMALL_GRID)
    shutil.copytree(small_grid_run["pristine"], tmp_path, dirs_exist_ok=True)
    store = ResultStore(tmp_path)
    before = {r.cell_id: (r.removed_blocks, r.scores, r.evaluations["perplexity"].values) for r in store.records()}
    hidden = sorted((store.cache_dir / "hidden").glob("*.safetensors"))
    assert len(hidden) == 2
    data = bytearray(hidden[0].read_bytes())
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0] + 4096
    data[start:start + 65536] = bytes(65536)
    hidden[0].write_bytes(bytes(data))
    for path in (store.cache_dir / "scores").glob("*.json"):
        _rewrite(path, lambda e: e["payload"]["scores"].reverse())
    selections = sorted((store.cache_dir / "selections").glob("*.json"))
    assert len(selections) == 4  # one per cell (each metric x seed)
    _rewrite(selections[0], lambda e: e["payload"].update(removed=[0, 1, 2, 3]))
    ppl = sorted((store.cache_dir / "evaluations" / "perplexity").glob("*.json"))
    for path in ppl:
        _rewrite(path, lambda e: e["payload"]["result"].update(ppl=1.0))
    ids = sorted(before)
    for cell_id in ids[1:]:
        store.record_path(cell_id).unlink()
    store.record_path(ids[1]).write_bytes(store.record_path(ids[0]).read_bytes())  # cell 0's content
    store.record_path(ids[0]).unlink()

    runner = Runner(config, tmp_path)
    with pytest.warns(CacheWarning) as caught:
        summary = runner.run()
    assert (summary.ran, summary.failed) == (4, 0)
    assert dict(runner.counters) == {"model_loads": 1, "captures": 1, "scorings": 4, "selections": 1,
                                     "measure:perplexity": len(ppl)}
    named = {str(w.message).split(": ")[0] for w in caught}
    assert {str(hidden[0]), str(store.record_path(ids[1]))} <= named
    after = {r.cell_id: (r.removed_blocks, r.scores, r.evaluations["perplexity"].values) for r in store.records()}
    assert sorted(after) == ids
    for cell_id in ids:
        assert after[cell_id][0] == before[cell_id][0]
        assert after[cell_id][1] == pytest.approx(before[cell_id][1], rel=1e-6)
        assert after[cell_id][2] == pytest.approx(before[cell_id][2], rel=1e-6)


@pytest.mark.slow
@pytest.mark.download
def test_two_bench_run_processes_share_a_results_folder_without_running_a_cell_twice(tmp_path):
    """Two `bench run` on one results folder at once: every cell is run by exactly one of them (per-cell
    locks), both exit 0, and the records equal one process's."""
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(SMALL_GRID))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "bench.cli", "run", "--grid", str(grid), "--results", str(results), "--json"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    summaries = [json.loads(out) for out, _ in outs]
    ran = [s["ran"] for s in summaries]
    assert sum(ran) == 4, summaries  # each cell ran once, in one process or the other
    # a cell is skipped as finished, or left to the process that holds its lock
    assert all(s["ran"] + s["skipped"] + s["elsewhere"] == 4 for s in summaries), summaries
    store = ResultStore(results)
    from bench.grid import expand

    assert sorted(r.cell_id for r in store.records() if r.ok) == sorted(c.cell_id for c in expand(parse_config(SMALL_GRID)))
