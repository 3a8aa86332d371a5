"""Point-PEFT (Tang et al., AAAI 2024, https://arxiv.org/abs/2310.03059; repo Ivan-Tang-3D/Point-PEFT).

A frozen point transformer (Point-MAE / Point-BERT) is tuned with two components plus bias tuning:

**Point-prior prompts.** A memory bank ``M ∈ R^{N×C}`` holds the L2-normalised global feature of every training
cloud (:func:`pooled_features`: the patch tokens alone through the frozen encoder, as the official pretrained
Point-MAE encoder has no class token, then a max over them): :func:`build_memory_bank` computes it, and it is stored
with the adapter (or read from a safetensors file, :func:`save_memory_bank`). For each input, parameter-free
attention retrieves from it with the frozen encoder's feature ``f`` of the same input::

    q = f / ||f||;   s = q Mᵀ;   (s_k, i_k) = top-k(s);   w = softmax(s_k)
    cache = [f, w M[i_k], M[i_1], ..., M[i_k]]              # (B, k + 2, C)

Each of the first ``prompt_blocks`` blocks inserts ``p = k + 2`` prompts after the class token,
``P_l' = drop(P_l) + cp_adapter_l(cache)`` (a dropout mask per sample; ``cp_adapter``: residual bottleneck C→8→C,
QuickGELU, dropout), and drops them after the block (VPT-deep style, without positions).

**Geometry-aware adapter**, in every block: the attention branch has no drop-path (the backbone's is bypassed,
:class:`~modalpeft.core.layers.Bypass`); after the MLP, ``m = drop_path(MLP(LN2(x)))`` becomes ``m + 0.7 · adapter(m)``
(bottleneck C→16→C, QuickGELU, dropout; hosted on the MLP branch's drop-path); then on the block output, ``A`` anchors
are chosen among the ``G`` patch centres by FPS, each gathers the tokens of its ``K`` nearest centres, a tiny local
self-attention *shared by all blocks* (LayerNorm, qkv C→3·6·3 without bias, 6 heads of 3, output 18→C) runs over each
group (``z = z + drop_path(Attn(LN(z)))``, the block's rate, per group), a max over the group, a per-block BatchNorm +
GELU and ``+ 0.3 ·`` the anchor's own token give anchor features, which flow back to all ``G`` tokens by inverse
squared-distance interpolation over all anchors (``x_tok += 0.3 · interp``); finally ``adapter1`` (residual bottleneck
C→16→C, QuickGELU, dropout) acts on every token. The dropout of all three bottlenecks is ``dropout`` (the official
``adapter_drop_path_rate`` 0.1).

**Bias tuning** (as the official recipe): the biases of ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2`` in
every block, the final LayerNorm, the class token and position train too (through
:class:`~modalpeft.core.layers.ParamDelta`, so ``disable_adapters`` still gives the backbone); the head trains as
a ``modules_to_save``.

Trainable count (:func:`point_peft_parameters`): on Point-MAE (C=384, 12 blocks, 6 prompted) with 15 classes,
6 · 39,592 + 6 · 29,216 + 28,800 + 768 + 768 + 267,535 = **710,719** (the README: "0.7M").

Behaviour at init: not the identity (no init is: the prompts join the attention of the prompted blocks, and the
geometry adapter's BatchNorm/GELU branch is non-zero). ``init_weights=True`` is the official init: the bottlenecks
xavier-uniform with N(0, 1e-6) biases (``AdapterSuper``), prompts truncated-normal std 0.02, the local attention
and its LayerNorm PyTorch's defaults (the official ``attn1`` / ``norm3`` are never re-initialised); ``"identity"``
starts every bottleneck at zero (core :class:`~modalpeft.core.layers.Bottleneck` init); ``False`` draws random
values for tests.

Differences from the official code (Ivan-Tang-3D/Point-PEFT @ d8bc13e1c39d,
``MAE/models/Point_Mask_Rev_FT_scan_cp.py``; ``tests/pointcloud/test_point_peft_official.py`` pins every block,
in training mode, against a transcription of the official ``Block.forward`` with aligned indices):

- **the grouping bug**, fixed: in the prompted blocks the official code appends ten learnable prompt coordinates
  (``prompt_cor``) to the points and groups again (FPS from the first prompt coordinate, so other centres than the patch
  tokens'), then gathers with indices built for 128 centres per cloud (``b·128 + j``) from a tensor of 138 rows per
  cloud (10 prompts, then the 128 patch tokens of the *original* grouping). For every cloud, the first included, row
  ``j`` is not the token of centre ``j`` (the first ten rows are prompts, the rest are shifted by ten and belong to
  other centres), cloud ``b``'s indices fall ``10·b`` rows short of its own rows (for ``j < 10·b`` they read the
  previous cloud's), and the interpolation weights come from the re-grouped centres while the tokens follow the original
  ones. The neighbourhoods are therefore not the geometric ones the paper describes, in any cloud. We implement the
  paper's intent: the grouping runs over the patch tokens and their centres only (so there is no ``prompt_cor``), as the
  official unprompted blocks 6-11 do. Anchors, neighbours and interpolation weights depend only on the centres, so they
  are computed once per forward and shared by all blocks;
- the official code allocates prompts and ``cp_adapter`` in all 12 blocks and a gate ``ad_gate`` per block but uses
  them only in the first six blocks and never uses the gate; we allocate only what is used (no effect on the
  outputs). The official trainable count is ours + 6 · (3,840 + 6,536) + 12 + 30 (``prompt_cor``) = 773,017 (the
  spec's "≈ 0.77M");
- the retrieval query comes from this backbone with the adapter disabled (the pretrained weights: bias tuning and
  the other deltas off), in eval mode and without gradients. The official code keeps a separate frozen Point-MAE
  copy configured with half as many groups (``cfgs/prompt/cache_prompt.yaml``: 64 groups of 32 points for the
  fine-tuned model's 128); ``retrieval_groups=None`` does the same from the model's own grouping, exactly: FPS is
  greedy from a fixed start, so its first 64 of 128 centres are its 64 centres, and each patch's token depends only
  on its centre's neighbours (:func:`pooled_features`; tested against the backbone built with 64 groups). Before
  this, modalpeft retrieved with all of the model's groups: measured on the demo (pretrained Point-MAE, 300 test
  clouds against the 480 training clouds' bank), the top-8 retrieved entries with 16 instead of the model's 32
  groups overlap by 59% (the same top-1 for 43%); ``retrieval_groups=model.num_group`` keeps that behaviour.
  Including the class token in the query and the bank, as modalpeft did earlier, kept 83% of the top-8 (80% of the
  top-1). The memory-bank builder is missing from the official repository; ours stores L2-normalised features (the
  official loader's use suggests so);
- the attention mask the official code computes (radius 1.28) is ignored by its attention, so there is none here
  (no effect on the outputs).

Cost. The local attention's LayerNorm and qkv projection act token by token, so they run on the ``G`` tokens before
the gather into ``A·K`` groups (:meth:`LocalAttention.grouped`; the official runs them on the gathered groups): the
same values from 16x fewer rows on Point-MAE, and backward keeps no ``(B·A, K, C)`` copy for them (tested against the
official order, gradients included). The residual sum of each group, the attention's output projection and the max
over the neighbours are one op (:func:`~modalpeft.pointcloud.ops.gather_linear_max`): the ``(B·A·K, C)`` sums are
built once, the max is ``amax`` plus a byte per output for which neighbour gave it (``Tensor.max`` with indices is
10-20x slower on the CPU), and the gradient reaches the tokens through the ``B·A·C`` maxima only. The heads'
attention is written out (``softmax(q kᵀ) v``): with heads of 3 and groups of 16, PyTorch's fused CPU kernel takes
1.5x as long, but it keeps the ``(B·A, h, K, K)`` probabilities for backward (with the byte-sized max indices
replacing ``Tensor.max``'s int64 ones, a Point-MAE step saves 19 MiB more than before, 227 against 208). The
retrieval pass encodes only the patches it uses (the first half, :meth:`PointTransformer.embed`'s ``patches``; the
tokens are the full encoding's in eval mode, tested), halving its mini-PointNet, which dominates it.
One block's geometry adapter, forward and backward, went from 62 to 37 ms (Point-MAE, batch 8, one CPU thread).

What stays is the algorithm's own price: the retrieval query is a second, gradient-free forward of the backbone per
batch (on half its patches, as the official frozen copy), and every block's ``(B·A·K, C)`` sums for the max over
neighbours (built and dropped in the forward). On the full-size Point-MAE (batch 8, 2 CPU threads; ``python -m
benchmarks.pointcloud --steps 12``, its ``profile_point_peft``) a step takes 1.04-1.22x full fine-tuning's over four
runs on one day (1.11x in the committed table), where the code before these three changes took 1.41x with the same
command that day (1.05x in an earlier, quieter run): the frozen pass is 15% of the step (23% before), the geometry
adapters' forward 11%. The floor (backward through every block, which any method that trains inside the network
pays) plus the frozen pass take 0.67x full fine-tuning's step; the 0.3x above that is Point-PEFT's own layers
(prompts, both adapters per block, the bias deltas). Issue 13's 0.8x is therefore not reached. It saves 227 MiB for
backward against the frozen model's 93 and full fine-tuning's 263, 115 of them in the geometry adapters (the qkv of
the groups, the attention probabilities, the maxima's neighbour indices, the norms' inputs), and its training memory
is 0.40x full fine-tuning's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import drop as timm_drop
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, hosts
from ...core.layer import AdapterModule, InitMode
from ...core.layers import Bottleneck, Bypass, ParamDelta
from ...core.registry import register_method
from ..ops import farthest_point_sample, gather_linear_max, gather_points, knn
from .pointgst import selected_blocks

BANK_KEY = "group_divider.adapters.bank"
"""Where the memory bank sits in a saved adapter's tensors."""
_BIASES = ("attn.proj", "mlp_residual.mlp.fc1", "mlp_residual.mlp.fc2", "norm1", "mlp_residual.norm2")


@dataclass
class PointPEFTConfig(AdapterConfig):
    """Point-PEFT. ``target_modules=None`` adapts every block of ``model.blocks``; prompts go in the first
    ``prompt_blocks`` of them. Needs a memory bank when adapting: ``memory_data`` (training batches; the Lightning
    task fills it with the training loader) or ``memory_bank`` (a file from :func:`save_memory_bank`)."""

    top_k: int = field(default=8, metadata=_help("k, memory-bank entries retrieved per input; p = k + 2 prompts."))
    prompt_blocks: int = field(default=6, metadata=_help("How many of the first adapted blocks take prompts (6)."))
    prompt_dropout: float = field(default=0.1, metadata=_help("Dropout on the learnable prompts (0.1)."))
    cache_bottleneck_dim: int = field(default=8, metadata=_help("Hidden width of cp_adapter on the cache prompts."))
    bottleneck_dim: int = field(default=16, metadata=_help("Hidden width of the MLP adapter and adapter1 (16)."))
    adapter_scaling: float = field(default=0.7, metadata=_help("Factor on the MLP adapter's output (0.7)."))
    dropout: float = field(default=0.1, metadata=_help("Dropout inside the bottleneck adapters (0.1)."))
    num_anchors: int = field(default=64, metadata=_help("Anchors chosen by FPS among the patch centres (64)."))
    num_neighbors: int = field(default=16, metadata=_help("Tokens gathered around each anchor (16)."))
    local_heads: int = field(default=6, metadata=_help("Heads of the shared local attention (6)."))
    local_head_dim: int = field(default=3, metadata=_help("Width of each local-attention head (3)."))
    geo_scaling: float = field(
        default=0.3, metadata=_help("Weight of the anchor token and of the propagated features (0.3).")
    )
    bias_tuning: bool = field(
        default=True,
        metadata=_help("Also train the blocks' proj/fc1/fc2/norm1/norm2 biases and the final LayerNorm (official)."),
    )
    tune_class_token: bool = field(default=True, metadata=_help("Train the class token and its position."))
    retrieval_groups: int | None = field(
        default=None,
        metadata=_help(
            "Patches of the frozen retrieval pass (query and memory bank): the first this many of the backbone's FPS "
            "centres. None: half the backbone's groups, as the official frozen copy (64 for the fine-tuned 128)."
        ),
    )
    memory_bank: str | None = field(
        default=None,
        metadata={"save": False, "help": "A safetensors memory bank (save_memory_bank); used when no data is given."},
    )
    memory_data: Any = field(
        default=None,
        metadata={
            "save": False,
            "help": "Training batches ((points, labels) or points) the memory bank is built from with the frozen "
            "backbone; the Lightning task fills it with the training loader. Not saved (the bank is).",
        },
    )
    memory_batches: int | None = field(
        default=None, metadata=_help("Build the bank from at most this many batches (None: all of memory_data).")
    )

    data_field: ClassVar[str | None] = "memory_data"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("top_k", "cache_bottleneck_dim", "bottleneck_dim", "num_anchors", "num_neighbors"):
            _positive_int(name, getattr(self, name))
        for name in ("local_heads", "local_head_dim"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.prompt_blocks, bool) or not isinstance(self.prompt_blocks, int) or self.prompt_blocks < 0:
            raise ValueError(f"prompt_blocks={self.prompt_blocks!r} must be an integer >= 0 (the paper: 6).")
        for name in ("prompt_dropout", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must be in [0, 1).")
        for name in ("adapter_scaling", "geo_scaling"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number.")
        for name in ("bias_tuning", "tune_class_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.memory_batches is not None:
            _positive_int("memory_batches", self.memory_batches)
        if self.retrieval_groups is not None:
            _positive_int("retrieval_groups", self.retrieval_groups)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1.")


# -- memory bank -------------------------------------------------------------------------------------------------


def _points_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("points", "pos", "x"):
            if key in batch:
                return batch[key]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"cannot find the points in a batch of type {type(batch).__name__}; give (points, labels) tuples, point "
        "tensors, or dicts with a 'points' entry."
    )


@torch.no_grad()
def retrieval_group_count(model: nn.Module, groups: int | None) -> int:
    """The patches of the retrieval pass: ``groups``, or half the backbone's ``num_group`` (the official ratio)."""
    count = max(1, model.num_group // 2) if groups is None else groups
    if not 1 <= count <= model.num_group:
        raise ValueError(
            f"point_peft: retrieval_groups={groups} must be between 1 and the backbone's num_group={model.num_group} "
            "(the retrieval pass uses the first of its FPS centres); pass None for the official half."
        )
    return count


def pooled_features(model: nn.Module, points: Tensor, groups: int | None = None) -> tuple[Tensor, Tensor]:
    """The frozen encoder's global feature, as the official pretrained Point-MAE encoder gives it: the patch tokens
    alone (that encoder has no class token) through the blocks and the final norm, then a max over them.

    ``groups``: the first this many patches of the backbone's grouping (``None``: all of them). FPS picks centres
    greedily from a fixed start, so the first ``g`` centres of ``G`` are FPS's ``g`` centres, and a patch (its
    centre's nearest points) and its token do not depend on the other patches: this is the encoder configured with
    ``num_group=g`` on the same cloud (tested), as the official frozen copy is (``cfgs/prompt/cache_prompt.yaml``:
    64 groups of 32 points), from the one grouping the adapted model runs anyway.

    Shapes:
        - points: ``(B, N, 3)``; output: feature ``(B, C)``, the backbone's centres ``(B, G, 3)``
    """
    x, pos, center = model.embed(points, groups)  # only the patches it uses go through the mini-PointNet
    k = model.num_prefix_tokens
    x, pos = x[:, k:], pos[:, k:]  # (B, g, C): no class token
    for block in model.blocks:
        x = block(x, pos)
    return model.norm(x).max(dim=1).values, center


@torch.no_grad()
def build_memory_bank(
    model: nn.Module, data: Iterable[Any], max_batches: int | None = None, groups: int | None = None
) -> Tensor:
    """L2-normalised :func:`pooled_features` of every training cloud, in eval mode.

    Args:
        model: the frozen (not yet adapted, or adapter-disabled) backbone.
        data: batches of ``(points, labels)``, point tensors or dicts with ``"points"``; a callable returning
            such an iterable is called first.
        max_batches: stop after this many batches.
        groups: the retrieval pass's patches (``PointPEFTConfig.retrieval_groups``; ``None``: the official half of
            the backbone's groups). The bank and the queries must use the same.

    Shapes:
        - output: ``(N_train, C)``
    """
    if callable(data) and not isinstance(data, (Tensor, nn.Module)):
        data = data()
    groups = retrieval_group_count(model, groups)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    feats = []
    try:
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            points = _points_of(batch).to(device)
            feats.append(F.normalize(pooled_features(model, points, groups)[0].float(), dim=-1))
    finally:
        for m, mode in modes:
            m.training = mode
    if not feats:
        raise ValueError("point_peft: memory_data yielded no batches; the memory bank needs the training clouds.")
    return torch.cat(feats)


def save_memory_bank(path: str | os.PathLike[str], bank: Tensor) -> None:
    """Write ``bank`` ``(N, C)`` to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"bank": bank.detach().float().contiguous().cpu()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_memory_bank(path: str | os.PathLike[str]) -> Tensor:
    """Read a bank written by :func:`save_memory_bank` (never unpickled)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"point_peft: memory bank {path} does not exist; build it with build_memory_bank().")
    tensors = load_file(str(path))
    if set(tensors) != {"bank"} or tensors["bank"].ndim != 2:
        raise ValueError(f"{path} is not a memory bank: expected one 2-D tensor named 'bank', got {sorted(tensors)}")
    return tensors["bank"]


def retrieve(feature: Tensor, bank: Tensor, top_k: int) -> Tensor:
    """Parameter-free attention over the memory bank; returns the cache prompt ``[f, w·M[idx], M[idx]]``.

    Shapes:
        - feature: ``(B, C)``; bank: ``(N, C)``; output: ``(B, top_k + 2, C)``
    """
    sim = F.normalize(feature, dim=-1) @ bank.t()  # (B, N)
    top, idx = sim.topk(top_k, dim=-1)  # (B, k)
    retrieved = bank[idx]  # (B, k, C)
    aggregated = (top.softmax(dim=-1).unsqueeze(1) @ retrieved).squeeze(1)  # (B, C)
    return torch.cat([feature.unsqueeze(1), aggregated.unsqueeze(1), retrieved], dim=1)


# -- layers ------------------------------------------------------------------------------------------------------


class LocalAttention(nn.Module):
    """The tiny self-attention over each anchor's neighbourhood, shared by all blocks: the branch ``Attn(LN(z))``
    of ``z + drop_path(Attn(LN(z)))`` (each block applies its own drop-path). PyTorch's default init, as the
    official ``attn1`` / ``norm3`` (the fine-tuning model is built from the checkpoint without re-initialising them).

    Shapes:
        - input / output: ``(B', K, C)``
        - parameters: ``2C`` (LayerNorm) ``+ 3·h·d·C`` (qkv, no bias) ``+ h·d·C + C`` (output)
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, z: Tensor) -> Tensor:
        """``Attn(LN(z))`` on groups ``z (B', K, C)``: the official order (the reference form of :meth:`grouped`)."""
        return self._attend(self.qkv(self.norm(z)))

    def grouped(self, tokens: Tensor, index: Tensor) -> Tensor:
        """``Attn(LN(z))`` for ``z = tokens`` gathered at ``index (B, A, K)`` into ``(B·A, K, C)`` groups, with LN and
        the qkv projection run on the ``G`` tokens *before* the gather: both act token by token, so each group gets
        the same values as :meth:`forward` on the gathered groups, from ``G`` rows instead of ``A·K`` (16x fewer on
        Point-MAE: 64 anchors of 16 neighbours among 64 tokens), and backward keeps ``(B, G, C)`` for the
        LayerNorm, not two ``(B·A, K, C)`` copies. Gradients equal the reference form's up to float summation order
        (the gather's backward adds the groups' contributions per token)."""
        b, a, k = index.shape
        return self.proj(self.grouped_heads(tokens, index)).view(b * a, k, -1)

    def grouped_heads(self, tokens: Tensor, index: Tensor) -> Tensor:
        """:meth:`grouped` before the output projection: the heads' outputs ``(B·A·K, h·d)``."""
        b, a, k = index.shape
        qkv = gather_points(self.qkv(self.norm(tokens)), index)  # (B, A, K, 3·h·d)
        return self._heads(qkv.reshape(b * a, k, -1)).reshape(b * a * k, -1)

    def _attend(self, qkv: Tensor) -> Tensor:
        return self.proj(self._heads(qkv))

    def _heads(self, qkv: Tensor) -> Tensor:
        """``(B', K, 3·h·d)`` -> the heads' outputs ``(B', K, h·d)``."""
        b, k, _ = qkv.shape
        qkv = qkv.reshape(b, k, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv.unbind(0)  # (B', h, K, d)
        # the official scale is (h·d)^-0.5, not d^-0.5; written out: with heads of 3 and groups of 16, PyTorch's
        # fused CPU kernel takes 1.5x as long (forward and backward, Point-MAE's groups on one thread)
        weights = (q @ kk.transpose(-2, -1)).mul_((self.heads * self.head_dim) ** -0.5).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, k, -1)


class _Shared:
    """Per-forward state one :class:`PointPEFTContext` writes and every block adapter of the adapter reads."""

    def __init__(self) -> None:
        self.cache: Tensor | None = None
        self.anchor_idx: Tensor | None = None
        self.neighbor_idx: Tensor | None = None
        self.interp: Tensor | None = None
        self.local_attn: LocalAttention | None = None
        self.calls = 0


class _ModelRef:
    """A plain reference to the backbone (not a submodule, so the module tree has no cycle)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model


class PointPEFTContext(AdapterModule):
    """Hosted on ``group_divider``: per forward, retrieves the cache prompts and the anchor geometry; owns the
    memory bank and the shared local attention.

    Shapes:
        - input of the host: points ``(B, N, 3)`` (unchanged)
        - ``bank``: ``(N_train, C)`` (a saved buffer)
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str,
        bank: Tensor,
        config: PointPEFTConfig,
        shared: _Shared,
    ) -> None:
        super().__init__()
        self.ref = _ModelRef(model)
        self.adapter_name = adapter_name
        self.top_k = config.top_k
        self.retrieval_groups = retrieval_group_count(model, config.retrieval_groups)
        self.num_anchors, self.num_neighbors = config.num_anchors, config.num_neighbors
        self.register_buffer("bank", bank.detach().clone().float())
        self.local_attn = LocalAttention(model.embed_dim, config.local_heads, config.local_head_dim)
        self.shared = shared
        shared.local_attn = self.local_attn
        self.reset_adapter(config.init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for layer in (self.local_attn.norm, self.local_attn.qkv, self.local_attn.proj):
            layer.reset_parameters()  # the official attn1 / norm3 keep PyTorch's default
        if init_weights is False:
            nn.init.normal_(self.local_attn.qkv.weight, std=0.2)
            nn.init.normal_(self.local_attn.proj.weight, std=0.2)
            nn.init.normal_(self.local_attn.proj.bias, std=0.1)

    @torch.no_grad()
    def _frozen_pass(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The backbone without this adapter, in eval mode: ``(pooled feature (B, C), centres (B, G, 3))``."""
        model = self.ref.model
        mine = [host for _, host in hosts(model) if self.adapter_name in host.adapters and not host.disabled]
        modes = [(m, m.training) for m in model.modules()]
        for host in mine:
            host.disabled = True
        try:
            model.eval()
            feature, center = pooled_features(model, points, self.retrieval_groups)
        finally:
            for host in mine:
                host.disabled = False
            for m, mode in modes:
                m.training = mode
        return feature, center

    def pre(self, points: Tensor) -> Tensor:
        if self.bank.shape[0] < self.top_k:
            raise ValueError(
                f"point_peft: the memory bank holds {self.bank.shape[0]} entries, fewer than top_k={self.top_k}; "
                "build it from more training clouds or lower top_k."
            )
        feature, center = self._frozen_pass(points)
        shared = self.shared
        with torch.no_grad():
            shared.cache = retrieve(feature.float(), self.bank, self.top_k).to(points.dtype)  # (B, k + 2, C)
            anchor_idx = farthest_point_sample(center, self.num_anchors)  # (B, A)
            anchors = gather_points(center, anchor_idx)  # (B, A, 3)
            shared.anchor_idx = anchor_idx
            shared.neighbor_idx = knn(anchors, center, self.num_neighbors)  # (B, A, K) into the G tokens
            weights = 1.0 / (torch.cdist(center, anchors).square() + 1e-8)  # (B, G, A)
            shared.interp = (weights / weights.sum(-1, keepdim=True)).to(points.dtype)
            shared.calls += 1
        return points


def _official_init(module: nn.Module, init_weights: InitMode) -> None:
    """AdapterSuper's init: xavier-uniform weights, N(0, 1e-6) biases (``True``); ``False``: random."""
    if init_weights == "identity":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6 if init_weights else 0.1)


class PointPEFTBlock(AdapterModule):
    """One block's prompts (when prompted) and geometry-aware adapter; hosted on ``blocks.<i>``.

    Shapes:
        - input of the block: ``(B, 1 + G, C)``; what the block sees: ``(B, 1 + p + G, C)`` when prompted
        - output of the host: ``(B, 1 + G, C)``
    """

    def __init__(
        self,
        dim: int,
        config: PointPEFTConfig,
        shared: _Shared,
        prompted: bool,
        init_weights: InitMode = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.prompted = prompted
        self.geo_scaling = config.geo_scaling
        self.num_tokens = config.top_k + 2
        self.drop_path = drop_path  # the rate on the local attention's branch, per group
        if prompted:
            self.prompts = nn.Parameter(torch.zeros(self.num_tokens, dim))
            self.prompt_drop = nn.Dropout(config.prompt_dropout)
            self.cp_adapter = Bottleneck(dim, config.cache_bottleneck_dim, act="quick_gelu", dropout=config.dropout)
        self.out_norm = nn.BatchNorm1d(dim)
        self.adapter1 = Bottleneck(dim, config.bottleneck_dim, act="quick_gelu", dropout=config.dropout)
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        self.adapter1.reset_adapter(init_weights)
        _official_init(self.adapter1, init_weights)
        self.out_norm.reset_parameters()
        if init_weights is False:
            nn.init.normal_(self.out_norm.weight, 1.0, 0.1)
            nn.init.normal_(self.out_norm.bias, std=0.1)
        if self.prompted:
            self.cp_adapter.reset_adapter(init_weights)
            _official_init(self.cp_adapter, init_weights)
            nn.init.trunc_normal_(self.prompts, std=0.02 if init_weights is not False else 1.0)

    def pre(self, x: Tensor) -> Tensor:
        if not self.prompted:
            return x
        cache = self.shared.cache
        if cache is None or cache.shape[0] != x.shape[0]:
            raise RuntimeError("point_peft: no cache prompts for this batch; is the context on group_divider off?")
        prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, p, C): a dropout mask per sample
        prompts = self.prompt_drop(prompts) + self.cp_adapter.post(cache)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)

    def _drop_path_scale(self, groups: int, like: Tensor) -> Tensor | None:
        """The drop-path factor per group ``(groups, 1)``: timm's ``drop_path`` of ones (the same draw as its
        ``DropPath`` on the ``(B·A, K, C)`` branch), or ``None`` when drop-path is off."""
        if not self.training or self.drop_path == 0.0:
            return None
        return timm_drop.drop_path(like.new_ones(groups, 1), self.drop_path, True)

    def post(self, out: Tensor) -> Tensor:
        shared = self.shared
        g = shared.interp.shape[1]
        tokens = out[:, -g:]  # (B, G, C)
        b, _, c = tokens.shape
        a = shared.neighbor_idx.shape[1]
        # max over each group z of z + drop_path(Attn(LN(z))), as the official (LN and qkv on the tokens, before
        # the gather; the residual sum, the projection and the max in one op whose backward touches the maxima only)
        attn = shared.local_attn
        heads = attn.grouped_heads(tokens, shared.neighbor_idx)  # (B·A·K, h·d)
        scale = self._drop_path_scale(b * a, tokens)
        pooled = gather_linear_max(tokens, shared.neighbor_idx, heads, attn.proj.weight, attn.proj.bias, scale)
        pooled = F.gelu(self.out_norm(pooled.transpose(1, 2)).transpose(1, 2))  # BatchNorm over C
        pooled = pooled + self.geo_scaling * gather_points(tokens, shared.anchor_idx)
        tokens = tokens + self.geo_scaling * (shared.interp @ pooled)  # (B, G, A) @ (B, A, C)
        prefix = out[:, :1] if self.prompted else out[:, :-g]  # prompts leave after the block
        return self.adapter1.post(torch.cat([prefix, tokens], dim=1))


# -- placement ---------------------------------------------------------------------------------------------------


def _memory_bank(model: nn.Module, config: PointPEFTConfig, state: Mapping[str, Tensor] | None) -> Tensor:
    if state is not None and BANK_KEY in state:
        return state[BANK_KEY]
    if config.memory_data is not None:
        return build_memory_bank(model, config.memory_data, config.memory_batches, config.retrieval_groups)
    if config.memory_bank is not None:
        return load_memory_bank(config.memory_bank)
    raise ValueError(
        "point_peft retrieves prompts from a memory bank of training features: pass "
        "PointPEFTConfig(memory_data=train_loader) (batches of (points, labels); the Lightning task does this), or "
        "memory_bank='bank.safetensors' from save_memory_bank(path, build_memory_bank(backbone, train_loader))."
    )


@register_method(
    "point_peft", PointPEFTConfig, modality="pointcloud", mergeable=False, paper="https://arxiv.org/abs/2310.03059"
)
def apply_point_peft(
    model: nn.Module, config: PointPEFTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    for attr in ("blocks", "embed", "group_divider", "norm", "class_token", "num_group", "embed_dim"):
        if not hasattr(model, attr):
            raise ValueError(
                f"point_peft: {type(model).__name__} has no `{attr}`; Point-PEFT needs modalpeft's point transformer "
                "(modalpeft.pointcloud.create_backbone)."
            )
    if config.num_anchors > model.num_group or config.num_neighbors > model.num_group:
        raise ValueError(
            f"point_peft: num_anchors={config.num_anchors} and num_neighbors={config.num_neighbors} must not exceed "
            f"the backbone's num_group={model.num_group}; lower them (the paper: 64 anchors, 16 neighbours, 128 groups)"
        )
    targets = selected_blocks(model, config, "point_peft")
    bank = _memory_bank(model, config, state)
    if bank.ndim != 2 or bank.shape[1] != model.embed_dim:
        raise ValueError(
            f"point_peft: the memory bank has shape {tuple(bank.shape)}, expected (N, {model.embed_dim}); build it "
            "with this backbone."
        )
    if bank.shape[0] < config.top_k:
        raise ValueError(
            f"point_peft: the memory bank holds {bank.shape[0]} entries, fewer than top_k={config.top_k}; build it "
            "from more training clouds or lower top_k."
        )
    dim = model.embed_dim
    shared = _Shared()
    attach(model, "group_divider", adapter_name, PointPEFTContext(model, adapter_name, bank, config, shared))
    for i, name in enumerate(targets):
        base_block = model.get_submodule(name)
        drop_path = float(getattr(base_block.drop_path, "drop_prob", 0.0))
        block = PointPEFTBlock(dim, config, shared, i < config.prompt_blocks, config.init_weights, drop_path)
        attach(model, name, adapter_name, block)
        attach(model, f"{name}.drop_path", adapter_name, Bypass())  # no drop-path on the attention branch
        ref = base_block.mlp_residual.mlp.fc1.weight
        mlp_adapter = Bottleneck(
            dim,
            config.bottleneck_dim,
            act="quick_gelu",
            dropout=config.dropout,
            scaling=config.adapter_scaling,
            device=ref.device,
            dtype=ref.dtype,
        )
        _official_init(mlp_adapter, config.init_weights)
        # on the MLP branch's drop-path: m' = drop_path(m), then m' + 0.7·adapter(m'), as the official block
        attach(model, f"{name}.mlp_residual.drop_path", adapter_name, mlp_adapter)
        if config.bias_tuning:
            for sub in _BIASES:
                delta = ParamDelta(model.get_submodule(f"{name}.{sub}"), ("bias",), init_weights=config.init_weights)
                attach(model, f"{name}.{sub}", adapter_name, delta)
    if config.bias_tuning:
        attach(
            model, "norm", adapter_name, ParamDelta(model.norm, ("weight", "bias"), init_weights=config.init_weights)
        )
    if config.tune_class_token:
        token = ParamDelta(model.class_token, ("token", "pos"), init_weights=config.init_weights)
        attach(model, "class_token", adapter_name, token)


def point_peft_parameters(
    dim: int, depth: int, config: PointPEFTConfig, *, mlp_ratio: float = 4.0, head: int = 0
) -> int:
    """The trainable count of Point-PEFT on a backbone of width ``dim`` and ``depth`` adapted blocks.

    Per block: two C→m→C adapters ``2(2Cm + m + C)``, BatchNorm ``2C``, biases ``C + 4C + C + C + C`` (proj, fc1,
    fc2, norm1, norm2, for ``mlp_ratio=4``); per prompted block also ``p·C`` prompts and a C→m'→C ``cp_adapter``.
    Shared: the local attention ``2C + 3hdC + hdC + C``; the final LayerNorm ``2C``; the class token/position ``2C``.
    """
    m, mc, p = config.bottleneck_dim, config.cache_bottleneck_dim, config.top_k + 2
    hd = config.local_heads * config.local_head_dim
    biases = (4 * dim + int(dim * mlp_ratio)) if config.bias_tuning else 0
    block = 2 * (2 * dim * m + m + dim) + 2 * dim + biases
    prompted = p * dim + 2 * dim * mc + mc + dim
    shared = 2 * dim + 4 * hd * dim + dim
    extra = (2 * dim if config.bias_tuning else 0) + (2 * dim if config.tune_class_token else 0)
    return depth * block + min(config.prompt_blocks, depth) * prompted + shared + extra + head
