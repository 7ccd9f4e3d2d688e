"""The contract between a task and the training loop: every hook the loop uses, each with its default.

A task subclasses ``Task`` and sets or overrides what it needs; the loop (experiments/train.py, experiments/engine.py)
calls nothing else and probes no attribute. Required: ``model``, ``metric``, ``higher_is_better``, ``train_batch``,
``val_batches``, ``loss``, ``evaluate``. How to add a task: docs/extending.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn



@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block (dropout off, BatchNorm on running statistics), the model's training flag put
    back after it, also when the block raises: the bracket around every evaluation and rollout."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)

@dataclass
class EvalResult:
    """What ``Task.evaluate`` returns. ``metrics``: name -> number on the reported instances, with the headline
    ``metric``, its per-horizon values (``<metric>_steps<k>``, ``<metric>_h<T>``, ``<metric>_<series>_<k>``), its value on
    the selection instances (``select_<metric>``, disjoint from the reported ones; the best checkpoint is chosen on it),
    and anything else the task reports. ``outcomes``: name -> one value per episode / problem (kept in the run record,
    not sent to W&B), or None."""

    metrics: dict[str, float]
    outcomes: dict[str, list] | None = field(default=None)


class Task:
    """The base of every task. The class attributes below are the defaults of the optional hooks."""

    model: nn.Module  # the trained network (the loop moves it, optimises it, keeps an EMA copy)
    metric: str  # the headline rollout metric in evaluate()'s metrics, e.g. "accuracy"
    higher_is_better: bool = True
    metric_range: tuple[float, float] | None = None  # (0, 1) marks a rate (success): the reports' intervals stay inside it
    val_loss_label: str | None = None  # axis labels in the reports (None: "validation loss", the metric's name)
    metric_label: str | None = None
    horizon_label: str | None = None  # what the per-horizon metrics count (reasoning steps, ODE steps, episode steps)
    diagnostics: tuple[str, ...] = ()  # other final metrics the report plots against the headline one (control: state_fd)
    report_meta: dict | None = None  # facts about the task's setting that results_meta.json records (control: expert_return)

    def train_batch(self, step: int) -> Any:
        """The batch for this step: a function of (seed, step) only, so a resumed run sees the same data."""
        raise NotImplementedError

    def val_batches(self) -> Iterable[Any]:
        """Held-out batches, identical across runs and optimizers."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The one-step training objective (a scalar)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, final: bool = True) -> EvalResult:
        """Roll the model out on its own outputs and score it (the metric the paper cares about). ``final``: the
        run's last evaluation; before it a task may score less, but always ``metric`` and ``select_<metric>``."""
        raise NotImplementedError

    def light_evaluate(self, model: nn.Module) -> EvalResult:
        """The budget axis's cheaper rollout (``trainer.light_rollout_every``): at least ``metric`` on fixed instances
        shared by every optimizer, fewer than ``evaluate``'s; it never chooses the best checkpoint. Default: the
        intermediate evaluation (``evaluate(final=False)``); control and robot roll out fewer episodes."""
        return self.evaluate(model, final=False)

    def loss_weight(self, batch: Any) -> float | torch.Tensor:
        """A micro-batch's share of the batch's loss terms, for gradient accumulation (default: its rows)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return first.shape[0]

    def row_mask(self, batch: Any) -> torch.Tensor | None:
        """Which rows of the batch AP's statistics count (padding does not); None: every row."""
        return None

    def val_loss_terms(self, model: nn.Module, batch: Any) -> tuple[float, int]:
        """(sum of the batch's validation loss terms, their count): the validation loss is the sum over every batch
        over the count (default: the batch's mean loss, counted once, so the loss is the mean over batches)."""
        return float(self.loss(model, batch)), 1

    def save_artifacts(self, model: nn.Module, run_dir: Path) -> None:
        """Small files for the reports, written at the end of training (flow: a grid of samples, samples.npy)."""


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
