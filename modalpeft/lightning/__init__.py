"""Lightning on top of the core: task systems, adapter-only checkpoints, export, data helpers, the CLI.

Imports ``modalpeft.core`` only.
"""

from .backbones import timm_backbone
from .checkpoint import AdapterExport
from .cli import cli_main
from .data import DigitsDataModule, EpochSeededSampler
from .growth import RankGrowth
from .mwa import MetricWeightedAveraging
from .task import AdapterTask, ClassificationTask, prepare_backbone

__all__ = [
    "AdapterExport",
    "AdapterTask",
    "ClassificationTask",
    "DigitsDataModule",
    "EpochSeededSampler",
    "MetricWeightedAveraging",
    "RankGrowth",
    "cli_main",
    "prepare_backbone",
    "timm_backbone",
]
