"""Benchmarks are opt-in: they run only with BLOCKBENCH_PERF=1 (``nox -s bench`` sets it)."""

import os
import re
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: fastest time (s) per comparison group and implementation, for the same-run ratios printed at the end
TIMINGS: dict[str, dict[str, float]] = {}
#: further lines for that summary
NOTES: list[str] = []


def pytest_collection_modifyitems(config, items):
    if os.environ.get("BLOCKBENCH_PERF") == "1":
        return
    skip = pytest.mark.skip(reason="benchmark: set BLOCKBENCH_PERF=1 or run `nox -s bench`")
    for item in items:
        if "tests/perf/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table
def pytest_terminal_summary(terminalreporter):
    # pytest loads this file as ``conftest``; the tests import it as ``tests.perf.conftest``: read theirs
    from tests.perf.conftest import NOTES, TIMINGS

    if not TIMINGS and not NOTES:
        return
    terminalreporter.section("same-run ratios (reference time / ours: > 1 means ours is faster)")
    for group, times in TIMINGS.items():
        parts = [f"{impl} {t:.3f} s" for impl, t in times.items()]
        if "ours" in times:
            parts += [f"{impl}/ours {t / times['ours']:.2f}x" for impl, t in times.items() if impl != "ours"]
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
    for line in NOTES:
        terminalreporter.write_line(line)


def record(benchmark, group: str, impl: str) -> float | None:
    """Remember the fastest round of ``benchmark`` (None when benchmarks are disabled)."""
    if benchmark.stats is None:
        return None
    best = benchmark.stats.stats.min
    TIMINGS.setdefault(group, {})[impl] = best
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def correlated_pair(n: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = 0.8 * x + 0.6 * torch.randn(n, d, generator=g)
    return x.to(device), y.to(device)


EXAMPLES = Path(__file__).resolve().parents[2] / "results" / "examples"


def leaderboard_sets(name: str, model: str = "smollm2-135m") -> set[tuple[int, ...]]:
    """The removed sets of a leaderboard's rows of ``model`` (``13-15,17`` is blocks 13, 14, 15, 17)."""
    sets = set()
    for line in (EXAMPLES / name).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or model not in cells or not re.fullmatch(r"[\d,\-]+", cells[-1]):
            continue
        blocks = []
        for part in cells[-1].split(","):
            lo, _, hi = part.partition("-")
            blocks += range(int(lo), int(hi or lo) + 1)
        sets.add(tuple(blocks))
    return sets
