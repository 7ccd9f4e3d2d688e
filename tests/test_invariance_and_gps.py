"""The invariance principle, and DoPr(base=X) == X applied to the AP gradient."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import expected_ap

import dopr


def mlp(seed, d_in=5, hidden=16, out=3, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype)


@pytest.mark.parametrize("use_ap", [True, False])
def test_invariance_to_an_invertible_input_map(use_ap):
    """Network B sees x' = A x with first-layer weight W A^-1, so it computes what A computes.
    After one AP-SGD step with zero damping both still compute the same function; plain SGD's do not."""
    d = 5
    net_a = mlp(1)
    net_b = copy.deepcopy(net_a)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.3, 3.0, d, dtype=torch.float64)) @ torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    with torch.no_grad():
        net_b[0].weight.copy_(net_a[0].weight @ torch.linalg.inv(a))
    x, y = torch.randn(64, d, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    name = "dopr_sgd" if use_ap else "sgd"
    extra = {"damping": 0.0} if use_ap else {}
    opts = [dopr.build_optimizer(n, name, lr=0.1, momentum=0.0, **extra) for n in (net_a, net_b)]
    for net, opt, inp in ((net_a, opts[0], x), (net_b, opts[1], x @ a.T)):
        (net(inp) - y).pow(2).mean().backward()
        opt.step()
    x_test = torch.randn(32, d, dtype=torch.float64)
    with torch.no_grad():
        out_a, out_b = net_a(x_test), net_b(x_test @ a.T)
    gap = float((out_a - out_b).abs().max() / out_a.abs().max())
    print(f"relative output gap after one step: {gap:.2e}")
    if use_ap:
        assert gap < 1e-5  # float32 statistics bound the agreement
    else:
        assert gap > 1e-3


def test_dopr_adamw_equals_adamw_on_the_formula_gradient():
    """Reference: capture the inputs with the test's own hooks, compute G (Sigma + lam I)^-1 in
    float64, hand it to torch.optim.AdamW; DoPr(base="adamw") must follow it step by step."""
    gamma = 1e-2
    net = mlp(2, dtype=torch.float32)
    ref = copy.deepcopy(net)
    opt = dopr.DoPr(net, base="adamw", lr=1e-2, weight_decay=0.1, damping=gamma, max_rows_per_dim=None)
    ref_opt = torch.optim.AdamW(dopr.parameter_groups(ref.parameters(), 0.1), lr=1e-2)
    inputs = {}
    for i in (0, 2):
        ref[i].register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
    for step in range(5):
        x, y = torch.randn(48, 5), torch.randn(48, 3)
        for model in (net, ref):
            (model(x) - y).pow(2).mean().backward()
        with torch.no_grad():
            for i in (0, 2):
                w = ref[i].weight
                w.grad.copy_(expected_ap(w.grad, inputs[i], gamma))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}")


class Tiny(nn.Module):
    """Embedding, conv kernel, matrices, biases and a norm: every kind of parameter a GP splits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 11)

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.hidden(self.norm(h))))

    def get_output_embeddings(self):
        return self.head


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (6, 10), generator=g) for _ in range(n)]


def train(model, opt, data):
    for idx in data:
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, 11), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("base", dopr.BASES)
def test_dopr_equals_its_base_on_the_ap_gradient(base):
    torch.manual_seed(3)
    net = Tiny()
    ref = copy.deepcopy(net)
    kw = dict(lr=3e-3, weight_decay=0.05)
    opt = dopr.DoPr(net, base=base, update_every=2, **kw)
    ap = dopr.ActivationPreconditioner(ref, update_every=2)
    ref_opt = dopr.build_optimizer(ref, base, **kw)
    for idx in batches(4):
        for model in (net, ref):
            nn.functional.cross_entropy(model(idx[:, :-1]).reshape(-1, 11), idx[:, 1:].reshape(-1)).backward()
        opt.step()
        ap.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_muon_matches_torch_muon_on_matrices_and_takes_conv_kernels():
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(12, 7))
    w_ref = nn.Parameter(w.detach().clone())
    ours = dopr.Muon([w], lr=0.02, weight_decay=0.1)
    theirs = torch.optim.Muon([w_ref], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(12, 7)
        w.grad, w_ref.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(w, w_ref)

    kernel = nn.Parameter(torch.randn(4, 3, 5))  # a Conv1d kernel: orthogonalised as (4, 15)
    flat = nn.Parameter(kernel.detach().reshape(4, 15).clone())
    a, b = dopr.Muon([kernel], lr=0.02), torch.optim.Muon([flat], lr=0.02)
    g = torch.randn(4, 3, 5)
    kernel.grad, flat.grad = g.clone(), g.reshape(4, 15).clone()
    a.step()
    b.step()
    assert torch.equal(kernel.reshape(4, 15), flat)


def test_muon_split_gives_embeddings_head_biases_and_norms_to_adamw():
    net = Tiny()
    opt = dopr.build_optimizer(net, "muon")
    muon_part, adamw_part = opt.optimizers
    muon_ids = {id(p) for g in muon_part.param_groups for p in g["params"]}
    assert muon_ids == {id(net.conv.weight), id(net.hidden.weight)}
    adamw_ids = {id(p) for g in adamw_part.param_groups for p in g["params"]}
    assert {id(net.emb.weight), id(net.head.weight), id(net.norm.weight), id(net.hidden.bias)} <= adamw_ids


def test_adamuon_first_step_is_sign_of_orthogonalised_momentum_at_rms_point_two():
    """At step 1 the bias-corrected second moment is O*O, so O / sqrt(v) = sign(O) and the RMS
    rescale leaves -0.2 * lr * sign(O) elementwise."""
    w = nn.Parameter(torch.randn(6, 9))
    before = w.detach().clone()
    opt = dopr.AdaMuon([w], lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=False)
    g = torch.randn(6, 9)
    w.grad = g.clone()
    opt.step()
    o = dopr.newton_schulz(0.1 * g).float()  # momentum buffer after one step: (1 - 0.9) g
    torch.testing.assert_close(w.detach() - before, -0.2 * 0.1 * torch.sign(o), rtol=1e-4, atol=1e-6)


def test_signum_is_sign_of_momentum_with_decoupled_decay():
    w = nn.Parameter(torch.randn(5))
    w0 = w.detach().clone()
    opt = dopr.Signum([w], lr=0.01, momentum=0.5, weight_decay=0.1)
    g1, g2 = torch.randn(5), torch.randn(5)
    for g in (g1, g2):
        w.grad = g
        opt.step()
    m1 = 0.5 * g1
    w1 = w0 * (1 - 0.001) - 0.01 * torch.sign(m1)
    m2 = 0.5 * m1 + 0.5 * g2
    torch.testing.assert_close(w.detach(), w1 * (1 - 0.001) - 0.01 * torch.sign(m2))
