"""Point-cloud operators: farthest-point sampling, k-nearest neighbours, gathering, z-order keys, input checks.

Everything runs batched in torch on the input's device. When ``torch_cluster`` is installed, :func:`knn` and
:func:`farthest_point_sample` use its kernels for large inputs (``use_extension=True``); the pure-torch paths
(``cdist`` + ``topk``; an ``N``-step distance update) are the reference and are what the tests pin down. On the
CPU, large farthest-point samplings (the one-time reduction of ModelNet's 10,000-point files to 8,192) use
``fpsample``'s exact ``fps_sampling`` when it is installed (``pip install modalpeft[fast]``): the same points in the
same order up to distance ties, 4x faster than the torch loop on one thread (``python -m benchmarks.fps``: 10,000 ->
8,192, 112 vs 442 ms per cloud; 2,048 -> 1,024, 3.1 vs 12.4 ms). Its bucket variants (QuickFPS) are faster still but
return other points (719 of 1,024 in common; they do not honour the start point), so they are not used.

torch_geometric's ``fps``/``knn`` are torch_cluster's kernels behind its ragged ``batch`` vectors; the point
transformer works on dense ``(B, N, 3)`` clouds of equal size, so the dense torch paths serve it directly.

Unlike the official Point-MAE / Point-BERT code (pointnet2's CUDA FPS, which starts at index 0), the first
farthest point here is the point farthest from the cloud's centroid, so the sampled *set* does not depend on
the order of the input points (only exact distance ties could make it do so).

The official kernel (erikwijmans/Pointnet2_PyTorch, ``sampling_gpu.cu``, ``furthest_point_sampling_kernel``) also
never picks, after its first point, a point with ``|p|² <= 1e-3`` (within about 0.032 of the origin: a guard
for zero-padded points): ``continue`` before the distance update. Ours does not by default, since the rule
depends on where the origin is (a translated cloud gives another sample) and our clouds carry no padding;
``min_sq_norm=OFFICIAL_MIN_SQ_NORM`` (and the backbones' ``fps_min_sq_norm``) follows it. Measured on the
point-cloud demo's 1,380 clouds (1,024 points, normalised to the unit sphere; 1.7% of them hold a point that
close to the origin), the rule changes the 512-point FPS of 1.2% of the clouds and the 32 centres of 1 cloud.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import numpy as np
import torch
from torch import Tensor

_HAS_TORCH_CLUSTER = importlib.util.find_spec("torch_cluster") is not None
_HAS_FPSAMPLE = importlib.util.find_spec("fpsample") is not None
OFFICIAL_MIN_SQ_NORM = 1e-3
"""The official pointnet2 FPS kernel never picks (after the first) a point with ``|p|² <=`` this."""
FPSAMPLE_MIN_WORK = 1 << 20
"""``fpsample`` takes a CPU sampling when ``points x samples`` reaches this (per-cloud calls do not pay below)."""


def check_points(points: Tensor, *, min_points: int = 1, channels: int = 3, name: str = "points") -> None:
    """Validate a batch of point clouds and raise a ``ValueError`` that names the bad sample and the fix.

    Args:
        points: ``(B, N, channels)``.
        min_points: the fewest points a cloud may have.
        channels: the number of values per point (3 for xyz).
        name: what the tensor is called in the message.
    """
    if not isinstance(points, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, {channels}), got {type(points).__name__}")
    if points.ndim != 3 or points.shape[-1] != channels:
        hint = (
            " (channels-first? use points.transpose(1, 2))" if points.ndim == 3 and points.shape[1] == channels else ""
        )
        raise ValueError(
            f"{name} must have shape (B, N, {channels}) with {channels} coordinates per point, got "
            f"{tuple(points.shape)}{hint}; keep only xyz (drop normals/colours) or build the backbone for them."
        )
    if not points.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {points.dtype}; call .float() first.")
    if points.shape[1] < min_points:
        raise ValueError(
            f"{name} holds {points.shape[1]} points per cloud, fewer than the {min_points} this configuration "
            "needs (num_group centres and group_size neighbours); resample the clouds to more points or use a "
            "configuration with fewer/smaller groups."
        )
    finite = torch.isfinite(points).all(dim=-1)  # (B, N)
    if not bool(finite.all()):
        bad = (~finite).sum(dim=1)
        samples = [(i, int(n)) for i, n in enumerate(bad.tolist()) if n]
        listed = ", ".join(f"sample {i} ({n} points)" for i, n in samples[:5])
        raise ValueError(
            f"{name} contains NaN or inf coordinates in {len(samples)} cloud(s) of the batch: {listed}"
            f"{' ...' if len(samples) > 5 else ''}. Clean or drop those clouds (e.g. remove non-finite points "
            "before resampling)."
        )


def gather_points(values: Tensor, index: Tensor) -> Tensor:
    """Batched gather along the point dim (whole rows, by ``index_select`` on the flattened batch: 6x faster than
    ``Tensor.gather`` with an index expanded over the channels, and its backward adds whole rows, 7x faster than
    ``scatter_add_``, on Point-PEFT's ``(8, 1024, 384)`` groups on one CPU thread).

    Shapes:
        - values: ``(B, N, C)``
        - index: ``(B, *S)`` integers in ``[0, N)``
        - output: ``(B, *S, C)``
    """
    batch, shape = index.shape[0], index.shape[1:]
    return (
        values.reshape(-1, values.shape[-1])
        .index_select(0, _flat_rows(index, values.shape[1]).reshape(-1))
        .view(batch, *shape, values.shape[-1])
    )


def _flat_rows(index: Tensor, rows: int) -> Tensor:
    """``index (B, *S)`` into ``rows`` per sample -> the same indices into the ``B·rows`` flattened rows."""
    offsets = torch.arange(index.shape[0], device=index.device) * rows
    return index + offsets.view(-1, *([1] * (index.ndim - 1)))


def fps_start(xyz: Tensor) -> Tensor:
    """The index of each cloud's point farthest from its centroid, where :func:`farthest_point_sample` starts:
    ``(B, N, 3) -> (B,)``."""
    return (xyz - xyz.mean(dim=1, keepdim=True)).square().sum(-1).argmax(dim=1)


def farthest_point_sample(
    xyz: Tensor, num_samples: int, *, use_extension: bool = True, min_sq_norm: float | None = None
) -> Tensor:
    """Indices of ``num_samples`` farthest points of each cloud, starting from the point farthest from its centroid.

    Each step adds the point whose distance to the already chosen set is largest. The start point does not
    depend on the order of the points, so neither does the chosen set.

    Args:
        xyz: ``(B, N, 3)`` or ``(N, 3)`` coordinates.
        num_samples: how many points to keep (``<= N``).
        use_extension: use ``torch_cluster.fps`` on CUDA when installed (same start point, via a permutation that
            puts it first), and ``fpsample.fps_sampling`` on the CPU for large inputs when installed (same start).
        min_sq_norm: never pick, after the start point, a point with ``|p|² <= min_sq_norm``, as the official
            pointnet2 kernel does with ``OFFICIAL_MIN_SQ_NORM`` (1e-3); when every remaining point is excluded,
            index 0 is picked, as that kernel does. ``None``: every point can be picked. Runs the torch loop.

    Shapes:
        - output: ``(B, num_samples)`` (or ``(num_samples,)`` for an unbatched input), int64, in selection order
    """
    unbatched = xyz.ndim == 2
    if unbatched:
        xyz = xyz.unsqueeze(0)
    batch, n, _ = xyz.shape
    if not 1 <= num_samples <= n:
        raise ValueError(f"num_samples={num_samples} must be between 1 and the number of points {n}")
    with torch.no_grad():
        pts = xyz.detach().float()
        start = fps_start(pts)
        if min_sq_norm is not None:
            idx = _fps_torch(pts, num_samples, start, pts.square().sum(-1) <= min_sq_norm)
        elif use_extension and _HAS_TORCH_CLUSTER and pts.is_cuda:
            idx = _fps_torch_cluster(pts, num_samples, start)
        elif use_extension and _HAS_FPSAMPLE and pts.device.type == "cpu" and n * num_samples >= FPSAMPLE_MIN_WORK:
            idx = _fps_fpsample(pts, num_samples, start)
        else:
            idx = _fps_torch(pts, num_samples, start)
    return idx[0] if unbatched else idx


def _fps_torch(pts: Tensor, num_samples: int, start: Tensor, excluded: Tensor | None = None) -> Tensor:
    batch, n, _ = pts.shape
    idx = torch.empty(batch, num_samples, dtype=torch.long, device=pts.device)
    dist = torch.full((batch, n), float("inf"), device=pts.device)
    if excluded is not None:  # (B, N) never picked: -inf stays below every distance (argmax of all -inf: index 0)
        dist = dist.masked_fill(excluded, float("-inf"))
    arange = torch.arange(batch, device=pts.device)
    current = start
    for i in range(num_samples):
        idx[:, i] = current
        last = pts[arange, current].unsqueeze(1)  # (B, 1, 3)
        dist = torch.minimum(dist, (pts - last).square().sum(-1))
        current = dist.argmax(dim=1)
    return idx


def _fps_fpsample(pts: Tensor, num_samples: int, start: Tensor) -> Tensor:
    import fpsample

    clouds = pts.contiguous().numpy()
    starts = start.tolist()
    picked = [fpsample.fps_sampling(cloud, num_samples, start_idx=s) for cloud, s in zip(clouds, starts, strict=True)]
    return torch.from_numpy(np.stack(picked).astype(np.int64))


def _fps_torch_cluster(pts: Tensor, num_samples: int, start: Tensor) -> Tensor:  # pragma: no cover - needs CUDA
    import torch_cluster

    batch, n, _ = pts.shape
    # put the start point first in each cloud, since torch_cluster.fps(random_start=False) starts at index 0
    order = torch.arange(n, device=pts.device).expand(batch, n).clone()
    arange = torch.arange(batch, device=pts.device)
    order[arange, start] = 0
    order[:, 0] = start
    permuted = pts[arange[:, None], order]  # (B, N, 3)
    flat_batch = torch.arange(batch, device=pts.device).repeat_interleave(n)
    picked = torch_cluster.fps(permuted.reshape(-1, 3), flat_batch, ratio=num_samples / n, random_start=False)
    picked = picked.reshape(batch, -1)[:, :num_samples] - (arange * n)[:, None]
    return order.gather(1, picked)


def knn(query: Tensor, reference: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` nearest reference points of every query point (Euclidean), nearest first.

    Shapes:
        - query: ``(B, M, D)``
        - reference: ``(B, N, D)``, ``N >= k``
        - output: ``(B, M, k)``, int64 indices into ``reference``
    """
    if k > reference.shape[1]:
        raise ValueError(f"k={k} is larger than the {reference.shape[1]} reference points")
    with torch.no_grad():
        dist = torch.cdist(query.detach().float(), reference.detach().float())  # (B, M, N)
        return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(
    xyz: Tensor, num_group: int, group_size: int, min_sq_norm: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Point-MAE's grouping: FPS centres, their ``group_size`` nearest points, coordinates relative to the centre.
    ``min_sq_norm``: see :func:`farthest_point_sample`.

    Shapes:
        - xyz: ``(B, N, 3)``
        - output: neighbourhoods ``(B, G, M, 3)`` (centred), centres ``(B, G, 3)``, neighbour indices ``(B, G, M)``
    """
    center_idx = farthest_point_sample(xyz, num_group, min_sq_norm=min_sq_norm)  # (B, G)
    center = gather_points(xyz, center_idx)  # (B, G, 3)
    idx = knn(center, xyz, group_size)  # (B, G, M)
    neighborhood = gather_points(xyz, idx) - center.unsqueeze(2)  # (B, G, M, 3)
    return neighborhood, center, idx


def _part1by2(x: Tensor) -> Tensor:
    """Spread the low 21 bits of ``x`` so that two zero bits follow each (for 3-D Morton codes)."""
    x = x & 0x1FFFFF
    x = (x | (x << 32)) & 0x1F00000000FFFF
    x = (x | (x << 16)) & 0x1F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    x = (x | (x << 2)) & 0x1249249249249249
    return x


ZOrder = Literal["official", "shifted"]


def z_order_key(xyz: Tensor, scale: float = 100.0, depth: int = 16, mode: ZOrder = "official") -> Tensor:
    """Morton (z-order) key of each point, as PointGST sorts patch centres.

    The coordinates are scaled by ``scale`` and truncated toward zero to integers, then their low ``depth`` bits
    are interleaved (y first, then x, then z, as PointGST's ``xyz2key(y, x, z)``):

    - ``mode="official"``: PointGST's key (``models/z_order.py``, from O-CNN): a negative integer is read in
      two's complement, so ``-1`` has all ``depth`` bits set and sorts after every non-negative value on its axis;
    - ``mode="shifted"``: each cloud's integers are first shifted to be non-negative (minus their minimum), so
      the key follows space across the origin too.

    Shapes:
        - xyz: ``(B, N, 3)``
        - output: ``(B, N)`` int64
    """
    if mode not in ("official", "shifted"):
        raise ValueError(f"z-order mode={mode!r} is not valid; choose 'official' or 'shifted'.")
    q = (xyz.detach() * scale).long()  # (B, N, 3), truncated toward zero as torch's .long()
    mask = (1 << depth) - 1
    if mode == "shifted":
        q = (q - q.min(dim=1, keepdim=True).values).clamp(max=mask)
    q = q & mask  # two's complement bits of negative integers ("official"); a no-op for the shifted ones
    y, x, z = q[..., 1], q[..., 0], q[..., 2]
    return (_part1by2(y) << 2) | (_part1by2(x) << 1) | _part1by2(z)


def _first_max(sums: Tensor, top: Tensor) -> Tensor:
    """For ``sums (K, M)`` and their maxima ``top (M,)``: the first ``k`` with ``sums[k] == top`` per column
    (``Tensor.max(0).indices``, from one comparison and a weighted count instead of that slow reduction)."""
    k = sums.shape[0]
    if k <= 255:
        equal = sums == top
        if bool((equal.sum(0, dtype=torch.uint8) == 1).all()):
            weights = torch.arange(k, dtype=torch.uint8, device=sums.device).view(-1, 1)
            return (equal.view(torch.uint8) * weights).sum(0, dtype=torch.uint8)
    return sums.max(dim=0).indices  # a tie or a NaN somewhere: the reduction's own first index


class _GatherLinearMax(torch.autograd.Function):
    """``max_k(values[index] + scale · (hidden @ weightᵀ + bias))`` without autograd's dense intermediates.

    Forward builds the ``K`` sums of each output once, neighbour-major ``(K, B·A·C)`` (a row gather, then the
    projection added in place by one ``addmm``), takes their elementwise maximum and keeps only which neighbour gave
    it (one byte per output); backward sends each output's gradient to that one row: to ``values`` by adding
    ``B·A`` rows of ``C`` (autograd's gather backward adds all ``B·A·K``), and to the projection through one dense
    ``(B·A·K, C)`` gradient (the max's, which autograd builds too). ``Tensor.max(dim)`` with indices is 10-20x
    slower on the CPU than ``amax``, so the index comes from where the sums equal the maximum (the first such
    neighbour, as ``Tensor.max``; where none or several do, a NaN or a tie, from ``Tensor.max`` itself).
    """

    @staticmethod
    def forward(ctx, values, index, hidden, weight, bias, scale):  # type: ignore[override]
        b, a, k = index.shape
        c = values.shape[-1]
        rows = _flat_rows(index, values.shape[1]).reshape(b * a, k).t().reshape(-1)  # neighbour-major
        hidden = hidden.reshape(b * a, k, -1).transpose(0, 1).reshape(k * b * a, -1)
        if scale is not None:  # the bias joins the projection as a column, so that the scale reaches it too
            scale = scale.repeat(k, 1)
            hidden = torch.cat([hidden * scale, scale], dim=1)
            weight = torch.cat([weight, bias.unsqueeze(1)], dim=1)
            sums = values.reshape(-1, c).index_select(0, rows)
        else:
            sums = (values + bias).reshape(-1, c).index_select(0, rows)
        sums.addmm_(hidden, weight.t())
        sums = sums.view(k, b * a * c)
        pooled = sums.amax(dim=0)
        first = _first_max(sums, pooled)
        ctx.save_for_backward(rows, hidden, weight, first, scale)
        ctx.scaled, ctx.shape = scale is not None, (b, a, k, c, values.shape[1])
        return pooled.view(b, a, c)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        rows, hidden, weight, first, scale = ctx.saved_tensors
        b, a, k, c, n = ctx.shape
        g = grad.reshape(1, -1)
        first = first.view(1, -1).long()
        grad_values = grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the row each maximum came from: out[ch, group] = rows[first[group, ch], group]
            source = rows.view(k, b * a).gather(0, first.view(b * a, c).t()).t()  # (B·A, C)
            grad_values = grad.new_zeros(b * n, c).scatter_add_(0, source, grad.reshape(b * a, c)).view(b, n, c)
        if any(ctx.needs_input_grad[2:5]):
            dense = grad.new_zeros(k, b * a * c).scatter_(0, first, g).view(k * b * a, c)
            if ctx.needs_input_grad[2]:
                grad_hidden = dense @ weight  # neighbour-major, back to group-major below
                if ctx.scaled:
                    grad_hidden = grad_hidden[:, :-1] * scale
                grad_hidden = grad_hidden.view(k, b * a, -1).transpose(0, 1).reshape(b * a * k, -1)
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                full = dense.t() @ hidden  # (C, width [+ 1])
                if ctx.scaled:
                    grad_weight, grad_bias = full[:, :-1], full[:, -1]
                else:
                    grad_weight, grad_bias = full, grad.reshape(-1, c).sum(0)
        return grad_values, None, grad_hidden, grad_weight, grad_bias, None


def gather_linear_max(
    values: Tensor, index: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None = None
) -> Tensor:
    """The max over each group of ``values`` gathered at ``index`` plus a linear projection of ``hidden``:
    ``out[b, a] = max_k (values[b, index[b, a, k]] + scale[b·A + a] · (hidden[(b·A + a)·K + k] @ weightᵀ + bias))``.

    Equal to the straightforward ``(gather_points(values, index) + scale · F.linear(hidden, weight, bias)).amax(2)``
    (outputs bit for bit up to the addition order; gradients up to summation order, ties going to the first
    maximum as ``Tensor.max``'s), in one pass over the ``(B·A·K, C)`` sums and with a gradient that only touches
    the maxima: Point-PEFT's pooling of each anchor's neighbourhood after its local attention.

    Shapes:
        - values: ``(B, N, C)``; index: ``(B, A, K)`` integers in ``[0, N)``
        - hidden: ``(B·A·K, D)``; weight: ``(C, D)``; bias: ``(C,)``; scale: ``(B·A, 1)`` per group (a drop-path
          mask) or ``None``
        - output: ``(B, A, C)``
    """
    b, a, k = index.shape
    if hidden.shape != (b * a * k, weight.shape[1]) or weight.shape[0] != values.shape[-1]:
        raise ValueError(
            f"gather_linear_max: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit values "
            f"{tuple(values.shape)} grouped by index {tuple(index.shape)}; expected hidden ({b * a * k}, D) and "
            f"weight ({values.shape[-1]}, D)"
        )
    if scale is not None:
        scale = scale.reshape(b * a, 1)
    return _GatherLinearMax.apply(values, index, hidden, weight, bias, scale)
