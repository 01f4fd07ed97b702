"""Valid result records for pure-function tests of the reports, the stability tables and the gate.

:func:`make_record` builds an ``ok`` :class:`~bench.records.CellRecord` (validated by pydantic, as
``bench.records.parse_record`` would) with the given labels, removed blocks, block scores and
evaluation values. Each evaluation's identity and columns come from a real
:class:`~algorithms.evaluations.base.Evaluation` instance (``Perplexity().columns()`` and so on), so
the records carry exactly what the pipeline writes; a test's own plugin-like evaluation works the same
way.
"""

from __future__ import annotations

from typing import Any

from algorithms.evaluations.base import Evaluation
from bench.grid import calibration_label
from bench.records import CellRecord, parse_record


def builtin_evaluations(values: dict[str, Any]) -> list[Evaluation]:
    """The built-in evaluations whose columns ``values`` names (``acc:<task>`` keys give the tasks)."""
    from algorithms.evaluations.accuracy import Accuracy
    from algorithms.evaluations.kl import KLDivergence
    from algorithms.evaluations.perplexity import Perplexity
    from algorithms.evaluations.speed import Speed

    out: list[Evaluation] = []
    if any(k.startswith("ppl_") for k in values):
        out.append(Perplexity())
    if any(k.startswith("acc") for k in values):
        tasks = sorted(k.removeprefix("acc:") for k in values if k.startswith("acc:")) or ["piqa"]
        out.append(Accuracy(tasks=tasks))
    if any(k in ("kl", "top1") for k in values):
        out.append(KLDivergence())
    if any(k.endswith("_speedup") for k in values):
        out.append(Speed())
    return out


def make_record(
    i: int,
    *,
    removed: tuple[int, ...] | list[int],
    values: dict[str, float | None],
    scores: list[float] | None = None,
    evaluations: list[Evaluation] | None = None,
    model: str = "m",
    metric: str = "bi",
    selector: str = "topk",
    budget: str = "2 blocks",
    seed: int = 0,
    source: str = "wikipedia",
    samples: int = 8,
    seq_len: int = 64,
    n_blocks: int = 6,
    higher_is_important: bool = True,
    kept_share: float = 0.7,
    unit: str | None = None,
    healing: str | None = None,
    healing_seconds: float | None = None,
    trained_parameters: int = 0,
    method: str | None = None,
) -> CellRecord:
    """An ``ok`` record, cell id ``cell<i>``. ``values`` maps column keys to numbers; every column of
    every evaluation must be given (a key no evaluation declares is an error, so typos fail loudly).
    ``evaluations`` defaults to the built-ins that ``values`` names. ``unit`` and ``healing`` (a
    healing's label) go into the labels only when given, as a record of a grid without these axes has
    them at their defaults; ``healing_seconds`` adds the healing outcome (name: the label's name);
    ``method``: the method preset's name (a record of a metric × selector cell has none)."""
    evaluations = builtin_evaluations(values) if evaluations is None else evaluations
    outcomes: dict[str, Any] = {}
    used: set[str] = set()
    for ev in evaluations:
        columns = ev.columns()
        keys = [c.key for c in columns]
        if missing := [k for k in keys if k not in values]:
            raise ValueError(f"{ev.name}: no value for {missing}")
        used.update(keys)
        identity = ev.describe()
        outcomes[ev.name] = {
            "name": ev.name, "version": identity["version"], "params": identity["params"],
            "columns": [c.as_dict() for c in columns], "values": {k: values[k] for k in keys},
            "dense": None, "pruned": {"test": True},
        }
    if unknown := sorted(set(values) - used):
        raise ValueError(f"values {unknown} belong to no evaluation")
    calibration = {"source": source, "samples": samples, "seq_len": seq_len, "seed": seed}
    data = {
        "schema": 2, "cell_id": f"cell{i:03d}", "grid": "test", "spec": {"calibration": calibration},
        "versions": {}, "env": {},
        "labels": {"model": model, "metric": metric, "selector": selector, "budget": budget, "seed": seed,
                   "calibration": calibration_label(calibration),
                   **({"unit": unit} if unit is not None else {}),
                   **({"healing": healing} if healing is not None else {}),
                   **({"method": method} if method is not None else {})},
        "status": "ok",
        "model": {"name": model, "fingerprint": "f" * 8, "n_blocks": n_blocks},
        "k": len(removed), "removed_blocks": list(removed),
        "scores": list(scores) if scores is not None else None,
        "higher_is_important": higher_is_important,
        "selector_result": {"evaluations": 0, "proxies": {"proxy_span": 0.1}},
        "parameters": {"dense": 1000, "pruned": round(1000 * kept_share), "kept_share": kept_share},
        "evaluations": outcomes,
        "timings": {"scoring": 0.1},
    }
    if healing_seconds is not None:
        data["healing"] = {"name": (healing or "none").split("(")[0], "seconds": healing_seconds,
                           "trained_parameters": trained_parameters}
    return parse_record(data, where=f"cell{i:03d}")


#: mean pruned accuracy of each (unit, healing) row of :func:`units_grid`: dyadic, so the paired
#: differences over seeds are exact (every pair separable: rank groups a, b, c, d)
UNITS_ACC = {("block", "none"): 0.25, ("block", "linear"): 0.375, ("attention", "none"): 0.5,
             ("attention", "linear"): 0.625}
#: each seed's shift of every row's accuracy (the same for every row: the seed's calibration sample)
UNITS_SEED_SHIFT = (0.0, 0.03125, 0.0625)


def units_grid(*, shift: dict[tuple[str, str], float] | None = None, budget: str = "params 90%") -> list[CellRecord]:
    """Records of a grid with units block/attention × healing none/linear at one ``params`` budget, three
    seeds (cells ``cell000``..``cell011``, three per row in :data:`UNITS_ACC` order). Block rows remove
    blocks 3 and 4, attention rows the attention branches of blocks 2-5; a linear healing took 1.5, 2.0 and
    2.5 s over the seeds. ``shift`` adds to a row's accuracy (a regression in one row)."""
    from algorithms.evaluations.accuracy import Accuracy
    from algorithms.evaluations.perplexity import Perplexity

    evaluations = [Accuracy(tasks=["piqa"]), Perplexity()]
    records = []
    for row, (axes, mean) in enumerate(UNITS_ACC.items()):
        unit, healing = axes
        for seed, offset in enumerate(UNITS_SEED_SHIFT):
            acc = mean + offset + (shift or {}).get(axes, 0.0)
            values = {"acc_pruned": acc, "acc_dense": 0.75, "acc_retained": acc / 0.75, "acc:piqa": acc,
                      "ppl_pruned": 40.0 - 10.0 * acc, "ppl_dense": 10.0}
            records.append(make_record(
                3 * row + seed, removed=(3, 4) if unit == "block" else (2, 3, 4, 5), values=values,
                evaluations=evaluations, scores=[6, 5, 1, 2, 4, 3], seed=seed, budget=budget,
                unit=None if unit == "block" else unit, healing=None if healing == "none" else healing,
                healing_seconds=None if healing == "none" else 1.5 + 0.5 * seed, trained_parameters=0))
    return records
