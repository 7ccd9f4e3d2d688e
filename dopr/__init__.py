"""DoPr: activation-wise preconditioning (AP) in front of any gradient optimizer.

Importable on its own: depends on torch only.
"""

from .chain import Chain
from .factory import BASES, DoPr, build_base, build_optimizer, muon_split, parameter_groups
from .optimizers import AdaMuon, Muon, Signum, newton_schulz
from .preconditioner import FALLBACK_KINDS, ActivationPreconditioner, CoverageWarning

__all__ = [
    "ActivationPreconditioner", "DoPr", "Chain", "Muon", "AdaMuon", "Signum", "newton_schulz",
    "build_optimizer", "build_base", "parameter_groups", "muon_split", "BASES", "FALLBACK_KINDS", "CoverageWarning",
]
__version__ = "0.1.0"
