#!/usr/bin/env python
"""Experts and demonstrations for the control task (behaviour cloning).

    python scripts/expert.py train  --env Hopper-v5 --steps 300000 --seed 0   # SAC (stable-baselines3); rerun to resume
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


def expert_path(args) -> Path:
    return Path(args.out).expanduser() if args.out else EXPERT_DIR / f"{args.env}_sac.pt"


def work_dir(args) -> Path:
    return Path(args.work_dir or f"~/.cache/dopr/experts/{args.env}-sac-s{args.seed}").expanduser()


def train(args) -> int:
    """SAC from stable-baselines3, checkpointed (model + replay buffer, atomic) every
    ``--checkpoint-every`` steps in the work folder; the same command resumes from there."""
    import os

    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(args.threads)
    folder = work_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    model_path, buffer_path, clock = folder / "model.zip", folder / "replay_buffer.pkl", folder / "elapsed.json"
    t_start = time.time()
    before = json.loads(clock.read_text())["seconds"] if clock.exists() and model_path.exists() else 0.0  # earlier sittings

    def checkpoint(model) -> None:  # write beside, then rename: a kill mid-write keeps the previous pair
        atomic_write_text(clock, json.dumps({"seconds": before + time.time() - t_start, "steps": int(model.num_timesteps)}))
        model.save(folder / "model.tmp.zip")
        model.save_replay_buffer(folder / "replay_buffer.tmp.pkl")
        os.replace(folder / "replay_buffer.tmp.pkl", buffer_path)
        os.replace(folder / "model.tmp.zip", model_path)

    class Progress(BaseCallback):
        def __init__(self):
            super().__init__()
            self.t0, self.start, self.returns = time.time(), None, []

        def _on_step(self) -> bool:
            self.start = self.num_timesteps if self.start is None else self.start
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    self.returns.append(info["episode"]["r"])
            if self.num_timesteps % 10_000 == 0:
                recent = np.mean(self.returns[-10:]) if self.returns else float("nan")
                rate = (self.num_timesteps - self.start + 1) / (time.time() - self.t0)
                print(f"step {self.num_timesteps}/{args.steps}  train return (last 10 episodes) {recent:.0f}  "
                      f"{rate:.0f} steps/s  eta {(args.steps - self.num_timesteps) / rate / 60:.1f} min", flush=True)
            if self.num_timesteps % args.checkpoint_every == 0:
                checkpoint(self.model)
                print(f"checkpoint at step {self.num_timesteps}: {model_path} (rerun the same command to resume)", flush=True)
            return True

    env = gym.wrappers.RecordEpisodeStatistics(gym.make(args.env))
    if model_path.exists() and buffer_path.exists():
        model = SAC.load(model_path, env=env)
        model.load_replay_buffer(buffer_path)
        print(f"resuming {model_path} at step {model.num_timesteps} (replay buffer {model.replay_buffer.size()} transitions)", flush=True)
    else:
        model = SAC("MlpPolicy", env, seed=args.seed, verbose=0, learning_starts=args.learning_starts)
    if model.num_timesteps < args.steps:
        model.learn(args.steps - model.num_timesteps, callback=Progress(), reset_num_timesteps=False)
        checkpoint(model)
    actor = model.policy.actor
    out = expert_path(args)
    save_checkpoint(out, {"env": args.env, "net_arch": list(model.policy.net_arch["pi"] if isinstance(model.policy.net_arch, dict) else model.policy.net_arch),
                          "state_dict": {k: v.cpu() for k, v in actor.state_dict().items()},
                          "obs_dim": env.observation_space.shape[0], "act_dim": env.action_space.shape[0],
                          "action_low": env.action_space.low.tolist(), "action_high": env.action_space.high.tolist(),
                          "trained": {"algorithm": f"SAC (stable-baselines3, default hyperparameters, learning_starts={args.learning_starts})",
                                      "steps": int(model.num_timesteps), "seed": args.seed,
                                      "seconds": round(before + time.time() - t_start), "threads": args.threads}})
    return evaluate(args, write=True)


def expert_return_tolerance(stored: dict) -> float:
    """Two standard errors of the stored mean return: the largest drift that still counts as the same expert."""
    return 2 * stored["std_return"] / stored["episodes"] ** 0.5


def evaluate(args, write: bool = False) -> int:
    path = expert_path(args)
    seeds = EVAL_SEEDS[: args.episodes]
    returns, lengths = rollout_returns(args.env, load_expert(args.env, path), seeds)
    result = {"env": args.env, "episodes": len(returns), "seeds": f"{seeds[0]}..{seeds[-1]}",
              "mean_return": round(float(np.mean(returns)), 1), "std_return": round(float(np.std(returns)), 1),
              "mean_length": round(float(np.mean(lengths)), 1)}
    record = path.with_suffix(".json")
    if write:
        atomic_write_text(record, json.dumps(result, indent=2) + "\n")
    print(f"{args.env} expert ({path}): mean return {result['mean_return']} ± {result['std_return']} "
          f"(sd) over {result['episodes']} episodes, seeds {result['seeds']}; mean length {result['mean_length']}")
    if not write and record.exists():
        stored = json.loads(record.read_text())
        if stored["episodes"] == result["episodes"]:
            # Physics and BLAS rounding differ slightly across mujoco / gymnasium / numpy builds, so "the same
            # expert" means: within two standard errors of the stored mean (sd / sqrt(episodes)).
            diff, tol = abs(stored["mean_return"] - result["mean_return"]), expert_return_tolerance(stored)
            print(f"stored with the expert: mean return {stored['mean_return']}" +
                  ("" if diff < 1e-6 else f"  (differs by {diff:.1f}, within the tolerance {tol:.1f} = 2 standard errors)" if diff <= tol
                   else f"  (DIFFERENT from now by {diff:.1f} > {tol:.1f} = 2 standard errors: mujoco, gymnasium or torch version?)"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SAC expert and save its policy")
    t.add_argument("--env", default="Hopper-v5")
    t.add_argument("--steps", type=int, default=300_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--learning-starts", type=int, default=5000, help="random-action steps before SAC updates begin")
    t.add_argument("--checkpoint-every", type=int, default=25_000, help="steps between checkpoints (model + replay buffer)")
    t.add_argument("--work-dir", default=None, help="checkpoints (default ~/.cache/dopr/experts/<env>-sac-s<seed>); resumed from when present")
    r = sub.add_parser("return", help="print the committed expert's mean return")
    r.add_argument("--env", default="Hopper-v5")
    for p in (t, r):
        p.add_argument("--out", default=None, help="the expert's file (default experiments/assets/experts/<env>_sac.pt, committed)")
        p.add_argument("--episodes", type=int, default=len(EVAL_SEEDS), help="evaluation episodes (seeds 10000, 10001, ...)")
    args = parser.parse_args(argv)
    return train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
