"""The shared adapter layer set: small modules that native methods compose (see ``core/layer.py``)."""

from .bottleneck import Bottleneck
from .bypass import Bypass
from .dropout import MaskDropout
from .experts import LowRankExperts
from .factorized import FactorizedVector
from .growing import GrowingLowRank
from .kronecker import KroneckerDelta
from .low_rank import LowRankDelta
from .partial import PartialColumns
from .phm import PHMLinear
from .prompt import PromptTokens
from .scale_shift import (
    FoldedScaleShift,
    PreNormResidualTaps,
    RecomputingScaleShift,
    ResidualScaleShift,
    ScaleShift,
    scale_shift_for,
)
from .selectors import ParamDelta
from .sequence import AttentionStage, DilatedConvStage, SequenceStage
from .sparse import SparseDelta

__all__ = [
    "AttentionStage",
    "Bottleneck",
    "Bypass",
    "DilatedConvStage",
    "FoldedScaleShift",
    "FactorizedVector",
    "GrowingLowRank",
    "KroneckerDelta",
    "LowRankDelta",
    "LowRankExperts",
    "MaskDropout",
    "PHMLinear",
    "PartialColumns",
    "ParamDelta",
    "PromptTokens",
    "PreNormResidualTaps",
    "RecomputingScaleShift",
    "ResidualScaleShift",
    "ScaleShift",
    "SequenceStage",
    "SparseDelta",
    "scale_shift_for",
]
