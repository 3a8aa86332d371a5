"""The small Point-MAE pretrained by modalpeft on offline meshes: its configuration, the committed weights and
their loader.

``point_mae_meshes.safetensors`` (float16, :class:`~modalpeft.pointcloud.backbones.PointTransformer` key names, no
head) was written by ``python recipes/pointcloud.py fit --config recipes/pointcloud/point_mae_pretrain_meshes.yaml``
(masked point modelling, :mod:`modalpeft.pointcloud.pretrain`); ``README.md`` beside it gives the command, the data,
the sha256 and the measured loss. :func:`pretrained_backbone` checks the sha256 before loading. Nothing here imports
Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...core.state import read_verified_weights, sha256_of
from ..backbones import PointTransformer, create_backbone

MESHES_BACKBONE_KWARGS: dict[str, Any] = {
    "num_group": 32,
    "group_size": 16,
    "num_points": 512,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
}
"""The small Point-MAE pretrained on the offline meshes (``create_backbone("point_mae", **these)``): C = 192, 6 blocks
of 3 heads, 32 groups of 16 points from 512-point clouds; 3.09M encoder parameters."""

MESHES_FILE = Path(__file__).resolve().parent / "point_mae_meshes.safetensors"
"""The committed encoder weights (float16; :class:`PointTransformer` key names, no head)."""

MESHES_SHA256 = "4c0282e30bddd398939d694cec78e85d1010b003dc16328c86ae399efa04a1a4"
"""sha256 of :data:`MESHES_FILE`, checked before every load."""


# -- the weights --------------------------------------------------------------------------------------


def export_encoder(model: PointTransformer, path: str | os.PathLike[str]) -> str:
    """Write the encoder's weights (no head; BatchNorm buffers included) as float16 safetensors, atomically;
    returns the file's sha256."""
    from ...core.state import atomic_write

    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("head.")}
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    atomic_write({path.name: state}, path.parent)
    return sha256_of(path)


def pretrained_backbone(
    num_classes: int = 12,
    pretrained: bool = True,
    checkpoint_path: str | None = None,
    num_group: int | None = None,
    group_size: int | None = None,
    drop_path_rate: float = 0.1,
    head_dropout: float = 0.5,
) -> PointTransformer:
    """The small Point-MAE pretrained on the offline meshes (:data:`MESHES_BACKBONE_KWARGS`), with a fresh head.

    Usable as a recipe backbone: ``backbone: {class_path: modalpeft.pointcloud.pretrained.pretrained_backbone,
    init_args: {num_classes: 12}}``.

    Args:
        num_classes: classifier outputs (0: none).
        pretrained: load the committed weights (``False``: the same architecture, randomly initialised).
        checkpoint_path: the weights file (default :data:`MESHES_FILE`); its sha256 must be :data:`MESHES_SHA256`.
        num_group: groups per cloud (``None``: 32, as pretrained); the weights do not depend on it.
        group_size: points per group (``None``: 16, as pretrained).
        drop_path_rate: stochastic depth of the last block.
        head_dropout: dropout in the classification head.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: its sha256 differs (a corrupted or replaced file).
    """
    kwargs = dict(MESHES_BACKBONE_KWARGS, drop_path_rate=drop_path_rate, head_dropout=head_dropout)
    kwargs.update({k: v for k, v in (("num_group", num_group), ("group_size", group_size)) if v is not None})
    model = create_backbone("point_mae", num_classes=num_classes, **kwargs)
    if pretrained:
        path = checkpoint_path if checkpoint_path is not None else MESHES_FILE
        tensors = read_verified_weights(
            path,
            MESHES_SHA256,
            "pretrained_backbone",
            "it ships with modalpeft (modalpeft/pointcloud/pretrained/, see its README.md): reinstall or restore it, "
            "or pass pretrained=False.",
        )
        state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith(("head.", "class_token."))]
        if bad_missing or unexpected:
            raise ValueError(f"{path} does not fit the backbone: missing {bad_missing}, unexpected {unexpected}.")
    return model


__all__ = [
    "MESHES_BACKBONE_KWARGS",
    "MESHES_FILE",
    "MESHES_SHA256",
    "export_encoder",
    "pretrained_backbone",
    "sha256_of",
]
