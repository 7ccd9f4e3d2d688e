import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([\d.]+)"


def test_benchmark_prints_a_ratio_row_per_gp_and_workload():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick", "--bases", "adamw,muon"],
                         check=True, capture_output=True, text=True, timeout=900).stdout  # ~1 min idle; 5+ beside a sweep
    assert out.count("| GP | X (ms/step)") == 6  # flow, robot, UNet2DModel, Llama, LoRA Llama, MLP
    for base in ("adamw", "muon"):
        rows = re.findall(rf"^\| {base} \| {NUMBER} \| " + r" \| ".join([NUMBER] * 6) + r" \| ([\d.]+) / ([\d.]+) / ([\d.]+) \|$", out, re.M)
        assert len(rows) == 6, out
        for x, t1, r1, t2, r2, t3, r3, m1, m2, m3 in rows:
            for t, r in ((t1, r1), (t2, r2), (t3, r3)):
                assert abs(float(t) / float(x) - float(r)) < 0.02 * float(r) + 0.002
            assert float(m1) == 0 and float(m2) == 0  # update_every=1 keeps nothing between steps
            assert float(m3) > 0  # update_every=10 keeps its inverses


def test_benchmark_times_the_comparators_beside_adamw_and_dopr_adamw_in_the_same_rounds():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick", "--workloads", "mlp"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    rows = re.findall(rf"^\| (adamw|dopr_adamw \(default\)|soap|shampoo_input|psgd_kron) \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", out, re.M)
    assert [r[0] for r in rows] == ["adamw", "dopr_adamw (default)", "soap", "shampoo_input", "psgd_kron"], out
    (_, adamw_ms, one, adamw_mib), (_, _, _, dopr_mib), *comparators = rows
    assert float(one) == 1.0 and float(dopr_mib) == float(adamw_mib) > 0  # AP keeps nothing between steps at update_every=1
    for _, ms, ratio, mib in comparators:
        assert abs(float(ms) / float(adamw_ms) - float(ratio)) < 0.02 * float(ratio) + 0.002 and float(mib) > 0
    timed = re.search(r"^\| adamw \| ([\d.]+) \| ", out, re.M).group(1)
    assert timed == adamw_ms  # the ratios' AdamW is the one in the GP table: one set of interleaved rounds
    none = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick", "--workloads", "mlp", "--comparators", ""],
                          check=True, capture_output=True, text=True, timeout=300).stdout
    assert "| optimizer |" not in none and none.count("| adamw |") == 1


def test_rows_error_is_zero_without_subsampling_and_grows_with_fewer_rows():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ap_rows_error.py"), "--quick", "--ratios", "0.5,2,1000",
                          "--draws", "2", "--rounds", "0"], check=True, capture_output=True, text=True, timeout=300).stdout
    tables = re.findall(r"^\| ([\d.]+) \| - \| (\d+)/(\d+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert len(tables) == 6, out  # two workloads x three ratios
    for ratio, sampled, layers, median, whole in tables:
        if ratio == "1000":  # a cap above every layer's rows: the exact statistic
            assert sampled == "0" and float(median) == 0 and float(whole) == 0
    by_ratio = {}
    for ratio, _, _, _, whole in tables:
        by_ratio.setdefault(ratio, []).append(float(whole))
    assert all(a > b for a, b in zip(by_ratio["0.5"], by_ratio["2"])), out



def test_alternative_statistics_are_measured_against_every_row():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ap_rows_error.py"), "--quick", "--alternatives", "--ratios", "1,1000",
                          "--draws", "2"], check=True, capture_output=True, text=True, timeout=300).stdout
    unet, mlp = out.split("\n### ")[1:]
    row = r"^\| ([^|]+?) \| (\d+) \| ([\d.]+|-) \| " + r" \| ".join([NUMBER] * 5) + r" \|$"
    tables = [{name: (int(layers), cost, *map(float, cells)) for name, layers, cost, *cells in re.findall(row, t, re.M)} for t in (unet, mlp)]
    for rows in tables:
        layers = rows["every row (check)"][0]
        assert rows["every row (check)"] == (layers, "1.000", 0.0, 0.0, 0.0, 0.0, 0.0), out
        # a cap above every layer's rows is the exact statistic; a cap of d_in rows is not, and costs less
        assert rows["uniform rows, 1000 d_in"][2:] == (0.0,) * 5 and rows["count sketch, 1000 d_in"][2:] == (0.0,) * 5
        assert float(rows["uniform rows, 1 d_in"][1]) < 1 and rows["uniform rows, 1 d_in"][3] > 0.01
        assert rows["count sketch, 1 d_in"][3] > 0.01
        # keeping more eigenpairs is closer; both are some way off on these layers
        eighth, quarter = rows["top d_in/8 eigenpairs of Sigma, the rest at their mean"], rows["top d_in/4 eigenpairs of Sigma, the rest at their mean"]
        assert eighth[0] == quarter[0] == layers and eighth[1] == quarter[1] == "-"
        assert eighth[3] >= quarter[3] > 0, out
        for stat in rows.values():
            assert stat[6] <= stat[2] + 1e-3  # the best scalar factor can only help (medians of per-layer values)
    unet_rows, mlp_rows = tables
    for name, fraction in (("spatial mean per sample (KFAC reduce)", 0.1), ("2x2 mean-pooled patches", 0.3)):
        assert 0 < unet_rows[name][0] < unet_rows["every row (check)"][0]  # conv layers only
        assert float(unet_rows[name][1]) < fraction and unet_rows[name][3] > 0.01, out
        assert name not in mlp_rows  # the MLP has no conv layer


@pytest.mark.parametrize("flag, workload, older, switch, variants", [
    ("--compare-gram", "mlp", "default, full gram", "_SPLIT_GRAM_MIN_D", 5),  # Z^T Z as one product
    ("--compare-shifted", "robot", "exact, unfolded", "_SHIFTED_GRAM_CALL_FLOPS", 4),  # conv statistics from patch rows
])
def test_compare_flags_time_the_older_gram_against_the_library_in_one_run(flag, workload, older, switch, variants):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_optimizer

    import dopr.preconditioner as pre

    before = getattr(pre, switch)
    with bench_optimizer.gram(older):
        assert getattr(pre, switch) > 1 << 40  # out of every input's reach: the older way throughout
    with bench_optimizer.gram("default"):
        assert getattr(pre, switch) == before
    assert getattr(pre, switch) == before
    with bench_optimizer.gram("default, two blocks"):
        assert pre._GRAM_BLOCKS == 2
    assert pre._GRAM_BLOCKS == 4
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick", "--workloads", workload, flag],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    rows = re.findall(rf"^\| adamw \| {NUMBER} \| " + r" \| ".join([NUMBER] * (2 * variants)) + r" \|$", out, re.M)
    assert len(rows) == 1 and f"DoPr-X {older} (ms)" in out, out
    x, *cells = map(float, rows[0])
    for t, r in zip(cells[::2], cells[1::2]):
        assert abs(t / x - r) < 0.02 * r + 0.002


def test_benchmark_can_reuse_freed_memory_as_the_training_loop_does():
    import platform

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_optimizer.py"), "--quick", "--workloads", "mlp", "--keep-freed-memory",
                          "--comparators", ""],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert f"freed memory kept (as in training): {glibc}" in out and out.count("| adamw |") == 1
