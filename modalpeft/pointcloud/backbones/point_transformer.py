"""The Point-MAE / Point-BERT point-cloud transformer encoder, with timm's model interface.

Papers: Point-MAE (Pang et al., ECCV 2022, https://arxiv.org/abs/2203.06604, repo Pang-Yatian/Point-MAE) and
Point-BERT (Yu et al., CVPR 2022, https://arxiv.org/abs/2111.14819, repo lulutang0608/Point-BERT). Both fine-tune
the same encoder:

1. ``G`` group centres by farthest-point sampling, each with its ``M`` nearest points, expressed relative to the
   centre (:class:`Group`);
2. a mini-PointNet turns every group into one token (:class:`PointEncoder`; Point-BERT adds a Linear
   ``reduce_dim`` from 256 to ``C``);
3. a positional MLP of the centres, ``pos = MLP(center)``, which is *re-added before every block*;
4. a class token with its own position, ``L`` pre-norm transformer blocks, a final LayerNorm;
5. the head on ``cat(class token, max over the patch tokens)``: MLP ``2C -> 256 -> 256 -> K`` with BatchNorm,
   ReLU and dropout 0.5.

timm's interface: ``forward_features(points) -> (B, 1 + G, C)`` tokens, ``forward_head(x, pre_logits=False)``,
``reset_classifier(num_classes)``, ``num_features`` / ``embed_dim`` (``C``), ``head_hidden_size`` (``2C``, the
pooled width), ``blocks`` (an ``nn.ModuleList``), ``num_prefix_tokens`` (1), ``norm``, ``head``. For VPT's init
bound, ``patch_embed`` is the token encoder and ``patch_embed.patch_size == (group_size, 1)``, so a token's fan-in
``3·group_size`` plays the part of an image patch's ``3·patch_area``.

Blocks take ``(x, pos)`` and add ``pos`` to the class token and the last ``G`` tokens; any tokens between them
(prompts inserted by VPT or Point-PEFT) get no position, so prompt methods work through the block interface.
Each block's MLP half is a :class:`MlpResidual` module (``x + drop_path(mlp(norm2(x)))``): adapters that read the
post-attention stream and add beside the MLP branch (PointGST) host it with a parallel branch.

Differences from the official code: the FPS start point is the point farthest from the centroid (the official
CUDA FPS starts at index 0), so groups do not depend on the order of the points; the official kernel's rule of
never picking a point within ``|p|² <= 1e-3`` of the origin is off by default (``fps_min_sq_norm=1e-3`` follows
it; :mod:`modalpeft.pointcloud.ops`); the encoder's parameter names
follow timm (``blocks.0.norm1`` instead of ``blocks.blocks.0.norm1``, ``head`` instead of ``cls_head_finetune``,
``blocks.0.mlp_residual.norm2`` for the second norm, ``class_token.token`` / ``class_token.pos`` for
``cls_token`` / ``cls_pos``, which stay readable under their old names); :func:`checkpoint_filter_fn` maps
official checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from ..ops import check_points, group_points


class Group(nn.Module):
    """FPS centres and their kNN groups, centred (no parameters).

    Shapes:
        - input: ``(B, N, 3)``
        - output: neighbourhoods ``(B, G, M, 3)``, centres ``(B, G, 3)``
    """

    def __init__(self, num_group: int, group_size: int, fps_min_sq_norm: float | None = None) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size
        self.fps_min_sq_norm = fps_min_sq_norm

    def forward(self, xyz: Tensor) -> tuple[Tensor, Tensor]:
        neighborhood, center, _ = group_points(xyz, self.num_group, self.group_size, self.fps_min_sq_norm)
        return neighborhood, center

    def extra_repr(self) -> str:
        return f"num_group={self.num_group}, group_size={self.group_size}"


class PointEncoder(nn.Module):
    """Point-MAE's mini-PointNet: shared MLPs with a max-pool in the middle and at the end.

    ``f = conv(3->128->256)(p)``, ``g = max_M f``, ``h = conv(512->512->E)([g, f])``, ``token = max_M h``.

    Shapes:
        - input: ``(B, G, M, 3)``
        - output: ``(B, G, E)``
    """

    def __init__(self, out_dim: int, group_size: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.patch_size = (group_size, 1)
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1)
        )

    def forward(self, groups: Tensor) -> Tensor:
        b, g, m, _ = groups.shape
        f = self.first_conv(groups.reshape(b * g, m, 3).transpose(1, 2))  # (BG, 256, M)
        pooled = f.max(dim=2, keepdim=True).values  # (BG, 256, 1)
        f = torch.cat([pooled.expand(-1, -1, m), f], dim=1)  # (BG, 512, M)
        f = self.second_conv(f).max(dim=2).values  # (BG, E)
        return f.reshape(b, g, self.out_dim)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (no bias, as Point-MAE) and an output ``proj``.

    Shapes:
        - input / output: ``(B, N, C)``
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, C/H)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class MlpResidual(nn.Module):
    """The MLP half of a block: ``x + drop_path(mlp(norm2(x)))``.

    A module of its own so that an adapter can read the post-attention stream ``x`` and add its output beside
    the MLP branch (PointGST's PCSA) by hosting it with a parallel branch.

    Shapes:
        - input / output: ``(B, N, C)``
    """

    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Block(nn.Module):
    """Pre-norm transformer block that first adds the positional embedding: ``x = x + pos`` then attention, MLP.

    ``pos`` covers the ``num_prefix_tokens`` leading tokens and the last ``G`` tokens; tokens between them (prompts
    that a method inserted) get no position.

    Shapes:
        - x: ``(B, k + p + G, C)``; pos: ``(B, k + G, C)`` or ``None``
        - output: ``(B, k + p + G, C)``
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp_residual = MlpResidual(dim, mlp_ratio, drop, drop_path)

    def add_pos(self, x: Tensor, pos: Tensor | None) -> Tensor:
        if pos is None:
            return x
        extra = x.shape[1] - pos.shape[1]
        if extra == 0:
            return x + pos
        if extra < 0:
            raise ValueError(f"the block got {x.shape[1]} tokens but {pos.shape[1]} positions")
        k = self.num_prefix_tokens
        zeros = pos.new_zeros(pos.shape[0], extra, pos.shape[2])
        return x + torch.cat([pos[:, :k], zeros, pos[:, k:]], dim=1)

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        x = self.add_pos(x, pos)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.mlp_residual(x)


class ClassToken(nn.Module):
    """The class token and its position, prepended to the patch tokens and positions.

    A module of its own so that methods can tune both (PointGST, Point-PEFT) through the adapter lifecycle.

    Shapes:
        - input: tokens ``(B, G, C)``, positions ``(B, G, C)``
        - output: ``(B, 1 + G, C)`` each
        - ``token``, ``pos``: ``(1, 1, C)``
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, tokens: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        b = tokens.shape[0]
        x = torch.cat([self.token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        return x, torch.cat([self.pos.expand(b, -1, -1).to(pos.dtype), pos], dim=1)


def _classifier(in_dim: int, num_classes: int, dropout: float) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    return nn.Sequential(
        nn.Linear(in_dim, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(256, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )


class PointTransformer(nn.Module):
    """Point-MAE / Point-BERT encoder with a classification head (see the module docstring).

    Args:
        num_classes: head outputs ``K`` (``0``: no head, ``forward`` returns the pooled ``2C`` features).
        num_points: points per input cloud the configuration is meant for (documentation and recipes only;
            any ``N >= max(num_group, group_size)`` works).
        num_group: ``G``, the number of FPS centres (tokens).
        group_size: ``M``, points per group.
        embed_dim: ``C``.
        depth: number of blocks ``L``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``C``.
        encoder_dim: width of the mini-PointNet's tokens; ``None``: ``C``. Point-BERT uses 256 and a Linear
            ``reduce_dim`` to ``C``.
        qkv_bias: bias in the ``qkv`` Linear (``False`` in Point-MAE and Point-BERT).
        drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: attention dropout.
        drop_path_rate: the last block's drop-path rate (linear from 0).
        head_dropout: dropout in the classification head (0.5 in the official code).
        fps_min_sq_norm: FPS never picks a centre with ``|p|² <=`` this after the first (the official pointnet2
            kernel's 1e-3, ``ops.OFFICIAL_MIN_SQ_NORM``); ``None``: any point (see :mod:`modalpeft.pointcloud.ops`).

    Shapes:
        - input: ``(B, N, 3)`` xyz
        - ``forward_features``: ``(B, 1 + G, C)``
        - output: ``(B, K)`` logits
    """

    def __init__(
        self,
        num_classes: int = 40,
        num_points: int = 1024,
        num_group: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        encoder_dim: int | None = None,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        head_dropout: float = 0.5,
        fps_min_sq_norm: float | None = None,
    ) -> None:
        super().__init__()
        if num_group < 1 or group_size < 1:
            raise ValueError(f"num_group={num_group} and group_size={group_size} must be >= 1")
        self.num_classes = num_classes
        self.num_points = num_points
        self.num_group, self.group_size = num_group, group_size
        self.embed_dim = self.num_features = embed_dim
        self.head_hidden_size = 2 * embed_dim
        self.num_prefix_tokens = 1
        self.head_dropout = head_dropout
        encoder_dim = embed_dim if encoder_dim is None else encoder_dim

        self.group_divider = Group(num_group, group_size, fps_min_sq_norm)
        self.encoder = PointEncoder(encoder_dim, group_size)
        self.reduce_dim = nn.Linear(encoder_dim, embed_dim) if encoder_dim != embed_dim else nn.Identity()
        self.class_token = ClassToken(embed_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = _classifier(2 * embed_dim, num_classes, head_dropout)
        self.init_weights()

    @property
    def cls_token(self) -> nn.Parameter:
        return self.class_token.token

    @property
    def cls_pos(self) -> nn.Parameter:
        return self.class_token.pos

    @property
    def patch_embed(self) -> PointEncoder:
        """The token encoder, under timm's name (``patch_embed.patch_size == (group_size, 1)``)."""
        return self.encoder

    @property
    def min_points(self) -> int:
        """The fewest points per cloud this configuration can group."""
        return max(self.num_group, self.group_size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Point-MAE's init: truncated-normal (std 0.02) Linear and Conv1d weights and class token/position, zero
        biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (``0``: none)."""
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = _classifier(2 * self.embed_dim, num_classes, self.head_dropout).to(ref.device, ref.dtype)

    def get_classifier(self) -> nn.Module:
        return self.head

    def embed(self, points: Tensor, patches: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Validate and group the input, encode the tokens.

        ``patches``: encode only the first this many of the ``G`` patches (their tokens are those of the full
        encoding when the encoder's BatchNorms are in eval mode: each patch is encoded on its own); the centres
        stay all ``G``.

        Returns:
            tokens ``(B, 1 + G', C)`` (class token first), positions ``(B, 1 + G', C)``, centres ``(B, G, 3)``.
        """
        check_points(points, min_points=self.min_points)
        neighborhood, center = self.group_divider(points)
        kept = center if patches is None else center[:, :patches]
        tokens = self.reduce_dim(self.encoder(neighborhood[:, : kept.shape[1]]))  # (B, G', C)
        x, pos = self.class_token(tokens, self.pos_embed(kept))  # (B, 1 + G', C) each
        return x, pos, center

    def forward_features(self, points: Tensor) -> Tensor:
        x, pos, _ = self.embed(points)
        for block in self.blocks:
            x = block(x, pos)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``head(cat(x[:, 0], max over x[:, num_prefix_tokens:]))``; the max includes any prompts left in ``x``."""
        pooled = torch.cat([x[:, 0], x[:, self.num_prefix_tokens :].max(dim=1).values], dim=-1)  # (B, 2C)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, points: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(points))


# -- official checkpoints --------------------------------------------------------------------------------------

_DROPPED_PREFIXES = (
    "MAE_decoder.",
    "decoder_pos_embed.",
    "mask_token",
    "increase_dim.",
    "lm_head.",
    "cls_head.",
    "dvae.",
    "transformer_k.",
    "queue",
    "mask_token",
)
"""Pretraining-only parts of official checkpoints (MAE decoder, Point-BERT's dVAE, momentum encoder, MoCo queue)."""


def _rename(key: str) -> str:
    for old in ("module.", "base_model.", "MAE_encoder.", "transformer_q."):
        if key.startswith(old):
            key = key[len(old) :]
    if key.startswith("blocks.blocks."):
        key = "blocks." + key[len("blocks.blocks.") :]
    if key.startswith("cls_head_finetune."):
        key = "head." + key[len("cls_head_finetune.") :]
    key = {"cls_token": "class_token.token", "cls_pos": "class_token.pos"}.get(key, key)
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[2] in ("norm2", "mlp"):
        key = ".".join([*parts[:2], "mlp_residual", *parts[2:]])
    return key


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: PointTransformer) -> dict[str, Tensor]:
    """Map an official Point-MAE or Point-BERT checkpoint onto :class:`PointTransformer` keys (pure function).

    Accepts the whole checkpoint (``{"base_model": ..., ...}``, as ``pretrain.pth`` holds it; ``"model"`` and
    ``"state_dict"`` too) or the state dict, with any of the official prefixes: ``module.`` (DataParallel),
    ``MAE_encoder.`` (Point-MAE pretraining), ``transformer_q.`` (Point-BERT's MoCo query encoder), ``base_model.``.
    Pretraining-only parts (the MAE decoder, the mask token, Point-BERT's dVAE, ``lm_head``, ``cls_head``, the
    momentum encoder and queue) are dropped. The head is kept only when its shapes fit ``model``'s.

    Raises:
        ValueError: keys that are neither known pretraining-only parts nor ``model`` parameters (listed), or shapes
            that do not fit ``model`` (listed with both shapes): the checkpoint is for another configuration.
    """
    for wrapper in ("base_model", "model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
            break
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    unknown, mismatched = [], []
    for key, value in state_dict.items():
        new = _rename(key)
        if new.startswith(_DROPPED_PREFIXES) or not isinstance(value, Tensor):
            continue
        if new not in target:
            unknown.append(key)
            continue
        if value.shape != target[new].shape:
            if new.startswith("head."):
                continue  # a head for another number of classes: the model keeps its new head
            mismatched.append(f"{key} -> {new}: checkpoint {tuple(value.shape)} vs model {tuple(target[new].shape)}")
            continue
        out[new] = value
    if unknown or mismatched:
        raise ValueError(
            "the checkpoint does not fit this PointTransformer configuration"
            f"\n  unknown keys ({len(unknown)}): {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
            f"\n  shape mismatches ({len(mismatched)}): {mismatched[:10]}"
            "\nCheck that the backbone name matches the checkpoint (point_mae vs point_bert, num_group, embed_dim)."
        )
    return out


# -- configurations ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    kwargs: dict[str, Any]
    doc: str


_CONFIGS: dict[str, _Entry] = {
    "point_mae": _Entry(
        {"num_group": 64, "group_size": 32, "num_points": 1024, "embed_dim": 384, "depth": 12, "num_heads": 6},
        "Point-MAE encoder, C=384, 12 blocks, 6 heads, 64 groups of 32 (ModelNet40, 1024 points).",
    ),
    "point_mae_g128": _Entry(
        {"num_group": 128, "group_size": 32, "num_points": 2048, "embed_dim": 384, "depth": 12, "num_heads": 6},
        "Point-MAE encoder with 128 groups of 32 (ScanObjectNN, 2048 points).",
    ),
    "point_bert": _Entry(
        {
            "num_group": 64,
            "group_size": 32,
            "num_points": 1024,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "encoder_dim": 256,
        },
        "Point-BERT encoder: as Point-MAE, with 256-wide group tokens and a Linear reduce_dim to 384.",
    ),
    "point_mae_test": _Entry(
        {
            "num_group": 16,
            "group_size": 8,
            "num_points": 128,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "drop_path_rate": 0.0,
        },
        "Tiny test configuration: C=32, 2 blocks, 16 groups of 8 (128 points); seconds on a CPU.",
    ),
}


def list_backbones() -> list[str]:
    """Names :func:`create_backbone` accepts."""
    return sorted(_CONFIGS)


def create_backbone(
    name: str, num_classes: int = 40, *, checkpoint_path: str | None = None, **kwargs: Any
) -> PointTransformer:
    """Build a registered point-cloud backbone, optionally from an official checkpoint file.

    Args:
        name: one of :func:`list_backbones` (``point_mae``, ``point_mae_g128``, ``point_bert``, ``point_mae_test``).
        num_classes: head outputs (``0``: no head).
        checkpoint_path: an official ``.pth`` (read with ``torch.load(weights_only=True)``) or a ``.safetensors``
            file; mapped with :func:`checkpoint_filter_fn`. Parameters it does not hold (the class token of a
            Point-MAE pretraining checkpoint, a new head) keep their fresh init.
        kwargs: overrides of the configuration (``num_group``, ``drop_path_rate``, ...).
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown point-cloud backbone {name!r}; choose one of {list_backbones()}.")
    model = PointTransformer(num_classes=num_classes, **{**_CONFIGS[name].kwargs, **kwargs})
    if checkpoint_path:
        model.load_state_dict(checkpoint_filter_fn(_read_checkpoint(checkpoint_path), model), strict=False)
    return model


def _read_checkpoint(path: str) -> Mapping[str, Any]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) ({e}); modalpeft never unpickles arbitrary "
            "objects. Re-save the checkpoint's tensors only (e.g. as safetensors)."
        ) from e
