#!/usr/bin/env python
"""Why can the weights of an AP run not be averaged? Three measurements on one or more run folders
(for example DoPr-AdamW against AdamW), from the weight snapshots a run keeps when trained with
``trainer.snapshot_every=<k>`` (``weights/step<k>.pt``):

1. **Low-eigenvalue share**: for each covered layer, the share of the weight change from step 0 to
   the last snapshot, ``||dW V_low||_F^2 / ||dW||_F^2``, that lies in input directions whose
   eigenvalue of Sigma (the layer's uncentered input second moment on training batches, at the
   last snapshot's weights) is below ``--threshold`` times the mean eigenvalue. Gradient methods
   barely move weights along directions the inputs do not excite; AP divides by those small
   eigenvalues (up to the damping), so it can.
2. **The averaging test**: validation loss along the straight line between two snapshots,
   ``(1 - a) W_A + a W_B``. An EMA of the weights is such an average; if the midpoint is far worse
   than both ends, an EMA of the run cannot work.
3. **Weight norms** of the covered layers at every snapshot.

    python scripts/ap_diagnostics.py runs/control/ema_probe/dopr_adamw-d0.001-s0 runs/control/ema_probe/adamw-s0 \\
        --out results/control/cpu/ap_diagnostics --between 1000 3000

Writes ``<out>/ap_diagnostics.md`` (tables and the command), ``ap_diagnostics.json`` and
``ap_diagnostics.png``. Runs on the CPU; it rebuilds each run's task from its config.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dopr  # noqa: E402
from experiments.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402


def snapshots(run: Path) -> dict[int, Path]:
    found = {int(m["k"]): p for p in (run / "weights").glob("step*.pt") if (m := re.fullmatch(r"step(?P<k>\d+)\.pt", p.name))}
    if len(found) < 2 or 0 not in found:
        raise SystemExit(f"{run}: needs weight snapshots at step 0 and later (weights/step<k>.pt); train it with "
                         f"trainer.snapshot_every=<k> (e.g. 500), found steps {sorted(found) or 'none'}")
    return dict(sorted(found.items()))


def key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"  # a model that is itself the layer has the name ""


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, "cpu")["model"]  # weights_only=True: tensors and plain values, no code


def build(run: Path):
    from omegaconf import OmegaConf

    from experiments.tasks import build_task

    config = run / "config.json"
    if not config.exists():
        raise SystemExit(f"{run} has no config.json: pass a run folder written by experiments.train")
    cfg = OmegaConf.create(json.loads(config.read_text()))
    return cfg, build_task(cfg.task, cfg.seed, torch.device("cpu"))


def label(cfg) -> str:
    name = cfg.optimizer.name
    damping = (cfg.optimizer.get("kwargs") or {}).get("damping")
    return f"{name} (damping {damping:g})" if name.startswith("dopr_") and damping is not None else name


@torch.no_grad()
def low_eigen_share(task, start: dict, end: dict, batches: int, threshold: float) -> dict[str, dict]:
    """{layer: {"share": ..., "low_directions": fraction of input directions below the threshold}}."""
    model = task.model
    model.load_state_dict(end)
    # The row cap the committed results/control/cpu/ap_diagnostics were made with (the library default then).
    ap = dopr.ActivationPreconditioner(model, damping=0.0, max_rows_per_dim=8)
    model.train()
    with torch.enable_grad():  # AP collects inputs only from training-mode forwards with autograd on
        for b in range(batches):
            task.loss(model, task.train_batch(b))
    sigmas = ap.second_moments()
    kinds = {layer.name: (layer.kind, layer.groups, layer.d_in) for layer in ap.layers}
    ap.remove()
    out = {}
    for name, sigma in sigmas.items():
        kind, groups, d_in = kinds[name]
        dw = (end[key(name)] - start[key(name)]).double()
        total = float(dw.square().sum())
        if total == 0:
            continue
        sigma = sigma.double()
        if kind == "embedding":  # rows of the table are the input directions (one-hot tokens)
            low = sigma < threshold * sigma.mean()
            out[name] = {"share": float(dw[low].square().sum()) / total, "low_directions": float(low.double().mean())}
            continue
        evals, evecs = torch.linalg.eigh(sigma)  # (groups, d), (groups, d, d)
        low = evals < threshold * evals.mean(-1, keepdim=True)
        blocks = dw.reshape(groups, dw.shape[0] // groups, d_in)
        projected = blocks @ (evecs * low[:, None, :])  # columns of V outside the low set zeroed
        out[name] = {"share": float(projected.square().sum()) / total, "low_directions": float(low.double().mean())}
    return out


@torch.no_grad()
def line_losses(task, a: dict, b: dict, points: int) -> list[tuple[float, float]]:
    from experiments.engine import validation_loss

    model = task.model
    out = []
    for i in range(points):
        t = i / (points - 1)
        mixed = {k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else b[k] for k in a}
        model.load_state_dict(mixed)
        out.append((t, validation_loss(task, model)))
    return out


def weight_norms(task, snaps: dict[int, Path]) -> dict[int, dict[str, float]]:
    ap = dopr.ActivationPreconditioner(task.model, damping=0.0)
    names = [layer.name for layer in ap.layers]
    ap.remove()
    out = {}
    for step, path in snaps.items():
        w = load_weights(path)
        out[step] = {n: float(w[key(n)].norm()) for n in names}
    return out


def figure(results: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        layers = list(r["low_eigen_share"])
        axes[0].bar([j + i * width for j in range(len(layers))], [r["low_eigen_share"][n]["share"] for n in layers], width, label=r["label"])
        axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=45, ha="right", fontsize=7)
        ts, losses = zip(*r["line"])
        axes[1].plot(ts, losses, marker="o", label=r["label"])
        steps = sorted(r["norms"], key=int)
        axes[2].plot([int(s) for s in steps], [sum(v ** 2 for v in r["norms"][s].values()) ** 0.5 for s in steps], marker="o", label=r["label"])
    axes[0].set_ylabel(f"share of ||W_end - W_0||^2 in directions with eigenvalue < {results[0]['threshold']:g} x mean")
    axes[0].set_ylim(0, 1)
    a, b = results[0]["between"]
    axes[1].set_xlabel(f"a: weights (1 - a) W(step {a}) + a W(step {b})")
    axes[1].set_ylabel("validation loss")
    axes[1].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("norm of the covered layers' weights")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders trained with trainer.snapshot_every")
    parser.add_argument("--out", type=Path, required=True, help="folder for ap_diagnostics.md/.json/.png")
    parser.add_argument("--between", type=int, nargs=2, default=None, metavar=("A", "B"),
                        help="the two snapshot steps of the averaging test (default: the middle and the last)")
    parser.add_argument("--threshold", type=float, default=0.01, help="low eigenvalue: below this times the mean (default 0.01)")
    parser.add_argument("--batches", type=int, default=8, help="training batches for Sigma (default 8)")
    parser.add_argument("--points", type=int, default=11, help="points on the line between the two snapshots (default 11)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = []
    for run in args.runs:
        snaps = snapshots(run)
        steps = list(snaps)
        a, b = args.between or (steps[len(steps) // 2], steps[-1])
        missing = [s for s in (a, b) if s not in snaps]
        if missing:
            raise SystemExit(f"{run}: no snapshot at step(s) {missing}; it has {steps}")
        cfg, task = build(run)
        print(f"{run}: {label(cfg)}, snapshots at {steps}", flush=True)
        share = low_eigen_share(task, load_weights(snaps[0]), load_weights(snaps[steps[-1]]), args.batches, args.threshold)
        line = line_losses(task, load_weights(snaps[a]), load_weights(snaps[b]), args.points)
        results.append({"run": str(run), "label": label(cfg), "threshold": args.threshold, "between": [a, b],
                        "low_eigen_share": share, "line": line, "norms": {str(k): v for k, v in weight_norms(task, snaps).items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/ap_diagnostics.py " + " ".join(str(r) for r in args.runs) + f" --out {args.out}" + \
        (f" --between {args.between[0]} {args.between[1]}" if args.between else "") + \
        (f" --threshold {args.threshold:g}" if args.threshold != 0.01 else "")
    lines = ["# AP diagnostics", "", f"Generated by `{command}`.", "",
             f"## 1. Share of the weight change (step 0 to the last snapshot) in input directions with eigenvalue < {args.threshold:g} x the mean", "",
             "Sigma: the layer's uncentered input second moment on training batches at the last snapshot's weights. "
             "In brackets: the fraction of input directions that are that low.", "",
             "| layer | " + " | ".join(r["label"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    for name in dict.fromkeys(n for r in results for n in r["low_eigen_share"]):
        cells = [f"{r['low_eigen_share'][name]['share']:.2f} ({r['low_eigen_share'][name]['low_directions']:.2f})"
                 if name in r["low_eigen_share"] else "" for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## 2. Validation loss on the straight line between two snapshots", "",
              "| a | " + " | ".join(f"{r['label']}: (1-a) W({r['between'][0]}) + a W({r['between'][1]})" for r in results) + " |",
              "|---|" + "---:|" * len(results)]
    for i in range(args.points):
        lines.append(f"| {results[0]['line'][i][0]:.1f} | " + " | ".join(f"{r['line'][i][1]:.4g}" for r in results) + " |")
    lines += ["", "## 3. Norm of the covered layers' weights", "",
              "| step | " + " | ".join(r["label"] for r in results) + " |", "|---|" + "---:|" * len(results)]
    for step in dict.fromkeys(s for r in results for s in r["norms"]):
        lines.append(f"| {step} | " + " | ".join(f"{sum(v ** 2 for v in r['norms'][step].values()) ** 0.5:.2f}"
                                                if step in r["norms"] else "" for r in results) + " |")
    lines += ["", "![diagnostics](ap_diagnostics.png)", ""]
    atomic_write_text(args.out / "ap_diagnostics.md", "\n".join(lines))
    atomic_write_text(args.out / "ap_diagnostics.json", json.dumps(results, indent=2) + "\n")
    figure(results, args.out / "ap_diagnostics.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
