"""Run records (experiments/record.py), the results layout and the report layer that only reads records."""

import ast
import csv
import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import record

ROOT = Path(__file__).resolve().parents[1]


def old_run_folder(folder: Path, optimizer="dopr_adamw", seed=0, ema=False) -> Path:
    """A run folder as the loop wrote them before records existed (config.json, metrics.jsonl, summary.json)."""
    folder.mkdir(parents=True)
    final = {"step": 20, "val_loss": 0.5, "success": 0.75, "success_ci_low": 0.5, "success_ci_high": 0.9, "success_h10": 0.5,
             "success_h20": 0.75, "select_success": 0.7, "rollout_seconds": 1.5}
    if ema:
        final.update({"raw_val_loss": 0.6, "raw_success": 0.25, "raw_select_success": 0.3})
    summary = {"task": "robot", "scale": "cpu", "optimizer": optimizer, "lr": 1e-3, "seed": seed, "metric_name": "success",
               "higher_is_better": True, "metric_range": [0, 1], "status": "done", "git_commit": "abc1234-dirty",
               "ap_rows": {"max_rows": None, "max_rows_per_dim": 8}, "final": final, "wall_seconds": 12.0,
               "best": {"step": 10, "metric": 0.8, "min_val_loss": 0.5}}
    config = {"task": {"name": "robot", "version": 4}, "optimizer": {"name": optimizer, "weight_decay": 0.1},
              "git_commit": "abc1234-dirty", "world_size": 1, "machine": {"cpu": "AMD EPYC", "threads": 1, "torch": "2.13.0"}}
    rows = [{"step": 10, "train_loss": 1.0, "lr": 1e-3, "steps_per_s": 5.0},
            {"step": 10, "val_loss": 0.55, "success": 0.8, "select_success": 0.8},
            {"step": 10, "outcomes": {"success": [1, 1, 1, 0, 1]}},
            {"step": 20, "train_loss": 0.8, "lr": 0.0, "steps_per_s": 5.0}, final,
            {"step": 20, "outcomes": {"success": [1, 1, 0, 1]}}, {"step": 20, "ap_cond_max": "inf", "ap_cond/layer": 3.0}]
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "trai')  # a line cut by a kill
    return folder


def test_upgrade_structures_an_old_run_folder_and_keeps_every_summary_field(tmp_path):
    rec = record.upgrade(old_run_folder(tmp_path / "dopr_adamw-s0", ema=True))
    assert rec["schema"] == record.SCHEMA and rec["run_id"] == "dopr_adamw-s0" and rec["experiment"] == "cpu"
    assert rec["provenance"] == {"git_commit": "abc1234", "dirty": True, "world_size": 1, "torch": "2.13.0", "python": None,
                                 "threads": 1, "cpu": "AMD EPYC", "cpu_count": None, "gpu": None}
    assert "machine" not in rec["config"] and rec["summary"]["ap_rows"] == {"max_rows": None, "max_rows_per_dim": 8}
    assert set(json.loads((tmp_path / "dopr_adamw-s0" / "summary.json").read_text())) <= set(rec["summary"])
    assert [e["step"] for e in rec["evals"]] == [10, 20] and [t["step"] for t in rec["train"]] == [10, 20]
    last = rec["evals"][-1]
    assert last["metrics"] == {"success": 0.75, "success_h10": 0.5, "success_h20": 0.75}
    assert last["select"] == {"success": 0.7} and last["intervals"] == {"success": [0.5, 0.9]}
    assert last["horizons"] == {"h": {"10": "success_h10", "20": "success_h20"}}
    assert last["raw"] == {"val_loss": 0.6, "metrics": {"success": 0.25}, "select": {"success": 0.3}}
    assert last["ap"]["cond_max"] == float("inf") and last["train_seconds"] is None
    assert rec["outcomes"] == {"10": {"success": [1, 1, 1, 0, 1]}, "20": {"success": [1, 1, 0, 1]}}


def _add_many(args):
    folder, start = args
    for i in range(start, start + 15):
        record.add(folder, [{"schema": record.SCHEMA, "run_id": f"run-{i:03d}", "status": "done"}])


def test_two_writers_adding_at_once_lose_nothing(tmp_path):
    folder = tmp_path / "exp"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_add_many, [(folder, 0), (folder, 100)])
    ids = [r["run_id"] for r in record.read(folder)]
    assert ids == sorted(f"run-{i:03d}" for i in [*range(15), *range(100, 115)])
    record.add(folder, [{"schema": record.SCHEMA, "run_id": "run-005", "status": "failed"}])  # the same run again: replaced
    again = record.read(folder)
    assert len(again) == 30 and next(r for r in again if r["run_id"] == "run-005")["status"] == "failed"
    lines = (folder / record.RECORDS).read_text().splitlines()
    assert lines == sorted(lines) and all(json.loads(line)["run_id"] for line in lines)  # one run per line, by run id


def test_a_cut_or_unknown_records_file_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "exp"
    record.add(folder, [{"schema": record.SCHEMA, "run_id": f"r{i}", "status": "done", "pad": "x" * 50} for i in range(3)])
    path = folder / record.RECORDS
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(record.RecordError, match=rf"{path}, line 3: not a whole JSON record.*git checkout"):
        record.read(folder)
    path.write_text(json.dumps({"schema": record.SCHEMA + 1, "run_id": "x"}) + "\n")
    with pytest.raises(record.RecordError, match="update this checkout"):
        record.read(folder)
    with pytest.raises(record.RecordError, match="does not exist: run the experiment first"):
        record.read(tmp_path / "nothing")
    assert record.read(tmp_path / "nothing", missing_ok=True) == []
    with pytest.raises(record.RecordError, match="update this checkout"):  # missing_ok forgives a missing file, not a bad one
        record.read(folder, missing_ok=True)
    out = subprocess.run([sys.executable, "scripts/report.py", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "update this checkout" in out.stderr and "Traceback" not in out.stderr


def test_adding_a_sweep_leaves_its_unfinished_runs_for_later_unless_asked(tmp_path, capsys):
    runs, exp = tmp_path / "runs", tmp_path / "results" / "robot" / "cpu"
    for seed in (0, 1):
        old_run_folder(runs / f"adamw-s{seed}", "adamw", seed)
    (runs / "adamw-s1" / "summary.json").unlink()  # still going, or killed
    assert record.main(["add", str(runs), str(exp)]) == 0
    assert [r["run_id"] for r in record.read(exp)] == ["adamw-s0"] and "left out 1 unfinished runs" in capsys.readouterr().out
    assert record.main(["add", str(runs), str(exp), "--with-unfinished"]) == 0
    assert {r["run_id"]: r["status"] for r in record.read(exp)} == {"adamw-s0": "done", "adamw-s1": "unfinished"}


def test_report_reads_records_and_run_folders_alike(tmp_path):
    runs = tmp_path / "runs"
    for opt in ("adamw", "dopr_adamw"):
        for seed in (0, 1):
            old_run_folder(runs / f"{opt}-s{seed}", opt, seed)
    subprocess.run([sys.executable, "-m", "experiments.record", "add", str(runs), str(tmp_path / "results" / "robot" / "cpu")],
                   cwd=ROOT, check=True, capture_output=True)
    for source, out in ((runs, tmp_path / "from_runs"), (tmp_path / "results" / "robot" / "cpu", tmp_path / "from_records")):
        subprocess.run([sys.executable, "scripts/report.py", str(source), "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    for name in ("results_runs.csv", "val_loss_vs_success.png", "success_vs_horizon.png"):
        assert (tmp_path / "from_runs" / name).read_bytes() == (tmp_path / "from_records" / name).read_bytes(), name
    header = (tmp_path / "from_records" / "results_runs.csv").read_text().splitlines()[0].split(",")
    assert {"max_rows_per_dim", "train_seconds", "final_success_ci_low", "final_select_success"} <= set(header)


@pytest.mark.slow  # grows with every results folder (about 3 minutes by now): the fast suite rebuilds one folder below
def test_committed_pages_are_rebuilt_from_the_committed_records_bit_for_bit(tmp_path):
    """`make report` on a clean checkout leaves git clean: every page under results/ is what the report makes from
    the records beside it (rebuilt here in a copy, compared byte for byte)."""
    copy = tmp_path / "results"
    shutil.copytree(ROOT / "results", copy)
    subprocess.run([sys.executable, "scripts/report.py", "--all", str(copy), "--configs", str(ROOT / "configs" / "task")],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "scripts/summary.py", "--results", str(copy), "--configs", str(ROOT / "configs" / "task")],
                   cwd=ROOT, check=True, capture_output=True)
    committed = sorted(p.relative_to(ROOT / "results") for p in (ROOT / "results").rglob("*") if p.is_file())
    rebuilt = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file() and p.name != ".records.lock")
    assert rebuilt == [p for p in committed if p.name != ".records.lock"]
    changed = [str(p) for p in committed if p.name != ".records.lock" and (ROOT / "results" / p).read_bytes() != (copy / p).read_bytes()]
    assert not changed, f"pages that `make report` would change: {changed}"


def test_the_flagship_headline_pages_are_rebuilt_from_their_records_bit_for_bit(tmp_path):
    """The fast suite's share of the rebuild above: results/lm/cpu (the flagship's headline pages) from its records."""
    copy = tmp_path / "results" / "lm" / "cpu"  # the same layout: pages name their folder as results/<task>/<experiment>
    shutil.copytree(ROOT / "results" / "lm" / "cpu", copy)
    subprocess.run([sys.executable, "scripts/report.py", str(copy), "--configs", str(ROOT / "configs" / "task")], cwd=ROOT, check=True,
                   capture_output=True)
    committed = sorted(p.name for p in (ROOT / "results" / "lm" / "cpu").iterdir() if p.is_file() and p.name != ".records.lock")
    assert sorted(p.name for p in copy.iterdir() if p.is_file() and p.name != ".records.lock") == committed
    changed = [n for n in committed if (ROOT / "results" / "lm" / "cpu" / n).read_bytes() != (copy / n).read_bytes()]
    assert not changed, f"pages that `python scripts/report.py results/lm/cpu` would change: {changed}"


def test_a_page_of_runs_older_than_the_task_version_says_so(tmp_path):
    """results/<task>/cpu of an earlier task version is marked superseded; a probe's page says what version it ran at;
    runs of the current version carry no mark. The version comes from the checkout's configs/task/<task>.yaml."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import report

    versions = {r["config"]["task"].get("version", 1) for r in record.read(ROOT / "results" / "lm" / "cpu")}
    assert len(versions) == 1
    ran = versions.pop()
    for experiment in ("cpu", "calibration"):
        shutil.copytree(ROOT / "results" / "lm" / "cpu", tmp_path / "results" / "lm" / experiment,
                        ignore=shutil.ignore_patterns("tuning*"))
    configs = tmp_path / "configs" / "task"
    configs.mkdir(parents=True)

    def page(experiment: str, now: int) -> str:
        (configs / "lm.yaml").write_text(f"version: {now}\n")
        folder = tmp_path / "results" / "lm" / experiment
        assert report.main([str(folder)]) == 0  # the configs beside the results folder: tmp_path/configs/task
        return (folder / "results.md").read_text()

    assert f"**Superseded**: these runs are of task version {ran}; `configs/task/lm.yaml` is now at version {ran + 1}" in page("cpu", ran + 1)
    assert "Superseded" not in page("cpu", ran) and f"task version {ran}" not in page("cpu", ran)
    probe = page("calibration", ran + 1)
    assert f"These runs are of task version {ran} (`configs/task/lm.yaml` is now at version {ran + 1})" in probe and "Superseded" not in probe

    # an evaluation being rerun after the bump: the current version's runs are reported, the older ones counted apart
    mixed = tmp_path / "results" / "lm" / "cpu"
    records = record.read(mixed)
    for r in records[: len(records) // 2]:
        r["config"]["task"]["version"] = ran + 1
    (mixed / record.RECORDS).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    text = page("cpu", ran + 1)
    assert f"Left out: {len(records) - len(records) // 2} runs of task version {ran}, beside the current version {ran + 1}'s" in text
    assert "Superseded" not in text
    with open(mixed / "results_runs.csv") as f:
        assert {row["task_version"] for row in csv.DictReader(f)} == {str(ran + 1)}


def test_results_hold_one_records_file_per_experiment_and_no_code():
    results = ROOT / "results"
    assert not list(results.rglob("metrics.jsonl")) and not list(results.rglob("*.py")) and not list(results.rglob("summary.json"))
    for folder in (p for p in results.glob("*/*") if p.is_dir()):
        assert (folder / record.RECORDS).exists() or (folder / "results.md").exists() or (folder / "tuning.md").exists(), folder
        assert all(r["experiment"] == folder.name for r in record.read(folder)) if (folder / record.RECORDS).exists() else True


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                package = path.relative_to(ROOT).with_suffix("").parts[: -node.level]
                base = ".".join(package + ((node.module,) if node.module else ()))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_no_import_circles_and_the_report_does_not_import_the_loop():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in [*(ROOT / "dopr").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    for m in list(graph):  # a package's own __init__ is not an edge of its modules
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    state = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for i in graph[m]:
            visit(i, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    assert not any(i.startswith("experiments") for p in (ROOT / "dopr").rglob("*.py") for i in _imports(p))  # the library stands alone
    report_code = [ROOT / "scripts" / "report.py", ROOT / "scripts" / "summary.py", *(ROOT / "experiments" / "reports").glob("*.py")]
    for p in report_code:
        seen = _imports(p)
        assert not any(i == "experiments.train" or i.startswith("experiments.train.") or i.startswith("experiments.tasks") for i in seen), p
    # nor, through them, the modules they import (the records, stats, registry, protocol)
    for m in ("experiments.record", "experiments.stats", "experiments.registry", "experiments.protocol", "experiments.reports.load"):
        assert "experiments.train" not in graph[m] and not any(i.startswith("experiments.tasks") for i in graph[m]), m


def test_no_python_file_in_experiments_or_scripts_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*(ROOT / "experiments").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_a_growing_records_file_does_not_mark_a_run_dirty_but_changed_code_does(tmp_path):
    """Every run of a sweep after the first used to be stamped -dirty: the records file it appends to is tracked.
    The training loop leaves results/ out of the check; a changed code file still counts."""
    from experiments.logging import git_commit

    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "records.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert not git_commit(("results",), repo=tmp_path).endswith("-dirty")
    (tmp_path / "results" / "records.jsonl").write_text("{}\n{}\n")
    assert not git_commit(("results",), repo=tmp_path).endswith("-dirty")
    assert git_commit(repo=tmp_path).endswith("-dirty")  # without the exclusion, the records file counts
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(("results",), repo=tmp_path).endswith("-dirty")
