"""The paper's LM setting at CPU scale: LoRA fine-tuning of a pretrained model.

A small Llama (the ``lm`` task's model) is pretrained once, with AdamW, on a base distribution:
arithmetic chains of ``task.base.train_steps`` (1-4 steps by default). Its weights are cached in
``task.data_dir/lm_lora_base/`` beside a JSON file with the settings and command that made them,
their SHA-256 and the base model's accuracy per chain length. Every run then fine-tunes that model
with peft LoRA on every projection (q, k, v, o, gate, up, down; the embeddings and the LM head stay
frozen) on the target distribution, the ``lm`` task's chains of 1-8 steps, with the optimizer under
test. AP then preconditions the lora_A and lora_B matrices only, as in the paper. Data, metric,
checkpoint selection and report are the ``lm`` task's.

Build (or check) the cached base model without training anything else:

    python -m experiments.tasks.lm_lora [scale=cpu] [task.data_dir=...]
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..checkpoint import atomic_write_json, file_lock, save_checkpoint
from .base import check_sizes
from .lm import ArithmeticLM, build_llama, check_settings, encode_examples, generate_split

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_spec(cfg) -> dict:
    """Everything the base model's weights depend on (its cache key)."""
    return {"model": OmegaConf.to_container(cfg.model), "base": OmegaConf.to_container(cfg.base), "operand_max": cfg.operand_max,
            "total_max": cfg.total_max, "max_len": cfg.max_len, "max_new_tokens": cfg.max_new_tokens, "torch": torch.__version__}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArithmeticLoRA(ArithmeticLM):
    """LoRA fine-tuning of the cached base model (see the module docstring)."""

    def __init__(self, cfg, seed: int, device: torch.device):
        from peft import LoraConfig, get_peft_model

        super().__init__(cfg, seed, device)  # data, evaluation sets, and a Llama of the same sizes
        self.base_path, self.base_meta = self.base_model()
        self.model.load_state_dict(torch.load(self.base_path, map_location="cpu", weights_only=True))
        lora = cfg.lora
        unknown = set(lora.target_modules) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"task.lora.target_modules has {sorted(unknown)}: the Llama's projections are {LORA_TARGETS}")
        torch.manual_seed(seed)  # the LoRA initialisation depends on the seed only
        self.model = get_peft_model(self.model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                           target_modules=list(lora.target_modules), task_type="CAUSAL_LM")).to(device)

    def base_model(self) -> tuple[Path, dict]:
        """The cached base model's path and metadata, pretraining it first if it is not cached.
        Concurrent runs (two local jobs, Slurm array tasks on one file system) wait on a file lock
        while one of them pretrains."""
        spec = base_spec(self.cfg)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        root = Path(self.cfg.data_dir).expanduser() / "lm_lora_base"
        root.mkdir(parents=True, exist_ok=True)
        path, meta_path = root / f"base-{key}.pt", root / f"base-{key}.json"
        with file_lock(root / f"base-{key}.lock"):
            if not (path.exists() and meta_path.exists()):
                self._pretrain(spec, path, meta_path)
        meta = json.loads(meta_path.read_text())
        if sha256(path) != meta["sha256"]:
            raise RuntimeError(f"{path} does not match the SHA-256 in {meta_path} (a partial or edited file): "
                               f"delete both and rerun to pretrain it again")
        return path, meta

    def _pretrain(self, spec: dict, path: Path, meta_path: Path) -> None:
        from transformers import get_cosine_schedule_with_warmup

        b = self.cfg.base
        print(f"lm_lora: pretraining the base model once ({b.steps} AdamW steps on chains of {list(b.train_steps)} steps); "
              f"cached at {path}", flush=True)
        start = time.time()
        cache = str(Path(self.cfg.data_dir).expanduser())
        data = encode_examples(self.tok, generate_split(b.train_size, 11, b.train_steps, cache, self.cfg.operand_max, self.cfg.total_max),
                               self.cfg.max_len)
        torch.manual_seed(b.seed)
        model = build_llama(self.cfg, self.tok).to(self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=0.1)
        sched = get_cosine_schedule_with_warmup(opt, max(1, b.steps // 10), b.steps)
        g = torch.Generator().manual_seed(b.seed)
        for step in range(1, b.steps + 1):
            idx = torch.randint(0, data[0].shape[0], (b.batch_size,), generator=g)
            ids, labels, mask = self._trim(tuple(t[idx] for t in data))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0 or step == b.steps:
                print(f"  base step {step}/{b.steps} loss {loss.item():.4f}", flush=True)
        model.eval()
        with torch.no_grad():
            accuracy = {name: sum(items) / len(items) for name, items in
                        ((n, self._score(model, ps)) for n, ps in {**self.eval_sets, **self.extrap_sets}.items())}
        save_checkpoint(path, {k: v.cpu() for k, v in model.state_dict().items()})
        meta = {"spec": spec, "sha256": sha256(path), "seconds": round(time.time() - start, 1), "accuracy": accuracy,
                "made_by": "experiments.tasks.lm_lora (python -m experiments.tasks.lm_lora, or the first run of task=lm_lora)",
                "command": " ".join(sys.argv)}
        atomic_write_json(meta_path, meta)
        print(f"lm_lora: base model ready in {meta['seconds']} s; its accuracy by chain length: "
              + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()), flush=True)


def build(cfg, seed: int, device: torch.device):
    check_settings(cfg)  # the lm task's sizes, then the base model's and the adapters'
    check_sizes(cfg, {"base.train_size": 1, "base.steps": 1, "base.batch_size": 1, "base.train_steps": 1, "lora.r": 1})
    return ArithmeticLoRA(cfg, seed, device)


def main(argv: list[str]) -> None:
    """Build or check the cached base model for a scale: python -m experiments.tasks.lm_lora [scale=cpu] [overrides]."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=lm_lora", *argv])
    task = ArithmeticLoRA(cfg.task, 0, torch.device("cpu"))
    print(json.dumps({"path": str(task.base_path), **{k: task.base_meta[k] for k in ("sha256", "seconds", "accuracy")}}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
