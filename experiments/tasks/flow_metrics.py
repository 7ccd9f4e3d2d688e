"""The flow task's instrument: the feature classifier whose penultimate features the Frechet distance (FD) is
measured in, FD itself (torchmetrics' FID with that network as the feature extractor; Inception where its weights
are on disk) and the memorisation check. Split from flow.py (the task) so each reads in one sitting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_checkpoint, save_checkpoint
from . import glyphs
from .base import one_thread

# ------------------------------------------------------------------ feature network for FD
class FeatureClassifier(nn.Module):
    """A small CNN classifier; its penultimate activations are the features of the Frechet
    distance. ``forward`` returns those features (what torchmetrics' FID calls), ``logits`` the
    class scores."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, num_features: int = 64):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of a dummy forward pass
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# Bumped when the way the classifier is trained changes its weights, so that cached ones are retrained
# (2: always on one thread).
CLASSIFIER_TRAINER = 2


def classifier_path(cfg) -> Path:
    """Cache file of the feature classifier: keyed by everything that changes it."""
    key = {k: cfg[k] for k in ("dataset", "train_split", "val_split", "train_size", "val_size", "image_size", "channels", "num_classes") if k in cfg}
    key["classifier"] = dict(cfg.classifier)
    key["trainer"] = CLASSIFIER_TRAINER
    if cfg.dataset == "glyphs":  # the generator's settings and version make the data
        key["glyphs"] = {"spec": glyphs.spec_of(cfg.get("glyphs")), "version": glyphs.VERSION}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(cfg.data_dir).expanduser() / f"feature_classifier-{digest}.pt"


def train_feature_classifier(cfg, data, device, log=print) -> tuple[FeatureClassifier, float]:
    """Train the FD feature network on the training split (fixed seed, Adam, light shift
    augmentation) and return it with its test accuracy. On one CPU thread whatever the caller's
    count: its float sums, hence its weights and every FD measured with it, depend on the thread count
    (on this project's machine one thread gave test accuracy 0.986 and two 0.978, and headline FD means
    of the same trained models 2.8-3.6 apart: docs/tasks/flow.md),
    and the first process to need it trains it (a one-thread run, a test, a script)."""
    with one_thread():
        return _train_feature_classifier(cfg, data, device, log)


def _train_feature_classifier(cfg, data, device, log) -> tuple[FeatureClassifier, float]:
    c = cfg.classifier
    g = torch.Generator().manual_seed(c.seed)
    torch.manual_seed(c.seed)
    net = FeatureClassifier(cfg.channels, cfg.num_classes, c.width, c.num_features).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=c.lr)
    x, y = data["train"]
    steps_per_epoch = max(1, len(y) // c.batch_size)
    for epoch in range(c.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * c.batch_size : (i + 1) * c.batch_size]
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 pixel translations
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net.logits(xb.to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % max(1, c.epochs // 5) == 0:
            log(f"  feature classifier epoch {epoch + 1}/{c.epochs} loss {loss.item():.4f}")
    return net.eval(), classifier_accuracy(net, *data["test"], device)


@torch.no_grad()
def classifier_accuracy(net: FeatureClassifier, x: torch.Tensor, y: torch.Tensor, device) -> float:
    pred = torch.cat([net.logits(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(y), 512)])
    return float((pred == y).float().mean())


def feature_classifier(cfg, data, device, retrain: bool = False, log=print) -> tuple[FeatureClassifier, float]:
    """The cached feature network (trained on first use; ``retrain`` forces it)."""
    path = classifier_path(cfg)
    state = None if retrain else load_checkpoint(path, device)
    if state is None:
        log(f"training the FD feature classifier (once; cached at {path})")
        net, acc = train_feature_classifier(cfg, data, device, log)
        save_checkpoint(path, {"model": net.state_dict(), "test_accuracy": acc})
    else:
        net = FeatureClassifier(cfg.channels, cfg.num_classes, cfg.classifier.width, cfg.classifier.num_features).to(device)
        net.load_state_dict(state["model"])
        acc = state["test_accuracy"]
    log(f"FD feature classifier: test accuracy {acc:.4f} ({path})")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), acc


class FrechetDistance:
    """Frechet distance to a fixed set of real images in a given feature network, computed by
    torchmetrics' FID (real statistics accumulated once, generated ones reset per call)."""

    def __init__(self, feature_net: nn.Module, real: torch.Tensor, batch: int = 500, to_input=None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.to_input = to_input or (lambda x: x)
        self.batch = batch
        # sync_on_compute=False: only the first DDP process evaluates; a cross-process sync would wait forever
        self.metric = FrechetInceptionDistance(feature=feature_net, reset_real_features=False, sync_on_compute=False)
        device = next(feature_net.parameters()).device
        self.metric.to(device)
        for i in range(0, len(real), batch):
            self.metric.update(self.to_input(real[i : i + batch].to(device)), real=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        self.metric.reset()
        device = self.metric.real_features_sum.device
        for i in range(0, len(images), self.batch):
            self.metric.update(self.to_input(images[i : i + self.batch].to(device)), real=False)
        return float(self.metric.compute())


def inception_fd(weights: str, real: torch.Tensor) -> FrechetDistance:
    """Real Inception FID (torch-fidelity's Inception v3 through torchmetrics) from weights on disk
    (no download): images go in as 3-channel floats in [0, 1]."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task.inception_weights={weights}: no such file. Point it at torch-fidelity's "
                                "pt_inception-2015-12-05 weights on disk, or set task.inception_weights=null")
    from torchmetrics.image.fid import FrechetInceptionDistance

    class _Wrapped(nn.Module):  # reuse FrechetDistance's batching with Inception's own input rule
        def __init__(self):
            super().__init__()
            self.inner = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path)).inception
            self.num_features = 2048

        def forward(self, x):
            return self.inner(x)

    def to_input(x):  # [-1, 1] -> [0, 1] uint8 as Inception expects, grey -> RGB
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    return FrechetDistance(_Wrapped(), real, to_input=to_input)


# ------------------------------------------------------------------------- memorisation check
@torch.no_grad()
def nearest_distance(x: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance (pixels, flattened) from each image of ``x`` to its nearest image in
    ``bank`` (both on one device), by ||a||^2 - 2 a.b + ||b||^2 in chunks of the bank."""
    a = x.flatten(1).float()
    a2 = (a * a).sum(1, keepdim=True)
    best = torch.full((len(a),), float("inf"), device=a.device)
    for i in range(0, len(bank), chunk):
        b = bank[i : i + chunk].flatten(1).float()
        best = torch.minimum(best, (a2 - 2 * a @ b.T + (b * b).sum(1)).min(1).values)
    return best.clamp_min(0).sqrt()


class MemorisationCheck:
    """Does the model return its training images? For each image, r = (distance to its nearest
    training image) / (distance to its nearest holdout image): the holdout is real data of the same
    distribution the model never saw, so an image that generalises is about as close to either
    (r near 1 when both sets have the same size), a copy of a training image has r near 0, and a
    blurred or averaged sample is near both (it is not mistaken for a copy, as a plain nearest-
    neighbour distance would). Calibrated on ``fresh`` real images:

    - ``memorisation_ratio``: median r of the samples / median r of fresh images (1: as fresh
      data; towards 0: copies);
    - ``memorised_fraction``: the fraction of samples with r below the ``quantile`` of fresh
      images' r (``quantile`` for fresh data, 1 for a model that copies);
    - ``memorisation_flag``: 1 when ``memorised_fraction`` exceeds ``flag_fraction``.
    """

    def __init__(self, train: torch.Tensor, holdout: torch.Tensor, fresh: torch.Tensor, device, quantile: float = 0.05,
                 flag_fraction: float = 0.2):
        self.device, self.flag_fraction = device, flag_fraction
        self.train, self.holdout = train.flatten(1).to(device), holdout.flatten(1).to(device)
        r = self.ratios(fresh)
        self.fresh_median, self.threshold = float(r.median()), float(torch.quantile(r, quantile))

    def ratios(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        out = []
        for i in range(0, len(images), chunk):
            x = images[i : i + chunk].to(self.device)
            out.append((nearest_distance(x, self.train) / nearest_distance(x, self.holdout).clamp_min(1e-6)).cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        r = self.ratios(images)
        frac = float((r < self.threshold).float().mean())
        return {"memorisation_ratio": float(r.median()) / self.fresh_median, "memorised_fraction": frac,
                "memorisation_flag": float(frac > self.flag_fraction)}


# ------------------------------------------------------------------------------------ task
