"""Sparse delta: trainable values at fixed entries of a frozen Linear weight (SPT's unstructured tuning).

SPT: He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023,
https://arxiv.org/abs/2303.08566.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode

# Upper bound on the elements of the (tokens, entries) products formed at once in the backward pass.
_CHUNK_ELEMENTS = 1 << 24
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class SparseDelta(AdapterModule):
    """A parallel update ``y = W x + ΔW x`` where ``ΔW`` is zero except at ``n`` fixed entries.

    ``ΔW[rows[k], cols[k]] = values[k]``. Only ``values`` trains; ``indices`` is a persistent buffer, so it is
    saved with the adapter. The backward pass computes the gradient of the ``n`` values directly,
    ``∂L/∂values[k] = Σ_t ∂L/∂y[t, rows[k]] · x[t, cols[k]]`` (summed over every leading position ``t``), in
    chunks of entries: it never forms the dense ``(d_out, d_in)`` gradient of the weight. SPT's saved flat indices
    ``f`` convert as ``torch.stack([f // d_in, f % d_in])``.

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        indices: ``(2, n)`` integer tensor, row ``0`` the output rows and row ``1`` the input columns of the tuned
            entries; entries must lie inside the weight and be distinct.
        init_weights: ``True``/``"identity"``: zeros (the base weight, as SPT starts); ``False``: random.

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
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

    def parallel(self, x: Tensor) -> Tensor:
        return _SparseDeltaMatmul.apply(x, self.values, self.indices, self.out_features)

    def delta_weight(self) -> Tensor:
        delta = self.values.new_zeros(self.out_features, self.in_features)
        return delta.index_put((self.indices[0], self.indices[1]), self.values)


class _SparseDeltaMatmul(torch.autograd.Function):
    """``x @ ΔWᵀ`` with ``ΔW`` built from ``(indices, values)``; the backward gives ``values`` a sparse gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, indices: Tensor, out_features: int) -> Tensor:
        ctx.save_for_backward(x, values, indices)
        ctx.out_features = out_features
        return x @ _dense(values, indices, out_features, x.shape[-1], x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _dense(values, indices, ctx.out_features, x.shape[-1], grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])  # (T, d_out), T = all leading positions
            x2 = x.reshape(-1, x.shape[-1])  # (T, d_in)
            grad_values = torch.empty_like(values)
            chunk = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[0]))
            for start in range(0, values.shape[0], chunk):
                rows, cols = indices[:, start : start + chunk]
                # (T, c) · (T, c) summed over T: the gradients of c entries, without a dense (d_out, d_in) matrix.
                products = grad_y2[:, rows].to(values.dtype) * x2[:, cols].to(values.dtype)
                grad_values[start : start + chunk] = products.sum(0)
        return grad_x, grad_values, None, None


def _dense(values: Tensor, indices: Tensor, out_features: int, in_features: int, dtype: torch.dtype) -> Tensor:
    delta = torch.zeros(out_features, in_features, device=values.device, dtype=dtype)
    return delta.index_put_((indices[0], indices[1]), values.to(dtype))
