"""Gradient preconditioners (GPs) torch does not ship in the form DoPr needs.

- ``Muon``: torch.optim.Muon's update (same Newton-Schulz iteration, momentum and learning-rate
  adjustment) for any >= 2-D tensor: conv kernels are orthogonalised as (out, in * kernel)
  matrices, as in cifar10-airbench. torch.optim.Muon rejects non-2-D parameters, so the iteration
  is written once here and tested against torch's on 2-D parameters.
- ``AdaMuon`` (Si et al. 2025): Muon, then an Adam-style second moment on the orthogonalised
  update, then an RMS rescale to 0.2 (so AdamW learning rates carry over). No kept release.
- ``Signum`` (Bernstein et al. 2018): sign of the momentum. No kept release.
All three use decoupled weight decay: ``p <- (1 - lr * wd) p - lr * update``.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's quintic coefficients


def newton_schulz(grad: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (U S V^T -> U S' V^T, S' ~ 1) in bfloat16, the
    quintic iteration of torch.optim.Muon / Keller Jordan's Muon."""
    a, b, c = coefficients
    x = grad.bfloat16()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (rows, cols) update."""
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def _check(lr, weight_decay, momentum):
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def _nesterov_momentum(state, grad, momentum, nesterov):
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


class _PerParameter(Optimizer):
    """The shared shape of the three: closure handling and a loop over the parameters with a
    gradient; ``_update`` does one parameter. ``matrices_only`` rejects biases and norm gains."""

    matrices_only = False

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        if self.matrices_only:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"{type(self).__name__} takes matrices and conv kernels only; got a parameter "
                                         f"of shape {tuple(p.shape)} (give biases and norms to AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.state[p])
        return loss

    def _update(self, p, group, state):
        raise NotImplementedError


class Muon(_PerParameter):
    """Muon for every >= 2-D parameter (see the module docstring). Defaults as torch.optim.Muon."""

    matrices_only = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        _check(lr, weight_decay, momentum)
        adjusted_lr(1.0, adjust_lr_fn, 1, 1)  # validates the name
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))

    def _update(self, p, group, state):
        lr = group["lr"]
        update = _nesterov_momentum(state, p.grad, group["momentum"], group["nesterov"])
        matrix = update.reshape(update.shape[0], -1)
        ortho = newton_schulz(matrix, group["ns_steps"], group["ns_coefficients"], group["eps"])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho.view_as(p), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], *matrix.shape))


class AdaMuon(_PerParameter):
    """AdaMuon (Si, Zhang and Shen 2025, arXiv 2507.11005), following the authors' release:
    Nesterov momentum, Newton-Schulz, a bias-corrected second moment of the orthogonalised update
    (elementwise division), then a rescale to Frobenius norm sqrt(min(m, n)) and a step of
    ``lr * 0.2 * sqrt(max(m, n))``, i.e. an update of RMS 0.2 like AdamW's."""

    matrices_only = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 beta2=0.999, eps=1e-8, ns_steps=5, ns_coefficients=NS_COEFFICIENTS):
        _check(lr, weight_decay, momentum)
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      beta2=beta2, eps=eps, ns_steps=ns_steps, ns_coefficients=ns_coefficients))

    def _update(self, p, group, state):
        lr, beta2, eps = group["lr"], group["beta2"], group["eps"]
        update = _nesterov_momentum(state, p.grad, group["momentum"], group["nesterov"])
        matrix = update.reshape(update.shape[0], -1)
        ortho = newton_schulz(matrix, group["ns_steps"], group["ns_coefficients"]).float()
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(ortho)
            state["step"] = 0
        state["step"] += 1
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(ortho, ortho, value=1 - beta2)
        ortho = ortho / (v / (1 - beta2 ** state["step"])).sqrt().add_(eps)
        rows, cols = matrix.shape
        ortho.mul_(math.sqrt(min(rows, cols)) / (ortho.norm() + eps))
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho.view_as(p).to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))


class Signum(_PerParameter):
    """Signum: ``m <- beta m + (1 - beta) g``; ``p <- (1 - lr wd) p - lr sign(m)``."""

    def __init__(self, params, lr=1e-4, momentum=0.9, weight_decay=0.0):
        _check(lr, weight_decay, momentum)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, p, group, state):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(torch.sign(buf), alpha=-group["lr"])
