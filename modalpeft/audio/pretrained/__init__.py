"""The committed symbolic music LM: a one-codebook MusicGen decoder pretrained on the music21 corpus.

``symbolic_lm_music21.safetensors`` (float32, :func:`~modalpeft.audio.backbones.symbolic_music_lm` ``"demo"`` key
names) was written by ``recipes/audio/symbolic_lm_pretrain_music21.yaml``; ``README.md`` beside it gives the command,
the data and the measured losses. :func:`pretrained_symbolic_lm` checks the file's sha256 before loading it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

SYMBOLIC_FILE = Path(__file__).resolve().parent / "symbolic_lm_music21.safetensors"
SYMBOLIC_SHA256 = "04b6f52dd381de7899e38a120c3eb9f7e8a24579a86a5c4a9ac77564f76db210"
"""The sha256 of :data:`SYMBOLIC_FILE` (also in ``README.md``)."""


def pretrained_symbolic_lm(pretrained: bool = True) -> nn.Module:
    """The ``"demo"`` symbolic music LM (:func:`~modalpeft.audio.backbones.symbolic_music_lm`), with the committed
    weights when ``pretrained`` (random ones otherwise: seed the caller's RNG), in eval mode.

    Raises:
        ValueError: the weights file is missing or its sha256 differs (the file is named, with the fix).
    """
    from safetensors.torch import load

    from ..backbones import symbolic_music_lm

    model = symbolic_music_lm("demo")
    if pretrained:
        if not SYMBOLIC_FILE.is_file():
            raise ValueError(
                f"{SYMBOLIC_FILE} is missing: reinstall modalpeft, or pretrain it with "
                "recipes/audio/symbolic_lm_pretrain_music21.yaml (see the README beside it)."
            )
        data = SYMBOLIC_FILE.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != SYMBOLIC_SHA256:
            raise ValueError(
                f"{SYMBOLIC_FILE} has sha256 {digest}, not the committed {SYMBOLIC_SHA256}: the file is damaged or "
                "was replaced; restore it from the repository (git checkout -- <file>)."
            )
        model.load_state_dict(load(data), strict=True)
    return model.eval()


__all__ = ["SYMBOLIC_FILE", "SYMBOLIC_SHA256", "pretrained_symbolic_lm"]
