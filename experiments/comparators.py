"""What a user would pick instead of DoPr (issue 48; docs/comparators.md): the two adapters the comparators need.
SOAP runs as pytorch_optimizer ships it (configs/optimizer/soap.yaml points at ``pytorch_optimizer.SOAP``).

- ``InputShampoo``: one-sided Shampoo on the **input side** of every torch weight, the gradient-statistic analogue
  of AP: a Linear weight W (out, in) with gradient G gets S = EMA of G^T G (in x in) and the direction G S^(-1/2),
  with the layer's RMSProp update as its size (grafting). Built on ``pytorch_optimizer.ScalableShampoo``'s
  one-sided mode, which follows the JAX layout of its reference (kernels stored (in, out), "the last dim is the
  output"): there ``pre_conditioner_type=INPUT`` preconditions every dim but the last, i.e. the OUTPUT side of a
  torch (out, in) weight, and ``OUTPUT`` preconditions the last dim, torch's input side (tests/test_comparators.py
  checks both). Why an adapter, when no kept library does this as is: (1) conv kernels (out, in, k, ...) must be
  seen as (out, in*k*...) so the statistic is on the whole fan-in (AP's patch view), while ScalableShampoo's shape
  interpretation merges small dims from the front ((16, 8, 3, 3) becomes (384, 3)) or, without it, preconditions
  the last kernel dim only; (2) embeddings need their own rule (below), which needs to know the model's layers;
  (3) its state keeps Python objects (PreConditioner, Graft), which the suite's checkpoints refuse
  (weights_only=True): ``state_dict`` writes their tensors out and ``load_state_dict`` rebuilds them.
- ``PSGDKron``: ``heavyball.PSGDKron`` run eagerly (heavyball compiles its kernels with torch.compile by default:
  minutes of start-up on a CPU, and a process-wide setting: this module sets ``heavyball.utils.compile_mode =
  None`` when imported) and keeping ``p.grad`` after ``step()`` (``consume_grad=False``, as torch optimizers do;
  heavyball 3 clears it by default). The training loop clips and logs the gradient norm before ``step()`` and AP
  rewrites ``p.grad`` before it too, so neither depends on this; it keeps ``zero_grad`` the one place grads go.

Routing (every trainable parameter goes to the one optimizer): SOAP and PSGD-Kron take every parameter kind
themselves (1-D: Adam in SOAP, a diagonal preconditioner in PSGD; conv kernels: one factor per dim; a dim above
``max_precondition_dim`` / ``max_size_triangular``: identity / diagonal on that dim). InputShampoo: matrices and
conv kernels as above; 1-D parameters and ``nn.Embedding`` weights get the grafted diagonal (RMSProp) update only:
an embedding's input is a one-hot token, so its input side is the vocabulary (128k x 128k at the 8B preset), and
AP too gives embeddings only a diagonal.
"""

from __future__ import annotations

import heavyball
import torch
import torch.nn as nn
from pytorch_optimizer import ScalableShampoo
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting, build_graft
from pytorch_optimizer.optimizer.utils.partition import PreConditionerType
from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

heavyball.utils.compile_mode = None  # eager heavyball kernels in this process (see the module's docstring)
_ZERO = 1e-8  # a gradient within it everywhere is zero to heavyball's preconditioner initialisation (PSGDKron.step)


class _FanInPreConditioner(PreConditioner):
    """ScalableShampoo's preconditioner over a weight seen as (out, fan-in); its direction comes back in the
    weight's own shape (the library reshapes to the shape it was built with)."""

    def preconditioned_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return super().preconditioned_grad(grad).reshape(grad.shape)


class InputShampoo(ScalableShampoo):
    """One-sided Shampoo on the input side of torch weights (module docstring). Defaults: statistics and
    graft with beta2 0.95 (the RMSProp graft has no bias correction, so a long beta2 inflates the first
    steps), EMA momentum 0.9 with Nesterov, decoupled weight decay, inverse roots every 10 steps and used
    from step 10 (the library's 1000 would never refresh them in a 300-step run), ``matrix_eps`` the ridge
    relative to the largest eigenvalue, blocks of 1024 (every CPU-scale fan-in is one block)."""

    diagonal_only: frozenset = frozenset()  # ids of the weights that get the diagonal update only (embeddings)

    @classmethod
    def for_model(cls, model: nn.Module) -> type:
        """This class bound to ``model``'s embeddings (experiments.engine.build_optimizer calls it)."""
        ids = frozenset(id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding))
        return type(cls.__name__, (cls,), {"diagonal_only": ids, "__module__": cls.__module__, "__qualname__": cls.__qualname__})

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), weight_decay: float = 0.0, matrix_eps: float = 1e-6,
                 preconditioning_compute_steps: int = 10, start_preconditioning_step: int = 10, block_size: int = 1024,
                 graft: str = "rmsprop", nesterov: bool = True, **kwargs):
        fixed = {"pre_conditioner_type", "shape_interpretation", "graft_type"} & set(kwargs)
        if fixed:
            raise ValueError(f"InputShampoo sets {sorted(fixed)} itself (the input side, the (out, fan-in) view; graft by name)")
        super().__init__(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, decoupled_weight_decay=True,
                         moving_average_for_momentum=True, matrix_eps=float(matrix_eps), block_size=int(block_size),
                         preconditioning_compute_steps=int(preconditioning_compute_steps), nesterov=nesterov,
                         start_preconditioning_step=int(start_preconditioning_step), graft_type=LayerWiseGrafting[graft.upper()],
                         pre_conditioner_type=PreConditionerType.OUTPUT, shape_interpretation=False, **kwargs)

    def __str__(self) -> str:
        return "InputShampoo"

    def _preconditioner(self, p: torch.Tensor, beta2: float) -> PreConditioner:
        diagonal = p.ndim < 2 or id(p) in self.diagonal_only
        view = p.detach().reshape(-1) if diagonal else p.detach().reshape(p.shape[0], -1)
        return _FanInPreConditioner(view, beta2, self.inverse_exponent_override, self.block_size, self.skip_preconditioning_rank_lt,
                                    self.no_preconditioning_for_layers_with_dim_gt, False, PreConditionerType.OUTPUT,
                                    self.matrix_eps, self.use_svd)

    def init_group(self, group, **kwargs) -> None:
        group.setdefault("step", 0)
        for p in group["params"]:
            if p.grad is not None and not self.state[p]:
                self.state[p].update(momentum=torch.zeros_like(p), pre_conditioner=self._preconditioner(p, group["betas"][1]),
                                     graft=build_graft(p, self.graft_type, self.diagonal_eps))

    def state_dict(self) -> dict:
        out = super().state_dict()
        plain = {}
        for key, st in out["state"].items():
            st = dict(st)  # not the live state's own dict
            pre, graft = st.pop("pre_conditioner", None), st.pop("graft", None)
            if pre is not None:
                st.update(shampoo_statistics=pre.statistics, shampoo_roots=pre.pre_conditioners)
            if graft is not None:
                st["graft_momentum"] = graft.momentum
                if hasattr(graft, "statistics"):
                    st["graft_statistics"] = graft.statistics
            plain[key] = st
        return {**out, "state": plain}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or "shampoo_statistics" not in st:
                    continue
                pre = self._preconditioner(p, group["betas"][1])
                pre.statistics, pre.pre_conditioners = st.pop("shampoo_statistics"), st.pop("shampoo_roots")
                graft = build_graft(p, self.graft_type, self.diagonal_eps)
                graft.momentum = st.pop("graft_momentum")
                if "graft_statistics" in st:
                    graft.statistics = st.pop("graft_statistics")
                st.update(pre_conditioner=pre, graft=graft)


class PSGDKron(heavyball.PSGDKron):
    """heavyball.PSGDKron, eager, grads kept (module docstring). ``preconditioner_update_probability``: None keeps
    heavyball's schedule (every step for the first 1000, then annealed to 0.03); a number is a constant
    probability, i.e. a refresh every 1/p steps (deterministic: heavyball accumulates p and refreshes on each
    whole number), the precondition frequency the tuning searches."""

    def __init__(self, params, lr: float = 1e-3, preconditioner_update_probability: float | None = None, **kwargs):
        if preconditioner_update_probability is not None:  # a float: heavyball calls anything else as a schedule
            kwargs["preconditioner_update_probability"] = float(preconditioner_update_probability)
        kwargs.setdefault("consume_grad", False)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        super().__init__(params, lr=lr, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        """heavyball's step, except that a parameter whose gradient is zero before its preconditioner exists sits the
        step out: heavyball sizes a new preconditioner from the first gradient and stops (PrecondInitError) on one it
        counts as zero (every entry within 1e-8: torch.allclose's atol, its own test), which a zero-initialised output
        layer gives the layers behind it in the first steps (diffusers' UNets). Such an update would be ~0 but for
        weight decay; the parameter's preconditioner starts at its first gradient above that."""
        held = [(p, p.grad) for g in self.param_groups for p in g["params"]
                if p.grad is not None and not self.state.get(p) and not bool(p.grad.abs().max() > _ZERO)]
        for p, _ in held:
            p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, grad in held:
                p.grad = grad

    def state_dict(self) -> dict:
        """heavyball's, less its pickled schedule (``pickle.loads`` on load could run code from a checkpoint, which
        the suite's checkpoints rule out; the schedule is a function of the settings, rebuilt by the constructor)."""
        out = super().state_dict()
        out["heavyball"] = {k: v for k, v in out.get("heavyball", {}).items() if k != "precond_schedule"}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating tensor of the state to its parameter's dtype; heavyball keeps some in
        float64 (the running lower bounds of its preconditioner fit, its step counters): put the saved ones back,
        so a resumed run continues exactly."""
        super().load_state_dict(state_dict)
        for p, key in zip((p for g in self.param_groups for p in g["params"]), (k for g in state_dict["param_groups"] for k in g["params"])):
            if p in self.state and key in state_dict["state"]:
                self.state[p] = _saved_dtypes(self.state[p], state_dict["state"][key])


def _saved_dtypes(live, saved):
    """``live`` (a state as loaded) with every tensor whose dtype the load changed taken from ``saved`` instead."""
    if isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor):
        return saved.to(live.device) if saved.dtype != live.dtype else live
    if isinstance(saved, dict) and isinstance(live, dict):
        return {k: _saved_dtypes(v, saved[k]) if k in saved else v for k, v in live.items()}
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(live)(_saved_dtypes(a, b) for a, b in zip(live, saved))
    return live
