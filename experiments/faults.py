"""Fault injection for the tests: make a process die, by SIGKILL, at a chosen moment inside the suite.

    DOPR_FAULT=<point>:<n>[,<point>:<n>...]

kills the process the ``n``-th time (counted from 1, per process) it reaches ``maybe_fail(<point>)``.
SIGKILL, because it is what a lost node, the OOM killer or ``kill -9`` does: no ``finally`` block, no
flush, no atexit handler runs. A kill at a moment chosen from outside (a timer) can rarely land inside a
write that lasts a millisecond; a named point can, and the same value replays the same kill.

The points:

- every atomic write (``experiments.checkpoint.atomic_path``), after the temporary file is written and
  synced, before it is renamed over its target, named after the target file's stem: ``checkpoint``
  (checkpoint.pt), ``summary`` (summary.json), ``best_model``, ``config``, ``metrics`` (the rewrite of
  metrics.jsonl on resume), a cache's stem;
- ``step``: the start of every training step of the loop (experiments/train.py);
- ``rollout``: the start of every rollout evaluation (``task.evaluate``) of the loop.

A new point is one call, ``maybe_fail("<name>")``, where the process should be able to die. Counts are
per process: under hydra/launcher=local each worker process counts its own hits (and the launcher stops
the sweep when one of them dies). Without DOPR_FAULT, ``maybe_fail`` returns at once.
"""

from __future__ import annotations

import os
import signal
import sys

_hits: dict[str, int] = {}


def planned(spec: str | None = None) -> dict[str, int]:
    """{point: occurrence} from DOPR_FAULT (or ``spec``); a malformed value names the expected form."""
    spec = os.environ.get("DOPR_FAULT", "") if spec is None else spec
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.rpartition(":")
        if not point or not n.isdigit() or int(n) < 1:
            raise ValueError(f"DOPR_FAULT={spec!r}: expected <point>:<n>[,<point>:<n>...] with n >= 1, e.g. checkpoint:2")
        plan[point] = int(n)
    return plan


def maybe_fail(point: str) -> None:
    """SIGKILL this process if DOPR_FAULT asks for it at this hit of ``point`` (see the module docstring)."""
    if "DOPR_FAULT" not in os.environ:
        return
    n = planned().get(point)
    if n is None:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == n:
        print(f"DOPR_FAULT: killing process {os.getpid()} at hit {n} of {point!r}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
