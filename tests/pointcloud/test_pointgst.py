"""PointGST (``"pointgst"``): counts, identity at init, bases once per forward, the PCSA math, gradients, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modalpeft as mp
from benchmarks.pointcloud import profile_eigh_share
from modalpeft.core.inject import hosts
from modalpeft.pointcloud import PointGSTConfig, create_backbone
from modalpeft.pointcloud.methods.pointgst import (
    PCSA,
    GraphBasis,
    laplacian_eigenvectors,
    pcsa_parameters,
)
from modalpeft.pointcloud.ops import z_order_key

from ..core.toy_models import perturb

C, DEPTH, G = 32, 2, 16  # point_mae_test
CFG = {"rank": 4, "local_size": 8}


def tiny(num_classes: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    return perturb(create_backbone("point_mae_test", num_classes=num_classes), seed).eval()


def adapted(init_weights=True, **kwargs):
    return mp.adapt(tiny(), PointGSTConfig(**{**CFG, **kwargs}, init_weights=init_weights), modules_to_save=["head"])


def test_registered():
    assert "pointgst" in mp.list_methods("pointcloud")
    assert isinstance(mp.create_config("pointgst"), PointGSTConfig)
    assert PointGSTConfig().rank == 36 and PointGSTConfig().local_size == 32


def test_point_mae_count_is_622831():
    model = mp.adapt(create_backbone("point_mae", num_classes=15), PointGSTConfig(), modules_to_save=["head"])
    per_block = (384 * 36 + 36) + (36 * 36 + 36) + 4 * 36 + (36 * 384 + 384)  # down, adapt, 2 LNs, up
    assert pcsa_parameters(384, 36) == per_block == 29_544
    head = (768 * 256 + 256) + 512 + (256 * 256 + 256) + 512 + (256 * 15 + 15)
    assert model.trainable_summary()["trainable"] == 12 * per_block + 2 * 384 + head == 622_831


def test_tiny_count_and_placement():
    model = adapted()
    names = {name: type(host.adapters["default"]).__name__ for name, host in hosts(model.base_model)}
    assert names == {
        "pos_embed": "GraphBasis",
        "blocks.0.mlp_residual": "PCSA",
        "blocks.1.mlp_residual": "PCSA",
        "class_token": "ParamDelta",
    }
    head = sum(p.numel() for p in model.head.parameters())
    assert model.trainable_summary()["trainable"] == DEPTH * pcsa_parameters(C, 4) + 2 * C + head
    only_first = mp.adapt(tiny(), PointGSTConfig(**CFG, target_modules=["blocks.0"]))
    assert [n for n, _ in hosts(only_first.base_model) if n.startswith("blocks")] == ["blocks.0.mlp_residual"]


def test_identity_at_init(clouds):
    base = tiny()
    with torch.no_grad():
        expected = base(clouds)
    model = mp.adapt(base, PointGSTConfig(**CFG), modules_to_save=["head"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(clouds), expected, rtol=0, atol=0)
        random = adapted(init_weights=False).eval()
        assert not torch.allclose(random(clouds), expected, atol=1e-3)
        with random.disable_adapters():
            torch.testing.assert_close(random(clouds), expected)


def test_bases_computed_once_per_forward_and_shared(clouds, monkeypatch):
    model = adapted(init_weights=False)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(tuple(a.shape)) or eigh(a))
    model(clouds)
    assert calls == [(4 * G // 8, 8, 8), (4, G, G)]  # local chunks and the global graph, one batched call each
    graph = model.pos_embed.adapters["default"]
    pcsas = [b.mlp_residual.adapters["default"] for b in model.blocks]
    assert isinstance(graph, GraphBasis) and all(isinstance(p, PCSA) for p in pcsas)
    assert all(p.bases is graph.bases for p in pcsas) and graph.bases.calls == 1


def _laplacian_reference(center: torch.Tensor) -> torch.Tensor:
    """The intended graph, one per cloud, written out with loops: exact distances, d_min over distinct centres of
    the whole batch (as the official code), self-loops 1."""
    b, n, _ = center.shape
    c = center.double()
    dist = (c[:, :, None] - c[:, None]).square().sum(-1).sqrt()
    d_min = dist[dist > 0].min()
    laps = []
    for i in range(b):
        a = torch.empty(n, n, dtype=torch.float64)
        for r in range(n):
            for c in range(n):
                a[r, c] = 1.0 if r == c else d_min / dist[i, r, c]
        d = torch.diag(a.sum(1).rsqrt())
        laps.append(torch.eye(n, dtype=torch.float64) - d @ a @ d)
    return torch.stack(laps)


def test_laplacian_basis_matches_formula():
    center = torch.randn(3, 10, 3, generator=torch.Generator().manual_seed(1))
    U = laplacian_eigenvectors(center).double()
    lap = _laplacian_reference(center)
    eigvals = torch.linalg.eigvalsh(lap)
    torch.testing.assert_close(
        U.transpose(1, 2) @ U, torch.eye(10, dtype=torch.float64).expand(3, -1, -1), atol=1e-5, rtol=0
    )
    # U diagonalises L with ascending eigenvalues
    torch.testing.assert_close(U.transpose(1, 2) @ lap @ U, torch.diag_embed(eigvals), atol=1e-5, rtol=0)
    # d_min is batch-wide by default: cloud 0's basis changes when a closer pair exists in another cloud
    other = center.clone()
    other[2, 1] = other[2, 0] + 1e-3
    assert not torch.allclose(
        laplacian_eigenvectors(other)[0].abs(), laplacian_eigenvectors(center)[0].abs(), atol=1e-4
    )
    torch.testing.assert_close(
        laplacian_eigenvectors(other, per_sample=True)[0], laplacian_eigenvectors(center, True)[0]
    )


@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_pcsa_math(clouds, scaling):
    model = adapted(init_weights=False, scaling=scaling)
    model(clouds)
    pcsa = model.blocks[0].mlp_residual.adapters["default"]
    bases = pcsa.bases
    x = torch.randn(4, 1 + G, C)
    with torch.no_grad():
        out = pcsa.parallel(x)
        for i in range(4):  # one cloud at a time, from the spec's formulas
            h = pcsa.down(x[i])
            xp = h[1:]
            h = F.silu(h)
            X = bases.U[i] @ xp
            g = bases.U[i].T @ (X + F.silu(pcsa.adapt(pcsa.norm_global(X))))
            s = xp[bases.order[i]].reshape(G // 8, 8, -1)
            S = bases.local_U[i] @ s
            loc = (bases.local_U[i].transpose(1, 2) @ (S + F.silu(pcsa.adapt(pcsa.norm_local(S))))).reshape(G, -1)
            loc = loc[bases.inverse[i]]
            expected = scaling * pcsa.up(torch.cat([h[:1], h[1:] + g + loc]))
            torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)
        # the order groups z-sorted centres, and inverse undoes it
        assert torch.equal(bases.order.gather(1, bases.inverse), torch.arange(G).expand(4, -1))


def test_gradients_reach_only_trainable_parameters(clouds):
    model = adapted(init_weights=False).train()
    F.cross_entropy(model(clouds), torch.tensor([0, 1, 2, 3])).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("base_model.blocks.", "base_model.class_token.adapters.", "base_model.head.")
    assert trainable and all(n.startswith(prefixes) and (".adapters." in n or ".head." in n) for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_output_invariant_to_point_order_and_batch_with_sample_scale(clouds):
    model = adapted(init_weights=False, min_distance="sample").eval()
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(clouds)
        torch.testing.assert_close(model(clouds[:, perm]), full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(clouds[1:2]), full[1:2], atol=1e-4, rtol=1e-4)


def test_save_load_and_not_mergeable(clouds, tmp_path):
    model = adapted(init_weights=False).eval()
    with torch.no_grad():
        expected = model(clouds)
    model.save_adapter(tmp_path / "gst")
    loaded = mp.load_adapter(tiny(), tmp_path / "gst").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(clouds), expected)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not list(hosts(base))


def test_config_errors():
    with pytest.raises(ValueError, match="rank=0"):
        PointGSTConfig(rank=0)
    with pytest.raises(ValueError, match="min_distance='global'"):
        PointGSTConfig(min_distance="global")
    with pytest.raises(ValueError, match="local_size=32 does not divide the backbone's num_group=16"):
        mp.adapt(tiny(), PointGSTConfig())


def test_profile_eigh_share(clouds):
    model = adapted()
    stats = profile_eigh_share(model, (clouds, torch.tensor([0, 1, 2, 3])), steps=2, warmup=1)
    assert stats["eigh_calls"] == 2 and 0 < stats["eigh_share"] < 1 and stats["step_time"] > stats["eigh_time"] > 0


def _official_get_basis(center: torch.Tensor) -> torch.Tensor:
    """PointGST's models/PGST.py get_basis + get_laplacian, transcribed (torch.cdist in its default mode)."""
    L = torch.cdist(center, center)
    L = 1 / (L / torch.min(L[L > 0], dim=-1, keepdim=True).values + torch.eye(L.size(-1)).unsqueeze(0))
    d_inv_sqrt = torch.diag_embed(torch.rsqrt(L.sum(-1) + 1e-6))
    L = torch.eye(L.size(-1)) - d_inv_sqrt @ L @ d_inv_sqrt
    return torch.linalg.eigh(L).eigenvectors


def test_graph_is_the_intended_math_not_cdists_rounding_noise():
    """Over 25 centres the official cdist multiplies matrices: its diagonal is noise, d_min comes from the noise
    and self-loops fall below 1. Ours: exact distances, d_min over distinct centres, self-loops 1."""
    center = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noisy = torch.cdist(center, center)
    diagonal = noisy.diagonal(dim1=1, dim2=2)
    assert diagonal.max() > 0  # the official path: rounding noise where 0 is meant
    true_min = (noisy + torch.eye(64) * 10).min()
    assert noisy[noisy > 0].min() < 1e-2 * true_min  # the official d_min is that noise
    U = laplacian_eigenvectors(center).double()
    lap = _laplacian_reference(center)
    torch.testing.assert_close(
        U.transpose(1, 2) @ lap @ U, torch.diag_embed(torch.linalg.eigvalsh(lap)), atol=1e-5, rtol=0
    )
    official = _official_get_basis(center).double()
    off_diagonal = (official.transpose(1, 2) @ lap @ official) * (1 - torch.eye(64, dtype=torch.float64))
    assert off_diagonal.abs().max() > 1e-2  # the official basis does not diagonalise the intended Laplacian
    # with up to 25 centres cdist is exact, and the official basis is the intended one (up to eigenvector signs)
    small = center[:, :20]
    torch.testing.assert_close(_official_get_basis(small).abs(), laplacian_eigenvectors(small).abs(), atol=1e-4, rtol=0)


def _official_xyz2key(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, depth: int = 16) -> torch.Tensor:
    """PointGST's models/z_order.py xyz2key (O-CNN), transcribed: 8-bit lookup tables, the high byte shifted by 24."""

    def spread(v, d):
        key = torch.zeros_like(v)
        for i in range(d):
            key = key | ((v & (1 << i)) << (2 * i))
        return key

    r256 = torch.arange(256, dtype=torch.int64)
    EX, EY, EZ = spread(r256, 8) << 2, spread(r256, 8) << 1, spread(r256, 8)
    x, y, z = x.long(), y.long(), z.long()
    key = EX[x & 255] | EY[y & 255] | EZ[z & 255]
    mask = (1 << (depth - 8)) - 1
    key16 = EX[(x >> 8) & mask] | EY[(y >> 8) & mask] | EZ[(z >> 8) & mask]
    return key16 << 24 | key


def test_z_order_default_is_the_official_key(clouds):
    center = torch.rand(3, 64, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1  # both signs on every axis
    c = center * 100
    official = _official_xyz2key(c[:, :, 1], c[:, :, 0], c[:, :, 2])
    assert torch.equal(z_order_key(center), official)
    assert torch.equal(z_order_key(center, mode="official"), official)
    shifted = z_order_key(center, mode="shifted")
    assert not torch.equal(shifted.argsort(dim=1), official.argsort(dim=1))
    assert PointGSTConfig().z_order == "official"
    for mode in ("official", "shifted"):
        model = adapted(z_order=mode)
        model(clouds)
        bases = model.pos_embed.adapters["default"].bases
        with torch.no_grad():
            _, _, centres = model.base_model.embed(clouds)
        expected = torch.sort(z_order_key(centres, mode=mode), dim=1, stable=True).indices
        assert torch.equal(bases.order, expected)
    with pytest.raises(ValueError, match="z_order='morton'"):
        PointGSTConfig(z_order="morton")


def test_adapter_config_records_z_order_and_older_files_load_shifted(clouds, tmp_path):
    import json

    model = adapted(init_weights=False, z_order="official").eval()
    model.save_adapter(tmp_path / "gst")
    path = tmp_path / "gst" / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["z_order"] == "official"
    with torch.no_grad():
        expected = model(clouds)
    loaded = mp.load_adapter(tiny(), tmp_path / "gst").eval()
    assert loaded.peft_config["default"].z_order == "official"
    del saved["z_order"]  # as written before the field existed
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="z_order='shifted'"):
        old = mp.load_adapter(tiny(), tmp_path / "gst").eval()
    assert old.peft_config["default"].z_order == "shifted"
    with torch.no_grad():
        torch.testing.assert_close(loaded(clouds), expected)
        assert old.pos_embed.adapters["default"].z_order == "shifted"
