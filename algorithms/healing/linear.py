"""``linear`` healing: ReplaceMe (arXiv 2505.02819), a training-free linear map per removed run, folded
into the weights.

The residual stream of a pre-norm decoder with ``L`` blocks is the sequence of states
``s_0 = x_0, s_1 = h_0, s_2 = x_1, ..., s_2L = x_L`` where ``h_i = x_i + attention_i(x_i)`` and
``x_{i+1} = h_i + mlp_i(h_i)``: stream position ``2i`` is the attention branch of block ``i`` (it
turns ``s_2i`` into ``s_2i+1``), position ``2i + 1`` its MLP branch. Removed units cover positions:
block ``i`` covers ``[2i, 2i + 2)``, attention ``i`` covers ``[2i, 2i + 1)``, MLP ``i`` covers
``[2i + 1, 2i + 2)``. A *run* is a maximal interval ``[a, b)`` of removed positions (consecutive
removed blocks form one run; two removed attentions never do, an MLP lies between them).

For a run ``[a, b)`` the *previous branch* ``P`` is the branch at position ``a - 1`` (for blocks: the
MLP of the block before; for attention ``i``: the MLP of block ``i - 1``; for MLP ``i``: the attention
of block ``i``). ``P`` adds its output ``M`` to the residual ``Y = s_(a-1)``, giving
``S_in = s_a = Y + M``; the dense run then turns it into ``S_out = s_b``. After removal the state
``S_in`` goes straight on. ReplaceMe instead multiplies ``P``'s output by a ``d x d`` matrix ``T``
fitted on calibration tokens of the *dense* model::

    T = argmin_T || M T - (S_out - Y) ||^2          (rows: every calibration token)
      = (M^T M + lambda I)^+  M^T (S_out - Y)       lambda = ridge * trace(M^T M) / d

so that ``Y + M T`` approximates ``S_out``. ``M^T M`` and ``M^T (S_out - Y)`` are accumulated in
float64 batch by batch (memory ``2 d^2``, independent of the number of tokens); the solve uses the
pseudo-inverse, so a rank-deficient ``M`` gets the minimum-norm solution. ``objective="cosine"`` is
the paper's cosine-distance variant: starting from the least-squares ``T``, ``cosine_steps`` full-batch
Adam steps (learning rate ``cosine_lr``, float64, no sampling, hence deterministic) minimise the mean
over tokens of ``1 - cos(M T + Y, S_out)``; it keeps ``M``, ``Y`` and ``S_out`` of every calibration
token in memory (float32, ``3 x tokens x d`` per run).

``T`` is then folded into ``P``'s last output projection (``o_proj``/``down_proj``, GPT-2's
``c_proj``), so the healed model is a standard architecture that saves and reloads with plain
transformers: for ``nn.Linear`` (``y = x W^T + b``) ``W' = T^T W`` and ``b' = T^T b``; for
transformers' ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(in, out)``) ``W' = W T`` and ``b' = b T``;
computed in float64 and cast back to the weight's dtype. A run that starts at position 0 has no
previous branch (the embedding feeds it) and is left unhealed; ``info`` says so. Families with a norm
on a branch's output (Gemma-2/3) cannot absorb ``T`` into a projection and are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from algorithms.healing.base import Healing, HealOutcome, HealTarget, Params
from algorithms.models.blocks import block_path, get_blocks, hidden_tensor
from algorithms.models.units import UnitError, branch_output_module, family_of, model_type

#: names of a branch core's last output projection, tried in order (Llama-style, GPT-2, others)
OUTPUT_PROJECTIONS = {
    "attention": ("o_proj", "c_proj", "out_proj", "dense"),
    "mlp": ("down_proj", "c_proj", "fc2", "dense_4h_to_h"),
}


# ---------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """A maximal run of removed stream positions ``[start, end)`` and the units it removes (block
    indices in the dense numbering)."""

    start: int
    end: int
    units: tuple[int, ...]

    @property
    def previous(self) -> tuple[int, str] | None:
        """The previous branch as ``(block, "attention" | "mlp")``, or None when the run starts at
        position 0."""
        return branch_at(self.start - 1) if self.start > 0 else None


def branch_at(position: int) -> tuple[int, str]:
    """The branch at stream position ``position``: block ``position // 2``, attention when the
    position is even, MLP when odd."""
    return position // 2, "attention" if position % 2 == 0 else "mlp"


def removed_runs(unit: str, removed: tuple[int, ...] | list[int], n_blocks: int) -> list[Run]:
    """The maximal runs of stream positions covered by the ``unit`` of blocks ``removed`` in a model of
    ``n_blocks`` blocks (block ``i``: ``[2i, 2i+2)``; attention ``i``: ``{2i}``; MLP ``i``:
    ``{2i+1}``), in order."""
    if unit not in ("block", "attention", "mlp"):
        raise ValueError(f"unit must be 'block', 'attention' or 'mlp', got {unit!r}")
    positions: dict[int, int] = {}
    for i in sorted(removed):
        if not 0 <= i < n_blocks:
            raise ValueError(f"removed block {i} is out of range for a model of {n_blocks} blocks")
        offsets = (0, 1) if unit == "block" else (0,) if unit == "attention" else (1,)
        for o in offsets:
            positions[2 * i + o] = i
    runs: list[Run] = []
    for p in sorted(positions):
        if runs and runs[-1].end == p:
            last = runs[-1]
            units = last.units if last.units[-1] == positions[p] else (*last.units, positions[p])
            runs[-1] = Run(last.start, p + 1, units)
        else:
            runs.append(Run(p, p + 1, (positions[p],)))
    return runs


# ---------------------------------------------------------------------------------------- least squares
class NormalEquations:
    """Accumulates, in float64, the sufficient statistics of ``min_T || M T - B ||^2`` over batches of
    rows: ``M^T M``, ``M^T B``, ``||B||^2`` and ``||M - B||^2`` (the residual of ``T = I``) and the row
    count. Memory ``2 d^2`` whatever the number of rows."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.mtm: torch.Tensor | None = None  # allocated on the device of the first batch
        self.mtb: torch.Tensor | None = None
        self.b_sq = 0.0
        self.identity_sq = 0.0
        self.rows = 0

    def add(self, m: torch.Tensor, b: torch.Tensor) -> None:
        """Add rows ``m`` and ``b`` (``(..., d)`` each; promoted to float64 on their device)."""
        m = m.reshape(-1, self.d).to(torch.float64)
        b = b.reshape(-1, self.d).to(m.device, torch.float64)
        if self.mtm is None or self.mtb is None:
            self.mtm = torch.zeros(self.d, self.d, dtype=torch.float64, device=m.device)
            self.mtb = torch.zeros(self.d, self.d, dtype=torch.float64, device=m.device)
        self.mtm += m.T @ m
        self.mtb += m.T @ b
        self.b_sq += float((b * b).sum())
        self.identity_sq += float(((m - b) ** 2).sum())
        self.rows += m.shape[0]

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mtm is None or self.mtb is None:
            raise ValueError("no rows were added: nothing to fit")
        return self.mtm.to("cpu"), self.mtb.to("cpu")

    def solve(self, ridge: float = 0.0) -> torch.Tensor:
        """``T = (M^T M + lambda I)^+ M^T B`` with ``lambda = ridge * trace(M^T M) / d`` (float64 on the
        CPU, ``d x d``): the least-squares map, minimum-norm when ``M`` is rank-deficient and ``ridge``
        is 0."""
        mtm, mtb = self._stats()
        a = mtm.clone()
        if ridge > 0:
            a += ridge * float(torch.trace(a)) / self.d * torch.eye(self.d, dtype=torch.float64)
        return torch.linalg.pinv(a, hermitian=True) @ mtb

    def residual_sq(self, t: torch.Tensor) -> float:
        """``|| M T - B ||^2`` from the statistics (``||B||^2 - 2 tr(T^T M^T B) + tr(T^T M^T M T)``,
        clamped at 0 against rounding)."""
        mtm, mtb = self._stats()
        t = t.to("cpu", torch.float64)
        value = self.b_sq - 2 * float((t * mtb).sum()) + float((t * (mtm @ t)).sum())
        return max(value, 0.0)

    def relative_residual(self, t: torch.Tensor) -> float:
        """``|| M T - B || / || B ||`` (0 when ``B`` is 0)."""
        return (self.residual_sq(t) / self.b_sq) ** 0.5 if self.b_sq > 0 else 0.0

    def relative_residual_identity(self) -> float:
        """``|| M - B || / || B ||``: the error of no healing (``T = I``)."""
        return (self.identity_sq / self.b_sq) ** 0.5 if self.b_sq > 0 else 0.0


def fit_linear_map(m: torch.Tensor, b: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    """The ``d x d`` float64 ``T`` minimising ``|| m T - b ||^2 + lambda ||T||^2`` with
    ``lambda = ridge * trace(m^T m) / d`` (rows of ``m`` and ``b``, ``(..., d)``, are tokens)."""
    eq = NormalEquations(m.shape[-1])
    eq.add(m, b)
    return eq.solve(ridge)


def cosine_refine(t: torch.Tensor, m: torch.Tensor, y: torch.Tensor, s_out: torch.Tensor, *, steps: int,
                  lr: float) -> tuple[torch.Tensor, float, float]:
    """Starting from ``t``, ``steps`` full-batch Adam steps (float64) on the mean over tokens of
    ``1 - cos(m T + y, s_out)``; returns ``T`` and the cosine distance before and after."""

    def distance(tt: torch.Tensor) -> torch.Tensor:
        return (1 - nn.functional.cosine_similarity(m @ tt + y, s_out, dim=-1)).mean()

    with torch.inference_mode(False), torch.enable_grad():  # callable under no_grad / inference_mode
        m, y, s_out = (v.reshape(-1, v.shape[-1]).to(torch.float64).clone() for v in (m, y, s_out))
        param = nn.Parameter(t.detach().to(torch.float64).clone())
        with torch.no_grad():
            before = float(distance(param))
        opt = torch.optim.Adam([param], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = distance(param)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float(distance(param))
    return param.detach(), before, after


# ---------------------------------------------------------------------------------------- folding
def fold_into_projection(module: nn.Module, t: torch.Tensor) -> None:
    """Make ``module``'s output ``y`` become ``y T`` by changing its weights in place (float64 maths,
    cast back to the weight's dtype): ``nn.Linear`` (``y = x W^T + b``): ``W' = T^T W``,
    ``b' = T^T b``; transformers' ``Conv1D`` (``y = x W + b``, ``W`` is ``(in, out)``): ``W' = W T``,
    ``b' = b T``."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        w = module.weight
        tt = t.to(w.device, torch.float64)
        if isinstance(module, nn.Linear):
            w.copy_((tt.T @ w.to(torch.float64)).to(w.dtype))
        elif isinstance(module, Conv1D):
            w.copy_((w.to(torch.float64) @ tt).to(w.dtype))
        else:
            raise ValueError(f"cannot fold a linear map into a {type(module).__name__}: expected nn.Linear "
                             "or transformers' Conv1D")
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_((bias.to(torch.float64) @ tt).to(bias.dtype))


def output_projection(core: nn.Module, kind: str) -> tuple[str, nn.Module]:
    """The name and module of a branch core's last output projection (:data:`OUTPUT_PROJECTIONS`)."""
    for name in OUTPUT_PROJECTIONS[kind]:
        module = getattr(core, name, None)
        if isinstance(module, nn.Module) and hasattr(module, "weight"):
            return name, module
    raise ValueError(f"cannot find the output projection of {type(core).__name__} ({kind}); tried "
                     f"{', '.join(OUTPUT_PROJECTIONS[kind])}")


# ---------------------------------------------------------------------------------------- capture
class _StreamTap:
    """Forward hooks on the dense model that keep, per forward pass, the stream states ``s_p`` and the
    branch outputs at the positions asked for. ``s_2i`` is the input of block ``i`` (pre-hook),
    ``s_2i+1`` the input of block ``i``'s MLP pre-norm, ``s_2L`` the output of the last block; a
    branch's output is that of its output module (:func:`branch_output_module`), and the output of
    its projection is kept too, to check that folding into it is exact."""

    def __init__(self, model: nn.Module, states: set[int], branches: set[int], projections: dict[int, nn.Module]):
        family = family_of(model)
        blocks = get_blocks(model)
        n = len(blocks)
        self.states: dict[int, torch.Tensor] = {}
        self.branches: dict[int, torch.Tensor] = {}
        self.projections: dict[int, torch.Tensor] = {}
        self.handles = []

        def keep(store: dict[int, torch.Tensor], key: int, output: bool):
            def pre(_module, args, kwargs):
                store[key] = hidden_tensor(args) if args else kwargs["hidden_states"]

            def post(_module, _args, out):
                store[key] = hidden_tensor(out)

            return post if output else pre

        for p in sorted(states):
            if p == 2 * n:
                self.handles.append(blocks[n - 1].register_forward_hook(keep(self.states, p, True)))
            elif p % 2 == 0:
                self.handles.append(blocks[p // 2].register_forward_pre_hook(keep(self.states, p, False),
                                                                             with_kwargs=True))
            else:
                norm = getattr(blocks[p // 2], family.mlp.pre)
                self.handles.append(norm.register_forward_pre_hook(keep(self.states, p, False), with_kwargs=True))
        for p in sorted(branches):
            module = branch_output_module(model, *branch_at(p))
            self.handles.append(module.register_forward_hook(keep(self.branches, p, True)))
        for p, module in projections.items():
            self.handles.append(module.register_forward_hook(keep(self.projections, p, True)))

    def clear(self) -> None:
        self.states.clear()
        self.branches.clear()
        self.projections.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------- the method
class LinearParams(Params):
    #: ridge strength, relative: ``lambda = ridge * trace(M^T M) / d`` is added to ``M^T M``'s diagonal
    ridge: float = Field(0.0, ge=0, strict=True)
    #: ``lstsq``: the least-squares map; ``cosine``: refined from it on the cosine distance (the paper's)
    objective: Literal["lstsq", "cosine"] = "lstsq"
    cosine_steps: int = Field(200, ge=1, strict=True)
    cosine_lr: float = Field(1e-3, gt=0, strict=True)


class LinearHealing(Healing):
    """ReplaceMe (arXiv 2505.02819): per removed run, a d x d least-squares map from the previous
    branch's output to what the run added, fitted on dense calibration activations and folded into
    that branch's output projection; training-free."""

    name = "linear"
    version = "1"
    Params = LinearParams

    def heal(self, target: HealTarget) -> HealOutcome:
        """Fit and fold one map per removed run (see the module doc). ``info``: ``runs``, one dict per
        run: ``run`` (stream positions ``[start, end)``), ``units`` (its removed blocks, dense
        numbering), then either ``fold_into`` (the projection's path in the pruned model), ``tokens``,
        ``relative_residual`` (``||M T - (S_out - Y)|| / ||S_out - Y||``) and
        ``relative_residual_unhealed`` (the same for ``T = I``, i.e. no healing), plus
        ``cosine_distance`` ``{before, after}`` for ``objective="cosine"``; or ``unhealed`` with the
        reason."""
        started = time.perf_counter()
        p = self.params
        dense, pruned = target.dense, target.pruned
        n = len(get_blocks(dense))
        runs = removed_runs(target.unit, target.removed, n)
        try:
            family = family_of(dense)
        except UnitError as exc:
            raise ValueError(f"linear healing cannot fold into model type {model_type(dense)!r}: {exc}") from None
        healable = [r for r in runs if r.previous is not None]
        for r in healable:
            block, kind = r.previous
            if family.branch(kind).post is not None:
                raise ValueError(
                    f"linear healing cannot fold into model type {model_type(dense)!r}: its {kind} branch "
                    f"ends in a norm ({family.branch(kind).post}), so a linear map on the branch output is "
                    "not a change of its output projection"
                )
        pruned_blocks = get_blocks(pruned)
        expected = n - len(target.removed) if target.unit == "block" else n
        if len(pruned_blocks) != expected:
            raise ValueError(f"the pruned model has {len(pruned_blocks)} blocks; removing {target.unit} "
                             f"{list(target.removed)} from {n} should leave {expected}")

        def pruned_index(block: int) -> int:
            return block - sum(1 for r in target.removed if r < block) if target.unit == "block" else block

        prefix = block_path(pruned)
        folds: dict[Run, tuple[str, nn.Module]] = {}
        dense_projections: dict[int, nn.Module] = {}
        for r in healable:
            block, kind = r.previous
            core_name = family.branch(kind).core
            name, module = output_projection(getattr(pruned_blocks[pruned_index(block)], core_name), kind)
            folds[r] = (f"{prefix}.{pruned_index(block)}.{core_name}.{name}", module)
            dense_projections[r.start - 1] = getattr(getattr(get_blocks(dense)[block], core_name), name)

        eqs = {r: None for r in healable}
        stored: dict[Run, list[list[torch.Tensor]]] = {r: [[], [], []] for r in healable}
        samples = target.input_ids.shape[0]
        batches = -(-samples // target.batch_size)
        total = batches + len(healable)
        if healable:
            tap = _StreamTap(dense, {q for r in healable for q in (r.start - 1, r.end)},
                             {r.start - 1 for r in healable}, dense_projections)
            device = next(dense.parameters()).device
            try:
                with torch.inference_mode():
                    for k, start in enumerate(range(0, samples, target.batch_size)):
                        tap.clear()
                        dense(input_ids=target.input_ids[start : start + target.batch_size].to(device),
                              use_cache=False)
                        for r in healable:
                            y, m, s_out = tap.states[r.start - 1], tap.branches[r.start - 1], tap.states[r.end]
                            if k == 0 and not torch.equal(tap.projections[r.start - 1], m):
                                raise ValueError(f"the output of {folds[r][0]} is not its branch's output: "
                                                 "cannot fold a linear map into it")
                            if eqs[r] is None:
                                eqs[r] = NormalEquations(m.shape[-1])
                            eqs[r].add(m, s_out.double() - y.double())
                            if p.objective == "cosine":
                                for store, v in zip(stored[r], (m, y, s_out), strict=True):
                                    store.append(v.reshape(-1, v.shape[-1]).to("cpu", torch.float32))
                        target.report(k + 1, total)
            finally:
                tap.remove()

        infos: list[dict[str, Any]] = []
        done = batches
        for r in runs:
            info: dict[str, Any] = {"run": [r.start, r.end], "units": list(r.units)}
            if r.previous is None:
                info["unhealed"] = "starts at stream position 0: no previous branch to fold a map into"
                infos.append(info)
                continue
            eq = eqs[r]
            if eq.rows < eq.d and p.ridge == 0:
                raise ValueError(
                    f"linear healing fits a {eq.d}x{eq.d} map per run, but the calibration set has {eq.rows} tokens: "
                    "the least-squares problem is underdetermined and its map does not generalise (held-out "
                    "perplexity explodes); use at least as many calibration tokens (calibration.samples x "
                    f"seq_len >= {eq.d}, better 10x more) or healing params ridge > 0")
            t = eq.solve(p.ridge)
            if p.objective == "cosine":
                m, y, s_out = (torch.cat(v) for v in stored[r])
                stored[r] = [[], [], []]
                t, before, after = cosine_refine(t, m, y, s_out, steps=p.cosine_steps, lr=p.cosine_lr)
                info["cosine_distance"] = {"before": before, "after": after}
            path, module = folds[r]
            fold_into_projection(module, t)
            info.update(fold_into=path, tokens=eq.rows, relative_residual=eq.relative_residual(t),
                        relative_residual_unhealed=eq.relative_residual_identity())
            infos.append(info)
            done += 1
            target.report(done, total)
        if not healable:
            target.report(total, total)
        info_all = {"objective": p.objective, "ridge": p.ridge, "runs": infos,
                    "unhealed_runs": sum(1 for i in infos if "unhealed" in i)}
        return HealOutcome(seconds=time.perf_counter() - started, trained_parameters=0, info=info_all)
