"""The protocol's settings logic, in one place: the learning-rate ladder of the sweep grids, the grid centres
(``${task_lr:k}``), and how a run's hyperparameters are resolved from their sources.

Where a hyperparameter's value comes from, lowest to highest precedence (docs/experiments.md, "Where a setting
comes from"): the library default (dopr), the optimizer config (configs/optimizer/<name>.yaml), the task's tuned
setting (configs/task/<task>.yaml: ``lr`` and ``tuned``, applied when ``lr=`` is not given), the command line.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf, open_dict

OmegaConf.register_new_resolver("lr_tag", lambda lr: "" if lr is None else f"-lr{lr:g}", replace=True)
# ``name: ${ap_name:soap,${.ap}}`` in an optimizer config: "soap", or "dopr_soap" with ``optimizer.ap=true`` (AP in
# front), so a run with AP gets its own run folder, records and place beside its base in the reports.
OmegaConf.register_new_resolver("ap_name", lambda base, ap: f"dopr_{base}" if ap else base, replace=True)


def lr_ladder(lr: float, k: int) -> float:
    """``lr`` moved ``k`` steps along the half-decade ladder 1, 3, 10, 30, ... (x 10^n): lr_ladder(1e-3, 1) = 3e-3,
    lr_ladder(3e-3, -1) = 1e-3. An LR off the ladder is first snapped to its nearest rung (5e-4 -> 3e-4)."""
    if not lr > 0:
        raise ValueError(f"lr_ladder needs a positive learning rate, got {lr!r}: check task.lr in the task's config")
    rung = round(2 * math.log10(lr)) + int(k)
    return float(f"{1 if rung % 2 == 0 else 3}e{rung // 2}")  # parsed, not multiplied: 3e-4, not 3.0000000000000003e-4


def task_lr(k: int, *, _root_: DictConfig) -> float:
    """``lr=${task_lr:k}``: this optimizer's grid centre moved k rungs along the ladder; the centre is the sweep
    preset's ``lr_centre`` entry (pinned, so pasting a tuned ``task.lr`` does not move a half-done grid) or else
    its ``task.lr``. Tuning presets sweep ``+lr_step: -1,0,1`` and set ``lr: ${task_lr:${lr_step}}`` (resolved in each
    job, with its optimizer): every optimizer gets the same 3-point grid around its own LR in one sweep file."""
    name = _root_.optimizer.name
    centres = _root_.get("lr_centre") or _root_.task.get("lr") or {}
    if name not in centres:
        raise ValueError(f"task_lr: no grid centre for optimizer {name!r}: add it to lr_centre in the sweep preset or to task.lr")
    return lr_ladder(float(centres[name]), k)


OmegaConf.register_new_resolver("task_lr", task_lr, replace=True)


def tune_point(cfg: DictConfig) -> dict | None:
    """The tuning trial this run is (``tune.points``: the file scripts/tune.py wrote for a phase, ``tune.trial``: the
    index into this optimizer's points), None outside tuning or past the end of this optimizer's list (one sweep
    covers every optimizer; one with fewer points to run leaves the rest of its jobs empty)."""
    tune = cfg.get("tune") or {}
    if not tune.get("points"):
        return None
    import json
    from pathlib import Path

    points = json.loads(Path(tune.points).read_text()).get(cfg.optimizer.name) or []
    trial = int(tune.trial)
    return points[trial] if trial < len(points) else None


def tune_label(*, _root_: DictConfig) -> str:
    """``${tune_label:}``: the run folder's name part of a tuning trial (its label, r1t03), ``skip<k>`` for an empty job."""
    point = tune_point(_root_)
    return point["label"] if point is not None else f"skip{_root_.tune.trial}"


OmegaConf.register_new_resolver("tune_label", tune_label, replace=True)


def command_line_keys() -> set[str]:
    """The config keys set on this run's command line (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def flat_keys(tree, prefix: str = "") -> dict:
    """{"weight_decay": 0.03, "kwargs.damping": 0.01} from {weight_decay: 0.03, kwargs: {damping: 0.01}}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, DictConfig):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve(cfg: DictConfig, given: set[str] | None = None) -> DictConfig:
    """Fill the task's tuned setting unless ``lr=`` was given: the learning rate (``task.lr``, else the optimizer
    config's own ``lr``) and the optimizer settings the tuning selected with it (``task.tuned``: weight decay,
    damping), except keys set on the command line (``given``). With ``lr=`` given, the tuned settings are not
    applied and the console says which were dropped. Check that the task's scale config set every trainer setting."""
    cfg = cfg.copy()
    given = command_line_keys() if given is None else given
    point = tune_point(cfg)
    if point is not None:  # a tuning trial: its point's values, as if given on the command line
        from .tuning import overrides

        for key, value in overrides(point["values"]).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            given = given | {key}
        cfg.tune.label = point["label"]
    tuned = flat_keys((cfg.task.get("tuned") or {}).get(cfg.optimizer.name) or {})
    if cfg.lr is None:
        chosen = cfg.task.get("lr") or {}
        if cfg.optimizer.name in chosen:
            cfg.lr = float(chosen[cfg.optimizer.name])
        elif cfg.optimizer.get("lr") is not None:  # an optimizer's own config may carry a starting LR (docs/extending.md)
            cfg.lr = float(cfg.optimizer.lr)
        else:
            raise ValueError(f"no learning rate for optimizer {cfg.optimizer.name!r} on task {cfg.task.name!r}: pass lr=..., add it to "
                             f"task.lr in configs/task/{cfg.task.name}.yaml, or set lr in the optimizer's config")
        with open_dict(cfg.optimizer):  # a tuned key the optimizer's config lacks (AdamW's betas from a beta2 search) is added
            for key, value in tuned.items():
                if f"optimizer.{key}" not in given:
                    OmegaConf.update(cfg.optimizer, key, value, merge=True)
    else:
        dropped = {k: v for k, v in tuned.items() if f"optimizer.{k}" not in given}
        if dropped and point is None:  # a sweep sets its own grid; a single run given lr= may not expect to lose the rest
            print(f"note: lr={cfg.lr:g} given, so the task's other tuned settings for {cfg.optimizer.name} are not applied ("
                  + ", ".join(f"optimizer.{k}={v}" for k, v in dropped.items()) + f"; configs/task/{cfg.task.name}.yaml `tuned`): "
                  "pass them too to keep them", flush=True)
    missing = [k for k, v in cfg.trainer.items() if v is None and k not in ("ema_decay", "ema_power", "grad_clip", "snapshot_every", "light_rollout_every")]  # null: off
    if missing:
        raise ValueError(f"trainer settings {missing} are not set for task={cfg.task.name} scale={cfg.scale.name}: "
                         f"add configs/task_scale/{cfg.task.name}_{cfg.scale.name}.yaml or pass trainer.<name>=...")
    periods = {k: cfg.trainer[k] for k in ("steps", "eval_every", "rollout_every", "log_every", "checkpoint_every") if k in cfg.trainer}
    if cfg.trainer.get("light_rollout_every") is not None:
        periods["light_rollout_every"] = cfg.trainer.light_rollout_every
    bad = {k: v for k, v in periods.items() if not (isinstance(v, int) and v >= 1)}
    if bad:
        raise ValueError(f"trainer settings {bad} must be whole numbers >= 1 (steps between events); to evaluate or "
                         f"roll out only at the end, set them to trainer.steps ({periods.get('steps')})")
    return cfg


def launch_overrides(launcher: str, jobs: int, threads: int) -> list[str]:
    """The Hydra overrides that send a sweep's runs where the Makefile's LAUNCHER/JOBS/THREADS say: ``local`` runs
    ``jobs`` at once with ``threads`` torch threads each, another launcher (``slurm``) by name, ``''`` one after
    another in the calling process (scripts/tune.py and scripts/equal_time.py start their sweeps this way)."""
    out = [f"hydra/launcher={launcher}"] if launcher else []
    if launcher == "local":
        out += [f"hydra.launcher.n_jobs={jobs}", f"threads={threads}"]
    return out


# The analysis plan's numbers (docs/protocol.md, "Seeds, instances and common random numbers"): the evaluation seed
# floor, and the target MDD, 10% of each task's floor-to-ceiling range. scripts/power.py counts seeds against it and
# scripts/summary.py reads a "no difference" as a finding (MDD <= target) or as "the instrument cannot tell".
MIN_EVAL_SEEDS = 10
TARGET_RULES = {"control": "0.1 x expert_return", "lm": "0.1 (accuracy, range 1)", "lm_lora": "0.1 (accuracy, range 1)",
                "robot": "0.1 (success rate, range 1)", "robot_image": "0.1 (success rate, range 1)",
                "flow": "0.1 x (best baseline's mean FD - mean fd_floor)"}


def target_mdd(task: str, rows: list[dict], metric: str, expert_return: float | None = None) -> tuple[float, str]:
    """(target MDD, how it was made) for ``task`` from its evaluation's per-run rows (``final_<metric>``, ``optimizer``
    and, on flow, ``fd_floor``) and, on control, the expert's return. ValueError names what is missing."""
    if task not in TARGET_RULES:
        raise ValueError(f"no target MDD for task {task!r}: the known tasks are {', '.join(TARGET_RULES)}")
    if task == "control":
        if expert_return is None:
            raise ValueError("control: the runs name no expert_return (task_meta): rerun with the committed expert")
        return 0.1 * float(expert_return), f"0.1 x expert_return {float(expert_return):g}"
    if task == "flow":
        means = {}
        for o in ("adamw", "muon"):
            vals = [float(r[f"final_{metric}"]) for r in rows if r["optimizer"] == o]
            if vals:
                means[o] = sum(vals) / len(vals)
        floors = [float(r["fd_floor"]) for r in rows if r.get("fd_floor") not in (None, "")]
        if not means or not floors:
            raise ValueError("flow: the target needs adamw or muon runs and the fd_floor column")
        best, floor = min(means, key=means.get), sum(floors) / len(floors)
        return 0.1 * (means[best] - floor), f"0.1 x ({best} mean FD {means[best]:.4g} - fd_floor {floor:.4g})"
    return 0.1, TARGET_RULES[task]
