"""Audio native methods; importing this package registers them (``music_adapter``).

They import ``modalpeft.core`` and torch only (transformers' MusicGen is found by structure).
"""

from .music_adapter import MusicAdapterConfig

__all__ = ["MusicAdapterConfig"]
