"""Sweeps through hydra-submitit-launcher on a real (local, one-node) Slurm cluster: a multirun
of the smoke LM task, a preempted job that is requeued and resumes, and a data-parallel job with
two Slurm tasks. Marked slow; `.ci/run` runs them (they install Slurm if missing: root only)."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from slurm_cluster import LocalSlurm, SlurmUnavailable
from test_experiments import ENV, ROOT, rows, train

pytestmark = pytest.mark.slow

# Jobs get one CPU each (two run at once on a 2-core machine); no GPUs, no memory request.
SLURM = ["cluster.partition=debug", "cluster.gpus_per_node=null", "cluster.cpus_per_task=1",
         "cluster.mem_gb=null", "cluster.timeout_min=20", "threads=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm cluster on this machine: {err}")
    try:
        yield cluster
    finally:
        subprocess.run(["scancel", "--user=root"], env=cluster.env, capture_output=True)
        cluster.stop()


def multirun(slurm, sweep_dir, *overrides, wait=True, launcher="slurm"):
    cmd = [sys.executable, "-m", "experiments.train", "-m", f"hydra/launcher={launcher}", "scale=smoke", "logger=none", *SLURM, *overrides,
           f"hydra.sweep.dir={sweep_dir}"]
    env = {**ENV, **{"SLURM_CONF": slurm.env["SLURM_CONF"]}}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_a_multirun_of_four_jobs_on_slurm_and_one_failing_job(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    # Four good jobs and one that fails (an LR that is not a number is refused by the loop).
    multirun(slurm, sweep, "optimizer=adamw,dopr_adamw", "seed=0,1")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["adamw-s0", "adamw-s1", "dopr_adamw-s0", "dopr_adamw-s1"]
    assert all(s["status"] == "done" and s["final"]["step"] == 6 for s in summaries.values())
    # each ran as its own Slurm job (submitit keeps one log folder per array task)
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4, logs
    # A job that fails inside (non-finite loss) does not stop the others, and the report names it.
    bad = tmp_path / "bad"
    multirun(slurm, bad, "optimizer=sgd", "lr=1e30,0.1", "trainer.grad_clip=null")
    failed = json.loads((bad / "sgd-lr1e+30-s0" / "summary.json").read_text())
    assert failed["status"] == "failed" and "NonFiniteLoss" in failed["error"]
    assert json.loads((bad / "sgd-lr0.1-s0" / "summary.json").read_text())["status"] == "done"
    subprocess.run([sys.executable, "scripts/report.py", str(bad), "--out", str(tmp_path / "report")],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    report = (tmp_path / "report" / "results.md").read_text()
    assert "sgd-lr1e+30-s0 | failed | NonFiniteLoss" in report, report


def test_a_preempted_job_is_requeued_and_resumes_to_the_same_weights(slurm, tmp_path):
    common = ["optimizer=dopr_adamw", "seed=0", "trainer.steps=600", "trainer.checkpoint_every=20", "trainer.eval_every=1000",
              "trainer.rollout_every=1000", "trainer.log_every=10", "logger=wandb"]
    sweep = tmp_path / "sweep"
    run = sweep / "dopr_adamw-s0"
    proc = multirun(slurm, sweep, *common, wait=False)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            time.sleep(0.1)
        assert (run / "checkpoint.pt").exists(), "the job never wrote a checkpoint"
        first_wandb_id = (run / "wandb_id.txt").read_text()
        job = next(iter(slurm.jobs())).split()[0]
        # What Slurm sends before preempting a job (submitit asks for --signal=USR2@...): submitit
        # checkpoints the launcher's callable, requeues the job and exits.
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm.env, check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    log = "\n".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert re.search(r"resuming .* from step \d+", log), "the requeued job did not resume from its checkpoint:\n" + log[-3000:]
    assert "preempted" in log or "USR2" in log
    assert (run / "wandb_id.txt").read_text() == first_wandb_id  # the same W&B run continues
    steps = [r["step"] for r in rows(run) if "train_loss" in r]
    assert steps == list(range(10, 601, 10))  # every row once: none lost, none twice
    # An uninterrupted local run of the same configuration ends with the same weights.
    whole = tmp_path / "whole"
    train(*common, "logger=none", f"hydra.run.dir={whole}")
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_parallel_job_with_two_slurm_tasks(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    multirun(slurm, sweep, "hydra.launcher.tasks_per_node=2", "task=flow", f"task.data_dir={tmp_path / 'cache'}",
             "optimizer=dopr_adamw", launcher="slurm_ddp")
    summary = json.loads((sweep / "dopr_adamw-s0" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["world_size"] == 2
