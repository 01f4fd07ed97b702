"""Grid configuration: a YAML file validated by pydantic into frozen specs.

Every error is a :class:`ConfigError` whose message names the offending key (``metrics[1].name``)
and, where it helps, the allowed values. The CLI maps it to exit code 2.

A grid file is read defensively (:func:`load_config`): at most :data:`GRID_FILE_LIMIT` bytes of UTF-8
text, YAML's safe loader only, no key given twice in one mapping (at any level), aliases expanding to
at most :data:`ALIAS_EXPANSION_LIMIT` extra nodes (no "billion laughs"), no recursive aliases. Types
are strict: a bool is not a number, a string is not a bool, a float is not an int (an int is a float).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: the largest grid file read (bytes); a grid is a few hundred lines
GRID_FILE_LIMIT = 1 << 20
#: how many nodes YAML aliases may add to a grid file once expanded (each use of ``*name`` counts the
#: whole value it repeats); a "billion laughs" file needs billions
ALIAS_EXPANSION_LIMIT = 10_000
#: calibration seeds are integers 0 <= seed < SEED_LIMIT (what torch.Generator.manual_seed and
#: random.seed take alike)
SEED_LIMIT = 2**63


class ConfigError(ValueError):
    """A grid config that cannot run. The message names the key and the value."""


#: the error type of a check across keys, or inside a list: its ``ctx["key"]`` is the key it is about
#: (``methods[2]``, ``selectors``), which :func:`format_validation_error` names instead of the location
KEY_ERROR = "grid_key"


def key_error(key: str, message: str) -> PydanticCustomError:
    """A validation error about ``key`` (raise it from a validator whose own location is not that key)."""
    return PydanticCustomError(KEY_ERROR, message, {"key": key})


class _Frozen(BaseModel):
    # strict: a YAML ``true`` is no block count, ``"yes"`` no bool, ``2.5`` no int (ints are floats)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _seed_in_range(seed: int) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError("out of range: seeds are integers 0 <= seed < 2**63")
    return seed


Seed = Annotated[int, AfterValidator(_seed_in_range)]


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
    """A model: a zoo name (``smollm2-135m``), a local folder, or a hub id the user can reach.

    ``trust_remote_code: true`` runs Python code shipped with the model; the grid file alone cannot
    turn it on: ``bench run``/``validate`` also need ``--allow-remote-code`` (exit 2 naming the model)."""

    name: str
    trust_remote_code: bool = False
    #: dispatch the weights with accelerate instead of moving the model to the grid's ``device``: ``auto``,
    #: ``balanced``, ``balanced_low_0``, ``sequential``, or ``{module: device}`` (``cpu``, ``disk``, a GPU
    #: index). Where each block runs can change its numbers, so the map is part of every cell id
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = None
    #: the most memory accelerate may place on each device (``{0: 20GiB, cpu: 60GiB}``); needs ``device_map``
    max_memory: dict[int | str, str] | None = None
    #: where ``disk`` entries of the map are written; needs ``device_map``
    offload_folder: str | None = None

    @field_validator("max_memory", "offload_folder")
    @classmethod
    def _placement_needs_a_map(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("device_map") is None:
            raise ValueError(f"given without device_map; set device_map (e.g. auto) or leave {info.field_name} out")
        return value

    def identity(self) -> dict[str, Any]:
        """The model's part of a cell: its fields, the placement ones only when set (so a grid that does
        not dispatch keeps the cell ids it always had)."""
        unset = {k for k in ("device_map", "max_memory", "offload_folder") if getattr(self, k) is None}
        return self.model_dump(mode="json", exclude=unset)


class CalibrationSpec(_Frozen):
    source: str = "wikipedia"
    samples: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=2)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    batch_size: int = Field(4, ge=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds


class BudgetSpec(_Frozen):
    """How much to remove: shares of the unit count (``ratios``), absolute unit counts (``blocks``),
    shares of the model's parameters to keep (``params``), or any mix. A unit is a block, or one
    attention or MLP branch (the grid's ``units``; ``sublayer``: either branch, so ``ratios`` and
    ``blocks`` count sub-layers out of 2L); ``params`` is how units of different sizes are compared
    fairly."""

    ratios: list[float] = Field(default_factory=list)
    blocks: list[int] = Field(default_factory=list)
    params: list[float] = Field(default_factory=list)

    @field_validator("ratios", "params")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float], info: ValidationInfo) -> list[float]:
        what = "ratio" if info.field_name == "ratios" else "share of parameters kept"
        for r in ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"{what} {r} must be strictly between 0 and 1")
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
        if not self.ratios and not self.blocks and not self.params:
            raise ValueError("give at least one of 'ratios', 'blocks' or 'params'")
        return self

    def items(self) -> list[dict[str, float | int]]:
        return ([{"ratio": r} for r in self.ratios] + [{"blocks": b} for b in self.blocks]
                + [{"params": p} for p in self.params])


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


class MethodSpec(_Frozen):
    """A method preset (``bench list methods``): a name only. A preset fixes its metric, selector, unit,
    healing and protected blocks; a grid that wants other parameters lists the metric and selector."""

    name: str
    params: Any = Field(None, exclude=True)  # only to name it in the error: presets take no parameters

    @field_validator("params")
    @classmethod
    def _no_params(cls, params: Any) -> Any:
        raise ValueError("a method preset takes no parameters (it fixes its metric, selector, unit and healing); "
                         "to change them, list its metric and selector under metrics and selectors instead")


Device = Literal["auto", "cpu", "cuda"] | str
#: ``sublayer``: BlockPruner's mixed pool, the 2L attention and MLP branches in residual-stream order
Unit = Literal["block", "attention", "mlp", "sublayer"]
#: the healing entry that means "no healing" (not in the healing registry)
NO_HEALING = "none"
DType = Literal["float32", "bfloat16", "float16", "float64"]


class GridConfig(_Frozen):
    """A validated grid. Evaluation sections (``perplexity:``, ``accuracy:``, ``speed:``, ``kl:``, a
    plugin's name) are validated by each evaluation's own ``Params`` model and collected in
    ``evaluations`` (perplexity always, with its defaults when the section is absent), in the
    evaluation registry's order."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, strict=True)

    #: results go to results/<name>: a plain folder name (no '.', '..', leading dot or separator)
    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    #: every metric is crossed with every selector; both may be left out when ``methods`` is given
    metrics: list[ComponentSpec] = Field(default_factory=list, min_length=1)
    selectors: list[ComponentSpec] = Field(default_factory=list, min_length=1)
    #: method presets (``algorithms.methods``): cells of their own, crossed with models, calibration and
    #: budgets only (a preset fixes its unit and healing)
    methods: list[MethodSpec] = Field(default_factory=list, min_length=1)
    budgets: BudgetSpec
    #: what a selector removes: whole blocks, attention / MLP branches (residual branches of a block), or
    #: ``sublayer``: either branch, from one pool of 2L
    units: list[Unit] = Field(default_factory=lambda: ["block"], min_length=1)
    #: what follows removal, before evaluation: none, or a healing method (``linear``, ``lora``, a plugin)
    healing: list[ComponentSpec] = Field(default_factory=lambda: [ComponentSpec(name=NO_HEALING)], min_length=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    #: evaluation name -> its validated parameters (a pydantic model of that evaluation's ``Params``)
    evaluations: dict[str, Any] = Field(default_factory=dict)
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
    #: ``stored``: a calibration group's hidden states are kept as one tensor and scored from it;
    #: ``streamed``: metrics that can (``estimators.streaming``) are scored batch by batch during capture,
    #: so memory does not grow with calibration tokens (states are stored only for a metric that cannot)
    scoring: Literal["stored", "streamed"] = "stored"
    #: the dtype hidden states are kept in (memory, the ``cache/hidden`` files, what streamed metrics see):
    #: float16 or bfloat16 halve them; metrics still compute in float32 or wider. Changes the numbers
    #: (it is in the cell id when not float32)
    state_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @property
    def perplexity(self) -> Any:
        """The perplexity evaluation's parameters (always measured)."""
        return self.evaluations["perplexity"]

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

    @field_validator("metrics", "selectors", "healing", "methods", mode="before")
    @classmethod
    def _component_shorthand(cls, v: Any) -> Any:
        return [{"name": c} if isinstance(c, str) else c for c in v] if isinstance(v, list) else v

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, methods: list[MethodSpec]) -> list[MethodSpec]:
        first: dict[str, int] = {}
        for i, m in enumerate(methods):
            if (j := first.setdefault(m.name, i)) != i:
                raise key_error(f"methods[{i}]", f"method {m.name!r} is listed twice (also methods[{j}])")
        return methods

    @model_validator(mode="after")
    def _pairs_or_methods(self) -> GridConfig:
        # metrics × selectors cells need both; methods bring their own
        if self.metrics and not self.selectors:
            raise key_error("selectors", "required when metrics are given (every metric is crossed with every "
                                         "selector); or leave out metrics and list methods")
        if self.selectors and not self.metrics:
            raise key_error("metrics", "required when selectors are given (every metric is crossed with every "
                                       "selector); or leave out selectors and list methods")
        if not self.metrics and not self.methods:
            raise key_error("metrics", "required: give metrics and selectors, or methods (presets: bench list "
                                       "methods), or both")
        healed = [h.name for h in self.healing if h.name != NO_HEALING]
        dispatched = [i for i, m in enumerate(self.models) if m.device_map is not None]
        if healed and dispatched:
            raise key_error(f"models[{dispatched[0]}].device_map",
                            f"healing ({healed[0]}) trains a copy of the pruned model, which a model dispatched by "
                            "device_map cannot give; heal without device_map, or drop healing")
        return self

    @field_validator("units", "healing", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, dict)) else v

    @field_validator("units")
    @classmethod
    def _units_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"units repeat: {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:[0-9]+", v):
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
            text = str(part)
            if not re.fullmatch(r"[\w-]+", text):
                text = repr(text)  # a key with odd characters is shown quoted, never split over lines
            out += f".{text}" if out else text
    return out or "<root>"


def _one_model(annotation: Any) -> Any:
    """The pydantic model inside ``Optional[X]``, ``list[X]`` or ``tuple[X, ...]`` (the annotation
    itself when it is one, or when it holds several types)."""
    import typing

    while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
        if len(args) != 1:
            return annotation
        annotation = args[0]
    return annotation


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys the pydantic model reached by ``loc`` (from ``model``) accepts; ``[]`` when the path
    leaves pydantic models (a plain mapping, a union of several models)."""
    current: Any = model
    for part in loc:
        current = _one_model(current)
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = current.model_fields[part].annotation
    current = _one_model(current)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def format_validation_error(exc: ValidationError | list[dict[str, Any]], model: type[BaseModel] | None = None,
                            *, nested_only: bool = False) -> str:
    """One ``key: message (got value)`` line per error; an unknown key gets a did-you-mean over the keys
    of the part of ``model`` it was found in (``nested_only``: not for ``model``'s own top-level keys,
    which the caller hints at itself)."""
    from estimators.registry import did_you_mean

    lines = []
    for err in exc.errors() if isinstance(exc, ValidationError) else exc:
        msg, hint = err["msg"].removeprefix("Value error, "), ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            loc = tuple(err["loc"])
            if model is not None and len(loc) > int(nested_only) and isinstance(loc[-1], str):
                hint = did_you_mean(loc[-1], _fields_at(model, loc[:-1]))
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or err["type"] in ("missing", KEY_ERROR) else f" (got {value!r})"
        key = err["ctx"]["key"] if err["type"] == KEY_ERROR else _loc(err["loc"])
        lines.append(f"{key}: {msg}{shown}{'.' + hint if hint and shown else hint}")
    return "\n".join(lines)


def _evaluation_sections(data: dict[str, Any], base_dir: Path | None = None,
                         ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split the evaluation sections out of a grid mapping: ``(rest, {name: params}, errors)``. A section
    named after a registered evaluation configures it (``null`` or ``{}``: its defaults); perplexity
    is always measured. ``base_dir`` (the grid file's folder) is the validation context's ``base_dir``:
    where an evaluation's relative file paths are taken from (accuracy's ``task_files``)."""
    from algorithms import extras
    from algorithms.evaluations import EVALUATIONS
    from estimators.registry import RegistryError

    rest = {k: v for k, v in data.items() if not (k in EVALUATIONS and k not in GridConfig.model_fields)}
    sections = {k: data[k] for k in EVALUATIONS.list() if k in data and k not in GridConfig.model_fields}
    sections.setdefault("perplexity", {})
    out: dict[str, Any] = {}
    errors: list[str] = []
    context = {"base_dir": base_dir} if base_dir is not None else None
    for name, section in sections.items():
        try:
            cls = EVALUATIONS.get(name)
        except RegistryError as exc:  # a broken plugin
            errors.append(f"{name}: {exc}")
            continue
        try:
            missing = extras.missing(cls)
        except TypeError as exc:  # a plugin's malformed ``requires``
            errors.append(f"{name}: {exc}")
            continue
        if missing:  # its parameters may need the library to be checked
            errors.append(f"{name}: {extras.needs(missing)}")
            continue
        if section is None:
            section = {}
        if not isinstance(section, dict):
            errors.append(f"{name}: the section must be a mapping of parameters, got {type(section).__name__}")
            continue
        try:
            out[name] = cls.Params.model_validate(section, context=context)
        except ValidationError as exc:
            errors.extend(f"{name}.{line}" for line in format_validation_error(exc, cls.Params).split("\n"))
            continue
        if coerced := _coerced_scalars(cls.Params, section, context):
            errors.extend(f"{name}.{line}" for line in format_validation_error(coerced).split("\n"))
            del out[name]
    return rest, out, errors


#: pydantic's strict-mode errors for a scalar its lax mode would have coerced (True -> 1, "yes" -> True,
#: 2.0 -> 2, "8" -> 8)
_SCALAR_TYPE_ERRORS = ("int_type", "bool_type", "float_type", "string_type")


def _coerced_scalars(model: type[BaseModel], data: Any, context: dict[str, Any] | None = None,
                     ) -> list[dict[str, Any]]:
    """The errors of the scalars in ``data`` that ``model`` accepts only by coercing them. An evaluation's
    ``Params`` (a plugin's among them) validate in lax mode, so a str still becomes its ``Path``; its
    bools, ints, floats and strings are held to the grid's strict types."""
    try:
        model.model_validate(data, strict=True, context=context)
    except ValidationError as exc:
        return [e for e in exc.errors() if e["type"] in _SCALAR_TYPE_ERRORS]
    return []


def _unknown_key_hint(key: str) -> str:
    from algorithms.evaluations import EVALUATIONS
    from estimators.registry import did_you_mean

    return did_you_mean(key, [*GridConfig.model_fields, *EVALUATIONS.list()])


def parse_config(data: Any, *, origin: str = "<config>", base_dir: str | Path | None = None) -> GridConfig:
    """A grid mapping as a :class:`GridConfig`; :class:`ConfigError` naming every bad key. ``base_dir``:
    where relative file paths of evaluation sections are taken from (:func:`load_config` gives the grid
    file's folder; they are absolute in the result); without it, the current directory."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the grid must be a mapping of keys, got {type(data).__name__}")
    if odd := [k for k in data if not isinstance(k, str)]:
        raise ConfigError(f"{origin}: invalid grid config\n{odd[0]!r}: unknown key (keys are names, got a "
                          f"{type(odd[0]).__name__})")
    if "evaluations" in data:
        raise ConfigError(f"{origin}: invalid grid config\nevaluations: unknown key; configure an evaluation "
                          "by a section named after it (perplexity:, accuracy:, speed:, kl:, or a plugin's name)")
    rest, evaluations, errors = _evaluation_sections(data, Path(base_dir).absolute() if base_dir is not None else None)
    try:
        config = GridConfig.model_validate({**rest, "evaluations": evaluations})
    except ValidationError as exc:
        lines = []
        for line in format_validation_error(exc, GridConfig, nested_only=True).split("\n"):
            key = line.split(":", 1)[0]
            if line.endswith("unknown key") and "." not in key and "[" not in key:
                line += _unknown_key_hint(key)
            lines.append(line)
        errors = lines + errors
    if errors:
        raise ConfigError(f"{origin}: invalid grid config\n" + "\n".join(errors))
    return config


def config_sections(config: GridConfig) -> dict[str, Any]:
    """The grid as the mapping of sections a grid file holds (``parse_config(config_sections(c)) == c``):
    how a config travels to a worker process."""
    data = config.model_dump(mode="json")
    evaluations = data.pop("evaluations")
    for key in ("metrics", "selectors", "methods"):  # left out of the grid: absent, as in the file
        if not data[key]:
            del data[key]
    return {**data, **evaluations}


def load_config(path: str | Path) -> GridConfig:
    """Read a grid YAML file: UTF-8 text of at most :data:`GRID_FILE_LIMIT` bytes, safe loader only, no
    duplicate keys, aliases within :data:`ALIAS_EXPANSION_LIMIT`. Relative paths of accuracy's
    ``task_files`` are taken from the file's folder (absolute in the result)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} is not a regular file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(GRID_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"grid file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > GRID_FILE_LIMIT:
        raise ConfigError(f"{path}: the grid file is larger than {GRID_FILE_LIMIT} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save the grid file as UTF-8") from None
    return parse_config(_safe_yaml(text, str(path)), origin=str(path), base_dir=path.parent)


class _GridLoader(yaml.SafeLoader):
    """PyYAML's safe loader; :func:`_safe_yaml` checks the composed node graph before constructing it."""


def _safe_yaml(text: str, origin: str) -> Any:
    """The YAML document in ``text`` (safe types only), refusing duplicate keys, recursive aliases and
    aliases that expand past :data:`ALIAS_EXPANSION_LIMIT`."""
    loader = None
    try:
        loader = _GridLoader(text)  # reads the first characters already: a NUL is a ReaderError here
        root = loader.get_single_node()
        if root is None:
            return None
        _check_nodes(root, origin)
        return loader.construct_document(root)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: malformed YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: malformed YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp such as 2001-02-30
        raise ConfigError(f"{origin}: malformed YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_nodes(root: yaml.Node, origin: str) -> None:
    """Walk the composed graph once (an aliased node is one object): duplicate keys, recursive aliases,
    and how many nodes the aliases add once the document is expanded."""
    constructor = yaml.constructor.SafeConstructor()
    sizes: dict[int, int] = {}  # id(node) -> nodes in its expanded value
    active: set[int] = set()

    def walk(node: yaml.Node, where: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(f"{origin}: {where}: a YAML alias refers to the value that contains it "
                              f"(line {node.start_mark.line + 1}); recursive values are not supported")
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                size += walk(child, f"{where}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else f"<{key.id}>"
                name = name if re.fullmatch(r"[\w-]+", name) else repr(name)
                inner = f"{where}.{name}" if where != "<root>" else str(name)
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    ident = constructor.construct_object(key, deep=True)
                    if (first := seen.setdefault(ident, key)) is not key:
                        raise ConfigError(
                            f"{origin}: {inner}: duplicate key {key.value!r} (lines {first.start_mark.line + 1} "
                            f"and {key.start_mark.line + 1}); give each key once")
                size += walk(key, inner) + walk(value, inner)
        active.discard(id(node))
        sizes[id(node)] = size
        extra = size - len(sizes)
        if extra > ALIAS_EXPANSION_LIMIT:
            raise ConfigError(f"{origin}: {where}: YAML aliases expand this value to {size} nodes, over the limit "
                              f"of {ALIAS_EXPANSION_LIMIT} repeated nodes; write the values out instead")
        return size

    walk(root, "<root>")


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` when ``device`` names an accelerator this machine lacks (``cuda`` without
    CUDA, ``cuda:N`` past the last card, ``mps`` off Apple silicon). ``bench validate`` and ``bench run``
    check it; :func:`bench.grid.expand` never does (cell ids of a GPU grid are computed anywhere)."""
    if device in ("cpu", "auto"):
        return  # always there (auto falls back to the CPU): no torch import for the commonest grids
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} was asked for but this machine has no CUDA device "
                              "(use device: cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= (count := torch.cuda.device_count()):
            raise ConfigError(f"device: {device!r} was asked for but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device: {device!r} was asked for but this machine has no MPS (Apple GPU) "
                              "device (use device: cpu or auto)")
