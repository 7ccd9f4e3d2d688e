"""The one training loop, for every task.

    python -m experiments.train task=lm optimizer=dopr_adamw            # one run
    python -m experiments.train -m optimizer=adamw,dopr_adamw seed=0,1,2 # a sweep

Reads top to bottom: compose the config, build the task and the optimizer, resume from the run
folder's checkpoint if there is one, then train: warmup + cosine LR, gradient clipping, optional
EMA of the weights for evaluation, validation loss every ``eval_every`` steps, the task's rollout
evaluator every ``rollout_every`` steps and at the end, atomic checkpoints. Every row goes to
``<run_dir>/metrics.jsonl`` (and W&B); ``<run_dir>/summary.json`` holds the final and best metrics.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import dopr

from .checkpoint import atomic_write_json, config_stamp, load_model_state, model_state, resume_checkpoint, save_checkpoint
from .faults import maybe_fail
from .logging import RunLogger, git_commit
from .tasks import build_task

OmegaConf.register_new_resolver("lr_tag", lambda lr: "" if lr is None else f"-lr{lr:g}", replace=True)


def lr_ladder(lr: float, k: int) -> float:
    """``lr`` moved ``k`` steps along the half-decade ladder 1, 3, 10, 30, ... (x 10^n): lr_ladder(1e-3, 1) = 3e-3,
    lr_ladder(3e-3, -1) = 1e-3. An LR off the ladder is first snapped to its nearest rung (5e-4 -> 3e-4)."""
    if not lr > 0:
        raise ValueError(f"lr_ladder needs a positive learning rate, got {lr!r}: check task.lr in the task's config")
    rung = round(2 * math.log10(lr)) + int(k)
    return float(f"{1 if rung % 2 == 0 else 3}e{rung // 2}")  # parsed, not multiplied: 3e-4, not 3.0000000000000003e-4


def task_lr(k: int, *, _root_: DictConfig) -> float:
    """``lr=${task_lr:k}``: this optimizer's grid centre moved k rungs along the ladder; the centre is the sweep
    preset's ``lr_centre`` entry (pinned, so pasting a tuned ``task.lr`` does not move a half-done grid) or else
    its ``task.lr``. Tuning presets sweep ``+lr_step: -1,0,1`` and set ``lr: ${task_lr:${lr_step}}`` (resolved in each
    job, with its optimizer): every optimizer gets the same 3-point grid around its own LR in one sweep file."""
    name = _root_.optimizer.name
    centres = _root_.get("lr_centre") or _root_.task.get("lr") or {}
    if name not in centres:
        raise ValueError(f"task_lr: no grid centre for optimizer {name!r}: add it to lr_centre in the sweep preset or to task.lr")
    return lr_ladder(float(centres[name]), k)


OmegaConf.register_new_resolver("task_lr", task_lr, replace=True)


class NonFiniteLoss(RuntimeError):
    pass


def command_line_keys() -> set[str]:
    """The config keys set on this run's command line (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def flat_keys(tree, prefix: str = "") -> dict:
    """{"weight_decay": 0.03, "kwargs.damping": 0.01} from {weight_decay: 0.03, kwargs: {damping: 0.01}}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, DictConfig):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve(cfg: DictConfig, given: set[str] | None = None) -> DictConfig:
    """Fill the task's tuned setting unless ``lr=`` was given: the learning rate (``task.lr``) and the
    optimizer settings the tuning selected with it (``task.tuned``: weight decay, damping), except keys
    set on the command line (``given``). Check that the task's scale config set every trainer setting."""
    cfg = cfg.copy()
    given = command_line_keys() if given is None else given
    if cfg.lr is None:
        chosen = cfg.task.get("lr") or {}
        if cfg.optimizer.name not in chosen:
            raise ValueError(f"no learning rate for optimizer {cfg.optimizer.name!r} on task {cfg.task.name!r}: pass lr=... or add it to task.lr in configs/task/{cfg.task.name}.yaml")
        cfg.lr = float(chosen[cfg.optimizer.name])
        tuned = (cfg.task.get("tuned") or {}).get(cfg.optimizer.name) or {}
        for key, value in flat_keys(tuned).items():
            if f"optimizer.{key}" not in given:
                OmegaConf.update(cfg.optimizer, key, value, merge=True)
    missing = [k for k, v in cfg.trainer.items() if v is None and k not in ("ema_decay", "ema_power", "grad_clip", "snapshot_every")]  # null: off
    if missing:
        raise ValueError(f"trainer settings {missing} are not set for task={cfg.task.name} scale={cfg.scale.name}: "
                         f"add configs/task_scale/{cfg.task.name}_{cfg.scale.name}.yaml or pass trainer.<name>=...")
    periods = {k: cfg.trainer[k] for k in ("steps", "eval_every", "rollout_every", "log_every", "checkpoint_every") if k in cfg.trainer}
    bad = {k: v for k, v in periods.items() if not (isinstance(v, int) and v >= 1)}
    if bad:
        raise ValueError(f"trainer settings {bad} must be whole numbers >= 1 (steps between events); to evaluate or "
                         f"roll out only at the end, set them to trainer.steps ({periods.get('steps')})")
    return cfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under DDP
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def export_slurm_environment() -> None:
    """Under a multi-task Slurm job (``hydra/launcher=slurm_ddp``), export submitit's environment to
    torch's variables (RANK, WORLD_SIZE, LOCAL_RANK, ...) before the device is picked from LOCAL_RANK."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Data parallelism is on exactly when the job has several processes:
    ``torchrun --nproc_per_node=N -m experiments.train ...``, or a Slurm job with N tasks
    (``hydra/launcher=slurm_ddp``; submitit's environment is exported to torch's variables here)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":  # before the process group, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(device)
    # A long timeout: the other processes wait at a barrier while the first one runs the rollouts.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return dist.get_rank(), world


def split(batch, parts: int, fix: str) -> list:
    """The batch cut into ``parts`` contiguous slices (every tensor split on its first dim)."""
    tensors = batch if isinstance(batch, (tuple, list)) else (batch,)
    size = tensors[0].shape[0]
    if size % parts:
        raise ValueError(f"the batch ({size}) does not split evenly into {parts}: {fix}")
    n = size // parts
    out = [tuple(t[i * n : (i + 1) * n] for t in tensors) for i in range(parts)]
    return out if isinstance(batch, (tuple, list)) else [o[0] for o in out]


def shard(batch, rank: int, world: int):
    """This process's contiguous slice of the global batch."""
    if world == 1:
        return batch
    return split(batch, world, f"make task.batch_size a multiple of {world} (the number of processes)")[rank]


def accumulate_gradients(task, model, batch, micro_batches: int, ap=None, autocast=contextlib.nullcontext, no_sync=None) -> torch.Tensor:
    """Forward and backward of one training batch, as ``micro_batches`` slices whose gradients add up
    to the whole batch's: each slice's loss is weighted by its share of the batch's loss terms
    (``task.loss_weight``: predicted tokens for the LM, else rows). AP pools the rows of every
    slice into one statistic; padding stays out of it (the task's ``row_mask``), and backward runs
    with AP paused, so activation checkpointing's recomputed forward adds no rows. ``no_sync``
    (DDP's) skips the gradient all-reduce on all slices but the last. Returns the batch's loss."""
    parts = split(batch, micro_batches, "make task.batch_size a multiple of trainer.micro_batches") if micro_batches > 1 else [batch]
    if len(parts) > 1:
        weights = [task.loss_weight(p) if hasattr(task, "loss_weight") else (p[0] if isinstance(p, (tuple, list)) else p).shape[0] for p in parts]
        total = sum(weights)
    total_loss = 0.0
    for i, part in enumerate(parts):
        masked = ap.row_mask(task.row_mask(part)) if ap is not None and hasattr(task, "row_mask") else contextlib.nullcontext()
        with masked, autocast():
            loss = task.loss(model, part).float()
        if len(parts) > 1:
            loss = loss * (weights[i] / total)
        sync = no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext()
        with sync, ap.paused() if ap is not None else contextlib.nullcontext():
            loss.backward()
        total_loss = total_loss + loss.detach()
    return total_loss


def enable_checkpointing(model) -> None:
    """Activation checkpointing, non-reentrant: the first forward runs with gradients on, so AP counts
    its rows there, and the forward recomputed inside backward runs while AP is paused."""
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers models (and peft models through them)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers models
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"trainer.grad_checkpointing=true, but {type(model).__name__} has no activation checkpointing "
                         f"(transformers and diffusers models do): set trainer.grad_checkpointing=false")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 (as transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def machine(device: torch.device) -> dict:
    """Where a run ran: reruns agree only up to seed noise across thread counts and CPUs."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def keep_freed_memory() -> bool:
    """Let glibc keep the memory a CPU step frees for the next step instead of returning it to the OS
    (mallopt: no heap trimming, a 256 MiB top pad, blocks up to 32 MiB from the heap rather than
    fresh mmaps). torch's CPU allocator caches nothing, so by default each step's large temporaries
    are mapped and page-faulted in again: on the 2-core VM that cost 10-15% of a robot training step
    (docs/experiments.md, "Memory reuse on CPU"). The same bits come out; peak memory is unchanged.
    False (nothing done) where the C library has no mallopt (macOS, musl). Written here: neither torch
    nor the standard library exposes it."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
    return all([mallopt(M_MMAP_THRESHOLD, 32 << 20), mallopt(M_TRIM_THRESHOLD, 1 << 30), mallopt(M_TOP_PAD, 256 << 20)])


@torch.no_grad()
def validation_loss(task, model) -> float:
    was = model.training
    model.eval()
    if hasattr(task, "val_loss_terms"):  # a per-token (per-item) mean over the whole set
        terms = [task.val_loss_terms(model, batch) for batch in task.val_batches()]
        model.train(was)
        return sum(t for t, _ in terms) / max(1, sum(n for _, n in terms))
    losses = [float(task.loss(model, batch)) for batch in task.val_batches()]
    model.train(was)
    return sum(losses) / len(losses)


def ema_update(decay: float, power: float | None, step: list[int]):
    """The EMA's update for AveragedModel: a constant ``decay``, or with ``power`` Diffusion Policy's warmup,
    min(decay, 1 - (1 + n)^-power) at the n-th update (early weights are forgotten fast, not kept at
    0.9999 for thousands of steps). ``step[0]`` holds n (set by the loop: no device sync)."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        d = decay if not power else min(decay, 1.0 - (1.0 + step[0]) ** -power)
        for a, c in zip(averaged, current):
            a.lerp_(c, 1.0 - d)

    return update


def kept_summary(run_dir: Path, steps: int) -> dict | None:
    """The summary of a run that finished all ``steps`` but whose checkpoint is gone: the small files a
    sweep keeps (scripts/keep_runs.sh) copied back into runs/ on a fresh machine. Such a run is skipped."""
    summary_path = run_dir / "summary.json"
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists() or not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "done" or summary.get("steps") != steps:
        return None
    print(f"{run_dir} already finished ({steps} steps; its summary.json is kept, its checkpoint is not)", flush=True)
    return summary


def train(cfg: DictConfig, run_dir: Path) -> dict:
    cfg = resolve(cfg)
    tr = cfg.trainer
    finished = kept_summary(run_dir, tr.steps)
    if finished is not None:
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
    opt = dopr.build_optimizer(model, cfg.optimizer.name, lr=cfg.lr, weight_decay=cfg.optimizer.weight_decay,
                               **OmegaConf.to_container(cfg.optimizer.kwargs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tr.warmup_steps, tr.steps))
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
    start, best, final_row = 0, {}, None
    if state is not None:
        start, best, final_row = state["step"], state["best"], state.get("final")
        seconds_before = state.get("seconds", 0.0)
        print(f"resuming {run_dir} from step {start}", flush=True)

    if start >= tr.steps:  # already finished: train and evaluate nothing, return the summary the run wrote
        summary_path = run_dir / "summary.json"
        written = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if (written or {}).get("status") == "done" or final_row is None:
            print(f"{run_dir} already finished ({tr.steps} steps)", flush=True)
            # A checkpoint from before the final row was kept in it, and no summary.json: only its best is known.
            return written or {"best": best, "status": "done"}
        # Killed after its last checkpoint, before summary.json was in place: written below from the checkpoint.
        print(f"{run_dir} finished its {tr.steps} steps; writing its summary.json from the last checkpoint", flush=True)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    commit = git_commit()
    logger = None
    if lead:
        logger = RunLogger(run_dir, {**resolved, "git_commit": commit, "world_size": world}, cfg.logger, start if state else None,
                           group=f"{cfg.task.name}/{run_dir.parent.name}", name=f"{cfg.optimizer.name}-s{cfg.seed}", tags=[cfg.optimizer.name, commit])
        if state is None:
            atomic_write_json(run_dir / "config.json", {**resolved, "git_commit": commit, "world_size": world, "machine": machine(device)})
            if ap is not None:
                logger.log({"step": 0, "ap_coverage": ap.coverage()})

    def evaluate(step: int, rollout: bool) -> dict:
        row = {"step": step, "val_loss": validation_loss(task, eval_model)}
        if ema is not None:  # the raw weights too, under raw_*: the EMA and the raw weights can disagree
            row["raw_val_loss"] = validation_loss(task, model)
        if rollout:
            t0 = time.time()
            maybe_fail("rollout")
            row.update(task.evaluate(eval_model, final=step == tr.steps))
            outcomes = getattr(task, "outcomes", None)  # per problem / episode, its own row (compact, not sent to W&B)
            if ema is not None:
                row.update({f"raw_{k}": v for k, v in task.evaluate(model, final=step == tr.steps).items()})
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
        if lead and (done % tr.eval_every == 0 or rollout):
            final_row = evaluate(done, rollout)
            if ap is not None:  # per-layer anisotropy of the inputs: cond(Sigma) at this step's refresh
                conds = ap.condition_numbers()
                finite = sorted(c for c in conds.values() if math.isfinite(c))
                summary_row = {"ap_cond_max": finite[-1], "ap_cond_median": finite[len(finite) // 2]} if finite else {}
                logger.log({"step": done, **summary_row, **{f"ap_cond/{k}": v for k, v in conds.items()}})
        if lead and (done % tr.checkpoint_every == 0 or done == tr.steps):
            save_checkpoint(ckpt_path, {"model": model_state(model), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                                        "rng": torch.get_rng_state(), "step": done, "best": best,
                                        "seconds": seconds_before + time.time() - t_start,
                                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                        "final": final_row if done == tr.steps else None, **stamp}, keep_previous=True)
        if world > 1 and (done % tr.eval_every == 0 or rollout or done % tr.checkpoint_every == 0):
            torch.distributed.barrier()  # the others wait while the first process evaluates and saves
    if not lead:
        return {"status": "done", "rank": rank}
    if hasattr(task, "save_artifacts"):  # e.g. a grid of samples for the report
        task.save_artifacts(eval_model, run_dir)
    summary = {"task": cfg.task.name, "optimizer": cfg.optimizer.name, "lr": cfg.lr, "seed": cfg.seed,
               "damping": ap.damping if ap is not None else None, "ema_decay": tr.ema_decay,
               "ap_rows": None if ap is None else {"max_rows": ap.max_rows, "max_rows_per_dim": ap.max_rows_per_dim},
               "scale": cfg.scale.name, "steps": tr.steps, "world_size": world, "metric_name": task.metric, "git_commit": commit,
               "higher_is_better": task.higher_is_better, "metric_range": getattr(task, "metric_range", None), "val_loss_label": getattr(task, "val_loss_label", None),
               "metric_label": getattr(task, "metric_label", None), "horizon_label": getattr(task, "horizon_label", None),
               "diagnostics": list(getattr(task, "diagnostics", ())),
               "task_meta": getattr(task, "report_meta", None),  # the task's setting for the report (control: env, expert_return)
               "final": final_row, "best": best, "status": "done",
               # set-up, training and evaluations of the lead process, summed over sittings (a resumed
               # run loses the time since its last checkpoint); the report averages it per optimizer
               "wall_seconds": round(seconds_before + time.time() - t_start, 1)}
    atomic_write_json(run_dir / "summary.json", summary)
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
    except (ValueError, NonFiniteLoss, FileNotFoundError) as err:
        atomic_write_json(run_dir / "summary.json", {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None  # one failed job must not stop the sweep; the report lists it
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
