"""Flow-matching image generation: the network is trained on a one-step velocity regression but
deployed by integrating an ODE over its own outputs, so its errors compound along the path.

Path (rectified flow / conditional flow matching with the linear interpolation):
``x_t = (1 - t) * noise + t * image``, target velocity ``image - noise``, ``t ~ U(0, 1)``; sampling
integrates ``dx/dt = v(x, t)`` from noise at t=0 to an image at t=1. Class-conditional through
the UNet's class embedding; with ``label_dropout > 0`` the null class (index ``num_classes``) is
trained too, so classifier-free guidance (``guidance != 1``) is available at sampling time.

Rollout metrics (``evaluate``), per ODE solver and number of steps: the Frechet distance (FD)
between generated images and a reference set, in the penultimate features of a classifier the
suite trains on the training set (torchmetrics' FID with that network as the feature extractor),
and that classifier's accuracy on the class-conditional samples. Beside them: ``fd_floor``, the FD
of real images of the same number against the same reference (what a perfect generator scores:
the estimator's bias at this sample size); ``select_fd``, FD of other samples (other noise) against
another reference set, on which the training loop chooses the best checkpoint; and a memorisation
check (``MemorisationCheck``): are the samples closer to training images than fresh images are?
With ``inception_weights`` set (a cluster where the weights are on disk), the real Inception FID
too, through the same metric class.

Embedded default (``dataset: glyphs``): digits rendered from the fonts matplotlib ships under
random stroke width and affine maps (``glyphs.py``), generated from a seed, so the reference, floor
and selection sets are fresh draws of the true distribution, never the training images.
``dataset: digits``: scikit-learn's 1797 handwritten 8x8 digits (the reference is then the training
split, and the floor and selection sets the held-out splits). Paper scale: CIFAR-10 through
``datasets`` (hub id or a local folder/parquet in its format), with the same roles as digits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_write_bytes
from . import glyphs
from .base import EvalResult, Task, check_sizes, eval_mode
from .flow_metrics import FrechetDistance, MemorisationCheck, classifier_accuracy, feature_classifier, inception_fd

SOLVERS = ("euler", "midpoint", "heun3", "rk4")  # torchdiffeq's fixed-grid methods we expose
STAGES = {"euler": 1, "midpoint": 2, "heun3": 3, "rk4": 4}  # network evaluations per step


# --------------------------------------------------------------------------------------- data
# The glyph generator's stream of each set and the config key of its size.
GLYPH_SETS = {"train": (1, "train_size"), "val": (2, "val_size"), "test": (3, "val_size"), "reference": (4, "reference_size"),
              "floor": (5, "eval_samples"), "select_reference": (6, "reference_size"), "holdout": (7, "train_size")}
FLOOR_DRAWS = 5  # glyphs: fd_floor is the mean over this many fresh sets of eval_samples images (one is noisy: +-20%)


def glyph_set(cfg, name: str, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of the glyph generator (images in [-1, 1], N x 1 x S x S float32; labels), cached in
    ``task.data_dir`` (keyed by the generator's settings, the set's size and stream)."""
    spec = glyphs.spec_of(cfg.get("glyphs"))
    stream, size_key = GLYPH_SETS[name]
    n = int(cfg[size_key]) * (FLOOR_DRAWS if name == "floor" else 1)
    x, y = glyphs.cached(spec, n, stream, cfg.image_size, cfg.get("data_dir"), log)
    return glyphs.to_float(x), y


def load_images(cfg, log=print) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "val", "test"}: (images in [-1, 1], N x C x H x W float32; labels, N int64).

    ``cfg.dataset == "glyphs"``: three streams of the glyph generator (``train_size``, ``val_size``
    and ``val_size`` images). ``"digits"``: scikit-learn's digits, split 80/10/10 by a fixed
    permutation. Otherwise a ``datasets`` source (hub id, or a local folder of parquet files / an
    imagefolder) with ``cfg.train_split`` and ``cfg.val_split``; the held-out split is halved into
    val and test.
    """
    if cfg.dataset == "glyphs":
        spec = glyphs.spec_of(cfg.get("glyphs"))
        if cfg.channels != 1 or cfg.num_classes != len(spec["chars"]):
            raise ValueError(f"task.dataset=glyphs draws grey images of {len(spec['chars'])} classes (task.glyphs.chars={spec['chars']!r}): "
                             f"set task.channels=1 and task.num_classes={len(spec['chars'])}")
        return {k: glyph_set(cfg, k, log) for k in ("train", "val", "test")}
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_val = n_test = len(y) // 10
        parts = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
        out = {k: (x[i], y[i]) for k, i in parts.items()}
    else:
        train = _hf_images(cfg, cfg.train_split, cfg.get("train_size"))
        held = _hf_images(cfg, cfg.val_split, cfg.get("val_size"))
        half = len(held[1]) // 2
        out = {"train": train, "val": (held[0][:half], held[1][:half]), "test": (held[0][half:], held[1][half:])}
    size = cfg.image_size
    for k, (x, y) in out.items():
        if x.shape[1] != cfg.channels:
            raise ValueError(f"task.channels={cfg.channels} but the {k} images have {x.shape[1]} channels: set task.channels={x.shape[1]}")
        if x.shape[-1] != size or x.shape[-2] != size:  # e.g. 8x8 digits in a 16x16 UNet
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[k] = (x.clamp(0, 1) * 2 - 1, y)
    return out


def evaluation_sets(cfg, data, log=print) -> dict[str, torch.Tensor]:
    """The real images the rollout metrics compare with (all in [-1, 1]):

    - ``reference``: FD is measured against it;
    - ``floor``: real images the model never saw, scored against ``reference`` in sets of
      ``eval_samples`` like a sample (the mean over the sets is ``fd_floor``): what a perfect
      generator gets at this sample size;
    - ``select_reference``: the reference of ``select_fd`` (checkpoint selection);
    - ``holdout``: real images the model never saw, the memorisation check's yardstick;
    - ``fresh``: other real images the model never saw (not in ``holdout``), which calibrate it.

    Glyphs: each a fresh stream of the generator (reference and select reference of
    ``reference_size`` images, floor of ``FLOOR_DRAWS`` sets of ``eval_samples``, holdout of
    ``train_size``, as large as the training set; fresh is the floor's first set). Digits and
    ``datasets`` sources have no more images than their splits: the reference is the training split
    (as FID on CIFAR-10 is usually computed), the floor the held-out images (test, then val; fewer
    than ``eval_samples`` on digits, so its floor is higher), and select reference and holdout the
    val split, and fresh the test split.
    """
    if cfg.dataset == "glyphs":
        out = {k: glyph_set(cfg, k, log)[0] for k in ("reference", "floor", "select_reference", "holdout")}
        return {**out, "fresh": out["floor"][: cfg.eval_samples]}
    held = torch.cat([data["test"][0], data["val"][0]])[: cfg.eval_samples]
    if len(held) < cfg.eval_samples:
        log(f"note: the floor set has {len(held)} held-out images, fewer than task.eval_samples={cfg.eval_samples}: fd_floor is biased upwards")
    return {"reference": data["train"][0], "floor": held, "select_reference": data["val"][0], "holdout": data["val"][0],
            "fresh": data["test"][0][: cfg.eval_samples]}


def _hf_images(cfg, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    import datasets
    import numpy as np

    if cfg.channels not in (1, 3):
        raise ValueError(f"task.channels={cfg.channels}: images are read as grey (task.channels=1) or RGB (task.channels=3)")
    source = Path(cfg.dataset).expanduser()
    try:
        ds = datasets.load_dataset(str(source) if source.exists() else cfg.dataset, split=split)
    except Exception as err:  # no network, wrong id, missing split: say what to change
        raise FileNotFoundError(f"cannot load image data set {cfg.dataset!r} split {split!r} ({type(err).__name__}: {err}). "
                                f"Use task.dataset=glyphs or task.dataset=digits (embedded), or a local folder in the same format "
                                f"(parquet with columns {cfg.image_column!r} and {cfg.label_column!r}, or an imagefolder)") from None
    for col in (cfg.image_column, cfg.label_column):
        if col not in ds.column_names:
            raise ValueError(f"data set {cfg.dataset!r} has no column {col!r} (columns: {ds.column_names}): set task.image_column / task.label_column")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    images = np.stack([np.asarray(im.convert("RGB" if cfg.channels == 3 else "L")) for im in ds[cfg.image_column]])
    x = torch.from_numpy(images).float().div(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(ds[cfg.label_column], dtype=torch.long)


def build_unet(cfg):
    from diffusers import UNet2DModel

    m = cfg.model
    levels = len(m.channels)
    down = tuple("AttnDownBlock2D" if i in m.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if levels - 1 - i in m.attention_levels else "UpBlock2D" for i in range(levels))
    if cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"task.image_size={cfg.image_size} must be divisible by 2^{levels - 1} for {levels} UNet levels")
    return UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
                       block_out_channels=tuple(m.channels), down_block_types=down, up_block_types=up,
                       layers_per_block=m.layers_per_block, norm_num_groups=m.norm_groups,
                       attention_head_dim=m.head_dim, num_class_embeds=cfg.num_classes + 1)  # + the null class


class FlowMatching(Task):
    """The task (see the module docstring)."""

    metric = "fd"
    higher_is_better = False
    val_loss_label = "flow-matching loss (velocity MSE per pixel)"
    metric_label = "Frechet distance in classifier features"
    horizon_label = "ODE steps"

    def __init__(self, cfg, seed: int, device: torch.device):
        for s in cfg.solvers:
            if s not in SOLVERS:
                raise ValueError(f"unknown ODE solver {s!r} in task.solvers: choose from {', '.join(SOLVERS)}")
        self.grid = [(s, k) for s in cfg.solvers for k in (cfg.get("solver_steps") or {}).get(s, cfg.ode_steps)]
        if (cfg.headline_solver, cfg.headline_steps) not in self.grid:
            raise ValueError(f"task.headline_solver={cfg.headline_solver} / headline_steps={cfg.headline_steps} must be "
                             f"among task.solvers={list(cfg.solvers)} / task.ode_steps={list(cfg.ode_steps)} (or its task.solver_steps)")
        self.cfg, self.seed, self.device = cfg, seed, device
        self.data = load_images(cfg)
        self.null_class = cfg.num_classes
        self.classifier, self.classifier_accuracy = feature_classifier(cfg, self.data, device)
        sets = evaluation_sets(cfg, self.data)
        self.fd = FrechetDistance(self.classifier, sets["reference"])
        floors = sets["floor"].split(cfg.eval_samples)  # what real images of the sample's size score: the bar to read FD against
        self.fd_floor = sum(map(self.fd, floors)) / len(floors)
        self.select_fd = FrechetDistance(self.classifier, sets["select_reference"])
        m = cfg.get("memorisation") or {}
        self.memorisation = MemorisationCheck(self.data["train"][0], sets["holdout"], sets["fresh"], device,
                                              m.get("quantile", 0.05), m.get("flag_fraction", 0.2))
        self.inception = inception_fd(cfg.inception_weights, sets["reference"]) if cfg.get("inception_weights") else None
        self.inception_floor = sum(map(self.inception, floors)) / len(floors) if self.inception is not None else None
        # Validation: held-out images, each with `val_draws` fixed (noise, t) pairs; identical in every run.
        g = torch.Generator().manual_seed(12345)
        xv, yv = self.data["val"]
        xv, yv = xv.repeat(cfg.val_draws, 1, 1, 1), yv.repeat(cfg.val_draws)
        self.val = (xv, yv, torch.randn(xv.shape, generator=g), torch.rand(len(yv), generator=g))
        # Rollout: fixed initial noise and balanced labels, the same for every run and solver.
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        n = cfg.eval_samples
        self.eval_labels = torch.arange(n) % cfg.num_classes
        self.eval_noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(777))
        # Checkpoint selection: other noise (and another reference set), so best_* is not chosen on what it reports.
        n = cfg.get("select_samples") or cfg.eval_samples
        self.select_labels = torch.arange(n) % cfg.num_classes
        self.select_noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(4_242))
        torch.manual_seed(seed)
        self.model = build_unet(cfg).to(device)

    def train_batch(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x, y = self.data["train"]
        idx = torch.randint(0, len(y), (self.cfg.batch_size,), generator=g)
        labels = y[idx].clone()
        labels[torch.rand(len(idx), generator=g) < self.cfg.label_dropout] = self.null_class
        noise = torch.randn(x[idx].shape, generator=g)
        return tuple(t.to(self.device) for t in (x[idx], labels, noise, torch.rand(len(idx), generator=g)))

    def val_batches(self):
        b = self.cfg.eval_batch_size
        for i in range(0, len(self.val[1]), b):
            yield tuple(t[i : i + b].to(self.device) for t in self.val)

    def velocity(self, model, x, t, labels):
        # diffusers' sinusoidal time embedding is laid out for timesteps in [0, 1000].
        return model(x, t * 1000, class_labels=labels).sample

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        image, labels, noise, t = batch
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * noise + tt * image
        return F.mse_loss(self.velocity(model, x_t, t, labels), image - noise)

    @torch.no_grad()
    def sample(self, model, noise, labels, solver: str, steps: int) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 on a uniform grid of ``steps`` steps
        (torchdiffeq's fixed-grid solvers; diffusers' flow-matching schedulers use a non-uniform
        grid and have no midpoint method). With ``guidance != 1``: classifier-free guidance."""
        from torchdiffeq import odeint

        w, null = self.cfg.guidance, torch.full_like(labels, self.null_class)

        def field(t, x):
            tb = t.expand(len(x))
            if w == 1.0:
                return self.velocity(model, x, tb, labels)
            v = self.velocity(model, torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([labels, null]))
            cond, uncond = v.chunk(2)
            return uncond + w * (cond - uncond)

        grid = torch.linspace(0, 1, steps + 1, device=noise.device)
        return odeint(field, noise, grid, method=solver)[-1].clamp(-1, 1)

    def generate(self, model, solver: str, steps: int, noise=None, labels=None) -> torch.Tensor:
        noise = self.eval_noise if noise is None else noise
        labels = self.eval_labels if labels is None else labels
        b = self.cfg.eval_batch_size
        return torch.cat([self.sample(model, noise[i : i + b].to(self.device), labels[i : i + b].to(self.device), solver, steps).cpu()
                          for i in range(0, len(labels), b)])

    @torch.no_grad()
    def light_evaluate(self, model: nn.Module) -> EvalResult:
        """The budget axis's cheaper point: FD of the headline solver and step count against the reference set (the same
        noise and labels for every optimizer), without select_fd, class accuracy or the memorisation check."""
        with eval_mode(model):
            fd = self.fd(self.generate(model, self.cfg.headline_solver, self.cfg.headline_steps))
        return EvalResult({"fd": fd, "fd_floor": self.fd_floor})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = True) -> EvalResult:
        """FD, class accuracy (and Inception FID) per solver and step count, the memorisation check on
        the headline samples, select_fd. Before the run's last evaluation only the headline point
        unless ``task.grid_every_rollout`` (fd_* per solver and steps are reported from the last one)."""
        with eval_mode(model):
            out = {}
            head = (self.cfg.headline_solver, self.cfg.headline_steps)
            for solver, steps in self.grid if final or self.cfg.get("grid_every_rollout") else [head]:
                images = self.generate(model, solver, steps)
                tag = f"{solver}_{steps}"
                out[f"fd_{tag}"] = self.fd(images)
                out[f"class_accuracy_{tag}"] = classifier_accuracy(self.classifier, images, self.eval_labels, self.device)
                if self.inception is not None:
                    out[f"fid_inception_{tag}"] = self.inception(images)
                if (solver, steps) == head:
                    out.update(self.memorisation(images))  # the headline samples: copies of training images?
            tag = "_".join(map(str, head))
            out["fd"], out["class_accuracy"] = out[f"fd_{tag}"], out[f"class_accuracy_{tag}"]
            out["fd_floor"] = self.fd_floor
            out["fd_over_floor"] = out["fd"] / max(self.fd_floor, 1e-12)
            if self.inception is not None:
                out["fid_inception_floor"] = self.inception_floor
            out["select_fd"] = self.select_fd(self.generate(model, *head, self.select_noise, self.select_labels))
            out["classifier_test_accuracy"] = self.classifier_accuracy
        return EvalResult(out)

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        """``samples.npy``: a (classes x 8) grid of samples at the headline solver and step count,
        uint8 in [0, 255], N x C x H x W (scripts/report.py draws it)."""
        import io

        import numpy as np

        with eval_mode(model):
            k = self.cfg.num_classes
            labels = torch.arange(k).repeat_interleave(8)
            noise = torch.randn((len(labels), self.cfg.channels, self.cfg.image_size, self.cfg.image_size),
                                generator=torch.Generator().manual_seed(778))
            images = self.generate(model, self.cfg.headline_solver, self.cfg.headline_steps, noise, labels)
        buf = io.BytesIO()
        np.save(buf, ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
        atomic_write_bytes(Path(run_dir) / "samples.npy", buf.getvalue())


def check_settings(cfg) -> None:
    """Sizes, and the image size and widths the UNet can take, before any data or classifier is made."""
    check_sizes(cfg, {"batch_size": 1, "eval_batch_size": 1, "train_size": 1, "val_size": 1, "reference_size": 1, "eval_samples": 1,
                      "select_samples": 1, "val_draws": 1, "image_size": 1, "channels": 1, "num_classes": 1, "ode_steps": 1,
                      "headline_steps": 1, "classifier.width": 1, "classifier.num_features": 1, "classifier.epochs": 1,
                      "classifier.batch_size": 1, "model.channels": 1, "model.layers_per_block": 1, "model.norm_groups": 1,
                      "model.head_dim": 1, **{f"solver_steps.{s}": 1 for s in (cfg.get("solver_steps") or {})}},
                nullable=("train_size", "val_size", "select_samples"))
    m = cfg.model
    levels = len(m.channels)
    if cfg.image_size % 2 ** (levels - 1):
        raise ValueError(f"task.image_size={cfg.image_size} must be divisible by 2^{levels - 1} (the UNet halves it {levels - 1} times, "
                         f"task.model.channels has {levels} levels): change task.image_size or task.model.channels")
    if any(c % m.norm_groups for c in m.channels):
        raise ValueError(f"task.model.channels={list(m.channels)}: each must be a multiple of task.model.norm_groups={m.norm_groups} (GroupNorm)")
    if any(m.channels[i] % m.head_dim for i in m.attention_levels if i < levels):
        raise ValueError(f"task.model.channels at task.model.attention_levels={list(m.attention_levels)} must be multiples of "
                         f"task.model.head_dim={m.head_dim} (whole attention heads)")


def build(cfg, seed: int, device: torch.device):
    check_settings(cfg)
    return FlowMatching(cfg, seed, device)
