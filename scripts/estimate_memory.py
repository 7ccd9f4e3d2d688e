"""Memory per GPU of an LM LoRA run, estimated without a GPU and without downloading weights.

    python scripts/estimate_memory.py --preset llama-3.1-8b                 # the paper preset's settings
    python scripts/estimate_memory.py --preset llama-3.2-3b task.batch_size=32 trainer.micro_batches=8
    python scripts/estimate_memory.py --config /models/Llama-3.1-8B/config.json optimizer=dopr_muon

The model is built on PyTorch's meta device (shapes, no storage) from a named preset (the public
config.json values of the Llama models) or a Hugging Face config.json; LoRA and AP are attached
exactly as a run attaches them, and one micro-batch goes forward on the meta device. What is
measured there, not modelled:
- weights, trainable weights, their gradients and the optimizer state (from the parameters);
- the activations autograd saves (a saved-tensor hook counts their bytes), with and without
  activation checkpointing;
- AP's statistics at the end of the forward (the tensors AP keeps until the step).
Attention on the meta device takes PyTorch's math path, which saves the attention matrix that fused
(flash / memory-efficient) kernels do not: the activation figure errs high (by 14% on the test's small
model; with activation checkpointing only one layer's worth). Modelled on top: the layer inputs activation checkpointing keeps, the gradient of the logits, and
AP's largest transient factor (2 x d x d float32). Evaluation is estimated apart (KV cache of the
generation batch; the chunked validation loss). Training settings come from the suite's Hydra
config (`task=lm scale=paper` plus the overrides given). Allocator overhead and fragmentation are not
included: keep ~10% spare. tests/test_estimate_memory.py checks the measured parts against a real
small model on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Public config.json values (architecture only; no weights are read).
PRESETS = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
}
# Optimizer state per trainable element, in float32 copies (dopr's GPs: AdamW two moments; Muon,
# Signum and SGD one momentum buffer; AdaMuon a momentum and a second moment).
STATE_COPIES = {"adamw": 2, "muon": 1, "signum": 1, "sgd": 1, "adamuon": 2}
GIB = 2**30


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def build(model_config: dict, dtype: torch.dtype, lora: dict | None, device: str = "meta"):
    """The causal LM (on ``device``) with peft LoRA attached as the suite's paper path attaches it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**model_config) if "model_type" not in model_config else _auto_config(model_config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    return model


def _auto_config(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def forward_bytes(model, batch: int, length: int, ap=None, checkpointing: bool = False, forwards: int = 1) -> dict:
    """``forwards`` training forwards of ``batch`` x ``length`` tokens (the micro-batches of one step):
    the bytes autograd saves for one of them (counted by a saved-tensor hook) and the bytes of AP's
    statistics after all of them (AP folds the micro-batches into one statistic per input)."""
    device = next(model.parameters()).device
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        with contextlib.suppress(Exception):
            model.gradient_checkpointing_disable()
    model.train()
    saved = [0]

    def pack(t):
        saved[0] += nbytes(t)
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    # transformers looks for packed sequences in the position ids with a data-dependent check that
    # meta tensors cannot answer; the batch here is not packed.
    unpacked = mock.patch("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)
    for _ in range(forwards):
        saved[0] = 0
        with unpacked, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        del loss  # its graph (the saved tensors) goes; AP's statistics stay until the step
    stats = ap_statistics_bytes(ap) if ap is not None else 0
    if ap is not None:
        ap.reset_stats()
    return {"saved": saved[0], "ap_statistics": stats}


def ap_statistics_bytes(ap) -> int:
    """Bytes of the statistics AP holds after a forward (sums of z z^T or kept rows), each counted once."""
    seen, total = set(), 0
    for layer in ap.layers:
        for part in layer.parts:
            if id(part) in seen:
                continue
            seen.add(id(part))
            total += sum(nbytes(t) for t in (part.sum, part.rows) if t is not None)
    return total


def estimate(cfg, model_config: dict) -> dict:
    """The estimate (bytes per component) for the composed suite config ``cfg`` and a model config."""
    import dopr

    task, tr = cfg.task, cfg.trainer
    dtype = getattr(torch, task.get("dtype") or "float32")
    lora = dict(task.lora) if task.get("lora") else None
    model = build(model_config, dtype, lora)
    name = cfg.optimizer.get("build") or cfg.optimizer.name  # dopr_adamw_k10 builds dopr_adamw (update_every: 10)
    opt = dopr.build_optimizer(model, name, lr=1e-4, weight_decay=0.0, **dict(cfg.optimizer.get("kwargs") or {}))
    ap = getattr(opt, "preconditioner", None)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    micro = int(tr.get("micro_batches") or 1)
    if task.batch_size % micro:
        raise SystemExit(f"task.batch_size={task.batch_size} does not split into trainer.micro_batches={micro}")
    batch, length = task.batch_size // micro, task.max_len
    ckpt = bool(tr.get("grad_checkpointing"))
    full = forward_bytes(model, batch, length, ap, checkpointing=False, forwards=micro)
    out = {"weights": sum(nbytes(p) for p in params), "trainable": sum(nbytes(p) for p in trainable),
           "gradients": sum(p.numel() * 4 for p in trainable),
           "optimizer_state": STATE_COPIES[name.removeprefix("dopr_")] * sum(p.numel() * 4 for p in trainable)}
    config = model.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    if ckpt:
        outside = forward_bytes(model, batch, length, None, checkpointing=True)["saved"]
        per_layer = (full["saved"] - outside) / layers
        out["activations"] = int(outside + layers * batch * length * hidden * dtype.itemsize + per_layer)  # kept inputs + one layer recomputed
    else:
        out["activations"] = full["saved"]
    out["ap_statistics"] = full["ap_statistics"]
    largest_d = max((layer.d_in for layer in ap.layers), default=0) if ap is not None else 0
    # backward transients, not at once: the logits' gradient (float32) or AP's factor and solve of the widest statistic
    out["backward_transient"] = max(batch * length * vocab * 4, 2 * largest_d * largest_d * 4)
    out["train_peak"] = sum(out[k] for k in ("weights", "gradients", "optimizer_state", "activations", "ap_statistics", "backward_transient"))
    # evaluation: generation's KV cache (and one step's logits), or the chunked validation loss
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    gen_batch, gen_len = task.eval_batch_size, task.max_len + task.max_new_tokens
    kv_cache = 2 * layers * kv * (hidden // heads) * gen_batch * gen_len * dtype.itemsize
    val_batch = task.get("val_batch_size") or task.eval_batch_size
    chunk = task.get("val_loss_chunk")
    val_logits = (chunk if chunk else val_batch * length) * vocab * (dtype.itemsize + 4)
    out["eval_peak"] = out["weights"] + max(kv_cache + gen_batch * vocab * 4, val_batch * length * hidden * dtype.itemsize * 2 + val_logits)
    out["settings"] = {"micro_batch": batch, "length": length, "grad_checkpointing": ckpt, "optimizer": name, "dtype": str(dtype),
                       "lora": lora, "generation_batch": gen_batch, "generation_tokens": gen_len, "val_batch": val_batch, "val_loss_chunk": chunk}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--config", type=Path, help="a Hugging Face config.json")
    ap.add_argument("--limit-gib", type=float, default=80.0, help="GPU memory to compare against (default 80)")
    ap.add_argument("--json", action="store_true", help="print the estimate as JSON")
    ap.add_argument("overrides", nargs="*", help="suite config overrides (default: task=lm scale=paper)")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm", "scale=paper", "optimizer=dopr_adamw", "logger=none", *args.overrides])
    if args.preset:
        model_config, label = PRESETS[args.preset], args.preset
    else:
        if not args.config.exists():
            raise SystemExit(f"{args.config} does not exist: pass a Hugging Face config.json, or --preset")
        model_config, label = json.loads(args.config.read_text()), str(args.config)
    est = estimate(cfg, model_config)
    if args.json:
        print(json.dumps({"model": label, **est}, indent=1))
        return
    s = est["settings"]
    print(f"{label}: LoRA {s['lora'] and s['lora']['r']}, {s['optimizer']}, {s['dtype']} base, micro-batch {s['micro_batch']} x {s['length']} tokens, "
          f"activation checkpointing {'on' if s['grad_checkpointing'] else 'off'}")
    for key in ("weights", "trainable", "gradients", "optimizer_state", "activations", "ap_statistics", "backward_transient", "train_peak", "eval_peak"):
        print(f"  {key:<20} {est[key] / GIB:8.2f} GiB")
    for key in ("train_peak", "eval_peak"):
        verdict = "fits" if est[key] / GIB <= args.limit_gib else "DOES NOT FIT"
        print(f"{key}: {est[key] / GIB:.1f} GiB per GPU: {verdict} in {args.limit_gib:g} GiB (allocator overhead not included)")


if __name__ == "__main__":
    main()
