"""The ``speed`` evaluation: prefill and decode speedup of each pruned model over the dense one, measured
back to back in one process (the timing itself lives in :mod:`algorithms.evaluations.timing`, imported
when something is measured, so reading a grid's ``speed:`` section imports no torch)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from algorithms.evaluations.base import Column, EvalTarget, Evaluation, Params


class SpeedParams(Params):
    """Prefill latency and decode throughput of the dense and every pruned model, as ratios."""

    prompt_lengths: list[int] = Field(default_factory=lambda: [128, 512], min_length=1)
    decode_tokens: int = Field(32, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(1, ge=0)
    #: intra-op CPU threads while timing (restored after); leave unset to keep torch's default. 1 is the
    #: steadiest on a CPU shared with other work: oversubscribed threads swing timings by several times
    threads: int | None = Field(None, ge=1)

    @field_validator("prompt_lengths")
    @classmethod
    def _positive(cls, lengths: list[int]) -> list[int]:
        if bad := [n for n in lengths if n < 1]:
            raise ValueError(f"prompt lengths must be at least 1, got {bad[0]}")
        return lengths


class Speed(Evaluation):
    """Prefill and decode speedup of the pruned over the dense model, measured back to back."""

    name = "speed"
    version = "2"  # 2: the median of back-to-back paired ratios (1: each side's fastest whole repeat)
    Params = SpeedParams
    measures_dense = False  # every pruned measurement times the dense model beside it
    machine_dependent = True

    def columns(self) -> list[Column]:
        return [
            Column("prefill_speedup", "prefill ×", True, fmt=".2f", gate="speedup"),
            Column("decode_speedup", "decode ×", True, fmt=".2f", gate="speedup"),
        ]

    def measure(self, target: EvalTarget) -> dict[str, Any]:
        if not target.removed:
            raise ValueError("speed compares a pruned model with the dense one: give a non-empty block set")
        from algorithms.evaluations.timing import compare_speed

        p = self.params
        result = compare_speed(target.model, target.removed, prompt_lengths=tuple(p.prompt_lengths),
                               decode_tokens=p.decode_tokens, repeats=p.repeats, warmup=p.warmup,
                               threads=p.threads, transform=target.transform)
        result["dense"]["n_blocks"] = target.n_blocks
        result["pruned"]["n_blocks"] = target.n_blocks - (len(target.removed) if target.unit == "block" else 0)
        if target.unit == "sublayer":
            from algorithms.models.units import split_sublayers

            result["pruned"]["removed_branches"] = {k: len(v) for k, v in split_sublayers(target.removed).items()}
        elif target.unit != "block":
            result["pruned"]["removed_branches"] = {target.unit: len(target.removed)}
        return result

    def values(self, dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, float | None]:
        return {"prefill_speedup": pruned["speedup"]["prefill_mean"], "decode_speedup": pruned["speedup"]["decode"]}
