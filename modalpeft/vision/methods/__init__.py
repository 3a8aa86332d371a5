"""Vision's native methods, one file each; importing this package registers them.

They import ``modalpeft.core``, torch and timm only.
"""

from .spt import SPTConfig
from .ssf import SSFConfig
from .vpt import VPTConfig

__all__ = ["SPTConfig", "SSFConfig", "VPTConfig"]
