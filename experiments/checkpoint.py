"""Atomic writes: a file is written beside its target and renamed over it, so a kill at any moment
leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed
    over ``path``, otherwise deleted. For writers that need a file name (h5py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the block: concurrent runs (local
    jobs, Slurm array tasks on one file system) that build the same cached file wait for each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def model_state(model: torch.nn.Module) -> dict:
    """The weights a checkpoint keeps: the whole ``state_dict``, or, when some parameters are frozen
    (LoRA on a pretrained base), only the trainable ones and the buffers. The frozen base is rebuilt
    from its own source when the run resumes, so a 3B/8B base is not copied into every checkpoint."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = model.state_dict()
    return state if not frozen else {k: v for k, v in state.items() if k not in frozen}


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load what ``model_state`` kept; every trainable weight must be there."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"the checkpoint does not fit this model (missing {sorted(set(missing) - frozen)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}): it was written with other settings; rerun with those, or use a new run folder")
