"""Diffusion: PEFT of text-to-image denoisers (diffusers ``UNet2DConditionModel``) and their adapter files.

Importing ``modalpeft.diffusion`` registers its methods (``diffusekrona``) and exports their configs and the
pipeline helpers; it loads the core and torch only (diffusers is the user's).
"""

from .export import export_lokr, load_lokr
from .methods import DiffuseKronAConfig
from .pipeline import load_into_pipeline, set_scale

__all__ = ["DiffuseKronAConfig", "export_lokr", "load_lokr", "load_into_pipeline", "set_scale"]
