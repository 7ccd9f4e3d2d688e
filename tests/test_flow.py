"""The flow-matching task: the glyph generator is deterministic, the Frechet distance is honest
and read against its floor, the memorisation check catches copies, the ODE solvers are the methods
they claim to be, the data paths load, and the real entry point runs (subprocess, smoke scale)."""

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.tasks import flow, flow_metrics
from test_experiments import rows, train

ROOT = Path(__file__).resolve().parents[1]


def task_cfg(tmp_path, scale="cpu", *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=flow", f"scale={scale}", f"task.data_dir={tmp_path}", *overrides])
    return cfg.task


# Small enough for seconds: 4000 training glyphs, a 2000-image reference, samples of 500, and a
# narrow classifier trained for 250 steps (test accuracy ~0.45; 0.99 at scale=cpu's settings).
SMALL = ("task.train_size=4000", "task.val_size=500", "task.reference_size=2000", "task.eval_samples=500",
         "task.classifier.epochs=4", "task.classifier.batch_size=64", "task.classifier.width=16")


@pytest.fixture(scope="module")
def glyph_fd(tmp_path_factory):
    """A small glyph data set, its feature classifier (trained once here, a few seconds), the
    evaluation sets and the FD against the fresh reference."""
    cfg = task_cfg(tmp_path_factory.mktemp("flow"), "cpu", *SMALL)
    data = flow.load_images(cfg)
    net, acc = flow_metrics.feature_classifier(cfg, data, torch.device("cpu"))
    sets = flow.evaluation_sets(cfg, data)
    return data, net, acc, flow_metrics.FrechetDistance(net, sets["reference"]), cfg, sets


def frechet_formula(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64 with scipy's sqrtm."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_glyphs_are_deterministic_for_a_seed_and_differ_across_seeds(tmp_path):
    from experiments.tasks import glyphs

    spec = glyphs.spec_of({})
    x, y = glyphs.generate(spec, 300, 11, 16)
    assert x.dtype == torch.uint8 and x.shape == (300, 1, 16, 16) and int(x.max()) > 150 and int(x[:, :, 0, :].max()) < 255
    assert set(y.tolist()) == set(range(10))
    x2, y2 = glyphs.generate(spec, 300, 11, 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = glyphs.generate(spec, 300, 12, 16)  # another stream
    x4, _ = glyphs.generate(glyphs.spec_of({"seed": 1}), 300, 11, 16)  # the same stream of another spec
    for other in (x3, x4):
        assert not torch.equal(x, other)
        assert float(glyphs.to_float(x).sub(glyphs.to_float(other)).abs().mean()) > 0.1
    # no two images of a stream are the same, and the cache returns what generate() makes
    assert len({img.numpy().tobytes() for img in x}) == 300
    cached_x, cached_y = glyphs.cached(spec, 300, 11, 16, tmp_path, log=lambda *_: None)
    again_x, _ = glyphs.cached(spec, 300, 11, 16, tmp_path, log=lambda *_: None)
    assert torch.equal(cached_x, x) and torch.equal(cached_y, y) and torch.equal(again_x, x)
    assert len(list(tmp_path.glob("glyphs-*.pt"))) == 1
    with pytest.raises(ValueError, match="task.glyphs.colour"):
        glyphs.spec_of({"colour": 1})


def test_glyph_sets_are_disjoint_streams(glyph_fd):
    data, _, _, _, cfg, sets = glyph_fd
    assert {k: len(v[1]) for k, v in data.items()} == {"train": 4000, "val": 500, "test": 500}
    assert sets["reference"].shape == (2000, 1, 16, 16) and sets["holdout"].shape == (4000, 1, 16, 16)
    assert len(sets["floor"]) == flow.FLOOR_DRAWS * 500 and torch.equal(sets["fresh"], sets["floor"][:500])
    x = torch.cat([data["train"][0], data["val"][0], sets["reference"], sets["floor"], sets["select_reference"], sets["holdout"]])
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    assert len({img.numpy().tobytes() for img in x}) == len(x)  # no image in two sets (nor twice in one)


def test_digits_remain_available(tmp_path):
    data = flow.load_images(task_cfg(tmp_path, "cpu", "task.dataset=digits", "task.image_size=8"))
    sizes = {k: len(v[1]) for k, v in data.items()}
    assert sizes == {"train": 1439, "val": 179, "test": 179}
    x = torch.cat([v[0] for v in data.values()])
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    # no image appears in two splits (digits has a few exact duplicates overall; compare index sets instead)
    flat = {k: {tuple(img.flatten().tolist()) for img in v[0]} for k, v in data.items()}
    assert len(flat["val"] & flat["test"]) <= 2 and len(flat["train"] & flat["val"]) <= 2
    sets = flow.evaluation_sets(task_cfg(tmp_path, "cpu", "task.dataset=digits", "task.image_size=8"), data, log=lambda *_: None)
    assert torch.equal(sets["reference"], data["train"][0]) and len(sets["floor"]) == 358  # all held-out digits
    with pytest.raises(ValueError, match="task.num_classes=10"):
        flow.load_images(task_cfg(tmp_path, "cpu", "task.num_classes=26"))


def test_feature_classifier_is_accurate_and_cached(glyph_fd):
    data, net, acc, _, cfg, _ = glyph_fd
    assert acc > 0.3, f"the FD feature network must recognise fresh glyphs (chance: 0.1), got test accuracy {acc}"
    assert flow_metrics.classifier_path(cfg).is_file()
    said = []
    again, acc_again = flow_metrics.feature_classifier(cfg, data, torch.device("cpu"), log=said.append)
    assert acc_again == acc and not any("training" in s for s in said), said  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    # the cache is keyed by the data: another glyph seed is another classifier
    assert flow_metrics.classifier_path(cfg) != flow_metrics.classifier_path(task_cfg(cfg.data_dir, "cpu", *SMALL, "+task.glyphs.seed=1"))


def test_feature_classifier_trains_on_one_thread_whatever_the_caller_uses(glyph_fd, monkeypatch):
    # Its weights (and so every FD) depend on the thread count; the first process to need it trains it.
    data, _, _, _, cfg, _ = glyph_fd
    seen = []
    logits = flow_metrics.FeatureClassifier.logits
    monkeypatch.setattr(flow_metrics.FeatureClassifier, "logits", lambda self, x: seen.append(torch.get_num_threads()) or logits(self, x))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        flow_metrics.train_feature_classifier(cfg, data, torch.device("cpu"))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    # a classifier trained before this rule is not reused: the cache key names the trainer
    path = flow_metrics.classifier_path(cfg)
    monkeypatch.setattr(flow_metrics, "CLASSIFIER_TRAINER", flow_metrics.CLASSIFIER_TRAINER - 1)
    assert flow_metrics.classifier_path(cfg) != path


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU features: a singular covariance, still a valid FD
def test_frechet_distance_matches_the_formula_and_is_honest(glyph_fd):
    data, net, _, fd, _, sets = glyph_fd
    reference, floors = sets["reference"], sets["floor"].split(500)
    fresh = data["test"][0]  # 500 images of another stream, like one sample
    with torch.no_grad():
        f_ref, f_fresh = net(reference).double().numpy(), net(fresh).double().numpy()
    ours = fd(fresh)
    assert math.isclose(ours, frechet_formula(f_ref, f_fresh), rel_tol=1e-3, abs_tol=1e-3)
    assert abs(fd(reference)) < 1e-3  # identical inputs: ~0
    floor = sum(map(fd, floors)) / len(floors)
    assert ours < 2 * floor, (ours, floor)  # a fresh set is at the floor
    assert fd(data["train"][0][:500]) < 2 * floor  # so are training images: the reference is not them
    noised = (fresh + 0.3 * torch.randn(fresh.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(fresh, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noise = torch.rand(fresh.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for name, bad in (("noised", noised), ("blurred", blurred), ("noise", noise)):
        assert fd(bad) > 10 * floor, (name, fd(bad), floor)


def test_memorisation_check_flags_a_model_that_returns_training_images(glyph_fd):
    data, _, _, _, _, sets = glyph_fd
    check = flow_metrics.MemorisationCheck(data["train"][0], sets["holdout"], sets["fresh"], torch.device("cpu"))
    train = data["train"][0]
    copies = check(train[:500])
    assert copies["memorised_fraction"] == 1.0 and copies["memorisation_flag"] == 1.0 and copies["memorisation_ratio"] < 0.05, copies
    # copies with a little noise are still copies
    g = torch.Generator().manual_seed(0)
    near = (train[500:1000] + 0.05 * torch.randn(train[500:1000].shape, generator=g)).clamp(-1, 1)
    assert check(near)["memorisation_flag"] == 1.0, check(near)
    # fresh images (another stream), blurred fresh images and half copies
    fresh = check(data["test"][0])
    assert fresh["memorisation_flag"] == 0.0 and fresh["memorised_fraction"] < 0.15 and 0.85 < fresh["memorisation_ratio"] < 1.15, fresh
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(data["test"][0], (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert check(blurred)["memorisation_flag"] == 0.0, check(blurred)  # blur is not memorisation
    half = check(torch.cat([train[:250], data["test"][0][:250]]))
    assert half["memorisation_flag"] == 1.0 and 0.4 < half["memorised_fraction"] < 0.7, half


def _sampler(field, guidance=1.0, null_class=10):
    """A FlowMatching stand-in whose velocity is ``field(x, t, labels)``, to test sample() alone."""
    task = object.__new__(flow.FlowMatching)
    task.cfg = types.SimpleNamespace(guidance=guidance)
    task.null_class = null_class
    task.velocity = lambda model, x, t, labels: field(x, t, labels)
    return task


@pytest.mark.parametrize("steps", [1, 2, 4, 16])
def test_ode_solvers_are_the_fixed_grid_methods(steps):
    # dx/dt = -x from t=0 to 1 on a uniform grid of h = 1/steps: one step multiplies by
    # (1 - h) for Euler and by (1 - h + h^2/2) for the midpoint method.
    task = _sampler(lambda x, t, labels: -x)
    x0 = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.long)
    h = 1.0 / steps
    euler = task.sample(None, x0, labels, "euler", steps)
    midpoint = task.sample(None, x0, labels, "midpoint", steps)
    torch.testing.assert_close(euler, x0 * (1 - h) ** steps)
    torch.testing.assert_close(midpoint, x0 * (1 - h + h * h / 2) ** steps)


def test_time_grid_runs_from_noise_to_data():
    # dx/dt = t: x(1) = x(0) + 1/2 exactly for midpoint; Euler on N steps gives x0 + (N-1)/(2N).
    task = _sampler(lambda x, t, labels: t.view(-1, 1, 1, 1).expand_as(x).to(x.dtype))
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64) - 0.9
    labels = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(task.sample(None, x0, labels, "midpoint", 4), x0 + 0.5)
    torch.testing.assert_close(task.sample(None, x0, labels, "euler", 4), x0 + 3 / 8)


def test_classifier_free_guidance_extrapolates_from_the_null_class():
    # velocity = label value (constant in x, t): guided velocity = u + w (c - u), u from the null class.
    task = _sampler(lambda x, t, labels: labels.view(-1, 1, 1, 1).to(x.dtype).expand_as(x), guidance=3.0, null_class=10)
    x0 = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    labels = torch.tensor([2, 7])
    out = task.sample(None, x0, labels, "euler", 1)  # one unit-length step: x1 = x0 + v
    expected = (10 + 3.0 * (labels - 10)).double().clamp(-1, 1)  # samples are clamped to the image range
    torch.testing.assert_close(out.flatten(), expected)


def test_the_training_loss_is_the_velocity_regression(tmp_path):
    cfg = task_cfg(tmp_path, "smoke")
    task = flow.FlowMatching(cfg, 0, torch.device("cpu"))
    image, labels, noise, t = task.train_batch(0)
    seen = {}

    class Probe(torch.nn.Module):  # records what the loss feeds the network
        def forward(self, x, timestep, class_labels):
            seen.update(x=x, timestep=timestep, labels=class_labels)
            return types.SimpleNamespace(sample=torch.zeros_like(x))

    loss = task.loss(Probe(), (image, labels, noise, t))
    torch.testing.assert_close(seen["x"], (1 - t.view(-1, 1, 1, 1)) * noise + t.view(-1, 1, 1, 1) * image)
    torch.testing.assert_close(seen["timestep"], t * 1000)
    torch.testing.assert_close(loss, ((image - noise) ** 2).mean())
    # the same step gives the same batch (resume), another step another one
    assert all(torch.equal(a, b) for a, b in zip(task.train_batch(0), (image, labels, noise, t)))
    assert not torch.equal(task.train_batch(1)[0], image)
    dropped = torch.cat([task.train_batch(s)[1] for s in range(50)])
    assert 0.03 < float((dropped == cfg.num_classes).float().mean()) < 0.2  # label_dropout=0.1 -> null class


def _cifar_like_fixture(folder: Path, n_train=12, n_test=8, size=32):
    """A tiny data set in the hub's CIFAR-10 layout: parquet files with an Image column ``img``
    and an int ``label``, one file per split (written independently of the loader)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "plain_text").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": list(range(n))},
                                        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}))
        ds.to_parquet(str(folder / "plain_text" / f"{split}-00000-of-00001.parquet"))
    return pixels


def test_cifar_format_loads_from_a_local_folder(tmp_path):
    last_test_pixels = _cifar_like_fixture(tmp_path / "cifar")
    cfg = task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'cifar'}", "task.channels=3", "task.image_size=32")
    data = flow.load_images(cfg)
    assert {k: v[0].shape for k, v in data.items()} == {"train": (12, 3, 32, 32), "val": (4, 3, 32, 32), "test": (4, 3, 32, 32)}
    assert data["train"][1].tolist() == list(range(12)) and data["test"][1].tolist() == [4, 5, 6, 7]
    expected = torch.from_numpy(last_test_pixels[4:]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(data["test"][0], expected)
    # resized to the UNet's size when they differ
    small = flow.load_images(task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'cifar'}", "task.channels=3", "task.image_size=16"))
    assert small["train"][0].shape == (12, 3, 16, 16)


def test_data_errors_name_the_fix(tmp_path):
    _cifar_like_fixture(tmp_path / "cifar")
    with pytest.raises(ValueError, match="task.channels=3"):
        flow.load_images(task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'cifar'}", "task.channels=2"))
    grey = flow.load_images(task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'cifar'}", "task.image_size=32"))
    assert grey["train"][0].shape == (12, 1, 32, 32)  # channels=1 reads RGB data as grey
    with pytest.raises(ValueError, match="task.image_column"):
        flow.load_images(task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'cifar'}", "task.channels=3", "task.image_column=image"))
    with pytest.raises(FileNotFoundError, match="task.dataset=digits"):
        flow.load_images(task_cfg(tmp_path, "cpu", f"task.dataset={tmp_path / 'nowhere'}", "task.channels=3"))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        flow_metrics.inception_fd(str(tmp_path / "missing.pth"), torch.zeros(2, 1, 8, 8))


def test_smoke_run_of_the_entry_point(tmp_path):
    run = tmp_path / "run"
    train("task=flow", "optimizer=dopr_adamw", f"task.data_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", "trainer.rollout_every=3",
          "task.solver_steps={midpoint:[1]}", "trainer.light_rollout_every=2")
    summary = json.loads((run / "summary.json").read_text())
    light = [r for r in rows(run) if r.get("light")]  # steps 2 and 4 (6 is a full rollout's): the headline FD alone
    assert [r["step"] for r in light] == [2, 4] and all(set(r) >= {"fd", "fd_floor"} and "select_fd" not in r for r in light)
    assert all(math.isfinite(r["fd"]) and r["fd"] >= 0 for r in light)
    first, last = [r for r in rows(run) if "fd" in r and not r.get("light")]
    # before the last rollout only the headline point (and the selection set): the grid comes from the last
    assert first["step"] == 3 and "fd_euler_2" in first and "select_fd" in first and "fd_midpoint_1" not in first
    assert last["step"] == 6 and {"fd_euler_1", "fd_euler_2", "fd_midpoint_1"} <= set(last) and "fd_midpoint_2" not in last  # solver_steps
    assert summary["status"] == "done" and summary["metric_name"] == "fd" and summary["higher_is_better"] is False
    final = summary["final"]
    assert {"fd_euler_1", "fd_euler_2", "fd_midpoint_1"} <= set(final)
    assert all(math.isfinite(final[k]) and final[k] >= 0 for k in final if k.startswith("fd") or k.startswith("select_fd"))
    assert 0 <= final["class_accuracy"] <= 1 and final["fd_floor"] > 0
    assert final["fd_over_floor"] == pytest.approx(final["fd"] / final["fd_floor"])
    assert {"memorisation_ratio", "memorised_fraction", "memorisation_flag", "select_fd"} <= set(final)
    assert summary["best"]["chosen_on"] == "selection set"  # select_fd, not the reported fd, picks the best checkpoint
    samples = np.load(run / "samples.npy")
    assert samples.shape == (80, 1, 16, 16) and samples.dtype == np.uint8
    coverage = next(r["ap_coverage"] for r in rows(run) if "ap_coverage" in r)
    covered = {k for k, v in coverage.items() if v.startswith("covered")}
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "class_embedding"} <= covered
    assert any(k.endswith("attentions.0.to_q") for k in covered) and any(k.endswith("resnets.0.conv1") for k in covered)
    assert any(k.endswith("attentions.0.to_out.0") for k in covered)
    import torch.nn as nn

    from experiments.tasks.flow import build_unet
    unet = build_unet(task_cfg(tmp_path, "smoke"))
    convs = {n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert convs <= covered, f"Conv2d/Linear layers left to the GP alone: {convs - covered}"
    # scripts/fd_noise.py on this run: the task's own evaluation noise gives the reported FD back; other noise seeds differ
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/fd_noise.py", str(run), "--draws", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    noise = json.loads((run / "fd_noise.json").read_text())
    assert noise["own_noise_fd"] == pytest.approx(final["fd"], rel=1e-9) and len(noise["draws"]["fd"]) == 2
    assert noise["draws"]["fd"][0] != noise["draws"]["fd"][1] and "2 draws, mean" in out.stdout


@pytest.mark.slow  # two entry-point runs: keeps `make test` under 10 minutes; .ci/run runs it
def test_bf16_autocast_trains_the_flow_task_through_the_entry_point(tmp_path):
    # trainer.precision=bf16 (the paper-scale option for CIFAR-10) runs the UNet's forward under autocast: the
    # same seed's training losses move off the fp32 run's, stay close to them, and the rollout stays finite.
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        train("task=flow", "optimizer=dopr_adamw", f"trainer.precision={precision}", f"task.data_dir={tmp_path / 'cache'}",
              f"hydra.run.dir={run}", "logger=none")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "done" and math.isfinite(summary["final"]["val_loss"]) and math.isfinite(summary["final"]["fd"])
        losses[precision] = [r["train_loss"] for r in rows(run) if "train_loss" in r]
    assert losses["fp32"] != losses["bf16"]  # autocast was in effect
    assert all(abs(a - b) < 0.1 * abs(a) for a, b in zip(losses["fp32"], losses["bf16"]))
