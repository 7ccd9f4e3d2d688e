"""Activation-wise preconditioning (AP): the first half of DoPr.

For a layer with weight W (d_out x d_in), weight gradient G and inputs z_1..z_n (every token,
time step or conv patch is a row), AP rewrites the gradient to

    M = G (Sigma + lam I)^-1,   Sigma = (1/n) sum_i z_i z_i^T,   lam = damping * trace(Sigma) / d_in

in place, so any torch optimizer (the gradient preconditioner, GP) can run on it next.

No kept library does this exact transform (KFAC libraries always add the output-gradient factor and
their own update rule), so it is written here.
"""

from __future__ import annotations

import math
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


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "embedding"
    d_in: int  # per group for grouped convs; vocabulary size for embeddings
    groups: int = 1
    parts: list = field(default_factory=list)  # [(sum, count)] collected since the last step
    inverse: torch.Tensor | None = None  # (groups, d, d); (d,) diagonal for embeddings
    ema: torch.Tensor | None = None  # running second moment when stats="ema"
    damping: float = 0.0  # absolute damping lam used for the current inverse

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def _conv_rows(module: nn.Module, x: torch.Tensor):
    """Yield chunks of unfolded patches (rows, C_in * prod(kernel)) in the weight's column order."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # (B, C, 1, L): a Conv1d is a Conv2d of height 1
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
    per_sample = x[0:1].numel() * math.prod(kernel)
    step = max(1, _UNFOLD_CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, x.shape[0], step):
        cols = F.unfold(x[start : start + step], kernel, dilation=dilation, padding=padding, stride=stride)
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1])


class ActivationPreconditioner:
    """Collects each covered layer's input second moment and right-multiplies its weight gradient
    by the damped inverse.

    Usage::

        ap = ActivationPreconditioner(model)
        loss.backward(); ap.step(); optimizer.step()

    Args:
        model: the module whose layers to cover. Covered: ``nn.Linear`` (any leading dims),
            ``nn.Conv1d``/``nn.Conv2d`` (unfolded patches; any stride, padding, dilation, padding
            mode; grouped convs get one block per group), ``nn.Embedding`` (diagonal token
            frequencies), and so the A and B matrices of peft LoRA adapters (they are Linear
            layers). Frozen weights, weights shared between modules (tied embeddings) and
            ``exclude``-d names are left to the GP alone; see :meth:`coverage`.
        damping: gamma; the absolute damping is ``gamma * trace(Sigma) / d_in`` (relative to the
            mean eigenvalue, so it does not depend on the width).
        stats: "batch" (the paper's form: the second moment of the current batch) or "ema"
            (exponential moving average over refresh steps, decay ``ema_decay``).
        update_every: recompute statistics and inverse every k steps and reuse the inverse in
            between (inputs are collected only on refresh steps, so the other steps cost one
            matmul per layer).
        embeddings: cover ``nn.Embedding`` layers.
        exclude: module names (exact, or a prefix followed by ".") to leave uncovered.
        distributed: "auto" (all-reduce the statistics when ``torch.distributed`` is initialised
            with more than one rank), True or False.
        process_group: the group to all-reduce over (default: the world).

    Statistics and solves run in float32 whatever the model's dtype. Inputs are collected only
    while a module is in training mode with autograd enabled (never in eval or ``no_grad``
    rollouts). Several forward passes before one ``step`` (gradient accumulation, activation
    checkpointing) pool their rows.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        stats: str = "batch",
        ema_decay: float = 0.95,
        update_every: int = 1,
        embeddings: bool = True,
        exclude: tuple[str, ...] | list[str] = (),
        distributed: bool | str = "auto",
        process_group=None,
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
        if distributed not in ("auto", True, False):
            raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
        self.damping = float(damping)
        self.stats = stats
        self.ema_decay = float(ema_decay)
        self.update_every = update_every
        self.distributed = distributed
        self.process_group = process_group
        self.steps = 0
        self.fallbacks = {k: 0 for k in FALLBACK_KINDS}
        self.layers: list[_Layer] = []
        self.uncovered: dict[str, str] = {}
        self._cache: dict = {}  # per step: statistics of input tensors already seen (shared inputs)
        self._handles = []
        self._discover(model, embeddings, tuple(exclude))

    # ------------------------------------------------------------------ discovery and hooks
    def _discover(self, model, embeddings, exclude):
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
        for name, module in model.named_modules():
            weight = module._parameters.get("weight")  # its own parameter, not a wrapper's alias of a child's
            if not isinstance(weight, nn.Parameter):
                continue
            kind = None
            if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
                kind, d_in, groups = "linear", module.in_features, 1
            elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
                kind, groups = "conv", module.groups
                d_in = module.in_channels // groups * math.prod(module.kernel_size)
            elif isinstance(module, nn.Embedding):
                kind, d_in, groups = "embedding", module.num_embeddings, 1
            if kind is None and weight.ndim < 2:
                continue  # norm gains: the GP alone, nothing to report
            reason = None
            if kind is None:
                reason = f"{type(module).__name__} is not a layer AP covers (Linear, Conv1d, Conv2d, Embedding)"
            elif isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
                reason = "nn.MultiheadAttention uses this weight without calling the module, so its inputs cannot be seen"
            elif any(name == e or name.startswith(e + ".") for e in exclude):
                reason = "excluded by the caller"
            elif not weight.requires_grad:
                reason = "frozen (requires_grad=False)"
            elif len(owners.get(id(weight), ())) > 1:
                reason = "weight shared with " + ", ".join(o for o in owners[id(weight)] if o != f"{name}.weight") + " (tied): its gradient mixes two inputs"
            elif kind == "embedding" and not embeddings:
                reason = "embeddings=False"
            elif kind == "embedding" and module.sparse:
                reason = "sparse embedding gradients are not supported"
            if reason is not None:
                self.uncovered[name] = reason
                continue
            layer = _Layer(name=name, module=module, kind=kind, d_in=d_in, groups=groups)
            self.layers.append(layer)
            self._handles.append(module.register_forward_pre_hook(self._make_hook(layer)))
        if not self.layers:
            raise ValueError(
                "ActivationPreconditioner found no layer to cover (Linear, Conv1d, Conv2d, Embedding with a "
                "trainable, untied weight); uncovered: " + (", ".join(f"{k}: {v}" for k, v in self.uncovered.items()) or "none")
            )

    def _make_hook(self, layer: _Layer):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()) or self.steps % self.update_every:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            layer.parts.append(self._input_stats(layer, x))

        return hook

    def _input_stats(self, layer: _Layer, x: torch.Tensor):
        """(sum of z z^T over rows, number of rows) for this input, computed once per input tensor:
        q/k/v projections (or gate/up) that read the same tensor share one statistic and one solve."""
        module = layer.module
        if layer.kind == "conv":
            signature = ("conv", type(module), module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.padding_mode)
        else:
            signature = (layer.kind, layer.d_in)
        key = (id(x), x._version, signature)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        ref, x = weakref.ref(x), x.detach()
        with torch.autocast(x.device.type, enabled=False):
            if layer.kind == "embedding":
                flat = x.reshape(-1)
                stat = (torch.bincount(flat, minlength=layer.d_in).float(), flat.numel())
            elif layer.kind == "linear":
                rows = x.reshape(-1, x.shape[-1]).float()
                stat = (rows.T @ rows, rows.shape[0])
            else:
                total, count, g, d = None, 0, layer.groups, layer.d_in
                for rows in _conv_rows(module, x.float()):
                    blocks = rows.view(rows.shape[0], g, d).transpose(0, 1)  # (g, n, d)
                    s = blocks.transpose(1, 2) @ blocks
                    total = s if total is None else total + s
                    count += rows.shape[0]
                stat = (total, count)
        self._cache[key] = (ref, stat)
        return stat

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self) -> None:
        """Rewrite each covered layer's ``weight.grad`` in place to ``G (Sigma + lam I)^-1``."""
        if self.steps % self.update_every == 0:
            self._refresh()
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is None or layer.inverse is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{layer.name}: sparse gradients are not supported by AP")
            inv = layer.inverse
            if layer.kind == "embedding":
                grad.copy_(grad.float() * inv[:, None])
            elif layer.kind == "linear":
                grad.copy_(grad.float() @ inv[0])
            else:
                g = layer.groups
                blocks = grad.float().reshape(g, grad.shape[0] // g, layer.d_in)
                grad.copy_((blocks @ inv).reshape(grad.shape))
        self.steps += 1
        self.reset_stats()

    def reset_stats(self) -> None:
        """Drop the inputs collected since the last step (e.g. after skipping a non-finite step)."""
        for layer in self.layers:
            layer.parts.clear()
        self._cache.clear()

    def _refresh(self) -> None:
        # Group layers that saw exactly the same inputs: one statistic, one inverse.
        groups: dict[tuple, list[_Layer]] = {}
        for layer in self.layers:
            if layer.parts:
                groups.setdefault(tuple(id(p) for p in layer.parts), []).append(layer)
        stats = []
        for members in groups.values():
            parts = members[0].parts
            total = parts[0][0] if len(parts) == 1 else sum(p[0] for p in parts)
            stats.append([total, float(sum(p[1] for p in parts))])
        if self._use_distributed():
            self._all_reduce(stats)
        for (total, count), members in zip(stats, groups.values()):
            if count <= 0:
                continue
            sigma = total / count
            lead = members[0]
            if self.stats == "ema" and lead.ema is not None:
                sigma = self.ema_decay * lead.ema + (1.0 - self.ema_decay) * sigma
            inverse, lam = self._invert(sigma, lead)
            for layer in members:
                if self.stats == "ema":
                    layer.ema = sigma
                if inverse is not None:
                    layer.inverse, layer.damping = inverse, lam

    def _use_distributed(self) -> bool:
        if self.distributed is False:
            return False
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise RuntimeError("distributed=True but torch.distributed is not initialised: call init_process_group first")
        return ready and dist.get_world_size(self.process_group) > 1

    def _all_reduce(self, stats: list) -> None:
        # Sums and row counts are added over ranks, so Sigma is the second moment of the global
        # batch and every rank solves the same system. One flat buffer, one collective.
        if not stats:
            raise RuntimeError("AP refresh step with no collected inputs on this rank; under DDP every rank must run the covered layers")
        check = torch.tensor([len(stats), -len(stats)], dtype=torch.float32, device=stats[0][0].device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self.process_group)
        if check[0] != -check[1]:
            raise RuntimeError("AP statistics differ in layout across ranks: every rank must run the same covered layers before step()")
        flat = torch.cat([s[0].reshape(-1) for s in stats] + [torch.tensor([s[1] for s in stats], device=check.device)])
        dist.all_reduce(flat, group=self.process_group)
        offset = 0
        for s in stats:
            n = s[0].numel()
            s[0] = flat[offset : offset + n].view_as(s[0])
            offset += n
        for i, s in enumerate(stats):
            s[1] = float(flat[offset + i])

    def _invert(self, sigma: torch.Tensor, layer: _Layer):
        """Return ((groups, d, d) inverse of sigma + lam I, lam), or (None, lam) to keep the previous
        inverse. Cholesky in float32; float64, then eigh with eigenvalues clamped, then the
        previous inverse as fallbacks, each counted in ``self.fallbacks``."""
        if not torch.isfinite(sigma.sum()):  # a NaN or inf anywhere makes the sum non-finite
            self.fallbacks["nonfinite_stats"] += 1
            return self._keep_previous(layer)
        d = sigma.shape[-1]
        if layer.kind == "embedding":  # diagonal: an elementwise reciprocal, no solve
            mean = float(sigma.sum()) / d
            lam = self.damping * mean
            floor = max(lam, MIN_RELATIVE_EIGENVALUE * mean)
            if mean <= 0:
                return self._keep_previous(layer)
            return 1.0 / (sigma + lam).clamp(min=floor), lam
        if sigma.ndim == 2:
            sigma = sigma.unsqueeze(0)
        mean = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1) / d  # (groups,)
        if not (mean > 0).all():
            return self._keep_previous(layer)
        lam = self.damping * mean
        floor = torch.maximum(lam, MIN_RELATIVE_EIGENVALUE * mean)
        eye = torch.eye(d, device=sigma.device, dtype=torch.float32)
        a = sigma + lam[:, None, None] * eye
        for dtype, fallback in ((torch.float32, None), (torch.float64, "float64")):
            chol, info = torch.linalg.cholesky_ex(a.to(dtype))
            # A pivot of an exact Cholesky is at least the smallest eigenvalue (>= lam); a smaller
            # computed pivot means rounding has taken over, so the result is not trusted.
            pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
            if (info == 0).all() and (pivots >= 0.5 * floor.to(dtype)[:, None]).all():
                inverse = torch.cholesky_inverse(chol).float()
                if torch.isfinite(inverse.sum()):
                    if fallback:
                        self.fallbacks[fallback] += 1
                    return inverse, self._scalar(lam)
        evals, evecs = torch.linalg.eigh(a.double())
        if torch.isfinite(evals).all() and (evals.amax(-1) > 0).all():
            evals = evals.clamp(min=floor.double()[:, None])
            inverse = ((evecs / evals[:, None, :]) @ evecs.transpose(-1, -2)).float()
            if torch.isfinite(inverse).all():
                self.fallbacks["eigh"] += 1
                return inverse, self._scalar(lam)
        return self._keep_previous(layer)

    @staticmethod
    def _scalar(lam: torch.Tensor) -> float:
        return float(lam.mean())

    def _keep_previous(self, layer: _Layer):
        self.fallbacks["previous" if layer.inverse is not None else "skipped"] += 1
        return None, layer.damping

    # ------------------------------------------------------------------ reporting
    def coverage(self) -> dict[str, str]:
        """Every module with a weight matrix: what AP does with it ("covered: linear, d_in=...")
        or why it leaves it to the GP alone."""
        report = {}
        for layer in self.layers:
            text = f"covered: {layer.kind}, d_in={layer.d_in}" + (f", groups={layer.groups}" if layer.groups > 1 else "")
            if self.steps > 0 and layer.inverse is None:
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
                total = sum(p[0] for p in layer.parts)
                sigma = total / float(sum(p[1] for p in layer.parts))
                out[layer.name] = sigma if layer.kind == "embedding" or sigma.ndim == 3 else sigma.unsqueeze(0)
        return out

    @torch.no_grad()
    def condition_numbers(self) -> dict[str, float]:
        """Condition number of each covered layer's (undamped) Sigma at its last refresh, recovered
        from the stored inverse: eig(Sigma) = 1 / eig(inverse) - lam. ``inf`` where Sigma is singular."""
        out = {}
        for layer in self.layers:
            if layer.inverse is None:
                continue
            if layer.kind == "embedding":
                evals = 1.0 / layer.inverse.double() - layer.damping
            else:
                evals = 1.0 / torch.linalg.eigvalsh(layer.inverse.double()).flatten() - layer.damping
            top, bottom = float(evals.max()), float(evals.min())
            floor = MIN_RELATIVE_EIGENVALUE * float(evals.clamp(min=0).mean())
            out[layer.name] = top / bottom if bottom > floor else math.inf
        return out

    def remove(self) -> None:
        """Remove the forward hooks (the preconditioner stops collecting)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "fallbacks": dict(self.fallbacks),
            "layers": {
                layer.name: {"inverse": layer.inverse, "ema": layer.ema, "damping": layer.damping}
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
        for layer in self.layers:
            entry = state["layers"][layer.name]
            device = layer.weight.device
            layer.inverse = None if entry["inverse"] is None else entry["inverse"].to(device)
            layer.ema = None if entry["ema"] is None else entry["ema"].to(device)
            layer.damping = float(entry["damping"])
        self.reset_stats()
