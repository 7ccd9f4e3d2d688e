"""Tasks: each is one module with a ``build(task_cfg, seed, device) -> Task`` (see ``base.Task``), named by its
config's ``module`` (configs/task/<name>.yaml): a new task needs its module and its configs, nothing else here
(docs/extending.md)."""

import importlib


def build_task(task_cfg, seed, device):
    """Import the module ``task_cfg.module`` and build the task."""
    module = task_cfg.get("module")
    if not module:
        raise ValueError(f"task {task_cfg.get('name')!r} names no module: add `module: <import path>` (a module with "
                         f"build(task_cfg, seed, device)) to its configs/task/<name>.yaml")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):  # the task module itself is missing, not one of its imports
            raise ValueError(f"task.module={module!r} cannot be imported: check the path, or put its folder on PYTHONPATH") from None
        raise
    if not hasattr(mod, "build"):
        raise ValueError(f"task module {module!r} has no build(task_cfg, seed, device): add one that returns the task")
    return mod.build(task_cfg, seed, device)
