"""The comparators of issue 48 (docs/comparators.md): SOAP, one-sided Shampoo on the input side, PSGD-Kron. Which
side the one-sided Shampoo preconditions, how each routes every parameter kind, exact resumes through the suite's
checkpoints (weights_only=True), with and without AP; and, in the slow suite, each one through the real entry point."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from pytorch_optimizer import ScalableShampoo
from pytorch_optimizer.optimizer.utils.partition import PreConditionerType

import dopr
from experiments import comparators

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("soap", "shampoo_input", "psgd_kron")


def gradients(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def shampoo_steps(opt, weight, grads):
    for grad in grads:
        weight.grad = grad.to(weight.dtype).clone()
        opt.step()


def test_input_shampoo_statistic_is_the_gram_of_the_gradient_on_the_input_dimension():
    """For a torch Linear weight W (out, in) = (3, 5): S_t = beta2 S_(t-1) + (1 - beta2) G_t^T G_t (in x in), S_0 =
    eps I, against the formula in float64; the step is G S^(-1/2) with the ridge relative to S's largest eigenvalue.
    And the library's own naming, which follows the (in, out) layout of its JAX reference: its OUTPUT mode is this
    statistic, its INPUT mode the (out x out) one, G G^T."""
    beta2, eps, lr = 0.9, 1e-3, 0.1
    layer = nn.Linear(5, 3, bias=False)
    grads = gradients((3, 5), 4)
    opt = comparators.InputShampoo(layer.parameters(), lr=lr, betas=(0.0, beta2), matrix_eps=eps, graft="none", nesterov=False,
                                   preconditioning_compute_steps=1, start_preconditioning_step=1)
    stat = eps * torch.eye(5, dtype=torch.float64)
    for grad in grads:
        before = layer.weight.detach().double().clone()
        shampoo_steps(opt, layer.weight, [grad])
        stat = beta2 * stat + (1 - beta2) * grad.T @ grad
        kept = opt.state[layer.weight]["pre_conditioner"].statistics
        assert torch.allclose(kept.reshape(5, 5).double(), stat, rtol=1e-5, atol=1e-7)
        vals, vecs = torch.linalg.eigh(stat)
        root = vecs @ torch.diag((vals + eps * vals.max()) ** -0.5) @ vecs.T
        step = (before - layer.weight.detach().double()) / lr
        assert torch.allclose(step, grad @ root, rtol=2e-2, atol=2e-2 * float((grad @ root).abs().max()))
    # the same statistic in the state_dict the checkpoint keeps (plain tensors)
    assert torch.allclose(opt.state_dict()["state"][0]["shampoo_statistics"].reshape(5, 5).double(), stat, rtol=1e-5, atol=1e-7)
    # the library's convention: OUTPUT preconditions the last dim of the stored weight, INPUT every other dim
    for kind, expected in ((PreConditionerType.OUTPUT, grads[0].T @ grads[0]), (PreConditionerType.INPUT, grads[0] @ grads[0].T)):
        w = nn.Parameter(torch.zeros(3, 5))
        lib = ScalableShampoo([w], betas=(0.9, 0.0), matrix_eps=0.0, pre_conditioner_type=kind, shape_interpretation=False)
        shampoo_steps(lib, w, grads[:1])
        kept = lib.state[w]["pre_conditioner"].statistics
        assert torch.allclose(kept.reshape(expected.shape).double(), expected, rtol=1e-5, atol=1e-6), kind


def test_input_shampoo_sees_conv_kernels_by_their_fan_in_and_keeps_embeddings_diagonal():
    model = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3), "conv1d": nn.Conv1d(2, 3, 5), "emb": nn.Embedding(7, 4), "norm": nn.LayerNorm(4)})
    cls = comparators.InputShampoo.for_model(model)
    opt = cls(list(model.parameters()), betas=(0.9, 0.0), matrix_eps=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    conv = model["conv"].weight.grad.reshape(6, -1).double()
    kept = opt.state[model["conv"].weight]["pre_conditioner"].statistics
    assert torch.allclose(kept.reshape(36, 36).double(), conv.T @ conv, rtol=1e-5, atol=1e-5)  # (in * 3 * 3)^2: the fan-in
    assert opt.state[model["conv1d"].weight]["pre_conditioner"].statistics.reshape(-1).numel() == 10 * 10
    for p in (model["emb"].weight, model["norm"].weight, model["norm"].bias, model["conv"].bias):
        assert len(opt.state[p]["pre_conditioner"].statistics) == 0  # the grafted diagonal (RMSProp) update only
    assert comparators.InputShampoo.diagonal_only == frozenset()  # the bound class is a subclass; the class is untouched


class Toy(nn.Module):
    """Every parameter kind the tasks have: an embedding, Conv1d and Conv2d kernels, a norm, Linear weights, biases."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv1d, self.conv2d = nn.Embedding(11, 8), nn.Conv1d(8, 6, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 5)

    def forward(self, tokens):
        h = self.conv1d(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2d(h[:, None]).mean(1)
        return self.head(self.norm(h))


def build(name, model, ap):
    from omegaconf import OmegaConf

    import experiments.protocol  # noqa: F401  (${ap_name:...})
    from experiments.engine import build_optimizer

    cfg = OmegaConf.load(ROOT / "configs" / "optimizer" / f"{name}.yaml")
    cfg.ap = ap
    fast = {"soap": {"precondition_frequency": 2}, "shampoo_input": {"preconditioning_compute_steps": 2, "start_preconditioning_step": 2},
            "psgd_kron": {"preconditioner_update_probability": 0.5}}[name]  # every part of the update within a few steps
    cfg.kwargs = {**OmegaConf.to_container(cfg.kwargs), **fast, **({"damping": 1.0} if ap else {})}
    assert cfg.name == ("dopr_" if ap else "") + name
    return build_optimizer(model, cfg, lr=1e-2)


def train(model, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        tokens, target = torch.randint(0, 11, (4, 7), generator=g), torch.randn(4, 7, 5, generator=g)
        ((model(tokens) - target) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("ap", [False, True], ids=["alone", "with_ap"])
@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_trains_and_a_resume_through_a_checkpoint_continues_exactly(name, ap):
    torch.manual_seed(0)
    model = Toy()
    opt = build(name, model, ap)
    inner = opt.base if ap else opt
    owned = [id(p) for g in inner.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters()) and len(set(owned)) == len(owned)  # each once
    assert ({g["weight_decay"] for g in inner.param_groups if any(p.ndim < 2 for p in g["params"])} <= {0.0})  # no decay on 1-D
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, range(5))
    assert all(not torch.equal(a, p) for a, p in zip(start, model.parameters()))  # every parameter moved
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as the suite's checkpoints load: tensors and plain values only
    train(model, opt, range(5, 10))
    again = Toy()
    again.load_state_dict(saved["model"])
    resumed = build(name, again, ap)
    resumed.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])  # PSGD draws noise for its preconditioner fit (the loop restores the RNG too)
    train(again, resumed, range(5, 10))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_psgd_keeps_the_gradient_and_runs_eagerly():
    import heavyball

    layer = nn.Linear(4, 3)
    opt = comparators.PSGDKron(layer.parameters(), preconditioner_update_probability=1)  # an int from a config: a float
    layer(torch.randn(8, 4)).square().mean().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    assert torch.equal(layer.weight.grad, grad) and heavyball.utils.compile_mode is None
    assert isinstance(opt.precond_schedule, float) and "precond_schedule" not in opt.state_dict()["heavyball"]
    # a zero-initialised output layer zeroes the gradients behind it at the first step: those sit it out (heavyball
    # cannot size a preconditioner from a zero gradient) and start at their first nonzero one; their grads are kept
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    nn.init.zeros_(net[2].weight)
    opt = comparators.PSGDKron(net.parameters())
    for step in range(2):
        net(torch.randn(8, 4)).square().mean().backward()
        zero = net[0].weight.grad.abs().max() == 0
        opt.step()
        assert bool(zero) == (step == 0) and net[0].weight.grad is not None and (net[0].weight in opt.state) == (step == 1)
        opt.zero_grad()


@pytest.mark.parametrize("task", ["lm", "lm_lora", "flow", "control", "robot"])
def test_the_comparators_evaluation_runs_on_the_primary_familys_seeds_into_the_headlines_records(task):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import experiments.protocol  # noqa: F401  (${ap_name:...}, as the entry point and scripts/tune.py import it)

    primary = OmegaConf.load(ROOT / "configs" / "experiment" / task / "cpu.yaml").hydra.sweeper.params
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={task}/cpu_comparators", "optimizer=shampoo_input"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    seeds, primary_seeds = str(params.seed).split(","), str(primary.seed).split(",")
    assert len(seeds) >= 5 and seeds == primary_seeds[: len(seeds)], (seeds, primary_seeds)  # the headline's first seeds: paired
    assert params.optimizer.split(",") == list(NAMES)
    assert cfg.results_dir == f"results/{task}/cpu" and cfg.task.name == task and cfg.scale.name == "cpu"
    assert cfg.optimizer.name == "shampoo_input" and cfg.hydra.sweep.dir == f"runs/{task}/cpu_comparators"  # run folders apart
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):  # the same instances and settings as cpu's
        headline = compose("train", overrides=[f"+experiment={task}/cpu", "optimizer=shampoo_input"])
    cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg.pop("hydra")
    assert cfg == OmegaConf.to_container(headline, resolve=False)


def test_the_comparators_tuning_page_joins_the_headline_as_the_primary_tunings_does():
    sys.path.insert(0, str(ROOT / "scripts"))
    import report

    from experiments.reports.tuning import evaluated_by

    results = Path("results") / "lm"
    assert report.kind_and_pages(results / "cpu_tune") == ("tuning", results / "cpu")
    assert report.kind_and_pages(results / "cpu_tune_comparators") == ("tuning", results / "cpu")  # one tuning.md for both
    assert evaluated_by(results / "cpu_tune_comparators") == results / "cpu" and evaluated_by(results / "cpu_tune") == results / "cpu"


@pytest.mark.slow  # 12 entry-point runs at scale=smoke (about 2 minutes): .ci/run runs the slow suite
@pytest.mark.parametrize("name", NAMES)
def test_each_comparator_trains_and_resumes_through_the_entry_point_with_and_without_ap(tmp_path, name):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}

    def run(run_dir, *overrides, fault=None):
        cmd = [sys.executable, "-m", "experiments.train", "task=lm", "scale=smoke", "threads=1", "logger=none", f"optimizer={name}",
               f"hydra.run.dir={run_dir}", *overrides]
        return subprocess.run(cmd, cwd=ROOT, env={**env, **({"DOPR_FAULT": fault} if fault else {})}, capture_output=True, text=True, timeout=600)

    for ap in (False, True):
        label = ("dopr_" if ap else "") + name
        whole, killed = tmp_path / f"{label}-whole", tmp_path / f"{label}-killed"
        out = run(whole, f"optimizer.ap={str(ap).lower()}")
        assert out.returncode == 0, out.stderr[-3000:]
        rec = json.loads((whole / "record.json").read_text())
        assert rec["status"] == "done" and rec["optimizer"] == label and ("ap_coverage" in rec) == ap
        out = run(killed, f"optimizer.ap={str(ap).lower()}", fault="step:5")  # killed before step 5, after the checkpoint at 3
        assert out.returncode != 0 and not (killed / "summary.json").exists()
        out = run(killed, f"optimizer.ap={str(ap).lower()}")
        assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-3000:]
        a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(killed / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), label


def test_the_input_side_diagnostic_measures_sigma_and_the_gradient_gram_against_the_formulas():
    """scripts/input_side.py: Sigma = Z^T Z / n over every input row and S = mean over batches of G^T G, checked in
    float64 against the formulas computed independently; the comparisons are 1 where S is a scaled Sigma and drop
    where the gradient Gram weighs directions the inputs do not."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import input_side

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    mix = torch.randn(5, 5)
    xs = [torch.randn(16, 5) @ mix for _ in range(4)]  # correlated inputs
    ys = [torch.randn(16, 3) for _ in range(4)]
    loss = lambda b: ((model(xs[b]) - ys[b]) ** 2).mean()  # noqa: E731
    stats, skipped = input_side.collect(model, loss, batches=4)
    assert set(stats) == {"0", "2"} and skipped == []
    sigma, s, g, sigma_last = stats["0"]
    z = torch.cat(xs).double()
    torch.testing.assert_close(sigma, z.T @ z / len(z), rtol=1e-5, atol=1e-6)  # every row of the 4 batches
    last = xs[3].double()
    torch.testing.assert_close(sigma_last, last.T @ last / len(last), rtol=1e-5, atol=1e-6)  # the last batch's own
    grams = []
    for b in range(4):
        model.zero_grad()
        loss(b).backward()
        grams.append(model[0].weight.grad.double().clone())
    torch.testing.assert_close(s, sum(q.T @ q for q in grams) / 4, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(g, grams[3], rtol=1e-5, atol=1e-8)
    # S a scaled Sigma, no ridges: the same subspace and the same -1/2 direction
    same = input_side.compare(sigma, 7.0 * sigma, g, sigma, damping=0.0, matrix_eps=0.0, top=0.4)
    assert same["overlap"] == pytest.approx(1.0) and same["frobenius_cosine"] == pytest.approx(1.0)
    assert same["cos_ap_half_shampoo"] == pytest.approx(1.0)
    assert same["random_overlap"] == pytest.approx(2 / 5) and same["effective_rank_sigma"] == pytest.approx(same["effective_rank_gram"])
    # the real pair differs: a gradient Gram from 4 batches has rank <= 4 of 5 input directions
    real = input_side.compare(sigma, s, g, sigma_last, damping=1.0, matrix_eps=1e-6, top=0.4)
    assert real["effective_rank_gram"] < real["effective_rank_sigma"] and real["cos_ap_half_shampoo"] < 0.999
    assert input_side.effective_rank(torch.eye(6, dtype=torch.float64)) == pytest.approx(6.0)
