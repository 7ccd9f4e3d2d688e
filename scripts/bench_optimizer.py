#!/usr/bin/env python
"""Per-step time (forward + backward + optimizer step) of every GP with and without AP, and the
ratio DoPr-X / X measured in the same run, on a small Llama-style transformer and an MLP.

    python scripts/bench_optimizer.py                 # the table in docs/benchmark.md (about 5 minutes on 2 cores)
    python scripts/bench_optimizer.py --lm-batch 16   # fewer tokens per step: AP's share grows
    python scripts/bench_optimizer.py --quick    # tiny sizes, a few seconds (used by the tests)

Every variant trains its own copy of the model on the same batches; variants run interleaved, one
step each per round, so drift of the machine hits all of them alike. The time per step is the mean
over a multiple of 10 steps, so the refreshes of update_every=10 are counted, not hidden.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dopr  # noqa: E402


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


def workloads(quick: bool, device: str, lm_batch: int):
    g = torch.Generator().manual_seed(0)
    if quick:
        lm_seq, lm = 16, llama(128, 32, 1, 16)
        mlp_batch, mlp = 64, ResidualMLP(16, 32, 1, 4)
    else:
        # The suite's reference LM: 4 layers, width 256, vocabulary 4096, 128-token sequences.
        lm_seq, lm = 128, llama(4096, 256, 4, 128)
        mlp_batch, mlp = 1024, ResidualMLP(64, 256, 3, 16)
    vocab = lm.config.vocab_size
    tokens = [torch.randint(0, vocab, (lm_batch, lm_seq), generator=g).to(device) for _ in range(4)]
    xs = [torch.randn(mlp_batch, mlp.inp.in_features, generator=g).to(device) for _ in range(4)]
    ys = [torch.randn(mlp_batch, mlp.out.out_features, generator=g).to(device) for _ in range(4)]

    def lm_loss(model, i):
        ids = tokens[i % 4]
        return model(input_ids=ids, labels=ids).loss

    def mlp_loss(model, i):
        return nn.functional.mse_loss(model(xs[i % 4]), ys[i % 4])

    yield f"Llama {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M params, batch {lm_batch}x{lm_seq} tokens", lm.to(device), lm_loss
    yield f"residual MLP {sum(p.numel() for p in mlp.parameters()) / 1e6:.1f}M params, batch {mlp_batch}", mlp.to(device), mlp_loss


def bench(model: nn.Module, loss_fn, bases, rounds: int, warmup: int, device: str):
    variants = {}
    for base in bases:
        for name, kw in ((base, {}), (f"dopr_{base}", {"update_every": 1}), (f"dopr_{base}@10", {"update_every": 10})):
            m = copy.deepcopy(model)
            variants[(base, name)] = [m, dopr.build_optimizer(m, name.split("@")[0], lr=1e-4, **kw), []]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for r in range(warmup + rounds):
        for m, opt, times in variants.values():
            sync()
            t0 = time.perf_counter()
            loss_fn(m, r).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if r >= warmup:
                times.append(time.perf_counter() - t0)
    return {key: statistics.fmean(v[2]) for key, v in variants.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 20; 10 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lm-batch", type=int, default=32, help="sequences of 128 tokens per LM step (default 32)")
    parser.add_argument("--bases", default=",".join(dopr.BASES), help="comma-separated GPs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 20)
    if rounds % 10:
        parser.error("--rounds must be a multiple of 10 so the update_every=10 refreshes are counted fairly")
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    for b in bases:
        if b not in dopr.BASES:
            parser.error(f"unknown GP {b!r}; choose from {', '.join(dopr.BASES)}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"mean seconds per step over {rounds} steps after {args.warmup} warm-up steps", flush=True)
    for title, model, loss_fn in workloads(args.quick, args.device, 2 if args.quick else args.lm_batch):
        print(f"\n### {title}\n", flush=True)
        t0 = time.perf_counter()
        times = bench(model, loss_fn, bases, rounds, args.warmup, args.device)
        print("| GP | X (ms/step) | DoPr-X, update_every=1 (ms) | ratio | DoPr-X, update_every=10 (ms) | ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for base in bases:
            x, d1, d10 = times[(base, base)], times[(base, f"dopr_{base}")], times[(base, f"dopr_{base}@10")]
            print(f"| {base} | {1e3 * x:.2f} | {1e3 * d1:.2f} | {d1 / x:.3f} | {1e3 * d10:.2f} | {d10 / x:.3f} |")
        print(f"\n({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
