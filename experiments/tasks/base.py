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


def check_sizes(cfg, minimum: dict[str, int], nullable: tuple[str, ...] = (), may_be_empty: tuple[str, ...] = ()) -> None:
    """Stop at the start of a run, naming the setting, when a size in the task config is not a whole number
    of at least its ``minimum`` (``{"batch_size": 1, "model.width": 1}``; keys relative to ``task``). A list
    (chain lengths, horizons) needs every entry at least that, and at least one entry unless its key is in
    ``may_be_empty``. A key in ``nullable`` may be null (off, or "all"); a key a config does not have is
    skipped (variants of a task share one list). Without this check a zero batch ends deep in the first
    step with a tensor error (``max(): Expected reduction dim``) or a NaN loss blamed on the learning rate."""
    from omegaconf import OmegaConf

    absent = object()
    for key, low in minimum.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent or (value is None and key in nullable):
            continue
        is_list = OmegaConf.is_list(value) or isinstance(value, (list, tuple))
        entries = list(value) if is_list else [value]
        if is_list and not entries and key not in may_be_empty:
            raise ValueError(f"task.{key} is empty: give it at least one whole number >= {low}, e.g. task.{key}=[{max(low, 1)}]")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in entries):
            shown = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
            raise ValueError(f"task.{key}={shown!r}: {'each entry ' if is_list else ''}must be a whole number >= {low}"
                             f"{' (or null)' if key in nullable else ''}; pass e.g. task.{key}={[low] if is_list else low} or more")
