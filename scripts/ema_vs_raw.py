#!/usr/bin/env python
"""Validation loss of a run's raw final weights and of its EMA weights, from checkpoint.pt.

    python scripts/ema_vs_raw.py runs/control/cpu_ema0.999/dopr_adamw-s0 runs/control/cpu_ema0.999/adamw-s0

Rebuilds the task from the run's config.json (same data, same validation batches).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import json

    import torch
    from omegaconf import OmegaConf

    from experiments.checkpoint import load_checkpoint
    from experiments.tasks import build_task
    from experiments.engine import validation_loss

    runs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not runs or any(a in ("-h", "--help") for a in map(str, runs)):
        print(__doc__)
        return 0 if runs else 2
    for run in runs:
        if not (run / "checkpoint.pt").exists() or not (run / "config.json").exists():
            print(f"{run}: no checkpoint.pt/config.json (not a run folder?)", file=sys.stderr)
            return 2
        cfg = OmegaConf.create(json.loads((run / "config.json").read_text()))
        task = build_task(cfg.task, cfg.seed, torch.device("cpu"))
        state = load_checkpoint(run / "checkpoint.pt", "cpu")  # weights_only=True: tensors and plain values, no code
        task.model.load_state_dict(state["model"])
        raw = validation_loss(task, task.model)
        line = f"{run}: step {state['step']}  val loss raw weights {raw:.4f}"
        if state.get("ema"):
            task.model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")})
            line += f"  EMA weights {validation_loss(task, task.model):.4f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
