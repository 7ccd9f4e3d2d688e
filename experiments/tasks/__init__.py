"""Tasks: each is one module with a ``build(task_cfg, seed, device) -> Task`` (see ``base.Task``)."""

import importlib

# task name (configs/task/<name>.yaml's `name`) -> its module; a variant can share its task's module
TASKS = {"lm": "lm", "lm_lora": "lm_lora", "flow": "flow", "control": "control", "robot": "robot", "robot_image": "robot"}


def build_task(task_cfg, seed, device):
    """Import ``experiments.tasks.<module of task_cfg.name>`` and build the task."""
    name = task_cfg.name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose task= one of {', '.join(TASKS)} (configs/task/)")
    return importlib.import_module(f"experiments.tasks.{TASKS[name]}").build(task_cfg, seed, device)
