"""Point-cloud backbones with timm's interface; :func:`create_backbone` builds them by name."""

from .point_transformer import (
    Block,
    ClassToken,
    Group,
    PointEncoder,
    PointTransformer,
    checkpoint_filter_fn,
    create_backbone,
    list_backbones,
)

__all__ = [
    "Block",
    "ClassToken",
    "Group",
    "PointEncoder",
    "PointTransformer",
    "checkpoint_filter_fn",
    "create_backbone",
    "list_backbones",
]
