"""scripts/dashboards.py (make dashboards): the W&B reports, built and serialised offline (nothing here calls the
W&B API: the network is blocked and ``save()`` is never called).

The keys every panel reads are checked against what the runs log, taken from the committed records
(results/<task>/{cpu,cpu_tune}/records.jsonl): each record's ``evals`` rows are the evaluation rows the loop
logged (flattened back as RunLogger sent them: step, train_seconds, val_loss, the metrics), its ``summary`` the
final/best rows the loop writes into the W&B summary as ``final_<k>``/``best_<k>``, its ``config`` the config the
run was given. Records cover all five tasks and both runsets without training anything; a real offline W&B run
(scale=smoke, lm, about 10 s) checks the same keys, ``train_seconds`` and the group against what wandb itself recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dashboards.py"
_spec = importlib.util.spec_from_file_location("dashboards", SCRIPT)
dashboards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dashboards)

ENTITY, PROJECT = "test-entity", "test-project"
NEWER = {"train_seconds"}  # a field of every record's eval rows, null in runs older than it (the committed ones)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach W&B fails the test."""
    import wandb

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network / the W&B API")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(wandb, "Api", refuse)


def read_records(task: str, experiment: str) -> list[dict]:
    path = ROOT / "results" / task / experiment / "records.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if r["status"] == "done"]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def logged(record: dict) -> dict[str, set[str]]:
    """The keys one run sent to W&B: history (numbers only, as RunLogger.log sends them), summary, config."""
    history = set()
    for e in record["evals"]:
        assert "train_seconds" in e, "the record's eval rows lost train_seconds"
        row = {"step": e["step"], "train_seconds": e.get("train_seconds"), "val_loss": e.get("val_loss"),
               "rollout_seconds": e.get("rollout_seconds"), **e["metrics"], **{f"select_{k}": v for k, v in e["select"].items()}}
        history |= {k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    s = record["summary"]
    summary = {f"final_{k}" for k in s["final"]} | {f"best_{k}" for k in s["best"]}
    return {"history": history, "summary": summary, "config": set(flat(record["config"]))}


def spec_keys(grid: dict) -> dict[str, set[str]]:
    """The keys a serialised panel grid reads, from the JSON W&B gets (backend names turned back into run keys)."""
    def config(name: str) -> str:  # "optimizer.value.name" -> "optimizer.name"
        head, _, rest = name.partition(".value")
        return head + rest

    keys = {"history": set(), "summary": set(), "config": set()}
    for panel in grid["metadata"]["panelBankSectionConfig"]["panels"]:
        c = panel["config"]
        if panel["viewType"] == "Run History Line Plot":
            keys["history"] |= {c["xAxis"], *c["metrics"]}
            keys["config"].add(config(c["groupBy"]))
        for accessor in [c.get("xAxis"), c.get("yAxis")] * (panel["viewType"] == "Scatter Plot") + \
                [col["accessor"] for col in c.get("columns", [])]:
            section, _, name = accessor.partition(":")
            keys[section].add(config(name) if section == "config" else name)
    return keys


def grids(spec: dict) -> list[dict]:
    return [b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]


@pytest.mark.parametrize("task", list(dashboards.TASKS))
def test_report_builds_and_serialises_offline(task):
    spec = dashboards.spec(dashboards.build_report(task, ENTITY, PROJECT))
    json.dumps(spec)
    assert spec["project"] == {"name": PROJECT, "entityName": ENTITY}
    evaluation, tuning = grids(spec)
    for grid, folder in ((evaluation, "cpu"), (tuning, "tune")):
        (runset,) = grid["metadata"]["runSets"]
        assert runset["project"] == {"name": PROJECT, "entityName": ENTITY}
        (leaf,) = runset["filters"]["filters"]
        assert (leaf["key"], leaf["op"], leaf["value"]) == ({"section": "run", "name": "group"}, "=", f"{task}/{folder}")
    kinds = [p["viewType"] for p in evaluation["metadata"]["panelBankSectionConfig"]["panels"]]
    assert kinds == ["Run History Line Plot"] * 3 + ["Scatter Plot", "Run Comparer"]
    lines = [p["config"] for p in evaluation["metadata"]["panelBankSectionConfig"]["panels"][:3]]
    metric = dashboards.TASKS[task]
    assert [(c["xAxis"], c["metrics"]) for c in lines] == [("step", ["val_loss"]), ("step", [metric]), ("train_seconds", [metric])]
    assert all((c["groupBy"], c["groupAgg"], c["groupArea"]) == ("optimizer.value.name", "mean", "minmax") for c in lines)
    kinds = [p["viewType"] for p in tuning["metadata"]["panelBankSectionConfig"]["panels"]]
    assert kinds == ["Parallel Coordinates Plot"] * 2 + ["Scatter Plot"]
    columns = [col["accessor"] for col in tuning["metadata"]["panelBankSectionConfig"]["panels"][1]["config"]["columns"]]
    assert columns == ["config:optimizer.value.name", "config:lr.value", "config:optimizer.value.weight_decay",
                       "config:optimizer.value.kwargs.damping", f"summary:final_{metric}", "summary:final_val_loss"]


@pytest.mark.parametrize("task", list(dashboards.TASKS))
def test_panels_read_only_keys_the_runs_log(task):
    """Every key of the evaluation grid is logged by every run of results/<task>/cpu, every key of the tuning grid
    by every trial of results/<task>/cpu_tune (the damping by every DoPr trial), where they have records (at least
    one of the two must); the metric is the task's."""
    evaluation, tuning = grids(dashboards.spec(dashboards.build_report(task, ENTITY, PROJECT)))
    checked = 0
    for grid, experiment in ((evaluation, "cpu"), (tuning, "cpu_tune")):
        records = read_records(task, experiment)
        if not records:  # a new task version's tuning or evaluation starts from none; the other grid still checks
            continue
        checked += 1
        assert {r["summary"]["metric_name"] for r in records} == {dashboards.TASKS[task]}
        for record in records:
            have = logged(record)
            for section, keys in spec_keys(grid).items():
                if section == "config" and not record["optimizer"].startswith("dopr_"):
                    keys = keys - {"optimizer.kwargs.damping"}
                if section == "history":
                    keys = keys - NEWER
                assert keys <= have[section], f"{task}/{experiment} {record['run_id']}: {section} {sorted(keys - have[section])}"
    assert checked, f"results/{task} has no committed records in cpu or cpu_tune to check the panels against"


def test_groups_are_the_sweep_folders_the_loop_names():
    """The runsets' groups are <task>/<sweep folder>, the group experiments/train.py gives a run: the evaluation
    experiment's folder (configs/experiment/<task>/cpu.yaml) and every tuning's (configs/experiment/<task>/cpu_tune.yaml,
    and the version-2 presets configs/sweep/<task>_tune_*)."""
    from omegaconf import OmegaConf

    assert 'group=f"{cfg.task.name}/{run_dir.parent.name}"' in (ROOT / "experiments" / "train.py").read_text()
    for task in dashboards.TASKS:
        assert Path(OmegaConf.load(ROOT / "configs" / "experiment" / task / "cpu.yaml").hydra.sweep.dir) == Path("runs", task, dashboards.EVAL_FOLDER)
        # the version-3 tuning (scripts/tune.py) and the version-2 presets behind older committed records alike
        tune = [ROOT / "configs" / "experiment" / task / "cpu_tune.yaml", *sorted((ROOT / "configs" / "sweep").glob(f"{task}_tune_*.yaml"))]
        for path in tune:
            assert Path(OmegaConf.load(path).hydra.sweep.dir) == Path("runs", task, dashboards.TUNE_FOLDER), path


def run_script(tmp_path, *args, **env):
    """The script in a clean environment: no API key, a HOME without ~/.netrc, W&B pointed at a closed port."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean.update(HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9", WANDB_MODE="offline", **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=clean, timeout=120, cwd=tmp_path)


def test_without_a_login_it_names_the_fix_and_fails(tmp_path):
    out = run_script(tmp_path)
    assert out.returncode != 0
    for fix in ("wandb login", "WANDB_API_KEY", "WANDB_ENTITY", "--entity", "DRY_RUN=1"):
        assert fix in out.stderr, out.stderr


def test_dry_run_writes_one_spec_per_task_without_a_login(tmp_path):
    out = run_script(tmp_path, "--dry-run", "--out", str(tmp_path / "dash"), WANDB_ENTITY="my-team")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "dash").iterdir()) == sorted(f"{t}.json" for t in dashboards.TASKS)
    for task, metric in dashboards.TASKS.items():
        spec = json.loads((tmp_path / "dash" / f"{task}.json").read_text())
        assert spec["displayName"] == f"DoPr {task}: validation loss, {metric}, tuning"
        assert spec["project"] == {"name": "dopr", "entityName": "my-team"}  # configs/logger/wandb.yaml's project
        assert len(grids(spec)) == 2


def test_make_dashboards_passes_dry_run_through():
    makefile = (ROOT / "Makefile").read_text()
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:"))
    assert "dashboards" in phony.split()
    recipe = makefile.split("\ndashboards:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/dashboards.py $(if $(DRY_RUN),--dry-run,)" in recipe


# --- a real run (about 10 s): the keys wandb itself recorded -----------------------------------------------------------

def wandb_file_records(path: Path):
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header: crc32, length, type full/first/middle/last)."""
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            yield buf


def test_a_real_offline_run_logs_every_key_the_report_reads(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = tmp_path / "runs" / "lm" / "cpu" / "dopr_adamw-s0"  # group lm/cpu, as in make reproduce-lm
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_BASE_URL="http://127.0.0.1:9", HOME=str(tmp_path), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "experiments.train", "task=lm", "scale=smoke", "optimizer=dopr_adamw", "logger=wandb",
                    "threads=1", f"hydra.run.dir={run_dir}"], check=True, cwd=ROOT, env=env, timeout=600, capture_output=True)
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys, group, config = {"history": set(), "summary": set()}, None, {}
    for data in wandb_file_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys["history"] |= {item.key or ".".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            keys["summary"] |= {item.key or ".".join(item.nested_key) for item in record.summary.update}
        elif kind == "run":
            group = record.run.run_group
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    keys["config"] = set(flat(config))
    evaluation, _ = grids(dashboards.spec(dashboards.build_report("lm", ENTITY, PROJECT)))
    assert group == evaluation["metadata"]["runSets"][0]["filters"]["filters"][0]["value"] == "lm/cpu"
    for section, want in spec_keys(evaluation).items():
        assert want <= keys[section], f"{section}: {sorted(want - keys[section])}"
    assert "train_seconds" in keys["history"] and "optimizer.kwargs.damping" in keys["config"]
