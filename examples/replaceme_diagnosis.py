"""Why ReplaceMe's linear map makes SmolLM2-135M worse than no map in ``configs/methods.yaml``.

ReplaceMe (arXiv 2505.02819) replaces a removed run of blocks ``[a, b)`` by a ``d x d`` matrix ``T`` on
the MLP output ``M`` of block ``a - 1``, fitted by least squares so that ``Y + M T`` approximates the
state leaving block ``b - 1`` (``Y`` the residual entering that MLP's addition; see
:mod:`algorithms.healing.linear`, which implements the same normal equations as the paper's code). This
script fits ``T`` for one run on calibration windows and measures it on the held-out perplexity windows,
token by token, against no map (``T = I``, plain removal):

- ``relative residual``: ``|| M T - (S_out - Y) || / || S_out - Y ||`` over the tokens named;
- ``cosine distance``: the mean over tokens of ``1 - cos(Y + M T, S_out)`` (what the next RMSNorm sees);
- the share of ``|| S_out - Y ||^2`` that the largest-norm tokens hold.

Run it with the grid's span (blocks 11-18, the one ``gromov`` and ``replaceme`` choose) and its calibration
(8 x 128 Wikipedia tokens, seed 0), then with 64 windows::

    python examples/replaceme_diagnosis.py --first 11 --last 18 --samples 8 64

What it printed on SmolLM2-135M is in the README ("Methods compared").
"""

from __future__ import annotations

import argparse

import torch

from algorithms.data import calibration_batch, heldout_windows
from algorithms.healing.linear import fit_linear_map
from algorithms.models.blocks import get_blocks, hidden_tensor
from algorithms.models.zoo import load_model


def run_states(model, blocks, windows: torch.Tensor, first: int, last: int) -> dict[str, torch.Tensor]:
    """``M`` (the MLP output of block ``first - 1``), ``Y`` and ``S_out`` (the state leaving block ``last``),
    float64, shape ``(windows, tokens, d)``, from forward hooks on the dense model."""
    got: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[first - 1].mlp.register_forward_hook(lambda m, i, o: got.__setitem__("M", o)),
        blocks[first - 1].register_forward_hook(lambda m, i, o: got.__setitem__("S_in", hidden_tensor(o))),
        blocks[last].register_forward_hook(lambda m, i, o: got.__setitem__("S_out", hidden_tensor(o))),
    ]
    rows: dict[str, list[torch.Tensor]] = {"M": [], "Y": [], "S_out": []}
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None])
                m = got["M"][0].double()
                rows["M"].append(m)
                rows["Y"].append(got["S_in"][0].double() - m)
                rows["S_out"].append(got["S_out"][0].double())
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.stack(v) for k, v in rows.items()}


def measure(t: torch.Tensor, s: dict[str, torch.Tensor], positions: slice) -> tuple[float, float]:
    """``(relative residual, mean cosine distance)`` of ``Y + M T`` against ``S_out`` on ``positions``."""
    d = s["M"].shape[-1]
    m, y, out = (s[k][:, positions].reshape(-1, d) for k in ("M", "Y", "S_out"))
    target = out - y
    residual = float((m @ t - target).norm() / target.norm())
    cosine = float((1 - torch.nn.functional.cosine_similarity(y + m @ t, out, dim=-1)).mean())
    return residual, cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--first", type=int, default=11, help="first removed block")
    parser.add_argument("--last", type=int, default=18, help="last removed block")
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 64], help="calibration windows to fit on")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.first < 1 or args.last < args.first:
        parser.error(f"--first {args.first} --last {args.last}: need 1 <= first <= last (block first - 1 holds the map)")

    model, tokenizer, _ = load_model(args.model)
    blocks = get_blocks(model)
    held = run_states(model, blocks, heldout_windows(tokenizer, "wikipedia", seq_len=512, max_windows=8),
                      args.first, args.last)
    target_sq = ((held["S_out"] - held["Y"]) ** 2).sum(-1)
    top = target_sq.flatten().topk(held["M"].shape[0]).values.sum() / target_sq.sum()
    norms = held["S_out"].norm(dim=-1)
    print(f"held-out: {held['M'].shape[0]} x {held['M'].shape[1]} tokens; |S_out| at position 0 "
          f"{float(norms[:, 0].mean()):,.0f}, elsewhere {float(norms[:, 1:].mean()):,.0f} (mean); the "
          f"{held['M'].shape[0]} largest tokens hold {float(top):.1%} of |S_out - Y|^2")
    identity = torch.eye(held["M"].shape[-1], dtype=torch.float64)
    rows = [("no map (T = I)", "-", identity, None)]
    for n in args.samples:
        cal = run_states(model, blocks, calibration_batch(tokenizer, "wikipedia", samples=n, seq_len=args.seq_len,
                                                          seed=args.seed), args.first, args.last)
        d = cal["M"].shape[-1]
        t = fit_linear_map(cal["M"].reshape(-1, d), (cal["S_out"] - cal["Y"]).reshape(-1, d))
        cal_norm = (cal["S_out"] - cal["Y"]).norm(dim=-1)
        rows.append((f"least squares on {n} x {args.seq_len}", f"{int((cal_norm > 10 * cal_norm.median()).sum())}",
                     t, measure(t, cal, slice(None))[0]))
    print("| map | calibration tokens with a 10x-median norm | in-sample residual | held-out residual, all tokens "
          "| held-out residual, positions > 0 | held-out cosine distance, positions > 0 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, massive, t, in_sample in rows:
        r_all, _ = measure(t, held, slice(None))
        r_rest, c_rest = measure(t, held, slice(1, None))
        fitted = "-" if in_sample is None else f"{in_sample:.3f}"
        print(f"| {name} | {massive} | {fitted} | {r_all:.3f} | {r_rest:.3f} | {c_rest:.3f} |")


if __name__ == "__main__":
    main()
