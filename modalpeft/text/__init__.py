"""Text: transformers backbones found by structure, and the text PEFT methods peft lacks.

Importing ``modalpeft.text`` registers its methods (``houlsby``, ``pfeiffer``, ``parallel_adapter``,
``compacter``, ``llm_adapters``, ``sora``, ``lofit``) and exports their configs; it loads the core and
torch only (transformers is imported when a backbone is loaded or built).
"""

from .backbones import last_token_pool, load_backbone, mean_pool, minilm_path, tiny_model, verify_minilm
from .methods import (
    CompacterConfig,
    DePTConfig,
    HoulsbyConfig,
    LLMAdaptersConfig,
    LoFiTConfig,
    MAMConfig,
    ParallelAdapterConfig,
    PfeifferConfig,
    SoRAConfig,
)
from .structure import BlockParts, find_blocks, find_norms

__all__ = [
    "BlockParts",
    "CompacterConfig",
    "DePTConfig",
    "HoulsbyConfig",
    "LLMAdaptersConfig",
    "LoFiTConfig",
    "MAMConfig",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "SoRAConfig",
    "find_blocks",
    "find_norms",
    "last_token_pool",
    "load_backbone",
    "mean_pool",
    "minilm_path",
    "tiny_model",
    "verify_minilm",
]
