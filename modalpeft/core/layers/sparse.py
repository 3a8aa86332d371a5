"""Sparse delta: trainable values at fixed entries of a frozen Linear weight (SPT's unstructured tuning).

SPT: He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023,
https://arxiv.org/abs/2303.08566.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode

# Upper bound on the elements of the (tokens, entries) products formed at once in the backward pass.
_CHUNK_ELEMENTS = 1 << 24
# Below this share of non-zero entries, products go through gathers (O(tokens · n)) instead of a dense weight.
_SPARSE_DENSITY = 1 / 16
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class SparseDelta(AdapterModule):
    """An update ``y = (W + ΔW) x + b`` where ``ΔW`` is zero except at ``n`` fixed entries.

    ``ΔW[rows[k], cols[k]] = values[k]``. Only ``values`` trains; ``indices`` is a persistent buffer, so it is
    saved with the adapter. The backward pass computes the gradient of the ``n`` values directly,
    ``∂L/∂values[k] = Σ_t ∂L/∂y[t, rows[k]] · x[t, cols[k]]`` (summed over every leading position ``t``), in
    chunks of entries: it never forms the dense ``(d_out, d_in)`` gradient of the weight. Below a density of 1/16
    (NeuroAda's k entries per row, SPT's small budgets) the products ``ΔW x`` and ``ΔWᵀ ∂L/∂y`` go through gathers
    and index-adds too (``O(tokens · n)``, no weight-sized tensor at all); denser deltas use one dense ``ΔW``.
    SPT's saved flat indices ``f`` convert as ``torch.stack([f // d_in, f % d_in])``.

    ``fused=False`` adds ``ΔW x`` beside the base Linear (a parallel branch, any base module with ``weight``);
    ``fused=True`` replaces the base product by one ``x (W + ΔW)ᵀ + b`` (NeuroAda's ``scatter_add`` forward), whose
    backward computes ``∂L/∂x = ∂L/∂y (W + ΔW)`` and the entries' gradients as above: it costs the base Linear plus
    ``O(tokens · n)``. For the entries' gradients either form keeps, of ``x``, only the input columns some entry
    reads when they are fewer than half of ``d_in`` (a ``(u, tokens)`` copy: SPT's few entries in ``fc2`` do not keep
    its ``4d``-wide input alive), else ``x`` itself (a frozen ``nn.Linear`` keeps only its weight).
    :meth:`linear` is the fused product for a caller that adds more to it (SPT's bias entries and LoRA blocks).
    The grouping of the entries by column and by row (``unique`` over ``indices``) is computed once and reused by every
    step (:meth:`groups`), again only when ``indices`` changes (a load into the buffer, a move to another device).

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        indices: ``(2, n)`` integer tensor, row ``0`` the output rows and row ``1`` the input columns of the tuned
            entries; entries must lie inside the weight and be distinct.
        init_weights: ``True``/``"identity"``: zeros (the base weight, as SPT starts); ``False``: random.
        fused: compute the adapted Linear in one product (``nn.Linear`` bases) instead of a parallel branch.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``indices``: ``(2, n)``, ``values``: ``(n,)``; :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        indices: Tensor,
        *,
        init_weights: InitMode = True,
        fused: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.has_parallel, self.has_replace_base = not fused, fused
        shape = (out_features, in_features)
        if indices.ndim != 2 or indices.shape[0] != 2 or indices.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"indices must be an integer tensor of shape (2, n) (rows, then columns), got {indices.dtype} of "
                f"shape {tuple(indices.shape)}; convert flat indices f with torch.stack([f // d_in, f % d_in])"
            )
        rows, cols = indices.long()
        outside = (rows < 0) | (rows >= out_features) | (cols < 0) | (cols >= in_features)
        if outside.any():
            k = int(outside.nonzero()[0])
            raise ValueError(
                f"entry ({int(rows[k])}, {int(cols[k])}) of indices lies outside the weight of shape {shape} "
                f"({int(outside.sum())} entries do); indices are (row, column) pairs into (out_features, in_features)"
            )
        repeated = indices.shape[1] - (rows * in_features + cols).unique().numel()
        if repeated:
            raise ValueError(
                f"indices holds {repeated} repeated entries of the weight of shape {shape}; pass each entry once"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.values = nn.Parameter(torch.empty(indices.shape[1], device=device, dtype=dtype))
        self.register_buffer("indices", indices.to(device=self.values.device, dtype=torch.long))
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        if init_weights is False:
            nn.init.normal_(self.values, std=0.1)
        else:
            nn.init.zeros_(self.values)

    def groups(self) -> _Groups:
        """The entries grouped by input column and by output row (what the backward gathers by), cached: recomputed
        only when ``indices`` is another tensor, was written to (``load_state_dict`` copies into it) or moved."""
        indices = self.indices
        key = (indices.data_ptr(), indices._version, indices.device)
        cached = getattr(self, "_groups", None)
        if cached is None or cached[0] != key:
            cols_used, cols = indices[1].unique(return_inverse=True)
            rows_used, rows = indices[0].unique(return_inverse=True)
            self._groups = cached = (key, _Groups(cols_used, cols, rows_used, rows))
        return cached[1]

    def parallel(self, x: Tensor) -> Tensor:
        return _SparseDeltaMatmul.apply(x, self.values, self.indices, self.out_features, self.groups())

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        return self.linear(x, base.weight, base.bias)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x (weight + ΔW)ᵀ + bias`` in one product (the fused path; ``bias`` may carry a trainable delta of its
        own, as SPT's tuned bias entries). The product runs on ``x`` flattened to ``(tokens, d_in)`` and is viewed back,
        so the output can be added into in place (a custom Function's own view output cannot)."""
        out = _SparseLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, self.values, self.indices, self.groups())
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta_weight(self) -> Tensor:
        delta = self.values.new_zeros(self.out_features, self.in_features)
        return delta.index_put((self.indices[0], self.indices[1]), self.values)


class _SparseDeltaMatmul(torch.autograd.Function):
    """``x @ ΔWᵀ`` with ``ΔW`` built from ``(indices, values)``; the backward gives ``values`` a sparse gradient.

    Gathers work on feature-major copies (``(d, T)``: one contiguous row per feature), which is where they are fast.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, indices: Tensor, out_features: int, groups: _Groups) -> Tensor:
        kept = _keep_columns(x, groups) if ctx.needs_input_grad[1] else ()
        ctx.groups = groups
        ctx.save_for_backward(values, indices, *kept)
        ctx.out_features, ctx.in_features = out_features, x.shape[-1]
        if _is_sparse(values.shape[0], x.shape[-1], out_features):
            return _gather_matmul(x, values, indices[1], indices[0], out_features)
        return x @ _dense(values, indices, out_features, x.shape[-1], x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        values, indices, *kept = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            if _is_sparse(values.shape[0], ctx.in_features, ctx.out_features):
                grad_x = _gather_matmul(grad_y, values, indices[0], indices[1], ctx.in_features)
            else:
                grad_x = grad_y @ _dense(values, indices, ctx.out_features, ctx.in_features, grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = _entry_grads(grad_y, _feature_major(kept, ctx.groups, ctx.in_features), values, ctx.groups)
        return grad_x, grad_values, None, None, None


class _SparseLinear(torch.autograd.Function):
    """``x (W + ΔW)ᵀ + b`` in one product; the backward gives ``values`` a sparse gradient (``W``, ``b`` frozen)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor, groups: _Groups
    ) -> Tensor:
        kept = _keep_columns(x, groups) if ctx.needs_input_grad[3] else ()
        ctx.groups = groups
        ctx.has_bias, ctx.whole = bias is not None, ctx.needs_input_grad[1]
        whole = (x,) if ctx.whole else ()  # a base weight that trains too needs all of x
        ctx.save_for_backward(weight, values, indices, *whole, *kept)
        return nn.functional.linear(x, _adapted_weight(weight, values, indices), bias)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        weight, values, indices, *rest = ctx.saved_tensors
        x = rest.pop(0) if ctx.whole else None
        grad_x = grad_weight = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _adapted_weight(weight, values, indices)  # W + ΔW again: a copy, not a gradient
        if ctx.needs_input_grad[1]:  # a base weight that trains too (not the method's setting)
            grad_weight = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            grad_values = _entry_grads(grad_y, _feature_major(rest, ctx.groups, weight.shape[1]), values, ctx.groups)
        return grad_x, grad_weight, grad_bias, grad_values, None, None


def _adapted_weight(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    return weight.index_put((indices[0], indices[1]), values.to(weight.dtype), accumulate=True)


class _Groups(NamedTuple):
    """The entries of a :class:`SparseDelta` grouped by the input column and the output row they read."""

    cols_used: Tensor
    """The distinct input columns, sorted, ``(u,)``."""
    cols: Tensor
    """Each entry's position in ``cols_used``, ``(n,)``."""
    rows_used: Tensor
    """The distinct output rows, sorted."""
    rows: Tensor
    """Each entry's position in ``rows_used``."""


def _keep_columns(x: Tensor, groups: _Groups) -> tuple[Tensor, ...]:
    """What a backward keeps of ``x`` for the entries' gradients.

    With few distinct columns (SPT's small budgets: fewer than half of ``d_in``) it keeps a feature-major copy of
    those columns, ``(u, T)``, and the rest of ``x`` can be freed (a sparse entry in ``fc2`` does not keep the whole
    ``4d``-wide activation alive); otherwise ``x`` itself (no copy; NeuroAda's entries read nearly every column),
    gathered in the backward by :func:`_feature_major`."""
    flat = x.reshape(-1, x.shape[-1])
    return (flat.t()[groups.cols_used],) if _copies_columns(groups, x.shape[-1]) else (flat,)


def _copies_columns(groups: _Groups, in_features: int) -> bool:
    return 2 * groups.cols_used.numel() < in_features


def _feature_major(kept: Sequence[Tensor], groups: _Groups, in_features: int) -> Tensor:
    """The used columns of ``x`` as ``(u, T)`` rows, from what :func:`_keep_columns` kept."""
    return kept[0] if _copies_columns(groups, in_features) else kept[0].t()[groups.cols_used]


def _entry_grads(grad_y: Tensor, x_t: Tensor, values: Tensor, groups: _Groups) -> Tensor:
    """``∂L/∂values[k] = Σ_t ∂L/∂y[t, rows[k]] · x[t, cols[k]]``, in chunks of entries, never a dense gradient.

    ``x_t`` holds the used input columns feature-major (``(u, T)``, one contiguous row per feature), ``groups.cols``
    each entry's row in it (:func:`_keep_columns`). The used output rows of ``∂L/∂y`` are copied the same
    way: a few entries (SPT's small budgets) cost ``O(tokens · n)``, not a copy of ``x`` and ``∂L/∂y``."""
    cols, rows = groups.cols, groups.rows
    grad_t = grad_y.reshape(-1, grad_y.shape[-1]).t()[groups.rows_used]  # (u_rows, T), T = all leading positions
    grad_values = torch.empty_like(values)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x_t.shape[1]))
    for start in range(0, values.shape[0], chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        # (c, T) · (c, T) summed over T: the gradients of c entries, without a dense (d_out, d_in) matrix.
        grad_values[start : start + chunk] = torch.einsum(
            "ct,ct->c", grad_t[r].to(values.dtype), x_t[c].to(values.dtype)
        )
    return grad_values


def _dense(values: Tensor, indices: Tensor, out_features: int, in_features: int, dtype: torch.dtype) -> Tensor:
    delta = torch.zeros(out_features, in_features, device=values.device, dtype=dtype)
    return delta.index_put_((indices[0], indices[1]), values.to(dtype))


def _is_sparse(entries: int, in_features: int, out_features: int) -> bool:
    return entries <= _SPARSE_DENSITY * in_features * out_features


def _gather_matmul(x: Tensor, values: Tensor, src: Tensor, dst: Tensor, width: int) -> Tensor:
    """``out[..., dst[k]] += values[k] · x[..., src[k]]`` for every entry ``k``, in chunks of entries: the product
    with the sparse matrix (or its transpose) without forming it; ``(*, width)``."""
    x_t = x.reshape(-1, x.shape[-1]).t().contiguous()  # (d, T)
    out = x_t.new_zeros(width, x_t.shape[1])  # (width, T)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x_t.shape[1]))
    for start in range(0, values.shape[0], chunk):
        end = start + chunk
        out.index_add_(0, dst[start:end], x_t[src[start:end]] * values[start:end, None].to(x_t.dtype))
    return out.t().reshape(*x.shape[:-1], width)
