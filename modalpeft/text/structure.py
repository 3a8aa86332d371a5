"""Where a transformers model keeps its blocks, attention and feed-forward sublayers, found by structure.

Text methods place adapters relative to the sublayers of every transformer block (after the attention
output projection, beside the feed-forward block, ...). Model classes differ in names but few layouts
exist; :func:`find_blocks` recognises them by the modules a block holds, never by the model's class name:

- **post-LN encoder** (BERT, RoBERTa, ELECTRA, MiniLM...): a block with ``attention.output.dense``,
  ``intermediate.dense`` and ``output.dense`` + ``output.LayerNorm``. Its feed-forward input (the attention
  output) reaches the FFN's last module only as that module's second argument: ``output(inter, attn_out)``
  computes ``LayerNorm(dropout(dense(inter)) + attn_out)``.
- **T5** (encoder and decoder stacks): a block with ``layer[0].SelfAttention.o`` and
  ``layer[-1].DenseReluDense.wo`` (the decoder's cross-attention sits in ``layer[1].EncDecAttention``).
- **pre-LN decoder** (LLaMA, Mistral, Qwen2, Gemma, ...): a block with ``self_attn.o_proj`` and
  ``mlp.down_proj``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..core.inject import base_modules
from ..core.layer import AdapterLayer

Layout = Literal["post_ln_encoder", "t5", "pre_ln_decoder"]

LOOKED_FOR = (
    "post-LN encoder blocks (BERT/RoBERTa: attention.output.dense, intermediate.dense, output.dense, "
    "output.LayerNorm), T5 blocks (layer[0].SelfAttention.o, layer[-1].DenseReluDense.wo) and pre-LN decoder "
    "blocks (LLaMA/Mistral/Qwen: self_attn.o_proj, mlp.down_proj)"
)


@dataclass(frozen=True)
class BlockParts:
    """Full dotted names (clean, as in the unadapted model) of one block's sublayers.

    Attributes:
        name: the block.
        layout: which of the recognised layouts it has.
        attention: the self-attention module.
        attention_output: the Linear that maps the attention heads back to the width (its output is the
            attention sublayer's output, before the residual add).
        ffn: the module whose output is the feed-forward sublayer's output; a parallel adapter runs beside it.
        ffn_input_arg: which positional input of ``ffn`` is the feed-forward sublayer's input (0; 1 for
            post-LN encoders, whose ``output`` module receives ``(intermediate, attention_output)``).
        ffn_output: the feed-forward sublayer's last Linear.
        cross_attention_output: the output Linear of a decoder's cross-attention (T5 decoders), else ``None``.
    """

    name: str
    layout: Layout
    attention: str
    attention_output: str
    ffn: str
    ffn_input_arg: int
    ffn_output: str
    cross_attention_output: str | None = None


def _linear(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if isinstance(module, AdapterLayer):  # already adapted by another method
            module = module.base_layer
        if module is None:
            return False
    return isinstance(module, nn.Linear)


def _parts(name: str, module: nn.Module) -> BlockParts | None:
    p = f"{name}." if name else ""
    if (
        _linear(module, "attention.output.dense")
        and _linear(module, "intermediate.dense")
        and _linear(module, "output.dense")
        and isinstance(getattr(getattr(module, "output", None), "LayerNorm", None), nn.Module)
    ):
        return BlockParts(
            name,
            "post_ln_encoder",
            attention=f"{p}attention",
            attention_output=f"{p}attention.output.dense",
            ffn=f"{p}output",
            ffn_input_arg=1,
            ffn_output=f"{p}output.dense",
        )
    layers = getattr(module, "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) >= 2:
        first, last = layers[0], layers[-1]
        if _linear(first, "SelfAttention.o") and _linear(last, "DenseReluDense.wo"):
            cross = f"{p}layer.1.EncDecAttention.o" if _linear(layers[1], "EncDecAttention.o") else None
            return BlockParts(
                name,
                "t5",
                attention=f"{p}layer.0.SelfAttention",
                attention_output=f"{p}layer.0.SelfAttention.o",
                ffn=f"{p}layer.{len(layers) - 1}.DenseReluDense",
                ffn_input_arg=0,
                ffn_output=f"{p}layer.{len(layers) - 1}.DenseReluDense.wo",
                cross_attention_output=cross,
            )
    if _linear(module, "self_attn.o_proj") and _linear(module, "mlp.down_proj"):
        return BlockParts(
            name,
            "pre_ln_decoder",
            attention=f"{p}self_attn",
            attention_output=f"{p}self_attn.o_proj",
            ffn=f"{p}mlp",
            ffn_input_arg=0,
            ffn_output=f"{p}mlp.down_proj",
        )
    return None


def find_blocks(model: nn.Module, owner: str = "text") -> list[BlockParts]:
    """Every transformer block of ``model``, in module order.

    Args:
        model: a transformers model (or any module with blocks in one of the recognised layouts); adapter hosts
            already placed in it are looked through.
        owner: who asks, for the error message (a method name).

    Raises:
        ValueError: no block in a recognised layout; the message names the structures looked for.
    """
    blocks = [parts for name, module in base_modules(model) if (parts := _parts(name, module)) is not None]
    if not blocks:
        raise ValueError(
            f"{owner}: found no transformer blocks in {type(model).__name__}; looked for {LOOKED_FOR}. Pass "
            "target_modules with the names of the modules to adapt, or add this layout to "
            "modalpeft.text.structure."
        )
    return blocks


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm by structure: ``nn.LayerNorm``/``nn.RMSNorm``, or a leaf module with an epsilon
    (``eps``/``variance_epsilon``) whose own parameters are 1-D ``weight`` (and ``bias``): T5LayerNorm,
    LlamaRMSNorm, ..."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    if next(module.children(), None) is not None:
        return False
    if not any(hasattr(module, a) for a in ("eps", "variance_epsilon")):
        return False
    params = dict(module.named_parameters(recurse=False))
    return "weight" in params and set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())


def find_norms(model: nn.Module) -> list[str]:
    """Clean names of every LayerNorm / RMSNorm of ``model`` (see :func:`is_norm`)."""
    return [name for name, module in base_modules(model) if name and is_norm(module)]


BODY_INPUTS = frozenset({"input_ids", "attention_mask", "inputs_embeds"})


def _takes(module: nn.Module, names: frozenset[str] | set[str]) -> bool:
    try:
        return names <= set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False


def _is_decoder(module: nn.Module) -> bool:
    return bool(getattr(module, "is_decoder", False) or getattr(getattr(module, "config", None), "is_decoder", False))


def find_bodies(model: nn.Module, owner: str = "text") -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The transformer body that embeds ``input_ids`` (``[(name, module)]``, one entry), and the names of the
    decoders that cross-attend to it (an encoder-decoder's decoder stack; else none).

    A body is a submodule whose ``forward`` takes ``input_ids``, ``attention_mask`` and ``inputs_embeds`` and
    holds no such submodule itself: ``BertModel`` inside a classifier, LLaMA's ``model``, T5's encoder and decoder
    stacks (the decoder, ``is_decoder``, is returned apart). Prompt and prefix methods rewrite the body's call.

    Raises:
        ValueError: no such submodule, or several encoders (the message names them and the fix).
    """
    found = [(n, m) for n, m in base_modules(model) if n and _takes(m, BODY_INPUTS)]
    deepest = [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]
    encoders = [(n, m) for n, m in deepest if not _is_decoder(m)]
    decoders = [n for n, m in deepest if _is_decoder(m) and _takes(m, {"encoder_attention_mask"})]
    if len(encoders) != 1:
        raise ValueError(
            f"{owner} looks for one submodule whose forward takes {sorted(BODY_INPUTS)} (the transformer body that "
            f"embeds input_ids) and found {[n for n, _ in encoders] or 'none'} in {type(model).__name__}. Adapt a "
            "model that holds its body as a submodule (a TextClassifier, *ForCausalLM, T5ForConditionalGeneration; "
            "not a bare BertModel), or name the body in target_modules."
        )
    return encoders, decoders


def bind_arguments(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``module.forward``'s positional ``args`` as keywords, merged with ``kwargs``."""
    names = [n for n in inspect.signature(module.forward).parameters if n not in ("args", "kwargs")]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def cache_length(kwargs: Mapping[str, Any]) -> int:
    """Positions already in the key/value cache of a body's call (``cache`` or ``past_key_values``; 0: none)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0
