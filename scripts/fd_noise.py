#!/usr/bin/env python
"""How much of a flow run's FD is the sampling noise of the FD estimate: the headline FD of one trained run,
recomputed with generation noise from other seeds.

    python scripts/fd_noise.py runs/flow/cpu/adamw-s0 --draws 40 --large-draws 8

Rebuilds the task from the run's config.json (the same reference set, feature classifier and fd_floor) and loads
its final weights (checkpoint.pt; the EMA weights where the run kept an EMA, as the evaluation does). Prints the FD
with the task's own fixed evaluation noise (it must equal the run's reported ``fd``), then the FD for ``--draws``
other noise seeds at ``eval_samples`` samples and ``--large-draws`` at 4x that, with mean and SD, and writes them to
``<run>/fd_noise.json``. Compare the SD with the spread of ``final_fd`` over evaluation seeds
(results/flow/cpu/results_runs.csv): docs/tasks/flow.md, "Where the seed-to-seed noise comes from".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished flow run folder (config.json, checkpoint.pt, summary.json)")
    parser.add_argument("--draws", type=int, default=8, help="noise seeds at eval_samples samples (default 8)")
    parser.add_argument("--large-draws", type=int, default=0, help="noise seeds at 4 x eval_samples samples (default 0)")
    args = parser.parse_args(argv)
    paths = [args.run / n for n in ("config.json", "checkpoint.pt", "summary.json")]
    if not all(p.exists() for p in paths):
        parser.error(f"{args.run} is not a finished run folder (it needs {', '.join(p.name for p in paths)}): "
                     "train one first, e.g. python -m experiments.train task=flow optimizer=adamw seed=100")
    if args.draws < 2:
        parser.error("--draws must be at least 2 (an SD needs two FDs)")

    import torch
    from omegaconf import OmegaConf

    from experiments.checkpoint import load_checkpoint, load_model_state
    from experiments.tasks import build_task

    torch.set_num_threads(1)
    cfg = json.loads(paths[0].read_text())
    if cfg["task"]["name"] != "flow":
        parser.error(f"{args.run} is a {cfg['task']['name']} run: this measures the flow task's FD")
    task_cfg = OmegaConf.create(cfg["task"])
    task = build_task(task_cfg, cfg["seed"], torch.device("cpu"))
    state = load_checkpoint(paths[1], "cpu")
    if cfg["trainer"].get("ema_decay"):  # the evaluation reads the EMA weights (experiments/train.py)
        model = torch.optim.swa_utils.AveragedModel(task.model)
        model.load_state_dict(state["ema"])
        model = model.module
    else:
        load_model_state(task.model, state["model"])
        model = task.model
    model.eval()
    solver, steps, n = task_cfg.headline_solver, task_cfg.headline_steps, int(task_cfg.eval_samples)
    reported = json.loads(paths[2].read_text())["final"]

    def fd(seed: int | None, size: int) -> float:
        if seed is None:  # the task's own fixed evaluation noise and labels
            return task.fd(task.generate(model, solver, steps))
        labels = torch.arange(size) % task_cfg.num_classes  # balanced, as the task's own
        noise = torch.randn((size, task_cfg.channels, task_cfg.image_size, task_cfg.image_size),
                            generator=torch.Generator().manual_seed(seed))
        return task.fd(task.generate(model, solver, steps, noise, labels))

    own = fd(None, n)
    print(f"{args.run}: fd {own:.4f} with the task's own evaluation noise (the run reported {reported['fd']:.4f}); "
          f"fd_floor {task.fd_floor:.4f}", flush=True)
    out = {"run": str(args.run), "own_noise_fd": own, "reported_fd": reported["fd"], "fd_floor": task.fd_floor}
    for key, size, count, base in (("draws", n, args.draws, 10_000), ("large_draws", 4 * n, args.large_draws, 20_000)):
        fds = []
        for k in range(1, count + 1):
            t0 = time.time()
            fds.append(fd(base + k, size))
            print(f"  {size} samples, noise seed {base + k}: fd {fds[-1]:.4f} ({time.time() - t0:.1f} s)", flush=True)
        if len(fds) > 1:
            print(f"{size} samples: {len(fds)} draws, mean {statistics.mean(fds):.4f}, SD {statistics.stdev(fds):.4f}", flush=True)
        out[key] = {"samples": size, "fd": fds}
    (args.run / "fd_noise.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
