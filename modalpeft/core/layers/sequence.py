"""Middle stages that mix positions over time, for bottleneck adapters on sequence models (``(B, T, m)`` features).

A :class:`~modalpeft.core.layers.Bottleneck` runs an optional middle stage between its projections. The stages
here mix the ``T`` positions of a sequence, which an adapter placed in an autoregressive decoder must do
causally (position ``t`` sees positions ``<= t`` only) and incrementally: during cached generation the host
block receives one new position at a time, so a stage keeps what it needs of the past positions (a
convolution's last inputs, an attention's keys and values) from one step to the next, and a cached run gives
exactly the outputs of a full-sequence run.

- :class:`DilatedConvStage`: a stack of dilated residual 1-D convolutions over time, then squeeze-and-excitation
  over channels (the convolutional music adapter of Mehta et al., 2025).
- :class:`AttentionStage`: a small pre-LN transformer layer, self-attention then a GELU feed-forward (their
  transformer adapter).

Both read the host call's attention mask and key/value cache through the adapter's ``context`` hook
(:meth:`SequenceStage.context`): padded positions (mask 0) are held at zero in the convolutions and are never
attended to, and a state is resumed only for the cache object it was built with, and checked against that
cache's length.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layer import InitMode

CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""The keywords a host block receives its key/value cache under (transformers' names, old and new)."""


def key_validity(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """Which of the ``length`` key positions (past and current) a host's attention mask leaves visible.

    Args:
        mask: ``None`` (all visible), a ``(B, S)`` padding mask (1/True: a real position), or a ``(B, 1, T, S)``
            attention mask (bool, True: attend; or additive float, 0: attend), read on its last query row, which
            in a causal mask sees every real position. ``S`` may exceed ``length`` (a static cache's length).

    Returns:
        ``(B, length)`` bool, or ``None`` when every position is visible.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        raise TypeError(
            f"the host passed an attention mask of type {type(mask).__name__}"
            f"{f' with shape {tuple(mask.shape)}' if isinstance(mask, Tensor) else ''}; a sequence adapter reads "
            "(B, S) padding masks and (B, 1, T, S) attention masks. Load the model with attn_implementation='sdpa' "
            "or 'eager'."
        )
    rows = mask if mask.dim() == 2 else mask[:, 0, -1, :]
    if rows.shape[-1] < length:
        raise ValueError(f"the attention mask covers {rows.shape[-1]} positions, fewer than the {length} seen")
    rows = rows[:, :length]
    if rows.dtype == torch.bool:
        visible = rows
    elif rows.is_floating_point() and mask.dim() == 4:
        visible = rows > -1.0  # additive: 0 where visible, a large negative number where hidden
    else:
        visible = rows != 0
    return visible.expand(batch, length) if visible.shape[0] != batch else visible


class SequenceStage(nn.Module):
    """A stage over ``(B, T, m)`` that may keep a state across cached decoding steps.

    Subclasses implement :meth:`step`. ``layer_idx`` (set by the method that places the adapter: the host block's
    index in the cache) lets the stage check its state against the cache's length.

    Args:
        causal: position ``t`` depends on positions ``<= t`` only (an autoregressive host).
    """

    def __init__(self, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.layer_idx: int | None = None
        self._call: tuple[Any, Any, int | None] | None = None
        self._state: dict[str, Tensor] | None = None
        self._state_cache: weakref.ref | None = None

    def context(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Read the host call's attention mask (keyword, or the second positional input) and key/value cache."""
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        if mask is not None and not isinstance(mask, Tensor):
            mask = mask if hasattr(mask, "shape") else None
        cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
        past = None
        if cache is not None and self.layer_idx is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length(self.layer_idx))  # read before the host block appends this call
        self._call = (mask, cache, past)

    def _resume(self, cache: Any, past: int | None, batch: int) -> dict[str, Tensor] | None:
        if cache is None:
            return None
        same = self._state_cache is not None and self._state_cache() is cache and self._state is not None
        if past == 0 or not same:
            if past:
                raise ValueError(
                    f"the key/value cache already holds {past} positions that this adapter never saw; run the whole "
                    "sequence through the adapted model (prompt included) with this cache from its start."
                )
            return None
        seen = int(self._state["length"])
        if past is not None and past != seen:
            raise ValueError(
                f"the key/value cache holds {past} positions but this adapter's state {seen}: the cache was cropped "
                "or reordered (beam search, assisted decoding), which the adapter's state does not follow. Use "
                "greedy or sampled generation, or call without a cache."
            )
        if self._state["batch"] != batch:
            raise ValueError(f"the cached batch has {self._state['batch']} rows, this call {batch}")
        if not self.causal:
            raise ValueError("a non-causal sequence adapter cannot decode incrementally; set causal=True")
        return self._state

    def forward(self, z: Tensor) -> Tensor:
        mask, cache, past = self._call if self._call is not None else (None, None, None)
        self._call = None
        batch, length = z.shape[:2]
        state = self._resume(cache, past, batch)
        seen = 0 if state is None else int(state["length"])
        visible = key_validity(mask, batch, seen + length)
        current = None if visible is None else visible[:, seen:]
        out, new_state = self.step(z, current, state)
        if cache is None:
            self._state, self._state_cache = None, None
        else:
            new_state = {k: v.detach() if isinstance(v, Tensor) else v for k, v in new_state.items()}
            self._state = {**new_state, "length": seen + length, "batch": batch}
            self._state_cache = weakref.ref(cache)
        return out

    def step(self, z: Tensor, visible: Tensor | None, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
        """``z``: ``(B, T, m)`` new positions; ``visible``: ``(B, T)`` bool (``None``: all); ``state``: what the
        previous call returned (``None``: a new sequence). Returns the output and the state to keep."""
        raise NotImplementedError

    def clear_state(self) -> None:
        """Forget the state of the last cached call."""
        self._state, self._state_cache = None, None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (spawned processes, deepcopy) starts without the decoding state: its cache is not copied along
        return {**self.__dict__, "_call": None, "_state": None, "_state_cache": None}


def _reset_norm(norm: nn.LayerNorm, init_weights: InitMode) -> None:
    if init_weights is False:
        nn.init.normal_(norm.weight, mean=1.0, std=0.1)
        nn.init.normal_(norm.bias, std=0.1)
    else:
        norm.reset_parameters()


class DilatedConvStage(SequenceStage):
    """Dilated residual 1-D convolutions over time, then squeeze-and-excitation over channels.

    Each block ``i`` (dilation ``d_i``, kernel ``k``) computes ``x ← x + W_i · act(conv_{k,d_i}(x))`` with
    ``W_i`` a 1x1 convolution; padded positions are zeroed before each convolution. Causal blocks pad
    ``(k-1)·d_i`` zeros on the left (a cached step keeps the last ``(k-1)·d_i`` inputs of each block instead), so
    the receptive field is ``1 + (k-1)·Σ d_i`` past positions; non-causal ones pad ``(k-1)·d_i / 2`` on each side
    (``k`` odd). Squeeze-and-excitation (Hu et al., 2018) then rescales channels,
    ``x ← x · σ(W_b · relu(W_a · s + b_a) + b_b)``, with ``s`` the mean of ``x`` over the visible positions: over
    positions ``<= t`` for a causal stage (a running mean, so that no future position leaks in), over the whole
    sequence otherwise.

    Args:
        dim: ``m``, the channel width.
        kernel_size: ``k``.
        dilations: ``d_i``, one residual block each.
        se_reduction: ``r``; the excitation's hidden width is ``max(1, m // r)``.
        causal: see :class:`SequenceStage`.
        act: the non-linearity inside the blocks (GELU).

    Shapes:
        - input and output: ``(B, T, m)``
        - parameters: ``Σ_i (k·m² + m + m² + m) + 2·m·h + h + m`` with ``h = max(1, m // r)``
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        dilations: Sequence[int] = (1, 2, 4, 8),
        se_reduction: int = 4,
        causal: bool = True,
    ) -> None:
        super().__init__(causal)
        if kernel_size < 1 or any(d < 1 for d in dilations) or not dilations:
            raise ValueError(f"kernel_size={kernel_size} and dilations={list(dilations)} must be >= 1 and non-empty")
        if not causal and kernel_size % 2 == 0:
            raise ValueError(
                f"a non-causal convolution pads symmetrically and needs an odd kernel_size, not {kernel_size}"
            )
        self.kernel_size, self.dilations = kernel_size, tuple(dilations)
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel_size, dilation=d) for d in self.dilations)
        self.mixes = nn.ModuleList(nn.Conv1d(dim, dim, 1) for _ in self.dilations)
        self.act = nn.GELU()
        hidden = max(1, dim // se_reduction)
        self.se_down = nn.Linear(dim, hidden)
        self.se_up = nn.Linear(hidden, dim)

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for module in (*self.convs, *self.mixes, self.se_down, self.se_up):
            module.reset_parameters()
            if init_weights is False:
                nn.init.normal_(module.bias, std=0.1)

    @property
    def receptive_field(self) -> int:
        """How many positions (the current one included) a causal stage's convolutions see."""
        return 1 + (self.kernel_size - 1) * sum(self.dilations)

    def step(self, z: Tensor, visible: Tensor | None, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
        x = z.transpose(1, 2)  # (B, m, T)
        keep = None if visible is None else visible[:, None, :].to(x.dtype)
        tails = []
        for i, (conv, mix) in enumerate(zip(self.convs, self.mixes, strict=True)):
            if keep is not None:
                x = x * keep
            pad = (self.kernel_size - 1) * self.dilations[i]
            if self.causal:
                tail = state["tails"][i] if state is not None else x.new_zeros(x.shape[0], x.shape[1], pad)
                padded = torch.cat([tail, x], dim=-1)
                tails.append(padded[..., padded.shape[-1] - pad :])
            else:
                padded = F.pad(x, (pad // 2, pad // 2))
            x = x + mix(self.act(conv(padded)))
        weight = torch.ones_like(x[:, :1]) if keep is None else keep  # (B, 1, T)
        if self.causal:
            total = torch.cumsum(x * weight, dim=-1)
            count = torch.cumsum(weight, dim=-1)
            if state is not None:
                total, count = total + state["total"][..., None], count + state["count"][..., None]
            squeezed = (total / count.clamp(min=1.0)).transpose(1, 2)  # (B, T, m): the mean over positions <= t
            new_state = {"tails": tails, "total": total[..., -1], "count": count[..., -1]}
        else:
            squeezed = ((x * weight).sum(-1) / weight.sum(-1).clamp(min=1.0))[:, None, :]  # (B, 1, m)
            new_state = {}
        excite = torch.sigmoid(self.se_up(torch.relu(self.se_down(squeezed))))
        return x.transpose(1, 2) * excite, new_state


class AttentionStage(SequenceStage):
    """A pre-LN transformer layer in the bottleneck: ``x ← x + MHSA(LN₁(x))``, ``x ← x + FFN(LN₂(x))``.

    The self-attention has ``num_heads`` heads over ``m`` channels (``m`` divisible by it), a fused ``qkv``
    projection and an output projection, both with biases; a causal stage attends to positions ``<= t`` (a cached
    step attends to the stored keys and values), and padded keys are never attended to (a padded query attends
    to itself only, so no row is empty). ``FFN(x) = W₂ · GELU(W₁ x + b₁) + b₂`` with hidden width
    ``ffn_mult·m``. No position encoding: the host's hidden states carry positions already.

    Args:
        dim: ``m``.
        num_heads: attention heads.
        ffn_mult: the feed-forward's expansion.
        causal: see :class:`SequenceStage`.
        dropout: attention-probability dropout (training only).

    Shapes:
        - input and output: ``(B, T, m)``
        - parameters: ``4·m (two LayerNorms) + 4·m² + 4·m (attention) + 2·m·f + f + m (FFN)``, ``f = ffn_mult·m``
    """

    def __init__(
        self, dim: int, num_heads: int = 4, ffn_mult: int = 4, causal: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__(causal)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the bottleneck width {dim}; pick a divisor of it")
        if ffn_mult < 1:
            raise ValueError(f"ffn_mult={ffn_mult} must be >= 1")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_mult * dim)
        self.fc2 = nn.Linear(ffn_mult * dim, dim)

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for norm in (self.norm1, self.norm2):
            _reset_norm(norm, init_weights)
        for linear in (self.qkv, self.proj, self.fc1, self.fc2):
            linear.reset_parameters()
            if init_weights is False:
                nn.init.normal_(linear.bias, std=0.1)

    def step(self, z: Tensor, visible: Tensor | None, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
        batch, length, dim = z.shape
        heads = self.num_heads
        q, k, v = self.qkv(self.norm1(z)).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        if visible is None:
            visible = torch.ones(batch, length, dtype=torch.bool, device=z.device)
        past = 0
        if state is not None:
            past = state["keys"].shape[2]
            k, v = torch.cat([state["keys"], k], dim=2), torch.cat([state["values"], v], dim=2)
            visible = torch.cat([state["visible"], visible], dim=1)
        query_pos = torch.arange(past, past + length, device=z.device)[:, None]
        key_pos = torch.arange(past + length, device=z.device)[None, :]
        allowed = visible[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            allowed = allowed & (key_pos <= query_pos)
        allowed = allowed | (key_pos == query_pos)  # (B, 1, T, S)
        drop = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        x = z + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x, {"keys": k, "values": v, "visible": visible}

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}, head_dim={self.qkv.in_features // self.num_heads}"


__all__ = ["AttentionStage", "DilatedConvStage", "SequenceStage", "key_validity"]
