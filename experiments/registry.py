"""The one registry of how optimizers are shown and paired: their order, labels and colours in every table and
figure, and which comparisons an experiment's optimizers make.

An optimizer missing here still works everywhere (it sorts last, drawn in grey, labelled by its name):
adding one (docs/extending.md) needs no edit here unless it wants its own colour.

Names: X (a base GP), ``dopr_<X>`` (DoPr-X: AP in front of X), and ``dopr_<X>_k<N>`` (a variant of DoPr-X: the same
AP refreshing its statistic and inverse every N steps, ``update_every: N``; configs/optimizer/dopr_<X>_k<N>.yaml).
A variant is paired with its X, as DoPr-X is, and also compared with its DoPr-X; both comparisons are secondary
(docs/protocol.md).
"""

from __future__ import annotations

import re

# One colour per optimizer: the base GP's hue, dark with AP, light without, between them for a refresh-every-k variant.
# The order is the order of every table.
COLOURS = {"adamw": "#9ecae1", "dopr_adamw": "#08519c", "dopr_adamw_k10": "#3182bd",
           "muon": "#fdae6b", "dopr_muon": "#a63603", "dopr_muon_k10": "#e6550d",
           "signum": "#a1d99b", "dopr_signum": "#006d2c", "adamuon": "#bcbddc", "dopr_adamuon": "#54278f",
           "sgd": "#bdbdbd", "dopr_sgd": "#252525",
           # the comparators (docs/comparators.md), after the GPs; dopr_<one> is AP in front of it (optimizer.ap=true)
           "soap": "#c7eae5", "dopr_soap": "#01665e", "shampoo_input": "#fbb4b9", "dopr_shampoo_input": "#ae017e",
           "psgd_kron": "#dfc27d", "dopr_psgd_kron": "#8c510a"}
ORDER = list(COLOURS)
BASES = [o for o in ORDER if not o.startswith("dopr_")]  # the base GPs, then the comparators, in order
COMPARATORS = ("soap", "shampoo_input", "psgd_kron")  # what a user would pick instead of DoPr: secondary comparisons
GREY = "#777777"
# How the pages name a base GP in prose (DoPr-AdamW, DoPr-AdamW@10); others go by their config name.
NAMES = {"adamw": "AdamW", "muon": "Muon", "signum": "Signum", "adamuon": "AdaMuon", "sgd": "SGD"}
PRIMARY_BASES = ("adamw", "muon")  # docs/protocol.md: the primary family is DoPr-AdamW vs AdamW and DoPr-Muon vs Muon
VARIANT = re.compile(r"^(dopr_.+)_k(\d+)$")  # dopr_<X>_k<N>: DoPr-X with update_every=N

# Axis labels for records of runs written before tasks declared their own (summary.json's *_label keys).
TASK_LABELS = {"lm": {"val_loss_label": "validation loss (nats per token)", "metric_label": "exact-answer accuracy (fraction)",
                      "horizon_label": "reasoning steps in the problem"}}


def has_ap(optimizer: str) -> bool:
    """Whether an optimizer name is a DoPr-X (AP in front of X), a variant included."""
    return optimizer.startswith("dopr_")


def reference_of(optimizer: str) -> str | None:
    """The DoPr-X a variant varies (dopr_adamw for dopr_adamw_k10); None for every other name."""
    m = VARIANT.match(optimizer)
    return m.group(1) if m else None


def update_every(optimizer: str) -> int:
    """N of a variant dopr_<X>_k<N> (AP refreshed every N steps); 1 for every other name."""
    m = VARIANT.match(optimizer)
    return int(m.group(2)) if m else 1


def variant_suffix(optimizer: str) -> str:
    """"k10" for dopr_<X>_k10, "" for every other name."""
    return f"k{update_every(optimizer)}" if reference_of(optimizer) else ""


def base_of(optimizer: str) -> str:
    """X for DoPr-X and its variants (and for X itself)."""
    return (reference_of(optimizer) or optimizer).removeprefix("dopr_")


def display(optimizer: str) -> str:
    """The name in prose: AdamW, DoPr-AdamW, DoPr-AdamW@10 (a name the registry does not know: DoPr-<x>, <x>)."""
    base = NAMES.get(base_of(optimizer), base_of(optimizer))
    if not has_ap(optimizer):
        return NAMES.get(optimizer, optimizer)
    return f"DoPr-{base}" + (f"@{update_every(optimizer)}" if reference_of(optimizer) else "")


def rank(optimizer: str) -> tuple:
    """Sort key: the registry's order, unknown names last (alphabetically)."""
    return (ORDER.index(optimizer) if optimizer in ORDER else len(ORDER), optimizer)


def pair_rank(optimizer: str) -> tuple:
    """Sort key that puts X, DoPr-X and its variants side by side (X first), bases in the registry's order."""
    base = base_of(optimizer)
    return (BASES.index(base) if base in BASES else len(BASES), base, has_ap(optimizer), update_every(optimizer), optimizer)


def pairs(optimizers) -> list[tuple[str, str]]:
    """The comparisons among ``optimizers``, as (treated, control): DoPr-X vs X for every X with its DoPr-X, then for
    each variant present, the variant vs X and the variant vs its DoPr-X (where those ran); bases in the registry's
    order."""
    present = set(optimizers)
    out = []
    for opt in sorted((o for o in present if has_ap(o)), key=pair_rank):
        ref = reference_of(opt)
        if base_of(opt) in present:
            out.append((opt, base_of(opt)))
        if ref is not None and ref in present:
            out.append((opt, ref))
    return out


def is_primary_pair(treated: str, control: str) -> bool:
    """DoPr-X vs X with X one of the primary family's GPs (docs/protocol.md: AdamW and Muon); variants are secondary."""
    return control in PRIMARY_BASES and treated == f"dopr_{control}"


def colour(optimizer: str) -> str:
    return COLOURS.get(optimizer, GREY)


def ordered(optimizers) -> list[str]:
    return sorted(set(optimizers), key=rank)
