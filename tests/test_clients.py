"""DoPr inside other people's training code, through the real APIs, on tiny models built from config
objects (no download): Hugging Face ``Trainer`` with GPT-2 and with Llama (gradient accumulation 2), a
plain loop under ``torch.compile``, and ``accelerate``. Each checks the coverage summary and that DoPr's
update differs from its base optimizer's where AP covers a layer (and only there, on the first step)."""

import warnings

import pytest
import torch

import dopr

transformers = pytest.importorskip("transformers")

VOCAB, LR = 97, 3e-3


def gpt2():
    # dropout off: two runs from one initialisation see the same forward
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def token_data(n=64, length=16):
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_run(model, optimizer, out, steps, batch=4, accumulation=2):
    """Train with transformers.Trainer and the given optimizer; the logged loss of every step."""
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_data(), optimizers=(optimizer, None))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def no_coverage_warning(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error", dopr.CoverageWarning)
        return build()


def one_step_updates(make_model, tmp_path, name):
    """Weights after one Trainer step from one initialisation: with DoPr-<name> and with <name>."""
    out = {}
    for opt_name in (f"dopr_{name}", name):
        model = make_model()
        opt = no_coverage_warning(lambda: dopr.build_optimizer(model, opt_name, lr=LR))
        trainer_run(model, opt, tmp_path / opt_name, steps=1)
        out[opt_name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out[f"dopr_{name}"], out[name]


@pytest.mark.slow  # two Trainer runs of 30 steps and two of one step: about 30 s on 2 cores
def test_hf_trainer_gpt2_conv1d_layers_are_covered_and_change_the_update(tmp_path):
    model = gpt2()
    opt = no_coverage_warning(lambda: dopr.DoPr(model, base="adamw", lr=LR))
    ap = opt.preconditioner
    cover = ap.coverage()
    conv1d = sorted(n for n, v in cover.items() if v.startswith("covered: linear") and "transformers Conv1D" in v)
    assert conv1d == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert cover["transformer.wpe"].startswith("covered: embedding")
    assert "tied" in cover["transformer.wte"] and "tied" in cover["lm_head"]
    summary = ap.coverage_summary()
    assert "8 transformers Conv1D" in summary and "tied: transformer.wte, lm_head (6,208 parameters)" in summary
    assert ap.covered_fraction == pytest.approx(1 - 97 * 64 / (97 * 64 + 32 * 64 + 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)))

    dopr_losses = trainer_run(model, opt, tmp_path / "dopr", steps=30)
    base = gpt2()
    adamw_losses = trainer_run(base, dopr.build_optimizer(base, "adamw", lr=LR), tmp_path / "adamw", steps=30)
    assert len(dopr_losses) == len(adamw_losses) == 30
    assert dopr_losses[0] == adamw_losses[0]  # one initialisation, one first batch
    assert abs(dopr_losses[-1] - adamw_losses[-1]) > 1e-3, (dopr_losses[-1], adamw_losses[-1])
    assert ap.steps == 30 and all(layer.refreshed for layer in ap.layers)

    # First step: every Conv1D moves differently; the tied (uncovered) matrix exactly as with AdamW. (The
    # position embedding's AP is a per-row rescale, which Adam's first, sign-like step hides.)
    with_ap, without = one_step_updates(gpt2, tmp_path, "adamw")
    for name in conv1d:
        assert (with_ap[f"{name}.weight"] - without[f"{name}.weight"]).abs().max() > 1e-4, name
    assert torch.equal(with_ap["transformer.wte.weight"], without["transformer.wte.weight"])


@pytest.mark.slow  # two Trainer runs of 30 steps, three of one: about 25 s on 2 cores
def test_hf_trainer_llama_every_linear_covered_and_accumulation_pools_rows(tmp_path):
    model = llama()
    opt = no_coverage_warning(lambda: dopr.DoPr(model, base="adamw", lr=LR))
    ap = opt.preconditioner
    assert ap.covered_fraction == 1.0 and not ap.uncovered
    assert sum(v.startswith("covered: linear") for v in ap.coverage().values()) == 2 * 7 + 1  # q k v o gate up down; lm_head
    dopr_losses = trainer_run(model, opt, tmp_path / "dopr", steps=30)
    base = llama()
    adamw_losses = trainer_run(base, dopr.build_optimizer(base, "adamw", lr=LR), tmp_path / "adamw", steps=30)
    assert dopr_losses[0] == adamw_losses[0] and abs(dopr_losses[-1] - adamw_losses[-1]) > 1e-3

    # Gradient accumulation: 2 micro-batches of 4 give the update of one batch of 8 (AP pools their rows).
    # SGD without momentum as the GP, so the update is the preconditioned gradient itself (Adam's first
    # step is a sign and would hide a wrong statistic); plain SGD's update is different.
    updates = {}
    for key, batch, accumulation, name in (("acc", 4, 2, "dopr_sgd"), ("full", 8, 1, "dopr_sgd"), ("sgd", 4, 2, "sgd")):
        m = llama()
        start = {k: v.clone() for k, v in m.state_dict().items()}
        trainer_run(m, dopr.build_optimizer(m, name, lr=1.0, momentum=0.0), tmp_path / key, steps=1, batch=batch, accumulation=accumulation)
        updates[key] = {k: v - start[k] for k, v in m.state_dict().items()}
    for layer in ap.layers:
        key = f"{layer.name}.weight"
        acc, full, sgd = updates["acc"][key], updates["full"][key], updates["sgd"][key]
        assert (acc - full).norm() / full.norm() < 1e-4, key
        assert (acc - sgd).norm() / sgd.norm() > 1e-2, key


@pytest.mark.slow  # compiling on the CPU: about 70 s on 2 cores
def test_plain_loop_under_torch_compile_matches_eager(tmp_path):
    batches = torch.stack([d["input_ids"] for d in token_data(20)]).reshape(5, 4, 16)

    def run(name, compiled):
        model = gpt2()
        opt = no_coverage_warning(lambda: dopr.build_optimizer(model, name, lr=LR))
        forward = torch.compile(model) if compiled else model
        for ids in batches:  # 5 steps
            forward(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    eager, opt = run("dopr_adamw", False)
    compiled, opt_compiled = run("dopr_adamw", True)
    plain, _ = run("adamw", False)
    covered = [f"{layer.name}.weight" for layer in opt.preconditioner.layers]
    assert len(covered) == 9 and all(layer.refreshed for layer in opt_compiled.preconditioner.layers)
    start = gpt2().state_dict()
    e, c, p = ({k: v - start[k] for k, v in m.state_dict().items()} for m in (eager, compiled, plain))  # 5 steps' updates
    gaps = {key: (float((c[key] - e[key]).norm() / e[key].norm()), float((p[key] - e[key]).norm() / e[key].norm())) for key in covered}
    assert all(compiled_gap < 1e-4 and adamw_gap > 0.05 for compiled_gap, adamw_gap in gaps.values()), gaps


@pytest.mark.slow  # three runs of 4 steps: about 9 s on 2 cores
def test_accelerate_with_gradient_accumulation_matches_a_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    data = token_data(16)
    batches = [torch.stack([d["input_ids"] for d in data[i : i + 2]]) for i in range(0, 16, 2)]  # 8 micro-batches of 2

    def plain(name):
        model = llama()
        opt = dopr.build_optimizer(model, name, lr=LR)
        for i, ids in enumerate(batches):
            (model(input_ids=ids, labels=ids).loss / 2).backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
        return model

    model = llama()
    opt = no_coverage_warning(lambda: dopr.DoPr(model, base="adamw", lr=LR))
    try:
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model_p, opt_p = accelerator.prepare(model, opt)
        for ids in batches:
            with accelerator.accumulate(model_p):
                accelerator.backward(model_p(input_ids=ids, labels=ids).loss)
                opt_p.step()  # a no-op on the first micro-batch of each pair: AP pools both
                opt_p.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert opt.preconditioner.steps == 4
    reference, adamw = plain("dopr_adamw"), plain("adamw")
    for layer in opt.preconditioner.layers:
        key = f"{layer.name}.weight"
        got, want, base = model.state_dict()[key], reference.state_dict()[key], adamw.state_dict()[key]
        assert (got - want).norm() / want.norm() < 1e-6, key
        assert (base - want).norm() / want.norm() > 1e-3, key
