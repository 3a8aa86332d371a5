"""Audio: music adapters for MusicGen-style decoders (and any decoder with a block list).

Importing ``modalpeft.audio`` registers its method (``music_adapter``: linear, convolutional and transformer
bottlenecks after the decoder blocks) and exports its config; it loads the core and torch only (transformers is
imported when a MusicGen model is built).
"""

from .methods import MusicAdapterConfig
from .methods.music_adapter import decoder_blocks

__all__ = ["MusicAdapterConfig", "decoder_blocks"]
