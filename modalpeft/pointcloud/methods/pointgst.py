"""PointGST: Point Cloud Graph Spectral Tuning (Liang, Feng, Zhou et al., TPAMI 2025, https://arxiv.org/abs/2410.08114).

A frozen point transformer is tuned by a *Point Cloud Spectral Adapter* (PCSA) in every block, which adapts the
patch tokens in the graph-spectral domain of the patch centres. Once per forward, from the ``G`` patch centres:

- **global basis**: the dense graph ``A_ij = 1 / (D_ij / d_min + δ_ij)`` (``D`` the exact centre distances, ``d_min``
  the smallest distance between two distinct centres in the batch; self-loops ``A_ii = 1``), its normalised
  Laplacian ``L = I − D^{-1/2} A D^{-1/2}`` and all its eigenvectors ``U`` (``torch.linalg.eigh``, batched);
- **local bases**: the centres sorted by a z-order key (PointGST's, by default), cut into ``G / local_size``
  chunks of ``local_size``; the same Laplacian and eigenvectors ``U_k`` per chunk.

These bases are computed once per forward by a :class:`GraphBasis` on the backbone's ``pos_embed`` (which receives
the centres) and shared by every block's adapter. Each :class:`PCSA` (rank ``r``) reads the post-attention stream
``x`` of its block and adds beside the MLP branch, ``x_out = x + MLP(LN2(x)) + PCSA(x)``:

    h = down(x);  x_p = h[:, -G:];  h = SiLU(h)
    X = U x_p;            X = X + SiLU(adapt(LN_g(X)));      g = Uᵀ X
    S = U_k sort(x_p);    S = S + SiLU(adapt(LN_l(S)));      l = unsort(U_kᵀ S)
    h[:, -G:] += g + l;   PCSA(x) = s · up(h)

``down`` is Linear(C→r) (xavier-uniform weight), ``adapt`` Linear(r→r) is shared by both branches and starts at
zero, ``up`` Linear(r→C) starts at zero, so the model starts as the frozen backbone. Trainable: the PCSAs
(``2Cr + r² + 6r + C`` each: 29,544 for C=384, r=36), the class token and position (``2C``, tuned through a
:class:`~modalpeft.core.layers.ParamDelta` on ``class_token``) and the head (pass ``modules_to_save=["head"]``).
On Point-MAE with 15 classes: 12 · 29,544 + 768 + 267,535 = **622,831** (the paper's "0.6M"). Not mergeable: the
adapter is non-linear and depends on the input through ``U``.

Differences from the official code (jerryfeng2003/PointGST @ 7fbe92fe65c2):

- as the official code (and its comment "for reproducing our results") we transform with ``U x`` and invert with
  ``Uᵀ``; the textbook graph Fourier transform would be ``Uᵀ x``. The pair is an exact inverse either way;
- **the graph** is the intended math, not the official numbers. The official ``get_basis`` takes ``torch.cdist``,
  whose default mode computes ``|a|² + |b|² − 2ab`` by a matrix multiply once a set has more than 25 points
  (every Point-MAE graph: 64 or 128 centres, and the 32-centre chunks). Its diagonal is then rounding noise
  where 0 is meant, and ``d_min = min(D[D > 0])``, taken over the whole batch, comes from that noise as soon as
  one diagonal entry is positive. The off-diagonal weights ``d_min / D_ij`` collapse (1e-4 and less) and the
  self-loops become ``1 / (D_ii / d_min + 1)``, anywhere between 1 and a small fraction, set by the noise: the
  official Laplacian is nearly diagonal and its eigenvectors follow the rounding (which depends on the matmul's
  device and library), not the geometry, so an official checkpoint's outputs are not reproduced exactly. Here
  distances are exact (``compute_mode="donot_use_mm_for_euclid_dist"``), ``d_min`` runs over distinct centres
  and self-loops are 1. Measured on the demo (its pretrained Point-MAE, 32 centres, chunks of 16, which cdist
  computes exactly; PointGST trained 150 steps; 300 test clouds): the global graph's cdist diagonal was
  non-zero for 10% of the centres (up to 3.5e-4), the official ``d_min`` 8.6e-5 against a true 0.22, its
  self-loops down to 0.20; swapping the official graph in moves the logits by up to 0.19 (mean 0.018; accuracy
  89.0% against 88.7%), and the graph modalpeft had before (noisy ``d_min``, self-loops 1) by up to 0.12.
  ``tests/pointcloud/test_pointgst.py`` pins both graphs;
- **the z-order** is the official one by default (``z_order="official"``): the key reads negative integer
  coordinates in two's complement, which puts them after the positive ones on each axis, so a chunk can join
  centres from opposite sides of the origin. An official checkpoint needs this order to reproduce its outputs
  (on the same demo run, ``"shifted"`` kept none of the 32 chunks of 16 test clouds and moved the logits by up
  to 0.16, mean 0.022).
  ``z_order="shifted"`` (modalpeft's earlier order; adapters saved before the field existed load with it, with
  a warning) shifts each cloud's integers to be non-negative first, so chunks follow space across the
  origin;
- ``min_distance="sample"`` (not the default) takes ``d_min`` per cloud, so that a cloud's output does not depend
  on the other clouds of its batch (each local chunk then uses its own minimum); the default ``"batch"`` is the
  official batch-wide minimum;
- coinciding centres (a cloud with fewer distinct points than groups) get a finite edge weight (distance clamped
  to ``1e-6 · d_min``) instead of an infinite one;
- the frozen encoder's BatchNorm statistics follow the model's mode (the official code trains them in
  ``.train()``); call ``.eval()`` on ``encoder`` to freeze them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets
from ...core.layer import AdapterModule, InitMode
from ...core.layers import ParamDelta
from ...core.registry import register_method
from ..ops import ZOrder, gather_points, z_order_key

_INTERFACE = (
    "PointGST needs modalpeft's point transformer interface: `blocks` (each with an `mlp_residual` module), "
    "`pos_embed` (called on the (B, G, 3) patch centres), `class_token` and `num_group`, as "
    "modalpeft.pointcloud.create_backbone(...) models have."
)


@dataclass
class PointGSTConfig(AdapterConfig):
    """PointGST. ``target_modules=None`` places a PCSA in every block of ``model.blocks``."""

    rank: int = field(default=36, metadata=_help("r, the PCSA's hidden (spectral) width (36 in the paper)."))
    local_size: int = field(
        default=32,
        metadata=_help("Centres per local chunk (32 in the paper); must divide the backbone's num_group."),
    )
    scaling: float = field(default=1.0, metadata=_help("s, the factor on the PCSA's output (1.0 in the paper)."))
    min_distance: Literal["batch", "sample"] = field(
        default="batch",
        metadata=_help(
            "d_min of the edge weights: 'batch' (the official code: the smallest centre distance in the batch) or "
            "'sample' (per cloud, so outputs do not depend on the rest of the batch)."
        ),
    )
    z_order: ZOrder = field(
        default="official",
        metadata=_help(
            "The key that orders the centres into local chunks: 'official' (PointGST's: negative coordinates in "
            "two's complement; needed to reproduce official checkpoints) or 'shifted' (coordinates shifted to be "
            "non-negative per cloud, so chunks follow space across the origin; adapters saved without this field)."
        ),
    )
    tune_class_token: bool = field(
        default=True, metadata=_help("Train the class token and its position (the official recipe does).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rank", "local_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (the paper: rank=36, local_size=32).")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r} must be a number (1.0 in the paper).")
        if self.min_distance not in ("batch", "sample"):
            raise ValueError(f"min_distance={self.min_distance!r} is not valid; choose 'batch' or 'sample'.")
        if self.z_order not in ("official", "shifted"):
            raise ValueError(f"z_order={self.z_order!r} is not valid; choose 'official' or 'shifted'.")
        if not isinstance(self.tune_class_token, bool):
            raise ValueError(f"tune_class_token={self.tune_class_token!r} must be True or False.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointGSTConfig:
        """As :meth:`AdapterConfig.from_dict`; a file without ``z_order`` was saved before the field existed, with
        the shifted key, so it loads with ``z_order="shifted"`` (the order it was trained with) and a warning."""
        if "z_order" not in data:
            warnings.warn(
                "this PointGST adapter_config.json has no 'z_order': it was saved by a modalpeft that ordered the "
                "local chunks with the shifted key, so it loads with z_order='shifted'. Its graph now uses exact "
                "distances (d_min over distinct centres, self-loops 1), which moves its outputs slightly; retrain "
                "or save it again to record the field.",
                stacklevel=2,
            )
            data = {**data, "z_order": "shifted"}
        return super().from_dict(data)


def laplacian_eigenvectors(center: Tensor, per_sample: bool = False) -> Tensor:
    """Eigenvectors (columns, ascending eigenvalues) of the dense graph's symmetric normalised Laplacian.

    ``A_ij = 1 / (D_ij / d_min + δ_ij)`` with ``D`` the exact distances, ``d_min`` the smallest distance between
    two distinct centres in the batch (or in each graph with ``per_sample=True``), so that self-loops are 1;
    ``L = I − D^{-1/2} A D^{-1/2}`` with ``D = diag(Σ_j A_ij)``. Coinciding centres get a finite weight (their
    distance counts as ``1e-6 · d_min``).

    Shapes:
        - center: ``(B, n, 3)``
        - output: ``(B, n, n)``
    """
    center = center.detach().float()
    # exact differences: cdist's default matrix-multiply path (> 25 points) leaves rounding noise on the diagonal
    dist = torch.cdist(center, center, compute_mode="donot_use_mm_for_euclid_dist")  # (B, n, n)
    eye = torch.eye(dist.shape[-1], device=dist.device, dtype=dist.dtype)
    distinct = (dist > 0) & (eye == 0)
    positive = torch.where(distinct, dist, torch.full_like(dist, float("inf")))
    d_min = positive.flatten(1).min(dim=1).values.view(-1, 1, 1) if per_sample else positive.min()  # (B, 1, 1) or ()
    d_min = torch.where(torch.isfinite(d_min), d_min, torch.ones_like(d_min))  # all centres coincide
    adjacency = 1.0 / ((dist / d_min).clamp_min(1e-6) * (1 - eye) + eye)
    inv_sqrt = (adjacency.sum(-1) + 1e-6).rsqrt()  # (B, n)
    lap = eye - inv_sqrt.unsqueeze(-1) * adjacency * inv_sqrt.unsqueeze(-2)
    return torch.linalg.eigh(lap).eigenvectors


class SpectralBases:
    """What :class:`GraphBasis` computes each forward and every :class:`PCSA` of the same adapter reads.

    Attributes:
        U: global basis ``(B, G, G)``.
        local_U: local bases ``(B, G / local_size, local_size, local_size)``.
        order: z-order permutation of the centres ``(B, G)``; ``inverse`` undoes it.
        calls: how many times the bases were computed (tests check: once per forward).
    """

    def __init__(self) -> None:
        self.U: Tensor | None = None
        self.local_U: Tensor | None = None
        self.order: Tensor | None = None
        self.inverse: Tensor | None = None
        self.calls = 0


class GraphBasis(AdapterModule):
    """Computes PointGST's global and local spectral bases from the patch centres, once per forward.

    Hosted on the backbone's ``pos_embed``, whose input is the centres; passes them on unchanged and has no
    parameters.

    Shapes:
        - input of the host: centres ``(B, G, 3)`` (unchanged)
    """

    def __init__(
        self,
        bases: SpectralBases,
        local_size: int,
        min_distance: Literal["batch", "sample"],
        z_order: ZOrder = "official",
    ) -> None:
        super().__init__()
        self.bases = bases
        self.local_size = local_size
        self.min_distance = min_distance
        self.z_order = z_order

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        """Nothing to initialise."""

    def pre(self, center: Tensor) -> Tensor:
        b, g, _ = center.shape
        if g % self.local_size:
            raise ValueError(
                f"pointgst: local_size={self.local_size} does not divide the {g} patch centres; choose a local_size "
                "that divides the backbone's num_group (32 for Point-MAE's 64 or 128 groups)."
            )
        per_sample = self.min_distance == "sample"
        with torch.no_grad():
            order = z_order_key(center, mode=self.z_order).argsort(dim=1, stable=True)  # (B, G)
            chunks = gather_points(center, order).reshape(b * (g // self.local_size), self.local_size, 3)
            local = laplacian_eigenvectors(chunks, per_sample=per_sample)  # "sample": d_min per chunk
            bases = self.bases
            bases.U = laplacian_eigenvectors(center, per_sample=per_sample).to(center.dtype)
            bases.local_U = local.reshape(b, g // self.local_size, self.local_size, self.local_size).to(center.dtype)
            bases.order, bases.inverse = order, order.argsort(dim=1)
            bases.calls += 1
        return center


class PCSA(AdapterModule):
    """Point Cloud Spectral Adapter: one block's parallel branch beside its MLP (see the module docstring).

    Args:
        dim: ``C``.
        rank: ``r``.
        bases: the adapter's shared :class:`SpectralBases`.
        scaling: ``s``.
        init_weights: ``True``/``"identity"``: the paper's init (``down`` xavier-uniform, ``adapt`` and ``up`` zero:
            the branch is zero); ``False``: random non-zero ``adapt`` and ``up``.

    Shapes:
        - input: the block's post-attention stream ``(B, N, C)``, its last ``G`` tokens the patches
        - output: ``(B, N, C)``
        - parameters: ``2Cr + r² + 6r + C``
    """

    def __init__(self, dim: int, rank: int, bases: SpectralBases, scaling: float = 1.0, init_weights: InitMode = True):
        super().__init__()
        self.bases = bases
        self.scaling = scaling
        self.down = nn.Linear(dim, rank)
        self.adapt = nn.Linear(rank, rank)
        self.norm_global = nn.LayerNorm(rank)
        self.norm_local = nn.LayerNorm(rank)
        self.up = nn.Linear(rank, dim)
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        nn.init.xavier_uniform_(self.down.weight)
        bound = 1 / self.down.in_features**0.5
        nn.init.uniform_(self.down.bias, -bound, bound)
        self.norm_global.reset_parameters()
        self.norm_local.reset_parameters()
        for layer in (self.adapt, self.up):
            if init_weights is False:
                nn.init.normal_(layer.weight, std=0.1)
                nn.init.normal_(layer.bias, std=0.1)
            else:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _spectral(self, coeffs: Tensor, norm: nn.LayerNorm) -> Tensor:
        return coeffs + F.silu(self.adapt(norm(coeffs)))

    def parallel(self, x: Tensor) -> Tensor:
        U, local_U, bases = self.bases.U, self.bases.local_U, self.bases
        if U is None or local_U is None:
            raise RuntimeError("pointgst: the spectral bases were not computed; is the GraphBasis on pos_embed off?")
        b, g = U.shape[0], U.shape[-1]
        if x.shape[0] != b or x.shape[1] < g:
            raise RuntimeError(f"pointgst: bases for {b} clouds x {g} centres, but the block got {tuple(x.shape)}")
        h = self.down(x)  # (B, N, r)
        patches = h[:, -g:]  # (B, G, r), before the activation
        h = F.silu(h)
        glob = U.transpose(1, 2) @ self._spectral(U @ patches, self.norm_global)  # (B, G, r)
        chunks, size = local_U.shape[1], local_U.shape[2]
        s = gather_points(patches, bases.order).reshape(b, chunks, size, -1)  # (B, G/L, L, r)
        s = local_U.transpose(2, 3) @ self._spectral(local_U @ s, self.norm_local)
        loc = gather_points(s.reshape(b, g, -1), bases.inverse)  # (B, G, r), original order
        h = torch.cat([h[:, :-g], h[:, -g:] + glob + loc], dim=1)
        return self.up(h) * self.scaling


def _interface(model: nn.Module) -> list[str]:
    blocks = getattr(model, "blocks", None)
    ok = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0
    ok = ok and all(hasattr(b, "mlp_residual") for b in blocks)
    ok = ok and all(hasattr(model, a) for a in ("pos_embed", "class_token", "num_group"))
    if not ok:
        raise ValueError(f"pointgst: {type(model).__name__} lacks the interface. {_INTERFACE}")
    return [f"blocks.{key}" for key, _ in blocks.named_children()]


def selected_blocks(model: nn.Module, config: AdapterConfig, method: str) -> list[str]:
    """The ``blocks.<i>`` names that ``config.target_modules`` selects (``None``: all), with a clear error."""
    block_names = [f"blocks.{key}" for key, _ in model.blocks.named_children()]
    targets = [name for name, _ in find_targets(model, config, default=block_names)]
    stray = [name for name in targets if name not in block_names]
    if stray:
        raise ValueError(
            f"{method}: target_modules={config.target_modules!r} selects {stray}, which are not blocks; choose among "
            f"{block_names[:12]}{' ...' if len(block_names) > 12 else ''} (or a regex on them), or None for all."
        )
    return targets


@register_method(
    "pointgst", PointGSTConfig, modality="pointcloud", mergeable=False, paper="https://arxiv.org/abs/2410.08114"
)
def apply_pointgst(
    model: nn.Module, config: PointGSTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    _interface(model)
    if model.num_group % config.local_size:
        raise ValueError(
            f"pointgst: local_size={config.local_size} does not divide the backbone's num_group={model.num_group}; "
            "pick a divisor (the paper: 32 for 64 or 128 groups)."
        )
    targets = selected_blocks(model, config, "pointgst")
    dim = model.embed_dim
    bases = SpectralBases()
    attach(model, "pos_embed", adapter_name, GraphBasis(bases, config.local_size, config.min_distance, config.z_order))
    for name in targets:
        pcsa = PCSA(dim, config.rank, bases, config.scaling, init_weights=config.init_weights)
        attach(model, f"{name}.mlp_residual", adapter_name, pcsa)
    if config.tune_class_token:
        token = ParamDelta(model.class_token, ("token", "pos"), init_weights=config.init_weights)
        attach(model, "class_token", adapter_name, token)


def pcsa_parameters(dim: int, rank: int) -> int:
    """Trainable parameters of one PCSA: ``down`` ``Cr + r``, ``adapt`` ``r² + r``, two LayerNorms ``4r``, ``up``
    ``rC + C``."""
    return 2 * dim * rank + rank * rank + 6 * rank + dim
