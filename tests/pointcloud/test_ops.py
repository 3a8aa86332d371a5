"""FPS, kNN, grouping and z-order keys against brute force, and their invariance to point order."""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest
import torch

from modalpeft.pointcloud import create_backbone, farthest_point_sample, group_points, knn, ops
from modalpeft.pointcloud.ops import OFFICIAL_MIN_SQ_NORM, check_points, fps_start, gather_points, z_order_key


def brute_fps(xyz: torch.Tensor, n: int) -> list[int]:
    """One cloud, plain Python: start farthest from the centroid, then the farthest from the chosen set."""
    pts = xyz.tolist()
    mean = [sum(p[i] for p in pts) / len(pts) for i in range(3)]
    d2 = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b, strict=True))  # noqa: E731
    chosen = [max(range(len(pts)), key=lambda i: d2(pts[i], mean))]
    while len(chosen) < n:
        chosen.append(max(range(len(pts)), key=lambda i: min(d2(pts[i], pts[j]) for j in chosen)))
    return chosen


def test_fps_matches_brute_force(clouds):
    idx = farthest_point_sample(clouds[:, :40], 10)
    assert idx.shape == (4, 10) and idx.dtype == torch.long
    for b in range(4):
        assert idx[b].tolist() == brute_fps(clouds[b, :40], 10)
    assert farthest_point_sample(clouds[0, :40], 10).tolist() == idx[0].tolist()  # unbatched input


def test_fps_is_invariant_to_point_order(clouds):
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    picked = gather_points(clouds, farthest_point_sample(clouds, 16))
    picked_perm = gather_points(clouds[:, perm], farthest_point_sample(clouds[:, perm], 16))
    torch.testing.assert_close(picked, picked_perm, rtol=0, atol=0)  # same points, same order


def test_large_cpu_fps_goes_to_fpsample_with_our_start_point(clouds, monkeypatch):
    """With ``fpsample`` installed, a large CPU sampling is handed to its exact ``fps_sampling``, started at the
    point farthest from the centroid; small ones (the model's group centres) stay in torch."""
    calls = []

    def fps_sampling(cloud, n_samples, start_idx):
        calls.append((cloud.shape, n_samples, start_idx))
        # exact FPS from the given start, as fpsample computes it
        return brute_fps(torch.from_numpy(cloud), n_samples)

    monkeypatch.setitem(sys.modules, "fpsample", types.SimpleNamespace(fps_sampling=fps_sampling))
    monkeypatch.setattr(ops, "_HAS_FPSAMPLE", True)
    monkeypatch.setattr(ops, "FPSAMPLE_MIN_WORK", 40 * 10)
    idx = farthest_point_sample(clouds[:, :40], 10)
    starts = (clouds[:, :40] - clouds[:, :40].mean(1, keepdim=True)).square().sum(-1).argmax(1).tolist()
    assert calls == [((40, 3), 10, s) for s in starts]
    assert idx.dtype == torch.long and idx.tolist() == ops._fps_torch(clouds[:, :40], 10, torch.tensor(starts)).tolist()
    calls.clear()
    farthest_point_sample(clouds[:, :40], 9)  # under the threshold
    farthest_point_sample(clouds[:, :40], 10, use_extension=False)
    assert calls == []


def test_fpsample_agrees_with_the_torch_path():
    pytest.importorskip("fpsample")
    cloud = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 2048, 3)).astype(np.float32))
    start = (cloud - cloud.mean(1, keepdim=True)).square().sum(-1).argmax(1)
    assert ops._fps_fpsample(cloud, 1024, start).tolist() == ops._fps_torch(cloud, 1024, start).tolist()


def test_fps_rejects_bad_count(clouds):
    with pytest.raises(ValueError, match="num_samples=200"):
        farthest_point_sample(clouds, 200)


def test_knn_matches_brute_force(clouds):
    query, ref = clouds[:, :10], clouds
    idx = knn(query, ref, 5)
    assert idx.shape == (4, 10, 5)
    for b, q in itertools.product(range(4), range(10)):
        d = ((ref[b] - query[b, q]) ** 2).sum(-1)
        assert idx[b, q].tolist() == d.argsort()[:5].tolist()
    with pytest.raises(ValueError, match="k=200"):
        knn(query, ref, 200)


def test_group_points_shapes_and_centring(clouds):
    neighborhood, center, idx = group_points(clouds, 16, 8)
    assert neighborhood.shape == (4, 16, 8, 3) and center.shape == (4, 16, 3) and idx.shape == (4, 16, 8)
    # each centre is its own nearest neighbour, so the first neighbour sits at the origin
    torch.testing.assert_close(neighborhood[:, :, 0], torch.zeros(4, 16, 3))
    torch.testing.assert_close(neighborhood + center[:, :, None], gather_points(clouds, idx))


def test_z_order_key_interleaves_y_x_z():
    xyz = torch.tensor([[[0.0, 0.0, 0.01], [0.01, 0.0, 0.0], [0.0, 0.01, 0.0], [0.01, 0.01, 0.01]]])
    # scale 100 -> unit steps: z is the lowest bit, x the next, y the highest of each triple
    assert z_order_key(xyz).tolist() == [[1, 2, 4, 7]]


def test_check_points_errors_name_the_sample(clouds):
    bad = clouds.clone()
    bad[2, 5, 1] = float("nan")
    bad[3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"sample 2 \(1 points\), sample 3 \(1 points\)"):
        check_points(bad)
    with pytest.raises(ValueError, match="holds 10 points per cloud, fewer than the 16"):
        check_points(clouds[:, :10], min_points=16)
    with pytest.raises(ValueError, match=r"\(B, N, 3\).*\(4, 128, 6\)"):
        check_points(torch.randn(4, 128, 6))
    with pytest.raises(ValueError, match="channels-first"):
        check_points(clouds.transpose(1, 2))


def _official_fps(points: torch.Tensor, m: int) -> list[int]:
    """pointnet2's furthest_point_sampling_kernel, transcribed for one cloud: start at index 0, temp = 1e10, skip
    points with |p|² <= 1e-3 (no distance update, never picked), strict > keeps the first best index."""
    n = points.shape[0]
    temp = [1e10] * n
    idxs, old = [0], 0
    for _ in range(1, m):
        best, besti = -1.0, 0
        for k in range(n):
            x2, y2, z2 = points[k].tolist()
            if x2 * x2 + y2 * y2 + z2 * z2 <= 1e-3:
                continue
            d = float((points[k] - points[old]).square().sum())
            temp[k] = min(d, temp[k])
            if temp[k] > best:
                best, besti = temp[k], k
        old = besti
        idxs.append(old)
    return idxs


def test_fps_follows_the_official_origin_rule_only_when_asked():
    g = torch.Generator().manual_seed(3)
    cloud = torch.nn.functional.normalize(torch.randn(60, 3, generator=g), dim=-1)  # a shell: the centre is empty
    cloud[5] = torch.tensor([0.01, -0.02, 0.0])  # |p|² = 5e-4: the official kernel never picks it
    cloud[9] = torch.tensor([0.0, 0.0, 0.0])
    cloud[0] = torch.tensor([2.0, 2.0, 2.0])  # the start of both (index 0 official, farthest from centroid ours)
    cloud = cloud.double()
    assert int(fps_start(cloud[None])) == 0
    official = _official_fps(cloud, 40)
    ours = farthest_point_sample(cloud, 40, min_sq_norm=OFFICIAL_MIN_SQ_NORM)
    assert ours.tolist() == official and 5 not in official and 9 not in official
    default = farthest_point_sample(cloud, 40, use_extension=False)
    assert 5 in default.tolist() or 9 in default.tolist()  # by default the origin is no special place
    model = create_backbone("point_mae_test", num_classes=2, fps_min_sq_norm=OFFICIAL_MIN_SQ_NORM)
    assert model.group_divider.fps_min_sq_norm == OFFICIAL_MIN_SQ_NORM


def test_gather_points_takes_whole_rows_and_adds_them_back():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 7, 5, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (3, 4, 6), generator=g)
    out = gather_points(values, index)
    expected = torch.stack([values[b][index[b]] for b in range(3)])
    assert torch.equal(out, expected)
    weights = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * weights).sum(), values)
    (ref,) = torch.autograd.grad((expected * weights).sum(), values)
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-6)


def reference_gather_linear_max(values, index, hidden, weight, bias, scale):
    """The straightforward form: gathered groups plus the (scaled) projection, then the max over each group."""
    b, a, k = index.shape
    branch = torch.nn.functional.linear(hidden, weight, bias).view(b, a, k, -1)
    if scale is not None:
        branch = branch * scale.view(b, a, 1, 1)
    return (gather_points(values, index) + branch).max(dim=2).values


@pytest.mark.parametrize("scaled", [False, True])
def test_gather_linear_max_matches_the_straightforward_form(scaled):
    g = torch.Generator().manual_seed(1)
    b, n, a, k, c, d = 2, 12, 5, 4, 6, 3
    values = torch.randn(b, n, c, generator=g)
    index = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(a)]) for _ in range(b)])
    hidden, weight, bias = torch.randn(b * a * k, d, generator=g), torch.randn(c, d, generator=g), torch.randn(c)
    scale = (torch.rand(b * a, 1, generator=g) > 0.3).float() / 0.7 if scaled else None
    leaves = [t.clone().requires_grad_(True) for t in (values, hidden, weight, bias)]
    refs = [t.clone().requires_grad_(True) for t in (values, hidden, weight, bias)]
    out = ops.gather_linear_max(leaves[0], index, leaves[1], leaves[2], leaves[3], scale)
    ref = reference_gather_linear_max(refs[0], index, refs[1], refs[2], refs[3], scale)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    expected = torch.autograd.grad((ref * upstream).sum(), refs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gather_linear_max_gives_a_tie_to_the_first_neighbour_and_propagates_nan():
    values = torch.zeros(1, 3, 2)
    index = torch.tensor([[[2, 0, 1]]])  # every neighbour's sum is the bias: a three-way tie
    hidden, weight, bias = torch.zeros(3, 1), torch.ones(2, 1), torch.tensor([1.0, -1.0])
    leaves = [t.clone().requires_grad_(True) for t in (values, hidden)]
    out = ops.gather_linear_max(leaves[0], index, leaves[1], weight, bias)
    (grad_values, grad_hidden) = torch.autograd.grad(out.sum(), leaves)
    assert torch.equal(out, torch.tensor([[[1.0, -1.0]]]))
    assert torch.equal(grad_values[0], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))  # token 2: neighbour 0
    assert torch.equal(grad_hidden, torch.tensor([[2.0], [0.0], [0.0]]))  # neighbour 0, both channels
    values[0, 1, 0] = float("nan")
    assert torch.isnan(ops.gather_linear_max(values, index, hidden, weight, bias)[0, 0, 0])


def test_gather_linear_max_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"expected hidden \(8, D\)"):
        ops.gather_linear_max(torch.zeros(1, 4, 3), torch.zeros(1, 2, 4, dtype=torch.long), torch.zeros(7, 2),
                              torch.zeros(3, 2), torch.zeros(3))  # fmt: skip
