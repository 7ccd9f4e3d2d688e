"""The real entry points as subprocesses with tiny settings (CleanRL style)."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}


def train(*overrides, check=True, timeout=300):
    flags = [o for o in overrides if o.startswith("-")]
    cmd = [sys.executable, "-m", "experiments.train", *flags, "scale=smoke", "threads=1", *[o for o in overrides if o not in flags]]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "dopr_muon"])
def test_one_run_logs_jsonl_and_an_offline_wandb_run(tmp_path, optimizer):
    run = tmp_path / optimizer
    train(f"optimizer={optimizer}", f"hydra.run.dir={run}")
    logged = rows(run)
    assert [r["step"] for r in logged if "train_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in logged if "val_loss" in r] == [3, 6]
    final = [r for r in logged if "accuracy" in r]
    assert len(final) == 1 and {"accuracy_steps1", "accuracy_steps4", "accuracy_extrap10"} <= set(final[0])
    # the headline covers the training lengths only; the extrapolation length is reported apart
    assert abs(final[0]["accuracy"] - (final[0]["accuracy_steps1"] + final[0]["accuracy_steps4"]) / 2) < 1e-9
    outcomes = [r for r in logged if "outcomes" in r]  # per problem, beside the rollout row
    assert [r["step"] for r in outcomes] == [6]
    for key in ("accuracy_steps1", "accuracy_steps4"):
        items = outcomes[0]["outcomes"][key]
        assert set(items) <= {0, 1} and abs(sum(items) / len(items) - final[0][key]) < 1e-9
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["final"]["step"] == 6 and summary["optimizer"] == optimizer
    # training time twice: wall (the budget axis) and the process's CPU time (wall far above it: shared cores, a pause)
    last = json.loads((run / "record.json").read_text())["evals"][-1]
    assert 0 < last["train_cpu_seconds"] and 0 < last["train_seconds"] and "train_cpu_seconds" not in last["metrics"]
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"
    machine = json.loads((run / "config.json").read_text())["machine"]
    assert machine["threads"] >= 1 and machine["cpu"] and machine["torch"] == torch.__version__
    coverage = [r for r in logged if "ap_coverage" in r]
    if optimizer.startswith("dopr_"):
        assert any(v.startswith("covered: linear") for v in coverage[0]["ap_coverage"].values())
        assert all("ap_fallback_eigh" in r for r in logged if "train_loss" in r)
    else:
        assert not coverage


def test_multirun_of_two_jobs_and_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    train("-m", "optimizer=adamw,dopr_adamw", "logger=none", f"hydra.sweep.dir={sweep}")
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["adamw-s0", "dopr_adamw-s0"]
    out = tmp_path / "results"
    subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--out", str(out), "--wandb"], cwd=ROOT,
                   check=True, capture_output=True, env=ENV)
    table = (out / "results.md").read_text()
    assert "| adamw | 1 |" in table and "| dopr_adamw | 1 |" in table
    assert (out / "val_loss_vs_accuracy.png").stat().st_size > 1000
    assert (out / "accuracy_vs_horizon.png").stat().st_size > 1000
    assert (out / "training_curves.png").stat().st_size > 1000 and "training_curves.png" in table
    meta = json.loads((out / "results_meta.json").read_text())
    assert meta["metric"] == "accuracy" and meta["higher_is_better"] and meta["horizons"] == {"extrap": [10], "steps": [1, 4]}
    # the report's W&B run (offline here): a Table with one row per run, beside a scatter plot
    logged = list(sweep.glob("wandb/offline-run-*/files/media/table/runs_*.table.json"))
    assert len(logged) == 1
    data = json.loads(logged[0].read_text())
    assert sorted(row[data["columns"].index("optimizer")] for row in data["data"]) == ["adamw", "dopr_adamw"]
    # the same runs give the same bytes (figures carry no timestamp)
    again = tmp_path / "again"
    subprocess.run([sys.executable, "scripts/report.py", str(sweep), "--out", str(again)], cwd=ROOT, check=True,
                   capture_output=True, env=ENV)
    for name in ("val_loss_vs_accuracy.png", "accuracy_vs_horizon.png", "training_curves.png", "results_runs.csv"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    common = ["optimizer=dopr_adamw", "logger=none", "trainer.steps=400", "trainer.checkpoint_every=20",
              "trainer.eval_every=1000", "trainer.rollout_every=1000", "trainer.log_every=10"]
    train(*common, f"hydra.run.dir={tmp_path / 'whole'}")
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.train", "scale=smoke", "threads=1", *common, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed: make it longer"
    first_sitting = torch.load(run / "checkpoint.pt", weights_only=False)["seconds"]
    out = train(*common, f"hydra.run.dir={run}")
    assert "resuming" in out.stdout
    assert first_sitting > 0 and json.loads((run / "summary.json").read_text())["wall_seconds"] > first_sitting + 0.1  # both sittings
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    steps = [r["step"] for r in rows(run) if "train_loss" in r]
    assert steps == list(range(10, 401, 10))  # every row once: none lost, none twice


@pytest.mark.slow  # several entry-point runs: keeps `make test` under 10 minutes; .ci/run runs it
def test_a_finished_run_restored_from_its_small_files_is_skipped(tmp_path):
    # A finished run's small files without its checkpoints (copied to a fresh machine): the finished run is not
    # trained again; a run whose summary says it failed is.
    import shutil

    run = tmp_path / "run"
    train("optimizer=adamw", "logger=none", f"hydra.run.dir={run}")
    kept = tmp_path / "kept"
    shutil.copytree(run, kept / "run", ignore=shutil.ignore_patterns("*.pt"))
    assert {"config.json", "metrics.jsonl", "summary.json", "record.json"} <= {p.name for p in (kept / "run").iterdir()}
    rows_before = (kept / "run" / "metrics.jsonl").read_text()
    again = train("optimizer=adamw", "logger=none", f"hydra.run.dir={kept / 'run'}")
    assert "already finished" in again.stdout and (kept / "run" / "metrics.jsonl").read_text() == rows_before
    summary = json.loads((kept / "run" / "summary.json").read_text())
    (kept / "run" / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    retrained = train("optimizer=adamw", "logger=none", f"hydra.run.dir={kept / 'run'}")
    assert "already finished" not in retrained.stdout and json.loads((kept / "run" / "summary.json").read_text())["status"] == "done"


def test_bad_input_stops_with_a_message_that_names_the_fix(tmp_path):
    out = train("task=nope", check=False)
    assert out.returncode != 0 and "task/nope" in out.stderr and "lm" in out.stderr  # Hydra lists the options
    out = train("optimizer=adam", check=False)
    assert out.returncode != 0 and "optimizer/adam" in out.stderr and "dopr_adamw" in out.stderr
    out = train("optimizer=sgd", "lr=1e12", "logger=none", f"hydra.run.dir={tmp_path / 'nan'}", check=False)
    assert out.returncode != 0 and "lower the learning rate" in out.stderr
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["status"] == "failed"
    out = train("task.pretrained=/nonexistent/model", "task.train_data=/nonexistent/train.jsonl", "logger=none",
                f"hydra.run.dir={tmp_path / 'missing'}", check=False)
    assert out.returncode != 0 and "/nonexistent" in out.stderr
    out = train("trainer.rollout_every=0", "logger=none", f"hydra.run.dir={tmp_path / 'zero'}", check=False)
    assert out.returncode != 0 and "rollout_every" in out.stderr and "set them to trainer.steps" in out.stderr


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.slow  # an entry-point run (~20 s): the slow suite keeps `make test` under 10 minutes
def test_paper_scale_lora_path_on_local_fixtures(tmp_path):
    """A tiny random Llama saved with save_pretrained and tiny files in the schemas of
    OpenMathInstruct-2, GSM8K and MATH-500 go through the real LoRA SFT path (length-bucketed batches,
    the LoRA weights merged for the rollout evaluation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sft = [{"problem": f"What is {a} plus {b}?", "generated_solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
            "expected_answer": str(a + b)} for a in range(6) for b in range(4)]
    gsm8k = [{"question": f"Tom has {a} apples and buys {b}. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 1)]]
    gsm8k_train = [{"question": f"Ann has {a} pens and finds {b}. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a in range(3) for b in range(3)]
    math500 = [{"problem": f"Compute ${a}+{b}$.", "answer": str(a + b), "solution": "", "subject": "Algebra", "level": 1, "unique_id": str(i)}
               for i, (a, b) in enumerate([(2, 2), (7, 1)])]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    texts = [json.dumps(r) for r in sft + gsm8k + math500]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    model_dir = tmp_path / "tiny-llama"
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    run = tmp_path / "run"
    train("optimizer=dopr_adamw", "logger=none", f"hydra.run.dir={run}", f"task.pretrained={model_dir}",
          f"task.train_data={write_jsonl(tmp_path / 'omi2.jsonl', sft)}", "task.train_size=16", "task.val_size=8",
          f"+task.eval_data.gsm8k={{test: {write_jsonl(tmp_path / 'gsm8k.jsonl', gsm8k)}, train: {write_jsonl(tmp_path / 'gsm8k_train.jsonl', gsm8k_train)}}}",
          f"+task.eval_data.gsm8k_cot={tmp_path / 'gsm8k.jsonl'}",
          f"+task.eval_data.gsm8k_zeroshot={tmp_path / 'gsm8k.jsonl'}",
          f"+task.eval_data.math500={write_jsonl(tmp_path / 'math500.jsonl', math500)}",
          "task.max_len=96", "task.max_new_tokens=12", "task.lora.r=4", "task.lora.target_modules=[q_proj,v_proj]",
          '+task.stop_strings=["Question:"]', "task.eval_size=2", "task.sampling=bucketed", "task.merge_lora_for_eval=true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    final = summary["final"]
    # GSM8K and GSM8K-CoT through lm-evaluation-harness (strict and flexible extraction), the others in-house
    assert {"accuracy_gsm8k", "accuracy_gsm8k_flexible", "accuracy_gsm8k_cot", "accuracy_gsm8k_cot_flexible", "accuracy_gsm8k_zeroshot",
            "accuracy_math500", "accuracy"} <= set(final)
    strict = [final[k] for k in ("accuracy_gsm8k", "accuracy_gsm8k_cot", "accuracy_gsm8k_zeroshot", "accuracy_math500")]
    assert abs(final["accuracy"] - sum(strict) / 4) < 1e-9
    coverage = next(r for r in rows(run) if "ap_coverage" in r)["ap_coverage"]
    covered = [n for n, v in coverage.items() if v.startswith("covered")]
    assert covered and all(".lora_" in n for n in covered)


@pytest.mark.slow  # several entry-point runs: keeps `make test` under 10 minutes; .ci/run runs it
def test_lm_lora_pretrains_once_then_fine_tunes_only_the_adapters_through_the_entry_point(tmp_path):
    """task=lm_lora: the first run pretrains and caches the base model (with its checksum), a second run
    reuses it; AP covers every lora_A/lora_B and nothing else; an edited cache file is refused."""
    data = tmp_path / "data"
    first = train("optimizer=dopr_adamw", "task=lm_lora", "logger=none", f"task.data_dir={data}", f"hydra.run.dir={tmp_path / 'a'}")
    assert "pretraining the base model" in first.stdout
    (weights,) = (data / "lm_lora_base").glob("base-*.pt")
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() and set(meta["accuracy"]) == {"steps1", "steps4", "extrap10"}
    second = train("optimizer=adamw", "task=lm_lora", "logger=none", f"task.data_dir={data}", f"hydra.run.dir={tmp_path / 'b'}")
    assert "pretraining" not in second.stdout
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "done"
    coverage = next(r for r in rows(tmp_path / "a") if "ap_coverage" in r)["ap_coverage"]
    covered = sorted(n for n, v in coverage.items() if v.startswith("covered"))
    lora = sorted(n for n in coverage if ".lora_A." in n or ".lora_B." in n)
    assert covered == lora and len(lora) == 2 * 7  # one layer at smoke scale, every projection, A and B
    assert all(v.startswith("not covered: frozen") for n, v in coverage.items() if n not in lora and "base_layer" in n)
    # checkpoints keep the adapters only (the frozen base comes from the cache); the run built its model on the cached weights
    kept = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert kept and all(".lora_" in k for k in kept), sorted(kept)[:3]
    longer = train("optimizer=adamw", "task=lm_lora", "logger=none", f"task.data_dir={data}", f"hydra.run.dir={tmp_path / 'b'}", "trainer.steps=8")
    assert "resuming" in longer.stdout and json.loads((tmp_path / "b" / "summary.json").read_text())["final"]["step"] == 8
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm_lora", "scale=smoke", f"task.data_dir={data}"])
    model = build_task(cfg.task, 0, torch.device("cpu")).model
    base = torch.load(weights, weights_only=True)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[f"base_model.model.{w.replace('.weight', '.base_layer.weight')}"], base[w])
    weights.write_bytes(weights.read_bytes()[:-8] + b"12345678")
    bad = train("optimizer=adamw", "task=lm_lora", "logger=none", f"task.data_dir={data}", f"hydra.run.dir={tmp_path / 'c'}", check=False)
    assert bad.returncode != 0 and "delete both and rerun" in bad.stderr + bad.stdout


def test_micro_batches_with_checkpointing_give_the_full_batch_loss_and_preconditioned_gradients(tmp_path):
    """4 micro-batches under activation checkpointing against one full batch: the same loss and the
    same AP-preconditioned gradients (float32: relative error < 1e-5 per parameter; only the
    summation order differs, ~1e-6), and every real token enters AP's statistics exactly once (not again when the
    checkpointed forward is recomputed inside backward)."""
    import copy

    from hydra import compose, initialize_config_dir

    import dopr
    from experiments.tasks import build_task
    from experiments.engine import accumulate_gradients, enable_checkpointing

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.model.layers=2"])
    task = build_task(cfg.task, 0, torch.device("cpu"))
    batch = task.train_batch(0)
    real_tokens = int(batch[2].sum())
    assert real_tokens < batch[2].numel()  # the batch has padding, which must stay out
    out = []
    for micro, checkpointing in ((1, False), (4, True)):
        model = copy.deepcopy(task.model).train()
        if checkpointing:
            enable_checkpointing(model)
        opt = dopr.build_optimizer(model, "dopr_adamw", lr=1e-3, max_rows_per_dim=None)
        ap = opt.preconditioner
        loss = accumulate_gradients(task, model, batch, micro, ap)
        q_proj = next(layer for layer in ap.layers if layer.name.endswith("layers.1.self_attn.q_proj"))
        assert sum(part.count for part in q_proj.parts) == real_tokens
        ap.step()
        out.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full), (micro_loss, micro) = out
    torch.testing.assert_close(micro_loss, full_loss, rtol=1e-5, atol=0)
    assert full.keys() == micro.keys()
    for name in full:  # relative Frobenius error; float32 summation order alone gives ~1e-6
        err = ((micro[name] - full[name]).norm() / full[name].norm()).item()
        assert err < 1e-5, (name, err)


def test_answer_extraction():
    from experiments.tasks.lm import extract_answer, make_problem
    from experiments.tasks.lm_pretrained import final_answer
    import random

    assert extract_answer("3+4=7. #### 7") == "7"
    assert final_answer("so \\boxed{1,200}.") == "1200" and final_answer("#### 42.") == "42" and final_answer("x = 3.0") == "3"
    p = make_problem(random.Random(0), 3)
    assert p["steps"] == 3 and extract_answer(p["solution"]) == p["answer"] and p["solution"].count("=") == 3


def test_arithmetic_chains_respect_their_limits_and_their_solutions_are_right():
    import random
    import re

    from experiments.tasks.lm import make_problem

    rng = random.Random(1)
    for _ in range(300):
        k = rng.randint(1, 12)
        p = make_problem(rng, k, operand_max=19, total_max=199)
        start, *ops = p["question"].removesuffix(" = ?").split(" ")
        assert len(ops) == k and p["steps"] == k
        total = int(start)
        for op, line in zip(ops, p["solution"].split(" #### ")[0].split(" ")):
            assert 1 <= abs(int(op)) <= 19
            a, sign, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)\.", line).groups()
            assert int(a) == total and sign + b == op  # each line carries the previous total forward
            total += int(op)
            assert int(c) == total and 0 <= total <= 199
        assert p["answer"] == str(total)


def test_lm_validation_loss_is_a_per_token_mean_whatever_the_eval_batch(tmp_path):
    # Validation sequences differ in length, so a mean of per-batch means would depend on how the
    # set is batched; the per-token mean must not.
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task
    from experiments.engine import validation_loss

    losses = []
    for eval_batch in (64, 7):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", f"task.eval_batch_size={eval_batch}"])
        task = build_task(cfg.task, 0, torch.device("cpu"))
        losses.append(validation_loss(task, task.model))
        terms = [task.val_loss_terms(task.model, b) for b in task.val_batches()]
        by_hand = sum(t for t, _ in terms) / sum(n for _, n in terms)
        assert abs(losses[-1] - by_hand) < 1e-9
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[0]


@pytest.mark.parametrize("task_name", ["lm", "lm_lora"])
def test_chunked_validation_loss_equals_the_models_own_loss(tmp_path, task_name):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task
    from experiments.engine import validation_loss

    losses = []
    for chunk in (None, 7):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"task={task_name}", "scale=smoke", f"task.data_dir={tmp_path}", f"task.val_loss_chunk={chunk or 'null'}",
                                              "task.val_batch_size=16"])
        task = build_task(cfg.task, 0, torch.device("cpu"))
        assert [b[0].shape[0] for b in task.val_batches()] == [16] * 4
        losses.append(validation_loss(task, task.model))
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[0], losses


def test_epoch_sampling_sees_every_example_once_per_epoch_and_is_a_function_of_the_step(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.sampling=epochs",
                                          "task.train_size=64", "task.batch_size=8"])
    task = build_task(cfg.task, 0, torch.device("cpu"))
    rows = {tuple(r.tolist()) for r in task.train[0]}
    assert len(rows) == 64  # distinct problems, so a row identifies an example
    for epoch in range(2):
        seen = [tuple(r.tolist()) + (0,) * (task.train[0].shape[1] - len(r)) for k in range(8) for r in task.train_batch(8 * epoch + k)[0]]
        assert sorted(seen) == sorted(rows)  # each example exactly once in the epoch
    assert torch.equal(task.train_batch(3)[0], task.train_batch(3)[0])
    assert not torch.equal(task.train_batch(0)[0], task.train_batch(8)[0])  # a new permutation each epoch


def test_lm_headline_accuracy_covers_training_lengths_and_extrapolation_is_apart(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.train_steps=[1,2,3,4]",
                                          "task.eval_steps=[1,4]", "task.extrap_steps=[6]"])
    task = build_task(cfg.task, 0, torch.device("cpu"))
    # a scorer that gets every 1-step and every extrapolated problem right, nothing else
    task._score = lambda model, problems: [int(p["steps"] in (1, 6)) for p in problems]
    result = task.evaluate(task.model)
    out = result.metrics
    assert out["accuracy_steps1"] == 1 and out["accuracy_steps4"] == 0 and out["accuracy_extrap6"] == 1
    assert out["accuracy"] == 0.5  # not 2/3: the extrapolation length stays out of the headline
    assert set(result.outcomes) == {"accuracy_steps1", "accuracy_steps4", "accuracy_extrap6"}
    assert all(p["steps"] in (1, 4) for ps in task.select_sets.values() for p in ps)  # checkpoints are chosen on training lengths
    # an intermediate rollout skips the extrapolation lengths (cheaper); the headline and selection are the same
    mid = task.evaluate(task.model, final=False)
    assert "accuracy_extrap6" not in mid.metrics and set(mid.outcomes) == {"accuracy_steps1", "accuracy_steps4"}
    assert mid.metrics["accuracy"] == out["accuracy"] and mid.metrics["select_accuracy"] == out["select_accuracy"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        bad = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.train_steps=[1,2,3,4]",
                                          "task.eval_steps=[1,5]"])
    with pytest.raises(ValueError, match="task.extrap_steps"):
        build_task(bad.task, 0, torch.device("cpu"))


def test_gsm8k_sets_keep_lm_evaluation_harness_prompts_shots_and_regexes(tmp_path):
    """Local GSM8K files change only the data source of lm-eval's own task YAMLs: the prompt, the number
    of shots, the stop sequences and both answer filters stay lm-eval's."""
    from experiments.tasks.lm_pretrained import LMEvalSets

    rows = [{"question": f"q{i}", "answer": f"{i}\n#### {i}"} for i in range(8)]
    test, train = write_jsonl(tmp_path / "test.jsonl", rows), write_jsonl(tmp_path / "train.jsonl", rows)
    sets = LMEvalSets({"gsm8k": {"test": test, "train": train}, "gsm8k_cot": test})
    tasks = sets.manager.load(list(sets.tasks.values()))["tasks"]
    gsm8k, cot = (tasks[sets.tasks[n]].config for n in ("gsm8k", "gsm8k_cot"))
    assert gsm8k.doc_to_text == "Question: {{question}}\nAnswer:" and gsm8k.num_fewshot == 5 and cot.num_fewshot == 8
    assert "Question:" in gsm8k.generation_kwargs["until"] and "Q:" in cot.generation_kwargs["until"]
    for config in (gsm8k, cot):
        filters = {f["name"]: f["filter"][0] for f in config.filter_list}
        assert filters["strict-match"]["regex_pattern"] in ("#### (\\-?[0-9\\.\\,]+)", "The answer is (\\-?[0-9\\.\\,]+).")
        assert filters["flexible-extract"]["regex_pattern"] == "(-?[$0-9.,]{2,})|(-?[0-9]+)"
    assert len(tasks[sets.tasks["gsm8k"]].eval_docs) == 8
    with pytest.raises(ValueError, match="train"):
        LMEvalSets({"gsm8k": test})  # 5-shot needs the train split


def test_math_answers_are_scored_by_math_verify_and_gsm8k_by_the_number():
    from experiments.tasks.lm_pretrained import is_correct

    right = [(r"\frac{\sqrt{3}}{2}", r"so the answer is \boxed{\frac{\sqrt{3}}{2}}"), (r"3\sqrt{2}", r"The answer is \boxed{3\sqrt{2}}"),
             (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}"), ("(1,2)", r"\boxed{\left(1,2\right)}"), ("1000", r"\boxed{1,000}"),
             ("-5", r"so \boxed{-5}")]
    for gold, text in right:
        assert is_correct("math500", text, gold), (gold, text)
    assert not is_correct("math500", r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{\sqrt{3}}{2}")
    assert not is_correct("math500", r"\boxed{2}", r"\frac{\sqrt{3}}{2}")  # the old one-level-of-braces bug scored "2"
    assert is_correct("gsm8k", "She has 3+4=7 apples.\n#### 1,234", "1234")
    assert not is_correct("gsm8k", "#### 12", "1234")


def test_bf16_precision_trains_through_the_entry_point_and_bad_precision_names_the_fix(tmp_path):
    run = tmp_path / "bf16"
    train("optimizer=dopr_adamw", "trainer.precision=bf16", f"hydra.run.dir={run}", "logger=none")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and math.isfinite(summary["final"]["val_loss"])
    trained = [r for r in rows(run) if "train_loss" in r]
    assert all(r["ap_fallback_skipped"] == 0 and r["ap_fallback_nonfinite_stats"] == 0 for r in trained)
    out = train("optimizer=adamw", "trainer.precision=fp16", f"hydra.run.dir={tmp_path / 'bad'}", "logger=none", check=False)
    assert out.returncode != 0 and "choose fp32 or bf16" in out.stderr + out.stdout


def test_lm_best_checkpoint_is_chosen_on_selection_problems_disjoint_from_the_reported_ones(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}"])
    task = build_task(cfg.task, 0, torch.device("cpu"))
    for k, problems in task.select_sets.items():
        assert problems and not {p["question"] for p in problems} & {p["question"] for p in task.eval_sets[k]}
    run = tmp_path / "run"
    train("optimizer=adamw", f"hydra.run.dir={run}", "logger=none", f"task.data_dir={tmp_path}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["chosen_on"] == "selection set"
    final = [r for r in rows(run) if "accuracy" in r]
    assert all("select_accuracy" in r for r in final)


def test_lm_lora_does_not_inherit_the_lm_tasks_tuned_settings():
    """task=lm_lora builds on configs/task/lm.yaml, whose `tuned` block was selected for training from
    scratch: without lr=, a LoRA run gets its own task.lr and its own tuning's settings, not lm's."""
    from hydra import compose, initialize_config_dir

    from experiments.protocol import resolve

    def resolved(task):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"task={task}", "scale=cpu", "optimizer=adamw"])
        return cfg, resolve(cfg, given=set())

    lm, got = resolved("lm")
    assert got.optimizer.weight_decay == lm.task.tuned.adamw.weight_decay != lm.optimizer.weight_decay  # lm's tuning applies
    lora, got = resolved("lm_lora")
    assert got.lr == lora.task.lr.adamw and got.optimizer.weight_decay == lora.task.tuned.adamw.weight_decay  # its own tuning's
    assert lora.task.tuned.adamw.weight_decay != lm.task.tuned.adamw.weight_decay
    # Hydra merges lm_lora.yaml's tuned block into lm's: no key of lm's tuning may leak into a LoRA run's settings
    from omegaconf import OmegaConf

    own = OmegaConf.load(ROOT / "configs" / "task" / "lm_lora.yaml").tuned
    assert OmegaConf.to_container(lora.task.tuned) == OmegaConf.to_container(own), "lm.yaml's tuned block leaks into lm_lora: set those keys in lm_lora.yaml"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs" / "sweep").glob("*.yaml")))
def test_every_sweep_preset_composes_and_names_its_runs(preset):
    """Each sweep preset's first and last grid points compose into a valid config (keys exist, values
    parse), and the run-folder name it writes resolves: a typo in a preset would otherwise show only
    when its sweep starts, possibly hours into a make target."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from experiments.protocol import resolve

    params = OmegaConf.load(ROOT / "configs" / "sweep" / f"{preset}.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    for pick in (0, -1):
        overrides = []
        for o in parsed:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            overrides.append(f"{o.get_key_element()}={values[pick]}")  # keeps a + prefix
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[f"+sweep={preset}", *overrides], return_hydra_config=True)
        assert cfg.hydra.sweep.dir.startswith(f"runs/{cfg.task.name}/")
        assert "${" not in OmegaConf.to_container(cfg.hydra.sweep, resolve=True)["subdir"]
        resolve(cfg, given=set())


def test_task_lr_gives_every_optimizer_the_same_ladder_grid_around_its_pinned_centre():
    """lr=${task_lr:k} in a tuning preset: the optimizer's centre (the preset's lr_centre, else task.lr) moved k
    rungs along 1, 3, 10, 30, ...; the centre stays pinned when task.lr changes after a tuning is pasted."""
    from hydra import compose, initialize_config_dir

    from experiments.protocol import lr_ladder

    assert [lr_ladder(1e-3, k) for k in (-2, -1, 0, 1, 2)] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert [lr_ladder(3e-3, k) for k in (-1, 1)] == [1e-3, 1e-2] and lr_ladder(5e-4, 0) == 3e-4  # snapped to a rung
    with pytest.raises(ValueError, match="positive learning rate"):
        lr_ladder(0.0, 1)

    def lr(overrides, opt):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose("train", overrides=[*overrides, "task=control", f"optimizer={opt}"]).lr

    # the presets sweep +lr_step and set lr: ${task_lr:${lr_step}}, resolved per job (a real multirun checked it:
    # an interpolation among the sweeper params is resolved once, with the default optimizer)
    assert [lr(["+sweep=control_tune_base", f"+lr_step={k}"], "signum") for k in (-1, 0, 1)] == [3e-5, 1e-4, 3e-4]
    assert lr(["+sweep=control_tune_dopr", "+lr_step=1", "task.lr.dopr_muon=0.1"], "dopr_muon") == 3e-3  # lr_centre (1e-3) wins
    assert lr(["+sweep=control_tune_extend_base", "+lr_step=0"], "signum") == 1e-5  # the second round: one LR per optimizer
    assert lr(["task.lr.muon=0.1", "lr=${task_lr:-1}"], "muon") == 3e-2  # without a preset: task.lr is the centre


def test_training_processes_keep_freed_memory_for_the_next_step():
    """experiments.engine.keep_freed_memory (glibc's mallopt): a loop that allocates large tensors and
    frees them all, as every CPU training step does, page-faults them in once, not at every iteration.
    glibc's default varies with the address-space layout (here from ~1 to 50 iterations' worth of page
    faults between two runs of the same script: docs/experiments.md has the training-step numbers), so
    only the kept case is asserted."""
    import platform

    code = """
import resource, sys, torch
from experiments.engine import keep_freed_memory
kept = keep_freed_memory()
def step():
    xs = [torch.ones(4 << 20) for _ in range(6)]  # 6 x 16 MiB, then all freed
    del xs
for _ in range(3):  # the first steps fault their pages in (and torch's own first allocations): not counted
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    kept, faults = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert kept == str(glibc)
    if glibc:  # kept: none of the 50 steps after the warm-up faults its pages in again (0 here, 5 of 5 runs); the
        # bound is less than one step's pages (6 x 4096). Without: 0 or 1.2 M here, by layout. Counting from the
        # first step instead read 28-45 K with the memory kept, by layout, against a bound of 37 K: a flaky test.
        assert int(faults) < 6 * 4096, faults


def test_validation_loss_builds_no_graph_and_restores_the_training_mode():
    from experiments.engine import validation_loss
    from experiments.tasks.base import Task as TaskBase

    class Task(TaskBase):  # only the two hooks it needs; the validation loss is the base's mean over batches
        def val_batches(self):
            yield torch.ones(2, 3)
            yield torch.zeros(2, 3)

        def loss(self, model, batch):
            grad.append(torch.is_grad_enabled())
            return model(batch).sum()

    grad, model = [], torch.nn.Linear(3, 1)
    model.train()
    expected = (model(torch.ones(2, 3)).sum() + model(torch.zeros(2, 3)).sum()).item() / 2
    assert abs(validation_loss(Task(), model) - expected) < 1e-6 and grad == [False, False] and model.training


def test_lm_hard_family_is_mixed_into_training_and_the_headline_with_disjoint_selection(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    hard = "task.hard={fraction:0.25,operand_max:49,total_max:199}"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.train_steps=[1,2]",
                                          "task.eval_steps=[1,2]", "task.extrap_steps=[]", "task.max_len=64", hard])
    task = build_task(cfg.task, 0, torch.device("cpu"))
    assert set(task.eval_sets) == {"steps1", "steps2", "hard1", "hard2"}
    assert all(len(task.eval_sets[f"hard{k}"]) == len(task.eval_sets[f"steps{k}"]) == cfg.task.eval_per_length for k in (1, 2))
    # the hard family draws operands up to its operand_max; the easy family's stay at most 9
    def operands(p):
        return [abs(int(t)) for t in p["question"].split()[1:-2]]

    assert any(max(operands(p)) > 9 for k in (1, 2) for p in task.eval_sets[f"hard{k}"])
    assert all(max(operands(p)) <= 9 for k in (1, 2) for p in task.eval_sets[f"steps{k}"])
    # a quarter of the training problems are hard: decode the encoded questions and count operands above 9
    tok = task.tok
    questions = [tok.decode(row.tolist()).split("\n")[0] for row in task.train[0]]
    big = sum(any(abs(int(t)) > 9 for t in q.split()[1:-2]) for q in questions)
    assert 0.1 < big / len(questions) <= 0.25 + 1e-9  # not every hard problem draws an operand above 9
    for k in (1, 2):
        reported = {p["question"] for p in task.eval_sets[f"hard{k}"]}
        assert task.select_sets[f"hard{k}"] and not reported & {p["question"] for p in task.select_sets[f"hard{k}"]}
    # the headline is the mean over both families' reported problems
    task._score = lambda model, problems: [1 if problems is task.eval_sets["hard1"] else 0 for _ in problems]
    out = task.evaluate(task.model).metrics
    assert out["accuracy_hard1"] == 1 and out["accuracy_steps1"] == 0 and out["accuracy"] == 0.25
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        bad = compose("train", overrides=["task=lm", "scale=smoke", f"task.data_dir={tmp_path}", "task.hard={fraction:1.0,operand_max:49,total_max:199}"])
    with pytest.raises(ValueError, match=r"task.hard.fraction=1.0 must lie in \(0, 1\)"):
        build_task(bad.task, 0, torch.device("cpu"))


@pytest.mark.slow  # two entry-point runs
def test_light_rollouts_add_budget_points_and_change_nothing_else(tmp_path):
    """trainer.light_rollout_every (the budget axis): rows at the light steps with the headline metric on
    task.light_per_length problems per length, flagged, no selection score; the training, the full evaluations and
    the best checkpoint are those of the same run without them (evaluation draws no training randomness)."""
    runs = {}
    for name, extra in (("plain", ()), ("light", ("trainer.light_rollout_every=2", "task.light_per_length=1"))):
        runs[name] = tmp_path / name
        train("optimizer=dopr_adamw", f"hydra.run.dir={runs[name]}", "logger=none", f"task.data_dir={tmp_path / 'data'}", *extra)
    plain, light = rows(runs["plain"]), rows(runs["light"])
    flagged = [r for r in light if r.get("light")]
    assert [r["step"] for r in flagged] == [2, 4] and all("accuracy" in r and "select_accuracy" not in r for r in flagged)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("train_seconds", "train_cpu_seconds", "rollout_seconds", "steps_per_s")}  # noqa: E731
                        for r in rs if not r.get("light")]
    assert strip(light) == strip(plain)  # every training and full evaluation row, to the last digit
    a, b = (torch.load(runs[n] / "checkpoint.pt", weights_only=True)["model"] for n in ("plain", "light"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = [json.loads((runs[n] / "summary.json").read_text())["best"] for n in ("plain", "light")]
    assert best[0]["step"] == best[1]["step"] == 6
