"""Diffusion: PEFT of text-to-image denoisers (diffusers ``UNet2DConditionModel``) and their adapter files.

Importing ``modalpeft.diffusion`` registers its methods (``diffusekrona``) and exports their configs; it loads
the core and torch only (diffusers is imported where a pipeline is used).
"""

from .methods import DiffuseKronAConfig

__all__ = ["DiffuseKronAConfig"]
