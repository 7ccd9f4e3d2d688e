"""The reports' figures: one line (or point) per optimizer in the registry's colours, mean over seeds with a 95%
band; PNG bytes are deterministic (no timestamp), so `make report` rewrites a figure only when its data change."""

from __future__ import annotations

import io
import math
from pathlib import Path

from ..record import artifact
from ..registry import colour as colour_of
from ..registry import ordered
from .load import curves
from .tables import spread


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: deterministic bytes
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, opt: str, xs: list, samples: list[list[float]], rate: bool = False, **plot_kw) -> None:
    """One optimizer's line: the mean over seeds at each x, its 95% CI as a band (``spread``: inside
    [0, 1] for a rate)."""
    stats = [spread(v, rate) for v in samples]
    means = [m for m, _, _ in stats]
    lows = [m if math.isnan(lo) else lo for m, lo, _ in stats]
    highs = [m if math.isnan(hi) else hi for m, _, hi in stats]
    colour = colour_of(opt)
    ax.plot(xs, means, marker="o" if opt.startswith("dopr_") else "s", color=colour, label=opt,
            linestyle="-" if opt.startswith("dopr_") else "--", **plot_kw)
    ax.fill_between(xs, lows, highs, color=colour, alpha=0.2, linewidth=0)


def _finish(fig, axes, title: str, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "; mean and 95% CI over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save_png(fig, path)


def horizon_figure(rows: list[dict], series: dict, path: Path, title: str, lab: dict, rate: bool = False) -> bool:
    """The rollout metric against the rollout horizon (chain length, ODE steps, ...), one panel per
    series (load.horizon_series), one line per optimizer: mean over seeds with its 95% CI as a band."""
    if not series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.0), dpi=120, squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        for opt in ordered(r["optimizer"] for r in rows):
            rs = [r for r in rows if r["optimizer"] == opt]
            kept = [(n, [r[key] for r in rs if key in r]) for n, key in points]
            kept = [(n, vals) for n, vals in kept if vals]
            _band(ax, opt, [n for n, _ in kept], [vals for _, vals in kept], rate)
        if max(n for n, _ in points) / max(1, min(n for n, _ in points)) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks([n for n, _ in points], [str(n) for n, _ in points])
        ax.set_xlabel(lab["horizon_label"] + ("" if name == "steps" else f" ({name})"))
        ax.set_ylabel(lab["metric_label"] + ", final weights", fontsize=9)
    _finish(fig, axes[0], title, path)
    return True


def training_figure(done: list[dict], metric: str, path: Path, title: str, lab: dict, rate: bool = False) -> bool:
    """Validation loss and the rollout metric against the training step (every evaluation of the
    weights being evaluated), one line per optimizer: mean over seeds with its 95% CI as a band."""
    panels = [("val_loss", lab["val_loss_label"]), (metric, lab["metric_label"])]
    data = [curves(done, key) for key, _ in panels]
    if not data[0] or max(len(steps) for steps in data[0].values()) < 2:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0), dpi=120)
    for ax, (key, label), series in zip(axes, panels, data):
        for opt in ordered(series):
            steps = sorted(series[opt])
            _band(ax, opt, steps, [series[opt][t] for t in steps], rate and key == metric, markersize=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=9)
    _finish(fig, axes, title, path)
    return True


def samples_figure(experiment_dir: Path, done: list[dict], path: Path, title: str) -> bool:
    """A grid of generated samples per optimizer (the lowest seed's run), from the samples.npy
    that tasks with images write at the end of training (kept beside the records): rows are classes."""
    import numpy as np

    picked = {}
    for r in sorted(done, key=lambda r: r["summary"]["seed"]):
        f = artifact(experiment_dir, r, "samples.npy")
        if f is not None:
            picked.setdefault(r["summary"]["optimizer"], (r["summary"]["seed"], np.load(f)))
    if not picked:
        return False
    plt = _pyplot()
    opts = ordered(picked)
    fig, axes = plt.subplots(1, len(opts), figsize=(3.2 * len(opts), 3.8), dpi=120, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        seed, images = picked[opt]
        images = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=96)  # a grey frame around each sample
        n, c, h, w = images.shape
        per_row = 8 if n % 8 == 0 else n
        grid = images.reshape(n // per_row, per_row, c, h, w).transpose(0, 3, 1, 4, 2).reshape(n // per_row * h, per_row * w, c)
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{opt} (seed {seed})", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)
    return True


def figure(rows: list[dict], metric: str, path: Path, title: str, lab: dict, x_key: str = "final_val_loss", x_label: str | None = None) -> None:
    """One point per run: x (validation loss, or a diagnostic) against the rollout metric."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for opt in ordered(r["optimizer"] for r in rows):
        rs = [r for r in rows if r["optimizer"] == opt and x_key in r]
        ax.scatter([r[x_key] for r in rs], [r[f"final_{metric}"] for r in rs], s=40,
                   color=colour_of(opt), label=opt, edgecolors="black", linewidths=0.5,
                   marker="o" if opt.startswith("dopr_") else "s")
    ax.set_xlabel((x_label or lab["val_loss_label"]) + ", final weights")
    ax.set_ylabel(lab["metric_label"] + ", final weights")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
