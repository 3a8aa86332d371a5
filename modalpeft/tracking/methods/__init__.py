"""Tracking's native methods, one file each; importing this package registers them.

They import ``modalpeft.core``, torch and timm only.
"""

from .tmoe import TMoEConfig

__all__ = ["TMoEConfig"]
