"""How long a user waits for `bench validate` to name a typo (issue 16: under 2 s on 2 idle cores).

A whole process per round (interpreter start, imports, YAML, registries), as the user runs it."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import SMALL_GRID


@pytest.mark.parametrize("case", ["metric_name", "unknown_key"])
def test_validate_reports_a_typo(benchmark, tmp_path, case):
    grid = {**SMALL_GRID, "metrics": ["bi", "angualr"]} if case == "metric_name" else \
        {**SMALL_GRID, "budgets": {"blokcs": [4]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))

    def validate():
        return subprocess.run([sys.executable, "-m", "bench.cli", "validate", "--grid", str(path)],
                              capture_output=True, text=True, timeout=120)

    done = benchmark.pedantic(validate, rounds=5, iterations=1, warmup_rounds=1)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
