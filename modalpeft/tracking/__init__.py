"""Tracking: pretrained ViTs made into visual object trackers, TMoE (SPMTrack), and the tracking metrics.

Importing ``modalpeft.tracking`` registers its methods (``tmoe``) and exports their configs; it loads the core and
torch only. The tracker (``OneStreamTracker``, ``checkpoint_filter_fn``) is in ``modalpeft.tracking.models``, its
loss and box helpers in ``.losses``, the data sets in ``.data`` (pairs in ``.pairs``, crops in ``.transforms``), the
Lightning task in ``.tasks``, frame-by-frame tracking in ``.inference`` (``Tracker``) and ``.track`` (the ``track``
command), the metrics and the official result-file writers in ``.metrics``. A tracker is a
vision model: this package may import ``modalpeft.vision`` (its backbones and transforms), never the reverse.
"""

from .methods import TMoEConfig

__all__ = ["TMoEConfig"]
