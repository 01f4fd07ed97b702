"""Method presets: a paper's pruning method as the metric × selector (and unit, healing, protected
blocks) that reproduces it, so a grid can say ``methods: [shortgpt, sleb]``.

Users think in methods, blockbench in components: a preset is only a name for a combination the grid
could spell out, plus what a reader needs to trust it (the paper, and ``deviations``: where blockbench
does not do what the paper did). A method cell has exactly the cell of its metric and selector, with the
method's name added to its identity and its labels.

``METHODS`` (in :mod:`algorithms`, lazy ``algorithms.methods:NAME`` entries) holds the built-ins; other
distributions add a :class:`MethodPreset` object under the entry-point group ``blockbench.methods``.
This module is plain Python (no torch), so listing presets and reading a grid stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: the pruning units a preset may fix (``bench.config.Unit``; repeated so this layer imports no ``bench``)
UNITS = ("block", "attention", "mlp", "sublayer")
#: the healing entry that means "no healing" (``bench.config.NO_HEALING``)
NO_HEALING = "none"


@dataclass(frozen=True)
class Component:
    """A metric, selector or healing as a preset fixes it: its registry name and keyword parameters
    (read-only: a preset is shared by every grid that names it)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a component's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"{self.name}: params must be a mapping of parameter names, got {self.params!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def label(self) -> str:
        """``name`` or ``name(k=v,...)``, as :meth:`bench.config.ComponentSpec.label` writes it."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in sorted(self.params.items()))})"


@dataclass(frozen=True)
class MethodPreset:
    """A published method as blockbench runs it. ``protect``: blocks the method always keeps (negative:
    from the end), merged with the grid's ``protect``; ``deviations``: short sentences saying where the
    preset differs from the paper (none means it follows the paper as far as blockbench can tell)."""

    name: str
    title: str
    authors: str  #: short: "Men et al. 2024"
    arxiv: str  #: the arXiv id, "2403.03853"
    metric: Component
    selector: Component
    #: ``sublayer``: indices count branches in stream order (``2i`` attention, ``2i + 1`` MLP of block i)
    unit: str = "block"
    healing: Component = Component(NO_HEALING)
    protect: tuple[int, ...] = ()
    deviations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("name", "title", "authors", "arxiv"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"method preset: {key} must be a non-empty string, got {getattr(self, key)!r}")
        for key in ("metric", "selector", "healing"):
            if not isinstance(getattr(self, key), Component):
                raise ValueError(f"method {self.name!r}: {key} must be an algorithms.methods.Component, "
                                 f"got {getattr(self, key)!r}")
        if self.unit not in UNITS:
            raise ValueError(f"method {self.name!r}: unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        # a list given for a tuple is accepted (and frozen); a bool is no block index
        protect = tuple(self.protect) if isinstance(self.protect, (list, tuple)) else None
        if protect is None or not all(isinstance(p, int) and not isinstance(p, bool) for p in protect):
            raise ValueError(f"method {self.name!r}: protect must be a tuple of block indices, got {self.protect!r}")
        object.__setattr__(self, "protect", protect)
        deviations = tuple(self.deviations) if isinstance(self.deviations, (list, tuple)) else None
        if deviations is None or not all(isinstance(d, str) and d for d in deviations):
            raise ValueError(f"method {self.name!r}: deviations must be a tuple of sentences, got {self.deviations!r}")
        object.__setattr__(self, "deviations", deviations)

    def citation(self) -> str:
        """``Men et al. 2024, arXiv 2403.03853``."""
        return f"{self.authors}, arXiv {self.arxiv}"

    def expands_to(self) -> str:
        """What a grid gets for this method, on one line, in the grid's own keys:
        ``metric: angular(tokens=last), selector: span, unit: block, healing: none, protect: []``."""
        protect = "[" + ", ".join(str(p) for p in self.protect) + "]"
        return (f"metric: {self.metric.label()}, selector: {self.selector.label()}, unit: {self.unit}, "
                f"healing: {self.healing.label()}, protect: {protect}")


def check_method(obj: Any) -> str | None:
    """The registry's check of an entry: why ``obj`` cannot be a method preset, or None."""
    if not isinstance(obj, MethodPreset):
        return f"it is a {type(obj).__module__}.{type(obj).__qualname__}, not an algorithms.methods.MethodPreset"
    return None


def method_preset(name: str) -> MethodPreset:
    """The preset registered under ``name`` (:class:`~estimators.registry.RegistryError` when it is
    unknown or broken, or when its ``name`` is not the name it is registered under: records and reports
    label cells by that name, so the two must agree)."""
    from algorithms import METHODS
    from estimators.registry import RegistryError

    preset = METHODS.get(name)
    if preset.name != name:
        raise RegistryError(f"method {name!r} from {METHODS.origin(name)} cannot be used: the preset it names is "
                            f"called {preset.name!r}; register it under that name")
    return preset


# ---------------------------------------------------------------------------------------- the built-ins
_SHORTENED = dict(
    title="Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of Retraining Methods",
    authors="Kim et al. 2024", arxiv="2402.02834",
)

SHORTGPT = MethodPreset(
    name="shortgpt",
    title="ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
    authors="Men et al. 2024", arxiv="2403.03853",
    metric=Component("bi"), selector=Component("topk"),
    deviations=("The last block is scored on its raw output, captured with hooks (the public code uses "
                "hidden_states[-1], which is after the final norm).",),
)

GROMOV = MethodPreset(
    name="gromov",
    title="The Unreasonable Ineffectiveness of the Deeper Layers",
    authors="Gromov et al. 2024", arxiv="2403.17887",
    metric=Component("angular", {"tokens": "last"}), selector=Component("span"),
    deviations=("No QLoRA healing (to heal, list angular with tokens: last and span as a grid's metric and "
                "selector, with healing: lora).",),
)

SLEB = MethodPreset(
    name="sleb",
    title="SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks",
    authors="Song et al. 2024", arxiv="2402.09025",
    metric=Component("ppl"), selector=Component("iterative", {"objective": "loss"}),
    deviations=("Calibration is the grid's (the paper: 128 × 2048 tokens of WikiText-2).",
                "The loss is the mean calibration NLL (the logarithm of the paper's perplexity: the same "
                "choice at each step)."),
)

SHORTENED_PPL = MethodPreset(
    name="shortened-ppl", **_SHORTENED,
    metric=Component("ppl"), selector=Component("topk"),
    deviations=("No LoRA or continued pretraining after removal.",
                "The reference code also keeps blocks 0–3 and the last two unless --no_plus_heuristic; the paper "
                "applies that heuristic to Taylor (see shortened-taylor), so this preset protects no block."),
)

SHORTENED_TAYLOR = MethodPreset(
    name="shortened-taylor", **_SHORTENED,
    metric=Component("taylor"), selector=Component("topk"),
    protect=(0, 1, 2, 3, -2, -1),  # the paper's "+" heuristic: the first four and last two blocks are kept
    deviations=("No retraining after removal (the paper heals with LoRA or continued pretraining).",),
)

_MI_PRUN = dict(
    title="MI-PRUN: Optimize Large Language Model Pruning via Mutual Information",
    authors="Zhang et al. 2026", arxiv="2601.07212", selector=Component("fbs"),
)
_MI_PRUN_ESTIMATOR = ("The paper does not say how it estimates mutual information: blockbench has one preset per "
                      "estimator (mi-prun-gauss, mi-prun-renyi, mi-prun-ksg).")

MI_PRUN_GAUSS = MethodPreset(name="mi-prun-gauss", **_MI_PRUN, metric=Component("mi_gauss"),
                             deviations=(_MI_PRUN_ESTIMATOR,))
MI_PRUN_RENYI = MethodPreset(name="mi-prun-renyi", **_MI_PRUN, metric=Component("mi_renyi"),
                             deviations=(_MI_PRUN_ESTIMATOR,))
MI_PRUN_KSG = MethodPreset(name="mi-prun-ksg", **_MI_PRUN, metric=Component("mi_ksg"),
                           deviations=(_MI_PRUN_ESTIMATOR,))

CBO_LIKE = MethodPreset(
    name="cbo-like",
    title="Block removal for large language models through constrained binary optimization",
    authors="Jansen, Rausch, Montero, Orús 2026", arxiv="2602.00161",
    metric=Component("ppl"), selector=Component("ising", {"objective": "loss"}),
    deviations=("Pair interactions J_ij are measured on adjacent pairs only (the selector's default pairs: "
                "adjacent); the exact-k problem is solved exactly or by simulated annealing.",
                "Energies are measured by removing blocks and pairs on the calibration loss, not derived from "
                "gradients."),
)

ATTENTION_DROP = MethodPreset(
    name="attention-drop",
    title="What Matters in Transformers? Not All Attention is Needed",
    authors="He et al. 2024", arxiv="2406.15786",
    metric=Component("bi"), selector=Component("topk"), unit="attention",
)

REPLACEME = MethodPreset(
    name="replaceme",
    title="ReplaceMe: Network Simplification via Layer Pruning and Linear Transformations",
    authors="Shopkhoev et al. 2025", arxiv="2505.02819",
    metric=Component("angular"), selector=Component("span"), healing=Component("linear"),
    deviations=("The span is chosen by angular distance over all tokens (arccos of the cosine: the same argmin "
                "as cosine distance).",),
)

BLOCKPRUNER = MethodPreset(
    name="blockpruner",
    title="BlockPruner: Fine-grained Pruning for Large Language Models",
    authors="Zhong et al. 2024", arxiv="2406.10594",
    metric=Component("ppl"), selector=Component("iterative", {"objective": "loss"}), unit="sublayer",
    deviations=("The budget counts sub-layers (k of the 2L attention and MLP branches); the paper prunes to a "
                "parameter ratio: use budgets: params for that.",
                "Calibration is the grid's (the paper: 256 samples of Alpaca).",
                "The loss is the mean calibration NLL (the logarithm of the paper's perplexity: the same choice at "
                "each step).",
                "No recovery training after removal."),
)
