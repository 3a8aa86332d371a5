"""Recomputing a tensor from what the operation that made it keeps for its own backward.

An adapter's backward needs its input ``x``; keeping ``x`` adds a tensor of its size to the activations unless the
op that made ``x`` already keeps what rebuilds it (a GELU keeps its input, a LayerNorm its input and statistics).
Used by :func:`~modalpeft.core.layers.dropout.dropped_product` and
:class:`~modalpeft.core.layers.FactorizedVector`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def recompute_source(x: Tensor) -> tuple[tuple[Tensor, ...], Callable[..., Tensor]] | None:
    """What the operation that made ``x`` keeps for its own backward and recomputes ``x`` from, with the function
    that does: ``(tensors, f)`` with ``f(*tensors) ≈ x``, or ``None`` (keep ``x``).

    - GELU (``GeluBackward0``): its input ``u``; ``x = gelu(u)`` exactly (the same kernel on the same input);
    - LayerNorm over the last axes (``NativeLayerNormBackward0``): its input, mean and reciprocal deviation, weight
      and bias; ``x = (input - mean) · rstd · w + b``, equal to the kernel's output up to float rounding.

    Anything else (or a node whose saved tensors cannot be read) gives ``None``."""
    node = x.grad_fn
    name = type(node).__name__ if node is not None else ""
    try:
        if name == "GeluBackward0":
            u = node._saved_self
            approximate = node._saved_approximate
            if u.shape == x.shape and u.dtype == x.dtype:
                return (u,), lambda u: F.gelu(u, approximate=approximate)
        elif name == "NativeLayerNormBackward0":
            source = node._saved_input
            mean, rstd = node._saved_result1, node._saved_result2
            weight, bias = node._saved_weight, node._saved_bias
            if source.shape == x.shape and source.dtype == x.dtype and mean.shape == rstd.shape:
                return (source, mean, rstd, *(t for t in (weight, bias) if t is not None)), _layer_norm_from(
                    weight is not None, bias is not None
                )
    except RuntimeError:  # the node's saved tensors were freed or cannot be unpacked here
        return None
    return None


def _layer_norm_from(has_weight: bool, has_bias: bool) -> Callable[..., Tensor]:
    def recompute(source: Tensor, mean: Tensor, rstd: Tensor, *affine: Tensor) -> Tensor:
        out = (source - mean) * rstd
        if has_weight:
            out = out * affine[0]
        if has_bias:
            out = out + affine[-1]
        return out

    return recompute


__all__ = ["recompute_source"]
