"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023,
https://arxiv.org/abs/2303.08566).

SPT spends a parameter budget where the task's loss is most sensitive. It scores every entry ``w`` of the
candidate parameters by ``s = Σ_batches (∂L/∂w)²`` on a few training batches (:func:`compute_sensitivity`),
takes the global top entries, and decides per matrix and per vector (:func:`select`):

- a weight matrix with ``n ≥ P_struct / alpha`` selected entries gets a **structured** module (rank-``r``
  LoRA, ``P_struct = r·(d_in + d_out)``, or a bottleneck adapter on the output, ``2·r·d_out + r + d_out``),
  and its entries are dropped; otherwise its ``n`` entries are tuned **unstructured** (a sparse delta:
  trainable values at fixed entries, no dense weight gradient);
- a vector (a Linear bias, a LayerNorm weight or bias) with ``n ≥ length / beta`` is tuned **whole**;
  otherwise its ``n`` entries are tuned.

Trainable count = ``Σ P_struct + Σ sparse entries + Σ tuned vector entries`` (:attr:`Selection.num_params`,
also ``counts`` by kind; :func:`selection_of` reads it back from an adapted model).

Choices made here, and where they differ from the official code (ziplab/SPT):

- ``budget`` is a number of parameters (the paper's 0.4M is ``budget=400_000``) and covers the adapter only:
  the head (``modules_to_save``) comes on top. The official total adds 768 for a cls_token, not tuned here.
- The budget search finds the largest number ``k`` of top entries whose total fits: the total is the largest
  a top-k selection reaches **without exceeding** the budget (ties go to the earlier entry in model order). The
  official code sweeps ``k`` on a 20k grid and keeps the total closest to the budget, which may exceed it. A
  top-k total can stay well below the budget when the next entry would switch a large matrix to structured.
- The sensitivity runs the model in train mode (its own drop-path active, as in the official code); under
  ``torch.distributed`` every process takes process 0's scores, so that all build the same adapter.
- Candidates: the weights and biases of ``nn.Linear`` and the affine vectors of ``nn.LayerNorm`` outside
  ``modules_to_save`` and outside modules named ``head`` or ``patch_embed`` (``cls_token`` and ``pos_embed`` are
  no Linear/LayerNorm parameters, so never candidates, as in the official code). Other parameters (convs,
  ``nn.MultiheadAttention``'s fused in-projection) are not tuned.
- A fused ``qkv`` Linear (timm ViTs; ``split_qkv=True``) counts as three matrices q, k, v, and its bias as three
  vectors, as the official split-qkv model does. A structured module on a slice updates only those rows.
- Unstructured entries of LayerNorm vectors are **tuned** (the official code silently drops them, though its
  total counts them), so every selected entry trains and the count is exact.
- Vectors, whole or partial, are one form: trainable values at fixed indices (``vectors.<param>``). The core
  ``ParamDelta`` covers whole parameters only, and a whole q bias is a slice of the fused qkv bias.
- Structured modules take ``dropout`` on their input and ``drop_path`` on their output, as the official
  ``DropPath(0.1)(f(Dropout(0.1)(x)))``, on every Linear (the official code leaves dropout off ``proj``). The
  LoRA blocks of a fused qkv share one dropout mask on their common input, as the official ``x_drop``; each
  block has its own drop-path mask, as each official ``StructuredTuningModule`` has its own ``DropPath``.
- The adapter's ``down`` starts as the official ``nn.Linear`` default (kaiming-uniform weight, bias uniform in
  ``±1/√d_in``), its ``up`` at zero, so the model still starts as the backbone.
- The sensitivity sums squared gradients per batch, so the grouping changes the ranking, not only the scale:
  ``sensitivity_batch_size`` regroups the training loader's samples into the official batches of 32 (the recipe:
  16 x 32 from a loader of 64). Measured on the test ViT (64 random images, 8 x 8 against 16 x 4, 3 seeds), the
  two groupings share 84-94% of the selected top entries. The official loader reads the first 512 training
  images in dataset order (``SequentialSampler``); the Lightning task passes the training loader, shuffled.
  ``structured="lora"``: a parallel low-rank delta with no ``alpha / r`` scaling. ``structured="adapter"``: a
  sequential GELU adapter on the output (slice) of every Linear; the official code places the ``proj`` adapter
  in parallel on its input instead (same shape and count, as ``proj`` is square).
- LoRA, sparse and vector parts merge exactly; the adapter variant's GELU adapters cannot, so
  ``merge_and_unload`` raises for a model that holds any.
- The selection is saved with the tensors: ``sparse.indices``, ``vectors.<param>.indices`` and a small
  ``structured_rows`` buffer (``(k, 2)`` row ranges) per module, so ``load_adapter`` rebuilds it without data.

Example::

    model = mp.adapt(vit, SPTConfig(budget=400_000, sensitivity_data=train_loader), modules_to_save=["head"])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach
from ...core.layer import AdapterModule, InitMode
from ...core.layers import Bottleneck, LowRankDelta, MaskDropout, SparseDelta
from ...core.layers.dropout import dropout_rate, dropped_product
from ...core.model import AdaptedModel
from ...core.registry import register_method
from .spt_select import (
    LossFn,
    Selection,
    Structured,
    compute_sensitivity,
    cross_entropy_loss,
    select,
    selection_from_state,
    spt_targets,
)

__all__ = [
    "SPTConfig",
    "SPTUpdate",
    "Selection",
    "compute_sensitivity",
    "cross_entropy_loss",
    "select",
    "selection_of",
]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


@dataclass
class SPTConfig(AdapterConfig):
    """SPT. Needs ``sensitivity_data`` (training batches) when adapting; loading a saved adapter does not."""

    budget: int = field(
        default=400_000,
        metadata=_help("Trainable parameters of the adapter (head excluded), e.g. 400_000 for the paper's 0.4M."),
    )
    structured: Structured = field(
        default="lora", metadata=_help("Structured module: 'lora' (parallel, mergeable) or 'adapter' (sequential).")
    )
    rank: int = field(default=8, metadata=_help("Rank r of the structured modules."))
    alpha: float = field(
        default=10.0, metadata=_help("A matrix turns structured when its selected entries reach P_struct / alpha.")
    )
    beta: float = field(
        default=5.0, metadata=_help("A vector is tuned whole when its selected entries reach length / beta.")
    )
    batches: int = field(default=16, metadata=_help("Training batches the sensitivity is summed over."))
    sensitivity_batch_size: int | None = field(
        default=None,
        metadata=_help(
            "Regroup the sensitivity data into batches of this many samples (the official 32, whatever the training "
            "batch size); None: the loader's own batches."
        ),
    )
    dropout: float = field(default=0.1, metadata=_help("Dropout on the structured modules' input."))
    drop_path: float = field(default=0.1, metadata=_help("Drop-path (per sample) on the structured modules' output."))
    split_qkv: bool = field(
        default=True,
        metadata=_help("Treat a fused Linear named 'qkv' (d_out divisible by 3) as three matrices q, k, v."),
    )
    sensitivity_data: Any = field(
        default=None,
        metadata={
            "save": False,
            "help": "Training batches (a DataLoader, an iterable, or a callable returning one) the sensitivity is "
            "computed on; the Lightning task fills it with the training loader. Not saved.",
        },
    )
    loss_fn: LossFn | None = field(
        default=None,
        metadata={
            "save": False,
            "help": "loss_fn(model, batch) -> loss for the sensitivity; None: cross-entropy on (inputs, labels).",
        },
    )

    data_field: ClassVar[str | None] = "sensitivity_data"

    def __post_init__(self) -> None:
        super().__post_init__()
        if _number(self.budget) and float(self.budget).is_integer() and self.budget >= 1:
            self.budget = int(self.budget)
        else:
            raise ValueError(
                f"budget={self.budget!r} must be a number of parameters >= 1, e.g. 400_000 for the paper's 0.4M."
            )
        if self.structured not in ("lora", "adapter"):
            raise ValueError(f"structured={self.structured!r} is not valid; choose 'lora' or 'adapter'.")
        if self.sensitivity_batch_size is not None:
            _positive("sensitivity_batch_size", self.sensitivity_batch_size)
        for name in ("rank", "batches"):
            _positive(name, getattr(self, name))
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not _number(value) or value < 1:
                raise ValueError(
                    f"{name}={value!r} must be a number >= 1 (the paper uses alpha=10, beta=5); smaller values would "
                    "make switching to the structured/whole form cheaper than the entries it replaces."
                )
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not _number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1); use 0.0 to turn it off.")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn={self.loss_fn!r} must be a callable loss_fn(model, batch) -> loss, or None.")


class VectorEntries(nn.Module):
    """Trainable values at fixed entries of a vector parameter: ``Δp[indices[k]] = values[k]``, zero elsewhere.

    Args:
        length: the vector's length.
        indices: ``(n,)`` distinct entries in ``[0, length)``.

    Shapes:
        ``indices``, ``values``: ``(n,)``; :meth:`delta`: ``(length,)``
    """

    def __init__(self, length: int, indices: Tensor) -> None:
        super().__init__()
        indices = indices.long().reshape(-1)
        outside = indices[(indices < 0) | (indices >= length)]
        if outside.numel():
            raise ValueError(f"vector entries {outside.tolist()[:8]} lie outside a vector of length {length}")
        if indices.unique().numel() != indices.numel():
            raise ValueError("vector entries must be distinct")
        self.length = length
        self.values = nn.Parameter(torch.zeros(indices.numel()))
        self.register_buffer("indices", indices)

    def delta(self) -> Tensor:
        return self.values.new_zeros(self.length).index_put((self.indices,), self.values)


class SPTUpdate(AdapterModule):
    """SPT's update of one Linear or LayerNorm: structured row blocks, sparse weight entries, vector entries.

    A host runs one adapter module per adapter name, and SPT may need all three kinds on one Linear (LoRA on
    the q rows of a fused qkv, sparse entries in its k rows, the whole v bias), so this composite holds the core
    layers and sums their hooks. With ``x`` the input and ``[s:e]`` a structured row block:

    - ``replace_base`` (what the host runs for a Linear with LoRA blocks or sparse entries): ``x (W + ΔW_sparse)ᵀ +
      b + Δb`` in one product, whose backward gives the entries their gradients without a dense weight gradient and
      keeps only the input columns the entries read, then ``DropPath(LoRA(drop(x)))`` added into each block's rows
      ``[s:e]`` in place (no zero-padded branch); ``parallel`` is the same update as a branch beside the base,
      ``Σ_blocks pad_[s:e](DropPath(LoRA(drop(x)))) + sparse(x)``, kept as the reference form (tests compare the
      two, outputs and gradients). On ViT-B/16 (batch 8, CPU) the lean form took SPT's training step from 1.70x
      peft LoRA's to about 1.0x (``benchmarks/results/vit_base_patch16_224_b8_cpu.md``). The blocks' ``A`` run as one
      product over their stacked rows through :func:`~modalpeft.core.layers.dropout.dropped_product`, whose backward
      keeps the dropout's one-byte mask and recomputes the dropped input (from the GELU's or the LayerNorm's saved
      tensors where those made it) instead of keeping a copy: the bytes SPT saves for backward went from 1.30x to
      1.08x the frozen model's (the floor);
    - ``post`` (``structured="adapter"``): ``out[..., s:e] += DropPath(Adapter(drop(out[..., s:e])))``;
    - ``param_deltas``: ``Δp[indices] = values`` for each tuned vector ``p``.

    It merges (LoRA blocks and sparse entries into the weight, vectors into their parameters) unless it holds an
    adapter.

    Args:
        base: the Linear or LayerNorm (read for shapes only).
        structured_rows: row ranges ``(start, stop)`` of the weight with a structured module (Linear only).
        sparse_indices: ``(2, n)`` weight entries tuned one by one (Linear only), or ``None``.
        vectors: ``{param name: (n,) entries}`` of tuned vector entries.
        structured, rank, dropout, drop_path: see :class:`SPTConfig`.
        init_weights: ``True``/``"identity"``: every part starts at zero effect (LoRA ``B = 0``, adapter ``up = 0``,
            zero values), SPT's init; ``False``: random.

    Shapes:
        - input: ``(*, d_in)``; output: ``(*, d_out)``
        - ``structured_rows``: ``(k, 2)``; ``sparse.indices``: ``(2, n)``; ``vectors.<p>.indices``: ``(n_p,)``
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        structured_rows: list[tuple[int, int]] | None = None,
        sparse_indices: Tensor | None = None,
        vectors: Mapping[str, Tensor] | None = None,
        structured: Structured = "lora",
        rank: int = 8,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        init_weights: InitMode = True,
    ) -> None:
        super().__init__()
        rows = sorted(structured_rows or [])
        vectors = vectors or {}
        is_linear = isinstance(base, nn.Linear)
        if (rows or sparse_indices is not None) and not is_linear:
            raise ValueError(f"structured and sparse parts need an nn.Linear, not {type(base).__name__}")
        self.kind = structured
        self.in_features = base.in_features if is_linear else 0
        self.out_features = base.out_features if is_linear else 0
        self.rows = [(int(s), int(e)) for s, e in rows]
        if rows:
            self.register_buffer("structured_rows", torch.tensor(self.rows, dtype=torch.long))
            if structured == "lora":
                blocks = [LowRankDelta(self.in_features, e - s, rank) for s, e in self.rows]
            else:
                blocks = [Bottleneck(e - s, rank, mode="sequential", act="gelu") for s, e in self.rows]
            self.structured = nn.ModuleList(blocks)
        self.sparse = None
        if sparse_indices is not None:
            self.sparse = SparseDelta(self.in_features, self.out_features, sparse_indices)
        own = dict(base.named_parameters(recurse=False))
        for name in vectors:
            if name not in own or own[name].ndim != 1:
                raise ValueError(f"{type(base).__name__} has no vector parameter {name!r} (parameters: {list(own)})")
        self.vectors = nn.ModuleDict({n: VectorEntries(own[n].numel(), idx) for n, idx in vectors.items()})
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        lora = bool(rows) and structured == "lora"
        adapter = bool(rows) and structured == "adapter"
        # The class defines every hook; the instance runs only those it has parts for. A Linear with LoRA blocks or
        # sparse entries runs as one product with the sparse entries (and tuned bias entries) in it, the LoRA blocks
        # added into their rows (replace_base); `parallel` is the same update as a branch, for reference.
        self.has_parallel = False
        self.has_replace_base = lora or self.sparse is not None
        self.has_post = adapter
        self.has_param_deltas = len(self.vectors) > 0
        self.mergeable = not adapter
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for block in self.structured if self.rows else []:
            block.reset_adapter(init_weights)
            if isinstance(block, Bottleneck) and init_weights is True:  # the official down bias: PyTorch's default
                bound = 1 / math.sqrt(block.down.in_features)
                nn.init.uniform_(block.down.bias, -bound, bound)
        if self.sparse is not None:
            self.sparse.reset_adapter(init_weights)
        for entries in self.vectors.values():
            if init_weights is False:
                nn.init.normal_(entries.values, std=0.1)
            else:
                nn.init.zeros_(entries.values)

    def param_deltas(self, base: nn.Module) -> dict[str, Tensor]:
        return {name: entries.delta() for name, entries in self.vectors.items()}

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        """The adapted Linear: ``x (W + ΔW_sparse)ᵀ + (b + Δb)`` in one product (:meth:`SparseDelta.linear`: the
        entries' gradients without a dense weight gradient), then each LoRA block's output added into its rows. The
        same update as ``base(x) + parallel(x)`` with the bias delta, without the second product and the padded
        branch that the parallel form costs."""
        bias = base.bias
        if "bias" in self.vectors:
            bias = bias + self.vectors["bias"].delta().to(bias.dtype)
        if self.sparse is not None:
            out = self.sparse.linear(x, base.weight, bias)
        else:
            out = nn.functional.linear(x, base.weight, bias)
        if self.rows and self.kind == "lora":
            # one mask shared by the q, k, v blocks, as the official x_drop; one product with their stacked A's,
            # whose backward keeps the mask and recomputes the dropped input (core dropped_product)
            stacked = torch.cat([b.A for b in self.structured]) if len(self.structured) > 1 else self.structured[0].A
            hidden = dropped_product(x, stacked, dropout_rate(self.drop), self.training)
            hidden = hidden.split([b.A.shape[0] for b in self.structured], -1)
            blocks = torch.cat([self.drop_path(b.up(h)) for b, h in zip(self.structured, hidden, strict=True)], -1)
            out = _AddIntoRows.apply(out, blocks.to(out.dtype), tuple(self.rows))
        return out

    def parallel(self, x: Tensor) -> Tensor:
        """``ΔW x`` of the LoRA blocks and sparse entries as a branch beside the base Linear (the reference form of
        :meth:`replace_base`, which the host runs)."""
        out = self.sparse.parallel(x) if self.sparse is not None else None
        if self.rows and self.kind == "lora":
            dropped = self.drop(x)  # one mask shared by the q, k, v blocks, as the official x_drop
            blocks = [self.drop_path(b.parallel(dropped)) for b in self.structured]
            low_rank = _place(self.rows, blocks, self.out_features, dim=-1)
            out = low_rank if out is None else out + low_rank
        return out

    def post(self, out: Tensor) -> Tensor:
        pieces, pos = [], 0
        for (s, e), block in zip(self.rows, self.structured, strict=True):
            h = out[..., s:e]
            pieces += [out[..., pos:s], h + self.drop_path(block.branch(self.drop(h)))]
            pos = e
        pieces.append(out[..., pos:])
        return torch.cat(pieces, dim=-1)

    def delta_weight(self) -> Tensor:
        delta = None
        if self.rows and self.kind == "lora":
            delta = _place(self.rows, [b.delta_weight() for b in self.structured], self.out_features, dim=0)
        if self.sparse is not None:
            sparse = self.sparse.delta_weight()
            delta = sparse if delta is None else delta + sparse
        assert delta is not None, "delta_weight of an SPTUpdate without LoRA or sparse parts"
        return delta

    def extra_repr(self) -> str:
        return f"structured={self.kind!r}, rows={self.rows}, vectors={list(self.vectors)}"


class _AddIntoRows(torch.autograd.Function):
    """``out[..., s:e] += src[..., block]`` for each row range, in place on a fresh product's output: the LoRA blocks
    go into their rows without a zero-padded branch; the backward passes ``∂L/∂out`` through and slices it for ``src``.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, src: Tensor, rows: tuple[tuple[int, int], ...]) -> Tensor:
        ctx.rows = rows
        ctx.mark_dirty(out)
        pos = 0
        for s, e in rows:
            out[..., s:e] += src[..., pos : pos + e - s]
            pos += e - s
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_src = torch.cat([grad[..., s:e] for s, e in ctx.rows], dim=-1) if ctx.needs_input_grad[1] else None
        return grad, grad_src, None


def _place(rows: list[tuple[int, int]], blocks: list[Tensor], total: int, dim: int) -> Tensor:
    """Concatenate ``blocks`` at their row ranges along ``dim``, zeros in between: a tensor of size ``total``."""
    pieces, pos = [], 0

    def zeros(n: int) -> Tensor:
        shape = list(blocks[0].shape)
        shape[dim] = n
        return blocks[0].new_zeros(shape)

    for (s, e), block in zip(rows, blocks, strict=True):
        if s > pos:
            pieces.append(zeros(s - pos))
        pieces.append(block)
        pos = e
    if pos < total:
        pieces.append(zeros(total - pos))
    return torch.cat(pieces, dim=dim)


@register_method("spt", SPTConfig, modality="vision", mergeable=True, paper="https://arxiv.org/abs/2303.08566")
def apply_spt(
    model: nn.Module, config: SPTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = spt_targets(model, config)
    if state is not None:
        selection = selection_from_state(state, model, config)
    elif config.sensitivity_data is None:
        raise ValueError(
            "SPT scores parameters on training data: pass SPTConfig(sensitivity_data=train_loader) (batches of "
            "(inputs, labels), or give loss_fn), or run it through the Lightning task, which fills it in."
        )
    else:
        names = [f"{n}.{p}" for n, m in targets for p, _ in m.named_parameters(recurse=False)]
        sensitivity = compute_sensitivity(
            model,
            config.sensitivity_data,
            config.batches,
            config.loss_fn,
            names=names,
            batch_size=config.sensitivity_batch_size,
        )
        selection = select(sensitivity, model, config)
    if selection.num_params == 0:
        raise ValueError(
            f"SPT: budget={config.budget} selects nothing (the smallest unit costs more); raise the budget."
        )
    layers = [
        (
            name,
            SPTUpdate(
                module,
                structured_rows=selection.structured.get(name),
                sparse_indices=selection.sparse.get(name),
                vectors=selection.vectors.get(name),
                structured=config.structured,
                rank=config.rank,
                dropout=config.dropout,
                drop_path=config.drop_path,
                init_weights=config.init_weights,
            ),
        )
        for name, module in targets
        if name in selection
    ]
    modules = dict(targets)
    for name, layer in layers:
        layer.train(modules[name].training)  # a fresh module trains; follow the model (its dropout, drop-path)
        attach(model, name, adapter_name, layer)


def selection_of(model: AdaptedModel, adapter_name: str | None = None) -> Selection:
    """The :class:`Selection` of an SPT adapter in ``model`` (the active one by default), read from its tensors."""
    name = adapter_name or model.active_adapter
    if name not in model.peft_config or model.peft_config[name].method != "spt":
        raise ValueError(f"{name!r} is not an SPT adapter of this model (adapters: {model.adapter_names})")
    return selection_from_state(model.adapter_state_dict(name), model.base_model, model.peft_config[name])
