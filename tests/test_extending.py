"""docs/extending.md, both walkthroughs, through the real entry point in a temporary folder: a toy optimizer by import
path (with and without AP) and a toy task, each needing only its module and its configs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TOY_OPTIMIZER = '''
import torch

class ToySGD(torch.optim.Optimizer):
    """Plain SGD with momentum, written out: an optimizer the suite has never heard of."""

    def __init__(self, params, lr=1e-2, momentum=0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(buf, alpha=-group["lr"])
'''

TOY_TASK = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.tasks.base import EvalResult, Task


class ToyTask(Task):
    """Two Gaussian blobs in 4-D: the metric is the accuracy of the classifier on a fixed set."""
    metric = "accuracy"
    higher_is_better = True
    metric_label = "toy accuracy"

    def __init__(self, cfg, seed, device):
        torch.manual_seed(seed)
        self.cfg, self.device = cfg, device
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
        self.val = self.draw(1000, 64)
        self.eval_set, self.select_set = self.draw(1001, 128), self.draw(1002, 128)

    def draw(self, seed, n):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 4, generator=g) + 1.5 * y[:, None].float()
        return x.to(self.device), y.to(self.device)

    def train_batch(self, step):
        return self.draw(10_000 + step, self.cfg.batch_size)

    def val_batches(self):
        return [self.val]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, final=True):
        with torch.no_grad():
            right = [(model(x).argmax(1) == y).int().tolist() for x, y in (self.eval_set, self.select_set)]
        return EvalResult({"accuracy": sum(right[0]) / len(right[0]), "select_accuracy": sum(right[1]) / len(right[1])},
                          {"accuracy": right[0]})


def build(cfg, seed, device):
    return ToyTask(cfg, seed, device)
'''


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'pkg'}{os.pathsep}{ROOT}", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "experiments.train", "scale=smoke", "threads=1", "logger=none",
           f"hydra.searchpath=[file://{tmp_path / 'configs'}]", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # entry-point runs: .ci/run runs the slow suite
def test_a_toy_optimizer_by_import_path_with_and_without_ap(tmp_path):
    write(tmp_path / "pkg" / "toy_optimizer.py", TOY_OPTIMIZER)
    write(tmp_path / "configs" / "optimizer" / "toy_sgd.yaml", """\
        name: toy_sgd
        class_path: toy_optimizer.ToySGD
        weight_decay: 0.0
        lr: 1.0e-2
        kwargs: {momentum: 0.9}
        """)
    write(tmp_path / "configs" / "optimizer" / "dopr_toy_sgd.yaml", """\
        defaults: [toy_sgd, _self_]
        name: dopr_toy_sgd
        ap: true
        kwargs: {momentum: 0.9, damping: 1.0}
        """)
    weights = {}
    for name in ("toy_sgd", "dopr_toy_sgd"):
        out = run(tmp_path, f"optimizer={name}", f"hydra.run.dir={tmp_path / name}")
        assert out.returncode == 0, out.stderr[-3000:]
        rec = json.loads((tmp_path / name / "record.json").read_text())
        assert rec["status"] == "done" and rec["optimizer"] == name and rec["lr"] == 1e-2
        assert ("ap_coverage" in rec) == (name == "dopr_toy_sgd")  # AP in front only with ap: true
        weights[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
    assert any(not torch.equal(weights["toy_sgd"][k], weights["dopr_toy_sgd"][k]) for k in weights["toy_sgd"])
    # AP options without ap: true, and a path that does not import, stop with a message that names the setting
    bad = run(tmp_path, "optimizer=toy_sgd", "+optimizer.kwargs.damping=1", f"hydra.run.dir={tmp_path / 'bad1'}")
    assert bad.returncode != 0 and "optimizer.ap=true" in bad.stderr
    bad = run(tmp_path, "optimizer=toy_sgd", "optimizer.class_path=toy_optimizer.Nope", f"hydra.run.dir={tmp_path / 'bad2'}")
    assert bad.returncode != 0 and "optimizer.class_path" in bad.stderr


@pytest.mark.slow
def test_a_toy_task_needs_only_its_module_and_its_configs(tmp_path):
    write(tmp_path / "pkg" / "toy_task.py", TOY_TASK)
    write(tmp_path / "configs" / "task" / "toy.yaml", """\
        name: toy
        module: toy_task
        version: 1
        lr: {adamw: 1.0e-2, dopr_adamw: 1.0e-2}
        batch_size: 16
        """)
    write(tmp_path / "configs" / "task_scale" / "toy_smoke.yaml", """\
        # @package _global_
        trainer: {steps: 6, warmup_steps: 1, eval_every: 3, rollout_every: 6, log_every: 2, checkpoint_every: 3}
        """)
    results = tmp_path / "results" / "toy" / "smoke"
    for name in ("adamw", "dopr_adamw"):
        out = run(tmp_path, "task=toy", f"optimizer={name}", f"hydra.run.dir={tmp_path / 'runs' / name}", f"results_dir={results}")
        assert out.returncode == 0, out.stderr[-3000:]
    report = subprocess.run([sys.executable, "scripts/report.py", str(results)], cwd=ROOT, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    page = (results / "results.md").read_text()
    assert "| adamw | 1 |" in page and "| dopr_adamw | 1 |" in page and "toy accuracy" in page
    rows = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == ["adamw", "dopr_adamw"] and all(len(r["outcomes"]["6"]["accuracy"]) == 128 for r in rows)
    bad = run(tmp_path, "task=toy", "task.module=toy_nope", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "task.module='toy_nope' cannot be imported" in bad.stderr
