"""Tasks: each is one module with a ``build(task_cfg, seed, device) -> Task`` (see ``base.Task``)."""

import importlib

TASKS = ("lm", "lm_lora", "flow", "control", "robot")


def build_task(task_cfg, seed, device):
    """Import ``experiments.tasks.<task_cfg.name>`` and build the task."""
    name = task_cfg.name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose task= one of {', '.join(TASKS)} (configs/task/)")
    return importlib.import_module(f"experiments.tasks.{name}").build(task_cfg, seed, device)
