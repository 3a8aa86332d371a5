"""MAM adapter: prefix tuning on attention + a scaled parallel adapter beside the FFN (He et al., ICLR 2022).

Paper: https://arxiv.org/abs/2110.04366 ("Towards a Unified View of Parameter-Efficient Transfer Learning");
official code: jxhe/unify-parameter-efficient-tuning. MAM = the two methods on one model, trained together:

- the **parallel adapter** is ours (:class:`~modalpeft.text.methods.ParallelAdapterConfig`'s placement and
  layer: ``h ← FFN(x) + s · W_up f(W_down x)`` beside every block's FFN; MAM: ``r = 512``, ``s = 4``);
- the **prefix** is peft's: its ``PrefixEncoder`` (``l`` virtual tokens, with ``prefix_projection`` the MLP
  reparametrisation ``Linear(d, hidden) → tanh → Linear(hidden, 2·L·d)``; MAM: ``l = 30``, hidden 800), whose
  output becomes each layer's ``l`` extra keys and values, as ``peft.PeftModel`` passes them (a key/value cache
  of length ``l``, the attention mask lengthened by ``l`` ones). Only the plumbing that hands peft's prefix to the
  body is here, so both parts live in one adapter: one ``save_adapter`` file, one ``load_adapter``, one
  ``disable_adapters``.

The prefix module hosts the transformer body found by structure (:func:`~modalpeft.text.structure.find_bodies`);
its keys/values go through the model's own cache, so any body that takes one works (BERT/RoBERTa and LLaMA-style
decoders in transformers 5; peft itself refuses prefix tuning on BERT/RoBERTa there). As with peft on those
models, positions after the prefix start at ``l`` (the cache length).

Trainable count: the parallel adapters' (``2·d·r + r + d`` per block) plus peft's prefix encoder: ``l·k +
k·hidden + hidden + hidden·2Lk + 2Lk`` with ``prefix_projection``, ``l·2Lk`` without, where ``k`` is the key/value
width (``d``; ``kv_heads · head_dim`` in grouped-query models, as peft sizes it). Not mergeable (the prefix adds
keys); no init is the identity (peft's prefix is random, or zero keys/values that still take attention mass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...core.config import _help
from ...core.inject import attach
from ...core.layer import AdapterModule, InitMode
from ...core.registry import register_method
from ..structure import bind_arguments, cache_length, find_bodies
from .bottleneck import ParallelAdapterConfig, apply_bottleneck


class PeftPrefix(AdapterModule):
    """peft's ``PrefixEncoder`` handed to a transformer body as ``l`` cached keys/values per layer.

    Args:
        config: a ``peft.PrefixTuningConfig`` completed from the model's config (``num_layers``, ``token_dim``;
            ``num_attention_heads`` is the key/value heads, fewer than the query heads in grouped-query models).

    Shapes:
        - the body's ``attention_mask`` ``(N, L)`` becomes ``(N, l + L)``; its outputs keep ``L`` positions
        - peft's encoder output ``(N, l, 2·layers·kv_heads·head_dim)`` → per layer keys and values
          ``(N, kv_heads, l, head_dim)``
    """

    def __init__(self, config: Any) -> None:
        from peft.tuners.prefix_tuning.model import PrefixEncoder

        super().__init__()
        self.num_tokens, self.num_layers = config.num_virtual_tokens, config.num_layers
        self.kv_heads = config.num_attention_heads
        self.encoder = PrefixEncoder(config)
        self.register_buffer("tokens", torch.arange(config.num_virtual_tokens), persistent=False)

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        return None  # peft's PrefixEncoder initialises itself (nn.Embedding / nn.Linear defaults)

    def merge_hint(self) -> str:
        return "the prefix adds keys and values to every attention layer"

    def cache(self, n: int, config: Any) -> Any:
        """A transformers ``DynamicCache`` holding the prefix keys/values of a batch of ``n``."""
        from transformers import DynamicCache

        kv = self.encoder(self.tokens.expand(n, -1))  # (N, l, 2·layers·kv_heads·head_dim)
        kv = kv.view(n, self.num_tokens, 2 * self.num_layers, self.kv_heads, -1)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2·layers, N, kv_heads, l, head_dim), peft's get_prompt order
        cache = DynamicCache(config=config)
        for layer in range(self.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    def around(self, base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        kwargs = bind_arguments(base, args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.num_tokens), mask], dim=1)
        if cache_length(kwargs):  # a later generation step: the prefix is in the cache already
            return base(**kwargs)
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        kwargs["cache"] = self.cache(inputs.shape[0], base.config)
        kwargs.pop("past_key_values", None)
        return base(**kwargs)


@dataclass
class MAMConfig(ParallelAdapterConfig):
    """MAM (registered as ``"mam"``): our scaled parallel adapter (every field of
    :class:`~modalpeft.text.methods.ParallelAdapterConfig`, MAM's defaults ``bottleneck_dim=512``, ``scaling=4``)
    plus peft's prefix tuning (``prefix_*`` fields)."""

    bottleneck_dim: int = field(default=512, metadata=_help("Hidden width r of each parallel adapter (MAM: 512)."))
    scaling: float | Literal["learnable"] = field(default=4.0, metadata=_help("Parallel adapter scale s (MAM: 4)."))
    prefix_tokens: int = field(default=30, metadata=_help("l, peft's num_virtual_tokens (MAM: 30)."))
    prefix_projection: bool = field(
        default=True, metadata=_help("peft's prefix_projection: reparametrise the prefix by an MLP (MAM: yes).")
    )
    prefix_hidden: int = field(default=800, metadata=_help("peft's encoder_hidden_size, the MLP width (MAM: 800)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prefix_tokens", "prefix_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")

    def peft_prefix_config(self, model_config: Any) -> Any:
        """The ``peft.PrefixTuningConfig`` of the prefix part, completed from the model's config as peft does."""
        from peft import PrefixTuningConfig
        from peft.utils.other import _prepare_prompt_learning_config

        config = PrefixTuningConfig(
            num_virtual_tokens=self.prefix_tokens,
            prefix_projection=self.prefix_projection,
            encoder_hidden_size=self.prefix_hidden,
        )
        return _prepare_prompt_learning_config(config, model_config)


@register_method("mam", MAMConfig, modality="text", mergeable=False, paper="https://arxiv.org/abs/2110.04366")
def apply_mam(
    model: nn.Module, config: MAMConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    [(name, body)], _ = find_bodies(model, "mam")
    model_config = getattr(body, "config", None)
    if model_config is None:
        raise ValueError(f"mam: the body {name!r} ({type(body).__name__}) has no transformers config.")
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError("mam: encoder-decoder models (T5, BART) are not supported here; use an encoder or a decoder.")
    prefix = PeftPrefix(config.peft_prefix_config(model_config))
    apply_bottleneck(model, config, adapter_name, "mam")
    attach(model, name, adapter_name, prefix)
