"""The ``ising`` selector: block removal as an exact-k binary quadratic model, after "Block removal for
large language models through constrained binary optimization" (Jansen, Rausch, Montero, Orús;
arXiv 2602.00161).

Removal indicators ``s_i in {0, 1}`` (1 = block ``i`` removed) carry the energy

    E(s) = sum_i h_i s_i + sum_{i<j} J_ij s_i s_j,   subject to sum_i s_i = k, s_p = 0 for protected p,

whose coefficients are *measured* with the selector's objective ``f`` (a loss over block sets, lower =
better to remove; :mod:`algorithms.objectives`)::

    h_i  = f({i}) - f({})
    J_ij = f({i, j}) - f({i}) - f({j}) + f({})

so ``f({}) + E`` equals ``f`` on every set of at most two blocks, and on every set when ``f`` is itself
quadratic in the indicators. :class:`BlockQuadraticModel` holds the measured model; :func:`solve_exact`
and :func:`solve_sampled` find its exact-k minimum; :class:`Ising` is the selector.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from algorithms import extras
from algorithms.objectives import CountingObjective
from algorithms.selectors import SearchSelector, SelectionProblem, SelectionResult
from estimators.checks import check_choice, check_float, check_int

PAIR_BUDGETS = ("adjacent", "all", "top")
SAMPLERS = ("simulated_annealing", "tabu")
#: the tabu search's work per read, bounded by counts instead of the library's default time limit (20 ms
#: per read), which would make results depend on the clock: ``num_restarts`` restarts, each of at most
#: ``max(coefficient_z_first * n, lower_bound_z)`` variable updates (the library's defaults, 10,000 * n
#: and 500,000, cost about 30 ms a read on 16 variables and found no lower energy on random dense
#: models of 16 to 80 variables)
TABU_LIMITS = {"num_restarts": 10, "coefficient_z_first": 2_000, "lower_bound_z": 20_000}


@dataclass(frozen=True)
class BlockQuadraticModel:
    """The measured energy over the free blocks: ``E(S) = sum_{i in S} h_i + sum_{i<j in S} J_ij``.

    ``blocks`` are the variables (the free blocks, ascending); ``linear[i]`` is ``h_i``; ``quadratic``
    holds ``J_ij`` for the measured pairs ``(i, j)``, ``i < j`` (absent pairs have ``J = 0``);
    ``baseline`` is ``f({})`` or None when the objective could not evaluate the empty set (then ``h`` and
    ``J`` are taken as if ``f({}) = 0``, which shifts every exact-k energy by the same constant
    ``(C(k, 2) - k) f({})`` and so changes no choice).
    """

    blocks: tuple[int, ...]
    linear: dict[int, float]
    quadratic: dict[tuple[int, int], float]
    baseline: float | None

    def energy(self, chosen: Iterable[int]) -> float:
        s = sorted(chosen)
        return (sum(self.linear[i] for i in s)
                + sum(self.quadratic.get(pair, 0.0) for pair in itertools.combinations(s, 2)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``h`` (length n) and the symmetric ``J`` (n x n, zero diagonal), indexed by position in ``blocks``."""
        pos = {b: p for p, b in enumerate(self.blocks)}
        h = np.array([self.linear[b] for b in self.blocks], dtype=np.float64)
        j = np.zeros((len(self.blocks), len(self.blocks)), dtype=np.float64)
        for (a, b), v in self.quadratic.items():
            j[pos[a], pos[b]] = j[pos[b], pos[a]] = v
        return h, j

    def flip_bound(self) -> float:
        """``max_i |h_i| + sum_j |J_ij|``: no single flip changes the energy by more."""
        h, j = self.arrays()
        return float(np.max(np.abs(h) + np.abs(j).sum(axis=1))) if len(h) else 0.0


def measured_pairs(free: Sequence[int], linear: dict[int, float], budget: str, window: int,
                   candidates: int) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, whose interaction is measured under ``budget`` (see :class:`Ising`)."""
    if budget == "all":
        return list(itertools.combinations(sorted(free), 2))
    if budget == "adjacent":
        return [(i, j) for i, j in itertools.combinations(sorted(free), 2) if j - i <= window]
    top = sorted(free, key=lambda b: (linear[b], -b))[:candidates]  # most removable; ties: later block
    return list(itertools.combinations(sorted(top), 2))


def measure(f: CountingObjective, free: Sequence[int], budget: str = "adjacent", window: int = 2,
            candidates: int = 8) -> BlockQuadraticModel:
    """Query ``f`` on ``{}``, every single free block and the budgeted pairs; return the model.

    Costs ``1 + len(free) + len(pairs)`` distinct sets (the empty set is not counted when ``f`` refuses
    it). Infinite values (a set that breaks the model: :class:`~algorithms.objectives.Objective` stores
    NaN as ``+inf``) are replaced by a finite energy larger than any the finite coefficients can add up
    to, so such blocks and pairs are avoided whenever an exact-k set without them exists.
    """
    empty = frozenset()
    try:
        baseline: float | None = f(empty)
    except (ValueError, ArithmeticError, LookupError):
        f.seen.discard(empty)  # refused, not computed: not part of the cost
        baseline = None
    if baseline is not None and not math.isfinite(baseline):
        baseline = None
    base = baseline or 0.0
    singles = {b: f([b]) for b in free}
    linear = {b: v - base for b, v in singles.items()}
    pairs = measured_pairs(free, linear, budget, window, candidates)
    quadratic = {(i, j): f([i, j]) - singles[i] - singles[j] + base for i, j in pairs}
    finite = [abs(v) for v in (*linear.values(), *quadratic.values()) if math.isfinite(v)]
    big = 1.0 + 2.0 * len(free) ** 2 * max(finite, default=1.0)
    linear = {b: v if math.isfinite(v) else big for b, v in linear.items()}
    quadratic = {p: v if math.isfinite(v) else big for p, v in quadratic.items()}
    return BlockQuadraticModel(tuple(sorted(free)), linear, quadratic, baseline)


def solve_exact(model: BlockQuadraticModel, k: int) -> tuple[list[int], float]:
    """The exact-k minimum by enumeration of every ``C(n, k)`` set; ties go to the first set in
    lexicographic order (as the ``exhaustive`` selector)."""
    h, j = model.arrays()
    combos = np.array(list(itertools.combinations(range(len(h)), k)), dtype=np.int64).reshape(-1, k)
    energies = h[combos].sum(axis=1)
    for a, b in itertools.combinations(range(k), 2):
        energies += j[combos[:, a], combos[:, b]]
    best = int(np.argmin(energies))
    chosen = [model.blocks[p] for p in combos[best]]
    return chosen, model.energy(chosen)


def _deltas(h: np.ndarray, j: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Energy change of flipping each variable of the 0/1 vector ``on``."""
    field = h + j @ on
    return np.where(on > 0, -field, field)


def repair(h: np.ndarray, j: np.ndarray, on: np.ndarray, k: int) -> np.ndarray:
    """Greedy by energy: drop the variable whose removal lowers the energy most while more than ``k``
    are on, add the one whose addition raises it least while fewer (ties: lower position)."""
    on = on.astype(np.float64).copy()
    while on.sum() != k:
        d = _deltas(h, j, on)
        pick = on > 0 if on.sum() > k else on == 0
        pos = int(np.flatnonzero(pick)[np.argmin(d[pick])])
        on[pos] = 1.0 - on[pos]
    return on


def polish(h: np.ndarray, j: np.ndarray, on: np.ndarray) -> tuple[np.ndarray, int]:
    """Best-improvement 1-swap descent (one block out, one in; the count stays): returns the local
    minimum and the number of swaps made."""
    on = on.copy()
    ins, outs = np.flatnonzero(on == 0), np.flatnonzero(on > 0)
    if not len(ins) or not len(outs):
        return on, 0
    # a swap must gain more than rounding noise, so the descent cannot cycle on float ties
    tol = 1e-12 * (1.0 + float(np.abs(h).max()) + float(np.abs(j).max()) * len(h))
    for swaps in range(10 * len(h) * len(outs)):  # a safety bound: every swap strictly lowers the energy
        field = h + j @ on
        ins, outs = np.flatnonzero(on == 0), np.flatnonzero(on > 0)
        # E(S - o + i) - E(S) = field_i - field_o - J_io
        change = field[ins][None, :] - field[outs][:, None] - j[np.ix_(outs, ins)]
        o, i = np.unravel_index(int(np.argmin(change)), change.shape)
        if change[o, i] >= -tol:
            return on, swaps
        on[outs[o]], on[ins[i]] = 0.0, 1.0
    return on, 10 * len(h) * len(outs)


def solve_sampled(model: BlockQuadraticModel, k: int, sampler: str = "simulated_annealing", reads: int = 32,
                  seed: int = 0, strength: float | None = None) -> tuple[list[int], float, dict[str, Any]]:
    """The exact-k minimum by a ``dwave-samplers`` sampler on a ``dimod`` model with the constraint
    ``sum s = k`` as the penalty ``strength * (sum s - k)^2`` (``add_linear_equality_constraint``).

    Default strength: just above :meth:`BlockQuadraticModel.flip_bound`, the smallest value that makes
    every ground state feasible (any state ``d`` indicators off the count reaches a feasible one in ``d``
    flips, which change the energy by at most ``d * bound`` while removing a penalty ``strength * d^2``).
    A larger one only steepens the walls between feasible states, which single-flip samplers must cross.
    Of the samples, the feasible ones compete with the lowest-energy sample made feasible by
    :func:`repair` when it is not; the winner is then :func:`polish`-ed. Returns the blocks, their energy
    and what happened (``penalty``, ``constraint_repaired``: the winner came from the repair,
    ``polish_swaps``, ``feasible_reads``).
    """
    dimod, samplers = _import_solvers()
    bound = model.flip_bound()
    penalty = strength if strength is not None else (bound * 1.001 if bound > 0 else 1.0)
    bqm = dimod.BinaryQuadraticModel(dict(model.linear), dict(model.quadratic), 0.0, dimod.BINARY)
    bqm.add_linear_equality_constraint([(b, 1.0) for b in model.blocks], lagrange_multiplier=penalty,
                                       constant=-float(k))
    seed32 = int(seed) % 2**32
    if sampler == "tabu":
        result = samplers.TabuSampler().sample(bqm, num_reads=reads, seed=seed32, timeout=None,
                                               **TABU_LIMITS)
    else:
        result = samplers.SimulatedAnnealingSampler().sample(bqm, num_reads=reads, seed=seed32)
    order = [list(result.variables).index(b) for b in model.blocks]
    states = np.asarray(result.record.sample, dtype=np.float64)[:, order]
    h, j = model.arrays()
    energies = states @ h + 0.5 * np.einsum("ri,ij,rj->r", states, j, states)
    feasible = states.sum(axis=1) == k
    options: list[tuple[float, tuple[int, ...], bool, np.ndarray]] = []
    for row in np.flatnonzero(feasible):
        options.append((float(energies[row]), tuple(np.flatnonzero(states[row])), False, states[row]))
    first = int(np.argmin(np.asarray(result.record.energy)))  # lowest penalised energy
    if not feasible[first]:
        fixed = repair(h, j, states[first], k)
        options.append((float(fixed @ h + 0.5 * fixed @ j @ fixed), tuple(np.flatnonzero(fixed)), True, fixed))
    _, _, repaired, state = min(options, key=lambda o: (o[0], o[1]))
    state, swaps = polish(h, j, state)
    chosen = [model.blocks[p] for p in np.flatnonzero(state)]
    return chosen, model.energy(chosen), {"penalty": penalty, "constraint_repaired": repaired,
                                          "polish_swaps": swaps, "feasible_reads": int(feasible.sum())}


#: what solves sets too many to enumerate (only then: enumeration needs neither)
_SOLVERS = (extras.DIMOD, extras.DWAVE_SAMPLERS)
_SAMPLER_FEATURE = "selector 'ising' past max_exact (sets too many to enumerate; or raise max_exact)"


def _import_solvers():
    """``(dimod, dwave.samplers)``; :class:`~algorithms.extras.MissingExtra` naming the ising extra."""
    return tuple(extras.require(r.module, feature=_SAMPLER_FEATURE, extra=r.extra, package=r.package)
                 for r in _SOLVERS)


def _solvers_installed() -> bool:
    return all(r.available() for r in _SOLVERS)


class Ising(SearchSelector):
    """Exact-k binary quadratic model of measured single and pair removals (arXiv 2602.00161).

    Minimises ``E(s) = sum_i h_i s_i + sum_{i<j} J_ij s_i s_j`` over removal indicators with exactly
    ``k`` ones, protected blocks fixed at 0.

    The paper leaves several details open, or does them differently; the choices made here:

    - **Coefficients are measured, not derived.** The paper obtains its energies from forward and
      backward passes with respect to a few active parameters; here ``h_i = f({i}) - f({})`` and
      ``J_ij = f({i,j}) - f({i}) - f({j}) + f({})`` are measured with the objective ``f`` named by
      ``objective`` (default ``loss``: the calibration NLL with the set masked, so ``f({})`` is the dense
      NLL; ``proxy_sum``/``proxy_span`` work too). Where ``f`` refuses the empty set, ``f({}) = 0`` is
      used: ``h`` is then known up to a constant, which shifts every exact-k energy equally.
    - **Pair budget** (``pairs``). ``J_ij`` is measured only on a budgeted set of pairs; every other
      ``J_ij`` is 0, i.e. those blocks are assumed to act independently. ``"adjacent"`` (default):
      ``|i - j| <= window`` (default 2), ``O(L * window)`` pairs. Adjacent interactions are the strong
      ones for depth pruning: consecutive blocks compensate for each other (a neighbour re-does part of
      a removed block's update) or compound (two adjacent removals leave a larger gap in the residual
      stream than two distant ones), which is why span methods remove runs. ``"all"``: every pair,
      ``C(L, 2)``, exact on any quadratic objective. ``"top"``: every pair among the ``candidates``
      (default 8) free blocks with the lowest ``h`` (the most removable singles; ties: later block),
      where the answer is likely to lie.
    - **Solver.** When ``C(free, k) <= max_exact`` (default 200,000) the model is minimised by
      enumeration (exact; ties: first set in lexicographic order). Otherwise ``dimod`` +
      ``dwave-samplers``' ``sampler`` (``"simulated_annealing"``, default, or ``"tabu"``; ``reads``
      reads, seeded with ``problem.seed``) on the model with the penalty
      ``strength * (sum s - k)^2`` (default strength: the smallest that makes every ground state
      feasible, see :func:`solve_sampled`); an infeasible best sample is repaired greedily by energy
      (``info["constraint_repaired"]``), and the answer is descended to a 1-swap local minimum.
    - **Cost.** ``1 + free + pairs`` distinct sets (the empty set, every single, each measured pair);
      no more queries after the model is built, so ``info["energy"]`` is the model's value, not a
      measurement of the chosen set.

    ``info``: ``energy`` (``E`` of the chosen set; ``baseline + energy`` is the model's prediction of
    ``f``), ``baseline`` (``f({})`` or None), ``solver`` (``"exact"``, ``"simulated_annealing"`` or
    ``"tabu"``), ``pairs_measured``, ``solver_seconds``, ``constraint_repaired``, and for the samplers
    ``penalty``, ``polish_swaps`` and ``feasible_reads``.
    """

    name = "ising"
    default_objective = "loss"

    def __init__(self, objective: str | None = None, pairs: str = "adjacent", window: int = 2,
                 candidates: int = 8, max_exact: int = 200_000, sampler: str = "simulated_annealing",
                 reads: int = 32, strength: float | None = None, **unknown: Any) -> None:
        super().__init__(objective, **unknown)
        try:
            self.pairs = check_choice("pairs", pairs, PAIR_BUDGETS)
            self.window = check_int("window", window, 1)
            self.candidates = check_int("candidates", candidates, 2)
            self.max_exact = check_int("max_exact", max_exact, 0)
            self.sampler = check_choice("sampler", sampler, SAMPLERS)
            self.reads = check_int("reads", reads, 1)
            self.strength = check_float("strength", strength, positive=True, optional=True)
        except ValueError as exc:
            raise ValueError(f"selector 'ising': {exc}") from exc
        self.params.update(pairs=pairs, window=window, candidates=candidates, max_exact=max_exact,
                           sampler=sampler, reads=reads, strength=self.strength)

    def check_size(self, n_free: int, k: int) -> None:
        if not 1 <= k <= n_free:
            raise ValueError(f"selector 'ising': cannot remove k={k} blocks with {n_free} free")
        if math.comb(n_free, k) > self.max_exact and not _solvers_installed():
            raise ValueError(
                f"selector 'ising': C({n_free}, {k}) = {math.comb(n_free, k):,} sets exceeds "
                f"max_exact={self.max_exact:,} and the sampler needs the dimod and dwave-samplers packages "
                f"(pip install 'blockbench[ising]'); install them or raise max_exact"
            )

    def select(self, problem: SelectionProblem) -> SelectionResult:
        free, k = problem.candidates, problem.k
        self.check_size(len(free), k)
        f = self._objective(problem)
        model = measure(f, free, self.pairs, self.window, self.candidates)
        start = time.perf_counter()
        extra: dict[str, Any] = {}
        if math.comb(len(free), k) <= self.max_exact:
            chosen, energy = solve_exact(model, k)
            solver, repaired = "exact", False
        else:
            chosen, energy, extra = solve_sampled(model, k, self.sampler, self.reads, problem.seed, self.strength)
            solver, repaired = self.sampler, extra.pop("constraint_repaired")
        seconds = time.perf_counter() - start
        info = {"objective": f.name, "energy": energy, "baseline": model.baseline, "solver": solver,
                "pairs_measured": len(model.quadratic), "solver_seconds": seconds,
                "constraint_repaired": repaired, "computed": f.computed, **extra}
        return SelectionResult(blocks=sorted(chosen), evaluations=f.evaluations, info=info)
