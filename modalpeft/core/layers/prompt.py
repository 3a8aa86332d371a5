"""Learnable prompt tokens inserted into a transformer block's input sequence (VPT).

VPT: Jia et al., "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout


class PromptTokens(AdapterModule):
    """``p`` learnable tokens placed in the input sequence of the block that hosts this adapter.

    The tokens go right after the ``num_prefix_tokens`` prefix tokens (class and register tokens) and before the
    patch tokens, and get no positional embedding. With ``P`` the prompts and ``k`` the number of prefix tokens:

    - ``mode="insert"``: ``x -> [x[:, :k], drop(P), x[:, k:]]`` (the sequence grows by ``p``);
    - ``mode="replace"``: ``x -> [x[:, :k], drop(P), x[:, k+p:]]``: the ``p`` tokens after the prefix (the
      previous block's prompt outputs) are discarded and replaced (the length stays the same);
    - ``remove_after=True``: the block's output drops the prompt positions, ``y -> [y[:, :k], y[:, k+p:]]``.

    Hosting one PromptTokens per block builds VPT: shallow is ``"insert"`` on the first block only; deep is
    ``"insert"`` on the first block and ``"replace"`` on every later one. Set ``remove_after`` on the last
    prompted block when what follows needs the original sequence length (and on every block for prompts that
    live for one block only, as Point-PEFT's). Dropout draws an independent mask per sample, as VPT does.

    Args:
        num_tokens: number of prompt tokens ``p``.
        dim: token width ``C``.
        mode: ``"insert"`` or ``"replace"`` (see above).
        num_prefix_tokens: ``k``, the tokens before the patches (timm ViTs: ``model.num_prefix_tokens``).
        remove_after: drop the prompt positions from the block's output.
        dropout: dropout on the prompts each time they are placed (VPT: 0.0 shallow, 0.1 in deep examples).
        patch_area: ``patch_h · patch_w`` of the patch embedding, for VPT's init bound.
        init_weights: ``True`` and ``"identity"``: VPT's init, ``uniform(-v, v)`` with
            ``v = √(6 / (3 · patch_area + C))`` (0.0625 for ViT-B/16); prompts always change the sequence, so no
            init leaves the output unchanged; ``False``: ``N(0, 1)``.

    Shapes:
        - input of the hosted block: ``(B, N, C)``
        - input the block sees: ``(B, N + p, C)`` for ``"insert"``, ``(B, N, C)`` for ``"replace"``
        - output of the host: the block's output, less ``p`` tokens with ``remove_after``
        - ``prompts``: ``(p, C)``
    """

    no_weight_decay = True

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        *,
        mode: Literal["insert", "replace"] = "insert",
        num_prefix_tokens: int = 1,
        remove_after: bool = False,
        dropout: float = 0.0,
        patch_area: int = 16 * 16,
        init_weights: InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        if mode not in ("insert", "replace"):
            raise ValueError(f"mode={mode!r} is not one of 'insert', 'replace'")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0")
        self.mode = mode
        self.num_prefix_tokens = num_prefix_tokens
        self.remove_after = remove_after
        self.patch_area = patch_area
        self.prompts = nn.Parameter(torch.empty(num_tokens, dim, device=device, dtype=dtype))
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        if init_weights is False:
            nn.init.normal_(self.prompts)
        else:
            bound = math.sqrt(6.0 / (3 * self.patch_area + self.prompts.shape[1]))
            nn.init.uniform_(self.prompts, -bound, bound)

    def pre(self, x: Tensor) -> Tensor:
        p, dim = self.prompts.shape
        k = self.num_prefix_tokens
        if x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(
                f"PromptTokens(dim={dim}) expects a (B, N, C) token sequence with C={dim}, got shape "
                f"{tuple(x.shape)}; set dim to the block's width"
            )
        skip = k + p if self.mode == "replace" else k
        if x.shape[1] < skip:
            raise ValueError(
                f"PromptTokens(mode={self.mode!r}, num_prefix_tokens={k}, num_tokens={p}) needs at least {skip} "
                f"tokens, got a sequence of {x.shape[1]}; check num_prefix_tokens, and that an earlier block "
                "inserted the prompts that 'replace' overwrites"
            )
        prompts = self.drop(self.prompts.to(x.dtype).expand(x.shape[0], -1, -1))
        return torch.cat([x[:, :k], prompts, x[:, skip:]], dim=1)

    def post(self, out: Tensor) -> Tensor:
        if not self.remove_after:
            return out
        k = self.num_prefix_tokens
        return torch.cat([out[:, :k], out[:, k + self.prompts.shape[0] :]], dim=1)
