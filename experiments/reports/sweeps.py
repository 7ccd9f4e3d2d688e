"""The learning-rate and damping sweep pages (make sweep-<task>-lr, make sweep-<task>-damping)."""

from __future__ import annotations

from pathlib import Path

from ..registry import base_of
from ..stats import selection
from .figures import _pyplot, _save_png


def lr_section(rows: list[dict], metric: str, higher: bool) -> list[str]:
    """Per optimizer, the LR with the best mean final metric and the LR with the lowest mean final validation loss."""
    lines = ["## Chosen learning rates", "",
             f"Per optimizer, the LR with the {'highest' if higher else 'lowest'} mean final {metric} (the rollout metric the suite is about); "
             "the LR with the lowest mean final validation loss is shown beside it.", "",
             "| optimizer | LR by " + metric + " | LR by val loss |", "|---|---|---|"]
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        sel = selection([r for r in rows if r["optimizer"] == opt], f"final_{metric}", higher)
        lines.append(f"| {opt} | {sel['by_metric']:g} | {sel['by_loss']:g} |")
    return lines + [""]


def damping_section(rows: list[dict], metric: str, higher: bool, out: Path, title: str, lab: dict) -> list[str]:
    """The damping sweep: the rollout metric and the validation loss against the AP damping, one
    line per LR (DoPr runs), the base GP at the same LR as a dashed horizontal line; with EMA runs,
    the raw weights' numbers in their own panels. Then the best damping per LR by each criterion."""
    quantities = [(f"final_{metric}", lab["metric_label"]), ("final_val_loss", lab["val_loss_label"])]
    if any(f"final_raw_{metric}" in r for r in rows):
        quantities += [(f"final_raw_{metric}", lab["metric_label"] + ", raw weights"), ("final_raw_val_loss", lab["val_loss_label"] + ", raw weights")]
        quantities[0] = (quantities[0][0], lab["metric_label"] + ", EMA weights")
        quantities[1] = (quantities[1][0], lab["val_loss_label"] + ", EMA weights")
    dopr_rows = [r for r in rows if r["damping"] is not None]
    base_rows = [r for r in rows if r["damping"] is None]
    lrs = sorted({r["lr"] for r in dopr_rows})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.6 * len(quantities), 3.9), dpi=120, squeeze=False)
    palette = ["#08519c", "#a63603", "#006d2c", "#54278f"]
    for ax, (key, label) in zip(axes[0], quantities):
        for i, lr in enumerate(lrs):
            colour = palette[i % len(palette)]
            for opt in sorted({r["optimizer"] for r in dopr_rows}):
                pts = sorted((r["damping"], r[key]) for r in dopr_rows if r["lr"] == lr and r["optimizer"] == opt and key in r)
                if pts:
                    ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o", color=colour, label=f"{opt}, lr {lr:g}")
            for opt in sorted({r["optimizer"] for r in base_rows}):
                vals = [r[key] for r in base_rows if r["lr"] == lr and r["optimizer"] == opt and key in r]
                if vals:
                    ax.axhline(sum(vals) / len(vals), color=colour, linestyle="--", linewidth=1, label=f"{opt}, lr {lr:g}")
        ax.set_xscale("log")
        if "val_loss" in key:
            ax.set_yscale("log")
        ax.set_xlabel("AP damping gamma (x mean eigenvalue of Sigma)")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title + ": final weights, one run per point", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save_png(fig, out / "damping.png")
    sign = 1 if higher else -1
    lines = ["## Best damping per learning rate", "",
             f"Per LR, the damping with the {'highest' if higher else 'lowest'} final {metric} and the one with the lowest final "
             "validation loss (one seed per point: a difference of one grid step is within noise); the base GP at the same LR beside it.", "",
             "| optimizer | lr | " + " | ".join(f"damping by {k.removeprefix('final_')}" + (" (min)" if "val_loss" in k else "") for k, _ in quantities)
             + " | " + " | ".join(f"best {k.removeprefix('final_')}" for k, _ in quantities) + " | base GP: " + ", ".join(k.removeprefix("final_") for k, _ in quantities) + " |",
             "|---|---|" + "---|" * (2 * len(quantities) + 1)]
    for opt in sorted({r["optimizer"] for r in dopr_rows}):
        for lr in lrs:
            rs = [r for r in dopr_rows if r["lr"] == lr and r["optimizer"] == opt]
            if not rs:
                continue
            picks, bests = [], []
            for key, _ in quantities:
                have = [r for r in rs if key in r]
                if not have:
                    picks.append(""), bests.append("")
                    continue
                s_ = -1 if "val_loss" in key else sign
                best = max(have, key=lambda r: s_ * r[key])
                picks.append(f"{best['damping']:g}")
                bests.append(f"{best[key]:.4g}")
            base = [r for r in base_rows if r["lr"] == lr and r["optimizer"] == base_of(opt)]
            base_cells = ", ".join(f"{sum(r[k] for r in base if k in r) / len(base):.4g}" for k, _ in quantities) if base else "n/a"
            lines.append(f"| {opt} | {lr:g} | " + " | ".join(picks) + " | " + " | ".join(bests) + f" | {base_cells} |")
    return lines + ["", "![metric and validation loss against damping](damping.png)", ""]
