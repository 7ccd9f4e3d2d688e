"""One factory for every GP, with and without AP: ``build_optimizer(model, "muon")`` and
``build_optimizer(model, "dopr_muon")`` differ only by the preconditioner in front."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.optim import Optimizer

from .chain import Chain
from .optimizers import AdaMuon, Muon, Signum
from .preconditioner import ActivationPreconditioner

BASES = ("adamw", "muon", "signum", "adamuon", "sgd")
# The keyword arguments of ActivationPreconditioner (after the model), routed to AP by DoPr.
AP_OPTIONS = tuple(inspect.signature(ActivationPreconditioner).parameters)[1:]


def parameter_groups(params, weight_decay: float) -> list[dict]:
    """Decay matrices and kernels (ndim >= 2); leave biases and norm gains (ndim < 2) undecayed,
    as nanoGPT does. Frozen parameters are left out."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def muon_split(model: nn.Module, exclude=()) -> tuple[list, list]:
    """(hidden matrices and conv kernels for Muon, everything else for AdamW). AdamW gets
    embeddings, the output head (``model.get_output_embeddings()`` where the model has one),
    modules named in ``exclude`` (name or prefix), biases and norms."""
    to_adamw = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or any(name == e or name.startswith(e + ".") for e in exclude):
            to_adamw.update(id(p) for p in module.parameters(recurse=False))
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        to_adamw.add(id(head.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.ndim >= 2 and id(p) not in to_adamw]
    chosen = {id(p) for p in matrices}
    return matrices, [p for p in params if id(p) not in chosen]


def build_base(model: nn.Module, base, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> Optimizer:
    """A GP over ``model``'s trainable parameters.

    ``base``: "adamw", "muon" (Muon on hidden matrices/kernels, AdamW on the rest, one ``lr``:
    Muon's step is scaled with ``adjust_lr_fn="match_rms_adamw"`` so AdamW learning rates carry
    over), "signum", "adamuon" (AdaMuon on hidden matrices, AdamW on the rest), "sgd" (momentum 0.9
    unless given), or any ``torch.optim.Optimizer`` subclass. ``kwargs`` go to the main optimizer;
    for muon/adamuon, ``adamw_kwargs={...}`` go to the AdamW part and ``muon_exclude=(names)`` moves
    modules to it.
    """
    if isinstance(base, type) and issubclass(base, Optimizer):
        return base(parameter_groups(model.parameters(), weight_decay), lr=lr, **kwargs)
    if not isinstance(base, str) or base not in BASES:
        raise ValueError(f"unknown optimizer {base!r}: choose one of {', '.join(BASES)} (or dopr_<one of them>), or pass a torch.optim.Optimizer class")
    if base in ("muon", "adamuon"):
        adamw_kwargs = kwargs.pop("adamw_kwargs", None) or {}
        matrices, rest = muon_split(model, kwargs.pop("muon_exclude", ()))
        if base == "muon":
            kwargs.setdefault("adjust_lr_fn", "match_rms_adamw")
        cls = Muon if base == "muon" else AdaMuon
        parts = []
        if matrices:
            parts.append(cls(matrices, lr=lr, weight_decay=weight_decay, **kwargs))
        if rest:
            parts.append(torch.optim.AdamW(parameter_groups(rest, weight_decay), lr=lr, **adamw_kwargs))
        return Chain(parts)
    groups = parameter_groups(model.parameters(), weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if base == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    if base == "sgd":
        return torch.optim.SGD(groups, lr=lr, **{"momentum": 0.9, **kwargs})
    return Signum(groups, lr=lr, **kwargs)


class DoPr(Chain):
    """Double preconditioning: activation preconditioning (AP), then a gradient preconditioner.

    ``DoPr(model, base="adamw", lr=1e-3, weight_decay=0.0, damping=1.0, stats="batch",
    update_every=1, ...)``: the AP options (every keyword of :class:`ActivationPreconditioner`,
    listed in ``AP_OPTIONS``) by their names, everything else to the base (see :func:`build_base`).
    One ``step()``, one ``state_dict()``.
    """

    def __init__(self, model: nn.Module, base="adamw", lr: float = 1e-3, weight_decay: float = 0.0, **kwargs):
        ap_kwargs = {k: kwargs.pop(k) for k in AP_OPTIONS if k in kwargs}
        self.base = build_base(model, base, lr, weight_decay, **kwargs)
        self.preconditioner = ActivationPreconditioner(model, **ap_kwargs)
        super().__init__([self.base], transforms=[self.preconditioner])

    @property
    def fallbacks(self) -> dict[str, int]:
        return self.preconditioner.fallbacks


def build_optimizer(model: nn.Module, name: str, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs) -> Optimizer:
    """``name`` is a base GP ("adamw", "muon", "signum", "adamuon", "sgd") or "dopr_" + one of them."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    if name.startswith("dopr_"):
        return DoPr(model, base=name[len("dopr_"):], lr=lr, weight_decay=weight_decay, **kwargs)
    stray = sorted(set(kwargs) & set(AP_OPTIONS))
    if stray:
        raise ValueError(f"{stray} are activation-preconditioning options, but optimizer {name!r} has no AP: use 'dopr_{name}'")
    return build_base(model, name, lr, weight_decay, **kwargs)
