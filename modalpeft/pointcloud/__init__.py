"""Point clouds: the Point-MAE / Point-BERT encoder, FPS and kNN ops, and the point-cloud PEFT methods.

Importing ``modalpeft.pointcloud`` registers its methods (``pointgst``, ``point_peft``) and exports their configs;
it loads the core, torch and timm only. Data modules and Lightning tasks are imported from their modules.
"""

from .backbones import PointTransformer, checkpoint_filter_fn, create_backbone, list_backbones
from .methods import PointGSTConfig, PointPEFTConfig
from .ops import farthest_point_sample, group_points, knn

__all__ = [
    "PointGSTConfig",
    "PointPEFTConfig",
    "PointTransformer",
    "checkpoint_filter_fn",
    "create_backbone",
    "farthest_point_sample",
    "group_points",
    "knn",
    "list_backbones",
]

# the small Point-MAE pretrained on offline meshes (data modules and tasks: modalpeft.pointcloud.data / .tasks)
from .pretrained import pretrained_backbone  # noqa: E402

__all__ += ["pretrained_backbone"]
