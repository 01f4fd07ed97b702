"""Hostile grid files (issue 16): each is refused by ``bench validate`` and ``bench run`` with exit 2, a
message naming the key and the value, no traceback, and nothing written. None loads model weights."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bench.cli import app
from tests.conftest import SMALL_GRID

cli = CliRunner()

LAUGHS = "\n".join(
    ["name: laughs", "models: [smollm2-135m]", "metrics: [bi]", "selectors: [topk]", "budgets: {blocks: [1]}",
     'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    + ["description: *i", ""]
)


def grid_text(**override) -> str:
    return yaml.safe_dump({**SMALL_GRID, **override}, sort_keys=False)


def calibration(source: str) -> dict:
    return {**SMALL_GRID["calibration"], "source": source}


def text_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def huge_file(tmp_path) -> str:
    path = tmp_path / "huge.txt"
    with path.open("wb") as fh:  # sparse: no disk used, never read
        fh.truncate(257 * 2**20)
    return str(path)


def fifo(tmp_path) -> str:
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return str(path)


# (id, the grid file's content from tmp_path, the start of the message after "error: [grid path: ]")
CASES = [
    ("binary-bytes", lambda t: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text (byte 0x89 at offset 0)"),
    ("utf16-bom", lambda t: grid_text().encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    ("billion-laughs", lambda t: LAUGHS, "d: YAML aliases expand this value to 11111 nodes, over the limit of 10000"),
    ("recursive-alias", lambda t: grid_text() + "description: &x [1, *x]\n",
     "description[1]: a YAML alias refers to the value that contains it"),
    ("duplicate-top-key", lambda t: grid_text() + "metrics: [angular]\n", "metrics: duplicate key 'metrics' (lines 4 and 24)"),
    ("duplicate-nested-key", lambda t: grid_text().replace("  seeds:", "  seeds: [5]\n  seeds:"),
     "calibration.seeds: duplicate key 'seeds' (lines 16 and 17)"),
    ("duplicate-flow-key", lambda t: grid_text(budgets=None).replace("budgets: null", "budgets: {blocks: [1], blocks: [2]}"),
     "budgets.blocks: duplicate key 'blocks' (lines 9 and 9)"),
    ("bool-as-block-count", lambda t: grid_text(budgets={"blocks": [True]}),
     "budgets.blocks[0]: Input should be a valid integer (got True)"),
    ("string-as-bool", lambda t: grid_text(models=[{"name": "smollm2-135m", "trust_remote_code": "yes"}]),
     "models[0].trust_remote_code: Input should be a valid boolean (got 'yes')"),
    ("seed-too-large", lambda t: grid_text(calibration={**SMALL_GRID["calibration"], "seeds": [2**64]}),
     "calibration.seeds[0]: out of range: seeds are integers 0 <= seed < 2**63 (got 18446744073709551616)"),
    ("seed-negative", lambda t: grid_text(calibration={**SMALL_GRID["calibration"], "seeds": [-1]}),
     "calibration.seeds[0]: out of range: seeds are integers 0 <= seed < 2**63 (got -1)"),
    ("float-as-int", lambda t: grid_text(calibration={**SMALL_GRID["calibration"], "samples": 4.0}),
     "calibration.samples: Input should be a valid integer (got 4.0)"),
    ("float-as-int-evaluation", lambda t: grid_text(perplexity={**SMALL_GRID["perplexity"], "seq_len": 256.0}),
     "perplexity.seq_len: Input should be a valid integer (got 256.0)"),
    ("bool-as-int-evaluation", lambda t: grid_text(perplexity={**SMALL_GRID["perplexity"], "batch_size": True}),
     "perplexity.batch_size: Input should be a valid integer (got True)"),
    ("hf-empty", lambda t: grid_text(calibration=calibration("hf:")),
     "calibration.source: text source 'hf:' names no dataset: write hf:NAME[:CONFIG][@SPLIT]"),
    ("hf-dotdot", lambda t: grid_text(calibration=calibration("hf:../../etc")),
     "calibration.source: text source 'hf:../../etc': '../../etc' is not a Hugging Face dataset id"),
    ("hf-odd-characters", lambda t: grid_text(calibration=calibration("hf:a b;$(id)")),
     "calibration.source: text source 'hf:a b;$(id)': 'a b;$(id)' is not a Hugging Face dataset id"),
    ("hf-missing", lambda t: grid_text(perplexity={**SMALL_GRID["perplexity"], "source": "hf:nobody/no-such-set"}),
     "perplexity.source: text source 'hf:nobody/no-such-set': dataset 'nobody/no-such-set' is not in the local"),
    ("binary-jsonl", lambda t: grid_text(calibration=calibration(text_file(t, "b.jsonl", b'{"text": "a\x00"}\n'))),
     "calibration.source: text source '{tmp}/b.jsonl' is binary data, not text (NUL byte at offset 11)"),
    ("latin1-text", lambda t: grid_text(calibration=calibration(text_file(t, "l.txt", "café".encode("latin-1")))),
     "calibration.source: text source '{tmp}/l.txt' is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("dev-zero", lambda t: grid_text(calibration=calibration("/dev/zero")),
     "calibration.source: text source '/dev/zero' is not a regular file or a folder"),
    ("fifo", lambda t: grid_text(stability={"sources": [fifo(t)]}),
     "stability.sources[0]: text source '{tmp}/pipe.txt' is not a regular file or a folder"),
    ("huge-file", lambda t: grid_text(perplexity={**SMALL_GRID["perplexity"], "source": huge_file(t)}),
     "perplexity.source: text source '{tmp}/huge.txt' is larger than 256 MiB"),
    ("grid-is-dev-zero", None, "grid file '/dev/zero' is not a regular file"),
    pytest.param("device-mps", lambda t: grid_text(device="mps"), "device: 'mps' was asked for but this machine has no MPS",
                 id="device-mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    pytest.param("device-cuda", lambda t: grid_text(device="cuda"), "device: 'cuda' was asked for but this machine has no CUDA",
                 id="device-cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


def error_start(output: str, grid: str) -> list[str]:
    """Each output line with ``error: `` and the grid path in front of it taken off."""
    return [line.removeprefix("error: ").removeprefix(f"{grid}: ") for line in output.splitlines()]


def check_refused(result, grid: str, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert any(line.startswith(expected) for line in error_start(result.output, grid)), result.output


def _params(case):
    return case if hasattr(case, "marks") else pytest.param(*case, id=case[0])


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("case", "content", "expected"), [_params(c) for c in CASES])
def test_hostile_grid_is_refused_naming_key_and_value(tmp_path, command, case, content, expected):
    if content is None:
        grid = "/dev/zero"
    else:
        made = content(tmp_path)
        path = tmp_path / "grid.yaml"
        path.write_bytes(made if isinstance(made, bytes) else made.encode())
        grid = str(path)
    results = tmp_path / "results"
    args = [command, "--grid", grid] + (["--results", str(results), "--quiet"] if command == "run" else [])
    start = time.perf_counter()
    result = cli.invoke(app, args)
    check_refused(result, grid, expected.replace("{tmp}", str(tmp_path)))
    assert not results.exists()
    if case == "billion-laughs":
        assert time.perf_counter() - start < 1.0


def quick_grid_text(tmp_path) -> str:
    """A grid that validates quickly: its text is a small local file rather than Wikipedia."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 12
                                      for i in range(60)))
    return grid_text(calibration={**calibration(str(corpus)), "samples": 2, "seq_len": 16},
                     perplexity={"source": str(corpus), "seq_len": 16, "max_windows": 2})


@pytest.fixture
def valid_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(quick_grid_text(tmp_path))
    return path


def test_results_that_is_a_file_is_refused_before_anything_runs(valid_grid, tmp_path):
    results = tmp_path / "results"
    results.write_text("not a folder")
    result = cli.invoke(app, ["run", "--grid", str(valid_grid), "--results", str(results), "--quiet"])
    check_refused(result, str(valid_grid), f"--results: {str(results)!r} is a file, not a folder")
    assert results.read_text() == "not a folder"
    inside = results / "sub"
    result = cli.invoke(app, ["run", "--grid", str(valid_grid), "--results", str(inside), "--quiet"])
    check_refused(result, str(valid_grid), f"--results: {str(inside)!r} cannot be created: {str(results)!r} is a file")


def test_read_only_results_folder_is_refused_before_anything_runs(valid_grid, tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let os.access answer as it would for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and
                            str(p).startswith(str(folder)) else real(p, mode, *a, **k))
    try:
        result = cli.invoke(app, ["run", "--grid", str(valid_grid), "--results", str(folder), "--quiet"])
        check_refused(result, str(valid_grid), f"--results: {str(folder)!r} is read-only")
        new = folder / "new"
        result = cli.invoke(app, ["run", "--grid", str(valid_grid), "--results", str(new), "--quiet"])
        check_refused(result, str(valid_grid), f"--results: {str(new)!r} cannot be created: {str(folder)!r} is read-only")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_valid_grid_still_validates(valid_grid):
    result = cli.invoke(app, ["validate", "--grid", str(valid_grid)])
    assert result.exit_code == 0, result.output


YAMLISH = st.text(alphabet="ab:-,[]{}&*!?|>'\"#%@`\n\t 01.e~", max_size=200)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=300), YAMLISH.map(str.encode), YAMLISH))
def test_random_grid_files_exit_0_or_2_never_a_traceback(tmp_path, content):
    """Random bytes, random YAML-like text, and a valid grid with random text after it."""
    path = tmp_path / "random.yaml"
    path.write_bytes(content if isinstance(content, bytes) else (quick_grid_text(tmp_path) + content).encode())
    result = cli.invoke(app, ["validate", "--grid", str(path)])
    assert result.exit_code in (0, 2), (content, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (content, result.exception)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_report_reads_a_gpu_grid_on_a_machine_without_one(tmp_path):
    """Results measured on a GPU are read anywhere: only validate, run and stability refuse the device."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(quick_grid_text(tmp_path).replace("device: cpu", "device: cuda"))
    result = cli.invoke(app, ["report", "--grid", str(grid), "--results", str(tmp_path / "none")])
    assert "device:" not in result.output
