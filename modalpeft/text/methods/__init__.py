"""Text native methods; importing this package registers them.

The bottleneck family (``houlsby``, ``pfeiffer``, ``parallel_adapter``), ``compacter``, ``llm_adapters``,
``sora`` and ``lofit``.
They import ``modalpeft.core`` and torch only (and transformers models are found by structure).
"""

from .bottleneck import HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig, TextBottleneckConfig
from .compacter import CompacterConfig
from .dept import DePTConfig
from .llm_adapters import LLMAdaptersConfig
from .lofit import LoFiTConfig
from .mam import MAMConfig
from .sora import SoRAConfig

__all__ = [
    "CompacterConfig",
    "DePTConfig",
    "HoulsbyConfig",
    "LLMAdaptersConfig",
    "LoFiTConfig",
    "MAMConfig",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "SoRAConfig",
    "TextBottleneckConfig",
]
