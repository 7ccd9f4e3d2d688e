#!/usr/bin/env python
"""Is the activation covariance what matters? (issue 48) Two statistics of a layer's input side, side by side:

- AP's  Sigma = (1/n) sum_i z_i z_i^T  (the layer's inputs, every row), preconditioning G (Sigma + lam I)^-1;
- one-sided Shampoo's  S = mean over batches of G^T G  (the gradient's Gram on the same side, in x in),
  preconditioning G (S + eps lam_max(S) I)^-1/2  (configs/optimizer/shampoo_input.yaml; an average where the
  optimizer keeps an EMA).

Per covered Linear layer of a trained run (its last checkpoint), from ``--batches`` training batches: the overlap
of the two statistics' top-k eigenvector subspaces (1: the same subspace; a random pair overlaps about k/d), their
Frobenius cosine, each one's effective rank, and on the last batch's gradient G the cosines between the directions
each would step in: AP's (with that batch's own Sigma, the paper's per-batch form), AP's with Shampoo's exponent
-1/2, Shampoo's (S includes that batch, as its EMA does), and G itself. If S were a scaled Sigma, the -1/2
directions would agree (cosine 1); the gap is what the gradient Gram weighs in (the output gradients) that the
activations do not, and how each treats the directions its statistic barely sees.

    python scripts/input_side.py runs/lm/cpu/adamw-s0 runs/lm/cpu/dopr_adamw-s0 --out results/lm/cpu/input_side

Writes ``<out>/input_side.md`` (the command, the tables) and ``input_side.json``. Runs on the CPU; it rebuilds each
run's task from its config.json (scripts/ap_diagnostics.py's loader). Written by hand: no kept library compares a
preconditioner's statistics across optimizers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dopr  # noqa: E402
from experiments.checkpoint import atomic_write_text, load_checkpoint, load_model_state  # noqa: E402


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy) of the normalised eigenvalues (Roy and Vetterli 2007): d for a multiple of I, 1 for rank one."""
    evals = torch.linalg.eigvalsh(matrix).clamp_min(0)
    p = evals / evals.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """||U_a^T U_b||_F^2 / k for the top-k eigenvectors of two symmetric matrices: 1 for one subspace, 0 for
    orthogonal ones, about k/d for a random pair."""
    ua = torch.linalg.eigh(a)[1][:, -k:]
    ub = torch.linalg.eigh(b)[1][:, -k:]
    return float((ua.T @ ub).square().sum() / k)


def inverse_power(matrix: torch.Tensor, ridge: float, power: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(matrix)
    return (evecs * (evals.clamp_min(0) + ridge) ** power) @ evecs.T


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def collect(model: torch.nn.Module, loss_of_batch, batches: int):
    """For every covered Linear layer with one group, over training batches 0..batches-1: Sigma (AP's statistic over
    every input row of all of them), S (the mean of G^T G over them, as one-sided Shampoo's EMA of about that many
    gradients), and of the last batch its gradient G and its own Sigma (AP's per-batch statistic, the paper's form):
    the step each optimizer would take on that batch. ``loss_of_batch(b)`` returns the training loss of batch b on
    ``model`` (in training mode). Returns ({name: (Sigma, S, G, Sigma of the last batch)}, skipped), in float64;
    skipped names the covered layers left out (convolutions, embeddings, grouped or split layers)."""
    ap = dopr.ActivationPreconditioner(model, damping=0.0)  # every row (max_rows_per_dim None): the paper's Sigma
    keep = [layer for layer in ap.layers if layer.kind == "linear" and layer.groups == 1 and layer.out_rows is None]
    skipped = [f"{layer.name} ({layer.kind})" for layer in ap.layers if layer not in keep]
    flat = lambda m: {n: (v[0] if v.dim() == 3 else v).double() for n, v in m.items()}  # noqa: E731  (1, d, d) -> (d, d)
    counts = lambda: {layer.name: sum(p.count for p in layer.parts) for layer in keep}  # noqa: E731
    gram, grads = {layer.name: 0.0 for layer in keep}, {}
    model.train()
    for b in range(batches):
        if b == batches - 1:  # the last batch's Sigma apart from the rest: read, reset, collect it alone
            before, n_before = flat(ap.second_moments()), counts()
            ap.reset_stats()
        model.zero_grad(set_to_none=True)
        loss_of_batch(b).backward()
        for layer in keep:
            g = layer.grad_view()
            if g is not None:
                g = g.detach().double()
                gram[layer.name] = gram[layer.name] + g.T @ g / batches
                grads[layer.name] = g
    last, n_last = flat(ap.second_moments()), counts()
    ap.remove()
    out = {}
    for layer in keep:
        name = layer.name
        if name in last and name in grads and (batches == 1 or name in before):
            total = last[name] * n_last[name] + (before[name] * n_before[name] if batches > 1 else 0)
            count = n_last[name] + (n_before[name] if batches > 1 else 0)
            out[name] = (total / count, gram[name], grads[name], last[name])
    return out, skipped


def compare(sigma: torch.Tensor, s: torch.Tensor, g: torch.Tensor, sigma_batch: torch.Tensor, damping: float,
            matrix_eps: float, top: float) -> dict:
    """The numbers of one layer (see the module docstring): the statistics compared over all batches (``sigma``, ``s``),
    the directions on the last batch's gradient ``g`` with AP's per-batch ``sigma_batch`` and Shampoo's ``s``.
    ``damping`` is AP's gamma (lam = gamma tr(Sigma)/d), ``matrix_eps`` Shampoo's ridge relative to lam_max(S),
    ``top`` the share of directions in the subspaces."""
    d = sigma.shape[0]
    k = max(1, math.ceil(top * d))
    lam = damping * float(sigma_batch.trace()) / d
    ridge = matrix_eps * float(torch.linalg.eigvalsh(s)[-1])
    ap = g @ inverse_power(sigma_batch, lam, -1.0)
    ap_half = g @ inverse_power(sigma_batch, lam, -0.5)
    shampoo = g @ inverse_power(s, ridge, -0.5)
    return {"d_in": d, "k": k, "overlap": subspace_overlap(sigma, s, k), "random_overlap": k / d,
            "frobenius_cosine": cosine(sigma, s), "effective_rank_sigma": effective_rank(sigma),
            "effective_rank_gram": effective_rank(s), "cos_ap_half_shampoo": cosine(ap_half, shampoo),
            "cos_ap_shampoo": cosine(ap, shampoo), "cos_ap_g": cosine(ap, g), "cos_shampoo_g": cosine(shampoo, g)}


COLUMNS = (("d_in", "d_in", "{:d}"), ("overlap", "top-k overlap", "{:.3f}"), ("random_overlap", "random k/d", "{:.3f}"),
           ("frobenius_cosine", "Frobenius cos", "{:.3f}"), ("effective_rank_sigma", "eff. rank Sigma", "{:.1f}"),
           ("effective_rank_gram", "eff. rank G^T G", "{:.1f}"), ("cos_ap_half_shampoo", "cos(AP^-1/2 dir, Shampoo dir)", "{:.3f}"),
           ("cos_ap_shampoo", "cos(AP dir, Shampoo dir)", "{:.3f}"), ("cos_ap_g", "cos(AP dir, G)", "{:.3f}"),
           ("cos_shampoo_g", "cos(Shampoo dir, G)", "{:.3f}"))


def short(name: str) -> str:
    """A layer's name without peft's wrapping (base_model.model. ... .default)."""
    return name.removeprefix("base_model.model.").removesuffix(".default")


def medians(layers: dict[str, dict]) -> dict:
    return {key: statistics.median(r[key] for r in layers.values()) for key, _, _ in COLUMNS}


def row(label: str, values: dict) -> str:
    return f"| {label} | " + " | ".join(("{:.0f}" if isinstance(values[key], float) and fmt == "{:d}" else fmt).format(values[key])
                                        for key, _, fmt in COLUMNS) + " |"


def table(layers: dict[str, dict]) -> list[str]:
    lines = ["| layer | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [row(short(name), values) for name, values in layers.items()]
    return lines + [row("**median**", medians(layers))]


def shown(path: Path) -> str:
    """A path as the command line shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by experiments.train (checkpoint.pt, config.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for input_side.md and input_side.json")
    parser.add_argument("--batches", type=int, default=20, help="training batches for Sigma and G^T G (default 20: the window "
                        "of shampoo_input's EMA, beta2 0.95, whose S is of about 1 / (1 - 0.95) recent gradients)")
    parser.add_argument("--damping", type=float, default=None, help="AP's gamma (default: the run's own, else 1)")
    parser.add_argument("--matrix-eps", type=float, default=1e-6, help="Shampoo's ridge relative to lam_max(S) (default 1e-6, shampoo_input.yaml)")
    parser.add_argument("--top", type=float, default=0.1, help="share of directions in the top-k subspaces (default 0.1)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from ap_diagnostics import build, label

    torch.manual_seed(0)
    results = []
    for run in args.runs:
        ckpt = run / "checkpoint.pt"
        if not ckpt.exists():
            raise SystemExit(f"{run} has no checkpoint.pt: pass a run folder written by experiments.train (a finished or killed run)")
        cfg, task = build(run)
        load_model_state(task.model, load_checkpoint(ckpt, "cpu")["model"])  # LoRA: the trainable weights only
        damping = args.damping if args.damping is not None else float((cfg.optimizer.get("kwargs") or {}).get("damping") or 1.0)
        print(f"{run}: {label(cfg)}, {args.batches} batches ...", flush=True)
        stats, skipped = collect(task.model, lambda b: task.loss(task.model, task.train_batch(b)), args.batches)
        if not stats:
            raise SystemExit(f"{run}: no covered Linear layer with a gradient (covered: {skipped or 'none'})")
        layers = {name: compare(*v, damping=damping, matrix_eps=args.matrix_eps, top=args.top) for name, v in stats.items()}
        results.append({"run": str(run), "label": label(cfg), "damping": damping, "layers": layers, "skipped": skipped})
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python scripts/input_side.py " + " ".join(str(r) for r in args.runs) + f" --out {shown(args.out)}"
               + (f" --batches {args.batches}" if args.batches != 20 else "") + (f" --damping {args.damping:g}" if args.damping is not None else ""))
    lines = ["# The input side: AP's activation covariance against one-sided Shampoo's gradient Gram", "",
             f"Generated by `{command}`.", "",
             f"Per covered Linear layer at the run's last checkpoint: Sigma over every input row of {args.batches} training "
             f"batches and S, the mean of G^T G over the same batches (shampoo_input's EMA, beta2 0.95, spans about 20), "
             f"compared as matrices; and the directions each takes on the last batch's gradient G: AP's G (Sigma_b + lam I)^-1 "
             f"with that batch's own Sigma_b (lam = gamma tr(Sigma_b)/d), the same with exponent -1/2, and Shampoo's "
             f"G (S + {args.matrix_eps:g} lam_max(S) I)^-1/2. Top-k: the {args.top:g} share of directions with "
             "the largest eigenvalues; a random pair of subspaces overlaps k/d. Reading: if the gradient Gram were a scaled "
             "activation covariance, the overlap, the Frobenius cosine and cos(AP^-1/2 dir, Shampoo dir) would be 1.", ""]
    lines += ["## Summary: the median over the layers of each input width, per run", "",
              "| run | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in results:
        for d in sorted({v["d_in"] for v in r["layers"].values()}):
            group = {n: v for n, v in r["layers"].items() if v["d_in"] == d}
            lines.append(row(f"{r['label']}, {len(group)} layers", medians(group)))
    lines.append("")
    for r in results:
        lines += [f"## {r['label']} (`{r['run']}`, gamma {r['damping']:g})", "", *table(r["layers"]), ""]
        if r["skipped"]:
            lines += [f"Covered by AP but left out here (not one plain Linear statistic): {', '.join(r['skipped'])}.", ""]
    atomic_write_text(args.out / "input_side.md", "\n".join(lines))
    atomic_write_text(args.out / "input_side.json", json.dumps({"command": command, "runs": results}, indent=1) + "\n")
    print(f"wrote {args.out / 'input_side.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
