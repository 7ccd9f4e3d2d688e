"""Faults and untrusted files: checkpoints that load safely, survive damage and kills; bad task sizes.

The sweep under repeated SIGKILLs (and a truncated checkpoint) is in the slow suite; the fast suite checks
the pieces in-process and one damaged checkpoint through the entry point."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from experiments.checkpoint import (OtherSettings, UnusableCheckpoint, config_stamp, load_checkpoint, previous_path, remove_stale_temps,
                                    resume_checkpoint, save_checkpoint)
from experiments.faults import planned

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("DOPR_FAULT", None)
CONFIG = {"lr": 0.003, "seed": 0, "threads": 1, "trainer": {"steps": 12, "eval_every": 3}, "task": {"name": "lm", "batch_size": 8}}


# ------------------------------------------------------------------ run checkpoints, in-process
class Run:
    """A tiny model, optimizer and scheduler trained k steps and saved the way experiments/train.py saves."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.step = 0

    def train(self, steps):
        for _ in range(steps):
            self.model(torch.randn(4, 3)).pow(2).mean().backward()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            self.step += 1

    def state(self, config=CONFIG):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step, "best": {}, "seconds": 1.0, **config_stamp(config)}

    def restore(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = state["step"]


def saved_run(run_dir: Path, config=CONFIG) -> tuple[Path, dict]:
    """checkpoint.pt at step 6 and checkpoint.prev.pt at step 3; returns the path and the weights at step 3."""
    run, path = Run(), run_dir / "checkpoint.pt"
    run.train(3)
    save_checkpoint(path, run.state(config), keep_previous=True)
    at_3 = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.train(3)
    save_checkpoint(path, run.state(config), keep_previous=True)
    return path, at_3


def resume(path: Path, config=CONFIG):
    fresh, lines = Run(seed=1), []
    state = resume_checkpoint(path, config_stamp(config), fresh.restore, log=lines.append)
    return state, fresh, lines


def test_a_run_checkpoint_keeps_its_previous_version_and_resumes_from_the_latest(tmp_path):
    path, _ = saved_run(tmp_path)
    assert load_checkpoint(path, "cpu")["step"] == 6 and load_checkpoint(previous_path(path), "cpu")["step"] == 3
    state, fresh, lines = resume(path)
    assert state["step"] == 6 and fresh.step == 6 and fresh.sched.last_epoch == 6 and lines == []


def test_a_truncated_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous_one(tmp_path):
    path, at_3 = saved_run(tmp_path)
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    state, fresh, lines = resume(path)
    assert state["step"] == 3 and all(torch.equal(fresh.model.state_dict()[k], at_3[k]) for k in at_3)
    aside = tmp_path / "checkpoint.pt.set-aside-1"
    assert aside.read_bytes() == cut and not path.exists()  # renamed, not deleted
    assert lines[0].startswith(f"{path}: damaged") and "set aside as checkpoint.pt.set-aside-1" in lines[0] and "\n" not in lines[0]
    assert "resuming from checkpoint.prev.pt (step 3)" in lines[1]


def test_a_checkpoint_holding_a_pickled_callable_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "the-callable-ran"

    class Payload:  # unpickling it calls open(marker, "w"): any callable would run the same way
        def __reduce__(self):
            return open, (str(marker), "w")

    path, _ = saved_run(tmp_path)
    evil = load_checkpoint(path, "cpu")
    evil["best"] = {"note": Payload()}
    torch.save(evil, path)
    with pytest.raises(UnusableCheckpoint, match=rf"^{path}: refused: it holds a pickled Python object \(io\.open\) that loading could run as code"):
        load_checkpoint(path, "cpu")
    assert not marker.exists()
    state, fresh, lines = resume(path)  # the run goes on from the checkpoint before it
    assert state["step"] == 3 and not marker.exists() and lines[0].startswith(f"{path}: refused")
    torch.load(tmp_path / "checkpoint.pt.set-aside-1", weights_only=False)  # what weights_only=True prevents: the payload is live
    assert marker.exists()


def test_when_no_checkpoint_loads_the_message_says_how_to_restart(tmp_path):
    path, _ = saved_run(tmp_path)
    for p in (path, previous_path(path)):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UnusableCheckpoint, match="no usable checkpoint.*checkpoint.pt, checkpoint.prev.pt damaged.*rerun the same command") as err:
        resume(path)
    assert not isinstance(err.value, OtherSettings)  # a damaged file is this run's failure: the entry point records it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt.set-aside-1", "checkpoint.pt.set-aside-1"]
    assert resume(path)[0] is None  # rerun: a fresh start, the set-aside files kept


def test_a_checkpoint_of_other_settings_is_refused_in_place_and_allowed_differences_resume(tmp_path):
    path, _ = saved_run(tmp_path)
    changed = {**CONFIG, "lr": 0.01}
    with pytest.raises(OtherSettings, match=r"other settings \(lr: 0.003 in the checkpoint, 0.01 now\).*another folder"):
        resume(path, changed)  # its own class: the entry point leaves another run's folder alone, and records a damaged file
    with pytest.raises(UnusableCheckpoint, match=r"task.batch_size: 8 in the checkpoint, 16 now"):
        resume(path, {**CONFIG, "task": {**CONFIG["task"], "batch_size": 16}})
    assert path.exists() and previous_path(path).exists() and len(list(tmp_path.iterdir())) == 2  # nothing renamed
    # where it runs, how long it trains and the LR table may change on resume (checkpoint.RESUME_MAY_DIFFER)
    allowed = {**CONFIG, "threads": 2, "trainer": {"steps": 20, "eval_every": 5}, "task": {**CONFIG["task"], "lr": {"adamw": 0.1}}}
    assert resume(path, allowed)[0]["step"] == 6


def test_a_tuning_trial_resumes_under_another_index_and_old_stamps_are_restamped(tmp_path, monkeypatch):
    """A resumed tuning phase lists only the trials still to run, so a trial's index into the points file shifts:
    its folder (named by the trial's label) resumes. A checkpoint stamped before a key joined RESUME_MAY_DIFFER
    resumes too; a real difference is still refused and named."""
    import experiments.checkpoint as ck

    trial = {**CONFIG, "tune": {"label": "r1t07", "trial": 7, "points": "/a/points-r1-explore.json"}}
    monkeypatch.setattr(ck, "RESUME_MAY_DIFFER", tuple(k for k in ck.RESUME_MAY_DIFFER if not k.startswith("tune.")))
    path, _ = saved_run(tmp_path, trial)  # stamped with tune.trial inside, as before the key was allowed to differ
    monkeypatch.undo()
    assert resume(path, {**trial, "tune": {**trial["tune"], "trial": 1, "points": "/b/points-r1-explore.json"}})[0]["step"] == 6
    with pytest.raises(UnusableCheckpoint, match=r"other settings \(tune.label: 'r1t07' in the checkpoint, 'r1t01' now\)"):
        resume(path, {**trial, "tune": {"label": "r1t01", "trial": 1, "points": "/b/points-r1-explore.json"}})
    # a key added later with a None default (off) is no difference; set to a value, it is
    assert resume(path, {**trial, "task": {**trial["task"], "hard": None}})[0]["step"] == 6
    with pytest.raises(UnusableCheckpoint, match=r"task.hard: <unset> in the checkpoint, 2 now"):
        resume(path, {**trial, "task": {**trial["task"], "hard": 2}})


def test_a_checkpoint_whose_parts_disagree_is_damaged(tmp_path):
    path, _ = saved_run(tmp_path)
    bad = load_checkpoint(path, "cpu")
    bad["step"] = 7  # the scheduler says 6: not a checkpoint this loop wrote
    torch.save(bad, path)
    state, _, lines = resume(path)
    assert state["step"] == 3 and "its parts disagree: step 7, LR scheduler at step 6" in lines[0]


def test_a_checkpoint_of_another_model_is_set_aside(tmp_path):
    path, _ = saved_run(tmp_path)
    other = load_checkpoint(path, "cpu")
    other["model"] = {"weight": torch.zeros(5, 5), "bias": torch.zeros(5)}
    torch.save(other, path)
    state, _, lines = resume(path)
    assert state["step"] == 3 and "does not load into this run (RuntimeError" in lines[0]


# --------------------------------------------------------------------------- fault injection
KILLED_WRITE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from experiments.checkpoint import save_checkpoint
    from experiments.faults import maybe_fail
    path = Path(sys.argv[1])
    for i in range(1, 4):
        maybe_fail("loop")
        print(i, flush=True)
        save_checkpoint(path, {"v": i}, keep_previous=True)
""")


@pytest.mark.parametrize("fault,printed,latest,previous", [
    (None, "1 2 3", 3, 2),
    ("checkpoint:2", "1 2", 1, None),  # killed after the second file was written, before any rename
    ("checkpoint:3", "1 2 3", 2, 1),
    ("loop:3", "1 2", 2, 1),
])
def test_dopr_fault_kills_at_the_named_point_and_an_atomic_write_leaves_the_old_file(tmp_path, fault, printed, latest, previous):
    """experiments/faults.py: DOPR_FAULT=<point>:<n> SIGKILLs the process at the n-th hit of the point; an
    atomic write killed there leaves the old checkpoint (and its previous version) whole."""
    path = tmp_path / "checkpoint.pt"
    env = {**ENV, **({"DOPR_FAULT": fault} if fault else {})}
    out = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == (-signal.SIGKILL if fault else 0), out.stderr
    assert out.stdout.split() == printed.split()
    if fault:
        point, n = fault.split(":")
        assert f"DOPR_FAULT: killing process " in out.stderr and f"at hit {n} of {point!r}" in out.stderr
    assert load_checkpoint(path, "cpu") == {"v": latest}
    prev = previous_path(path)
    assert (load_checkpoint(prev, "cpu") if prev.exists() else None) == ({"v": previous} if previous else None)
    stale = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == (1 if fault and fault.startswith("checkpoint") else 0)  # the killed write's temporary file
    remove_stale_temps(path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_malformed_dopr_fault_names_the_expected_form():
    assert planned("checkpoint:2,rollout:1") == {"checkpoint": 2, "rollout": 1} and planned("") == {}
    for bad in ("checkpoint", "checkpoint:0", "checkpoint:x", ":3"):
        with pytest.raises(ValueError, match="expected <point>:<n>"):
            planned(bad)


# ---------------------------------------------------------------------- through the entry point
def train(*overrides, run_dir: Path, fault: str | None = None):
    cmd = [sys.executable, "-m", "experiments.train", "scale=smoke", "threads=1", "logger=none", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**ENV, **({"DOPR_FAULT": fault} if fault else {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # an entry-point run (~17 s): the slow suite keeps `make test` under 10 minutes
def test_a_truncated_checkpoint_in_a_stopped_run_resumes_from_the_previous_one_through_the_entry_point(tmp_path):
    common = ["optimizer=dopr_adamw", "trainer.steps=9", f"task.data_dir={tmp_path / 'data'}"]  # checkpoints at 3, 6, 9
    whole = train(*common, run_dir=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    stopped = train(*common, run_dir=run, fault="step:8")  # killed in step 8: checkpoint.pt at step 6, its previous at 3
    assert stopped.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    other = train(*common, "optimizer.weight_decay=0.5", run_dir=run)  # another run's folder: refused, nothing written there
    assert other.returncode == 1 and "holds a run with other settings (optimizer.weight_decay:" in other.stderr
    assert not (run / "summary.json").exists() and not (run / "record.json").exists()
    path = run / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = train(*common, run_dir=run)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{path}: damaged, cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive" in again.stderr
    assert "set aside as checkpoint.pt.set-aside-1" in again.stderr and f"resuming {run} from step 3" in again.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "done"
    a, b = (load_checkpoint(d / "checkpoint.pt", "cpu")["model"] for d in (tmp_path / "whole", run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the uninterrupted run's weights
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
    assert steps == [2, 4, 6, 8, 9]  # every row once


# --------------------------------------------------------------------------- bad task settings
TASKS = ["lm", "lm_lora", "flow", "control", "robot", "robot_image"]


def build(task: str, *overrides, data_dir: Path):
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", "scale=smoke", f"task.data_dir={data_dir}", *overrides])
    return build_task(cfg.task, 0, torch.device("cpu"))


@pytest.mark.parametrize("task", TASKS)
def test_a_zero_batch_size_stops_at_the_start_naming_task_batch_size(tmp_path, task):
    data = tmp_path / "data"
    with pytest.raises(ValueError, match=r"^task\.batch_size=0: must be a whole number >= 1; pass e\.g\. task\.batch_size=1"):
        build(task, "task.batch_size=0", data_dir=data)
    assert not data.exists()  # stopped before any data was made or read


@pytest.mark.parametrize("task,override,match", [
    ("lm", "task.max_len=20", r"task\.max_len=20: raise task\.max_len"),  # shorter than the longest problem
    ("lm", "task.train_steps=[]", r"task\.train_steps is empty"),
    ("lm_lora", "task.base.steps=-1", r"task\.base\.steps=-1"),
    ("flow", "task.image_size=15", r"task\.image_size=15 must be divisible by 2\^1"),
    ("flow", "task.eval_samples=0", r"task\.eval_samples=0"),
    ("control", "task.horizons=[10,0]", r"task\.horizons=\[10, 0\]: each entry must be"),
    ("robot", "task.action_horizon=7", r"task\.action_horizon=7 must be a multiple of 2\^1"),
    ("robot_image", "task.val_demos=4", r"task\.val_demos=4 leaves no training demo"),
])
def test_sizes_and_lengths_the_model_cannot_hold_name_the_setting(tmp_path, task, override, match):
    with pytest.raises(ValueError, match=match):
        build(task, override, data_dir=tmp_path / "data")


def test_a_zero_batch_size_through_the_entry_point_is_recorded_and_names_the_setting(tmp_path):
    out = train("task.batch_size=0", f"task.data_dir={tmp_path / 'data'}", run_dir=tmp_path / "run")
    assert out.returncode == 1 and "task.batch_size=0: must be a whole number >= 1" in out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "task.batch_size" in summary["error"]


# ------------------------------------------------------------- a whole sweep under kills (slow)
SWEEP = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "threads=1", "scale=smoke", "task=lm", "optimizer=adamw,dopr_adamw",
         "seed=0,1", "logger=none", "trainer.steps=24", "trainer.checkpoint_every=4", "trainer.eval_every=4", "trainer.rollout_every=8",
         "trainer.log_every=2"]
TIMING = {"steps_per_s", "rollout_seconds", "wall_seconds", "train_seconds", "best_train_seconds", "train_cpu_seconds",
          "best_train_cpu_seconds"}  # differ between sittings by nature


def sweep(sweep_dir: Path, data_dir: Path, fault: str | None = None) -> tuple[int, str]:
    """The same sweep command each time (only DOPR_FAULT differs), in its own process group: once it has
    returned, no worker of it may still write into the next sitting's run folders."""
    cmd = [sys.executable, "-m", "experiments.train", *SWEEP, f"task.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**ENV, **({"DOPR_FAULT": fault} if fault else {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    return value


def finished(sweep_dir: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(sweep_dir.glob("*-s*")) if (d / "summary.json").exists()}


def checkpoint_step(run: Path) -> int | None:
    try:
        state = load_checkpoint(run / "checkpoint.pt", "cpu")
    except UnusableCheckpoint:  # the one cut to half
        return None
    return state["step"] if state else None


@pytest.mark.slow  # seven sweeps of four runs: about 3 minutes on 2 cores
def test_a_sweep_killed_again_and_again_ends_as_an_uninterrupted_one(tmp_path):
    """Four smoke runs two at a time (hydra/launcher=local), killed with SIGKILL in a training step, inside a
    checkpoint write, in a rollout and inside the summary write (one sitting each, in a seeded order), with
    one checkpoint cut to half between two sittings, then the same command until it finishes: every run
    done, bitwise the weights of an uninterrupted sweep, the same summaries and rows (timing fields aside),
    every row once. Replay a failure with DOPR_FAULT_SEED=<the printed seed>."""
    seed = int(os.environ.get("DOPR_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    faults = [f"step:{rng.randint(1, 6)}", f"checkpoint:{rng.randint(1, 3)}", f"rollout:{rng.randint(1, 2)}", "summary:1"]
    rng.shuffle(faults)
    cut_after = rng.randrange(1, len(faults))
    print(f"fault schedule seed {seed} (replay: DOPR_FAULT_SEED={seed}): {faults}, a checkpoint cut after sitting {cut_after}", flush=True)
    data = tmp_path / "data"
    code, out = sweep(tmp_path / "whole", data)
    assert code == 0, out[-3000:]
    whole = finished(tmp_path / "whole")
    assert len(whole) == 4 and all(s["status"] == "done" for s in whole.values())

    killed, outputs, victim, awaiting = tmp_path / "killed", [], None, set()
    for i, fault in enumerate(faults, 1):
        code, out = sweep(killed, data, fault)
        outputs.append(out)
        point, n = fault.split(":")
        assert code != 0 and f"at hit {n} of {point!r}" in out, f"seed {seed}: {fault} did not kill the sweep:\n{out[-3000:]}"
        # runs killed between their last checkpoint and summary.json: the next sitting writes it from the checkpoint
        awaiting |= {d for d in killed.glob("*-s*") if checkpoint_step(d) == 24 and d.name not in finished(killed)}
        if i >= cut_after and victim is None:  # the first sitting from cut_after on after which a run has two checkpoints
            both = sorted(d for d in killed.glob("*-s*") if (d / "checkpoint.pt").exists() and (d / "checkpoint.prev.pt").exists())
            if both:
                victim = rng.choice(sorted(set(both) - awaiting) or both)
                path = victim / "checkpoint.pt"
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                print(f"cut {path} to half after sitting {i}", flush=True)
    assert victim is not None, f"seed {seed}: no run had two checkpoints to cut"
    for _ in range(3):  # the same command until every run is done (one sitting should do)
        code, out = sweep(killed, data)
        outputs.append(out)
        if code == 0 and len(finished(killed)) == 4:
            break
    assert code == 0, f"seed {seed}:\n{out[-3000:]}"

    log = "\n".join(outputs)
    assert f"{victim / 'checkpoint.pt'}: damaged, cannot be read" in log and (victim / "checkpoint.pt.set-aside-1").exists()
    assert f"{victim}: resuming from checkpoint.prev.pt" in log, f"seed {seed}"
    assert awaiting, f"seed {seed}: the summary kill left no run between its last checkpoint and summary.json"
    for run in awaiting - {victim}:
        assert f"{run} finished its 24 steps; writing its summary.json from the last checkpoint" in log, (seed, run)
    done = finished(killed)
    assert done.keys() == whole.keys() and all(s["status"] == "done" for s in done.values())
    for name in whole:
        a, b = tmp_path / "whole" / name, killed / name
        assert without_timing(done[name]) == without_timing(whole[name]), (seed, name)
        for file in ("checkpoint.pt", "best_model.pt"):
            x, y = load_checkpoint(a / file, "cpu")["model"], load_checkpoint(b / file, "cpu")["model"]
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (seed, name, file)
        rows = [[without_timing(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
        assert rows[1] == rows[0], (seed, name)  # none lost, none twice, in order
