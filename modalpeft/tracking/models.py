"""The one-stream spatio-temporal tracker of SPMTrack (Cai et al., CVPR 2025, https://arxiv.org/abs/2503.18338).

:class:`OneStreamTracker` turns a timm ViT into a tracker as the official ``SPMTrack_DINOv2`` does
(``trackit/models/methods/SPMTrack/SPMTrack.py`` at c581fe27, METHODS.md §7b):

- Tokens ``[track query (1), template 1 .. T (hz·wz each), search region (hx·wx)]`` go through the ViT's blocks and
  final norm together (one stream). SPMTrack-B: DINOv2 ViT-B/14, three 196 x 196 templates (14 x 14 tokens), a
  378 x 378 search region (27 x 27 tokens).
- Positional embeddings: the ViT's patch embeddings resampled to the search grid as the official
  ``interpolate_pos_encoding(..., interpolate_offset=0)`` does (bicubic to the new size; DINOv2: 37 x 37 -> 27 x 27);
  every template takes the top-left ``hz x wz`` corner of them (the official crop). The class and register tokens
  of the ViT are not used (SPMTrack uses DINOv2 without registers; a ``*_reg4_dinov2`` ViT works the same way).
- A token-type embedding ``(3, C)``: template tokens get row 0 (background) or 1 (target foreground, from the box
  mask :func:`~modalpeft.tracking.losses.template_mask`), search tokens row 2.
- The temporal query: search frame ``t`` starts from ``sg(q_{t-1}) + track_query + query_embed``, where ``q_{t-1}``
  is the output query token of the previous frame (stop-gradient; zero before the first frame). In training the
  search frames of a sample are processed one after the other.
- Head input: ``att = enc_x · out_queryᵀ`` (one scalar per search token), ``feat = enc_x · att``; an anchor-free
  head (:class:`MlpAnchorFreeHead`): a 3-layer MLP ``C -> C -> C -> 1`` scores every search token, a 3-layer MLP
  ``C -> C -> C -> 4`` regresses the distances (sigmoid, in units of the search region) from the token's centre to
  the box's left, top, right and bottom sides. The boxes are ``x1, y1, x2, y2`` normalised to the search region.

Parameters: what the official code trains besides TMoE is the head (``2·(C² + C) + C + 1`` and ``2·(C² + C) + 4C +
4``: 2,366,213 at C = 768) and the embeddings (``track_query`` and ``query_embed`` of ``(1, C)``, ``token_type_embed``
of ``(3, C)``: 3,840 at C = 768); both are :attr:`OneStreamTracker.trainable_modules`. The position embedding and the
ViT stay frozen.

Initialisation: the head is ``trunc_normal(0.02)`` with zero biases, as the official ``reset_parameters``. The
official ``track_query`` and ``query_embed`` are ``torch.empty`` and never initialised (uninitialised memory; the
code notes that training then sometimes diverges and suggests restarting): here they get ``trunc_normal(0.02)`` like
``token_type_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

DEFAULT_BACKBONE = "vit_base_patch14_dinov2"
"""timm's DINOv2 ViT-B/14 (the ``dinov2_vitb14_pretrain.pth`` weights SPMTrack-B starts from; with
``pretrained=True`` timm loads ``.lvd142m``)."""


class Mlp(nn.Module):
    """The official head MLP: ``fc1 -> GELU -> fc2 -> GELU -> fc3`` (the official ``layers.0/1/2``)."""

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.fc3 = nn.Linear(dim, out_features)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def reference_points(map_size: tuple[int, int]) -> Tensor:
    """Token centres ``((j + 0.5) / W, (i + 0.5) / H)`` of an ``H x W`` map, shape ``(H, W, 2)``."""
    h, w = map_size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


class MlpAnchorFreeHead(nn.Module):
    """Score map and boxes from the search tokens (the official ``MlpAnchorFreeHead``).

    Shapes:
        - input: ``(B, H·W, C)``
        - output: ``{"score_map": (B, H, W) logits, "boxes": (B, H, W, 4) normalised x1, y1, x2, y2}`` (float32)
    """

    def __init__(self, dim: int, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.cls_mlp = Mlp(dim, 1)
        self.reg_mlp = Mlp(dim, 4)
        self.map_size = tuple(map_size)
        self.register_buffer("bbox_offset", reference_points(self.map_size), persistent=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = self.map_size
        score = self.cls_mlp(x).float().view(-1, h, w)
        lt, rb = self.reg_mlp(x).float().view(-1, h, w, 4).sigmoid().chunk(2, dim=-1)
        offset = self.bbox_offset.unsqueeze(0)
        return {"score_map": score, "boxes": torch.cat((offset - lt, offset + rb), dim=-1)}


class TrackerEmbeddings(nn.Module):
    """The tracker's learnable tokens: ``track_query (1, C)``, ``query_embed (1, C)``, ``token_type_embed (3, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.track_query = nn.Parameter(torch.empty(1, dim))
        self.query_embed = nn.Parameter(torch.empty(1, dim))
        self.token_type_embed = nn.Parameter(torch.empty(3, dim))
        for param in self.parameters():
            nn.init.trunc_normal_(param, std=0.02)


def _grid(size: int | tuple[int, int], patch: tuple[int, int], what: str) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(not isinstance(v, int) or v < 1 for v in hw):
        raise ValueError(f"{what}={size!r} must be a positive int or (height, width).")
    if hw[0] % patch[0] or hw[1] % patch[1]:
        fix = tuple(max(patch[i], round(hw[i] / patch[i]) * patch[i]) for i in range(2))
        raise ValueError(
            f"{what}={size!r} is not divisible by the backbone's patch size {patch}; use a multiple of it, e.g. {fix} "
            "(SPMTrack-B: template_size=196, search_size=378 with patch 14)."
        )
    return hw[0] // patch[0], hw[1] // patch[1]


def create_vit(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=..., num_classes=0, **kwargs)``, at the model's own image size (DINOv2:
    518 px, a 37 x 37 grid), so that the tracker resamples the pretrained position embedding as SPMTrack does."""
    import timm

    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


class OneStreamTracker(nn.Module):
    """SPMTrack's one-stream spatio-temporal tracker on a timm ViT (see the module docstring).

    Args:
        backbone: a timm ViT model name (default DINOv2 ViT-B/14) or a timm ``VisionTransformer`` instance. Only its
            patch embedding, blocks and final norm are kept.
        pretrained: with a name, load timm's pretrained weights (needs them in the Hugging Face cache or the hub).
        template_size: template crop size in pixels (an int or ``(height, width)``), a multiple of the patch size.
        search_size: search-region crop size in pixels, a multiple of the patch size, not smaller than the template.
        num_templates: templates per sample (SPMTrack: 3, the first frame and two memory frames).
        backbone_kwargs: more ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads`` for a small
            test model, ``drop_path_rate``).

    Shapes (:meth:`forward`):
        - ``templates``: ``(B, T, 3, Hz, Wz)``; ``template_masks``: ``(B, T, hz, wz)`` with 1 on target tokens
        - ``searches``: ``(B, S, 3, Hx, Wx)``
        - output: one head output per search frame (see :class:`MlpAnchorFreeHead`)
    """

    trainable_modules: tuple[str, ...] = ("head", "embeddings")
    """What trains besides the adapter (``modules_to_save``): the head and the learnable tokens."""

    def __init__(
        self,
        backbone: str | nn.Module = DEFAULT_BACKBONE,
        pretrained: bool = False,
        template_size: int | tuple[int, int] = 196,
        search_size: int | tuple[int, int] = 378,
        num_templates: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            vit = create_vit(backbone, pretrained, **(backbone_kwargs or {}))
        elif isinstance(backbone, nn.Module):
            vit = backbone
        else:
            raise TypeError(f"backbone={backbone!r} must be a timm ViT name or a timm VisionTransformer instance.")
        missing = [n for n in ("patch_embed", "blocks", "norm", "pos_embed") if not hasattr(vit, n)]
        if missing or not hasattr(vit.patch_embed, "proj"):
            raise TypeError(
                f"backbone {type(vit).__name__} lacks {missing or ['patch_embed.proj']}: give a timm VisionTransformer "
                "(e.g. 'vit_base_patch14_dinov2', 'vit_small_patch16_224')."
            )
        if isinstance(num_templates, bool) or not isinstance(num_templates, int) or num_templates < 1:
            raise ValueError(f"num_templates={num_templates!r} must be an integer >= 1 (SPMTrack: 3).")
        patch = tuple(vit.patch_embed.proj.kernel_size)
        self.patch_size = patch
        self.template_size = (template_size, template_size) if isinstance(template_size, int) else tuple(template_size)
        self.search_size = (search_size, search_size) if isinstance(search_size, int) else tuple(search_size)
        self.z_size = _grid(template_size, patch, "template_size")
        self.x_size = _grid(search_size, patch, "search_size")
        if self.z_size[0] > self.x_size[0] or self.z_size[1] > self.x_size[1]:
            raise ValueError(
                f"template_size={template_size!r} is larger than search_size={search_size!r}: the templates take their "
                "position embeddings from the search region's; use a smaller template (SPMTrack: 196 vs 378)."
            )
        self.num_templates = num_templates
        self.embed_dim = int(vit.pos_embed.shape[-1])
        self.patch_embed = vit.patch_embed
        self.norm_pre = getattr(vit, "norm_pre", nn.Identity())
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.pos_embed = nn.Parameter(self._search_pos_embed(vit), requires_grad=False)
        self.embeddings = TrackerEmbeddings(self.embed_dim)
        self.head = MlpAnchorFreeHead(self.embed_dim, self.x_size)

    def _search_pos_embed(self, vit: nn.Module) -> Tensor:
        """The ViT's patch position embeddings resampled to the search grid, ``(1, hx·wx, C)``."""
        pos = vit.pos_embed.detach()
        if not getattr(vit, "no_embed_class", False):
            pos = pos[:, getattr(vit, "num_prefix_tokens", 1) :]
        old = tuple(getattr(vit.patch_embed, "grid_size", (int(math.isqrt(pos.shape[1])),) * 2))
        if old == self.x_size:
            return pos.reshape(1, -1, self.embed_dim).clone()
        if pos.device.type == "meta":
            return pos.new_empty(1, self.x_size[0] * self.x_size[1], self.embed_dim)
        # the official interpolate_pos_encoding(..., interpolate_offset=0): bicubic to the new size, float32
        grid = pos.float().reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.x_size, mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim).to(pos.dtype)

    # -- tokens ----------------------------------------------------------------------------------------
    def _patchify(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return self.patch_embed.norm(x)

    def template_tokens(self, templates: Tensor, masks: Tensor) -> Tensor:
        """``(B, T, 3, Hz, Wz)`` templates and ``(B, T, hz, wz)`` masks -> ``(B, T·hz·wz, C)`` tokens."""
        b, t = templates.shape[:2]
        if templates.shape[-2:] != self.template_size:
            raise ValueError(
                f"templates of {tuple(templates.shape[-2:])} pixels, but the tracker was built for template_size="
                f"{self.template_size}; crop them to that size (modalpeft.tracking.data.crop)."
            )
        z = self._patchify(templates.flatten(0, 1))
        hz, wz = self.z_size
        pos = self.pos_embed.view(1, self.x_size[0], self.x_size[1], -1)[:, :hz, :wz].reshape(1, hz * wz, -1)
        z = z + pos + self.embeddings.token_type_embed[masks.flatten(0, 1).flatten(1).long()]
        return z.reshape(b, t * hz * wz, -1)

    def search_tokens(self, search: Tensor) -> Tensor:
        """``(B, 3, Hx, Wx)`` -> ``(B, hx·wx, C)``."""
        if search.shape[-2:] != self.search_size:
            raise ValueError(
                f"a search region of {tuple(search.shape[-2:])} pixels, but the tracker was built for search_size="
                f"{self.search_size}; crop it to that size (modalpeft.tracking.data.crop)."
            )
        return self._patchify(search) + self.pos_embed + self.embeddings.token_type_embed[2]

    # -- forward ---------------------------------------------------------------------------------------
    def track_step(self, z_tokens: Tensor, search: Tensor, query: Tensor | None = None) -> tuple[dict, Tensor]:
        """One search frame: head output and the output query token (detached) to carry to the next frame.

        ``query`` is the previous frame's output query ``(B, 1, C)``; ``None`` (the first frame) counts as zero.
        """
        x = self.search_tokens(search)
        base = self.embeddings.track_query + self.embeddings.query_embed
        q = base.unsqueeze(0).expand(x.shape[0], 1, -1)
        if query is not None:
            q = q + query.detach()
        tokens = self.norm_pre(torch.cat((q, z_tokens, x), dim=1))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        enc_x, out_query = tokens[:, -x.shape[1] :], tokens[:, :1]
        att = enc_x @ out_query.transpose(1, 2)  # (B, N, 1)
        return self.head(enc_x * att), out_query.detach()

    def forward(self, templates: Tensor, template_masks: Tensor, searches: Tensor) -> list[dict[str, Tensor]]:
        z_tokens = self.template_tokens(templates, template_masks)
        outputs, query = [], None
        for s in range(searches.shape[1]):
            output, query = self.track_step(z_tokens, searches[:, s], query)
            outputs.append(output)
        return outputs


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: OneStreamTracker | None = None) -> dict[str, Tensor]:
    """Map an official SPMTrack checkpoint (``model.bin``, a safetensors file of the trainable tensors) onto the keys
    of a TMoE-adapted :class:`OneStreamTracker` as ``save_adapter`` writes them.

    Official -> here: ``blocks.{i}.<path>.tmoe.compress_expert`` -> ``blocks.{i}.<path>.adapters.A``;
    ``...tmoe.routed_experts.{j}`` (``(d_out, r)`` each) -> ``...adapters.B`` (stacked, ``(E, d_out, r)``);
    ``...tmoe.expert_route.weight`` -> ``...adapters.router.weight``; ``...tmoe.shared_expert`` -> ``...adapters.B_s``;
    the split ``attn.qkv.{q,k,v}.tmoe.`` -> ``attn.qkv.adapters.{q,k,v}.``; ``track_query``, ``query_embed``,
    ``token_type_embed`` -> ``embeddings.*``; ``head.{cls,reg}_mlp.layers.{0,1,2}`` -> ``head.{cls,reg}_mlp.fc{1,2,3}``.
    ``expert_alpha`` and ``use_rsexpert`` (scalars the official ``state_dict`` adds) are dropped: read them with
    :func:`official_tmoe_settings`. A ``module.`` prefix is removed.

    Raises:
        ValueError: keys that belong to nothing above (e.g. ``route_compression``'s per-expert ``compress_expert.{j}``,
            which modalpeft does not implement), listed; with ``model``, keys or shapes it does not have.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in ("expert_alpha", "use_rsexpert"):
            continue
        if key in ("track_query", "query_embed", "token_type_embed"):
            out[f"embeddings.{key}"] = value
            continue
        if key.startswith("head.") and ".layers." in key:
            head, _, rest = key.partition(".layers.")
            index, _, leaf = rest.partition(".")
            out[f"{head}.fc{int(index) + 1}.{leaf}"] = value
            continue
        path, sep, leaf = key.partition(".tmoe.")
        if not sep:
            unknown.append(key)
            continue
        split = path.rsplit(".", 2)
        if len(split) == 3 and split[1] == "qkv" and split[2] in ("q", "k", "v"):
            prefix = f"{split[0]}.qkv.adapters.{split[2]}"
        else:
            prefix = f"{path}.adapters"
        if leaf == "compress_expert":
            out[f"{prefix}.A"] = value
        elif leaf == "expert_route.weight":
            out[f"{prefix}.router.weight"] = value
        elif leaf == "shared_expert":
            out[f"{prefix}.B_s"] = value
        elif leaf.startswith("routed_experts.") and leaf.count(".") == 1:
            experts.setdefault(f"{prefix}.B", {})[int(leaf.split(".")[1])] = value
        else:
            unknown.append(key)
    for key, parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"official checkpoint: {key} has routed experts {sorted(parts)}, not 0..{len(parts) - 1}.")
        out[key] = torch.stack([parts[j] for j in range(len(parts))])
    if unknown:
        raise ValueError(
            f"official checkpoint: {len(unknown)} keys are not SPMTrack TMoE, head or embedding tensors: "
            f"{unknown[:8]}. route_compression (one A per expert) is not implemented; is this an SPMTrack model.bin?"
        )
    if model is not None:
        _check_fits(out, model)
    return out


def _check_fits(state: Mapping[str, Tensor], model: nn.Module) -> None:
    from ..core.model import AdaptedModel

    expected = model.adapter_state_dict() if isinstance(model, AdaptedModel) else None
    if expected is None:
        return
    missing = sorted(set(expected) - set(state))
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    extra = sorted(set(state) - set(expected))
    if missing or shapes or extra:
        raise ValueError(
            f"official checkpoint does not fit this tracker: missing {missing[:6]}, unexpected {extra[:6]}, shapes "
            f"{shapes[:6]}; build the tracker with the checkpoint's backbone, sizes and TMoE rank/experts."
        )


def official_tmoe_settings(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TMoEConfig`` arguments an official checkpoint was trained with: ``rank`` and ``num_experts`` from the
    shapes, ``alpha`` from ``expert_alpha`` (the official file stores it when it is not 1; absent means 1),
    ``shared_expert`` from the keys."""
    a = next((v for k, v in state_dict.items() if k.endswith(".tmoe.compress_expert")), None)
    if a is None:
        raise ValueError("official checkpoint: no '*.tmoe.compress_expert' key; is this an SPMTrack model.bin?")
    prefix = next(k for k, v in state_dict.items() if v is a).removesuffix("compress_expert")
    num_experts = sum(1 for k in state_dict if k.startswith(prefix + "routed_experts."))
    if bool(torch.as_tensor(state_dict.get("use_rsexpert", False)).item()):
        raise ValueError("official checkpoint: use_rsexpert=True (alpha/sqrt(r)) is not offered; give alpha yourself.")
    alpha = float(torch.as_tensor(state_dict.get("expert_alpha", 1.0)).item())
    return {
        "rank": int(a.shape[0]),
        "num_experts": num_experts,
        "alpha": alpha,
        "shared_expert": any(k.endswith(".tmoe.shared_expert") for k in state_dict),
    }


def load_spmtrack_checkpoint(tracker: OneStreamTracker, path: str) -> nn.Module:
    """Adapt ``tracker`` with the TMoE an official SPMTrack ``model.bin`` (safetensors) holds and load its weights:
    the returned model tracks as the official one (the frozen ViT must be the same pretrained DINOv2)."""
    from safetensors.torch import load_file

    from ..core.api import adapt
    from .methods import TMoEConfig

    state = load_file(path)
    config = TMoEConfig(**official_tmoe_settings(state))
    model = adapt(tracker, config, modules_to_save=list(tracker.trainable_modules))
    mapped = checkpoint_filter_fn(state, model)
    model.load_adapter_state(mapped, model.active_adapter)
    return model


__all__ = [
    "DEFAULT_BACKBONE",
    "MlpAnchorFreeHead",
    "OneStreamTracker",
    "TrackerEmbeddings",
    "checkpoint_filter_fn",
    "create_vit",
    "load_spmtrack_checkpoint",
    "official_tmoe_settings",
]
