"""Grid configuration: a YAML file validated by pydantic into frozen specs.

Every error is a :class:`ConfigError` whose message names the offending key (``metrics[1].name``)
and, where it helps, the allowed values. The CLI maps it to exit code 2.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A grid config that cannot run. The message names the key and the value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentSpec(_Frozen):
    """A metric or selector: its registry name and keyword parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    def label(self) -> str:
        if not self.params:
            return self.name
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({inner})"


class ModelSpec(_Frozen):
    """A model: a zoo name (``smollm2-135m``), a local folder, or a hub id the user can reach."""

    name: str
    trust_remote_code: bool = False


class CalibrationSpec(_Frozen):
    source: str = "wikipedia"
    samples: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: int = Field(4, ge=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds


class PerplexitySpec(_Frozen):
    source: str = "wikipedia"
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)


class AccuracySpec(_Frozen):
    """Zero-shot (or few-shot) accuracy through lm-evaluation-harness on local copies of the tasks."""

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(100, ge=1)  #: docs per task, a seeded sample
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from algorithms.evaluations.lmeval import SUPPORTED_TASKS

        for t in tasks:
            if t not in SUPPORTED_TASKS:
                close = difflib.get_close_matches(t, SUPPORTED_TASKS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown task {t!r}.{hint} Known: {', '.join(SUPPORTED_TASKS)}")
        return tasks


class SpeedSpec(_Frozen):
    """Prefill latency and decode throughput of the dense and every pruned model, as ratios."""

    prompt_lengths: list[int] = Field(default_factory=lambda: [128, 512], min_length=1)
    decode_tokens: int = Field(32, ge=1)
    repeats: int = Field(5, ge=1)
    warmup: int = Field(1, ge=0)
    #: intra-op CPU threads while timing (restored after); leave unset to keep torch's default. 1 is the
    #: steadiest on a CPU shared with other work: oversubscribed threads swing timings by several times
    threads: int | None = Field(None, ge=1)


class BudgetSpec(_Frozen):
    """How many blocks to remove: shares of the block count, absolute counts, or both."""

    ratios: list[float] = Field(default_factory=list)
    blocks: list[int] = Field(default_factory=list)

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"ratio {r} must be strictly between 0 and 1")
        return ratios

    @field_validator("blocks")
    @classmethod
    def _blocks_positive(cls, blocks: list[int]) -> list[int]:
        for b in blocks:
            if b < 1:
                raise ValueError(f"block count {b} must be at least 1")
        return blocks

    @model_validator(mode="after")
    def _not_empty(self) -> BudgetSpec:
        if not self.ratios and not self.blocks:
            raise ValueError("give at least one of 'ratios' or 'blocks'")
        return self

    def items(self) -> list[dict[str, float | int]]:
        return [{"ratio": r} for r in self.ratios] + [{"blocks": b} for b in self.blocks]


class StabilitySpec(_Frozen):
    """Calibration variants for a stability study: every combination of these sources, sample counts and
    window lengths, each run with every seed of ``calibration.seeds``. A list left out is the main
    calibration's single value, so ``stability: {samples: [8, 32]}`` varies the sample count only."""

    samples: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)
    seq_lens: list[Annotated[int, Field(ge=2)]] | None = Field(None, min_length=1)
    sources: list[str] | None = Field(None, min_length=1)

    @field_validator("samples", "seq_lens", "sources")
    @classmethod
    def _unique(cls, values: list | None) -> list | None:
        if values is not None and len(set(values)) != len(values):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            raise ValueError(f"{', '.join(map(repr, repeated))} listed twice in {values}")
        return values

    def variants(self, calibration: CalibrationSpec) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Each variant's ``{source, samples, seq_len}`` with the config keys it comes from (for errors),
        in the order sources × samples × seq_lens."""
        out = []
        sources = self.sources or [calibration.source]
        samples = self.samples or [calibration.samples]
        seq_lens = self.seq_lens or [calibration.seq_len]
        for i, source in enumerate(sources):
            for j, n in enumerate(samples):
                for m, seq_len in enumerate(seq_lens):
                    keys = {
                        "source": f"stability.sources[{i}]" if self.sources else "calibration.source",
                        "samples": f"stability.samples[{j}]" if self.samples else "calibration.samples",
                        "seq_len": f"stability.seq_lens[{m}]" if self.seq_lens else "calibration.seq_len",
                    }
                    out.append(({"source": source, "samples": n, "seq_len": seq_len}, keys))
        return out


class ResourcesSpec(_Frozen):
    """What each task of the Ray executor (``bench run --executor ray``) asks of the cluster; the local
    executor ignores it. A GPU grid sets ``num_gpus: 1`` so Ray places one task per GPU."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


Device = Literal["auto", "cpu", "cuda"] | str
DType = Literal["float32", "bfloat16", "float16", "float64"]


class GridConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    metrics: list[ComponentSpec] = Field(min_length=1)
    selectors: list[ComponentSpec] = Field(min_length=1)
    budgets: BudgetSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    accuracy: AccuracySpec | None = None
    speed: SpeedSpec | None = None
    #: per-task resources for the Ray executor (not part of any cell id)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    #: calibration variants (sources × samples × seq_lens) for a stability study; see ``bench stability``
    stability: StabilitySpec | None = None
    #: blocks never removed; negative indices count from the end (-1 = last block)
    protect: list[int] = Field(default_factory=list)
    device: Device = "auto"
    dtype: DType = "float32"
    #: keep captured hidden states on disk under the results dir (safetensors) for reruns
    cache_hidden_states: bool = True

    def calibration_variants(self) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """``{source, samples, seq_len}`` of each calibration variant and the keys naming its values:
        the main calibration alone without a ``stability:`` section."""
        if self.stability is None:
            cal = self.calibration
            keys = {"source": "calibration.source", "samples": "calibration.samples",
                    "seq_len": "calibration.seq_len"}
            return [({"source": cal.source, "samples": cal.samples, "seq_len": cal.seq_len}, keys)]
        return self.stability.variants(self.calibration)

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("metrics", "selectors", mode="before")
    @classmethod
    def _component_shorthand(cls, v: Any) -> Any:
        return [{"name": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return v


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{_loc(err['loc'])}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, *, origin: str = "<config>") -> GridConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the grid must be a mapping of keys, got {type(data).__name__}")
    try:
        return GridConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: invalid grid config\n{format_validation_error(exc)}") from None


def load_config(path: str | Path) -> GridConfig:
    """Read a grid YAML file (safe loader only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    return parse_config(data, origin=str(path))
