"""Masked point modelling (Point-MAE pretraining) of a :class:`~modalpeft.pointcloud.backbones.PointTransformer`,
and the small pretrained Point-MAE that ships with modalpeft.

Point-MAE (Pang et al., ECCV 2022, https://arxiv.org/abs/2203.06604; repo Pang-Yatian/Point-MAE, ``models/
Point_MAE.py``) pretrains the encoder by hiding a random 60% of the point groups of each cloud and reconstructing
them:

1. group the cloud (FPS centres + kNN, as the encoder does); mask ``round(mask_ratio * G)`` groups per cloud at
   random (``mask_type: rand``);
2. encode the *visible* groups only: mini-PointNet tokens, the positional MLP of their centres re-added before
   every block, the encoder blocks and final norm; no class token;
3. a light decoder (``decoder_depth`` blocks of the same kind, its own positional MLP) sees the visible tokens
   followed by one shared learnt mask token per hidden group, at the hidden centres' positions;
4. a ``Conv1d(C, 3 * M)`` turns each decoded mask token into the ``M`` points of its group (relative to the
   centre); the loss is the Chamfer-L2 distance to the true group: the mean squared distance from each predicted
   point to its nearest true point plus the mean from each true point to its nearest predicted point
   (``ChamferDistanceL2``; the official logs show it x1000).

Difference from the official code: the mini-PointNet runs on the visible groups only (the official code encodes
all groups, then drops the masked tokens); the tokens are the same, but its BatchNorm statistics are taken over
visible groups only.

:class:`MaskedPointModel` is the LightningModule; ``recipes/pointcloud.py fit --config
recipes/pointcloud/point_mae_pretrain_meshes.yaml`` trains it on
:func:`~modalpeft.pointcloud.meshes.build_pretraining_set`;
:func:`~modalpeft.pointcloud.pretrained.export_encoder` writes the committed weights and
:func:`~modalpeft.pointcloud.pretrained.pretrained_backbone` loads them, after checking their sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..lightning.data import EpochSeededSampler
from ..lightning.optim import build_optimizer, param_groups, warmup_cosine
from .backbones import Block, PointTransformer
from .ops import check_points, gather_points, group_points
from .pretrained import export_encoder
from .transforms import ScaleAndTranslate


def chamfer_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Point-MAE's ``ChamferDistanceL2``: ``mean_i min_j |p_i - t_j|^2 + mean_j min_i |p_i - t_j|^2`` over all sets.

    Shapes:
        - pred: ``(S, P, 3)``; target: ``(S, T, 3)``; output: a scalar
    """
    dist = torch.cdist(pred, target).square()  # (S, P, T)
    return dist.min(dim=2).values.mean() + dist.min(dim=1).values.mean()


def random_mask(batch: int, num_group: int, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Point-MAE's ``rand`` mask: exactly ``round(ratio * G)`` hidden groups per cloud, chosen uniformly.

    Shapes:
        - output: ``(B, G)`` bool, ``True`` = hidden
    """
    hidden = int(round(ratio * num_group))
    order = torch.rand(batch, num_group, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_group, dtype=torch.bool)
    mask.scatter_(1, order[:, :hidden], True)
    return mask


class MaskedPointModel(pl.LightningModule):
    """Point-MAE masked point modelling on top of a :class:`PointTransformer` encoder (see the module docstring).

    Args:
        backbone: the encoder to pretrain (its head, class token and final classifier are not used).
        mask_ratio: share of groups hidden per cloud (0.6 in Point-MAE).
        decoder_depth: decoder blocks (4 in Point-MAE).
        decoder_num_heads: decoder heads (6 in Point-MAE for C = 384).
        num_points: points per training cloud: a random subset of the stored cloud (``random_sample`` of
            Point-MAE's ShapeNet-55 loader), then ``ScaleAndTranslate`` (its pretraining ``train_transforms``).
        lr: AdamW learning rate (1e-3 in Point-MAE).
        weight_decay: AdamW weight decay (0.05).
        warmup_epochs: linear warm-up (10 of 300 epochs in Point-MAE).
        min_lr: final learning rate of the cosine.
        seed: seeds the masks and augmentations.
    """

    def __init__(
        self,
        backbone: PointTransformer,
        mask_ratio: float = 0.6,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        num_points: int = 1024,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 10.0,
        min_lr: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio={mask_ratio} must lie strictly between 0 and 1.")
        if not isinstance(backbone, PointTransformer):
            raise TypeError(f"backbone must be a PointTransformer, got {type(backbone).__name__}")
        self.save_hyperparameters(ignore=["backbone"])
        self.model = backbone
        c = backbone.embed_dim
        if c % decoder_num_heads:
            raise ValueError(f"decoder_num_heads={decoder_num_heads} must divide the width {c}.")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))
        self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, c))
        rates = torch.linspace(0, 0.1, decoder_depth).tolist()
        self.decoder_blocks = nn.ModuleList(Block(c, decoder_num_heads, drop_path=r) for r in rates)
        self.decoder_norm = nn.LayerNorm(c)
        self.increase_dim = nn.Conv1d(c, 3 * backbone.group_size, 1)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in [*self.decoder_pos_embed.modules(), *self.decoder_blocks.modules(), self.increase_dim]:
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.augment = ScaleAndTranslate()
        self.generator = torch.Generator().manual_seed(seed)

    def subsample(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random ``num_points`` subset of each cloud: ``(B, N, 3) -> (B, num_points, 3)``."""
        n = self.hparams.num_points
        if points.shape[1] < n:
            raise ValueError(f"the clouds have {points.shape[1]} points, fewer than num_points={n}.")
        choice = torch.rand(points.shape[0], points.shape[1], generator=generator).argsort(dim=1)[:, :n]
        return gather_points(points, choice.to(points.device))

    def reconstruction_loss(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        """Chamfer-L2 between the predicted and true points of the hidden groups.

        Shapes:
            - points: ``(B, N, 3)``; mask: ``(B, G)`` bool (``None``: drawn with ``mask_ratio``)
        """
        enc = self.model
        check_points(points, min_points=enc.min_points)
        neighborhood, center, _ = group_points(points, enc.num_group, enc.group_size)  # (B,G,M,3), (B,G,3)
        b, g, m, _ = neighborhood.shape
        if mask is None:
            mask = random_mask(b, g, self.hparams.mask_ratio, self.generator)
        mask = mask.to(points.device)
        n_hidden = int(mask[0].sum())
        # visible / hidden group indices, each sorted: (B, V) and (B, H)
        order = mask.long().argsort(dim=1, stable=True)
        vis_idx, hid_idx = order[:, : g - n_hidden], order[:, g - n_hidden :]
        vis_groups = gather_points(neighborhood.reshape(b, g, m * 3), vis_idx).reshape(b, -1, m, 3)
        tokens = enc.reduce_dim(enc.encoder(vis_groups))  # (B, V, C)
        vis_pos = enc.pos_embed(gather_points(center, vis_idx))  # (B, V, C)
        for block in enc.blocks:
            tokens = block(tokens, vis_pos)
        tokens = enc.norm(tokens)

        hid_center = gather_points(center, hid_idx)  # (B, H, 3)
        x = torch.cat([tokens, self.mask_token.expand(b, n_hidden, -1)], dim=1)  # (B, V + H, C)
        pos = torch.cat([self.decoder_pos_embed(gather_points(center, vis_idx)), self.decoder_pos_embed(hid_center)], 1)
        for block in self.decoder_blocks:
            x = block(x, pos)
        x = self.decoder_norm(x[:, -n_hidden:])  # (B, H, C)
        pred = self.increase_dim(x.transpose(1, 2)).transpose(1, 2).reshape(b * n_hidden, m, 3)
        target = gather_points(neighborhood.reshape(b, g, m * 3), hid_idx).reshape(b * n_hidden, m, 3)
        return chamfer_l2(pred, target)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = batch[0] if isinstance(batch, (tuple, list)) else batch
        points = self.augment(self.subsample(points, self.generator), self.generator)
        loss = self.reconstruction_loss(points)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/chamfer_x1000", loss.detach() * 1000)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = batch[0] if isinstance(batch, (tuple, list)) else batch
        points = self.subsample(points, torch.Generator().manual_seed(batch_idx))
        g = torch.Generator().manual_seed(10_000 + batch_idx)  # the same masks every validation
        mask = random_mask(points.shape[0], self.model.num_group, self.hparams.mask_ratio, g)
        loss = self.reconstruction_loss(points, mask)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = build_optimizer(param_groups(self, hp.weight_decay), "adamw", hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        schedule = warmup_cosine(optimizer, total, warmup, hp.min_lr / hp.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.trainer.log_dir:
            export_encoder(self.model, Path(self.trainer.log_dir) / "point_mae_meshes.safetensors")


class MeshPretrainDataModule(pl.LightningDataModule):
    """Unlabelled clean clouds from :func:`~modalpeft.pointcloud.meshes.build_pretraining_set`; the last
    ``val_size`` clouds validate.

    Args:
        num_clouds: clouds in the set.
        cloud_points: points per stored cloud.
        val_size: clouds held out for validation.
        batch_size: batch size.
        seed: fixes the set and the training order.
        cache_dir: where the set's ``.npz`` goes (see :func:`~modalpeft.pointcloud.meshes.cache_root`).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_clouds: int = 4000,
        cloud_points: int = 1024,
        val_size: int = 200,
        batch_size: int = 32,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= val_size < num_clouds:
            raise ValueError(f"val_size={val_size} must be >= 0 and below num_clouds={num_clouds}.")
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        from .meshes import build_pretraining_set

        hp = self.hparams
        points = torch.from_numpy(build_pretraining_set(hp.num_clouds, hp.cloud_points, hp.seed, hp.cache_dir))
        split = hp.num_clouds - hp.val_size
        self.train_set, self.val_set = TensorDataset(points[:split]), TensorDataset(points[split:])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.hparams.seed)
        return DataLoader(
            self.train_set,
            self.hparams.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_size == 0:
            return []
        return DataLoader(self.val_set, self.hparams.batch_size, num_workers=self.hparams.num_workers)


__all__ = ["MaskedPointModel", "MeshPretrainDataModule", "chamfer_l2", "export_encoder", "random_mask"]
