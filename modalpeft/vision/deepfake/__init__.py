"""Deepfake detection by LayerNorm tuning of a frozen CLIP visual encoder (Yermakov et al., arXiv 2503.19683).

- :mod:`.detector`: :class:`DeepfakeDetector` (the Lightning task), :class:`DeepfakeModel` (encoder + L2-normalised
  linear head), slerp feature augmentation, alignment/uniformity losses, encoder factories;
- :mod:`.data`: frame-folder data modules (FF++ and ``real/`` ``fake/`` layouts, cross-dataset evaluation) and the
  offline LFW splice data;
- :mod:`.metrics`: frame- and video-level AUROC, AP, EER;
- :mod:`.manipulate`: offline partial face manipulations and pseudo-videos;
- :mod:`.predict`: PyAV decoding and the per-video CSV writer;
- :mod:`.demo`: the offline demo (LN tuning vs linear probe vs full fine-tuning).
"""

from .detector import DeepfakeDetector, DeepfakeModel, hf_clip_vision, open_clip_visual
from .metrics import DeepfakeMetrics

__all__ = ["DeepfakeDetector", "DeepfakeMetrics", "DeepfakeModel", "hf_clip_vision", "open_clip_visual"]
