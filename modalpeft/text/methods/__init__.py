"""Text native methods; importing this package registers them.

The bottleneck family (``houlsby``, ``pfeiffer``, ``parallel_adapter``), ``compacter`` and ``llm_adapters``.
They import ``modalpeft.core`` and torch only (and transformers models are found by structure).
"""

from .bottleneck import HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig, TextBottleneckConfig
from .compacter import CompacterConfig
from .llm_adapters import LLMAdaptersConfig

__all__ = [
    "CompacterConfig",
    "HoulsbyConfig",
    "LLMAdaptersConfig",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "TextBottleneckConfig",
]
