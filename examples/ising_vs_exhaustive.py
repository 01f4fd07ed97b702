"""The ``ising`` selector against exhaustive search on the TRUE calibration loss of a zoo model.

For each k: ``exhaustive`` on ``loss`` (the optimum), ``ising`` with each ``--pairs`` budget, ``iterative`` on
``loss`` (SLEB) and ``topk`` on the single-removal scores ``loss({i}) - loss({})``, all on one
:class:`~algorithms.objectives.ObjectiveFactory` whose memo they share (a set is computed once, whoever
asks). ``evaluations`` is each selector's own count of distinct sets (its cost on a cold cache;
``SelectionResult.evaluations``), ``computed`` the forward passes it really ran here, after the selectors
before it. The cheap selectors run first and ``exhaustive`` last, so ``seconds`` is what each added.

For ``ising`` it also checks, by brute force over every exact-k set, whether the choice is the minimum of
the energy it measured, and ranks it among all exact-k sets by true loss. Writes a Markdown report::

    python examples/ising_vs_exhaustive.py --k 1 2 3 --samples 2 --seq-len 64 --out report.md

Every free block costs forward passes: the run computes every set of at most ``max(k)`` free blocks,
``sum_{j <= k} C(free, j)`` of them (4,526 for k <= 3 on SmolLM2's 30 blocks). One evaluation is timed
first and the whole run estimated; ``--protect`` (blocks never removed) or ``--keep N`` (free only the N
blocks whose single removal raises the loss least) shrink the candidate set when that is too long.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

from algorithms.data import calibration_batch
from algorithms.ising import measure
from algorithms.models.nll import perplexity_of
from algorithms.models.zoo import load_model
from algorithms.objectives import ObjectiveFactory
from algorithms.selectors import SELECTORS, SelectionProblem


def parse_blocks(items: list[str]) -> set[int]:
    """``["0-3", "27,29"]`` -> ``{0, 1, 2, 3, 27, 29}``."""
    out: set[int] = set()
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def fmt_blocks(blocks) -> str:
    return "{" + ", ".join(str(b) for b in sorted(blocks)) + "}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", default="wikipedia", help="calibration text (algorithms.data)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", nargs="+", default=["adjacent", "all"], choices=["adjacent", "all", "top"])
    ap.add_argument("--protect", nargs="*", default=[], help="blocks never removed, e.g. 0-3 26-29")
    ap.add_argument("--keep", type=int, default=None,
                    help="free only the KEEP unprotected blocks whose single removal raises the loss least "
                         "(the others are protected too); costs one evaluation per unprotected block")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on shared cores more threads ran slower)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()
    model, tokenizer, info = load_model(args.model)
    n_blocks = info["n_blocks"]
    protected = frozenset(parse_blocks(args.protect))
    ids = calibration_batch(tokenizer, args.source, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    factory = ObjectiveFactory(model=model, input_ids=ids)
    loss = factory.get("loss")

    # one evaluation timed before anything else, and the whole run estimated from it
    unprotected = [b for b in range(n_blocks) if b not in protected]
    t = time.perf_counter()
    dense = loss([])
    t_dense = time.perf_counter() - t
    t = time.perf_counter()
    loss([unprotected[len(unprotected) // 2]])
    t_one = time.perf_counter() - t
    print(f"{args.model}: {n_blocks} blocks; calibration {args.samples} x {args.seq_len} tokens of "
          f"{args.source} (seed {args.seed}); dense NLL {dense:.4f}; one loss evaluation {t_one:.2f} s "
          f"(dense: {t_dense:.2f} s)", flush=True)
    screen = ""
    if args.keep is not None and args.keep < len(unprotected):
        rise = {b: loss([b]) - dense for b in unprotected}
        kept = sorted(unprotected, key=lambda b: (rise[b], b))[: args.keep]
        protected = protected | (frozenset(unprotected) - frozenset(kept))
        screen = (f" Free: the {args.keep} blocks whose single removal raises the loss least (" +
                  ", ".join(f"{b}: {rise[b]:+.4f}" for b in sorted(kept)) + "); the others' rises: " +
                  ", ".join(f"{b}: {rise[b]:+.4f}" for b in sorted(set(unprotected) - set(kept))) + ".")
    free = [b for b in range(n_blocks) if b not in protected]
    kmax = max(args.k)
    known = sum(1 for key in loss.cache if key <= set(free))
    n_sets = sum(math.comb(len(free), j) for j in range(kmax + 1)) - known
    print(f"{len(free)} free blocks {fmt_blocks(free)}: about {n_sets:,} more sets for k <= {kmax} "
          f"-> about {n_sets * t_one / 60:.1f} min", flush=True)

    # topk's scores: the single-removal loss increase (its cost: the empty set and every free block)
    view = loss.counter()
    single = {b: view([b]) - view([]) for b in free}
    topk_evals = view.evaluations
    fill = max(single.values())  # protected blocks are never candidates; any finite score will do
    scores = torch.tensor([single.get(b, fill) for b in range(n_blocks)], dtype=torch.float64)

    runs = [("topk (single-removal loss)", "topk", {}), ("iterative (loss, SLEB)", "iterative", {"objective": "loss"})]
    runs += [(f"ising (pairs={p})", "ising", {"objective": "loss", "pairs": p}) for p in args.pairs]
    runs += [("exhaustive (loss)", "exhaustive", {"objective": "loss", "max_combinations": 10**7})]

    rows, notes = [], []
    for k in args.k:
        problem = SelectionProblem(n_blocks=n_blocks, k=k, scores=scores, higher_is_important=True,
                                   protected=protected, seed=args.seed, objectives=factory)
        results = {}
        for label, name, params in runs:
            before = loss.evaluations
            t = time.perf_counter()
            result = SELECTORS.get(name)(**params)(problem)
            seconds = time.perf_counter() - t
            if name == "topk":
                result.evaluations = topk_evals
            results[label] = (result, seconds, loss.evaluations - before, name, params)
            print(f"k={k} {label}: {fmt_blocks(result.blocks)} NLL {loss(result.blocks):.4f} "
                  f"({result.evaluations} evaluations, {loss.evaluations - before} computed, {seconds:.1f} s)",
                  flush=True)
        combos = list(itertools.combinations(free, k))
        values = {c: loss.cached(c) for c in combos}  # all known: exhaustive ran
        optimum = results["exhaustive (loss)"][0].info["value"]
        for label, (result, seconds, computed, name, params) in results.items():
            value = loss(result.blocks)
            rank = 1 + sum(v < value for v in values.values())
            energy_opt, predicted = "—", "—"
            if name == "ising":
                bqm = measure(loss.counter(), free, params["pairs"])  # every set is memoised: no new pass
                energies = [bqm.energy(c) for c in combos]
                lowest = min(energies)
                mine = bqm.energy(result.blocks)
                energy_opt = "yes" if mine <= lowest + 1e-12 * (1 + abs(lowest)) else f"no (+{mine - lowest:.4f})"
                predicted = f"{dense + mine:.4f}"
            rows.append((k, label, fmt_blocks(result.blocks), value, perplexity_of(value), value - optimum,
                         predicted, energy_opt, "yes" if value == optimum else "no", rank, len(combos),
                         result.evaluations, computed, seconds))
        if k >= 3:
            full = measure(loss.counter(), free, "all")
            resid = {c: values[c] - (dense + full.energy(c)) for c in combos}
            worst = max(resid, key=lambda c: abs(resid[c]))
            best_set = tuple(results["exhaustive (loss)"][0].blocks)
            notes.append(
                f"k={k}: the third-order part of the true loss (true NLL minus the all-pairs model's "
                f"prediction) is {resid[best_set]:+.4f} at the optimum {fmt_blocks(best_set)}; over all "
                f"{len(combos):,} sets it ranges from {min(resid.values()):+.4f} to {max(resid.values()):+.4f} "
                f"(largest in size at {fmt_blocks(worst)}; mean |.| "
                f"{sum(abs(v) for v in resid.values()) / len(resid):.4f})."
            )

    total = time.perf_counter() - start_all
    per_eval = total / max(loss.evaluations, 1)
    lines = [
        f"# `ising` vs exhaustive search on the true calibration loss of {args.model}",
        "",
        f"Calibration: {args.samples} x {args.seq_len} tokens of `{args.source}` (seed {args.seed}); objective "
        f"`loss` = mean next-token NLL with the blocks masked; dense NLL {dense:.4f} (perplexity "
        f"{perplexity_of(dense):.2f}). {len(free)} of {n_blocks} blocks free"
        + (f" (protected: {fmt_blocks(protected)})." if protected else ".") + screen,
        f"{loss.evaluations:,} distinct sets computed in {total / 60:.1f} min on {args.threads} CPU thread(s) "
        f"(about {per_eval:.2f} s per evaluation, all included). "
        f"Written by `examples/ising_vs_exhaustive.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
        "Columns: `NLL`/`ppl`: the true calibration loss of the chosen set; `gap`: NLL minus the exhaustive "
        "optimum; `model NLL`: ising's prediction, dense NLL + its energy; `energy opt`: the choice minimises "
        "ising's own measured energy over every exact-k set (brute force); `true opt`: it is the exhaustive "
        "optimum; `rank`: 1 + the number of exact-k sets with a lower true loss; `evaluations`: the distinct "
        "sets the selector needs on a cold cache (topk: the dense and single-removal losses of its scores); "
        "`computed`/`seconds`: the forward passes and wall time it added here, after the rows above it "
        "(they share one memo; exhaustive runs last).",
        "",
        "| k | selector | blocks | NLL | ppl | gap | model NLL | energy opt | true opt | rank | evaluations "
        "| computed | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, label, blocks, value, ppl, gap, predicted, energy_opt, true_opt, rank, n, evals, computed, secs in rows:
        lines.append(f"| {k} | {label} | {blocks} | {value:.4f} | {ppl:.2f} | {gap:+.4f} | {predicted} | "
                     f"{energy_opt} | {true_opt} | {rank} / {n:,} | {evals:,} | {computed:,} | {secs:.1f} |")
    if notes:
        lines += ["", *notes]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
