"""Diffusion native methods, one file each; importing this package registers them.

They import ``modalpeft.core`` and torch only.
"""

from .diffusekrona import DiffuseKronAConfig

__all__ = ["DiffuseKronAConfig"]
