"""Activation-wise preconditioning (AP): the first half of DoPr.

For a layer with weight W (d_out x d_in), weight gradient G and inputs z_1..z_n (every token,
time step or conv patch is a row), AP rewrites the gradient to

    M = G (Sigma + lam I)^-1,   Sigma = (1/n) sum_i z_i z_i^T,   lam = damping * trace(Sigma) / d_in

in place, so any torch optimizer (the gradient preconditioner, GP) can run on it next.

No kept library does this exact transform (KFAC libraries always add the output-gradient factor and
their own update rule), so it is written here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Eigenvalues below this fraction of the mean eigenvalue count as zero: it sets the floor of the
# inverse when damping is 0 (a pseudo-inverse in effect) and decides when a Cholesky is trusted.
MIN_RELATIVE_EIGENVALUE = 1e-6
# Unfolded conv patches are processed in chunks of at most this many elements (memory bound).
_UNFOLD_CHUNK_ELEMENTS = 1 << 25

FALLBACK_KINDS = ("float64", "eigh", "previous", "skipped", "nonfinite_stats")
# Below this share of the trainable weight matrices' parameters covered, construction warns (CoverageWarning),
# or raises with strict=True: DoPr would then be close to its base optimizer without saying so.
MIN_COVERED_FRACTION = 0.5

logger = logging.getLogger("dopr")


class CoverageWarning(UserWarning):
    """Most of a model's trainable weight-matrix parameters are left to the GP alone (no AP)."""


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this package (the user's DoPr(...) or
    ActivationPreconditioner(...) call), for warnings."""
    package = __name__.rpartition(".")[0] + "."
    level, frame = 1, sys._getframe(1)
    while frame is not None and (frame.f_globals.get("__name__", "") + ".").startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT, ...): ``y = x @ W + b`` with W of shape (nx, nf) = (d_in, d_out).
    Recognised by duck typing, so the library needs no transformers import: a class named ``Conv1D`` whose
    integer ``nx``/``nf`` attributes match its weight's (nx, nf) shape."""
    weight = module._parameters.get("weight")
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nx, int) and isinstance(nf, int)
            and isinstance(weight, nn.Parameter) and tuple(weight.shape) == (nx, nf))


def _unsupported_reason(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return (f"{name} is a transposed convolution, which AP does not cover: its weight gradient pairs each input "
                "position with several output positions, so its rows would be patches of a zero-interleaved input "
                "under a flipped, transposed kernel, which are not built here")
    if isinstance(module, nn.Conv3d):
        return f"{name} is not a layer AP covers (3-D patches are not built here; Conv1d and Conv2d are covered)"
    if isinstance(module, nn.Linear):
        return f"{name} subclasses nn.Linear with its own forward, so its input is not known to be the rows of x @ W^T"
    return f"{name} is not a layer AP covers (Linear, transformers Conv1D, Conv1d, Conv2d, Embedding, MultiheadAttention)"


class _LinearTap:
    """While open, ``torch.nn.functional.linear`` calls with this ``weight`` hand their input to ``capture``.

    nn.MultiheadAttention applies out_proj.weight inside F.multi_head_attention_forward through the
    module-global ``linear`` of torch.nn.functional, never through out_proj's forward, so no module hook
    sees that input. A TorchFunctionMode would not either: the functional first dispatches itself as a
    whole to an active mode, which then runs it with the mode popped. So the name is rebound to a
    wrapper for as long as some tap is open (opened by the attention's pre-hook, closed by its
    always-called post-hook); the wrapper calls the original, so the forward is unchanged. Process-wide:
    a concurrent F.linear call in another thread passes through the wrapper (and is ignored unless it uses
    a tapped weight)."""

    _open: dict[int, list] = {}  # id(weight) -> open taps (innermost last)
    _original = None

    def __init__(self, weight: torch.Tensor, capture):
        self.weight, self.capture, self.fired = weight, capture, False
        if not _LinearTap._open:
            _LinearTap._original = F.linear
            F.linear = _LinearTap._call
        _LinearTap._open.setdefault(id(weight), []).append(self)

    @staticmethod
    def _call(input, weight, bias=None):
        taps = _LinearTap._open.get(id(weight))
        if taps and taps[-1].weight is weight:
            taps[-1].fired = True
            taps[-1].capture(input)
        return _LinearTap._original(input, weight, bias)

    def close(self) -> None:
        taps = _LinearTap._open.get(id(self.weight), [])
        if self in taps:
            taps.remove(self)
        if not taps:
            _LinearTap._open.pop(id(self.weight), None)
        if not _LinearTap._open and F.linear is _LinearTap._call:
            F.linear = _LinearTap._original
# Inputs at least this wide get their Z^T Z block by block from _GRAM_BLOCKS column blocks (below, _gram_sym).
_SPLIT_GRAM_MIN_D = 192
_GRAM_BLOCKS = 4
# Stride-1 conv grams from shifted products of the input (_shifted_conv_gram) when that is cheaper,
# counting each of its flops as _SHIFTED_GRAM_FLOP_COST of one large product's (its matmuls run on
# sliced copies, at about a third of the speed on 2 CPU threads: docs/benchmark.md, "The shifted conv
# gram") and each of its small matmuls as _SHIFTED_GRAM_CALL_FLOPS more (per-call overhead).
_SHIFTED_GRAM_FLOP_COST = 3.0
_SHIFTED_GRAM_CALL_FLOPS = 2e6


def _gram_sym(z: torch.Tensor) -> torch.Tensor:
    """Z^T Z for z of shape (groups, n, d). For d >= _SPLIT_GRAM_MIN_D it is built from k =
    _GRAM_BLOCKS column blocks Z = [Z_1 ... Z_k]: block row i is Z_i^T [Z_i ... Z_k] (one product each)
    and the blocks left of the diagonal are mirrored, so (k + 1) / (2 k) of the full product's flops
    (5/8 with 4 blocks; a BLAS syrk would do 1/2, but torch exposes none; written here for that). Each
    entry is the same dot product over the rows as in ``z.mT @ z`` (bitwise equal on this project's CPU
    for the suite's shapes); on 2 CPU cores it takes 0.68-0.83 of its time (docs/benchmark.md)."""
    d = z.shape[-1]
    if d < _SPLIT_GRAM_MIN_D:
        return z.transpose(1, 2) @ z
    bounds = [round(i * d / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    out = torch.empty(z.shape[0], d, d, dtype=z.dtype, device=z.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        row = z[:, :, a:b].transpose(1, 2) @ z[:, :, a:]  # (g, b - a, d - a): rows a..b of Z^T Z from the diagonal on
        out[:, a:b, a:] = row
        out[:, b:, a:b] = row[:, :, b - a:].transpose(1, 2)
    return out


@dataclass
class _Part:
    """One input tensor's contribution to a statistic: the sum of z z^T over its (kept) rows, or,
    while there are fewer rows than input dimensions, the rows themselves (for a Woodbury solve)."""

    count: int
    sum: torch.Tensor | None = None  # (groups, d, d); (d,) token counts for embeddings
    rows: torch.Tensor | None = None  # (groups, n, d) float32


@dataclass
class _Solver:
    """What ``step`` applies to the gradients of every layer of one shared statistic."""

    kind: str  # "cholesky" (factor of Sigma + lam I) | "inverse" | "woodbury" | "diagonal"
    a: torch.Tensor  # factor or inverse (groups, d, d) | the rows Z (groups, n, d) | 1 / (sigma + lam) (d,)
    b: torch.Tensor | None = None  # woodbury: Cholesky factor of Z Z^T + n lam I, (groups, n, n)
    lam: torch.Tensor | None = None  # woodbury: lam per group, (groups,)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "embedding"
    d_in: int  # per group for grouped convs; vocabulary size for embeddings
    groups: int = 1
    param: nn.Parameter | None = None  # the matrix preconditioned; None: module.weight
    out_rows: slice | None = None  # only these rows of param (one of q/k/v in nn.MultiheadAttention's packed in_proj_weight)
    transposed: bool = False  # param stores (d_in, d_out), as transformers' Conv1D does
    note: str = ""  # what coverage() adds after "covered: <kind>, d_in=..."
    family: str = ""  # how the coverage summary counts it; "" : kind
    parts: list = field(default_factory=list)  # [_Part] collected since the last step
    solver: _Solver | None = None  # shared by the layers of one statistic; dropped after use when update_every=1
    ema: torch.Tensor | None = None  # running second moment when stats="ema"
    damping: torch.Tensor | float = 0.0  # absolute damping lam of the current solver (a tensor until read)
    refreshed: bool = False  # a solver was built for this layer at least once
    condition: torch.Tensor | None = None  # cond(Sigma) at the last refresh with track_conditioning on
    source: object = None  # LoRA A (dropout 0): weakref to the adapter's parent input, of which x is a cast

    @property
    def weight(self) -> torch.Tensor:
        return self.param if self.param is not None else self.module.weight

    def grad_view(self) -> torch.Tensor | None:
        """The gradient as the paper's G (d_out rows; for convs the kernel dims still unflattened),
        a view into ``weight.grad``: writing into it rewrites the gradient in place."""
        grad = self.weight.grad
        if grad is None:
            return None
        if self.out_rows is not None:
            grad = grad[self.out_rows]
        return grad.T if self.transposed else grad


def _conv_input(module: nn.Module, x: torch.Tensor):
    """The input as (B, C, H, W), padded exactly as the module's forward pads it (a Conv1d is a Conv2d
    of height 1), with the kernel, stride, dilation and output size as (height, width) pairs."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # (B, C, 1, L)
        kernel, stride = (1, module.kernel_size[0]), (1, module.stride[0])
        dilation = (1, module.dilation[0])
        padding = (0, module.padding[0]) if not isinstance(module.padding, str) else None
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding if not isinstance(module.padding, str) else None
    if padding is None or module.padding_mode != "zeros":
        # 'same' padding (possibly asymmetric) and reflect/replicate/circular modes: pad exactly as
        # the module's own forward does, then unfold without padding.
        pad = module._reversed_padding_repeated_twice
        if isinstance(module, nn.Conv1d):
            pad = list(pad) + [0, 0]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
        padding = (0, 0)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out = tuple((x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))
    return x, kernel, stride, dilation, out


def _conv_rows(module: nn.Module, x: torch.Tensor, index=None, padded=None):
    """(rows per sample, an iterator of chunks of patches (rows, C_in * prod(kernel)) in the
    weight's column order). ``index=None``: every patch, unfolded whole samples per chunk;
    otherwise (sorted global row numbers, or a callable that gets the total row count and returns
    them or None) only those patches, gathered straight from the padded input without unfolding
    the rest (so a subsampled statistic costs what its rows cost). ``padded``: ``_conv_input``'s
    result for this input, if already computed."""
    x, kernel, stride, dilation, out = padded if padded is not None else _conv_input(module, x)
    per_sample = out[0] * out[1]
    if callable(index):
        index = index(x.shape[0] * per_sample)
    if index is not None:
        index = index.to(x.device)
        b, pos = index // per_sample, index % per_sample
        h = (pos // out[1] * stride[0])[:, None] + torch.arange(kernel[0], device=x.device) * dilation[0]  # (n, kh)
        w = (pos % out[1] * stride[1])[:, None] + torch.arange(kernel[1], device=x.device) * dilation[1]  # (n, kw)
        patches = x.permute(0, 2, 3, 1)[b[:, None, None], h[:, :, None], w[:, None, :]]  # (n, kh, kw, C)
        return per_sample, iter([patches.permute(0, 3, 1, 2).reshape(len(index), -1)])
    chunk = max(1, _UNFOLD_CHUNK_ELEMENTS // max(x[0:1].numel() * math.prod(kernel), 1))

    def chunks():
        # The patches as kh * kw strided slices of the padded input (F.unfold's im2col is several
        # times slower on CPU for these shapes); the same values in the same (C, kh, kw) order.
        for start in range(0, x.shape[0], chunk):
            xs = x[start : start + chunk].permute(0, 2, 3, 1)  # (b, H, W, C) view
            cols = torch.stack([xs[:, i * dilation[0] : i * dilation[0] + (out[0] - 1) * stride[0] + 1 : stride[0],
                                   j * dilation[1] : j * dilation[1] + (out[1] - 1) * stride[1] + 1 : stride[1]]
                                for i in range(kernel[0]) for j in range(kernel[1])], dim=-1)  # (b, oh, ow, C, kh*kw)
            yield cols.view(-1, cols.shape[3] * cols.shape[4])

    return per_sample, chunks()


@functools.lru_cache(maxsize=256)
def _shift_plan(kernel: tuple, dilation: tuple, out: tuple):
    """The products behind a stride-1 convolution's patch gram (``_shifted_conv_gram``): for each
    kernel offset difference (di, dj) of one half (the other half are transposes), the rows and
    columns of the padded input where some block of that difference starts and ends (its cells are
    the rectangles between them), the blocks (i, j) it serves, and the summed area of its cells."""
    (kh, kw), (dh, dw), (oh, ow) = kernel, dilation, out
    plan, area = [], 0
    for di in range(kh):
        for dj in range(-(kw - 1), kw):
            if di == 0 and dj < 0:
                continue
            rows_i = [i for i in range(kh) if i + di < kh]
            cols_j = [j for j in range(kw) if 0 <= j + dj < kw]
            rb = sorted({i * dh for i in rows_i} | {i * dh + oh for i in rows_i})
            cb = sorted({j * dw for j in cols_j} | {j * dw + ow for j in cols_j})
            plan.append((di, dj, rows_i, cols_j, rb, cb))
            area += (rb[-1] - rb[0]) * (cb[-1] - cb[0])
    cells = sum((len(rb) - 1) * (len(cb) - 1) for *_, rb, cb in plan)
    return plan, area, cells


def _shifted_conv_gram(x: torch.Tensor, kernel: tuple, dilation: tuple, out: tuple, groups: int) -> torch.Tensor:
    """Z^T Z of the patches of a stride-1 convolution, (groups, C/g * kh * kw, same), from the padded
    input x (B, C, H, W) without forming the patches. The block of kernel offsets (i, j), (i', j') sums
    x[u, v] x[u + a, v + b]^T over the output rectangle shifted by (i dh, j dw), with (a, b) =
    ((i' - i) dh, (j' - j) dw): it depends on (i, j) only through that rectangle. So each offset
    difference is one set of C x C products over the cells between the rectangles' edges, and each
    block the sum of its rectangle's cells: about (2 kh - 1)(2 kw - 1) / 2 products over the input
    instead of (kh kw)^2 over the patches (a 3x3 conv: 13 instead of 81). Written here: no library
    computes a conv's input second moment this way (KFAC libraries unfold the patches)."""
    cg = x.shape[1] // groups
    xs = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    kh, kw = kernel
    dh, dw = dilation
    gram = x.new_empty(groups, cg, kh, kw, cg, kh, kw)
    plan, _, _ = _shift_plan(tuple(kernel), tuple(dilation), tuple(out))
    for di, dj, rows_i, cols_j, rb, cb in plan:
        a, e = di * dh, dj * dw
        cells = {}
        for r0, r1 in zip(rb[:-1], rb[1:]):
            for c0, c1 in zip(cb[:-1], cb[1:]):
                left = xs[:, r0:r1, c0:c1].reshape(-1, groups, cg).transpose(0, 1)  # (g, rows, C/g)
                right = xs[:, r0 + a : r1 + a, c0 + e : c1 + e].reshape(-1, groups, cg).transpose(0, 1)
                cells[r0, c0] = left.transpose(1, 2) @ right  # (g, C/g, C/g)
        for i in rows_i:
            band = [r for r in rb[:-1] if i * dh <= r < i * dh + out[0]]
            for j in cols_j:
                block = sum(cells[r, q] for r in band for q in cb[:-1] if j * dw <= q < j * dw + out[1])
                gram[:, :, i, j, :, i + di, j + dj] = block
                if di or dj:
                    gram[:, :, i + di, j + dj, :, i, j] = block.transpose(1, 2)
    return gram.view(groups, cg * kh * kw, cg * kh * kw)


def _shifted_gram_flops(batch: int, c_per_group: int, groups: int, kernel, dilation, out) -> float:
    """The cost of ``_shifted_conv_gram`` in flops of one large product: its flops times
    ``_SHIFTED_GRAM_FLOP_COST``, and each of its small matmuls as ``_SHIFTED_GRAM_CALL_FLOPS`` more
    (their per-call overhead, which decides for small inputs)."""
    _, area, cells = _shift_plan(tuple(kernel), tuple(dilation), tuple(out))
    return _SHIFTED_GRAM_FLOP_COST * groups * 2.0 * batch * area * c_per_group**2 + cells * _SHIFTED_GRAM_CALL_FLOPS


def _gram_flops(rows: int, d: int, groups: int) -> float:
    """The flops of ``_gram_sym`` on ``rows`` rows of width ``d`` per group."""
    return groups * 2.0 * rows * d * d * ((_GRAM_BLOCKS + 1) / (2 * _GRAM_BLOCKS) if d >= _SPLIT_GRAM_MIN_D else 1.0)


class ActivationPreconditioner:
    """Collects each covered layer's input second moment and right-multiplies its weight gradient
    by the damped inverse.

    Usage::

        ap = ActivationPreconditioner(model)
        loss.backward(); ap.step(); optimizer.step()

    Args:
        model: the module whose layers to cover. Covered: ``nn.Linear`` (any leading dims),
            transformers' ``Conv1D`` (GPT-2's projections: a Linear with its weight stored (in, out);
            recognised by class name and shape, without importing transformers),
            ``nn.Conv1d``/``nn.Conv2d`` (unfolded patches; any stride, padding, dilation, padding
            mode; grouped convs get one block per group), ``nn.Embedding`` (diagonal token
            frequencies), ``nn.MultiheadAttention`` (the query, key and value rows of its input
            projection, each with the statistic of its own input, and out_proj), and so the A and
            B matrices of peft LoRA adapters (they are Linear layers). Frozen weights, weights
            shared between modules (tied embeddings), transposed convolutions and ``exclude``-d
            names are left to the GP alone; see :meth:`coverage`. Construction logs
            :meth:`coverage_summary` (logger ``"dopr"``, INFO) and warns (:class:`CoverageWarning`)
            when less than half of the trainable weight matrices' parameters are covered.
        damping: gamma; the absolute damping is ``gamma * trace(Sigma) / d_in`` (relative to the
            mean eigenvalue, so it does not depend on the width). In the convention where gamma
            multiplies trace(Sigma) itself, the same lam is ``gamma_trace = damping / d_in``.
        stats: "batch" (the paper's form: the second moment of the current batch) or "ema"
            (exponential moving average over refresh steps, decay ``ema_decay``).
        update_every: recompute statistics and solver every k steps and reuse the solver in
            between (inputs are collected only on refresh steps, so the other steps cost one
            matmul per layer).
        max_rows: at most this many rows per input and refresh enter Sigma, drawn uniformly
            without replacement (conv patches and long sequences have far more rows than d_in);
            ``None``: every row (the exact statistic).
        max_rows_per_dim: the same cap relative to the width, ``ceil(max_rows_per_dim * d_in)``
            rows; with both caps the smaller one holds. Default ``None``: with ``max_rows=None``,
            every row, the paper's exact per-batch statistic. 8 is the cheapest value whose median
            relative error of the preconditioned gradient over the layers stays within 10% of every
            row's on the suite's conv U-Nets (docs/benchmark.md, "Row subsampling"); it was the
            default until issue 42 and the suite's configs set it explicitly. A stride-1 conv whose exact
            statistic costs fewer flops from shifted products of its input than from its (capped)
            patch rows takes the exact one that way (docs/benchmark.md, "The shifted conv gram").
        solver: "auto" (the Woodbury identity when a statistic has fewer rows than d_in, which
            needs ``damping > 0``, ``stats="batch"`` and no all-reduce; the d x d Cholesky
            otherwise) or "dense" (always the d x d Cholesky).
        seed: seed of the row-subsampling generator (its state is in ``state_dict``).
        stats_precision: "float32" (default) or "bfloat16": the rows are rounded to bfloat16 before
            their products are summed in float32 (on CUDA one bf16 tensor-core matmul with a
            float32 output; elsewhere the same arithmetic emulated in float32). TF32 for the
            float32 matmuls follows torch's own switch (``torch.backends.cuda.matmul.allow_tf32``).
        embeddings: cover ``nn.Embedding`` layers.
        exclude: module names (exact, or a prefix followed by ".") to leave uncovered.
        distributed: "auto" (all-reduce the statistics when ``torch.distributed`` is initialised
            with more than one rank), True or False.
        process_group: the group to all-reduce over (default: the world).
        strict: raise ``ValueError`` instead of the ``CoverageWarning`` when most of the trainable
            weight-matrix parameters would be left uncovered.

    Statistics and solves run in float32 whatever the model's dtype. Inputs are collected only
    while a module is in training mode with autograd enabled (never in eval or ``no_grad``
    rollouts). Several forward passes before one ``step`` (gradient accumulation, activation
    checkpointing) pool their rows. With ``update_every=1`` nothing of size d x d is kept between
    steps: the Cholesky factor solves against the gradients and is dropped. Layers that read the
    same tensor share one statistic and one solve (q/k/v, gate/up), and so do peft LoRA A matrices
    whose adapters read the same hidden state with dropout 0, even when peft casts that state to
    the adapters' dtype separately for each (a bf16 base with float32 adapters).
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1.0,
        stats: str = "batch",
        ema_decay: float = 0.95,
        update_every: int = 1,
        max_rows: int | None = None,
        max_rows_per_dim: float | None = None,
        solver: str = "auto",
        seed: int = 0,
        stats_precision: str = "float32",
        embeddings: bool = True,
        exclude: tuple[str, ...] | list[str] = (),
        distributed: bool | str = "auto",
        process_group=None,
        strict: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ActivationPreconditioner needs an nn.Module, got {type(model).__name__}")
        if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0 (gamma relative to the mean eigenvalue), got {damping!r}")
        if stats not in ("batch", "ema"):
            raise ValueError(f"stats must be 'batch' or 'ema', got {stats!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if not (isinstance(update_every, int) and update_every >= 1):
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if max_rows is not None and not (isinstance(max_rows, int) and max_rows >= 1):
            raise ValueError(f"max_rows must be None (every row) or an integer >= 1, got {max_rows!r}")
        if max_rows_per_dim is not None and not (isinstance(max_rows_per_dim, (int, float)) and max_rows_per_dim > 0):
            raise ValueError(f"max_rows_per_dim must be None (every row) or a number > 0, got {max_rows_per_dim!r}")
        if solver not in ("auto", "dense"):
            raise ValueError(f"solver must be 'auto' (Woodbury when rows < d_in) or 'dense', got {solver!r}")
        if stats_precision not in ("float32", "bfloat16"):
            raise ValueError(f"stats_precision must be 'float32' or 'bfloat16', got {stats_precision!r}")
        if distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
        self.damping = float(damping)
        self.stats = stats
        self.ema_decay = float(ema_decay)
        self.update_every = update_every
        self.max_rows = max_rows
        self.max_rows_per_dim = max_rows_per_dim
        self.solver = solver
        self.stats_precision = stats_precision
        self.distributed = distributed
        self.process_group = process_group
        self.steps = 0
        self.fallbacks = {k: 0 for k in FALLBACK_KINDS}
        # Compute cond(Sigma) per statistic at refreshes while True (one eigvalsh per statistic);
        # the training loop turns it on for the steps it logs, not every step.
        self.track_conditioning = False
        # Wall seconds those diagnostics took (host time: on a GPU it counts the launches): a training loop that
        # times its steps subtracts them, as they are logging, not training (experiments/train.py).
        self.diagnostic_seconds = 0.0
        self.layers: list[_Layer] = []
        self.uncovered: dict[str, str] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._cache: dict = {}  # per step: statistics of input tensors already seen (shared inputs)
        self._mask: tuple | None = None  # (shape, flat indices of the kept positions) inside row_mask()
        self._paused = False  # inside paused(): no forward enters a statistic
        self._merged: dict = {}  # per step: (previous part, new part) -> their merge, shared by layers that shared both
        self._handles = []
        self._tied_names: list[str] = []
        self._warned_tap = False
        self._discover(model, embeddings, tuple(exclude))
        try:
            self._report_coverage(strict)
        except ValueError:
            self.remove()  # strict: leave the model without hooks
            raise

    @contextlib.contextmanager
    def row_mask(self, mask: torch.Tensor):
        """Inside this block, rows at positions where ``mask`` is False never enter a statistic::

            with ap.row_mask(attention_mask):   # (batch, tokens), True on real tokens
                loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss

        Padding gets no loss gradient, so its rows should not weigh in Sigma. The mask applies to
        every Linear input whose leading dims are ``mask.shape`` and every Embedding input of that
        shape; other inputs (convs, pooled features) are unaffected. Costs one host-device sync on
        entry (the kept positions are counted once)."""
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            mask = mask != 0
        previous = self._mask
        self._mask = (tuple(mask.shape), mask.reshape(-1).nonzero().squeeze(1))
        try:
            yield self
        finally:
            self._mask = previous

    @contextlib.contextmanager
    def paused(self):
        """Inside this block no forward enters a statistic. Run ``backward`` in it when the model uses
        activation checkpointing::

            loss = model(batch)            # non-reentrant checkpointing: this forward counts the rows
            with ap.paused():
                loss.backward()            # the recomputed forward inside backward does not count them again

        (Reentrant checkpointing runs its first forward without gradients, which AP ignores, so it
        would see no rows at all: use ``use_reentrant=False``.)"""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    def _masked_rows(self, x: torch.Tensor, lead: tuple) -> torch.Tensor | None:
        """The flat indices of the kept positions when a row mask applies to an input of these
        leading dims, else None."""
        if self._mask is None or lead != self._mask[0]:
            return None
        return self._mask[1].to(x.device)

    # ------------------------------------------------------------------ discovery and hooks
    def _discover(self, model, embeddings, exclude):
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)

        def excluded(*names):
            return any(n == e or n.startswith(e + ".") for n in names for e in exclude)

        def why_not(name: str, weight: nn.Parameter, path: str):
            """(group, reason) for a weight (``path``: its qualified name) of a supported layer that is
            still left to the GP, or None."""
            if excluded(name, path):
                return "excluded", "excluded by the caller"
            if not weight.requires_grad:
                return "frozen", "frozen (requires_grad=False)"
            if len(owners.get(id(weight), ())) > 1:
                others = ", ".join(o for o in owners[id(weight)] if o != path)
                return "tied", (f"weight shared with {others} (tied): its gradient is the sum of two layers' gradients, each "
                                "from its own input, and no one Sigma preconditions that sum")
            return None

        self._matrix_status: dict[int, tuple] = {}  # id(param) -> (numel, trainable, group or None if covered, name)
        handled: set[int] = set()  # modules covered as part of another (nn.MultiheadAttention's out_proj)
        for name, module in model.named_modules():
            if id(module) in handled:
                continue
            if isinstance(module, nn.MultiheadAttention):
                handled.add(id(module.out_proj))
                self._discover_attention(name, module, why_not)
                continue
            weight = module._parameters.get("weight")  # its own parameter, not a wrapper's alias of a child's
            if not isinstance(weight, nn.Parameter):
                continue
            kind, transposed, note, family = None, False, "", ""
            if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
                kind, d_in, groups = "linear", module.in_features, 1
            elif _is_transformers_conv1d(module):
                # x @ W + b with W stored (d_in, d_out): a Linear whose G is weight.grad transposed
                kind, d_in, groups, transposed = "linear", module.nx, 1, True
                note, family = " (transformers Conv1D: a linear layer, weight stored (in, out))", "transformers Conv1D"
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
                kind, groups = "conv", module.groups
                d_in = module.in_channels // groups * math.prod(module.kernel_size)
            elif isinstance(module, nn.Embedding):
                kind, d_in, groups = "embedding", module.num_embeddings, 1
            if kind is None and weight.ndim < 2:
                continue  # norm gains: the GP alone, nothing to report
            if kind is None:
                problem = ("unsupported " + type(module).__name__, _unsupported_reason(module))
            else:
                problem = why_not(name, weight, f"{name}.weight" if name else "weight")
                if problem is None and kind == "embedding" and not embeddings:
                    problem = "embeddings=False", "embeddings=False"
                elif problem is None and kind == "embedding" and module.sparse:
                    problem = "sparse embedding", "sparse embedding gradients are not supported"
            if problem is not None:
                self._leave(name, weight, *problem)
                continue
            layer = _Layer(name=name, module=module, kind=kind, d_in=d_in, groups=groups, param=weight, transposed=transposed,
                           note=note, family=family)
            self._cover(layer)
            self._handles.append(module.register_forward_pre_hook(self._make_hook(layer)))
            parent = self._lora_parent(model, name)
            if parent is not None:
                self._handles.append(parent.register_forward_pre_hook(self._make_source_hook(layer)))
        # Matrices that are no layer's weight (a bare nn.Parameter: position tables, class tokens, ...).
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim >= 2 and id(p) not in self._matrix_status:
                    self._leave(f"{name}.{pname}" if name else pname, p, "not a layer weight",
                                f"a bare parameter of {type(module).__name__}, not the weight of a layer whose input AP sees"
                                if p.requires_grad else "frozen (requires_grad=False)")
        if not self.layers:
            raise ValueError(
                "ActivationPreconditioner found no layer to cover (Linear, transformers Conv1D, Conv1d, Conv2d, Embedding, "
                "nn.MultiheadAttention with a trainable, untied weight); uncovered: "
                + (", ".join(f"{k}: {v}" for k, v in self.uncovered.items()) or "none")
            )

    def _cover(self, layer: _Layer) -> None:
        self.layers.append(layer)
        status = self._matrix_status.get(id(layer.weight))
        if status is None or status[2] is None:  # a packed in_proj_weight is covered when its parts are
            self._matrix_status[id(layer.weight)] = (layer.weight.numel(), True, None, layer.name)

    def _leave(self, name: str, param: nn.Parameter, group: str, reason: str) -> None:
        """Record a matrix left to the GP alone: ``coverage()``'s line and the summary's group."""
        self.uncovered[name] = reason
        if reason.startswith("frozen"):
            group = "frozen"
        if id(param) not in self._matrix_status:  # a tied weight counts once
            self._matrix_status[id(param)] = (param.numel(), param.requires_grad, group, name)
        if group == "tied":  # list both modules of a tied weight under "tied"
            self._tied_names.append(name)

    def _discover_attention(self, name: str, module: nn.MultiheadAttention, why_not) -> None:
        """nn.MultiheadAttention: its forward reads the projection weights itself (F.multi_head_attention_forward),
        so one pre-hook on the attention sees query, key and value: the query rows of the packed in_proj_weight
        (or q_proj_weight) get the query's statistic, the key and value rows theirs (one shared statistic under
        self-attention, where the three are one tensor). out_proj's forward is never called: its input (the
        heads' concatenated outputs) is captured from the F.linear call that applies out_proj.weight inside
        that forward (_LinearTap)."""
        out_layer, parts = None, {}
        prefix = f"{name}." if name else ""
        if type(module).forward is not nn.MultiheadAttention.forward:
            reason = f"{type(module).__name__} overrides nn.MultiheadAttention.forward, so which inputs meet which weights is unknown"
            for pname, p in list(module.named_parameters(recurse=False)) + [("out_proj", module.out_proj.weight)]:
                if p.ndim >= 2:
                    self._leave(prefix + pname, p, "unsupported " + type(module).__name__, reason)
            return
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            specs = [(role, module.in_proj_weight, slice(i * e, (i + 1) * e), f"{prefix}in_proj_weight[{role}]", e)
                     for i, role in enumerate(("query", "key", "value"))]
        else:
            specs = [(role, getattr(module, f"{role[0]}_proj_weight"), None, f"{prefix}{role[0]}_proj_weight", d)
                     for role, d in (("query", e), ("key", module.kdim), ("value", module.vdim))]
        for role, weight, rows, lname, d_in in specs:
            problem = why_not(lname, weight, lname.partition("[")[0])
            if problem is not None:
                self._leave(lname, weight, *problem)
                continue
            parts[role] = _Layer(name=lname, module=module, kind="linear", d_in=d_in, param=weight, out_rows=rows,
                                 note=f" (nn.MultiheadAttention {role} projection)", family="MultiheadAttention projection")
            self._cover(parts[role])
        out = module.out_proj
        problem = why_not(prefix + "out_proj", out.weight, prefix + "out_proj.weight")
        if problem is not None:
            self._leave(prefix + "out_proj", out.weight, *problem)
        else:
            out_layer = _Layer(name=prefix + "out_proj", module=out, kind="linear", d_in=out.in_features, param=out.weight,
                               note=" (nn.MultiheadAttention out_proj: input captured inside the attention's forward)",
                               family="MultiheadAttention projection")
            self._cover(out_layer)
        if parts or out_layer is not None:
            pre, post = self._make_attention_hooks(parts, out_layer)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def _collecting(self, module: nn.Module) -> bool:
        return not self._paused and module.training and torch.is_grad_enabled() and self.steps % self.update_every == 0

    def _make_attention_hooks(self, parts: dict, out_layer):
        taps = []  # the tap of the forward in progress (a stack: an attention may run inside another's forward)

        def pre(module, args, kwargs):
            # A module does not run inside its own forward: a tap still open here was left by a forward whose
            # post-hook never ran (an exception torch did not route to it); close it before it captures more.
            while taps:
                stale = taps.pop()
                if stale is not None:
                    stale.close()
            taps.append(None)
            if not self._collecting(module):
                return
            inputs = [args[i] if len(args) > i else kwargs.get(role) for i, role in enumerate(("query", "key", "value"))]
            if not all(isinstance(x, torch.Tensor) for x in inputs):
                return
            # (batch, length, E) whatever batch_first says, so a row_mask of (batch, length) applies; one view
            # per distinct tensor, so self-attention's query, key and value share one statistic.
            views = {}
            for role, x in zip(("query", "key", "value"), inputs):
                if id(x) not in views:
                    views[id(x)] = x.transpose(0, 1) if x.dim() == 3 and not module.batch_first else x
                if role in parts:
                    self._add_part(parts[role], self._input_stats(parts[role], views[id(x)]))
            if out_layer is not None:
                q = inputs[0]
                length = q.shape[1 if q.dim() == 3 and module.batch_first else 0]

                def capture(a):  # (length * batch, E), length-major: F.multi_head_attention_forward's layout
                    a = a.view(length, -1, a.shape[-1]).transpose(0, 1)
                    self._add_part(out_layer, self._input_stats(out_layer, a.squeeze(0) if q.dim() == 2 else a))

                taps[-1] = _LinearTap(module.out_proj.weight, capture)

        def post(module, args, kwargs, output):
            tap = taps.pop() if taps else None
            if tap is not None:
                tap.close()
                if not tap.fired and isinstance(output, tuple) and not self._warned_tap:  # a forward that returned
                    self._warned_tap = True
                    warnings.warn(f"{out_layer.name}: AP saw no input for this nn.MultiheadAttention out_proj and leaves its "
                                  "gradient as is. Its input is read where the attention's forward calls "
                                  "torch.nn.functional.linear on out_proj.weight; torch.compile traces that forward without "
                                  "the call (run the attention uncompiled to cover it), or this torch version computes it "
                                  "another way", CoverageWarning, stacklevel=2)

        return pre, post

    # ------------------------------------------------------------------ the coverage summary
    def coverage_summary(self) -> str:
        """One line: the covered layers and their share of the trainable weight matrices' parameters,
        then what is left to the GP alone, grouped by reason (logged at construction)."""
        trainable = [st for st in self._matrix_status.values() if st[1]]
        total = sum(st[0] for st in trainable)
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.family or layer.kind] = kinds.get(layer.family or layer.kind, 0) + 1
        text = (f"DoPr activation preconditioning covers {len(self.layers)} layers "
                f"({', '.join(f'{n} {k}' for k, n in kinds.items())}): {self.covered_fraction:.1%} of the "
                f"{total:,} parameters of the trainable weight matrices")
        groups: dict[str, list] = {}
        for numel, trainable_, group, name in self._matrix_status.values():
            if group is not None:
                groups.setdefault(group, []).append((name, numel))
        if not groups:
            return text + "; nothing left to the gradient preconditioner alone"
        out = []
        for group, items in groups.items():
            names = [n for n, _ in items] if group != "tied" else self._tied_names
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            params = sum(n for _, n in items)
            out.append(f"{group}: {shown} ({params:,} parameters{', not trained' if group == 'frozen' else ''})")
        return text + "; left to the gradient preconditioner alone: " + "; ".join(out) + " (details: coverage())"

    @property
    def covered_fraction(self) -> float:
        """Share of the trainable weight matrices' parameters (every >= 2-D parameter with
        requires_grad, a tied one counted once) whose gradient AP preconditions."""
        trainable = [st for st in self._matrix_status.values() if st[1]]
        total = sum(st[0] for st in trainable)
        return sum(st[0] for st in trainable if st[2] is None) / total if total else 0.0

    def _report_coverage(self, strict: bool) -> None:
        summary = self.coverage_summary()
        logger.info(summary)
        if self.covered_fraction >= MIN_COVERED_FRACTION:
            return
        message = (f"{summary}. Most of the trainable weight-matrix parameters get no activation preconditioning, "
                   "so DoPr is close to its base optimizer on this model. Layers AP covers: nn.Linear, transformers "
                   "Conv1D, nn.Conv1d/Conv2d, nn.Embedding, nn.MultiheadAttention (docs/dopr.md, \"Layers covered\"); "
                   "pass strict=True to make this an error.")
        if strict:
            raise ValueError(message.replace("pass strict=True to make this an error.",
                                             "strict=True: replace the uncovered layers by covered ones, or pass strict=False to go on anyway."))
        warnings.warn(message, CoverageWarning, stacklevel=_caller_stacklevel())

    @staticmethod
    def _lora_parent(model: nn.Module, name: str):
        """The peft LoRA layer whose ``lora_A[adapter]`` this is, when that adapter's dropout is the
        identity (its input is then exactly the parent's input, possibly cast to another dtype)."""
        parts = name.rsplit(".", 2)
        if len(parts) != 3 or parts[1] != "lora_A":
            return None
        parent = model.get_submodule(parts[0])
        dropout = getattr(parent, "lora_dropout", None)
        if isinstance(dropout, nn.ModuleDict) and isinstance(dropout[parts[2]] if parts[2] in dropout else None, nn.Identity):
            return parent
        return None

    def _make_source_hook(self, layer: _Layer):
        def hook(module, args):
            x = args[0] if args else None
            layer.source = weakref.ref(x) if isinstance(x, torch.Tensor) else None

        return hook

    def _make_hook(self, layer: _Layer):
        def hook(module, args):
            if self._paused or not (module.training and torch.is_grad_enabled()) or self.steps % self.update_every:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            self._add_part(layer, self._input_stats(layer, x))

        return hook

    def _add_part(self, layer: _Layer, part: _Part) -> None:
        """Fold a new input's statistic into the layer's: each layer holds one part however many
        forwards a step has (micro-batches), so memory stays that of one statistic (d x d, or the
        rows while there are fewer than d). Layers that shared both parts share the merged one."""
        if not layer.parts:
            layer.parts.append(part)
            return
        previous = layer.parts[-1]
        hit = self._merged.get((id(previous), id(part)))
        if hit is not None and hit[0]() is previous and hit[1]() is part:
            layer.parts[-1] = hit[2]
            return
        count = previous.count + part.count
        if previous.rows is not None and part.rows is not None and count < layer.d_in:
            merged = _Part(count=count, rows=torch.cat([previous.rows, part.rows], dim=1))
        else:
            def as_sum(p):
                return p.sum if p.sum is not None else _gram_sym(p.rows)

            merged = _Part(count=count, sum=as_sum(previous) + as_sum(part))
        self._merged[(id(previous), id(part))] = (weakref.ref(previous), weakref.ref(part), merged)
        layer.parts[-1] = merged

    def _row_cap(self, d: int) -> int | None:
        caps = [c for c in (self.max_rows, None if self.max_rows_per_dim is None else math.ceil(self.max_rows_per_dim * d)) if c]
        return min(caps) if caps else None

    def _draw(self, n: int, cap: int, device: torch.device) -> torch.Tensor:
        """``cap`` of the row indices 0..n-1, uniformly without replacement, sorted, on ``device``.
        Drawn on the CPU generator (its state is in ``state_dict``) and copied from pinned memory
        without blocking, so subsampling adds no host-device sync."""
        index = torch.randperm(n, generator=self._generator)[:cap].sort().values
        if device.type == "cuda":
            return index.pin_memory().to(device, non_blocking=True)
        return index.to(device)

    def _woodbury_possible(self) -> bool:
        return self.solver == "auto" and self.damping > 0 and self.stats == "batch" and not self._use_distributed()

    def _input_stats(self, layer: _Layer, x: torch.Tensor) -> _Part:
        """The statistic of this input, computed once per input tensor: q/k/v projections (or
        gate/up) that read the same tensor share one statistic and one solve."""
        module = layer.module
        if layer.kind == "conv":
            signature = ("conv", type(module), module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.padding_mode)
        else:
            signature = (layer.kind, layer.d_in)
        # A LoRA A matrix's input is a cast of its parent's input: key it by that tensor, so the
        # adapters of q/k/v (gate/up) share one statistic whatever dtype peft casts to.
        source = layer.source() if layer.source is not None else None
        anchor = source if source is not None and source.shape == x.shape else x
        key = (id(anchor), anchor._version, signature, x.dtype, None if self._mask is None else id(self._mask[1]))
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is anchor:
            return hit[1]
        ref, x = weakref.ref(anchor), x.detach()
        g, d = layer.groups, layer.d_in
        with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():  # meta: scripts/estimate_memory.py
            if layer.kind == "embedding":
                flat = x.reshape(-1)
                kept = self._masked_rows(x, tuple(x.shape))
                if kept is not None:
                    flat = flat.index_select(0, kept)
                # scatter_add, not bincount: CUDA's bincount reads the largest index back (a sync)
                counts = torch.zeros(d, dtype=torch.float32, device=flat.device)
                part = _Part(count=flat.numel(), sum=counts.scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device)))
            else:
                if layer.kind == "linear":
                    rows = x.reshape(-1, x.shape[-1])
                    kept = self._masked_rows(x, tuple(x.shape[:-1]))
                    if kept is not None:
                        rows = rows.index_select(0, kept)
                    cap = self._row_cap(d)
                    if cap is not None and rows.shape[0] > cap:
                        rows = rows.index_select(0, self._draw(rows.shape[0], cap, rows.device))
                    part = self._accumulate([rows], g, d)
                else:
                    cap = self._row_cap(d)
                    padded = _conv_input(module, x)
                    xp, kernel, stride, dilation, out = padded
                    n = xp.shape[0] * out[0] * out[1]
                    shifted = math.inf if tuple(stride) != (1, 1) else \
                        _shifted_gram_flops(xp.shape[0], d // (kernel[0] * kernel[1]), g, kernel, dilation, out)
                    if n < d and self._woodbury_possible():  # Woodbury (Z Z^T and its factor) against the d x d route
                        cheaper = shifted + g * d**3 / 3 < g * (2.0 * n * n * d + n**3 / 3)
                    else:  # the gram of the unfolded (or subsampled) rows
                        cheaper = shifted < _gram_flops(n if cap is None else min(n, cap), d, g)
                    if cheaper:
                        # every patch's product, exact, for fewer flops than the unfolded (or subsampled) rows
                        z = xp.to(torch.bfloat16).float() if self.stats_precision == "bfloat16" else xp.float()
                        part = _Part(count=n, sum=_shifted_conv_gram(z, kernel, dilation, out, g))
                    else:  # rows are drawn once their count is known: one pass over the input
                        draw = None if cap is None else (lambda total: self._draw(total, cap, x.device) if total > cap else None)
                        _, chunks = _conv_rows(module, x, draw, padded)
                        part = self._accumulate(chunks, g, d)
        self._cache[key] = (ref, part)
        return part

    def _gram(self, blocks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Z^T Z per group, float32. With bfloat16 statistics on CUDA: one bf16 matmul with a float32
        output (``blocks`` holds the same bf16-rounded values in float32 for the other paths)."""
        if self.stats_precision == "bfloat16" and rows.is_cuda:
            z = rows.view(rows.shape[0], -1, blocks.shape[-1]).transpose(0, 1)
            return torch.bmm(z.transpose(1, 2), z, out_dtype=torch.float32)
        return _gram_sym(blocks)

    def _accumulate(self, chunks, g: int, d: int) -> _Part:
        total, kept, count = None, [], 0
        woodbury = self._woodbury_possible()
        for rows in chunks:
            if self.stats_precision == "bfloat16":
                rows = rows.to(torch.bfloat16)
            blocks = rows.float().view(rows.shape[0], g, d).transpose(0, 1)  # (g, n, d)
            count += rows.shape[0]
            if woodbury and count < d:
                kept.append(blocks)
                continue
            if kept:  # more rows than d_in after all: fold the kept rows into the sum
                blocks = torch.cat(kept + [blocks], dim=1)
                kept = []
            s = self._gram(blocks, rows)
            total = s if total is None else total + s
        if kept:
            rows = kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)
            if total is None:
                return _Part(count=count, rows=rows)
            total = total + _gram_sym(rows)
        return _Part(count=count, sum=total)

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self) -> None:
        """Rewrite each covered layer's ``weight.grad`` in place to ``G (Sigma + lam I)^-1``."""
        if self.steps % self.update_every == 0:
            self._refresh()
        by_solver: dict[int, list[_Layer]] = {}
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is None or layer.solver is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{layer.name}: sparse gradients are not supported by AP")
            by_solver.setdefault(id(layer.solver), []).append(layer)
        for members in by_solver.values():
            self._apply(members[0].solver, members)
        if self.update_every == 1:  # nothing of size d x d stays between steps
            for layer in self.layers:
                layer.solver = None
        self.steps += 1
        self.reset_stats()

    @staticmethod
    def _apply(solver: _Solver, members: list[_Layer]) -> None:
        """Precondition the gradients of every layer of one statistic in one batched solve."""
        if solver.kind == "diagonal":
            for layer in members:
                grad = layer.weight.grad
                grad.copy_(grad.float() * solver.a[:, None])
            return
        g, d = members[0].groups, members[0].d_in
        views = [layer.grad_view() for layer in members]
        blocks = [view.float().reshape(g, -1, d) for view in views]  # (g, out_i, d)
        grad = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if solver.kind == "cholesky" and grad.shape[1] > d:
            # More output rows than d_in (a head, q/k/v or gate/up together): forming the inverse
            # (~2.5 Choleskys) and one matmul beats two triangular solves (3x faster on CPU for
            # 1360 x 256); the inverse is dropped after use like the factor.
            out = grad @ torch.cholesky_inverse(solver.a)
        elif solver.kind == "cholesky":
            out = torch.cholesky_solve(grad.transpose(1, 2), solver.a).transpose(1, 2)
        elif solver.kind == "inverse":
            out = grad @ solver.a
        else:  # woodbury: (Z^T Z / n + lam I)^-1 = (I - Z^T (Z Z^T + n lam I)^-1 Z) / lam
            z = solver.a
            y = torch.cholesky_solve((grad @ z.transpose(1, 2)).transpose(1, 2), solver.b)  # (g, n, out)
            out = (grad - y.transpose(1, 2) @ z) / solver.lam[:, None, None]
        start = 0
        for view, block in zip(views, blocks):
            view.copy_(out[:, start : start + block.shape[1]].reshape(view.shape))
            start += block.shape[1]

    def reset_stats(self) -> None:
        """Drop the inputs collected since the last step (e.g. after skipping a non-finite step)."""
        for layer in self.layers:
            layer.parts.clear()
            layer.source = None
        self._cache.clear()
        self._merged.clear()

    def _refresh(self) -> None:
        # Group layers that saw exactly the same inputs: one statistic, one solver.
        groups: dict[tuple, list[_Layer]] = {}
        for layer in self.layers:
            if layer.parts:
                groups.setdefault(tuple(id(p) for p in layer.parts), []).append(layer)
        entries = []
        for members in groups.values():
            parts, lead = members[0].parts, members[0]
            count = sum(p.count for p in parts)
            if all(p.rows is not None for p in parts) and count < lead.d_in and self._woodbury_possible():
                rows = parts[0].rows if len(parts) == 1 else torch.cat([p.rows for p in parts], dim=1)
                entries.append({"members": members, "rows": rows, "count": float(count)})
                continue
            total = None
            for p in parts:
                s = p.sum if p.sum is not None else _gram_sym(p.rows)
                total = s if total is None else total + s
            entries.append({"members": members, "sum": total, "count": float(count)})
        if self._use_distributed():
            self._all_reduce(entries)
        for e in entries:
            if "sum" in e:
                sigma = e["sum"] / e["count"]
                lead = e["members"][0]
                if self.stats == "ema":
                    if lead.ema is not None:
                        sigma = self.ema_decay * lead.ema + (1.0 - self.ema_decay) * sigma
                    for layer in e["members"]:
                        layer.ema = sigma
                e["sigma"] = sigma
        self._solve(entries)

    def _solve(self, entries: list[dict]) -> None:
        """Factor every statistic (batched over statistics of one width), check them all with one
        host-device sync, and hand the few that fail to the float64/eigh fallbacks."""
        checks = []  # (entry, ok flag tensor (scalar bool), builder)
        dense: dict[int, list[dict]] = {}
        for e in entries:
            lead = e["members"][0]
            if lead.kind == "embedding":
                sigma = e["sigma"]
                mean = sigma.sum() / sigma.shape[0]
                lam = self.damping * mean
                floor = torch.maximum(lam, MIN_RELATIVE_EIGENVALUE * mean)
                e["solver"] = _Solver("diagonal", 1.0 / (sigma + lam).clamp(min=floor))
                e["lam"] = lam
                checks.append((e, torch.isfinite(mean) & (mean > 0)))
            elif "rows" in e:
                z, n = e["rows"], e["count"]
                mean = z.square().sum((1, 2)) / (n * lead.d_in)  # trace(Sigma) / d per group
                lam = self.damping * mean
                k = z @ z.transpose(1, 2) + (n * lam)[:, None, None] * torch.eye(z.shape[1], device=z.device)
                chol, info = torch.linalg.cholesky_ex(k)
                pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
                ok = (info == 0).all() & (mean > 0).all() & torch.isfinite(chol).all() & (pivots >= 0.5 * (n * lam)[:, None]).all()
                e["solver"], e["lam"] = _Solver("woodbury", z, chol, lam), lam
                checks.append((e, ok))
            else:
                dense.setdefault(e["sigma"].shape[-1], []).append(e)
        for d, group in dense.items():  # one batched Cholesky per width
            a = torch.cat([e["sigma"] for e in group])  # (sum of groups, d, d), a copy: Sigma + lam I is formed in place
            mean = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1) / d
            lam = self.damping * mean
            floor = torch.maximum(lam, MIN_RELATIVE_EIGENVALUE * mean)
            torch.diagonal(a, dim1=-2, dim2=-1).add_(lam[:, None])
            chol, info = torch.linalg.cholesky_ex(a)
            # A pivot of an exact Cholesky is at least the smallest eigenvalue (>= lam); a smaller
            # computed pivot means rounding has taken over, so the result is not trusted.
            pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
            # A NaN or inf anywhere in a row of the factor reaches that row's pivot, so finite
            # pivots mean a finite factor (no pass over all d x d entries).
            good = (info == 0) & (mean > 0) & torch.isfinite(pivots).all(1) & (pivots >= 0.5 * floor[:, None]).all(1)
            start = 0
            for e in group:
                size = e["sigma"].shape[0]
                part = slice(start, start + size)
                factor = chol[part]
                e["lam"] = lam[part]
                e["solver"] = (_Solver("cholesky", factor) if self.update_every == 1
                               else _Solver("inverse", torch.cholesky_inverse(factor)))
                checks.append((e, good[part].all()))
                start += size
        if not checks:
            return
        oks = torch.stack([ok for _, ok in checks]).tolist()  # the one host-device sync of a refresh
        for (e, _), ok in zip(checks, oks):
            solver, lam = (e["solver"], e["lam"]) if ok else self._fallback(e)
            if solver is None:
                continue
            if self.track_conditioning:
                t0 = time.perf_counter()
                cond = self._condition(e)
                self.diagnostic_seconds += time.perf_counter() - t0
            for layer in e["members"]:
                layer.solver, layer.damping, layer.refreshed = solver, lam, True
                if self.track_conditioning:
                    layer.condition = cond

    def _condition(self, e: dict) -> torch.Tensor:
        """cond(Sigma) of one statistic (undamped), inf where it is singular."""
        if "rows" in e:  # fewer rows than d_in: singular
            return torch.tensor(math.inf)
        sigma = e["sigma"].double()
        evals = sigma if e["members"][0].kind == "embedding" else torch.linalg.eigvalsh(sigma).flatten()
        floor = MIN_RELATIVE_EIGENVALUE * evals.clamp(min=0).mean()
        return torch.where(evals.min() > floor, evals.max() / evals.min(), torch.tensor(math.inf, dtype=evals.dtype))

    def _fallback(self, e: dict):
        """The slow path for a statistic whose float32 factorisation failed: float64 Cholesky, then
        eigh with eigenvalues clamped, then the previous solver (update_every > 1) or none."""
        lead = e["members"][0]
        if "rows" in e:  # a Woodbury system that failed: go through the d x d matrix instead
            e["sigma"] = e["rows"].transpose(1, 2) @ e["rows"] / e["count"]
        sigma = e["sigma"]
        if not torch.isfinite(sigma.sum()):  # a NaN or inf anywhere makes the sum non-finite
            self.fallbacks["nonfinite_stats"] += 1
            return self._keep_previous(lead)
        d = sigma.shape[-1]
        if lead.kind == "embedding":
            return self._keep_previous(lead)  # mean <= 0: no token seen
        mean = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1) / d  # (groups,)
        if not (mean > 0).all():
            return self._keep_previous(lead)
        lam = self.damping * mean
        floor = torch.maximum(lam, MIN_RELATIVE_EIGENVALUE * mean)
        a = (sigma + lam[:, None, None] * torch.eye(d, device=sigma.device, dtype=torch.float32)).double()
        chol, info = torch.linalg.cholesky_ex(a)
        pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
        if (info == 0).all() and (pivots >= 0.5 * floor.double()[:, None]).all():
            inverse = torch.cholesky_inverse(chol).float()
            if torch.isfinite(inverse.sum()):
                self.fallbacks["float64"] += 1
                return _Solver("inverse", inverse), lam
        evals, evecs = torch.linalg.eigh(a)
        if torch.isfinite(evals).all() and (evals.amax(-1) > 0).all():
            evals = evals.clamp(min=floor.double()[:, None])
            inverse = ((evecs / evals[:, None, :]) @ evecs.transpose(-1, -2)).float()
            if torch.isfinite(inverse).all():
                self.fallbacks["eigh"] += 1
                return _Solver("inverse", inverse), lam
        return self._keep_previous(lead)

    def _keep_previous(self, layer: _Layer):
        self.fallbacks["previous" if layer.solver is not None else "skipped"] += 1
        return layer.solver, layer.damping

    def _use_distributed(self) -> bool:
        if self.distributed is False:
            return False
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise RuntimeError("distributed=True but torch.distributed is not initialised: call init_process_group first")
        return ready and dist.get_world_size(self.process_group) > 1

    def _all_reduce(self, entries: list[dict]) -> None:
        # Sums and row counts are added over ranks, so Sigma is the second moment of the global
        # batch and every rank solves the same system. One flat buffer, one collective.
        if not entries:
            raise RuntimeError("AP refresh step with no collected inputs on this rank; under DDP every rank must run the covered layers")
        device = entries[0]["sum"].device
        check = torch.tensor([len(entries), -len(entries)], dtype=torch.float32, device=device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self.process_group)
        if check[0] != -check[1]:
            raise RuntimeError("AP statistics differ in layout across ranks: every rank must run the same covered layers before step()")
        flat = torch.cat([e["sum"].reshape(-1) for e in entries] + [torch.tensor([e["count"] for e in entries], device=device)])
        dist.all_reduce(flat, group=self.process_group)
        offset = 0
        for e in entries:
            n = e["sum"].numel()
            e["sum"] = flat[offset : offset + n].view_as(e["sum"])
            offset += n
        for i, e in enumerate(entries):
            e["count"] = flat[offset + i]  # a 0-d tensor: reading it here would cost a sync per statistic

    # ------------------------------------------------------------------ reporting
    def coverage(self) -> dict[str, str]:
        """Every weight matrix, by module name: what AP does with it ("covered: linear, d_in=...",
        the covered layers first) or why it leaves it to the GP alone ("not covered: <reason>").
        nn.MultiheadAttention's packed projection appears as ``<name>.in_proj_weight[query|key|value]``,
        a >= 2-D parameter that is no layer's weight as ``<module>.<parameter>``. One line of it all:
        :meth:`coverage_summary`."""
        report = {}
        for layer in self.layers:
            text = f"covered: {layer.kind}, d_in={layer.d_in}" + (f", groups={layer.groups}" if layer.groups > 1 else "") + layer.note
            if self.steps > 0 and not layer.refreshed:
                text += " (but no input seen yet: the module was not called in training mode, so its gradient is left as is)"
            report[layer.name] = text
        report.update({name: "not covered: " + why for name, why in self.uncovered.items()})
        return report

    @torch.no_grad()
    def second_moments(self) -> dict[str, torch.Tensor]:
        """Each covered layer's Sigma (float32; (groups, d, d), or the (d,) diagonal for embeddings)
        from the inputs collected since the last ``step``, which stay collected. For diagnostics:
        run training-mode forwards (autograd enabled), read this, then ``reset_stats()``."""
        out = {}
        for layer in self.layers:
            if layer.parts:
                total = sum(p.sum if p.sum is not None else _gram_sym(p.rows) for p in layer.parts)
                out[layer.name] = total / float(sum(p.count for p in layer.parts))
        return out

    def condition_numbers(self) -> dict[str, float]:
        """cond(Sigma) (undamped) of each covered layer at the last refresh made while
        ``track_conditioning`` was True (one eigvalsh per shared statistic); ``inf`` where Sigma is
        singular (fewer rows than d_in included)."""
        return {layer.name: float(layer.condition) for layer in self.layers if layer.condition is not None}

    def state_bytes(self) -> int:
        """Bytes of the tensors AP keeps between steps (solvers and EMA statistics, each counted once)."""
        seen, total = set(), 0
        for layer in self.layers:
            tensors = [layer.ema] + ([layer.solver.a, layer.solver.b, layer.solver.lam] if layer.solver is not None else [])
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def remove(self) -> None:
        """Remove the forward hooks (the preconditioner stops collecting)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        def solver(s):
            return None if s is None else {"kind": s.kind, "a": s.a, "b": s.b, "lam": s.lam}

        return {
            "steps": self.steps,
            "fallbacks": dict(self.fallbacks),
            "generator": self._generator.get_state(),
            "layers": {
                layer.name: {"solver": solver(layer.solver), "ema": layer.ema, "damping": layer.damping, "refreshed": layer.refreshed}
                for layer in self.layers
            },
        }

    def load_state_dict(self, state: dict) -> None:
        names = {layer.name for layer in self.layers}
        saved = set(state["layers"])
        if names != saved:
            raise ValueError(
                "AP state does not match this model's covered layers: "
                f"missing {sorted(names - saved)[:5]}, unexpected {sorted(saved - names)[:5]}"
            )
        self.steps = int(state["steps"])
        self.fallbacks = {k: int(state["fallbacks"].get(k, 0)) for k in FALLBACK_KINDS}
        if "generator" in state:
            self._generator.set_state(state["generator"])
        shared: dict[int, _Solver] = {}  # layers that shared one solver share it again
        for layer in self.layers:
            entry = state["layers"][layer.name]
            device = layer.weight.device
            saved_solver = entry.get("solver")
            if saved_solver is None and entry.get("inverse") is not None:  # checkpoints of dopr 0.1
                inv = entry["inverse"]
                saved_solver = {"kind": "diagonal" if layer.kind == "embedding" else "inverse", "a": inv, "b": None, "lam": None}
            if saved_solver is None:
                layer.solver = None
            else:
                key = id(saved_solver["a"])
                if key not in shared:
                    move = lambda t: None if t is None else t.to(device)  # noqa: E731
                    shared[key] = _Solver(saved_solver["kind"], move(saved_solver["a"]), move(saved_solver["b"]), move(saved_solver["lam"]))
                layer.solver = shared[key]
            layer.ema = None if entry["ema"] is None else entry["ema"].to(device)
            damping = entry["damping"]
            layer.damping = damping.to(device) if isinstance(damping, torch.Tensor) else float(damping)
            layer.refreshed = bool(entry.get("refreshed", layer.solver is not None))
            layer.condition = None
        self.reset_stats()
