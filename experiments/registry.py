"""The one registry of how optimizers are shown: their order, labels and colours in every table and figure.

An optimizer missing here still works everywhere (it sorts last, drawn in grey, labelled by its name):
adding one (docs/extending.md) needs no edit here unless it wants its own colour.
"""

from __future__ import annotations

# One colour per optimizer: the base GP's hue, dark with AP, light without. The order is the order of every table.
COLOURS = {"adamw": "#9ecae1", "dopr_adamw": "#08519c", "muon": "#fdae6b", "dopr_muon": "#a63603",
           "signum": "#a1d99b", "dopr_signum": "#006d2c", "adamuon": "#bcbddc", "dopr_adamuon": "#54278f",
           "sgd": "#bdbdbd", "dopr_sgd": "#252525",
           # the comparators (docs/comparators.md), after the GPs; dopr_<one> is AP in front of it (optimizer.ap=true)
           "soap": "#c7eae5", "dopr_soap": "#01665e", "shampoo_input": "#fbb4b9", "dopr_shampoo_input": "#ae017e",
           "psgd_kron": "#dfc27d", "dopr_psgd_kron": "#8c510a"}
ORDER = list(COLOURS)
BASES = [o for o in ORDER if not o.startswith("dopr_")]  # the base GPs, then the comparators, in order
COMPARATORS = ("soap", "shampoo_input", "psgd_kron")  # what a user would pick instead of DoPr: secondary comparisons
GREY = "#777777"

# Axis labels for records of runs written before tasks declared their own (summary.json's *_label keys).
TASK_LABELS = {"lm": {"val_loss_label": "validation loss (nats per token)", "metric_label": "exact-answer accuracy (fraction)",
                      "horizon_label": "reasoning steps in the problem"}}


def has_ap(optimizer: str) -> bool:
    """Whether an optimizer name is a DoPr-X (AP in front of X)."""
    return optimizer.startswith("dopr_")


def base_of(optimizer: str) -> str:
    """X for DoPr-X (and for X itself)."""
    return optimizer.removeprefix("dopr_")


def rank(optimizer: str) -> tuple:
    """Sort key: the registry's order, unknown names last (alphabetically)."""
    return (ORDER.index(optimizer) if optimizer in ORDER else len(ORDER), optimizer)


def pair_rank(optimizer: str) -> tuple:
    """Sort key that puts X and DoPr-X side by side (X first), bases in the registry's order."""
    base = base_of(optimizer)
    return (BASES.index(base) if base in BASES else len(BASES), base, has_ap(optimizer))


def colour(optimizer: str) -> str:
    return COLOURS.get(optimizer, GREY)


def ordered(optimizers) -> list[str]:
    return sorted(set(optimizers), key=rank)
