"""Downstream accuracy through lm-evaluation-harness on offline copies of the tasks (the glue to
lm-eval, the task registry and the data live in :mod:`algorithms.evaluations.lmeval`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params


class AccuracyParams(Params):
    """Zero-shot (or few-shot) accuracy through lm-evaluation-harness on local copies of the tasks."""

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(100, ge=1)  #: documents per task, a seeded sample
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0  #: which documents, and lm-eval's few-shot sampler

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from algorithms.evaluations.lmeval import check_task_names

        check_task_names(tasks)
        return tasks


class Accuracy(Evaluation):
    """Mean lm-eval accuracy over tasks (acc_norm where reported), offline, dense and pruned."""

    name = "accuracy"
    version = "1"
    Params = AccuracyParams

    def columns(self) -> list[Column]:
        return [
            Column("acc_pruned", "acc", True, fmt=".3f", spread=True, gate="acc", rank=20, dense_key="acc_dense"),
            Column("acc_dense", "acc (dense)", None, fmt=".3f", terminal=False),
            Column("acc_retained", "retained", True, fmt=".1%"),
            *(Column(f"acc:{task}", task, True, fmt=".3f", terminal=False) for task in sorted(self.params.tasks)),
        ]

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        from algorithms.evaluations.lmeval import accuracy_score, evaluate_tasks

        p = self.params
        with target.pruned() as model:
            tasks = evaluate_tasks(model, target.tokenizer, list(p.tasks), limit=p.limit,
                                   num_fewshot=p.num_fewshot, batch_size=p.batch_size, seed=p.seed)
        return {"tasks": tasks, "score": accuracy_score(tasks)}

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        from algorithms.evaluations.lmeval import headline

        dense_score = dense["score"] if dense else None
        out: dict[str, float | None] = {
            "acc_pruned": pruned["score"], "acc_dense": dense_score,
            "acc_retained": pruned["score"] / dense_score if dense_score else None,
        }
        out.update({f"acc:{task}": headline(m) for task, m in pruned["tasks"].items()})
        return out
