"""The one small interface between a task and the training loop."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Protocol

import torch
import torch.nn as nn


class Task(Protocol):
    model: nn.Module  # the trained network (the loop moves it, optimises it, keeps an EMA copy)
    metric: str  # the headline rollout metric in evaluate()'s result, e.g. "accuracy"
    higher_is_better: bool
    # optional: metric_range = (0, 1) marks a rate (success); the reports then use intervals that stay inside it
    # optional: report_meta = {...}, facts about the task's setting that the report records in results_meta.json
    # (control: env and expert_return)

    def train_batch(self, step: int) -> Any:
        """The batch for this step: a function of (seed, step) only, so a resumed run sees the same data."""

    def val_batches(self) -> Iterable[Any]:
        """Held-out batches, identical across runs and optimizers."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The one-step training objective (a scalar)."""

    def evaluate(self, model: nn.Module, final: bool = True) -> dict[str, float]:
        """Roll the model out on its own outputs and score it (the metric the paper cares about).
        ``final``: the run's last evaluation. Before it a task may score less (the flow task scores
        only its headline solver and step count there), but always the headline ``metric`` and its
        ``select_<metric>``, since the best checkpoint is chosen and reported from them."""


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside, the caller's count restored after. For what a task makes once
    and caches (the flow task's FD classifier, the control task's expert demonstrations and expert
    return): their bits depend on the thread count (float sums in another order; through a simulator,
    whole other trajectories), and whichever process first needs them makes them (a one-thread run, a
    test, a script)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
