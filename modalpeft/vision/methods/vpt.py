"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, https://arxiv.org/abs/2203.12119).

``p`` learnable tokens of width ``C`` join the token sequence of a frozen ViT, right after its prefix tokens
(class and register tokens) and before the patch tokens, without positional embedding:

- **shallow** (``deep=False``): the prompts are inserted into the input of the first block only,
  ``[prefix, P, patches]``; they then travel through every block;
- **deep** (``deep=True``): the first block gets the same insertion; before every later block the prompt
  outputs of the previous block are discarded and replaced by that block's own prompts.

Each prompted block hosts one :class:`~modalpeft.core.layers.PromptTokens` (``"insert"`` on the first,
``"replace"`` on the others). Prompts start as ``uniform(-v, v)`` with ``v = √(6 / (3·patch_area + C))``
(0.0625 for ViT-B/16), as the official code does. Trainable count: ``p·C`` (shallow) or ``L·p·C`` (deep, ``L``
prompted blocks), plus the ``modules_to_save`` (the head). VPT is not mergeable: prompts lengthen the sequence.

The frozen backbone stays in eval mode while the prompts train (``frozen_eval=True``, as the official code
overrides ``train()``): its dropout and drop-path are off, prompt dropout is on.

Backbone interface (found by attributes, never by model name): ``blocks`` (an ``nn.Sequential`` or
``nn.ModuleList`` of blocks taking ``(B, N, C)`` tokens), ``num_prefix_tokens``, ``embed_dim`` (or
``num_features``) and, for the init bound, ``patch_embed.patch_size`` (or ``VPTConfig(patch_area=...)``). Every
timm ViT-family model has them (class token or not, register tokens, distillation token), and so do the
modality backbones that follow timm's interface.

What leaves the last block (``keep_prompts``):

- ``True`` (default): the prompt outputs stay in the final sequence ``[prefix, P, patches]``. Class-token
  pooling (timm's ``global_pool="token"``) reads the class token, as VPT's supervised ViT does; timm's average
  pooling over ``x[:, num_prefix_tokens:]`` (``global_pool="avg"``, with or without a class token) then
  *includes* the prompts, which is VPT's "original" pooling for MAE/MoCo backbones (the mean over every non-class
  token, prompts included); attention pooling (``"map"``) attends over them too.
- ``False``: the prompt positions are dropped after the last block, so ``forward_features`` returns the
  backbone's own ``(B, num_prefix_tokens + patches, C)`` sequence (dense tasks, feature maps; average pooling
  then excludes the prompts).

``target_modules`` restricts prompting to some blocks (names or a regex on ``blocks.<i>``; ``None``: every
block): the first selected block inserts, later selected ones replace (deep); prompts pass unchanged through the
blocks in between.

Known differences from the official code:

- no prompt projection (``PROMPT.PROJECT``; its default and the paper's setting is none);
- timm's ``forward_intermediates`` reshapes intermediate sequences into patch grids and fails while prompts are
  in them; models that apply rotary position embeddings to the non-prefix tokens (EVA-02) do not take prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets
from ...core.layer import AdapterModule, InitMode
from ...core.layers import PromptTokens
from ...core.registry import register_method

_INTERFACE = (
    "VPT needs the ViT backbone interface: `blocks` (an nn.Sequential or nn.ModuleList of blocks taking (B, N, C) "
    "tokens), `num_prefix_tokens` (the class/register tokens before the patches) and `embed_dim` (or "
    "`num_features`), as every timm VisionTransformer-family model and modalpeft's backbones expose. Use such a "
    "backbone, or set these attributes on yours."
)


@dataclass
class VPTConfig(AdapterConfig):
    """VPT. ``target_modules=None`` prompts every block of ``model.blocks`` (deep) or the first one (shallow)."""

    num_tokens: int = field(default=10, metadata=_help("Number of prompt tokens p per prompted block (>= 1)."))
    deep: bool = field(
        default=True,
        metadata=_help("True: VPT-deep, new prompts before every block. False: VPT-shallow, before the first only."),
    )
    dropout: float = field(
        default=0.0,
        metadata=_help("Dropout on the prompts each time they are placed (VPT: 0.0 shallow, 0.1 in deep examples)."),
    )
    init: Literal["uniform"] = field(
        default="uniform",
        metadata=_help("Prompt init: 'uniform', VPT's uniform(-v, v) with v = sqrt(6 / (3 * patch_area + C))."),
    )
    patch_area: int | None = field(
        default=None,
        metadata=_help(
            "patch_h * patch_w in the init bound. None: read from model.patch_embed.patch_size (256 for /16)."
        ),
    )
    keep_prompts: bool = field(
        default=True,
        metadata=_help(
            "True: prompt outputs stay in the final sequence (average pooling includes them, as VPT's MAE/MoCo "
            "pooling). False: drop them after the last block, for dense tasks."
        ),
    )
    frozen_eval: bool = field(
        default=True,
        metadata=_help("Keep the frozen backbone in eval mode (no dropout/drop-path) while the prompts train."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights == "identity":
            raise ValueError(
                "vpt: init_weights='identity' is not available: prompts always change the token sequence, so no "
                "init leaves the output unchanged. Use True (VPT's uniform init) or False (random, for tests)."
            )
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens={self.num_tokens!r} must be an integer >= 1 (the paper uses 1 to 200).")
        for name in ("deep", "keep_prompts", "frozen_eval"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 for no dropout.")
        if self.init != "uniform":
            raise ValueError(f"init={self.init!r} is not valid; the only choice is 'uniform' (VPT's init).")
        area = self.patch_area
        if area is not None and (isinstance(area, bool) or not isinstance(area, int) or area < 1):
            raise ValueError(
                f"patch_area={area!r} must be a positive integer (patch_h * patch_w, e.g. 256 for 16x16 patches) "
                "or None to read it from model.patch_embed.patch_size."
            )


class _DropPrompts(AdapterModule):
    """Drops the ``p`` prompt positions after the ``k`` prefix tokens from the host's output.

    Placed on the last block for ``keep_prompts=False`` when that block holds no :class:`PromptTokens` (shallow
    VPT); it has no parameters.

    Shapes:
        - output of the host: ``(B, k + p + M, C) -> (B, k + M, C)``
    """

    def __init__(self, num_tokens: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        """Nothing to initialise."""

    def post(self, out: Tensor) -> Tensor:
        k = self.num_prefix_tokens
        return torch.cat([out[:, :k], out[:, k + self.num_tokens :]], dim=1)


def vit_interface(model: nn.Module) -> tuple[list[str], int, int]:
    """``(block names, num_prefix_tokens, C)`` of a backbone with timm's ViT interface.

    Raises:
        ValueError: an attribute of the interface is missing; the message names it.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        found = "has no `blocks` attribute" if blocks is None else f"has `blocks` of type {type(blocks).__name__}"
        raise ValueError(f"vpt: {type(model).__name__} {found}, not a non-empty nn.Sequential/ModuleList. {_INTERFACE}")
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        found = "has no `num_prefix_tokens` attribute" if prefix is None else f"has num_prefix_tokens={prefix!r}"
        raise ValueError(f"vpt: {type(model).__name__} {found}, not an integer >= 0. {_INTERFACE}")
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(
            f"vpt: {type(model).__name__} has no integer `embed_dim` or `num_features` attribute. {_INTERFACE}"
        )
    return [f"blocks.{key}" for key, _ in blocks.named_children()], prefix, dim


def patch_area_of(model: nn.Module, config: VPTConfig) -> int:
    """``config.patch_area``, or ``patch_h * patch_w`` read from ``model.patch_embed.patch_size``."""
    if config.patch_area is not None:
        return config.patch_area
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, int):
        return size * size
    if isinstance(size, (tuple, list)) and size and all(isinstance(s, int) for s in size):
        return math.prod(size)
    raise ValueError(
        f"vpt: cannot read the patch size of {type(model).__name__} (no `patch_embed.patch_size`); it sets VPT's "
        "init bound sqrt(6 / (3 * patch_area + C)). Pass VPTConfig(patch_area=patch_h * patch_w)."
    )


@register_method("vpt", VPTConfig, modality="vision", mergeable=False, paper="https://arxiv.org/abs/2203.12119")
def apply_vpt(
    model: nn.Module, config: VPTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    block_names, num_prefix, dim = vit_interface(model)
    area = patch_area_of(model, config)
    targets = [name for name, _ in find_targets(model, config, default=block_names)]
    stray = [name for name in targets if name not in block_names]
    if stray:
        raise ValueError(
            f"vpt: target_modules={config.target_modules!r} selects {stray}, which are not blocks; VPT prompts whole "
            f"blocks. Choose among {block_names[:12]}{' ...' if len(block_names) > 12 else ''}, or None for all."
        )
    modes = {targets[0]: "insert"}
    if config.deep:
        modes.update(dict.fromkeys(targets[1:], "replace"))
    last = block_names[-1]
    for name in block_names:
        remove = not config.keep_prompts and name == last
        if name in modes:
            layer: AdapterModule = PromptTokens(
                config.num_tokens,
                dim,
                mode=modes[name],
                num_prefix_tokens=num_prefix,
                remove_after=remove,
                dropout=config.dropout,
                patch_area=area,
                init_weights=config.init_weights,
            )
        elif remove:
            layer = _DropPrompts(config.num_tokens, num_prefix)
        else:
            continue
        attach(model, name, adapter_name, layer)
