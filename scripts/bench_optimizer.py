#!/usr/bin/env python
"""Per-step time (forward + backward + optimizer step) of a GP with and without AP, and the ratio
DoPr-X / X measured in the same run, on the suite's models: the flow UNet and the robot U-Net at
scale=cpu widths, a diffusers UNet2DModel (32, 64, 64) at 16x16, a Llama (4 layers x 256), the same
Llama with LoRA adapters, and a residual MLP (batch 1024, widest input 1024).

    python scripts/bench_optimizer.py                     # the tables in docs/benchmark.md (AdamW; ~10 minutes on 2 cores)
    python scripts/bench_optimizer.py --bases adamw,muon  # more GPs
    python scripts/bench_optimizer.py --workloads flow,robot --rounds 30
    python scripts/bench_optimizer.py --quick             # tiny sizes, a few seconds (used by the tests)
    python scripts/bench_optimizer.py --keep-freed-memory # with the training loop's memory reuse (docs/experiments.md)

DoPr-X runs in three settings: "exact" (every row of every batch enters Sigma: ``max_rows_per_dim
=None``, the library default since issue 42), "default" (the suite's configs: ``max_rows_per_dim=8``, the
library default before; the name kept so new tables line up with docs/benchmark.md's), and that with
``update_every=10``. Every variant trains its
own copy of the model on the same batches; variants run interleaved, one step each per round, so
drift of the machine hits all of them alike. The time per step is the mean over a multiple of 10
steps, so the refreshes of update_every=10 are counted, not hidden. "AP state" is
``ActivationPreconditioner.state_bytes()`` after the last step (what AP keeps between steps).

The comparators (docs/comparators.md: SOAP, one-sided Shampoo on the input side, PSGD-Kron; ``--comparators``,
'' for none) run in the same rounds, built from their configs (configs/optimizer/<name>.yaml) as the training loop
builds them; a second table per workload gives each one's time per step, its ratio to AdamW's, and its optimizer
state (the bytes of every tensor the optimizer keeps between steps, AP's included) beside AdamW's and DoPr-AdamW's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dopr  # noqa: E402
import dopr.preconditioner as pre  # noqa: E402
from experiments.registry import COMPARATORS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def llama(vocab: int, width: int, layers: int, seq: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 8 / 3 + 1) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), max_position_embeddings=seq)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int, width: int, blocks: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                                  nn.Linear(4 * width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def flow_unet():
    """The flow task's UNet at scale=cpu, built from configs/task/flow.yaml by the task's own
    build_unet (so it follows the task: 16x16 glyphs since version 2), at its training batch."""
    from hydra import compose, initialize_config_dir

    from experiments.tasks.flow import build_unet

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=flow", "scale=cpu"]).task
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    return build_unet(cfg), (torch.randn(shape), torch.rand(cfg.batch_size) * 1000, torch.randint(0, cfg.num_classes + 1, (cfg.batch_size,)))


def unet2d_workload(quick: bool):
    """A diffusers UNet2DModel with its default blocks, (32, 64, 64) channels, 16x16 RGB, batch 64."""
    from diffusers import UNet2DModel

    size, batch, widths = (8, 4, (8, 16)) if quick else (16, 64, (32, 64, 64))
    model = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=widths,
                        down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                        norm_num_groups=8)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, generator=g) * 1000
    return model, lambda m: nn.functional.mse_loss(m(x, t).sample, x)


def robot_unet(quick: bool):
    """The robot task's ConditionalUnet1D at scale=cpu widths (configs/task_scale/robot_cpu.yaml):
    Stack's 7-d actions, 16-step chunks, 2 x 64 conditioning features, batch 128."""
    from experiments.tasks.robot import ConditionalUnet1D

    dims, batch = ((8, 16), 8) if quick else ((32, 64, 128), 128)
    model = ConditionalUnet1D(7, 128, dims, kernel=3, groups=8 if not quick else 4)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(batch, 16, 7, generator=g), torch.rand(batch, generator=g) * 1000, torch.randn(batch, 128, generator=g)
    return model, lambda m: nn.functional.mse_loss(m(x, t, c), x)


def mlp_workload(quick: bool):
    batch, model = (64, ResidualMLP(16, 32, 1, 4)) if quick else (1024, ResidualMLP(64, 256, 3, 16))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, model.inp.in_features, generator=g), torch.randn(batch, model.out.out_features, generator=g)
    return model, lambda m: nn.functional.mse_loss(m(x), y)


def lora_llama(base: nn.Module) -> nn.Module:
    """LoRA adapters (r=16, dropout 0: q/k/v and gate/up then share one statistic) on every
    projection of a frozen Llama, as the paper's LM experiments fine-tune."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def workloads(chosen: list[str], quick: bool, lm_batch: int):
    """(key, title, model, loss closure) for each chosen workload."""
    g = torch.Generator().manual_seed(0)
    if "flow" in chosen:
        if quick:
            model, loss = unet2d_workload(True)
            yield "flow", "flow UNet (tiny)", model, loss
        else:
            model, (x, t, y) = flow_unet()
            yield "flow", "flow task UNet (scale=cpu), 16x16, batch 128", model, lambda m: nn.functional.mse_loss(m(x, t, class_labels=y).sample, x)
    if "robot" in chosen:
        model, loss = robot_unet(quick)
        yield "robot", "robot task U-Net (scale=cpu widths 32/64/128, kernel 3), batch 128" if not quick else "robot U-Net (tiny)", model, loss
    if "unet2d" in chosen:
        model, loss = unet2d_workload(quick)
        yield "unet2d", "diffusers UNet2DModel (32, 64, 64), 16x16, batch 64" if not quick else "UNet2DModel (tiny)", model, loss
    seq = 16 if quick else 128
    for key in ("llama", "lora"):
        if key not in chosen:
            continue
        model = llama(128, 32, 1, 16) if quick else llama(4096, 256, 4, 128)
        if key == "lora":
            model = lora_llama(model)
        vocab = model.config.vocab_size
        tokens = [torch.randint(0, vocab, (lm_batch, seq), generator=g) for _ in range(4)]
        title = "Llama 4 layers x 256" if not quick else "Llama (tiny)"
        title += " + LoRA r=16 on every projection (base frozen)" if key == "lora" else ""
        yield key, f"{title}, batch {lm_batch}x{seq} tokens", model, (lambda toks: lambda m: m(input_ids=toks[0], labels=toks[0]).loss)(tokens)
    if "mlp" in chosen:
        model, loss = mlp_workload(quick)
        yield "mlp", "residual MLP (width 256, hidden 1024), batch 1024" if not quick else "residual MLP (tiny)", model, loss


# "default": the row cap of configs/optimizer/dopr_*.yaml, explicit (the library's default is every row since issue 42).
SUITE = {"max_rows_per_dim": 8}
VARIANTS = (("exact", {"max_rows": None, "max_rows_per_dim": None}), ("default", SUITE), ("default@10", {**SUITE, "update_every": 10}))
# --compare-gram: the defaults with every Z^T Z as one product (the library before its split gram; "full gram":
# dopr.preconditioner's split threshold out of reach) and from two column blocks (its split gram before 4 blocks),
# the defaults and exact AP the same way, interleaved in one run.
GRAM_VARIANTS = (("default, full gram", SUITE), ("default, two blocks", SUITE), ("default", SUITE),
                 ("exact, two blocks", VARIANTS[0][1]), ("exact", VARIANTS[0][1]))
# --compare-shifted: exact and default AP with every conv statistic from unfolded patch rows (the library before
# its shifted conv gram, dopr.preconditioner._shifted_conv_gram) against the library's choice, in one run.
SHIFTED_VARIANTS = (("exact, unfolded", VARIANTS[0][1]), ("exact", VARIANTS[0][1]), ("default, unfolded", SUITE), ("default", SUITE))


@contextlib.contextmanager
def gram(name: str):
    """Run a variant named "... full gram" with every Z^T Z as one product, one named "... two blocks" with
    the split gram from two column blocks, and one named "... unfolded" with every conv statistic from
    unfolded patch rows; the others as the library chooses."""
    saved = pre._SPLIT_GRAM_MIN_D, pre._SHIFTED_GRAM_CALL_FLOPS, pre._GRAM_BLOCKS
    if "full gram" in name:
        pre._SPLIT_GRAM_MIN_D = 1 << 62
    if "two blocks" in name:
        pre._GRAM_BLOCKS = 2
    if "unfolded" in name:
        pre._SHIFTED_GRAM_CALL_FLOPS = math.inf
    try:
        yield
    finally:
        pre._SPLIT_GRAM_MIN_D, pre._SHIFTED_GRAM_CALL_FLOPS, pre._GRAM_BLOCKS = saved


def comparator(model: nn.Module, name: str):
    """The comparator ``name`` over ``model``, from its config as the training loop builds it (lr 1e-4, as every variant)."""
    from omegaconf import OmegaConf

    import experiments.protocol  # noqa: F401  (the configs' ${ap_name:...} resolver)
    from experiments.engine import build_optimizer

    return build_optimizer(model, OmegaConf.load(ROOT / "configs" / "optimizer" / f"{name}.yaml"), lr=1e-4)


def optimizer_state_bytes(opt) -> int:
    """Bytes of the tensors ``opt`` keeps between steps: its state, walked through containers and through the
    objects some libraries keep there (ScalableShampoo's preconditioners), each tensor once; with AP's."""
    seen, total = set(), 0

    def walk(x, depth: int = 0) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                walk(v, depth)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, nn.Module)) and depth < 3:
            for v in vars(x).values():
                walk(v, depth + 1)

    for st in opt.state.values():
        walk(st)
    ap = getattr(opt, "preconditioner", None)
    return total + (ap.state_bytes() if ap is not None else 0)


def bench(model: nn.Module, loss_fn, bases, rounds: int, warmup: int, device: str, settings=VARIANTS, comparators=()):
    """Mean seconds per step of each GP ((base, "")), of DoPr-GP in each of ``settings`` ((base, name)) and of each
    of ``comparators`` ((name, "comparator"); AdamW too then), interleaved; the AP state's bytes of each DoPr
    variant; and every variant's optimizer state in bytes (``optimizer_state_bytes``)."""
    variants = {}
    for base in bases + (["adamw"] if comparators and "adamw" not in bases else []):
        m = copy.deepcopy(model).to(device)
        variants[(base, "")] = [m, dopr.build_optimizer(m, base, lr=1e-4), []]
        for name, kw in settings if base in bases else ():
            m = copy.deepcopy(model).to(device)
            variants[(base, name)] = [m, dopr.build_optimizer(m, f"dopr_{base}", lr=1e-4, **kw), []]
    for name in comparators:
        m = copy.deepcopy(model).to(device)
        variants[(name, "comparator")] = [m, comparator(m, name), []]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for r in range(warmup + rounds):
        for (_, name), (m, opt, times) in variants.items():
            sync()
            t0 = time.perf_counter()
            with gram(name):
                loss_fn(m).backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if r >= warmup:
                times.append(time.perf_counter() - t0)
    seconds = {key: statistics.fmean(v[2]) for key, v in variants.items()}
    state = {key: v[1].preconditioner.state_bytes() for key, v in variants.items() if key[1] and key[1] != "comparator"}
    return seconds, state, {key: optimizer_state_bytes(v[1]) for key, v in variants.items()}


def megabytes(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 20; 10 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lm-batch", type=int, default=16, help="sequences of 128 tokens per LM step (default 16)")
    parser.add_argument("--bases", default="adamw", help="comma-separated GPs (default adamw; all: " + ",".join(dopr.BASES) + ")")
    parser.add_argument("--workloads", default="flow,robot,unet2d,llama,lora,mlp", help="comma-separated subset of the default")
    parser.add_argument("--comparators", default=",".join(COMPARATORS), help="comma-separated comparators timed beside AdamW and "
                        "DoPr-AdamW (default all: " + ",".join(COMPARATORS) + "; '' for none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare-gram", action="store_true", help="time the defaults with Z^T Z as one product against "
                        "the library's split product (dopr.preconditioner._gram_sym), in place of the usual variants")
    parser.add_argument("--compare-shifted", action="store_true", help="time exact and default AP with conv statistics from "
                        "unfolded patches against the library's choice (dopr.preconditioner._shifted_conv_gram), in place of the usual variants")
    parser.add_argument("--keep-freed-memory", action="store_true", help="reuse freed memory as the training loop does on CPU "
                        "(experiments.engine.keep_freed_memory, glibc's mallopt); default: a default process")
    args = parser.parse_args(argv)
    kept = False
    if args.keep_freed_memory:
        from experiments.engine import keep_freed_memory

        kept = keep_freed_memory()
    rounds = args.rounds or (10 if args.quick else 20)
    if rounds % 10:
        parser.error("--rounds must be a multiple of 10 so the update_every=10 refreshes are counted fairly")
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    for b in bases:
        if b not in dopr.BASES:
            parser.error(f"unknown GP {b!r}; choose from {', '.join(dopr.BASES)}")
    comparators = [c.strip() for c in args.comparators.split(",") if c.strip()]
    if set(comparators) - set(COMPARATORS):
        parser.error(f"unknown comparators {sorted(set(comparators) - set(COMPARATORS))}; choose from {', '.join(COMPARATORS)}")
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    known = ("flow", "robot", "unet2d", "llama", "lora", "mlp")
    if set(chosen) - set(known):
        parser.error(f"unknown workloads {sorted(set(chosen) - set(known))}; choose from {', '.join(known)}")
    torch.manual_seed(0)
    defaults = {k: v.default for k, v in inspect.signature(dopr.ActivationPreconditioner).parameters.items() if k in ("max_rows", "max_rows_per_dim", "solver")}
    defaults["'default' variants"] = SUITE
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"mean seconds per step over {rounds} steps after {args.warmup} warm-up steps; AP defaults {defaults}; "
          f"freed memory kept (as in training): {kept}", flush=True)
    for _, title, model, loss_fn in workloads(chosen, args.quick, 2 if args.quick else args.lm_batch):
        print(f"\n### {title}\n", flush=True)
        t0 = time.perf_counter()
        settings = GRAM_VARIANTS if args.compare_gram else SHIFTED_VARIANTS if args.compare_shifted else VARIANTS
        plain = not (args.compare_gram or args.compare_shifted)
        times, state, memory = bench(model, loss_fn, bases, rounds, args.warmup, args.device, settings, comparators if plain else ())
        if args.compare_gram or args.compare_shifted:
            print("| GP | X (ms/step) | " + " | ".join(f"DoPr-X {name} (ms) | ratio" for name, _ in settings) + " |")
            print("|---|---:|" + "---:|---:|" * len(settings))
            for base in bases:
                x = times[(base, "")]
                print(f"| {base} | {1e3 * x:.2f} | " + " | ".join(f"{1e3 * times[(base, n)]:.2f} | {times[(base, n)] / x:.3f}" for n, _ in settings) + " |")
            print(f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
            continue
        print("| GP | X (ms/step) | DoPr-X exact (ms) | ratio | DoPr-X default (ms) | ratio | DoPr-X default, update_every=10 (ms) | ratio "
              "| AP state exact / default / @10 (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for base in bases:
            x = times[(base, "")]
            cells = [f"{1e3 * times[(base, name)]:.2f} | {times[(base, name)] / x:.3f}" for name, _ in VARIANTS]
            mem = " / ".join(megabytes(state[(base, name)]) for name, _ in VARIANTS)
            print(f"| {base} | {1e3 * x:.2f} | " + " | ".join(cells) + f" | {mem} |")
        if comparators:
            adamw = times[("adamw", "")]
            rows = [("adamw", ("adamw", ""))] + ([("dopr_adamw (default)", ("adamw", "default"))] if "adamw" in bases else [])
            print("\n| optimizer | ms/step | ratio to AdamW | optimizer state (MiB) |\n|---|---:|---:|---:|")
            for label, key in rows + [(c, (c, "comparator")) for c in comparators]:
                print(f"| {label} | {1e3 * times[key]:.2f} | {times[key] / adamw:.3f} | {megabytes(memory[key])} |")
        print(f"\n({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
