"""AP gradients against the formula, computed independently (float64 linalg.solve from the inputs
captured by the test's own hooks and patch extraction)."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import expected_ap, rel_err

import dopr

GAMMA = 1e-3
TOL = 1e-5


def capture_inputs(module):
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen


def test_linear_3d_input_first_and_hidden_layer():
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 5))
    hidden_in = capture_inputs(model[2])
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA)
    # (batch, tokens, d_in): every token is a row. The statistics are float32 by design; their
    # rounding, amplified by cond(Sigma), is what limits the agreement (1.5e-5 at cond 800).
    x = torch.randn(4, 7, 6)
    model(x).pow(2).sum().backward()
    g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
    bias_grad = model[0].bias.grad.clone()
    ap.step()
    assert rel_err(model[0].weight.grad, expected_ap(g0, x.reshape(-1, 6), GAMMA)) < TOL
    assert rel_err(model[2].weight.grad, expected_ap(g2, hidden_in[0].reshape(-1, 12), GAMMA)) < TOL
    assert torch.equal(model[0].bias.grad, bias_grad)  # biases keep their gradient


def conv1d_patches(x, kernel, stride, padding, dilation):
    """Rows (B * L_out, C * kernel) ordered like weight.view(out, C * kernel), by explicit indexing."""
    x = F.pad(x, (padding, padding))
    length = (x.shape[-1] - dilation * (kernel - 1) - 1) // stride + 1
    starts = torch.arange(length) * stride
    idx = starts[:, None] + torch.arange(kernel)[None, :] * dilation  # (L_out, k)
    patches = x[:, :, idx]  # (B, C, L_out, k)
    return patches.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * kernel)


def test_conv1d_stride_padding_dilation():
    conv = nn.Conv1d(3, 5, kernel_size=3, stride=2, padding=2, dilation=2)
    ap = dopr.ActivationPreconditioner(conv, damping=GAMMA)
    x = torch.randn(4, 3, 21)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone().reshape(5, -1)
    ap.step()
    rows = conv1d_patches(x, 3, 2, 2, 2)
    assert rel_err(conv.weight.grad.reshape(5, -1), expected_ap(g, rows, GAMMA)) < TOL


def conv2d_patches(x, kernel, stride, padding):
    x = F.pad(x, (padding, padding, padding, padding))
    p = x.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, Ho, Wo, k, k)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kernel * kernel)


def test_conv2d_padding_and_stride():
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
    ap = dopr.ActivationPreconditioner(conv, damping=GAMMA)
    x = torch.randn(5, 3, 9, 9)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone().reshape(4, -1)
    ap.step()
    rows = conv2d_patches(x, 3, 2, 1)
    assert rel_err(conv.weight.grad.reshape(4, -1), expected_ap(g, rows, GAMMA)) < TOL


def test_conv2d_same_padding_reflect_mode():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding="same", padding_mode="reflect")
    ap = dopr.ActivationPreconditioner(conv, damping=GAMMA)
    x = torch.randn(3, 2, 6, 6)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone().reshape(3, -1)
    ap.step()
    rows = conv2d_patches(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, 1, 0)
    assert rel_err(conv.weight.grad.reshape(3, -1), expected_ap(g, rows, GAMMA)) < TOL


def test_grouped_conv_gets_one_block_per_group():
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
    ap = dopr.ActivationPreconditioner(conv, damping=GAMMA, max_rows_per_dim=None)  # 147 rows > 8 x 18: exact here
    x = torch.randn(3, 4, 7, 7)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone()
    ap.step()
    for j in range(2):
        rows = conv2d_patches(x[:, 2 * j : 2 * j + 2], 3, 1, 1)
        gj = g[3 * j : 3 * j + 3].reshape(3, -1)
        assert rel_err(conv.weight.grad[3 * j : 3 * j + 3].reshape(3, -1), expected_ap(gj, rows, GAMMA)) < TOL


def test_embedding_one_hot_rows():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 3)
    ap = dopr.ActivationPreconditioner(nn.ModuleDict({"emb": emb, "head": head}), damping=GAMMA)
    idx = torch.randint(0, 10, (6, 5))
    head(emb(idx)).pow(2).sum().backward()
    g = emb.weight.grad.clone()  # (V, dim): the paper's G is its transpose
    ap.step()
    rows = F.one_hot(idx.reshape(-1), 10)
    expected = expected_ap(g.T, rows, GAMMA).T
    assert rel_err(emb.weight.grad, expected) < TOL


def test_transformers_conv1d_is_a_linear_layer_with_its_weight_transposed():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(12, 6), nn.GELU(), Conv1D(5, 12))  # Conv1D(nf=d_out, nx=d_in); weight (d_in, d_out)
    nn.init.normal_(model[0].weight)  # its init (std 0.02) keeps GELU linear: hidden rows of rank 6 of 12
    hidden_in = capture_inputs(model[2])
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA)
    assert ap.coverage()["0"].startswith("covered: linear, d_in=6 (transformers Conv1D")
    x = torch.randn(4, 7, 6)
    model(x).pow(2).sum().backward()
    g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()  # (d_in, d_out): the paper's G is its transpose
    bias_grad = model[0].bias.grad.clone()
    ap.step()
    assert rel_err(model[0].weight.grad, expected_ap(g0.T, x.reshape(-1, 6), GAMMA).T) < TOL
    assert rel_err(model[2].weight.grad, expected_ap(g2.T, hidden_in[0].reshape(-1, 12), GAMMA).T) < TOL
    assert torch.equal(model[0].bias.grad, bias_grad)


def test_conv1d_is_recognised_by_name_and_shape_without_transformers():
    class Conv1D(nn.Module):  # a vendored copy of transformers' layer (GPT-2 ports carry one)
        def __init__(self, nf, nx):
            super().__init__()
            self.nf, self.nx = nf, nx
            self.weight = nn.Parameter(torch.randn(nx, nf))

        def forward(self, x):
            return x @ self.weight

    class Other(Conv1D):  # the same name's shape rule: a weight that is not (nx, nf) is not taken for one
        pass

    odd = Other(3, 4)
    odd.weight = nn.Parameter(torch.randn(3, 4))
    model = nn.ModuleDict({"a": Conv1D(3, 4), "b": odd})
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA)
    cover = ap.coverage()
    assert cover["a"].startswith("covered: linear, d_in=4") and cover["b"].startswith("not covered: Other")
    x = torch.randn(20, 4)
    model["a"](x).pow(2).sum().backward()
    g = model["a"].weight.grad.clone()
    ap.step()
    assert rel_err(model["a"].weight.grad, expected_ap(g.T, x, GAMMA).T) < TOL


def attention_outputs(mha, q, k, v):
    """The heads' concatenated outputs (the input of out_proj) as rows, written out from the weights:
    (L, B, E) inputs, no dropout, no mask."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(t):  # (L, B, E) -> (B, h, L, E / h)
        return t.reshape(t.shape[0], t.shape[1], h, e // h).permute(1, 2, 0, 3)

    qh, kh, vh = heads(F.linear(q, wq, bq)), heads(F.linear(k, wk, bk)), heads(F.linear(v, wv, bv))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / (e // h) ** 0.5, -1) @ vh
    return a.permute(2, 0, 1, 3).reshape(-1, e).detach()


def test_multihead_self_attention_packed_projection_and_out_proj():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    ap = dopr.ActivationPreconditioner(mha, damping=GAMMA)
    assert not ap.uncovered and len(ap.layers) == 4
    x = torch.randn(8, 16, 8)  # (batch, length, E): 128 rows
    out, _ = mha(x, x, x)
    assert F.linear is torch._C._nn.linear  # the out_proj tap is closed after the forward
    q_layer, k_layer, v_layer = ap.layers[:3]
    assert q_layer.parts[0] is k_layer.parts[0] is v_layer.parts[0]  # self-attention: one statistic, one solve
    out.pow(2).sum().backward()
    g, g_out = mha.in_proj_weight.grad.clone(), mha.out_proj.weight.grad.clone()
    bias_grad = mha.in_proj_bias.grad.clone()
    ap.step()
    rows = x.reshape(-1, 8)
    for i in range(3):  # query, key and value rows of the packed weight: each read x
        assert rel_err(mha.in_proj_weight.grad[8 * i : 8 * i + 8], expected_ap(g[8 * i : 8 * i + 8], rows, GAMMA)) < TOL
    a = attention_outputs(mha, *(x.transpose(0, 1),) * 3)
    assert rel_err(mha.out_proj.weight.grad, expected_ap(g_out, a, GAMMA)) < TOL
    assert torch.equal(mha.in_proj_bias.grad, bias_grad)


def test_multihead_cross_attention_gives_query_key_and_value_rows_their_own_statistic():
    for kdim in (None, 5):  # packed in_proj_weight; separate q/k/v_proj_weight when the key width differs
        mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim)  # batch_first=False: (L, B, E)
        ap = dopr.ActivationPreconditioner(mha, damping=GAMMA)
        d_kv = kdim or 8
        q, k, v = torch.randn(16, 8, 8), torch.randn(12, 8, d_kv), torch.randn(12, 8, d_kv)
        out, _ = mha(q, k, v)
        out.pow(2).sum().backward()
        if kdim is None:
            g = mha.in_proj_weight.grad.clone()
            grads = [g[:8], g[8:16], g[16:]]
        else:
            grads = [getattr(mha, f"{r}_proj_weight").grad.clone() for r in "qkv"]
        g_out = mha.out_proj.weight.grad.clone()
        ap.step()
        if kdim is None:
            new = [mha.in_proj_weight.grad[:8], mha.in_proj_weight.grad[8:16], mha.in_proj_weight.grad[16:]]
        else:
            new = [getattr(mha, f"{r}_proj_weight").grad for r in "qkv"]
        for grad, before, rows in zip(new, grads, (q, k, v)):
            assert rel_err(grad, expected_ap(before, rows.reshape(-1, rows.shape[-1]), GAMMA)) < TOL
        # each part with the wrong input's statistic would be far off: the three inputs differ
        assert rel_err(new[0], expected_ap(grads[0], torch.randn(192, 8), GAMMA)) > 0.01
        assert rel_err(mha.out_proj.weight.grad, expected_ap(g_out, attention_outputs(mha, q, k, v), GAMMA)) < TOL


def test_multihead_attention_collects_only_training_forwards_and_closes_its_tap_on_errors():
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    ap = dopr.ActivationPreconditioner(mha)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        mha(x, x, x)
    mha.eval()
    mha(x, x, x)
    assert not any(layer.parts for layer in ap.layers)
    mha.train()
    with pytest.raises(AssertionError, match="does not match value shape"):
        mha(x, x, torch.randn(2, 5, 4))  # key and value lengths differ: the forward fails inside
    assert F.linear is torch._C._nn.linear


def test_peft_lora_adapters_of_a_transformers_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    attn = model.base_model.model.model.layers[1].self_attn
    lora_a, lora_b = attn.q_proj.lora_A["default"], attn.k_proj.lora_B["default"]
    a_in, b_in = capture_inputs(lora_a), capture_inputs(lora_b)
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA)
    cover = ap.coverage()
    covered = [n for n, v in cover.items() if v.startswith("covered")]
    assert covered and all("lora_" in n for n in covered)  # base weights are frozen
    assert any("frozen" in v for v in cover.values())
    ids = torch.randint(0, 50, (3, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    ga, gb = lora_a.weight.grad.clone(), lora_b.weight.grad.clone()
    ap.step()
    assert rel_err(lora_a.weight.grad, expected_ap(ga, a_in[0].reshape(-1, 16), GAMMA)) < TOL
    assert rel_err(lora_b.weight.grad, expected_ap(gb, b_in[0].reshape(-1, 4), GAMMA)) < TOL


def test_rows_pool_over_accumulated_micro_batches_and_skip_eval_and_no_grad():
    layer = nn.Linear(5, 3)
    ap = dopr.ActivationPreconditioner(layer, damping=GAMMA)
    x1, x2 = torch.randn(8, 5), torch.randn(6, 5) * 2
    with torch.no_grad():  # a rollout in train mode without autograd: no statistics
        layer(torch.randn(50, 5) * 10)
    layer.eval()
    layer(torch.randn(50, 5) * 10).sum()  # eval mode: no statistics
    layer.train()
    layer(x1).pow(2).sum().backward()
    layer(x2).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    assert rel_err(layer.weight.grad, expected_ap(g, torch.cat([x1, x2]), GAMMA)) < TOL


def test_update_every_reuses_the_inverse_and_ema_blends():
    layer = nn.Linear(4, 2, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=GAMMA, update_every=2)
    x1, x2 = torch.randn(16, 4), torch.randn(16, 4) + 1
    layer(x1).sum().backward()
    ap.step()
    layer.weight.grad = None
    layer(x2).pow(2).sum().backward()  # step 2 reuses the inverse of step 1's inputs
    g = layer.weight.grad.clone()
    ap.step()
    assert rel_err(layer.weight.grad, expected_ap(g, x1, GAMMA)) < TOL

    decay = 0.8
    layer = nn.Linear(4, 2, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=0.0, stats="ema", ema_decay=decay)
    layer(x1).sum().backward()
    ap.step()
    layer.weight.grad = None
    layer(x2).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    s1, s2 = x1.double().T @ x1.double() / 16, x2.double().T @ x2.double() / 16
    expected = torch.linalg.solve(decay * s1 + (1 - decay) * s2, g.double().T).T
    assert rel_err(layer.weight.grad, expected) < TOL


def test_micro_batches_fold_into_one_statistic_that_shared_layers_still_share():
    # Four forwards before one step (gradient accumulation): each layer holds one part, not four, so
    # AP's memory is that of one statistic; q and k (one input) keep sharing it; rows stay rows (for
    # Woodbury) while there are fewer than d_in, then become the d x d sum; the result is the formula.
    class TwoHeads(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.k = nn.Linear(d, 4, bias=False), nn.Linear(d, 4, bias=False)

        def forward(self, x):
            return self.q(x) * self.k(x)

    for d, rows_each in ((24, 5), (6, 5)):  # 20 rows < 24: kept rows; 20 rows > 6: a 6 x 6 sum
        net = TwoHeads(d)
        ap = dopr.ActivationPreconditioner(net, damping=0.1, max_rows_per_dim=None)
        xs = [torch.randn(rows_each, d) * (i + 1) for i in range(4)]
        for x in xs:
            net(x).pow(2).sum().backward()
        q, k = ap.layers
        assert len(q.parts) == 1 and q.parts[0] is k.parts[0] and q.parts[0].count == 4 * rows_each
        part = q.parts[0]
        assert (part.rows is not None and part.rows.shape == (1, 20, d)) if d == 24 else (part.sum is not None and part.sum.shape == (1, d, d))
        g = net.q.weight.grad.clone()
        ap.step()
        assert rel_err(net.q.weight.grad, expected_ap(g, torch.cat(xs), 0.1)) < TOL


def test_layers_reading_one_tensor_share_one_statistic_and_inverse():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.other = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.other(x.clone())

    net = TwoHeads()
    ap = dopr.ActivationPreconditioner(net, damping=GAMMA, update_every=2)  # keeps its solvers for a look
    x = torch.randn(30, 6)
    net(x).pow(2).sum().backward()
    grads = {n: getattr(net, n).weight.grad.clone() for n in ("q", "k", "other")}
    ap.step()
    q, k, other = ap.layers
    assert q.solver is k.solver  # one solve for q and k
    assert other.solver is not q.solver  # a copy is another tensor: its own statistic
    for n in ("q", "k", "other"):
        assert rel_err(getattr(net, n).weight.grad, expected_ap(grads[n], x, GAMMA)) < TOL


def test_woodbury_when_rows_are_fewer_than_inputs():
    # 12 rows of a 40-wide input: Sigma is singular, the damping makes the system solvable; the
    # solve goes through the 12 x 12 Woodbury system, never a 40 x 40 matrix.
    layer = nn.Linear(40, 7, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=0.1, update_every=2)
    x = torch.randn(3, 4, 40)
    layer(x).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    assert ap.layers[0].solver.kind == "woodbury" and ap.layers[0].solver.a.shape == (1, 12, 40)
    assert rel_err(layer.weight.grad, expected_ap(g, x.reshape(-1, 40), 0.1)) < TOL
    dense = nn.Linear(40, 7, bias=False)
    dense.weight.data.copy_(layer.weight.data)
    ap_dense = dopr.ActivationPreconditioner(dense, damping=0.1, solver="dense")
    dense(x).pow(2).sum().backward()
    ap_dense.step()
    layer.weight.grad = None
    layer(x).pow(2).sum().backward()
    ap.step()  # the second step of the period reuses the Woodbury solver on the new gradient
    assert rel_err(layer.weight.grad, dense.weight.grad) < TOL


def test_subsampled_rows_are_the_formula_on_the_drawn_rows():
    # max_rows draws rows uniformly without replacement from the seeded generator: the result is the
    # exact formula on exactly those rows (Linear over tokens, and Conv2d patches).
    layer = nn.Linear(6, 3, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=GAMMA, max_rows=50, max_rows_per_dim=None, seed=7)
    x = torch.randn(10, 30, 6)
    layer(x).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:50].sort().values
    assert rel_err(layer.weight.grad, expected_ap(g, x.reshape(-1, 6)[idx], GAMMA)) < TOL

    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1)
    ap = dopr.ActivationPreconditioner(conv, damping=GAMMA, max_rows_per_dim=4, seed=3)  # 4 x 18 = 72 of 128 rows
    x = torch.randn(2, 2, 8, 8)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone().reshape(4, -1)
    ap.step()
    rows = conv2d_patches(x, 3, 1, 1)
    idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(3))[:72].sort().values
    assert rel_err(conv.weight.grad.reshape(4, -1), expected_ap(g, rows[idx], GAMMA)) < TOL


def test_layers_of_one_width_are_factored_together_and_each_is_right():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    seen = [capture_inputs(model[i]) for i in (0, 2, 4)]
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA)
    model(torch.randn(64, 8)).pow(2).sum().backward()
    grads = [model[i].weight.grad.clone() for i in (0, 2, 4)]
    ap.step()
    for i, g, inputs in zip((0, 2, 4), grads, seen):
        assert rel_err(model[i].weight.grad, expected_ap(g, inputs[0], GAMMA)) < TOL
    assert all(layer.solver is None for layer in ap.layers) and ap.state_bytes() == 0  # nothing kept at update_every=1


def test_lora_llama_keeps_no_d_by_d_tensor_between_steps():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = dopr.DoPr(model, base="adamw", lr=1e-3)
    ids = torch.randint(0, 64, (4, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ap = opt.preconditioner
    assert ap.layers and all(".lora_A." in l.name or ".lora_B." in l.name for l in ap.layers)
    assert ap.state_bytes() == 0

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    assert not [t for t in tensors(ap.state_dict()["layers"]) if t.ndim >= 2]


def test_subsampling_generator_resumes_from_the_state_dict():
    xs = [torch.randn(200, 5) for _ in range(3)]

    def run(layer, ap, batches):
        out = []
        for x in batches:
            layer.weight.grad = None
            layer(x).pow(2).sum().backward()
            ap.step()
            out.append(layer.weight.grad.clone())
        return out

    a = nn.Linear(5, 2, bias=False)
    ap_a = dopr.ActivationPreconditioner(a, max_rows=20)
    straight = run(a, ap_a, xs)
    b = nn.Linear(5, 2, bias=False)
    b.weight.data.copy_(a.weight.data)
    ap_b = dopr.ActivationPreconditioner(b, max_rows=20)
    run(b, ap_b, xs[:1])
    c = nn.Linear(5, 2, bias=False)
    c.weight.data.copy_(a.weight.data)
    ap_c = dopr.ActivationPreconditioner(c, max_rows=20, seed=99)  # another seed, overwritten by the state
    ap_c.load_state_dict(ap_b.state_dict())
    resumed = run(c, ap_c, xs[1:])
    assert all(torch.equal(s, r) for s, r in zip(straight[1:], resumed))


def test_subsampled_conv_patches_are_the_unfolded_rows():
    # With a row cap, conv patches are gathered straight from the padded input; the exact path
    # builds them from strided slices. Both must be F.unfold's rows, in its order, for every
    # stride/dilation/padding mode, Conv1d included.
    from dopr.preconditioner import _conv_rows

    convs = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
             nn.Conv2d(3, 4, (3, 5), padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2),
             nn.Conv1d(3, 5, 5, padding=2), nn.Conv1d(3, 5, 3, stride=2, padding=1, padding_mode="circular"),
             nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))]
    for conv in convs:
        one_d = isinstance(conv, nn.Conv1d)
        x = torch.randn(5, conv.in_channels, *((9,) if one_d else (9, 8)))
        xx = x.unsqueeze(-2) if one_d else x
        pad = list(conv._reversed_padding_repeated_twice) + ([0, 0] if one_d else [])
        xx = F.pad(xx, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        kernel, stride, dilation = ((1, conv.kernel_size[0]), (1, conv.stride[0]), (1, conv.dilation[0])) if one_d else (
            conv.kernel_size, conv.stride, conv.dilation)
        reference = F.unfold(xx, kernel, dilation=dilation, stride=stride)
        reference = reference.transpose(1, 2).reshape(-1, reference.shape[1])
        per_sample, chunks = _conv_rows(conv, x)
        assert per_sample * 5 == reference.shape[0]
        assert torch.equal(torch.cat(list(chunks)), reference), conv
        index = torch.randperm(reference.shape[0])[:17].sort().values
        _, chunks = _conv_rows(conv, x, index)
        assert torch.equal(torch.cat(list(chunks)), reference[index]), conv


def test_default_is_every_row_and_a_cap_of_eight_per_input_dimension_draws_the_formulas_rows():
    # The paper's AP by default: the exact per-batch statistic, in AP, DoPr and build_optimizer alike.
    assert inspect.signature(dopr.ActivationPreconditioner).parameters["max_rows_per_dim"].default is None
    assert inspect.signature(dopr.ActivationPreconditioner).parameters["max_rows"].default is None
    assert dopr.DoPr(nn.Linear(4, 2)).preconditioner.max_rows_per_dim is None
    assert dopr.build_optimizer(nn.Linear(4, 2), "dopr_muon").preconditioner.max_rows_per_dim is None
    layer = nn.Linear(4, 2, bias=False)
    ap = dopr.ActivationPreconditioner(layer, damping=GAMMA, seed=5)
    x = torch.randn(100, 4)  # 100 rows, 25 per input dimension: every one enters Sigma
    layer(x).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    assert rel_err(layer.weight.grad, expected_ap(g, x, GAMMA)) < TOL
    # The suite's setting (configs/optimizer/dopr_*.yaml): 8 rows per input dimension, drawn by the seeded generator.
    layer.weight.grad = None
    ap = dopr.ActivationPreconditioner(layer, damping=GAMMA, max_rows_per_dim=8, seed=5)
    layer(x).pow(2).sum().backward()
    g = layer.weight.grad.clone()
    ap.step()
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(5))[:32].sort().values
    assert rel_err(layer.weight.grad, expected_ap(g, x[idx], GAMMA)) < TOL
    assert rel_err(layer.weight.grad, expected_ap(g, x, GAMMA)) > 1e-3  # the cap is not the exact statistic here
    small = nn.Linear(4, 2, bias=False)
    ap = dopr.ActivationPreconditioner(small, damping=GAMMA, max_rows_per_dim=8)
    x = torch.randn(32, 4)  # 32 rows = 8 x 4: every row
    small(x).pow(2).sum().backward()
    g = small.weight.grad.clone()
    ap.step()
    assert rel_err(small.weight.grad, expected_ap(g, x, GAMMA)) < TOL


def test_bfloat16_statistics_are_the_formula_on_bf16_rounded_rows():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 3))
    x = torch.randn(200, 16)
    hidden = capture_inputs(model[2])
    grads = {}
    for precision in ("float32", "bfloat16"):
        model.zero_grad()
        ap = dopr.ActivationPreconditioner(model, damping=GAMMA, stats_precision=precision, max_rows_per_dim=None)
        model(x).pow(2).sum().backward()
        g0, g2 = model[0].weight.grad.clone(), model[2].weight.grad.clone()
        ap.step()
        ap.remove()
        grads[precision] = (model[0].weight.grad.clone(), model[2].weight.grad.clone())
    rounded = lambda t: t.bfloat16().double()  # noqa: E731
    # exactly the formula on bf16-rounded inputs (float32 accumulation) ...
    assert rel_err(grads["bfloat16"][0], expected_ap(g0, rounded(x), GAMMA)) < TOL
    assert rel_err(grads["bfloat16"][1], expected_ap(g2, rounded(hidden[-1]), GAMMA)) < TOL
    # ... and close to the float32 statistic (bf16 keeps 8 bits of mantissa)
    assert rel_err(grads["bfloat16"][0], grads["float32"][0]) < 2e-2
    assert rel_err(grads["bfloat16"][1], grads["float32"][1]) < 2e-2
    assert rel_err(grads["bfloat16"][0], grads["float32"][0]) > 0  # it did round


def test_lora_adapters_share_one_statistic_under_a_bf16_base_model():
    # peft casts the bf16 hidden state to each float32 adapter's dtype separately; q/k/v (and
    # gate/up) adapters with dropout 0 must still share one statistic, and it must be the formula
    # on the cast input. With dropout > 0 each adapter sees its own dropped-out input: no sharing.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32)
    for dropout, shared in ((0.0, True), (0.1, False)):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]))
        attn = model.base_model.model.model.layers[0].self_attn
        q_a, k_a, v_a = (getattr(attn, p).lora_A["default"] for p in ("q_proj", "k_proj", "v_proj"))
        assert q_a.weight.dtype == torch.float32  # peft keeps adapters in float32 over a bf16 base
        q_in = capture_inputs(q_a)
        ap = dopr.ActivationPreconditioner(model, damping=GAMMA, max_rows_per_dim=None)
        ids = torch.randint(0, 64, (4, 16))  # 64 rows > d_in = 32: the dense solve
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        parts = {name: ap_layer.parts[0] for ap_layer in ap.layers for name in [ap_layer.name] if ap_layer.parts}
        q, k, v = (next(p for n, p in parts.items() if f"{proj}.lora_A" in n) for proj in ("q_proj", "k_proj", "v_proj"))
        assert (q is k is v) == shared
        g = q_a.weight.grad.clone()
        ap.step()
        if shared:
            assert q_in[0].dtype == torch.float32
            assert rel_err(q_a.weight.grad, expected_ap(g, q_in[0].reshape(-1, 32), GAMMA)) < TOL


def test_row_mask_keeps_padding_out_of_sigma_whatever_the_padding():
    # The same two sequences, right-padded to 9 and to 14 tokens: inside row_mask(attention_mask)
    # every layer's Sigma (and the embedding's token counts) must be the same; without the mask the
    # padded positions would enter it.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    seqs = [torch.randint(1, 32, (5,)), torch.randint(1, 32, (9,))]

    def batch(width):
        ids = torch.zeros(2, width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        return ids, ids.ne(0)

    sigmas = []
    for width, masked in ((9, True), (14, True), (14, False)):
        ap = dopr.ActivationPreconditioner(model, max_rows_per_dim=None)
        ids, mask = batch(width)
        with ap.row_mask(mask) if masked else torch.enable_grad():
            model(input_ids=ids, attention_mask=mask)
        sigmas.append(ap.second_moments())
        ap.reset_stats()
        ap.remove()
    assert sigmas[0].keys() == sigmas[1].keys() and len(sigmas[0]) >= 7
    for name in sigmas[0]:
        assert torch.allclose(sigmas[0][name], sigmas[1][name], rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(sigmas[1]["model.embed_tokens"], sigmas[2]["model.embed_tokens"])
    assert not torch.allclose(sigmas[1]["model.layers.0.mlp.down_proj"], sigmas[2]["model.layers.0.mlp.down_proj"])


def test_wide_inputs_take_the_split_gram_and_stay_the_formula():
    # d_in >= _SPLIT_GRAM_MIN_D: Z^T Z is built from _GRAM_BLOCKS column blocks (5/8 of the flops
    # with 4). Its product is checked against float64 (3 groups, widths around the threshold and odd
    # ones: unequal blocks), and so is the preconditioned gradient of a wide layer whose rows come
    # from two forwards (the first under d_in, kept for Woodbury, then merged into a sum).
    from dopr.preconditioner import _GRAM_BLOCKS, _SPLIT_GRAM_MIN_D, _gram_sym

    assert _GRAM_BLOCKS == 4
    for d in (_SPLIT_GRAM_MIN_D - 1, _SPLIT_GRAM_MIN_D, 301, 683):
        z = torch.randn(3, 500, d)
        want = z.double().transpose(1, 2) @ z.double()
        assert rel_err(_gram_sym(z), want) < 1e-6
    d = 257
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 3))
    seen = capture_inputs(model[0])
    ap = dopr.ActivationPreconditioner(model, damping=1.0, max_rows_per_dim=None)
    for n in (100, 400):  # 100 rows < d_in, then 500 in all
        model(torch.randn(n, d)).pow(2).sum().backward()
    g = model[0].weight.grad.clone()
    ap.step()
    assert rel_err(model[0].weight.grad, expected_ap(g, torch.cat(seen), 1.0)) < TOL


def test_stride_one_conv_grams_from_shifted_inputs_are_the_patch_grams():
    # _shifted_conv_gram sums products of the padded input with shifted copies of itself instead of
    # unfolding the patches: in float64 it must be F.unfold's Z^T Z per group, for kernels that are
    # square, oblong, even, 1x1, dilated, grouped, and every padding mode.
    from dopr.preconditioner import _conv_input, _shifted_conv_gram

    convs = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
             nn.Conv2d(3, 4, (3, 5), padding="same"), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2),
             nn.Conv1d(3, 5, 5, padding=2), nn.Conv1d(3, 5, 3, padding=1, padding_mode="circular"),
             nn.Conv2d(3, 4, (2, 3), padding=(1, 0), dilation=(2, 1)), nn.Conv2d(3, 4, 1), nn.Conv2d(2, 3, 4, padding=1)]
    for conv in convs:
        one_d = isinstance(conv, nn.Conv1d)
        x = torch.randn(5, conv.in_channels, *((9,) if one_d else (9, 8)), dtype=torch.float64)
        xp, kernel, stride, dilation, out = _conv_input(conv, x)
        g = conv.groups
        cols = F.unfold(xp, kernel, dilation=dilation)  # (B, C * kh * kw, positions), independent of the padding code
        rows = cols.transpose(1, 2).reshape(-1, g, cols.shape[1] // g).transpose(0, 1)
        want = rows.transpose(1, 2) @ rows
        assert rel_err(_shifted_conv_gram(xp, kernel, dilation, out, g), want) < 1e-12, conv


def test_large_stride_one_convs_take_the_shifted_gram_and_stay_the_formula(monkeypatch):
    # A 3x3 conv on 16x16 maps with 64 channels, exact statistic: 13 shifted products cost fewer
    # flops (counted 3x, _SHIFTED_GRAM_FLOP_COST) than its 9216 unfolded rows, so AP takes them; its gradient is the formula on every
    # patch. A stride-2 conv keeps the unfolded rows, and so do inputs too small for the products'
    # per-call overhead to pay.
    from dopr import preconditioner as pre

    calls = []
    original = pre._shifted_conv_gram
    monkeypatch.setattr(pre, "_shifted_conv_gram", lambda *a: calls.append(a[1]) or original(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 8, 3, stride=2, padding=1))
    seen = capture_inputs(model[2])
    ap = dopr.ActivationPreconditioner(model, damping=GAMMA, max_rows_per_dim=None)
    x = torch.randn(36, 64, 16, 16)
    model(x).pow(2).sum().backward()
    g0 = model[0].weight.grad.clone().reshape(32, -1)
    ap.step()
    assert len(calls) == 1  # the first layer only
    assert rel_err(model[0].weight.grad.reshape(32, -1), expected_ap(g0, conv2d_patches(x, 3, 1, 1), GAMMA)) < TOL
    assert seen  # the stride-2 layer took the unfolded path (and is covered by the tests above)
    shifted = lambda b, c, size: pre._shifted_gram_flops(b, c, 1, (3, 3), (1, 1), (size, size))  # noqa: E731
    assert shifted(2, 3, 6) > pre._gram_flops(72, 27, 1)  # tiny: the matmuls' overhead decides
    assert shifted(128, 64, 16) < pre._gram_flops(128 * 256, 576, 1)  # every row: shifted
    assert shifted(128, 64, 16) > pre._gram_flops(8 * 576, 576, 1)  # 8 rows per input: fewer flops


def test_a_wide_conv_with_fewer_rows_than_inputs_takes_the_dense_route_when_cheaper(monkeypatch):
    # 8x8 maps, 128 channels, batch 15: 960 rows < d_in = 1152, where Woodbury's Z Z^T (2 n^2 d) costs
    # more than the shifted gram plus a d x d factor; the gradient is still the formula.
    from dopr import preconditioner as pre

    calls = []
    original = pre._shifted_conv_gram
    monkeypatch.setattr(pre, "_shifted_conv_gram", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 4, 3, padding=1)
    # (damping 1, the default: a rank-deficient Sigma at damping 1e-3 has cond ~1e4, which float32 resolves to ~3e-4)
    ap = dopr.ActivationPreconditioner(conv, damping=1.0)
    x = torch.randn(15, 128, 8, 8)
    conv(x).pow(2).sum().backward()
    g = conv.weight.grad.clone().reshape(4, -1)
    ap.step()
    assert calls and rel_err(conv.weight.grad.reshape(4, -1), expected_ap(g, conv2d_patches(x, 3, 1, 1), 1.0)) < TOL
