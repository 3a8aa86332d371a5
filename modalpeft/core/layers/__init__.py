"""The shared adapter layer set: small modules that native methods compose (see ``core/layer.py``)."""

from .low_rank import LowRankDelta
from .selectors import ParamDelta

__all__ = ["LowRankDelta", "ParamDelta"]
