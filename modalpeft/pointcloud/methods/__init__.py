"""Point-cloud native methods, one file each; importing this package registers them.

They import ``modalpeft.core``, torch and timm only.
"""

from .point_peft import PointPEFTConfig
from .pointgst import PointGSTConfig

__all__ = ["PointGSTConfig", "PointPEFTConfig"]
