"""The shared adapter layer set: small modules that native methods compose (see ``core/layer.py``)."""

from .bottleneck import Bottleneck
from .bypass import Bypass
from .experts import LowRankExperts
from .kronecker import KroneckerDelta
from .low_rank import LowRankDelta
from .phm import PHMLinear
from .prompt import PromptTokens
from .scale_shift import ScaleShift
from .selectors import ParamDelta
from .sequence import AttentionStage, DilatedConvStage, SequenceStage
from .sparse import SparseDelta

__all__ = [
    "AttentionStage",
    "Bottleneck",
    "Bypass",
    "DilatedConvStage",
    "KroneckerDelta",
    "LowRankDelta",
    "LowRankExperts",
    "PHMLinear",
    "ParamDelta",
    "PromptTokens",
    "ScaleShift",
    "SequenceStage",
    "SparseDelta",
]
