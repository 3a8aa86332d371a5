"""Recomputing a tensor from what the operation that made it keeps for its own backward.

An adapter's backward needs its input ``x``; keeping ``x`` adds a tensor of its size to the activations unless the
op that made ``x`` already keeps what rebuilds it (a GELU keeps its input, a LayerNorm its input and statistics).
Used by :func:`~modalpeft.core.layers.dropout.dropped_product`, :class:`~modalpeft.core.layers.FactorizedVector`
and :class:`~modalpeft.core.layers.RecomputingScaleShift`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def recompute_source(x: Tensor) -> tuple[tuple[Tensor, ...], Callable[..., Tensor]] | None:
    """What the operation that made ``x`` keeps for its own backward and recomputes ``x`` from, with the function
    that does: ``(tensors, f)`` with ``f(*tensors) ≈ x``, or ``None`` (keep ``x``).

    - GELU (``GeluBackward0``): its input ``u``; ``x = gelu(u)`` exactly (the same kernel on the same input);
    - LayerNorm over the last axes (``NativeLayerNormBackward0``): its input, mean and reciprocal deviation, weight
      and bias; ``x = (input - mean) · rstd · w + b``, equal to the kernel's output up to float rounding;
    - a fused attention's output (``F.scaled_dot_product_attention``'s flash, memory-efficient and cuDNN kernels keep
      their output for backward), reached through views, reshapes, transposes, permutes and clones (timm's
      ``attn(...).transpose(1, 2).reshape(B, N, C)``, the input of ``attn.proj``): those shape operations again on the
      kept output, bit for bit.

    Anything else (or a node whose saved tensors cannot be read) gives ``None``."""
    node = x.grad_fn
    name = type(node).__name__ if node is not None else ""
    if name in _SHAPE_OPS:
        return _attention_output_source(x)
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


_SHAPE_OPS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "CloneBackward0",
    }
)
_ATTENTION_KEEPS_OUTPUT = frozenset(
    {
        "ScaledDotProductFlashAttentionForCpuBackward0",
        "ScaledDotProductFlashAttentionBackward0",
        "ScaledDotProductEfficientAttentionBackward0",
        "ScaledDotProductCudnnAttentionBackward0",
    }
)


def _attention_output_source(x: Tensor, depth: int = 8) -> tuple[tuple[Tensor, ...], Callable[..., Tensor]] | None:
    """``x`` as shape operations on a fused attention's kept output: that output and the function that redoes
    them, or ``None``."""
    ops: list[tuple[str, tuple[int, ...]]] = []  # from x back to the attention; applied in reverse
    node, shape = x.grad_fn, tuple(x.shape)
    try:
        for _ in range(depth):
            name = type(node).__name__
            if name in _ATTENTION_KEEPS_OUTPUT:
                out = node._saved_output
                if tuple(out.shape) != shape or out.dtype != x.dtype:
                    return None
                return (out,), functools.partial(_redo_shape_ops, tuple(reversed(ops)))
            if name not in _SHAPE_OPS or len(node.next_functions) != 1:
                return None
            if name == "TransposeBackward0":
                d0, d1 = (d % len(shape) for d in (node._saved_dim0, node._saved_dim1))
                ops.append(("transpose", (d0, d1)))
                swapped = list(shape)
                swapped[d0], swapped[d1] = shape[d1], shape[d0]
                shape = tuple(swapped)
            elif name == "PermuteBackward0":
                dims = tuple(d % len(shape) for d in node._saved_dims)
                ops.append(("permute", dims))
                before = [0] * len(shape)
                for i, d in enumerate(dims):
                    before[d] = shape[i]
                shape = tuple(before)
            elif name == "CloneBackward0":
                ops.append(("clone", ()))
            else:  # a view or reshape from the input's shape to this one
                ops.append(("reshape", shape))
                shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            node, output_index = node.next_functions[0]
            if node is None or output_index != 0:  # the attention's first output is its result
                return None
    except (AttributeError, RuntimeError):  # a node without these attributes, or whose saved tensors were freed
        return None
    return None


def _redo_shape_ops(ops: tuple[tuple[str, tuple[int, ...]], ...], out: Tensor) -> Tensor:
    for op, arg in ops:
        if op == "transpose":
            out = out.transpose(*arg)
        elif op == "permute":
            out = out.permute(*arg)
        elif op == "clone":
            out = out.clone()
        else:
            out = out.reshape(arg)
    return out


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
