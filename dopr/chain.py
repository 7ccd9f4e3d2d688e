"""Gradient transforms followed by optimizers, as one ``torch.optim.Optimizer``.

optax's ``chain``/``multi_transform`` in torch form: DoPr is ``Chain([base], transforms=[AP])``;
Muon-with-AdamW is ``Chain([Muon(matrices), AdamW(rest)])``. Being an ``Optimizer`` subclass
whose ``param_groups`` are the inner optimizers' own group dicts, a Chain works with torch and
diffusers LR schedulers, ``zero_grad``, gradient clipping and GradScaler unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.optim import Optimizer


class _MergedState(Mapping):
    """Read-only view of the inner optimizers' ``state`` (looking a key up creates nothing)."""

    def __init__(self, optimizers):
        self._optimizers = optimizers

    def __getitem__(self, key):
        for opt in self._optimizers:
            if key in opt.state:
                return opt.state[key]
        raise KeyError(key)

    def __iter__(self):
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self):
        return sum(len(opt.state) for opt in self._optimizers)


class Chain(Optimizer):
    """Run ``transforms`` (objects with ``step()``, ``state_dict()``, ``load_state_dict()`` that
    rewrite ``.grad`` in place) in order, then step every optimizer on its own parameters.

    ``state_dict()`` holds every part's state; ``load_state_dict()`` restores it, so a resumed
    run continues exactly.
    """

    def __init__(self, optimizers, transforms=()):
        self.optimizers = list(optimizers)
        self.transforms = list(transforms)
        if not self.optimizers:
            raise ValueError("Chain needs at least one optimizer")
        seen: set[int] = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter belongs to two optimizers of one Chain; give each parameter to exactly one")
                    seen.add(id(p))
        self._building = True
        super().__init__([{"params": list(g["params"])} for opt in self.optimizers for g in opt.param_groups], {})
        self._building = False
        self._link()

    def _link(self):
        # The inner optimizers' own dicts: an LR scheduler that edits group["lr"] edits theirs.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _MergedState(self.optimizers)
        self.defaults = self.optimizers[0].defaults

    def add_param_group(self, param_group):
        if not getattr(self, "_building", False):
            raise NotImplementedError("add parameter groups to the inner optimizers (chain.optimizers[i]) before building the Chain")
        super().add_param_group(param_group)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for transform in self.transforms:
            transform.step()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self):
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "transforms": [t.state_dict() for t in self.transforms],
        }

    def load_state_dict(self, state_dict):
        opts, transforms = state_dict.get("optimizers"), state_dict.get("transforms")
        if opts is None or transforms is None or len(opts) != len(self.optimizers) or len(transforms) != len(self.transforms):
            raise ValueError(
                f"this state_dict does not come from a Chain of {len(self.optimizers)} optimizer(s) and "
                f"{len(self.transforms)} transform(s): build the optimizer with the same settings as the saved run"
            )
        for transform, state in zip(self.transforms, transforms):  # first: they name mismatched layers
            transform.load_state_dict(state)
        for opt, state in zip(self.optimizers, opts):
            opt.load_state_dict(state)
        self._link()  # torch's load_state_dict replaces the inner group dicts
