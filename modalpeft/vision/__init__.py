"""Vision: timm and open_clip backbones adapted with the core lifecycle, plus vision's own methods.

Importing ``modalpeft.vision`` registers its methods (``vpt``, ``ssf``, ...) and exports their configs; it loads
the core, torch and timm only. Data modules and Lightning tasks are imported from their modules
(``modalpeft.vision.data``, ``modalpeft.vision.tasks``).
"""

from .methods import SPTConfig, SSFConfig, VPTConfig

__all__ = ["SPTConfig", "SSFConfig", "VPTConfig"]
