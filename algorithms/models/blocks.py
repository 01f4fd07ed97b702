"""Find a decoder-only model's block list and remove blocks from it correctly.

Removing a block is more than deleting it from the ``nn.ModuleList``. :func:`removal_changes` lists
every attribute assignment that removal needs, and :func:`remove_blocks` applies them:

1. the surviving blocks, in order, go into a new ``nn.ModuleList``;
2. every ``layer_idx``-style attribute inside them is renumbered to the block's new position
   (attention modules index the KV cache with it: a stale one makes ``generate()`` read another
   layer's keys, or index past the end of a cache built for fewer layers);
3. every config that describes the block list gets ``num_hidden_layers`` set and each per-layer
   list sliced to the kept blocks (Gemma-3's and Qwen2's ``layer_types``: the forward pass picks the
   mask by ``config.layer_types[i]`` and ``DynamicCache(config=...)`` builds sliding or full cache
   layers from it), plus the few fields that encode per-layer facts differently (Qwen2's
   ``max_window_layers``, GPT-Neo's ``attention_types``, and the mixture-of-experts layouts: index
   lists, dense prefixes, Qwen-MoE's sparse step, ERNIE's expert range; see
   :func:`_moe_layout_changes`), so that a saved model reloads identically;
4. values cached from the config at ``__init__`` are kept consistent (``has_sliding_layers`` on
   Qwen2-style models; GPT-2's per-layer attention scale when ``scale_attn_by_inverse_layer_idx``
   is set, which is folded into the query weights so the renumbered block still computes the same);
5. the removed blocks, numbered as in the dense model, are recorded as
   ``config.blockbench_removed_blocks``, so a saved pruned model says what was removed.

Indices given to :func:`remove_blocks` are positions in the model *as it is now*. When a model is
pruned twice, the second call's indices are mapped back to the dense model through the first
record: the current block ``j`` is the ``j``-th dense index not in ``blockbench_removed_blocks``.
The record is always the sorted union, in dense numbering.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
#: one attribute assignment: ``setattr(obj, name, value)``
Change = tuple[Any, str, Any]

#: dotted paths of the block list in the architectures we know (checked in order)
KNOWN_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma-3 (text), Phi, Phi-3, OLMo, Granite, ...
    "model.language_model.layers",  # multimodal wrappers around a text model (Gemma-3, LLaVA, ...)
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Falcon, Bloom, CodeGen
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "layers",  # a bare base model (LlamaModel, ...)
    "h",  # a bare GPT-2-style base model
    "decoder.layers",  # a bare OPTModel's decoder
)
#: attributes through which modules inside a block know their block's position
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")
#: list-valued config fields that are never per-layer, even when their length happens to match
_NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "blockbench_removed_blocks",
        "bos_token_id",
        "decoder_start_token_id",
        "eos_token_id",
        "forced_decoder_ids",
        "pad_token_id",
        "sep_token_id",
        "suppress_tokens",
    }
)
#: int config fields meaning "the first k layers are special" (Qwen2: layers < k use full attention;
#: DeepSeek-V2/V3, GLM-4-MoE, dots1, Mistral-4: layers < k have a dense MLP; AFMoE, LFM2-MoE likewise)
_PREFIX_COUNT_ATTRS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")
#: list config fields holding layer *indices*, not one value per layer (Qwen-MoE's dense-MLP layers,
#: Llama-4's MoE layers): renumbered to the kept blocks, never sliced, even when their length is n
_INDEX_LIST_ATTRS = ("mlp_only_layers", "moe_layers")
#: per-layer structure as a period/offset pattern (Jamba's attention and expert layers): removal
#: generally breaks the pattern and no config field can say the result, so it is refused
_PATTERN_ATTRS = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _layer_count(config: Any) -> int | None:
    """``config.num_hidden_layers`` when it is an int, else ``None``."""
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _expected_blocks(config: Any) -> int | None:
    """The block count a model's config states (its own, or its decoder text config's), or ``None``."""
    if config is None:
        return None
    n = _layer_count(config)
    return n if n is not None else _layer_count(_text_config(config))


def _text_config(config: Any) -> Any:
    """The decoder text config of a composite (multimodal) config, the config itself otherwise."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except (TypeError, ValueError):
            return None
    return None


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hidden_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's or branch's input or output (the first tensor of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find the hidden state in a {type(value).__name__}")


def block_path(model: nn.Module) -> str:
    """Dotted attribute path of the block ``ModuleList`` (e.g. ``"model.layers"``).

    Known paths are tried first; otherwise the ``nn.ModuleList`` holding the most parameters among
    those of ``config.num_hidden_layers`` entries (any length when there is no config).
    """
    expected = _expected_blocks(getattr(model, "config", None))

    def fits(mod: object) -> bool:
        return isinstance(mod, nn.ModuleList) and len(mod) > 0 and (expected is None or len(mod) == expected)

    for path in KNOWN_PATHS:
        if fits(_resolve(model, path)):
            return path
    candidates = [(name, mod) for name, mod in model.named_modules() if name and fits(mod)]
    if not candidates:
        wanted = f"{expected} entries (config.num_hidden_layers)" if expected is not None else "any length"
        raise ValueError(
            f"cannot find the block list of {type(model).__name__}: no nn.ModuleList of {wanted}; "
            f"known paths tried: {', '.join(KNOWN_PATHS)}"
        )
    return max(candidates, key=lambda c: (_n_params(c[1]), -c[0].count(".")))[0]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The block ``ModuleList`` itself."""
    return _resolve(model, block_path(model))


def num_blocks(model: nn.Module) -> int:
    """How many blocks the model has now."""
    return len(get_blocks(model))


def _unique_tensors(tensors) -> list[torch.Tensor]:
    """Each tensor once: tied weights, even as distinct ``Parameter`` objects over the same memory."""
    seen: set[object] = set()
    unique = []
    for p in tensors:
        if p.device.type == "meta" or p.numel() == 0:
            key: object = id(p)
        else:
            key = (p.device, p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each tensor counted once (tied weights, even as distinct ``Parameter``
    objects over the same memory, count once)."""
    return sum(p.numel() for p in _unique_tensors(model.parameters()))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once."""
    tensors = _unique_tensors(itertools.chain(model.parameters(), model.buffers()))
    return sum(t.numel() * t.element_size() for t in tensors)


def check_indices(blocks: Iterable[int] | int, n: int, *, allow_all: bool = False) -> list[int]:
    """Sorted, checked block indices; ``ValueError`` naming the bad value and the block count.
    ``allow_all``: every block may be named (removing every attention branch leaves the MLPs)."""
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = [blocks]
    try:
        given = list(blocks)
    except TypeError:
        raise ValueError(f"blocks must be an iterable of block indices, not {blocks!r}") from None
    out: list[int] = []
    for b in given:
        if isinstance(b, bool) or (isinstance(b, torch.Tensor) and b.is_floating_point()):
            raise ValueError(f"block index {b!r} is not an integer (the model has {n} blocks)")
        try:
            i = operator.index(b)
        except TypeError:
            raise ValueError(f"block index {b!r} is not an integer (the model has {n} blocks)") from None
        if not 0 <= i < n:
            raise ValueError(f"block index {i} is out of range for a model of {n} blocks (valid: 0..{n - 1})")
        if i in out:
            raise ValueError(f"block index {i} is given twice (the model has {n} blocks)")
        out.append(i)
    if len(out) == n and not allow_all:
        raise ValueError(f"cannot remove all {n} blocks: at least one must stay")
    return sorted(out)


def _path_modules(model: nn.Module, path: str) -> list[nn.Module]:
    """The model and every module on the way to the block list (its owners)."""
    modules = [model]
    obj: Any = model
    for part in path.split(".")[:-1]:
        obj = getattr(obj, part)
        modules.append(obj)
    return modules


def _configs(model: nn.Module, path: str, layers: nn.ModuleList, n: int) -> list[Any]:
    """Every distinct config that describes this block list: those of the modules that own it and of
    the modules inside the blocks (and their text configs), with ``num_hidden_layers == n``. A vision
    tower's config is never touched."""
    held: dict[int, Any] = {}
    for module in [*_path_modules(model, path), *(m for block in layers for m in block.modules())]:
        cfg = getattr(module, "config", None)
        if cfg is not None:
            held.setdefault(id(cfg), cfg)
    out: dict[int, Any] = {}
    for cfg in held.values():
        for candidate in (cfg, _text_config(cfg)):
            if candidate is not None and _layer_count(candidate) == n:
                out.setdefault(id(candidate), candidate)
    return list(out.values())


def _renumber(block: nn.Module, old: int, new: int) -> list[Change]:
    """Renumber the layer-index attributes inside ``block`` (at position ``old``) to position ``new``.

    0-based indices (``value == old``) become ``new``; 1-based ones (``value == old + 1``, as in
    Megatron-style ``layer_number``) become ``new + 1``. Anything else would be a reference to another
    layer, which removal cannot keep right, so it is refused.
    """
    changes: list[Change] = []
    for name, module in block.named_modules():
        for attr in LAYER_INDEX_ATTRS:
            value = getattr(module, attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            offset = value - old
            if offset != 0 and not (attr == "layer_number" and offset == 1):
                where = f"block {old}" + (f" ({name})" if name else "")
                raise ValueError(
                    f"{type(module).__name__} in {where} has {attr}={value}, which is not its block's "
                    "position: cannot renumber it safely"
                )
            changes.append((module, attr, new + offset))
        changes.extend(_gpt2_inverse_layer_scale(module, old, new))
    return changes


def _gpt2_inverse_layer_scale(module: nn.Module, old: int, new: int) -> list[Change]:
    """GPT-2 with ``scale_attn_by_inverse_layer_idx`` bakes ``1 / (layer_idx + 1)`` into
    ``attn.scaling`` at ``__init__``. Keep what the block computes, but make it consistent with the new
    ``layer_idx`` (so a saved model reloads identically): set the scale a fresh block at ``new`` would
    have and multiply the query projection by ``(new + 1) / (old + 1)`` to compensate."""
    if not getattr(module, "scale_attn_by_inverse_layer_idx", False) or old == new:
        return []
    scaling = getattr(module, "scaling", None)
    if not isinstance(scaling, float):
        return []
    ratio = (new + 1) / (old + 1)
    changes: list[Change] = [(module, "scaling", scaling * (old + 1) / (new + 1))]
    if getattr(module, "is_cross_attention", False):
        proj, width = module.q_attn, None  # the whole q_attn is the query
    else:
        proj, width = module.c_attn, module.split_size  # query = first split_size output columns
    with torch.no_grad():
        for name in ("weight", "bias"):
            param = getattr(proj, name, None)
            if param is None:
                continue
            value = param.detach().clone()
            if width is None:
                value.mul_(ratio)
            else:
                value[..., :width].mul_(ratio)  # Conv1D weight is (in, out): output columns are last
            changes.append((proj, name, nn.Parameter(value, requires_grad=param.requires_grad)))
    return changes


def _run_length(types: list[str]) -> list[list[Any]]:
    """GPT-Neo's compressed ``attention_types`` for an explicit per-layer list."""
    runs: list[list[Any]] = []
    for t in types:
        if runs and runs[-1][0] == [t]:
            runs[-1][1] += 1
        else:
            runs.append([[t], 1])
    return runs


def _config_changes(cfg: Any, keep: list[int], drop: list[int], n: int) -> list[Change]:
    """Slice the per-layer fields of one config, set its layer count and record the removal."""
    if getattr(cfg, "is_heterogeneous", False):
        raise ValueError(
            f"{type(cfg).__name__} has per-layer overrides (per_layer_config): block removal does not "
            "support heterogeneous configs"
        )
    fields = vars(cfg)
    if patterned := [key for key in _PATTERN_ATTRS if key in fields]:
        raise ValueError(
            f"{type(cfg).__name__} lays out its layers by a period/offset pattern ({', '.join(patterned)}): "
            "removing blocks breaks the pattern, and no config field can describe the result"
        )
    changes: list[Change] = _moe_layout_changes(cfg, keep, n)
    sliced: dict[str, Any] = {}
    for key, value in list(fields.items()):
        if key.startswith("_") or key in _NOT_PER_LAYER or key in _INDEX_LIST_ATTRS:
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            sliced[key] = type(value)(value[i] for i in keep)
            changes.append((cfg, key, sliced[key]))
    if "attention_layers" in sliced and isinstance(vars(cfg).get("attention_types"), (list, tuple)):
        changes.append((cfg, "attention_types", _run_length(list(sliced["attention_layers"]))))
    for key in _PREFIX_COUNT_ATTRS:
        k = vars(cfg).get(key)
        if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n:
            changes.append((cfg, key, sum(1 for i in keep if i < k)))
    changes.append((cfg, "num_hidden_layers", len(keep)))
    changes.append((cfg, "blockbench_removed_blocks", _record(cfg, drop, n)))
    return changes


def _moe_layout_changes(cfg: Any, keep: list[int], n: int) -> list[Change]:
    """Which kept blocks have a dense MLP and which experts, said in the kept blocks' numbering.

    Index lists (:data:`_INDEX_LIST_ATTRS`) are renumbered. Qwen-MoE's ``decoder_sparse_step`` (experts
    where ``(i + 1) % step == 0`` and ``i`` not in ``mlp_only_layers``) cannot say an arbitrary subset,
    so a step above 1 becomes 1 with every kept dense block listed in ``mlp_only_layers``. ERNIE-4.5-MoE's
    expert range ``moe_layer_start_index..moe_layer_end_index`` is renumbered when its
    ``moe_layer_interval`` is 1; with a larger interval the kept layout cannot be said, and it is refused.
    """
    fields, changes = vars(cfg), []
    position = {old: new for new, old in enumerate(keep)}
    step, only = fields.get("decoder_sparse_step"), fields.get("mlp_only_layers")
    experts = getattr(cfg, "num_experts", None)  # Qwen3-MoE: an alias of num_local_experts, not in vars()
    rewrite_step = isinstance(step, int) and step > 1 and isinstance(only, (list, tuple)) and bool(experts)
    for key in _INDEX_LIST_ATTRS:
        value = fields.get(key)
        if not isinstance(value, (list, tuple)) or (key == "mlp_only_layers" and rewrite_step):
            continue
        changes.append((cfg, key, type(value)(position[i] for i in value if i in position)))
    if rewrite_step:
        dense = set(only) | {i for i in range(n) if (i + 1) % step != 0}
        changes.append((cfg, "mlp_only_layers", type(only)(position[i] for i in keep if i in dense)))
        changes.append((cfg, "decoder_sparse_step", 1))
    if "moe_layer_interval" in fields:
        start, end, interval = (fields.get(k) for k in ("moe_layer_start_index", "moe_layer_end_index",
                                                          "moe_layer_interval"))
        if interval != 1:
            raise ValueError(
                f"{type(cfg).__name__} puts experts on every {interval}th layer (moe_layer_interval): removing "
                "blocks breaks that pattern, and no config field can describe the result"
            )
        moe = [position[i] for i in keep if start <= i <= end]
        new_start, new_end = (moe[0], moe[-1]) if moe else (len(keep), len(keep) - 1)
        changes += [(cfg, "moe_layer_start_index", new_start), (cfg, "moe_layer_end_index", new_end)]
    return changes


def _record(cfg: Any, drop: list[int], n: int) -> list[int]:
    """The removed blocks in dense numbering after dropping ``drop`` (current numbering) from ``n``.

    The current block ``j`` is the ``j``-th dense index not already in ``blockbench_removed_blocks``.
    """
    previous = sorted(getattr(cfg, "blockbench_removed_blocks", None) or [])
    dense_kept = [i for i in range(n + len(previous)) if i not in set(previous)]
    if len(dense_kept) != n:
        raise ValueError(
            f"config.blockbench_removed_blocks={previous} does not fit a model of {n} blocks left: "
            "it should list distinct dense indices"
        )
    return sorted(previous + [dense_kept[i] for i in drop])


def removal_changes(model: nn.Module, blocks: Iterable[int] | int) -> list[Change]:
    """The attribute assignments ``(object, name, value)`` that remove ``blocks`` from ``model``.

    ``blocks`` are indices in the model's current numbering. Everything is checked and computed
    before anything is assigned, so a bad index leaves the model as it was. This is the single source
    of the removal rules: :func:`remove_blocks` applies the changes for good and
    :func:`algorithms.models.masking.skip_blocks` applies them for the duration of a ``with`` block.
    """
    path = block_path(model)
    layers: nn.ModuleList = _resolve(model, path)
    n = len(layers)
    drop = check_indices(blocks, n)
    if not drop:
        return []
    keep = [i for i in range(n) if i not in drop]
    changes: list[Change] = []
    for new, old in enumerate(keep):
        changes.extend(_renumber(layers[old], old, new))
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    changes.append((parent, attr, nn.ModuleList([layers[i] for i in keep])))
    configs = _configs(model, path, layers, n)
    for cfg in configs:
        changes.extend(_config_changes(cfg, keep, drop, n))
    root = getattr(model, "config", None)  # a multimodal wrapper's config says what was removed too
    if root is not None and not any(root is c for c in configs) and hasattr(root, "to_dict"):
        changes.append((root, "blockbench_removed_blocks", _record(root, drop, n)))
    # flags computed from config.layer_types at __init__ (Qwen2Model, Qwen3Model, ... has_sliding_layers)
    for module in _path_modules(model, path):
        cfg = getattr(module, "config", None)
        if isinstance(getattr(module, "has_sliding_layers", None), bool) and any(cfg is c for c in configs):
            types = vars(cfg).get("layer_types")
            if isinstance(types, (list, tuple)) and len(types) == n:
                changes.append(
                    (module, "has_sliding_layers", "sliding_attention" in [types[i] for i in keep])
                )
    return changes


def remove_blocks(model: M, blocks: Iterable[int] | int) -> M:
    """Remove ``blocks`` (0-based indices in the model's current numbering) in place; return the model.

    Raises ``ValueError`` for an index that is not an integer, out of range or repeated, and for
    removing every block; the model is unchanged then.
    """
    for obj, attr, value in removal_changes(model, blocks):
        setattr(obj, attr, value)
    return model


def pruned_copy(model: M, blocks: Iterable[int] | int) -> M:
    """A deep copy of ``model`` with ``blocks`` removed; ``model`` itself is untouched."""
    drop = check_indices(blocks, num_blocks(model))  # fail before paying for the copy
    return remove_blocks(copy.deepcopy(model), drop)
