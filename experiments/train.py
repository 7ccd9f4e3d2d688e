"""The one training loop, for every task.

    python -m experiments.train task=lm optimizer=dopr_adamw            # one run
    python -m experiments.train -m optimizer=adamw,dopr_adamw seed=0,1,2 # a sweep

Reads top to bottom: compose the config, build the task and the optimizer, resume from the run
folder's checkpoint if there is one, then train: warmup + cosine LR, gradient clipping, optional
EMA of the weights for evaluation, validation loss every ``eval_every`` steps, the task's rollout
evaluator every ``rollout_every`` steps and at the end, atomic checkpoints. Every row goes to
``<run_dir>/metrics.jsonl`` (and W&B); ``<run_dir>/summary.json`` holds the final and best metrics; at the end
the run's record (experiments/record.py) is written and, in a named experiment (``+experiment=<task>/<name>``),
added to ``results/<task>/<name>/records.jsonl``. The parts the loop is built from are in experiments/engine.py,
the settings logic in experiments/protocol.py, the task contract in experiments/tasks/base.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import record
from .checkpoint import OtherSettings, atomic_write_json, config_stamp, load_model_state, model_state, resume_checkpoint, save_checkpoint
from .engine import (accumulate_gradients, build_optimizer, ema_update, enable_checkpointing, export_slurm_environment, init_distributed,
                     keep_freed_memory, lr_factor, machine, pick_device, shard, validation_loss)
from .faults import maybe_fail
from .logging import RunLogger, git_commit
from .protocol import resolve, tune_point
from .tasks import build_task


class NonFiniteLoss(RuntimeError):
    pass


def results_dir(cfg: DictConfig) -> Path | None:
    """Where a named experiment keeps its records (``results_dir``, set by configs/experiment/<task>/<name>.yaml);
    None for a run outside an experiment (its record stays in its run folder)."""
    return Path(cfg.results_dir) if cfg.get("results_dir") else None


def command(cfg: DictConfig) -> str | None:
    """This run's own command line (one job of a sweep gets its own overrides), for its record."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python -m experiments.train", *HydraConfig.get().overrides.task])

def kept_summary(run_dir: Path, steps: int) -> dict | None:
    """The summary of a run that finished all ``steps`` but whose checkpoint is gone (deleted to save space, or
    its small files copied to another machine). Such a run is skipped."""
    summary_path = run_dir / "summary.json"
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists() or not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "done" or summary.get("steps") != steps:
        return None
    print(f"{run_dir} already finished ({steps} steps; its summary.json is kept, its checkpoint is not)", flush=True)
    return summary


def train(cfg: DictConfig, run_dir: Path) -> dict:
    if (cfg.get("tune") or {}).get("points") and tune_point(cfg) is None:  # a tuning phase's empty job (scripts/tune.py)
        print(f"no tuning point {cfg.tune.trial} for {cfg.optimizer.name} in this phase: nothing to run", flush=True)
        return {"status": "skipped"}
    cfg = resolve(cfg)
    tr = cfg.trainer
    finished = kept_summary(run_dir, tr.steps)
    if finished is not None:
        record.finish(run_dir, results_dir(cfg))  # idempotent: its experiment's records file has it after a rerun
        return finished
    t_start, seconds_before = time.time(), 0.0  # wall time of this run, summed over its sittings (resumes)
    export_slurm_environment()
    device = pick_device(cfg.device)
    precision = tr.get("precision") or "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: choose fp32 or bf16")
    if precision == "bf16" and device.type == "cuda":
        # TF32 matmuls (cuDNN convolutions use TF32 by default). Not torch.backends.cudnn here: this
        # module runs as __main__, and submitit's cloudpickle cannot pickle that module object.
        torch.set_float32_matmul_precision("high")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    rank, world = init_distributed(device)
    lead = rank == 0  # only the first process evaluates, logs and writes files
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()
    task = build_task(cfg.task, cfg.seed, device)
    model = task.model
    micro = int(tr.get("micro_batches") or 1)
    if tr.get("grad_checkpointing"):
        enable_checkpointing(model)
    # DDP averages the gradients; AP all-reduces its statistics itself (dopr's distributed="auto").
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = build_optimizer(model, cfg.optimizer, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tr.warmup_steps, tr.steps, tr.get("schedule", "cosine"),
                                                                            tr.get("decay_fraction", 0.2)))
    ema, ema_step = None, [0]
    if tr.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(tr.ema_decay, tr.get("ema_power"), ema_step))
    eval_model = ema.module if ema is not None else model
    ap = getattr(opt, "preconditioner", None)

    ckpt_path = run_dir / "checkpoint.pt"
    stamp = config_stamp(OmegaConf.to_container(cfg, resolve=True))  # the settings a checkpoint must have been written with

    def restore(state: dict) -> None:
        load_model_state(model, state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    # The newest usable of checkpoint.pt and the one before it (checkpoint.prev.pt); a damaged one is set aside.
    state = resume_checkpoint(ckpt_path, stamp, restore, set_aside_files=lead)
    start, best, final_row, train_seconds = 0, {}, None, 0.0  # train_seconds: training steps only (no evaluation, rollout, checkpoint)
    train_cpu_seconds = 0.0  # the CPU time of this process over the same steps: wall well above it means shared cores or a pause
    if state is not None:
        start, best, final_row = state["step"], state["best"], state.get("final")
        seconds_before = state.get("seconds", 0.0)
        train_seconds = state.get("train_seconds", 0.0)
        train_cpu_seconds = state.get("train_cpu_seconds")  # None: a checkpoint from before the field (not counted on)
        print(f"resuming {run_dir} from step {start}", flush=True)

    if start >= tr.steps:  # already finished: train and evaluate nothing, return the summary the run wrote
        summary_path = run_dir / "summary.json"
        written = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if (written or {}).get("status") == "done" or final_row is None:
            print(f"{run_dir} already finished ({tr.steps} steps)", flush=True)
            # A checkpoint from before the final row was kept in it, and no summary.json: only its best is known.
            if written is not None:
                record.finish(run_dir, results_dir(cfg))  # idempotent: its experiment's records file has it after a rerun
            return written or {"best": best, "status": "done"}
        # Killed after its last checkpoint, before summary.json was in place: written below from the checkpoint.
        print(f"{run_dir} finished its {tr.steps} steps; writing its summary.json from the last checkpoint", flush=True)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    # The records files under results/ grow as a sweep's runs finish: they are not the code a run ran, so they do not
    # make it "dirty" (every run of a sweep after the first was stamped -dirty before).
    commit = git_commit(ignore=("results",))
    logger = None
    if lead:
        logger = RunLogger(run_dir, {**resolved, "git_commit": commit, "world_size": world}, cfg.logger, start if state else None,
                           group=f"{cfg.task.name}/{run_dir.parent.name}", name=f"{cfg.optimizer.name}-s{cfg.seed}", tags=[cfg.optimizer.name, commit])
        if state is None:
            atomic_write_json(run_dir / "config.json", {**resolved, "git_commit": commit, "world_size": world, "machine": machine(device),
                                                      "command": command(cfg)})
            if ap is not None:
                logger.log({"step": 0, "ap_coverage": ap.coverage()})

    def evaluate(step: int, rollout: bool, seconds: float, cpu_seconds: float | None, light: bool = False) -> dict:
        row = {"step": step, "train_seconds": round(seconds, 3), **({} if cpu_seconds is None else {"train_cpu_seconds": round(cpu_seconds, 3)}),
               "val_loss": validation_loss(task, eval_model)}
        if ema is not None:  # the raw weights too, under raw_*: the EMA and the raw weights can disagree
            row["raw_val_loss"] = validation_loss(task, model)
        if light:  # the budget axis's cheaper point: the headline metric on fewer instances; no best checkpoint, no raw_*
            t0 = time.time()
            row.update(task.light_evaluate(eval_model).metrics)
            row.update({"light": True, "rollout_seconds": time.time() - t0})
        if rollout:
            t0 = time.time()
            maybe_fail("rollout")
            result = task.evaluate(eval_model, final=step == tr.steps)
            row.update(result.metrics)
            outcomes = result.outcomes  # per problem / episode, its own row (compact, not sent to W&B)
            if ema is not None:
                row.update({f"raw_{k}": v for k, v in task.evaluate(model, final=step == tr.steps).metrics.items()})
            row["rollout_seconds"] = time.time() - t0
            metric = row[task.metric]
            # The best checkpoint is chosen on the task's selection problems/episodes when it has them
            # (select_<metric>), so that best_* numbers are not chosen on the data they report.
            chooser = row.get(f"select_{task.metric}", metric)
            better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
            previous = best.get("chosen_by", best.get("metric"))  # checkpoints from before select_* have only "metric"
            if previous is None or better(chooser, previous):
                best.update({"metric": metric, "chosen_by": chooser, "chosen_on": "selection set" if f"select_{task.metric}" in row else "reported set",
                             "step": step, "val_loss_at_best": row["val_loss"],
                             **{f"best_{k}": v for k, v in row.items() if k not in ("step", "rollout_seconds")}})
                save_checkpoint(run_dir / "best_model.pt", {"model": model_state(eval_model), "step": step})
        best["min_val_loss"] = min(best.get("min_val_loss", math.inf), row["val_loss"])
        logger.log(row)
        if rollout and outcomes:
            logger.log({"step": step, "outcomes": outcomes})
        print("  eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        return row

    def snapshot(step: int) -> None:
        if lead and tr.get("snapshot_every") and step % tr.snapshot_every == 0:
            save_checkpoint(run_dir / "weights" / f"step{step}.pt", {"model": model_state(model), "step": step})

    model.train()
    if start == 0:
        snapshot(0)
    t_start = time.time()
    for step in range(start, tr.steps):
        maybe_fail("step")
        t_step, cpu_step = time.perf_counter(), time.process_time()
        diagnostics = ap.diagnostic_seconds if ap is not None else 0.0  # cond(Sigma) for the logs: not training time
        batch = shard(task.train_batch(step), rank, world)
        seen = accumulate_gradients(task, train_model, batch, micro, ap, autocast, train_model.no_sync if world > 1 else None)
        if world > 1:  # every process must see the same loss to stop together on a non-finite one
            torch.distributed.all_reduce(seen)
            seen /= world
        if not torch.isfinite(seen):
            raise NonFiniteLoss(f"step {step}: the training loss is {seen.item()}; lower the learning rate (lr={cfg.lr}) "
                                f"or raise the AP damping (optimizer.kwargs.damping) and rerun: the run resumes from its last checkpoint")
        if ap is not None:  # cond(Sigma) costs an eigvalsh per statistic: only on the steps that log it
            ap.track_conditioning = (step + 1) % tr.eval_every == 0 or (step + 1) % tr.rollout_every == 0 or step + 1 == tr.steps
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip) if tr.grad_clip else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_step[0] = step  # the n-th update (the first one copies the weights)
            ema.update_parameters(model)
        logged = (ap.diagnostic_seconds - diagnostics) if ap is not None else 0.0
        train_seconds += time.perf_counter() - t_step - logged
        if train_cpu_seconds is not None:
            train_cpu_seconds += time.process_time() - cpu_step - logged
        done = step + 1
        snapshot(done)
        if lead and (done % tr.log_every == 0 or done == tr.steps):
            rate = (done - start) / (time.time() - t_start)
            row = {"step": done, "train_loss": seen.item(), "lr": sched.get_last_lr()[0], "steps_per_s": rate}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if ap is not None:
                row.update({f"ap_fallback_{k}": v for k, v in ap.fallbacks.items()})
            logger.log(row)
            eta = (tr.steps - done) / max(rate, 1e-9)
            print(f"step {done}/{tr.steps} loss {seen.item():.4f} lr {row['lr']:.2e} {rate:.2f} it/s eta {eta / 60:.1f} min", flush=True)
        rollout = done % tr.rollout_every == 0 or done == tr.steps
        scheduled = done % tr.eval_every == 0 or rollout  # the full evaluations (AP tracked cond(Sigma) on these steps)
        light = bool(tr.get("light_rollout_every")) and done % tr.light_rollout_every == 0 and not rollout
        if lead and (scheduled or light):
            final_row = evaluate(done, rollout, train_seconds, train_cpu_seconds, light)
            if ap is not None and scheduled:  # per-layer anisotropy of the inputs: cond(Sigma) at this step's refresh
                conds = ap.condition_numbers()
                finite = sorted(c for c in conds.values() if math.isfinite(c))
                summary_row = {"ap_cond_max": finite[-1], "ap_cond_median": finite[len(finite) // 2]} if finite else {}
                logger.log({"step": done, **summary_row, **{f"ap_cond/{k}": v for k, v in conds.items()}})
        if lead and (done % tr.checkpoint_every == 0 or done == tr.steps):
            save_checkpoint(ckpt_path, {"model": model_state(model), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                                        "rng": torch.get_rng_state(), "step": done, "best": best, "train_seconds": train_seconds,
                                        "train_cpu_seconds": train_cpu_seconds,
                                        "seconds": seconds_before + time.time() - t_start,
                                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                        "final": final_row if done == tr.steps else None, **stamp}, keep_previous=True)
        if world > 1 and (scheduled or light or done % tr.checkpoint_every == 0):
            torch.distributed.barrier()  # the others wait while the first process evaluates and saves
    if not lead:
        return {"status": "done", "rank": rank}
    task.save_artifacts(eval_model, run_dir)  # e.g. a grid of samples for the report
    summary = {"task": cfg.task.name, "optimizer": cfg.optimizer.name, "lr": cfg.lr, "seed": cfg.seed,
               "damping": ap.damping if ap is not None else None, "ema_decay": tr.ema_decay,
               "ap_rows": None if ap is None else {"max_rows": ap.max_rows, "max_rows_per_dim": ap.max_rows_per_dim},
               "scale": cfg.scale.name, "steps": tr.steps, "world_size": world, "metric_name": task.metric, "git_commit": commit,
               "higher_is_better": task.higher_is_better, "metric_range": task.metric_range, "val_loss_label": task.val_loss_label,
               "metric_label": task.metric_label, "horizon_label": task.horizon_label, "diagnostics": list(task.diagnostics),
               "task_meta": task.report_meta,  # the task's setting for the report (control: env, expert_return)
               "final": final_row, "best": best, "status": "done",
               # set-up, training and evaluations of the lead process, summed over sittings (a resumed
               # run loses the time since its last checkpoint); the report averages it per optimizer
               "wall_seconds": round(seconds_before + time.time() - t_start, 1)}
    atomic_write_json(run_dir / "summary.json", summary)
    record.finish(run_dir, results_dir(cfg))  # the run's record.json, added to its experiment's records file
    logger.summary({**{f"final_{k}": v for k, v in final_row.items()}, **{f"best_{k}": v for k, v in best.items()}})
    logger.close()
    return summary


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """train(), then leave the process group (if any) cleanly so the next job in this process starts fresh."""
    try:
        return train(cfg, run_dir)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run(cfg, run_dir)
    except OtherSettings as err:  # the folder holds another run: leave its summary and its record as they are
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None
        sys.exit(1)
    except (ValueError, NonFiniteLoss, FileNotFoundError) as err:
        atomic_write_json(run_dir / "summary.json", {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        record.finish(run_dir, results_dir(cfg))  # a failed run is recorded too: the report lists it with its reason
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None  # one failed job must not stop the sweep; the report lists it
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
