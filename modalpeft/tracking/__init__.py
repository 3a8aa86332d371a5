"""Tracking: pretrained ViTs made into visual object trackers, TMoE (SPMTrack), and the tracking metrics.

Importing ``modalpeft.tracking`` registers its methods (``tmoe``) and exports their configs; it loads the core and
torch only. The metrics and the official result-file writers are in ``modalpeft.tracking.metrics``. A tracker is a
vision model: this package may import ``modalpeft.vision`` (its backbones and transforms), never the reverse.
"""

from .methods import TMoEConfig

__all__ = ["TMoEConfig"]
