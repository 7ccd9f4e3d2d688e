import re
import subprocess
import sys
from pathlib import Path

import dopr

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_a_ratio_row_per_gp_and_workload():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert out.count("| GP | X (ms/step)") == 2  # the transformer and the MLP
    for base in dopr.BASES:
        rows = re.findall(rf"^\| {base} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
        assert len(rows) == 2, out
        for x, d1, r1, d10, r10 in rows:
            assert abs(float(d1) / float(x) - float(r1)) < 0.02 * float(r1) + 0.002
            assert abs(float(d10) / float(x) - float(r10)) < 0.02 * float(r10) + 0.002
