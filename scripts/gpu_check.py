"""A few DoPr steps of every task's paper-shaped model on one device, with synthetic data in the real
formats: step time of AdamW and of DoPr-AdamW (interleaved, same batches), AP's share of the DoPr
step, and peak memory. No download; random-initialised models.

    bash scripts/gpu_check.sh                          # on a GPU: the paper shapes (a few minutes on one H200)
    bash scripts/gpu_check.sh --device cpu --tiny      # the same code at toy sizes (CI)

Workloads (from the suite's own model code and `scale=paper` configs):
- lm: Llama-3.2-3B's widths (3072 / 8192, 24 heads, 8 KV heads, vocabulary 128256) with 2 layers
  instead of 28, bf16 base, the paper preset's LoRA, 16 sequences of 1024 tokens as 4 micro-batches
  with activation checkpointing (the training loop's own accumulate_gradients);
- flow: the CIFAR-10 UNet of configs/task_scale/flow_paper.yaml, batch 128 of 3x32x32;
- robot: the Diffusion Policy of configs/task_scale/robot_paper.yaml (two 240x240 cameras, 2
  observation steps, U-Net 256/512/1024), batch 64;
- control: the residual MLP of configs/task_scale/control_paper.yaml on Humanoid-sized inputs (348 -> 17), batch 1024.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dopr  # noqa: E402


def compose(task: str, tiny: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=[f"task={task}", f"scale={'smoke' if tiny else 'paper'}", "logger=none"])


def lm(tiny: bool, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.tasks.lm_common import TokenBatches
    from experiments.engine import accumulate_gradients, enable_checkpointing

    cfg = compose("lm", tiny=False)  # the paper preset's LoRA, batch and micro-batches
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if tiny else \
        dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8)
    batch, length = (8, 64) if tiny else (cfg.task.batch_size, cfg.task.max_len)
    micro = 2 if tiny else cfg.trainer.micro_batches
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, max_position_embeddings=length, **sizes)).to(device, dtype)
    lora = cfg.task.lora
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    enable_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, sizes["vocab_size"], (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]  # right padding, as the real batches
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    data = tuple(t.to(device) for t in (ids.masked_fill(~mask, 0), labels, mask))
    shim = TokenBatches()  # the LM task's loss, padding mask and per-token weights, stateless

    def step(m, ap):
        accumulate_gradients(shim, m, data, micro, ap)

    title = (f"lm: Llama-3.2-3B widths, 2 layers, {str(dtype).removeprefix('torch.')} base, LoRA r={lora.r} on {len(lora.target_modules)} projections, "
             f"{batch} x {length} tokens in {micro} micro-batches, activation checkpointing") if not tiny else "lm (tiny)"
    return title, model, step


def flow(tiny: bool, device: torch.device):
    from experiments.tasks.flow import build_unet

    task = compose("flow", tiny).task
    task_cfg = copy.deepcopy(task)
    task_cfg.num_classes = 10
    model = build_unet(task_cfg).to(device)
    batch = 8 if tiny else task.batch_size
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, task.channels, task.image_size, task.image_size, generator=g).to(device)
    x0, t = torch.randn_like(x1), torch.rand(batch, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step(m, ap):
        tt = t.view(-1, 1, 1, 1)
        F.mse_loss(m((1 - tt) * x0 + tt * x1, t * 1000, class_labels=labels).sample, x1 - x0).backward()

    return f"flow: UNet {list(task.model.channels)} at {task.image_size}x{task.image_size}, batch {batch}" if not tiny else "flow (tiny)", model, step


def robot(tiny: bool, device: torch.device):
    from experiments.tasks.robot import DiffusionPolicy

    task = compose("robot", tiny).task
    cameras = ["sideview_image", "robot0_eye_in_hand_image"]
    size = 32 if tiny else task.image_size
    low_dim, action_dim, batch = 9, 7, (4 if tiny else task.batch_size)
    stats = {"act_min": -torch.ones(action_dim), "act_max": torch.ones(action_dim), "obs_min": -torch.ones(low_dim), "obs_max": torch.ones(low_dim)}
    model = DiffusionPolicy(low_dim, cameras, action_dim, task.obs_horizon, task.model, stats).to(device)
    g = torch.Generator().manual_seed(0)
    obs = {k: torch.randint(0, 256, (batch, task.obs_horizon, size, size, 3), dtype=torch.uint8, generator=g).to(device) for k in cameras}
    obs["low_dim"] = torch.rand(batch, task.obs_horizon, low_dim, generator=g).to(device)
    actions = torch.rand(batch, task.action_horizon, action_dim, generator=g).to(device) * 2 - 1
    noise, level = torch.randn_like(actions), torch.rand(batch, generator=g).to(device)

    def step(m, ap):
        tt = level.view(-1, 1, 1)
        F.mse_loss(m(tt * actions + (1 - tt) * noise, level * 1000, obs), actions - noise).backward()

    title = f"robot: Diffusion Policy, 2 cameras {size}x{size}, U-Net {list(task.model.down_dims)}, batch {batch}" if not tiny else "robot (tiny)"
    return title, model, step


def control(tiny: bool, device: torch.device):
    from experiments.tasks.control import ResidualMLP

    task = compose("control", tiny).task
    obs_dim, act_dim, batch = 348, 17, (64 if tiny else task.batch_size)
    model = ResidualMLP(obs_dim, act_dim, task.model.width, task.model.blocks, torch.zeros(obs_dim), torch.ones(obs_dim)).to(device)
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(batch, obs_dim, generator=g).to(device), torch.randn(batch, act_dim, generator=g).to(device)

    def step(m, ap):
        F.mse_loss(m(s), a).backward()

    return f"control: residual MLP width {task.model.width} x {task.model.blocks} blocks, batch {batch}" if not tiny else "control (tiny)", model, step


WORKLOADS = {"lm": lm, "flow": flow, "robot": robot, "control": control}


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS (Linux: KiB)


def check(name: str, tiny: bool, device: torch.device, steps: int, warmup: int) -> dict:
    title, model, step = WORKLOADS[name](tiny, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = {}
    for opt_name in ("adamw", "dopr_adamw"):
        m = copy.deepcopy(model).train()
        # DoPr at the suite's row cap (configs/optimizer/dopr_*.yaml), the setting whose training cost this predicts
        kw = {"max_rows_per_dim": 8} if opt_name.startswith("dopr_") else {}
        variants[opt_name] = [m, dopr.build_optimizer(m, opt_name, lr=1e-5, **kw), []]
    del model
    peaks = {}
    for r in range(warmup + steps):
        for opt_name, (m, opt, times) in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            step(m, getattr(opt, "preconditioner", None))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if r >= warmup:
                times.append(time.perf_counter() - t0)
                peaks[opt_name] = max(peaks.get(opt_name, 0), peak_bytes(device))
    base, dopr_t = (statistics.fmean(variants[k][2]) for k in ("adamw", "dopr_adamw"))
    ap = variants["dopr_adamw"][1].preconditioner
    return {"task": name, "title": title, "adamw_s": base, "dopr_adamw_s": dopr_t, "ap_share": 1 - base / dopr_t,
            "peak_adamw_gib": peaks["adamw"] / 2**30, "peak_dopr_gib": peaks["dopr_adamw"] / 2**30, "ap_layers": len(ap.layers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check in CI)")
    parser.add_argument("--tasks", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (default 5)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU: run on a GPU machine, or pass --device cpu --tiny")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {where} (torch {torch.__version__}); {args.steps} timed steps after {args.warmup} warm-up, AdamW and DoPr-AdamW interleaved")
    print("| task | AdamW s/step | DoPr-AdamW s/step | AP share of the DoPr step | peak memory AdamW / DoPr (GiB" +
          (", process RSS" if device.type != "cuda" else "") + ") |")
    print("|---|---|---|---|---|")
    failed = []
    for name in tasks:
        t0 = time.time()
        try:
            r = check(name, args.tiny, device, args.steps, args.warmup)
        except Exception as err:  # report every task, then fail
            failed.append(name)
            print(f"| {name} | failed: {type(err).__name__}: {err} | | | |", flush=True)
            continue
        print(f"| {r['title']} | {r['adamw_s']:.4f} | {r['dopr_adamw_s']:.4f} | {100 * r['ap_share']:.0f}% | "
              f"{r['peak_adamw_gib']:.2f} / {r['peak_dopr_gib']:.2f} |  ({time.time() - t0:.0f} s)", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
