#!/usr/bin/env python
"""How far a row-subsampled AP statistic moves the preconditioned gradient: for each covered layer,
the relative error ||M_sub - M_exact||_F / ||M_exact||_F of M = G (Sigma + lam I)^-1, where M_exact
uses every row (conv patch, token) of the batch and M_sub at most ``max_rows_per_dim * d_in`` of
them, as a function of that ratio. This is the measurement behind the library's default
``max_rows_per_dim`` (docs/benchmark.md, "Row subsampling").

    python scripts/ap_rows_error.py                       # flow and robot U-Nets (real task batches), UNet2DModel, MLP
    python scripts/ap_rows_error.py --workloads flow --ratios 0.5,1,2 --draws 2
    python scripts/ap_rows_error.py --quick               # tiny synthetic models (used by the tests)
    python scripts/ap_rows_error.py --alternatives        # other cheap conv statistics, the same error

Beside each error, the per-step time of DoPr-AdamW at that setting over AdamW's, measured in the
same process, interleaved (as scripts/bench_optimizer.py does; ``--rounds 0`` skips the timing).

``--alternatives`` measures the same error for cheap statistics the library does not offer, on every
linear layer and conv layer (groups 1, at least 4 output positions), in float64 from the rows (unfolded
patches): uniform rows and a count sketch of k d_in rows, Sigma's top d_in/8 and d_in/4 eigenpairs
with the other eigenvalues at their mean (the best a low-rank sketch could do), and on conv layers
the spatial mean of each sample's patches (the KFAC "reduce" approximation: one row per sample) and
2x2 mean-pooled patches (a quarter of the rows); beside each, the error after the best scalar factor (AdamW and Muon
ignore a layer's overall scale).

The flow and robot U-Nets are the tasks' own models at scale=cpu on the tasks' own training batches,
after ``--train-steps`` AdamW steps (statistics of a freshly initialised network are not the ones
training sees). Every layer's error is averaged over ``--draws`` subsampling seeds. Columns: the
median over all covered matrix layers (layers with no more rows than the cap are exact: error 0);
the whole model's error (all layers' preconditioned gradients as one vector); and the median, 90th
percentile and maximum over the subsampled layers only.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dopr.preconditioner import ActivationPreconditioner, _conv_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def task_workload(task: str, train_steps: int):
    """(model, loss closure over one fixed training batch) of a suite task at scale=cpu."""
    from hydra import compose, initialize_config_dir

    from experiments.tasks import build_task

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", "scale=cpu"])
    t = build_task(cfg.task, 0, torch.device("cpu"))
    model = t.model
    model.train()
    if train_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.task.lr.adamw))
        for step in range(train_steps):
            t.loss(model, t.train_batch(step)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    batch = t.train_batch(train_steps)
    return model, (lambda m: t.loss(m, batch))


def synthetic_workloads(quick: bool):
    from bench_optimizer import mlp_workload, unet2d_workload

    yield "UNet2DModel (32, 64, 64), 16x16, batch 64" if not quick else "UNet2DModel (tiny)", *unet2d_workload(quick)
    yield "residual MLP, batch 1024" if not quick else "residual MLP (tiny)", *mlp_workload(quick)


def preconditioned(model, loss_fn, **options) -> dict[str, torch.Tensor]:
    """Each covered layer's preconditioned gradient (float64 copies) for one batch."""
    model.zero_grad(set_to_none=True)
    ap = ActivationPreconditioner(model, **options)
    try:
        loss_fn(model).backward()
        ap.step()
        return {layer.name: layer.weight.grad.detach().double().clone() for layer in ap.layers if layer.weight.grad is not None}
    finally:
        ap.remove()
        model.zero_grad(set_to_none=True)


def row_counts(model, loss_fn) -> dict[str, tuple[int, int]]:
    """(rows, d_in) of each covered layer's statistic on this batch."""
    ap = ActivationPreconditioner(model, max_rows_per_dim=None)
    try:
        loss_fn(model).backward()
        out = {layer.name: (sum(p.count for p in layer.parts), layer.d_in) for layer in ap.layers if layer.kind != "embedding"}
        ap.reset_stats()
        return out
    finally:
        ap.remove()
        model.zero_grad(set_to_none=True)


def measure(title, model, loss_fn, ratios, draws, damping, rounds):
    counts = row_counts(model, loss_fn)
    exact = preconditioned(model, loss_fn, damping=damping, max_rows_per_dim=None)
    print(f"\n### {title}\n", flush=True)
    print(f"{len(counts)} matrix layers; rows/d_in of the exact statistic: median "
          f"{statistics.median(n / d for n, d in counts.values()):.1f}, min {min(n / d for n, d in counts.values()):.1f}; damping {damping}\n")
    times = {}
    if rounds:
        from bench_optimizer import bench

        settings = [("exact", {"max_rows_per_dim": None})] + [(f"{r:g}", {"max_rows_per_dim": r}) for r in ratios]
        times, *_ = bench(model, loss_fn, ["adamw"], rounds, 2, "cpu", settings)
        print(f"per-step time, DoPr-AdamW exact / AdamW: {times[('adamw', 'exact')] / times[('adamw', '')]:.2f} "
              f"(AdamW {1e3 * times[('adamw', '')]:.1f} ms/step, {rounds} interleaved steps)\n")
    print("| max_rows_per_dim | DoPr-AdamW / AdamW per step | layers subsampled | median over all layers | whole model | median over subsampled layers | 90th pct | max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    exact_norm = math.sqrt(sum(float(m.square().sum()) for m in exact.values()))
    for ratio in ratios:
        errors: dict[str, list[float]] = {}
        whole = []
        for seed in range(draws):
            sub = preconditioned(model, loss_fn, damping=damping, max_rows_per_dim=ratio, seed=seed)
            whole.append(math.sqrt(sum(float((m - exact[name]).square().sum()) for name, m in sub.items())) / exact_norm)
            for name, m in sub.items():
                errors.setdefault(name, []).append(float((m - exact[name]).norm() / exact[name].norm().clamp(min=1e-30)))
        per_layer = {name: statistics.fmean(v) for name, v in errors.items() if name in counts}  # embeddings are never subsampled
        sampled = sorted(e for name, e in per_layer.items() if counts[name][0] > math.ceil(ratio * counts[name][1]))
        if sampled:
            q90 = sampled[min(len(sampled) - 1, int(0.9 * len(sampled)))]
            tail = f"{statistics.median(sampled):.3f} | {q90:.3f} | {sampled[-1]:.3f}"
        else:
            tail = "- | - | -"
        overall = statistics.median(per_layer.values())
        ratio_time = f"{times[('adamw', f'{ratio:g}')] / times[('adamw', '')]:.2f}" if times else "-"
        print(f"| {ratio:g} | {ratio_time} | {len(sampled)}/{len(counts)} | {overall:.3f} | {statistics.fmean(whole):.3f} | {tail} |", flush=True)
        rows.append((ratio, overall))
    return rows


def layer_rows(model, loss_fn):
    """{name: (rows (n, d_in) float64, weight gradient (d_out, d_in) float64, conv patches (B, d_in,
    positions) and output size, or None for a linear layer)} of every nn.Linear and of every conv layer
    with groups 1 and at least 4 output positions, for one batch."""
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, (m, i[0].detach()))))
    try:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (module, x) in inputs.items():
        if module.weight.grad is None:
            continue
        g = module.weight.grad.double().reshape(module.weight.shape[0], -1)
        if isinstance(module, nn.Linear):
            out[name] = (x.double().reshape(-1, x.shape[-1]), g, None)
            continue
        xp, kernel, stride, dilation, size = _conv_input(module, x.double())
        if size[0] * size[1] < 4:
            continue
        z = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # (B, C_in * kh * kw, positions): the weight's column order
        out[name] = (z.transpose(1, 2).reshape(-1, z.shape[1]), g, (z, size))
    model.zero_grad(set_to_none=True)
    return out


def alternatives(title, model, loss_fn, ks, draws, damping):
    """The error of M = G (Sigma + lam I)^-1 with other cheap statistics in place of Sigma. Written
    here: these statistics exist in KFAC libraries only inside their own preconditioners, not as a
    drop-in Sigma for AP."""
    layers = layer_rows(model, loss_fn)

    def precondition(g, sigma):
        lam = damping * sigma.diagonal().sum() / sigma.shape[0]
        return torch.linalg.solve(sigma + lam * torch.eye(sigma.shape[0], dtype=sigma.dtype), g.T).T  # Sigma symmetric

    def uniform(rows, m, gen):
        pick = rows[torch.randperm(rows.shape[0], generator=gen)[:m]]
        return pick.T @ pick / m

    def sketch(rows, m, gen):  # count sketch: each row added with a random sign into one of m buckets
        bucket = torch.randint(0, m, (rows.shape[0],), generator=gen)
        sign = torch.randint(0, 2, (rows.shape[0], 1), generator=gen).double() * 2 - 1
        sz = torch.zeros(m, rows.shape[1], dtype=rows.dtype).index_add_(0, bucket, rows * sign)
        return sz.T @ sz / rows.shape[0]

    def pooled(z, size):  # 2x2 mean-pooled patches (1x2 on a map of height 1)
        kernel = (2, 2) if size[0] >= 2 else (1, 2)
        p = F.avg_pool2d(z.reshape(*z.shape[:2], *size), kernel, ceil_mode=True).flatten(2)
        rows = p.transpose(1, 2).reshape(-1, z.shape[1])
        return rows.T @ rows / rows.shape[0], rows.shape[0]

    def low_rank(g, values, vectors, r, lam):
        """G (Sigma_r + lam I)^-1 with Sigma_r Sigma's top r eigenpairs and, on the other directions,
        their mean eigenvalue (from the trace), lam from the whole trace: the best a rank-r sketch of Sigma
        (a randomized SVD of Z, say) plus its trace could do."""
        v, e = vectors[:, -r:], values[-r:]
        rest = (values.sum() - e.sum()).clamp(min=0) / max(1, len(values) - r)
        gv = g @ v
        return (g - gv @ v.T) / (rest + lam) + (gv / (e + lam)) @ v.T

    EIGEN = (8, 4)  # ranks d_in / 8 and d_in / 4
    names = (["every row (check)"] + [f"uniform rows, {k:g} d_in" for k in ks] + [f"count sketch, {k:g} d_in" for k in ks]
             + [f"top d_in/{q} eigenpairs of Sigma, the rest at their mean" for q in EIGEN]
             + ["spatial mean per sample (KFAC reduce)", "2x2 mean-pooled patches"])
    errors = {n: {} for n in names}
    angles = {n: {} for n in names}  # the error after the best scalar factor: sin of the angle to the exact M
    flops = {n: 0.0 for n in names}  # rows x d_in^2 summed over the layers it covers: Z^T Z's cost
    exact_flops = {n: 0.0 for n in names}
    squared = {n: 0.0 for n in names}
    exact_squared = {n: 0.0 for n in names}
    trace_share = []  # trace of the spatial mean's statistic over Sigma's, per conv layer
    for layer, (rows, g, conv) in layers.items():
        n, d = rows.shape
        sigma = rows.T @ rows / n
        exact = precondition(g, sigma)
        cands = {"every row (check)": [(sigma, n)]}
        for k in ks:
            m = math.ceil(k * d)
            gens = [torch.Generator().manual_seed(seed) for seed in range(draws)]
            cands[f"uniform rows, {k:g} d_in"] = [(uniform(rows, m, gen), m) for gen in gens] if m < n else [(sigma, n)]
            cands[f"count sketch, {k:g} d_in"] = [(sketch(rows, m, gen), m) for gen in gens] if m < n else [(sigma, n)]
        if conv is not None:
            z, size = conv
            mean = z.mean(2)
            trace_share.append(float(mean.square().sum() / z.shape[0]) / float(sigma.diagonal().sum()))
            cands["spatial mean per sample (KFAC reduce)"] = [(mean.T @ mean / z.shape[0], z.shape[0])]
            cands["2x2 mean-pooled patches"] = [pooled(z, size)]
        results = {name: [(precondition(g, s), m) for s, m in options] for name, options in cands.items()}
        values, vectors = torch.linalg.eigh(sigma)
        lam = damping * sigma.diagonal().sum() / d
        for q in EIGEN:
            results[f"top d_in/{q} eigenpairs of Sigma, the rest at their mean"] = [(low_rank(g, values, vectors, max(1, d // q), lam), None)]
        for name, options in results.items():
            norm = float(exact.norm().clamp(min=1e-300))
            misses = [float((mm - exact).norm()) for mm, _ in options]
            errors[name][layer] = statistics.fmean(misses) / norm
            angles[name][layer] = statistics.fmean(
                math.sqrt(max(0.0, 1 - (float((mm * exact).sum()) / (float(mm.norm()) * norm + 1e-300)) ** 2)) for mm, _ in options)
            squared[name] += statistics.fmean(miss**2 for miss in misses)
            exact_squared[name] += norm**2
            if options[0][1] is not None:
                flops[name] += statistics.fmean(m for _, m in options) * d * d
                exact_flops[name] += n * d * d
    convs = sum(conv is not None for *_, conv in layers.values())
    print(f"\n### {title}: other statistics, on {len(layers)} matrix layers ({convs} conv)\n")
    print("| statistic | layers | flops of Z^T Z / every row's | median error over layers | those layers as one vector | 90th pct | max "
          "| median error after the best scalar factor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        e = sorted(errors[name].values())
        if not e:
            continue
        q90 = e[min(len(e) - 1, int(0.9 * len(e)))]
        cost = f"{flops[name] / exact_flops[name]:.3f}" if exact_flops[name] else "-"
        print(f"| {name} | {len(e)} | {cost} | {statistics.median(e):.3f} | {math.sqrt(squared[name] / exact_squared[name]):.3f} | "
              f"{q90:.3f} | {e[-1]:.3f} | {statistics.median(angles[name].values()):.3f} |", flush=True)
    if trace_share:
        print(f"\nShare of Sigma's trace in the spatial means (trace of the KFAC reduce statistic / trace of Sigma), over the conv "
              f"layers: median {statistics.median(trace_share):.3f}, min {min(trace_share):.3f}, max {max(trace_share):.3f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="flow,robot,unet2d,mlp", help="comma-separated: flow, robot, lm (the suite's tasks), unet2d, mlp")
    parser.add_argument("--ratios", default="0.25,0.5,1,2,4,8", help="max_rows_per_dim values to measure")
    parser.add_argument("--draws", type=int, default=3, help="subsampling seeds per ratio (errors averaged per layer)")
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--train-steps", type=int, default=200, help="AdamW steps on the task before measuring (flow, robot)")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per setting (0: no timing)")
    parser.add_argument("--quick", action="store_true", help="tiny synthetic models only")
    parser.add_argument("--alternatives", action="store_true",
                        help="instead of the library's subsampling: other cheap statistics (uniform rows and count sketch at "
                             "--ratios, top eigenpairs, conv: KFAC reduce, 2x2 pooling), the same error, no timing")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.manual_seed(0)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(chosen) - {"flow", "robot", "lm", "unet2d", "mlp"}
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}: choose from flow, robot, lm, unet2d, mlp")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; relative Frobenius error of the preconditioned "
          f"gradient, {'other statistics' if args.alternatives else 'subsampled'} vs every row, averaged over {args.draws} "
          f"draws per layer", flush=True)
    def run(title, model, loss_fn):
        if args.alternatives:
            alternatives(title, model, loss_fn, ratios, args.draws, args.damping)
        else:
            measure(title, model, loss_fn, ratios, args.draws, args.damping, args.rounds)

    if args.quick:
        for title, model, loss_fn in synthetic_workloads(True):
            run(title, model, loss_fn)
        return
    for task in ("flow", "robot", "lm"):
        if task in chosen:
            model, loss_fn = task_workload(task, args.train_steps)
            run(f"{task} task model (scale=cpu), one training batch after {args.train_steps} AdamW steps", model, loss_fn)
    for title, model, loss_fn in synthetic_workloads(False):
        if ("unet2d" if title.startswith("UNet2D") else "mlp") in chosen:
            run(title, model, loss_fn)

if __name__ == "__main__":
    main()
