"""Behaviour over many steps: Prop 4.1 in miniature, exact resume, robustness, bad input."""

import io
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import dopr


def anisotropic_regression(n=4096, d=20, cond=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.logspace(0, -math.log10(cond) / 2, d)  # std ratio sqrt(cond): covariance ratio cond
    x = torch.randn(n, d, generator=g) * scales @ q.T
    w_true = torch.randn(1, d, generator=g)
    return x, x @ w_true.T


def fit(name, lr, x, y, steps=150, batch=256, **kw):
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = dopr.build_optimizer(model, name, lr=lr, momentum=0.0, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        nn.functional.mse_loss(model(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        loss = float(nn.functional.mse_loss(model(x), y))
    return loss if math.isfinite(loss) else math.inf


def test_ap_sgd_beats_sgd_at_its_best_step_size_on_ill_conditioned_inputs():
    """Prop 4.1 in miniature: AP removes the conditioning that slows gradient descent."""
    x, y = anisotropic_regression()
    eig = torch.linalg.eigvalsh(x.T @ x / x.shape[0])
    assert eig.max() / eig.min() >= 1e3
    best_sgd = min(fit("sgd", lr, x, y) for lr in [0.1 * 2 ** k for k in range(-4, 8)])
    ap_sgd = fit("dopr_sgd", 0.5, x, y, damping=1e-6)
    print(f"best SGD loss {best_sgd:.3e}, AP-SGD loss {ap_sgd:.3e}")
    assert ap_sgd < best_sgd / 100


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(13, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 13))


def data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 13, (4, 9), generator=g)


def run(model, opt, steps, start=0, scheduler=None):
    for s in range(start, start + steps):
        idx = data(s)
        nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, 13), idx[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name,kw", [
    ("dopr_adamw", {}),
    ("dopr_muon", {"update_every": 3, "stats": "ema"}),
    ("dopr_adamuon", {"update_every": 4}),
    ("dopr_signum", {"stats": "ema"}),
])
def test_state_dict_round_trip_resumes_bitwise(name, kw):
    model = make_model(0)
    opt = dopr.build_optimizer(model, name, lr=1e-2, weight_decay=0.01, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    run(model, opt, 10, scheduler=sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    run(model, opt, 10, start=10, scheduler=sched)

    fresh = make_model(1)  # different initial weights: everything must come from the save
    fresh_opt = dopr.build_optimizer(fresh, name, lr=1e-2, weight_decay=0.01, **kw)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
    buf.seek(0)
    saved = torch.load(buf)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    fresh_sched.load_state_dict(saved["sched"])
    run(fresh, fresh_opt, 10, start=10, scheduler=fresh_sched)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    # the scheduler drives the inner optimizers' learning rate through the Chain
    assert opt.base.param_groups[0]["lr"] == pytest.approx(1e-2 / 21)


def test_load_state_dict_rejects_a_different_model():
    opt = dopr.DoPr(make_model(0))
    other = dopr.DoPr(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("case", ["duplicate_columns", "constant_column", "batch_of_one", "all_zero", "huge_scale"])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_degenerate_inputs_never_give_nan_weights(case, damping):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = dopr.DoPr(model, base="adamw", lr=1e-2, damping=damping)
    for _ in range(5):
        x = torch.randn(1 if case == "batch_of_one" else 32, 8)
        if case == "duplicate_columns":
            x[:, 1] = x[:, 0]
        elif case == "constant_column":
            x[:, 3] = 1.0
        elif case == "all_zero":
            x.zero_()
        elif case == "huge_scale":
            x = x * torch.logspace(-4, 4, 8)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if damping == 0.0 and case in ("duplicate_columns", "batch_of_one"):
        assert opt.fallbacks["eigh"] > 0  # singular Sigma: Cholesky refused, eigh with clamped eigenvalues
    if case == "all_zero":
        assert opt.fallbacks["skipped"] > 0  # no signal in the first layer's input: gradient left as is


def test_non_finite_statistics_keep_the_previous_inverse():
    layer = nn.Linear(4, 2)
    ap = dopr.ActivationPreconditioner(layer, update_every=2)
    layer(torch.randn(8, 4)).sum().backward()
    ap.step()
    ap.step()  # the second step of the period reuses the solver
    kept = ap.layers[0].solver.a.clone()
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    layer(x).sum().backward()
    ap.step()
    assert ap.fallbacks["nonfinite_stats"] == 1 and ap.fallbacks["previous"] == 1
    assert torch.equal(ap.layers[0].solver.a, kept)


def test_non_finite_statistics_leave_the_gradient_when_nothing_is_kept():
    layer = nn.Linear(4, 2)
    ap = dopr.ActivationPreconditioner(layer)  # update_every=1: no solver survives a step
    layer(torch.randn(8, 4)).sum().backward()
    ap.step()
    layer.zero_grad()
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    layer(x).sum().backward()
    before = layer.weight.grad.clone()
    ap.step()
    assert ap.fallbacks["nonfinite_stats"] == 1 and ap.fallbacks["skipped"] == 1
    assert torch.equal(layer.weight.grad.isnan(), before.isnan())  # left as it was (NaN where it was NaN)
    assert torch.equal(layer.weight.grad.nan_to_num(), before.nan_to_num())


def test_bf16_model_trains_with_float32_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(torch.bfloat16)
    opt = dopr.DoPr(model, base="adamw", lr=1e-2)
    x, y = torch.randn(64, 16, dtype=torch.bfloat16), torch.randn(64, 4, dtype=torch.bfloat16)
    losses = []
    for _ in range(30):
        loss = (model(x) - y).float().pow(2).mean()
        loss.backward()
        assert model[0].weight.grad.dtype == torch.bfloat16
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0]


def test_coverage_reports_every_weight_and_why():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.up = nn.ConvTranspose1d(8, 8, 2)
            self.frozen = nn.Linear(8, 8).requires_grad_(False)
            self.skip = nn.Linear(8, 8)
            self.ok = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    ap = dopr.ActivationPreconditioner(Model(), exclude=["skip"])
    cover = ap.coverage()
    assert "tied" in cover["emb"] and "tied" in cover["head"]
    assert "shared with head.weight" in cover["emb"] and "shared with emb.weight" in cover["head"]
    assert cover["up"].startswith("not covered: ConvTranspose1d is a transposed convolution")
    assert "frozen" in cover["frozen"] and "excluded" in cover["skip"]
    assert cover["attn.out_proj"].startswith("covered: linear, d_in=8 (nn.MultiheadAttention out_proj")
    assert [cover[f"attn.in_proj_weight[{r}]"] for r in ("query", "key", "value")] == [
        f"covered: linear, d_in=8 (nn.MultiheadAttention {r} projection)" for r in ("query", "key", "value")]
    assert cover["ok"] == "covered: linear, d_in=8"
    assert sorted(n for n, v in cover.items() if v.startswith("covered")) == sorted(layer.name for layer in ap.layers)
    with pytest.raises(ValueError, match="no layer to cover"):
        dopr.ActivationPreconditioner(nn.LayerNorm(4))


def mostly_uncovered():
    return nn.ModuleDict({"up": nn.ConvTranspose2d(16, 16, 3), "tied_a": nn.Linear(16, 16), "tied_b": nn.Linear(16, 16),
                          "ok": nn.Linear(16, 4)})


def test_construction_summarises_coverage_and_warns_when_most_weights_are_uncovered(caplog):
    model = mostly_uncovered()
    model["tied_b"].weight = model["tied_a"].weight
    with pytest.warns(dopr.CoverageWarning) as caught:
        ap = dopr.ActivationPreconditioner(model)
    # 64 of 2304 (ConvTranspose2d) + 256 (tied, counted once) + 64 trainable weight-matrix parameters are covered
    assert ap.covered_fraction == pytest.approx(64 / (2304 + 256 + 64))
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller, not at the library
    assert "covers 1 layers (1 linear): 2.4% of the 2,624 parameters" in message
    assert "unsupported ConvTranspose2d: up (2,304 parameters)" in message
    assert "tied: tied_a, tied_b (256 parameters)" in message and "strict=True" in message
    # DoPr passes strict through; the error names the fix and leaves no hook on the model
    fresh = mostly_uncovered()
    with pytest.raises(ValueError, match="strict=True: replace the uncovered layers") as err:
        dopr.DoPr(fresh, base="adamw", strict=True)
    assert "ConvTranspose2d" in str(err.value)
    assert not any(m._forward_pre_hooks for m in fresh.modules())
    # A covered model: one INFO line on the "dopr" logger, no warning
    with caplog.at_level("INFO", logger="dopr"), warnings.catch_warnings():
        warnings.simplefilter("error")
        dopr.DoPr(make_model(0), base="adamw", strict=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "dopr"]
    assert len(lines) == 1 and "100.0% of the" in lines[0] and "nothing left to the gradient preconditioner alone" in lines[0]


def test_frozen_weights_do_not_count_against_coverage():
    # LoRA-style fine-tuning: a large frozen base and small trainable adapters is fully covered
    model = nn.ModuleDict({"base": nn.Linear(64, 64).requires_grad_(False), "a": nn.Linear(64, 2), "b": nn.Linear(2, 64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap = dopr.ActivationPreconditioner(model, strict=True)
    assert ap.covered_fraction == 1.0 and "frozen: base (4,096 parameters, not trained)" in ap.coverage_summary()


def test_condition_numbers_recover_sigma_anisotropy():
    layer = nn.Linear(3, 1, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=1e-2, max_rows_per_dim=None)  # the statistic of every row
    x = torch.randn(20000, 3) * torch.tensor([1.0, 0.1, 0.01])
    layer(x).sum().backward()
    ap.step()
    assert ap.condition_numbers() == {} and ap.diagnostic_seconds == 0.0  # computed only at refreshes that ask for it
    layer(x).sum().backward()
    ap.track_conditioning = True
    ap.step()
    assert ap.diagnostic_seconds > 0.0  # timed, so that the loop leaves it out of train_seconds
    sigma = x.double().T @ x.double() / x.shape[0]
    assert ap.condition_numbers()[""] == pytest.approx(float(torch.linalg.cond(sigma)), rel=1e-2)


@pytest.mark.parametrize("kwargs,match", [
    ({"damping": -1}, "damping"),
    ({"stats": "running"}, "stats"),
    ({"update_every": 0}, "update_every"),
    ({"ema_decay": 1.0}, "ema_decay"),
])
def test_bad_options_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dopr.DoPr(make_model(0), **kwargs)


def test_bad_optimizer_names_name_the_fix():
    with pytest.raises(ValueError, match="choose one of adamw, muon"):
        dopr.build_optimizer(make_model(0), "adam")
    with pytest.raises(ValueError, match="use 'dopr_adamw'"):
        dopr.build_optimizer(make_model(0), "adamw", damping=1e-3)
    opt = dopr.build_optimizer(make_model(0), "dopr_adamw")
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_library_imports_without_the_experiment_stack():
    code = ("import sys, dopr; bad = [m for m in ('hydra', 'wandb', 'transformers', 'omegaconf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_mode_restores_the_training_flag_also_when_the_evaluation_raises():
    """experiments.tasks.base.eval_mode, the bracket around every evaluation and rollout: dropout off inside, the
    model's own flag (training or not) back after, also after an error (a failed rollout must not leave a run
    training without dropout)."""
    import pytest as _pytest
    import torch.nn as nn

    from experiments.tasks.base import eval_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training and model[1].training
    with _pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a rollout failed")
    assert model.training and model[1].training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training
