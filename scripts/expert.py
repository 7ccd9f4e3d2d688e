#!/usr/bin/env python
"""Experts and demonstrations for the control task (behaviour cloning).

    python scripts/expert.py train  --env Hopper-v5 --steps 120000 --seed 0   # SAC (stable-baselines3)
    python scripts/expert.py return --env Hopper-v5                           # the committed expert's return

The expert is the SAC policy network alone (``experiments/assets/experts/<env>_sac.pt``: state
dict + architecture, a few hundred KB), so demonstrations regenerate deterministically without
retraining (the control task generates and caches them from it, with a seed); its mean return
over fixed evaluation seeds is written beside it (``.json``) and printed by ``return``. Paper
scale (Humanoid-v5) is the same command with more steps on a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.checkpoint import atomic_write_text, save_checkpoint  # noqa: E402
from experiments.tasks.control import EXPERT_DIR, load_expert, rollout_returns  # noqa: E402

EVAL_SEEDS = list(range(10_000, 10_020))  # the seeds the expert's reported return is measured on


def train(args) -> int:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(args.threads)

    class Progress(BaseCallback):
        def __init__(self):
            super().__init__()
            self.t0, self.returns = time.time(), []

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    self.returns.append(info["episode"]["r"])
            if self.num_timesteps % 10_000 == 0:
                recent = np.mean(self.returns[-10:]) if self.returns else float("nan")
                rate = self.num_timesteps / (time.time() - self.t0)
                print(f"step {self.num_timesteps}/{args.steps}  train return (last 10 episodes) {recent:.0f}  "
                      f"{rate:.0f} steps/s  eta {(args.steps - self.num_timesteps) / rate / 60:.1f} min", flush=True)
            return True

    env = gym.wrappers.RecordEpisodeStatistics(gym.make(args.env))
    model = SAC("MlpPolicy", env, seed=args.seed, verbose=0, learning_starts=5000)
    model.learn(args.steps, callback=Progress())
    actor = model.policy.actor
    out = EXPERT_DIR / f"{args.env}_sac.pt"
    save_checkpoint(out, {"env": args.env, "net_arch": list(model.policy.net_arch["pi"] if isinstance(model.policy.net_arch, dict) else model.policy.net_arch),
                          "state_dict": {k: v.cpu() for k, v in actor.state_dict().items()},
                          "obs_dim": env.observation_space.shape[0], "act_dim": env.action_space.shape[0],
                          "action_low": env.action_space.low.tolist(), "action_high": env.action_space.high.tolist(),
                          "trained": {"algorithm": "SAC (stable-baselines3, default hyperparameters, learning_starts=5000)",
                                      "steps": args.steps, "seed": args.seed}})
    return evaluate(args, write=True)


def evaluate(args, write: bool = False) -> int:
    expert = load_expert(args.env)
    returns, lengths = rollout_returns(args.env, expert, EVAL_SEEDS)
    result = {"env": args.env, "episodes": len(returns), "seeds": f"{EVAL_SEEDS[0]}..{EVAL_SEEDS[-1]}",
              "mean_return": round(float(np.mean(returns)), 1), "std_return": round(float(np.std(returns)), 1),
              "mean_length": round(float(np.mean(lengths)), 1)}
    path = EXPERT_DIR / f"{args.env}_sac.json"
    if write:
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"{args.env} expert ({EXPERT_DIR / (args.env + '_sac.pt')}): mean return {result['mean_return']} ± {result['std_return']} "
          f"(sd) over {result['episodes']} episodes, seeds {result['seeds']}; mean length {result['mean_length']}")
    if not write and path.exists():
        stored = json.loads(path.read_text())
        print(f"stored with the expert: mean return {stored['mean_return']}" +
              ("" if abs(stored["mean_return"] - result["mean_return"]) < 1e-6 else "  (DIFFERENT from now: mujoco or torch version?)"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SAC expert and save its policy")
    t.add_argument("--env", default="Hopper-v5")
    t.add_argument("--steps", type=int, default=120_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("return", help="print the committed expert's mean return")
    r.add_argument("--env", default="Hopper-v5")
    args = parser.parse_args(argv)
    return train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
