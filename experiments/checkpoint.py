"""Atomic writes and checkpoints.

Atomic writes: a file is written beside its target, synced, and renamed over it, then the directory is
synced, so a kill at any moment leaves either the old file or the new one, never half of one, and a node
lost right after the rename still has the new directory entry.

Checkpoints load with ``weights_only=True``: a checkpoint holds tensors and plain values (numbers,
strings, lists, dicts) only, so loading one cannot run code; a file that holds other pickled objects is
refused with ``UnusableCheckpoint``. The run checkpoint keeps its previous version beside it
(``checkpoint.prev.pt``), and ``resume_checkpoint`` falls back to it when the latest one is damaged
(docs/experiments.md, "Faults and damaged files").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .faults import maybe_fail

# The settings a run may be resumed with changed (documented in docs/experiments.md, "Faults and damaged
# files"): where it runs and where its rows go (threads, device, logger, cluster), how long it trains
# (trainer.steps: a finished run can be extended), when it evaluates, logs and saves (which leaves the
# updates alone), memory-only settings that compute the same update (micro-batches, activation
# checkpointing), where caches live, and the tables the learning rate and optimizer settings are looked up
# in (task.lr, task.tuned, a sweep's lr_centre: pasting a new tuning into configs/task/ must not stop the
# runs of a half-done sweep; the values looked up, `lr` and `optimizer.*`, are compared). Every other
# resolved setting must match the checkpoint's.
RESUME_MAY_DIFFER = ("threads", "device", "logger", "cluster", "trainer.steps", "trainer.eval_every", "trainer.rollout_every",
                     "trainer.light_rollout_every", "task.light_episodes", "task.light_per_length",  # evaluation only
                     "trainer.log_every", "trainer.checkpoint_every", "trainer.snapshot_every", "trainer.micro_batches",
                     "trainer.grad_checkpointing", "task.data_dir", "task.image_cache", "task.num_proc", "task.lr", "task.tuned",
                     "lr_centre",
                     # a tuning trial's pointers into scripts/tune.py's points file (its index shifts when a resumed phase
                     # lists only the trials still to run); the trial itself is its label and values, which stay in the stamp
                     "tune.trial", "tune.points")

REQUIRED = ("model", "optimizer", "scheduler", "rng", "step", "best")  # what a run checkpoint holds


class UnusableCheckpoint(ValueError):
    """A checkpoint or cached file that cannot be used: damaged, refused (it holds pickled objects) or
    written with other settings. A ValueError, so the entry point records it in summary.json and the
    other jobs of a sweep go on. ``reason`` is the short form, without the file's name and the fix."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class OtherSettings(UnusableCheckpoint):
    """A run folder whose checkpoint was written with other settings: another run's folder, not a failure of this
    run. The entry point leaves its summary and record alone (experiments/train.py)."""


def _fsync_dir(directory: Path) -> None:
    """Sync a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; nothing more can be done there
        pass
    finally:
        os.close(fd)


def previous_path(path: Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the version before ``path``: checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_previous(path: Path) -> None:
    """Make ``path``'s current file the previous version. A hard link first, so ``path`` itself never
    goes missing; where the file system has no hard links, a rename (``resume_checkpoint`` then finds
    the previous version if the process dies before the new file is in place)."""
    prev = previous_path(path)
    link = path.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, prev)


@contextlib.contextmanager
def atomic_path(path: Path, keep_previous: bool = False):
    """Yield a temporary path beside ``path``; when the block ends without an error the file is synced
    and renamed over ``path`` (with ``keep_previous``, ``path``'s old file becomes ``previous_path(path)``
    first), and the directory is synced; on an error the temporary file is deleted. For writers that
    need a file name (h5py). Before the rename, ``faults.maybe_fail(<path's stem>)``: the tests kill the
    process there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on disk before the name points at it
        finally:
            os.close(fd)
        maybe_fail(path.stem)
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary files that writes of ``path`` (and of its previous version) left when their
    process was killed before the rename: they hold nothing the target does not (an incomplete write)."""
    path = Path(path)
    for name in (path.name, previous_path(path).name):
        for stale in path.parent.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the block: concurrent runs (local
    jobs, Slurm array tasks on one file system) that build the same cached file wait for each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _atomic(path: Path, write, keep_previous: bool = False) -> None:
    with atomic_path(path, keep_previous) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """Write ``state`` (tensors and plain values only: ``load_checkpoint`` refuses anything else)
    atomically; with ``keep_previous`` the file it replaces is kept as ``previous_path(path)``."""
    _atomic(path, lambda f: torch.save(state, f), keep_previous)


def load_checkpoint(path: Path, device) -> dict | None:
    """The checkpoint or cached file at ``path`` (None if there is none), loaded with
    ``weights_only=True``: tensors and plain values only, so that loading a file cannot run code.
    ``UnusableCheckpoint`` names the file when it is damaged or holds other pickled objects."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise _damaged(path, err) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = f"refused: it holds a pickled Python object ({found.group(1) if found else 'not a tensor or plain value'}) that loading could run as code"
        raise UnusableCheckpoint(f"{path}: {reason}. The suite's files hold tensors and plain values only (loaded with weights_only=True): "
                                 f"delete it to have it made again, or, if you trust it, re-save only its tensors and plain values",
                                 reason) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise  # not the file's content
    except Exception as err:  # a truncated or overwritten file: RuntimeError (zip), OSError (EINVAL), EOFError, KeyError, ...
        raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> UnusableCheckpoint:
    detail = (str(err).splitlines() or [""])[0].split(". ")[0][:120]  # torch's first sentence says what failed
    reason = f"damaged, cannot be read ({type(err).__name__}: {detail})" if detail else f"damaged, cannot be read ({type(err).__name__})"
    return UnusableCheckpoint(f"{path}: {reason}: cut short or overwritten (an interrupted copy, a full disk, a lost node). "
                              f"If it is a cache, delete it to have it made again", reason)


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


# ------------------------------------------------------------------------------ resuming a run
def _drop(tree: dict, keys, prefix: str = "") -> dict:
    """``tree`` without ``keys`` and without unset (None) leaves: a setting added to a config later with a None
    default (off) leaves the runs written before it resumable."""
    return {k: _drop(v, keys, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in tree.items()
            if f"{prefix}{k}" not in keys and v is not None}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_stamp(resolved: dict) -> dict:
    """``{"config_hash", "config"}`` for a run checkpoint: the resolved config without the settings that
    may differ on resume (``RESUME_MAY_DIFFER``), as sorted JSON and its SHA-256. Plain strings, so the
    checkpoint stays loadable with weights_only=True; the JSON lets a mismatch name its settings."""
    text = json.dumps(_drop(resolved, set(RESUME_MAY_DIFFER)), sort_keys=True, default=str)
    return {"config_hash": hashlib.sha256(text.encode()).hexdigest()[:16], "config": text}


def _config_diff(saved: str | None, now: str) -> str:
    if not saved:
        return "its settings are not recorded"
    try:
        a, b = _flat(json.loads(saved)), _flat(json.loads(now))
    except (TypeError, ValueError):
        return "its recorded settings cannot be read"
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)
                  and not any(k == d or k.startswith(d + ".") for d in RESUME_MAY_DIFFER))
    shown = ", ".join(f"{k}: {'<unset>' if a.get(k) is None else repr(a[k])} in the checkpoint, "
                      f"{'<unset>' if b.get(k) is None else repr(b[k])} now" for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_state(state, stamp: dict | None) -> tuple[str, str] | None:
    """None if ``state`` can be resumed from; else ("damaged", why) for a checkpoint whose content is not a
    whole run checkpoint (missing parts, a step its scheduler does not agree with) or ("settings", which)
    for one written with other settings (a different config hash). Checkpoints from before the hash was
    recorded are not compared."""
    if not isinstance(state, dict):
        return "damaged", f"not a run checkpoint (a {type(state).__name__})"
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        return "damaged", f"not a whole run checkpoint (no {', '.join(missing)})"
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return "damaged", f"its step is {step!r}, not a whole number >= 1"
    last = state["scheduler"].get("last_epoch") if isinstance(state["scheduler"], dict) else None
    if last is not None and last != step:
        return "damaged", f"its parts disagree: step {step}, LR scheduler at step {last}"
    rng = state["rng"]
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
        return "damaged", "its RNG state is not a byte tensor"
    if stamp is not None and state.get("config_hash") is not None and state["config_hash"] != stamp["config_hash"]:
        if _restamped(state.get("config")) != stamp["config_hash"]:  # written before a key joined RESUME_MAY_DIFFER
            return "settings", _config_diff(state.get("config"), stamp["config"])
    return None


def _restamped(saved: str | None) -> str | None:
    """The hash a checkpoint's recorded settings have under today's RESUME_MAY_DIFFER (None if unreadable)."""
    try:
        return config_stamp(json.loads(saved))["config_hash"] if saved else None
    except (TypeError, ValueError):
        return None


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.set-aside-<k>`` (the first k free) beside it, and sync the directory:
    kept for a look, out of the way of the run."""
    k = 1
    while (target := path.with_name(f"{path.name}.set-aside-{k}")).exists():
        k += 1
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


def resume_checkpoint(path: Path, stamp: dict | None, restore: Callable[[dict], None], set_aside_files: bool = True,
                      log=lambda line: print(line, file=sys.stderr, flush=True)) -> dict | None:
    """The state of the newest usable run checkpoint among ``path`` and its previous version, after
    ``restore(state)`` applied it (None when the run has none yet: a fresh start).

    A checkpoint that cannot be loaded (damaged, or holding pickled objects), that fails
    ``check_state`` or whose ``restore`` fails is set aside (renamed, ``set_aside``) with a one-line
    message, and the previous one is tried. A checkpoint written with other settings is set aside only
    when the previous one is usable; when none is, nothing is renamed and ``UnusableCheckpoint`` names
    the settings (the command changed, not the file). When none loads, ``UnusableCheckpoint`` says how
    to restart. ``set_aside_files=False`` (the other processes of a data-parallel run) renames nothing."""
    path = Path(path)
    if set_aside_files:
        remove_stale_temps(path)
    candidates = [p for p in (path, previous_path(path)) if p.exists()]
    unusable: list[tuple[Path, str, str]] = []  # (file, kind, why)
    for p in candidates:
        try:
            state = load_checkpoint(p, "cpu")  # to the CPU first; load_state_dict copies onto the device
            problem = check_state(state, stamp)
        except UnusableCheckpoint as err:
            problem = ("damaged", err.reason)
        if problem is None:
            try:
                restore(state)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                problem = ("damaged", f"does not load into this run ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})")
        if problem is not None:
            unusable.append((p, *problem))
            continue
        if set_aside_files:
            for q, _, why in unusable:
                log(f"{q}: {why}; set aside as {set_aside(q).name}")
            if unusable:
                log(f"{path.parent}: resuming from {p.name} (step {state['step']}), the checkpoint before it")
        return state
    if not candidates:
        return None
    settings = [(q, why) for q, kind, why in unusable if kind == "settings"]
    aside = []
    for q, kind, why in unusable:
        if kind == "damaged" and set_aside_files:
            target = set_aside(q)
            log(f"{q}: {why}; set aside as {target.name}")
            aside.append(target.name)
    if settings:
        raise OtherSettings(f"{path.parent} holds a run with other settings ({settings[0][1]}): rerun with the settings it "
                                 f"was written with, or give this run another folder (hydra.run.dir=..., or move {path.parent} away)")
    raise UnusableCheckpoint(f"{path.parent}: no usable checkpoint ({', '.join(q.name for q, _, _ in unusable)} damaged"
                             + (f", set aside as {', '.join(aside)}" if aside else "") + "). To restart the run from step 0, rerun the "
                             "same command (its rows are written again; the set-aside files stay until you delete them)")
