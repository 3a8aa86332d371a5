"""Vision: timm and open_clip backbones adapted with the core lifecycle, plus vision's own methods.

Importing ``modalpeft.vision`` registers its methods (``vpt``, ``ssf``, ...) and exports their configs; it loads
the core, torch and timm only. Data modules and Lightning tasks are imported from their modules
(``modalpeft.vision.data``, ``modalpeft.vision.tasks``); ``modalpeft.vision.DeepfakeDetector`` is imported on
first use.
"""

from .methods import SPTConfig, SSFConfig, VPTConfig

__all__ = ["SPTConfig", "SSFConfig", "VPTConfig"]


def __getattr__(name: str):
    """``modalpeft.vision.DeepfakeDetector``, imported on first use (it loads Lightning and open_clip)."""
    if name == "DeepfakeDetector":
        from .deepfake import DeepfakeDetector

        return DeepfakeDetector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
