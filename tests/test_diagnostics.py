"""scripts/ap_diagnostics.py: the low-eigenvalue share is the projection it claims (checked on a
layer whose input has one known weak direction), and on a tiny real run (EMA on, snapshots kept)
it produces the three measurements, with the end of the averaging line equal to the run's own
final raw validation loss."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from test_experiments import ENV, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ap_diagnostics  # noqa: E402


class _OneLayer:
    """A fake task: one bias-free Linear layer whose inputs have a tiny variance along e_3."""

    def __init__(self):
        self.model = nn.Linear(4, 3, bias=False)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 4, generator=g) * torch.tensor([1.0, 2.0, 1.5, 1e-3])

    def train_batch(self, step):
        return self.x

    def loss(self, model, batch):
        return model(batch).square().mean()


def test_low_eigen_share_is_the_projection_on_weak_input_directions():
    task = _OneLayer()
    start = {"weight": torch.zeros(3, 4)}
    u = torch.tensor([1.0, -2.0, 0.5])
    weak = {"weight": torch.outer(u, torch.tensor([0.0, 0.0, 0.0, 1.0]))}  # all change along the weak input e_3
    strong = {"weight": torch.outer(u, torch.tensor([1.0, 0.0, 0.0, 0.0]))}
    half = {"weight": weak["weight"] + strong["weight"]}
    share = ap_diagnostics.low_eigen_share
    assert abs(share(task, start, weak, 1, 0.01)[""]["share"] - 1.0) < 1e-6
    assert share(task, start, strong, 1, 0.01)[""]["share"] < 1e-6
    assert abs(share(task, start, half, 1, 0.01)[""]["share"] - 0.5) < 1e-3  # e_3 is an eigenvector up to sampling
    assert abs(share(task, start, half, 1, 0.01)[""]["low_directions"] - 0.25) < 1e-9


def test_diagnostics_on_a_tiny_run(tmp_path):
    run = tmp_path / "run"
    train("task=control", "optimizer=dopr_adamw", "trainer.ema_decay=0.9", "trainer.snapshot_every=3", "logger=none", f"hydra.run.dir={run}")
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["step0.pt", "step3.pt", "step6.pt"]
    summary = json.loads((run / "summary.json").read_text())
    assert {"raw_val_loss", "raw_return", "val_loss", "return"} <= set(summary["final"])  # EMA and raw weights both evaluated
    out = tmp_path / "diag"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "ap_diagnostics.py"), str(run), "--out", str(out),
                    "--between", "3", "6", "--batches", "2", "--points", "3"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    result = json.loads((out / "ap_diagnostics.json").read_text())[0]
    shares = result["low_eigen_share"]
    assert {"inp", "blocks.0.1", "out.1"} <= set(shares) and all(0 <= v["share"] <= 1 for v in shares.values())
    assert [t for t, _ in result["line"]] == [0.0, 0.5, 1.0]
    assert abs(result["line"][-1][1] - summary["final"]["raw_val_loss"]) < 1e-6  # a=1 is the final raw weights
    assert sorted(result["norms"], key=int) == ["0", "3", "6"]
    assert (out / "ap_diagnostics.png").stat().st_size > 0 and "## 2." in (out / "ap_diagnostics.md").read_text()


def test_every_dopr_config_uses_the_library_damping_default():
    import inspect

    import yaml

    import dopr

    default = inspect.signature(dopr.ActivationPreconditioner).parameters["damping"].default
    assert dopr.DoPr(torch.nn.Linear(2, 2)).preconditioner.damping == default  # DoPr passes AP's defaults through
    for path in sorted((ROOT / "configs" / "optimizer").glob("dopr_*.yaml")):
        assert yaml.safe_load(path.read_text())["kwargs"]["damping"] == default, path


def test_every_dopr_config_sets_the_row_cap_its_committed_runs_used():
    # The library's default is every row (the paper's AP) since issue 42; the suite's runs since commit
    # bd8fb11 drew 8 rows per input dimension (summary.json: ap_rows), so every DoPr config says so itself.
    import yaml

    paths = sorted((ROOT / "configs" / "optimizer").glob("dopr_*.yaml"))
    assert len(paths) == 7  # dopr_<X> for five GPs, and dopr_adamw_k10, dopr_muon_k10 (update_every: 10)
    for path in paths:
        assert yaml.safe_load(path.read_text())["kwargs"]["max_rows_per_dim"] == 8, path
