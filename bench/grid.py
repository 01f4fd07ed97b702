"""Expand a grid config into cells, each a frozen spec hashed into a stable id (HELM-style).

A cell is one (model, calibration seed, metric, selector, budget). Its id is a hash of its canonical
JSON: the *resolved* parameters and ``version`` of its metric, selector and every evaluation, the
capture / data protocol, the dtype and the device type. Writing a default out, or leaving it out, is
the same cell; changing a metric's version, a default, or the device invalidates exactly the cells
that depend on it.

A method preset (``methods:``) is a cell with the preset's metric, selector, unit, healing and protected
blocks (the grid's ``protect`` added), crossed with models, calibration variants, seeds and budgets only;
its id hashes the method's name too, so the metric × selector cells of a grid keep their ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algorithms import METHODS, MODEL_METRICS, SELECTORS
from bench.config import NO_HEALING, ComponentSpec, ConfigError, GridConfig
from estimators import METRICS
from estimators.registry import Registry, RegistryError, find, resolve_params

if TYPE_CHECKING:
    from algorithms.methods import MethodPreset

#: bump when hidden-state capture, data windowing or the perplexity protocol change their numbers
PROTOCOL_VERSION = "2"  # 2: BOS leads each window for tokenizers that add one


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def device_type(device: str) -> str:
    """The device *type* a grid's ``device`` runs on: ``auto`` resolved on this machine (cuda when
    available, else cpu), ``cuda:1`` → ``cuda``. It enters every cell id and cache key: numbers
    measured on a GPU are not the CPU's."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":", 1)[0]


def metric_registry(name: str) -> Registry:
    """The registry of the metric ``name``: :data:`estimators.METRICS` (scores from hidden states) or
    :data:`algorithms.MODEL_METRICS` (scores that run the model: ``ppl``, ``taylor``). ``RegistryError``
    with a did-you-mean over both when it is in neither."""
    return find(name, METRICS, MODEL_METRICS)


def metric_class(name: str) -> Any:
    """The class of the metric ``name``, whichever registry holds it."""
    return metric_registry(name).get(name)


def is_model_metric(name: str) -> bool:
    """Whether the metric ``name`` runs the model (no hidden states needed to score it)."""
    return metric_registry(name) is MODEL_METRICS


def resolved_component(registry, spec: ComponentSpec) -> dict[str, Any]:
    """A metric's or selector's identity: name, version and its *resolved* parameters (every
    constructor parameter with its default filled in), so ``{name: hsic}`` and the same metric with its
    defaults written out are one cell."""
    cls = registry.get(spec.name)
    try:
        params = resolve_params(cls, spec.params)
    except TypeError as exc:
        raise ConfigError(f"{spec.name}: {exc}") from None
    return {"name": spec.name, "version": str(cls.version), "params": params}


@dataclass(frozen=True)
class Cell:
    """One (model, calibration variant and seed, metric, selector, budget) of a grid, with everything
    that decides its numbers. Its id hashes :meth:`spec` (resolved parameters, versions, evaluations,
    dtype and device type), never the YAML as written."""

    grid: str
    model: dict[str, Any]
    calibration: dict[str, Any]  # source, samples, seq_len, seed
    metric: ComponentSpec
    selector: ComponentSpec
    budget: dict[str, float | int]  # {"ratio": r} or {"blocks": k}
    protect: tuple[int, ...]
    #: (name, resolved identity) of every evaluation the grid measures, in registry order
    evaluations: tuple[tuple[str, dict[str, Any]], ...]
    dtype: str
    device: str  # device type: cpu, cuda, mps
    #: what is removed: ``block``, ``attention`` or ``mlp`` (a residual branch of each chosen block)
    unit: str = "block"
    #: what follows removal (``none``: nothing)
    healing: ComponentSpec = ComponentSpec(name=NO_HEALING)
    #: the method preset the cell runs (``None``: a metric × selector cell of the grid)
    method: str | None = None
    #: the grid's ``scoring``: ``streamed`` scores the metric during capture when it can
    scoring: str = "stored"
    #: the dtype hidden states are kept in (``float32``, ``float16``, ``bfloat16``)
    state_dtype: str = "float32"

    @cached_property
    def healing_identity(self) -> dict[str, Any] | None:
        """The healing's name, version and resolved parameters (``None``: no healing)."""
        if self.healing.name == NO_HEALING:
            return None
        from algorithms.healing import HEALINGS

        return HEALINGS.get(self.healing.name)(self.healing.params).describe()

    @cached_property
    def metric_identity(self) -> dict[str, Any]:
        return resolved_component(metric_registry(self.metric.name), self.metric)

    @cached_property
    def stream_kind(self) -> str | None:
        """How the metric is scored from streamed states (:mod:`estimators.streaming`), or None: the grid
        stores states, the metric runs the model, or it needs every state at once."""
        if self.scoring != "streamed" or is_model_metric(self.metric.name):
            return None
        return metric_class(self.metric.name)(**self.metric.params).stream_kind()

    @property
    def stream_key(self) -> str:
        """A streamed metric's accumulator in its calibration group: the metric's identity and the stream it
        reads (block states, or the sub-layer stream for branch units)."""
        return short_hash({"metric": self.metric_identity, "stream": "block" if self.unit == "block" else "sublayer"})

    @property
    def streamed_scores(self) -> bool:
        """Whether streaming changes the scores' last digits (sums instead of one pass: ``tokens``,
        ``moments``); a ``sample`` metric scores the stored path's rows bit for bit."""
        return self.stream_kind in ("tokens", "moments")

    @cached_property
    def selector_identity(self) -> dict[str, Any]:
        return resolved_component(SELECTORS, self.selector)

    def spec(self) -> dict[str, Any]:
        """The canonical, JSON-ready description of the cell (without the grid's name)."""
        return {
            "model": self.model,
            "calibration": self.calibration,
            "metric": self.metric_identity,
            "selector": self.selector_identity,
            "budget": self.budget,
            "protect": list(self.protect),
            "evaluations": dict(self.evaluations),
            "dtype": self.dtype,
            "device": self.device,
            # only when not the default, so the cells of grids without these axes keep their ids
            **({"unit": self.unit} if self.unit != "block" else {}),
            **({"healing": self.healing_identity} if self.healing_identity is not None else {}),
            **({"method": self.method} if self.method is not None else {}),
            **({"scoring": "streamed"} if self.streamed_scores else {}),
            **({"state_dtype": self.state_dtype} if self.state_dtype != "float32" else {}),
        }

    def versions(self) -> dict[str, str]:
        return {
            "metric": self.metric_identity["version"],
            "selector": self.selector_identity["version"],
            "protocol": PROTOCOL_VERSION,
            **{name: identity["version"] for name, identity in self.evaluations},
            **({"healing": self.healing_identity["version"]} if self.healing_identity is not None else {}),
        }

    @cached_property
    def cell_id(self) -> str:
        return short_hash({"spec": self.spec(), "protocol": PROTOCOL_VERSION})

    @property
    def budget_label(self) -> str:
        if "ratio" in self.budget:
            return f"{self.budget['ratio']:.0%}"
        if "params" in self.budget:
            return f"params {self.budget['params']:.0%}"
        return f"{self.budget['blocks']} {'blocks' if self.unit == 'block' else 'units'}"  # sublayer: units

    @property
    def unit_noun(self) -> str:
        return {"block": "blocks", "attention": "attention branches", "mlp": "MLP branches",
                "sublayer": "sub-layers"}[self.unit]

    def resolve_k(self, n_blocks: int, unit_parameters: list[int] | None = None,
                  total_parameters: int | None = None) -> int:
        """Units to remove: ``floor(ratio * n_units + 0.5)`` (at least 1), the absolute count, or for a
        ``params`` budget (share of the model's parameters kept) the whole number of units nearest to
        ``(1 - share) * total_parameters / mean unit size`` (at least 1). The record keeps the share
        really kept. ``n_units`` is ``n_blocks``, or ``2 * n_blocks`` sub-layers for ``sublayer``
        (``unit_parameters`` then lists the ``2L`` branch sizes)."""
        n = self.n_units(n_blocks)
        protected = self.protected_units(n_blocks)
        if "ratio" in self.budget:
            k = max(1, int(self.budget["ratio"] * n + 0.5))
        elif "params" in self.budget:
            if unit_parameters is None or total_parameters is None:
                raise ConfigError(f"budget params {self.budget['params']} needs the model's parameter counts")
            free_sizes = [p for i, p in enumerate(unit_parameters) if i not in protected]
            size = sum(free_sizes) / max(1, len(free_sizes))
            k = max(1, round((1 - self.budget["params"]) * total_parameters / size)) if size else n
        else:
            k = int(self.budget["blocks"])
        free = n - len(protected)
        # a block must stay; every attention (or MLP) branch may go, the other branch stays; a sub-layer
        # must stay (the unit API allows removing all 2L, but a budget that asks for it is a mistake)
        if (self.unit in ("block", "sublayer") and k >= n) or k > free:
            what = f"{k} {self.unit_noun}"
            if "params" in self.budget:
                what += f" (to keep {self.budget['params']:.0%} of {total_parameters:,} parameters)"
            has = f"{n} sub-layers" if self.unit == "sublayer" else f"{n}"
            raise ConfigError(
                f"budget {self.budget} asks to remove {what} but the model has {has} "
                f"({free} removable)"
            )
        return k

    def n_units(self, n_blocks: int) -> int:
        """The candidates of a model of ``n_blocks`` blocks: ``n_blocks``, or ``2 * n_blocks`` sub-layers
        (:func:`algorithms.models.units.n_units`, without importing torch: validate stays cheap)."""
        return 2 * n_blocks if self.unit == "sublayer" else n_blocks

    def resolve_protected(self, n_blocks: int) -> frozenset[int]:
        """The protected blocks (``protect``, negative indices from the end)."""
        out = set()
        for p in self.protect:
            if not -n_blocks <= p < n_blocks:
                raise ConfigError(f"protect: block {p} is out of range for a model of {n_blocks} blocks")
            out.add(p % n_blocks)
        return frozenset(out)

    def protected_units(self, n_blocks: int) -> frozenset[int]:
        """The units the selector may not remove: the protected blocks (``protect`` names blocks for every
        unit kind), or for ``sublayer`` both branches ``2p`` and ``2p + 1`` of each protected block ``p``."""
        blocks = self.resolve_protected(n_blocks)
        if self.unit == "sublayer":
            return frozenset(j for p in blocks for j in (2 * p, 2 * p + 1))
        return blocks


def calibration_label(calibration: dict[str, Any]) -> str:
    """A calibration variant in words, seed left out: ``wikipedia/8×256`` (source/samples×seq_len)."""
    return f"{calibration['source']}/{calibration['samples']}×{calibration['seq_len']}"


def method_presets(config: GridConfig) -> list[MethodPreset]:
    """The presets of the grid's ``methods``, in order; :class:`ConfigError` naming ``methods[i].name`` for
    an unknown or broken one."""
    from algorithms.methods import method_preset

    out = []
    for i, spec in enumerate(config.methods):
        if spec.name not in METHODS:
            raise ConfigError(f"methods[{i}].name: {METHODS.unknown_message(spec.name)}")
        try:
            out.append(method_preset(spec.name))
        except RegistryError as exc:  # a broken plugin
            raise ConfigError(f"methods[{i}].name: {exc}") from None
    return out


def component_spec(part) -> ComponentSpec:
    """A preset's metric, selector or healing as a grid's component."""
    return ComponentSpec(name=part.name, params=dict(part.params))


def expand(config: GridConfig) -> list[Cell]:
    """All cells, ordered so a model and then its hidden states per calibration variant and seed are
    loaded once: for each, the metric × selector cells, then the method cells. A grid's calibration
    variants (its ``stability:`` section) are ordinary cells whose calibration differs; without that
    section the one variant is ``calibration`` itself."""
    from algorithms.evaluations import EVALUATIONS

    cells = []
    variants = [variant for variant, _ in config.calibration_variants()]
    evaluations = tuple((name, EVALUATIONS.get(name)(params).describe()) for name, params in config.evaluations.items())
    device = device_type(config.device)
    presets = method_presets(config)

    def make(model, variant: dict[str, Any], seed: int, **fields: Any) -> Cell:
        return Cell(grid=config.name, model=model.identity(), calibration={**variant, "seed": seed},
                    evaluations=evaluations, dtype=config.dtype, device=device, scoring=config.scoring,
                    state_dtype=config.state_dtype, **fields)

    for model, variant, seed in itertools.product(config.models, variants, config.calibration.seeds):
        for unit, healing, metric, selector, budget in itertools.product(
            config.units, config.healing, config.metrics, config.selectors, config.budgets.items(),
        ):
            cells.append(make(model, variant, seed, metric=metric, selector=selector, budget=budget,
                              protect=tuple(config.protect), unit=unit, healing=healing))
        for preset, budget in itertools.product(presets, config.budgets.items()):
            # the preset fixes unit and healing; its protected blocks join the grid's
            cells.append(make(model, variant, seed, metric=component_spec(preset.metric),
                              selector=component_spec(preset.selector), budget=budget,
                              protect=tuple(sorted(set(config.protect) | set(preset.protect))), unit=preset.unit,
                              healing=component_spec(preset.healing), method=preset.name))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if (first := seen.setdefault(cell.cell_id, cell)) is not cell:
            raise ConfigError(
                "the grid lists the same cell twice: a metric, selector or budget repeats once its parameters "
                f"are resolved (metric {first.metric.label()!r} and {cell.metric.label()!r}, selector "
                f"{first.selector.label()!r} and {cell.selector.label()!r}, budget {first.budget_label})"
            )
    return cells


def _component_problem(kind: str, registry, spec: ComponentSpec) -> tuple[str, str] | None:
    """What is wrong with a metric's or selector's name or parameters, as ``(field, why)`` (field
    ``.name``, ``.params``, or ``""`` for a constructor that fails in its own way); None when it builds."""
    try:
        cls = registry.get(spec.name)
    except RegistryError as exc:
        return ".name", str(exc)
    try:
        cls(**spec.params)
    except (TypeError, ValueError) as exc:
        return ".params", str(exc)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's constructor failing in its own way
        return "", (f"{kind} {spec.name!r} ({registry.origin(spec.name)}) cannot be built with {spec.params}: "
                    f"{type(exc).__name__}: {exc}")
    return None


def _check_component(kind: str, registry, index: int, spec: ComponentSpec) -> None:
    if (problem := _component_problem(kind[:-1], registry, spec)) is not None:
        raise ConfigError(f"{kind}[{index}]{problem[0]}: {problem[1]}")


def _expansion(index: int, preset: MethodPreset, kind: str, label: str) -> str:
    """``methods[2]: method 'gromov' expands to metric 'angular(tokens=last)'``: the start of an error about
    what a method preset sets."""
    return f"methods[{index}]: method {preset.name!r} expands to {kind} {label!r}"


def _check_methods(presets: list[MethodPreset]) -> None:
    """Each preset's metric, selector and healing, checked as ``metrics[i]``, ``selectors[i]`` and
    ``healing[i]`` are, the error naming ``methods[i]``."""
    for i, preset in enumerate(presets):
        metric, selector = component_spec(preset.metric), component_spec(preset.selector)
        try:
            registry = metric_registry(metric.name)
        except RegistryError as exc:
            raise ConfigError(f"{_expansion(i, preset, 'metric', metric.label())}: {exc}") from None
        if selector.name not in SELECTORS:
            raise ConfigError(f"{_expansion(i, preset, 'selector', selector.label())}: "
                              f"{SELECTORS.unknown_message(selector.name)}")
        healing = component_spec(preset.healing)
        if (why := _healing_problem(healing)) is not None:
            raise ConfigError(f"{_expansion(i, preset, 'healing', healing.label())}: {why[1]}")
        for kind, reg, spec in (("metric", registry, metric), ("selector", SELECTORS, selector)):
            if (problem := _component_problem(kind, reg, spec)) is not None:
                raise ConfigError(f"{_expansion(i, preset, kind, spec.label())}: {problem[1]}")


def _requirement_problem(registry, name: str) -> str | None:
    """``needs optuna: pip install 'blockbench[optuna]'`` when the component ``name`` declares an optional
    library (its ``requires``, :mod:`algorithms.extras`) that is not installed; None otherwise, or when
    the name is unknown or broken (the checks that follow report that). Imports the component's module,
    never the library."""
    if name == NO_HEALING or name not in registry:
        return None
    from algorithms import extras

    try:
        missing = extras.missing(registry.get(name))
    except RegistryError:
        return None
    except TypeError as exc:  # a plugin's malformed ``requires``
        return f"cannot be checked: {exc}"
    return extras.needs(missing) if missing else None


def _check_requirements(config: GridConfig) -> None:
    """Refuse a grid whose metric, selector or healing needs an extra that is not installed, naming the
    key (``selectors[1]``) and the command that installs it."""
    from algorithms.healing import HEALINGS

    for key, kind, registry, specs in (("metrics", "metric", None, config.metrics),
                                       ("selectors", "selector", SELECTORS, config.selectors),
                                       ("healing", "healing", HEALINGS, config.healing)):
        for i, spec in enumerate(specs):
            reg = registry or metric_registry(spec.name)
            if (why := _requirement_problem(reg, spec.name)) is not None:
                raise ConfigError(f"{key}[{i}]: {kind} {spec.name!r} {why}")


def _check_preset_requirements(presets: list[MethodPreset]) -> None:
    """:func:`_check_requirements` for what each method preset expands to, the error naming ``methods[i]``."""
    from algorithms.healing import HEALINGS

    for i, preset in enumerate(presets):
        for kind, part in (("metric", preset.metric), ("selector", preset.selector), ("healing", preset.healing)):
            spec = component_spec(part)
            try:
                reg = {"selector": SELECTORS, "healing": HEALINGS}.get(kind) or metric_registry(spec.name)
            except RegistryError:
                continue  # _check_methods names it
            if (why := _requirement_problem(reg, spec.name)) is not None:
                raise ConfigError(f"{_expansion(i, preset, kind, spec.label())}, which {why}")


def _check_sublayer_healing(config: GridConfig, presets: list[MethodPreset]) -> None:
    """Healing after ``sublayer`` removal is not supported yet: ``linear`` fits maps over runs of blocks or
    over one branch kind (``algorithms.healing.linear.removed_runs`` refuses ``sublayer``), and a run of
    sub-layers may start or end inside a block."""
    why = ("healing after sublayer removal is not supported yet (linear healing does not fit runs of the "
           "sub-layer stream); use healing: none with sublayer units")
    if "sublayer" in config.units and config.metrics:
        for i, spec in enumerate(config.healing):
            if spec.name != NO_HEALING:
                raise ConfigError(f"healing[{i}]: {spec.label()!r} with units: sublayer: {why}")
    for i, preset in enumerate(presets):
        if preset.unit == "sublayer" and preset.healing.name != NO_HEALING:
            raise ConfigError(f"{_expansion(i, preset, 'healing', preset.healing.label())}: {why}")


def validate(config: GridConfig, *, extras: bool = True) -> list[Cell]:
    """Check names, parameters, sources, models and budgets without running anything. ``extras``: also
    refuse components whose optional library is not installed (``bench report``/``check`` read records
    and pass False)."""
    # names first, from the registries alone (no module imported: a typo is reported at once)
    for i, spec in enumerate(config.metrics):
        try:
            metric_registry(spec.name)
        except RegistryError as exc:
            raise ConfigError(f"metrics[{i}].name: {exc}") from None
    for i, spec in enumerate(config.selectors):
        if spec.name not in SELECTORS:
            raise ConfigError(f"selectors[{i}].name: {SELECTORS.unknown_message(spec.name)}")
    if extras:  # before any parameter is checked: a component's check may need its library
        _check_requirements(config)
    for i, spec in enumerate(config.healing):
        _check_healing(i, spec)
    presets = method_presets(config)
    if extras:
        _check_preset_requirements(presets)
    _check_methods(presets)
    _check_sublayer_healing(config, presets)
    from algorithms.data import DataError, check_source
    from algorithms.models.zoo import model_block_count, model_width

    for i, m in enumerate(config.metrics):
        _check_component("metrics", metric_registry(m.name), i, m)
    for i, s in enumerate(config.selectors):
        _check_component("selectors", SELECTORS, i, s)
    sources = [("calibration.source", config.calibration.source)]
    sources += [(f"{name}.source", params.source) for name, params in config.evaluations.items()
                if isinstance(getattr(params, "source", None), str)]
    for key, source in sources:
        try:
            check_source(source)
        except DataError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    stability_sources = config.stability.sources if config.stability is not None else None
    for i, source in enumerate(stability_sources or []):
        try:
            check_source(source)
        except DataError as exc:
            raise ConfigError(f"stability.sources[{i}]: {exc}") from None
    cells = expand(config)
    method_index = {preset.name: i for i, preset in enumerate(presets)}
    # the unit kinds the cells remove, each with the key that asks for it
    units = [("units", u) for u in config.units if config.metrics] + [
        (f"methods[{i}]", preset.unit) for i, preset in enumerate(presets)]
    for i, model in enumerate(config.models):
        try:
            n_blocks = model_block_count(model.name)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"models[{i}].name: {exc}") from None
        if n_blocks is None:
            continue  # a hub id: its size is known once loaded
        _check_units(units, i, model.name)
        sizes_of = unit_sizes(config, units, i, model.name)
        width = model_width(model.name)
        for variant, keys in config.calibration_variants():
            n_tokens = variant["samples"] * variant["seq_len"]
            where = f"models[{i}] = {model.name!r}{_variant_note(config, variant, keys)}"
            for j, spec in enumerate(config.metrics):
                try:
                    metric_class(spec.name)(**spec.params).check_input(n_tokens, width)
                except ValueError as exc:
                    raise ConfigError(f"metrics[{j}].params: {exc} ({where})") from None
            for j, preset in enumerate(presets):
                spec = component_spec(preset.metric)
                try:
                    metric_class(spec.name)(**spec.params).check_input(n_tokens, width)
                except ValueError as exc:
                    raise ConfigError(f"{_expansion(j, preset, 'metric', spec.label())}: {exc} ({where})") from None
        for cell in cells:
            if cell.model["name"] == model.name:
                try:
                    sizes, total = sizes_of.get(cell.unit, (None, None))
                    k = cell.resolve_k(n_blocks, sizes, total)
                    n_free = cell.n_units(n_blocks) - len(cell.protected_units(n_blocks))
                except ConfigError as exc:
                    what = f" (methods[{method_index[cell.method]}] = {cell.method!r})" if cell.method else ""
                    raise ConfigError(f"budgets: {exc} (models[{i}] = {model.name!r}){what}") from None
                try:
                    SELECTORS.get(cell.selector.name)(**cell.selector.params).check_size(n_free, k)
                except ValueError as exc:
                    if cell.method is None:
                        key = f"selectors[{config.selectors.index(cell.selector)}]"
                    else:
                        j = method_index[cell.method]
                        key = _expansion(j, presets[j], "selector", cell.selector.label())
                    raise ConfigError(f"{key}: {exc} (budget {cell.budget_label}, "
                                      f"models[{i}] = {model.name!r})") from None
        _check_text_length(config, i, model.name)
    return cells


def _healing_problem(spec: ComponentSpec) -> tuple[str, str] | None:
    """What is wrong with a healing's name or parameters, as ``(field, why)``; None when it builds."""
    if spec.name == NO_HEALING:
        return (".params", f"'{NO_HEALING}' takes no parameters, got {spec.params}") if spec.params else None
    from algorithms.healing import HEALINGS

    if spec.name not in HEALINGS:
        return ".name", f"{HEALINGS.unknown_message(spec.name)} (or '{NO_HEALING}')"
    try:
        HEALINGS.get(spec.name)(spec.params)
    except (TypeError, ValueError) as exc:
        return ".params", str(exc)
    return None


def _check_healing(index: int, spec: ComponentSpec) -> None:
    if (problem := _healing_problem(spec)) is not None:
        raise ConfigError(f"healing[{index}]{problem[0]}: {problem[1]}")


def _local_config(name: str) -> dict[str, Any] | None:
    """A model's config.json when it is on disk already (a local folder, or a zoo model built before)."""
    from algorithms.models.zoo import MODELS, cache_root

    folder = cache_root() / "models" / name if name in MODELS else Path(name).expanduser()
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_units(units: list[tuple[str, str]], index: int, name: str) -> None:
    """Refuse sub-layer units for a model family whose branches cannot be removed (from config.json;
    the zoo's models are all of supported families). ``units``: each unit kind the grid removes, with the
    key asking for it (``units``, or ``methods[i]`` for a preset's unit)."""
    if all(u == "block" for _, u in units):
        return
    from algorithms.models.units import UnitError, check_model_type

    data = _local_config(name)
    if data is None:
        return
    model_type = data.get("text_config", {}).get("model_type") or data.get("model_type")
    try:
        check_model_type(str(model_type))
    except UnitError as exc:
        key = next(k for k, u in units if u != "block")
        asked = [u for k, u in units if k == key and u != "block"]
        shown = asked if key == "units" else repr(asked[0])
        raise ConfigError(f"{key}: {shown} for models[{index}] = {name!r}: {exc}") from None


def unit_sizes(config: GridConfig, units: list[tuple[str, str]], index: int, name: str,
               ) -> dict[str, tuple[list[int], int]]:
    """Each unit kind's per-block parameter counts and the model's total, for ``params`` budgets: from
    the model built on the meta device from its config (no weights read). Empty when the grid has no
    ``params`` budget or the config is not on disk yet (checked when the model loads). ``units`` as
    :func:`_check_units` takes them."""
    if not config.budgets.params:
        return {}
    data = _local_config(name)
    if data is None:
        return {}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from algorithms.models.blocks import count_parameters
    from algorithms.models.units import UnitError, unit_parameters

    folder = Path(name).expanduser() if Path(name).expanduser().is_dir() else None
    if folder is None:
        from algorithms.models.zoo import cache_root

        folder = cache_root() / "models" / name
    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    out = {}
    for key, unit in units:
        if unit in out:
            continue
        try:
            out[unit] = (unit_parameters(model, unit), count_parameters(model))
        except UnitError as exc:
            raise ConfigError(f"{key}: {unit!r} for models[{index}] = {name!r}: {exc}") from None
    return out


def _variant_note(config: GridConfig, variant: dict[str, Any], keys: dict[str, str]) -> str:
    """``; calibration variant news/32×256: stability.sources[1] = 'news', ...`` for a stability grid."""
    if config.stability is None:
        return ""
    parts = ", ".join(f"{keys[k]} = {variant[k]!r}" for k in ("source", "samples", "seq_len"))
    return f"; calibration variant {calibration_label(variant)}: {parts}"


#: memo of text-length checks that passed (``bench validate`` on a valid grid loads no tokenizer)
TEXT_CHECKS = "text-checks.json"
_TEXT_CHECKS_KEPT = 256
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def _text_check_key(config: GridConfig, folder: Path) -> str | None:
    """What decides the outcome of :func:`_check_text_length` for the model in ``folder``: the versions of
    its tokenizer files (every file but weights) and of the text sources, the window sizes, the data
    protocol and the transformers version. None when a version is not known cheaply (nothing memoised)."""
    from importlib.metadata import PackageNotFoundError, version

    from algorithms.data import file_versions, source_version

    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
    parts: dict[str, Any] = {"tokenizer": file_versions(files), "protocol": PROTOCOL_VERSION, "windows": [],
                             "heldout": []}
    try:
        parts["transformers"] = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - transformers is a dependency
        return None
    for variant, _ in config.calibration_variants():
        parts["windows"].append([source_version(variant["source"]), variant["samples"], variant["seq_len"]])
    for params in config.evaluations.values():
        if all(hasattr(params, a) for a in ("source", "seq_len", "max_windows")):
            parts["heldout"].append([source_version(params.source), params.seq_len, params.max_windows])
    if parts["tokenizer"] is None or any(v[0] is None for v in parts["windows"] + parts["heldout"]):
        return None
    return short_hash(parts, 32)


def _remember_text_check(key: str) -> None:
    """Add ``key`` to the memo (the newest :data:`_TEXT_CHECKS_KEPT` kept); an unwritable memo only costs
    the next check."""
    from bench.store import read_memo, write_bytes_atomic

    path, memo = read_memo(TEXT_CHECKS)
    memo.pop(key, None)
    memo[key] = True
    memo = dict(list(memo.items())[-_TEXT_CHECKS_KEPT:])
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(memo, indent=0).encode())


def _check_text_length(config: GridConfig, index: int, name: str) -> None:
    """Refuse a calibration set longer than its text, when the tokenizer is on disk already (a zoo
    model not yet built is checked when it runs, rather than downloaded by ``validate``). A check that
    passed is memoised under ``cache_root()/text-checks.json`` by :func:`_text_check_key`, so validating
    an unchanged grid again imports no transformers and loads no tokenizer."""
    from algorithms.data import DataError, calibration_batch, heldout_windows
    from algorithms.models.zoo import MODELS, cache_root

    folder = cache_root() / "models" / name if name in MODELS else Path(name).expanduser()
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return
    key = _text_check_key(config, folder)
    from bench.store import read_memo

    if key is not None and key in read_memo(TEXT_CHECKS)[1]:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for variant, keys in config.calibration_variants():
        try:
            calibration_batch(tokenizer, variant["source"], samples=variant["samples"],
                              seq_len=variant["seq_len"], seed=0)
        except DataError as exc:
            where = keys["samples"] if config.stability is not None else "calibration"
            raise ConfigError(f"{where}: {exc} (models[{index}] = {name!r}"
                              f"{_variant_note(config, variant, keys)})") from None
    for section, params in config.evaluations.items():  # evaluations on held-out windows
        if not all(hasattr(params, a) for a in ("source", "seq_len", "max_windows")):
            continue
        try:
            heldout_windows(tokenizer, params.source, seq_len=params.seq_len, max_windows=params.max_windows)
        except DataError as exc:
            raise ConfigError(f"{section}: {exc} (models[{index}] = {name!r})") from None
    if key is not None:
        _remember_text_check(key)
