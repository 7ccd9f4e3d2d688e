"""Run logging: every row to a local JSONL file (the source of truth for the report) and to W&B.

W&B runs offline unless ``WANDB_MODE`` says otherwise or an API key is set (``WANDB_API_KEY`` or
a ``wandb login``); offline runs are uploaded later with ``wandb sync <run_dir>/wandb``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from pathlib import Path

from .checkpoint import atomic_write_text


def git_commit(ignore: tuple[str, ...] = (), repo: Path | None = None) -> str:
    """Short HEAD commit, "-dirty" if tracked files (outside the ``ignore`` paths, e.g. the results
    folder a report is writing) have uncommitted changes. ``repo``: this package's checkout unless given."""
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=where, timeout=10)
        spec = ["--", ":/", *[f":(top,exclude){p}" for p in ignore]] if ignore else []
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *spec], capture_output=True, text=True,
                               cwd=where, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _clean(value):
    """JSON has no inf/nan: write them as strings so a row is never lost."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """``log(row)`` appends one JSON line (flushed at once) and forwards the row to W&B.

    On resume, rows logged after the checkpoint being resumed are dropped from the JSONL (they
    will be logged again), so no row is lost or counted twice; the W&B run resumes under the same id.
    """

    def __init__(self, run_dir: Path, config: dict, logger_cfg, resume_step: int | None, group: str, name: str, tags: list[str]):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if resume_step is not None and row.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.wandb = None
        if logger_cfg.name == "wandb":
            import wandb

            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id)
            mode = wandb_mode(logger_cfg.mode)
            self.wandb = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, group=group, name=name,
                                    id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode,
                                    tags=tags, settings=wandb.Settings(silent=True))

    def log(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: _clean(v) for k, v in values.items()})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_mode(configured: str | None = None) -> str:
    """WANDB_MODE if set, else the configured mode, else online only where an API key is known."""
    mode = os.environ.get("WANDB_MODE") or configured
    if not mode:
        mode = "online" if os.environ.get("WANDB_API_KEY") or _has_netrc_key() else "offline"
    return mode


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
