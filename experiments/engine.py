"""The parts the training loop (experiments/train.py) is built from, importable without it: device and process
group set-up, batch splitting and gradient accumulation (AP pools the rows of every micro-batch), the LR schedule,
the validation loss, the EMA update and what a run records about its machine. Scripts that need one of these
(benchmarks, diagnostics, the GPU check) import them from here, not from the loop."""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch

import dopr
from dopr.factory import AP_OPTIONS
from .tasks.base import eval_mode


def build_optimizer(model: torch.nn.Module, opt_cfg, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer from its config (configs/optimizer/<name>.yaml): a named GP of the library (adamw, muon,
    signum, adamuon, sgd, or dopr_<one of them>: dopr.build_optimizer; ``build`` names it where the config's ``name``
    is a label of its own, e.g. dopr_adamw_k10 builds dopr_adamw with ``update_every: 10``), or any
    ``torch.optim.Optimizer`` by import path (``class_path``, Hydra ``_target_`` style) with its ``kwargs``, AP put in
    front of it when ``ap: true`` (AP's options, e.g. ``damping``, then go in ``kwargs`` too). A class with a
    ``for_model(model)`` classmethod is built as the class it returns (experiments/comparators.py: one-sided Shampoo
    keeps embeddings diagonal). docs/extending.md, "Add an optimizer"."""
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(opt_cfg.kwargs) if opt_cfg.get("kwargs") is not None else {}
    weight_decay = opt_cfg.get("weight_decay") or 0.0
    if not opt_cfg.get("class_path"):
        return dopr.build_optimizer(model, opt_cfg.get("build") or opt_cfg.name, lr=lr, weight_decay=weight_decay, **kwargs)
    from hydra.utils import get_class

    try:
        cls = get_class(opt_cfg.class_path)
    except Exception as err:  # hydra wraps the import error; name the setting
        raise ValueError(f"optimizer.class_path={opt_cfg.class_path!r} cannot be imported ({err}): give a module path and class "
                         "name reachable from this process, e.g. torch.optim.RAdam") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer.class_path={opt_cfg.class_path!r} is not a torch.optim.Optimizer subclass")
    if callable(getattr(cls, "for_model", None)):  # a class that routes parameters by their layer (e.g. embeddings apart)
        cls = cls.for_model(model)
    if opt_cfg.get("ap"):
        return dopr.DoPr(model, base=cls, lr=lr, weight_decay=weight_decay, **kwargs)
    stray = sorted(set(kwargs) & set(AP_OPTIONS))
    if stray:
        raise ValueError(f"{stray} are activation-preconditioning options, but optimizer {opt_cfg.name!r} has ap: false: set "
                         "optimizer.ap=true to put AP in front of it")
    return dopr.build_base(model, cls, lr=lr, weight_decay=weight_decay, **kwargs)


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
        weights = [task.loss_weight(p) for p in parts]
        total = sum(weights)
    total_loss = 0.0
    for i, part in enumerate(parts):
        mask = task.row_mask(part) if ap is not None else None
        masked = ap.row_mask(mask) if mask is not None else contextlib.nullcontext()
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


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup, then ``cosine`` decay to 0 (as transformers' get_cosine_schedule_with_warmup), ``constant``
    (the LR stays at its peak: a run of k steps is the first k steps of any longer run), or ``wsd`` (warmup-stable-
    decay: constant, then linear to 0 over the last ``decay_fraction`` of the steps)."""
    if schedule not in ("cosine", "constant", "wsd"):
        raise ValueError(f"trainer.schedule={schedule!r} is not a schedule: use cosine, constant or wsd")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if schedule == "wsd":
        decay = max(1, round(decay_fraction * total))
        return min(1.0, (total - step) / decay)
    return 1.0  # constant


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
    with eval_mode(model):
        terms = [task.val_loss_terms(model, batch) for batch in task.val_batches()]  # the LM: a per-token mean over the set
    return sum(t for t, _ in terms) / max(1, sum(n for _, n in terms))


def ema_update(decay: float, power: float | None, step: list[int]):
    """The EMA's update for AveragedModel: a constant ``decay``, or with ``power`` Diffusion Policy's warmup,
    min(decay, 1 - (1 + n)^-power) at the n-th update (early weights are forgotten fast, not kept at
    0.9999 for thousands of steps). ``step[0]`` holds n (set by the loop: no device sync)."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        d = decay if not power else min(decay, 1.0 - (1.0 + step[0]) ** -power)
        for a, c in zip(averaged, current):
            a.lerp_(c, 1.0 - d)

    return update
