"""SPT's selection: which parameters a budget tunes, and how (He et al., ICCV 2023, https://arxiv.org/abs/2303.08566).

Two plain functions, usable on their own to inspect a selection before adapting:

- :func:`compute_sensitivity` scores every parameter entry by its squared gradient, summed over training batches;
- :func:`select` turns scores and a budget into a :class:`Selection`: per matrix a structured module or sparse
  entries, per vector the whole vector or some entries.

See :mod:`modalpeft.vision.methods.spt` for the method as a whole and the choices made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...core.inject import base_modules, find_targets

if TYPE_CHECKING:
    from .spt import SPTConfig

Structured = Literal["lora", "adapter"]
LossFn = Callable[[nn.Module, Any], Tensor]

_EXCLUDED = frozenset({"head", "patch_embed"})


def structured_params(kind: Structured, rank: int, d_in: int, d_out: int) -> int:
    """Parameters of one structured module on a ``(d_out, d_in)`` matrix: LoRA ``r·(d_in + d_out)``, adapter
    ``2·r·d_out + r + d_out`` (built on the output dim, with biases)."""
    return rank * (d_in + d_out) if kind == "lora" else 2 * rank * d_out + rank + d_out


def _default_target(name: str, module: nn.Module) -> bool:
    return not _EXCLUDED & set(name.split("."))


def spt_targets(model: nn.Module, config: SPTConfig) -> list[tuple[str, nn.Module]]:
    """The modules whose parameters SPT may tune, in model order: every ``nn.Linear`` (weight and bias) and
    ``nn.LayerNorm`` (affine vectors) selected by ``target_modules`` (default: all but those under a module
    named ``head`` or ``patch_embed``), never the ``modules_to_save``."""
    found = find_targets(model, config, default=_default_target, types=(nn.Linear, nn.LayerNorm))
    return [(n, m) for n, m in found if any(True for _ in m.parameters(recurse=False))]


@dataclass(frozen=True)
class Unit:
    """One matrix or vector that SPT decides on: rows ``[start, stop)`` of a module's parameter.

    A fused qkv Linear gives three matrix units (and three bias units), any other parameter one.
    """

    module: str
    param: str
    start: int
    stop: int
    cols: int
    """``d_in`` for a matrix, 1 for a vector."""
    matrix: bool
    full: int
    """Cost once switched: the structured module's parameters (matrix) or the vector's length."""
    threshold: float
    """Selected entries from which the unit switches: ``P_struct / alpha`` or ``length / beta``."""

    def cost(self, n: int) -> int:
        return self.full if n >= self.threshold else n


def is_fused_qkv(name: str, module: nn.Module, config: SPTConfig) -> bool:
    return (
        config.split_qkv
        and isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] == "qkv"
        and module.out_features % 3 == 0
    )


def units(targets: list[tuple[str, nn.Module]], config: SPTConfig) -> list[Unit]:
    """The decision units of ``targets``, in model order."""
    out = []
    for name, module in targets:
        if isinstance(module, nn.Linear):
            d_out, d_in = module.out_features, module.in_features
            step = d_out // 3 if is_fused_qkv(name, module, config) else d_out
            rows = [(s, s + step) for s in range(0, d_out, step)]
            for s, e in rows:
                p = structured_params(config.structured, config.rank, d_in, e - s)
                out.append(Unit(name, "weight", s, e, d_in, True, p, p / config.alpha))
            if module.bias is not None:
                out.extend(Unit(name, "bias", s, e, 1, False, e - s, (e - s) / config.beta) for s, e in rows)
        else:
            for pname, p in module.named_parameters(recurse=False):
                out.append(Unit(name, pname, 0, p.numel(), 1, False, p.numel(), p.numel() / config.beta))
    return out


# -- stage 1: sensitivity ------------------------------------------------------------------------------------


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """The default loss: cross-entropy of ``model(inputs)`` against ``labels`` for a batch ``(inputs, labels, ...)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"SPT's sensitivity expects batches of (inputs, labels), got {type(batch).__name__}; give "
            "loss_fn(model, batch) -> loss for other batch formats."
        )
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        items = [_to_device(b, device) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # namedtuples too
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def compute_sensitivity(
    model: nn.Module,
    data: Iterable | Callable[[], Iterable],
    batches: int = 16,
    loss_fn: LossFn | None = None,
    names: Iterable[str] | None = None,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """SPT's sensitivity: ``s = Σ_batches (∂L/∂w)²`` for every entry of the named parameters.

    The model runs in train mode (drop-path active, as in the official code); no optimiser step is taken, no
    ``.grad`` is written, and every parameter's ``requires_grad`` and every module's mode are restored. Under
    ``torch.distributed`` every process gets process 0's scores, so that all build the same adapter.

    Args:
        model: the model (a head for the task in place).
        data: a ``DataLoader`` or any iterable of batches, or a callable returning one; batches move to the
            model's device.
        batches: how many batches to use (fewer if ``data`` runs out).
        loss_fn: ``loss_fn(model, batch) -> loss``; default :func:`cross_entropy_loss` on ``(inputs, labels)``.
        names: clean parameter names to score (``blocks.0.attn.qkv.weight``); default every parameter.
        batch_size: regroup the samples of ``data`` into batches of this many (the last may be smaller), so that
            the sum runs over the official grouping whatever the training loader's batch size (:func:`rebatch`);
            ``None``: ``data``'s own batches. The grouping matters: ``Σ_batches (mean gradient)²`` over 8 batches
            of 64 is no rescaling of the sum over 16 batches of 32, and it selects other entries.

    Returns:
        ``{name: scores}``, float32 tensors shaped like the parameters.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches={batches!r} must be a positive integer (the paper uses 16).")
    if callable(data) and not isinstance(data, Iterable):
        data = data()
    if not isinstance(data, Iterable):
        raise TypeError(
            f"sensitivity data must be a DataLoader, an iterable of batches or a callable returning one, got "
            f"{type(data).__name__}."
        )
    if batch_size is not None:
        data = rebatch(data, batch_size)
    loss_fn = loss_fn or cross_entropy_loss
    every = {
        f"{m}.{p}" if m else p: t for m, mod in base_modules(model) for p, t in mod.named_parameters(recurse=False)
    }
    wanted = list(every) if names is None else list(names)
    missing = [n for n in wanted if n not in every]
    if missing:
        raise ValueError(f"the model has no parameter(s) {missing[:5]}; parameters include {list(every)[:8]}.")
    params = [every[n] for n in wanted]
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in zip(wanted, params, strict=True)}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    device = params[0].device if params else torch.device("cpu")
    seen = 0
    try:
        model.train()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in data:
                if seen == batches:
                    break
                loss = loss_fn(model, _to_device(batch, device))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for score, grad in zip(scores.values(), grads, strict=True):
                    if grad is not None:
                        score.add_(grad.detach().float().square())
                seen += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    if seen == 0:
        raise ValueError("the sensitivity data gave no batch; pass the training DataLoader (a non-empty one).")
    _share_from_first_process(scores)
    return scores


def rebatch(data: Iterable, batch_size: int) -> Iterator[Any]:
    """The samples of ``data`` regrouped into batches of ``batch_size`` (the last may be smaller), in order.

    A batch is any nesting of tuples, lists and dicts of tensors that share their first (sample) dim, such as
    ``(inputs, labels)``; the batches of ``data`` are concatenated and split along it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (SPT's sensitivity: 32).")
    spec, pending, held = None, [], 0
    for batch in data:
        leaves, batch_spec = tree_flatten(batch)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(
                f"cannot regroup a batch of {type(batch).__name__} into batches of {batch_size}: it must hold only "
                "tensors (e.g. (inputs, labels)); give batches of the size you want and batch_size=None."
            )
        spec = batch_spec
        pending.append(leaves)
        held += leaves[0].shape[0]
        while held >= batch_size:
            joined = [torch.cat(parts) for parts in zip(*pending, strict=True)]
            yield tree_unflatten([t[:batch_size] for t in joined], spec)
            held -= batch_size
            pending = [[t[batch_size:] for t in joined]] if held else []
    if held:
        yield tree_unflatten([torch.cat(parts) for parts in zip(*pending, strict=True)], spec)


def _share_from_first_process(scores: dict[str, Tensor]) -> None:
    """Under ``torch.distributed``, give every process the scores of process 0, so that all of them select the
    same parameters (and build the same adapter) whatever their data shards and numerical noise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not scores:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).to(device)
    dist.broadcast(flat, src=0)
    for s, shared in zip(scores.values(), flat.split([s.numel() for s in scores.values()]), strict=True):
        s.copy_(shared.view_as(s))


# -- stage 2: selection ---------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What SPT tunes in a model, by clean module name.

    Attributes:
        structured: row ranges ``(start, stop)`` of a Linear's weight that get a structured module (the whole
            weight, or the q/k/v slice of a fused qkv).
        sparse: ``(2, n)`` weight entries (rows, then columns, in the full weight) tuned one by one.
        vectors: per parameter name (``"bias"``, ``"weight"`` of a LayerNorm) the ``(n,)`` tuned entries; a
            whole vector lists all its entries.
        num_params: trainable parameters of the adapter (``modules_to_save`` not included).
        counts: ``structured`` (matrices, q/k/v slices counted apart), ``sparse_matrices`` (matrices with sparse
            entries), ``sparse_entries``, ``whole_vectors``, ``partial_vectors``, ``vector_entries`` (in partial
            vectors) and ``total`` (= ``num_params``).
        top_entries: how many top-scored entries the budget search kept (``None`` when rebuilt from a state).
    """

    structured: dict[str, list[tuple[int, int]]]
    sparse: dict[str, Tensor]
    vectors: dict[str, dict[str, Tensor]]
    num_params: int
    counts: dict[str, int]
    top_entries: int | None = None

    def __contains__(self, module: str) -> bool:
        return module in self.structured or module in self.sparse or module in self.vectors


def _assemble(
    structured: dict[str, list[tuple[int, int]]],
    sparse: dict[str, Tensor],
    vectors: dict[str, dict[str, Tensor]],
    all_units: list[Unit],
    top_entries: int | None = None,
) -> Selection:
    """Count a selection's parameters from its contents: ``Σ P_struct + Σ sparse entries + Σ vector entries``."""
    counts = dict.fromkeys(
        ("structured", "sparse_matrices", "sparse_entries", "whole_vectors", "partial_vectors", "vector_entries"), 0
    )
    for u in all_units:
        if u.matrix:
            counts["structured"] += (u.start, u.stop) in structured.get(u.module, [])
            rows = sparse[u.module][0] if u.module in sparse else None
            counts["sparse_matrices"] += rows is not None and bool(((rows >= u.start) & (rows < u.stop)).any())
            continue
        idx = vectors.get(u.module, {}).get(u.param)
        n = 0 if idx is None else int(((idx >= u.start) & (idx < u.stop)).sum())
        if n == u.stop - u.start:
            counts["whole_vectors"] += 1
        elif n:
            counts["partial_vectors"] += 1
            counts["vector_entries"] += n
    counts["sparse_entries"] = sum(t.shape[1] for t in sparse.values())
    total = counts["sparse_entries"] + sum(int(t.numel()) for v in vectors.values() for t in v.values())
    total += sum(u.full for u in all_units if u.matrix and (u.start, u.stop) in structured.get(u.module, []))
    counts["total"] = total
    return Selection(structured, sparse, vectors, total, counts, top_entries)


def _unit_scores(sensitivity: Mapping[str, Tensor], u: Unit, params: dict[str, Tensor]) -> Tensor:
    key = f"{u.module}.{u.param}"
    if key not in sensitivity:
        raise ValueError(
            f"the sensitivity has no scores for {key!r}; compute it on this model with compute_sensitivity(model, "
            "data) (which scores every parameter by default)."
        )
    scores = sensitivity[key]
    if scores.shape != params[key].shape:
        raise ValueError(f"sensitivity[{key!r}] has shape {tuple(scores.shape)}, not {tuple(params[key].shape)}")
    scores = scores.detach()[u.start : u.stop].reshape(-1).float()
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError(
            f"sensitivity[{key!r}] holds negative, NaN or infinite scores; scores are sums of squared gradients "
            "(a NaN or inf points at the loss, e.g. an AMP overflow)."
        )
    return scores + 0.0  # -0.0 becomes 0.0, so bit patterns order the scores


# Scores are ordered by their float32 bit patterns (monotone for non-negative floats), bucketed by the top bits.
_SHIFT = 16
_BUCKETS = (0x7F7FFFFF >> _SHIFT) + 1  # through the bucket of the largest finite float32


def select(sensitivity: Mapping[str, Tensor], model: nn.Module, config: SPTConfig) -> Selection:
    """The global top-k selection under ``config.budget``, with the per-matrix and per-vector switches.

    For a number ``k`` of top-scored entries (over all candidate entries; ties go to the earlier entry in model
    order), each unit with ``n`` selected entries costs ``P_struct`` if ``n ≥ P_struct / alpha`` (a matrix turns
    structured) or ``length`` if ``n ≥ length / beta`` (a whole vector), else ``n`` (sparse entries). The cost is
    non-decreasing in ``k`` (``alpha, beta ≥ 1``), and the search finds the largest ``k`` whose total fits the
    budget: the total is ``≤ budget`` and as close to it as a top-k selection can be.

    The search needs no sort of all entries: a histogram of the scores' bit patterns (65k buckets per unit)
    gives the cost of every bucket threshold at once; only the entries of the one bucket where the budget runs
    out are sorted, and a bisection over them finds ``k``.

    Args:
        sensitivity: non-negative scores by clean parameter name, as :func:`compute_sensitivity` returns.
        model: the model the scores were computed on.
        config: an :class:`~modalpeft.vision.SPTConfig` (budget, structured, rank, alpha, beta, targets).
    """
    targets = spt_targets(model, config)
    all_units = units(targets, config)
    params = {f"{n}.{p}": t for n, m in targets for p, t in m.named_parameters(recurse=False)}
    keys = [_unit_scores(sensitivity, u, params).view(torch.int32) for u in all_units]
    buckets = [(k >> _SHIFT).long() for k in keys]
    device = keys[0].device
    full = torch.tensor([[u.full] for u in all_units], device=device)  # (U, 1)
    threshold = torch.tensor([[u.threshold] for u in all_units], dtype=torch.float64, device=device)

    def cost(taken: Tensor) -> Tensor:  # (U, T) entries taken per unit -> (T,) total cost
        return torch.where(taken >= threshold, full, taken).sum(0)

    # at_least[u, b]: entries of unit u in bucket b or above; column _BUCKETS takes nothing.
    hist = torch.stack([torch.bincount(b, minlength=_BUCKETS) for b in buckets])  # (U, B)
    at_least = torch.cat([hist.flip(1).cumsum(1).flip(1), hist.new_zeros(len(all_units), 1)], dim=1)
    first = int((cost(at_least) <= config.budget).int().argmax())  # the lowest bucket that fits whole
    taken = at_least[:, first]
    cut_units = cut_flat = torch.zeros(0, dtype=torch.long, device=device)
    if first > 0:  # the bucket below does not fit whole: take its entries in order while the total fits
        members = [(b == first - 1).nonzero().squeeze(1) for b in buckets]
        units_of = torch.cat([torch.full_like(m, i) for i, m in enumerate(members)])
        order = torch.sort(torch.cat([k[m] for k, m in zip(keys, members, strict=True)]), descending=True, stable=True)
        cut_units, cut_flat = units_of[order.indices], torch.cat(members)[order.indices]

        def taken_with(t: int) -> Tensor:
            return taken + torch.bincount(cut_units[:t], minlength=len(all_units))

        lo, hi = 0, cut_units.numel() - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(cost(taken_with(mid)[:, None])) <= config.budget:
                lo = mid
            else:
                hi = mid - 1
        taken, cut_units, cut_flat = taken_with(lo), cut_units[:lo], cut_flat[:lo]
    structured: dict[str, list[tuple[int, int]]] = {}
    sparse: dict[str, list[Tensor]] = {}
    vectors: dict[str, dict[str, list[Tensor]]] = {}
    for i, (u, b, n) in enumerate(zip(all_units, buckets, taken.tolist(), strict=True)):
        if n == 0:
            continue
        if u.matrix and n >= u.threshold:
            structured.setdefault(u.module, []).append((u.start, u.stop))
            continue
        if n >= u.threshold:  # a whole vector
            flat = torch.arange(b.numel())
        else:  # the entries above the cut bucket, and those of the cut bucket taken
            flat = torch.cat([(b >= first).nonzero().squeeze(1), cut_flat[cut_units == i]]).sort().values.cpu()
        if u.matrix:
            sparse.setdefault(u.module, []).append(torch.stack([u.start + flat // u.cols, flat % u.cols]))
        else:
            vectors.setdefault(u.module, {}).setdefault(u.param, []).append(u.start + flat)
    selection = _assemble(
        structured,
        {m: torch.cat(t, dim=1) for m, t in sparse.items()},
        {m: {p: torch.cat(t) for p, t in v.items()} for m, v in vectors.items()},
        all_units,
        top_entries=int(taken.sum()),
    )
    assert selection.num_params == int(cost(taken[:, None])), (selection.num_params, int(cost(taken[:, None])))
    return selection


def selection_from_state(state: Mapping[str, Tensor], model: nn.Module, config: SPTConfig) -> Selection:
    """Rebuild a :class:`Selection` from saved adapter tensors (keys ``<module>.adapters.<name>``), without data.

    Reads ``structured_rows`` (``(k, 2)`` row ranges), ``sparse.indices`` and ``vectors.<param>.indices``.
    """
    targets = spt_targets(model, config)
    all_units = units(targets, config)
    names = {n for n, _ in targets}
    saved = {k.split(".adapters.", 1)[0] for k in state if ".adapters." in k}
    unknown = sorted(saved - names)
    if unknown:
        raise ValueError(
            f"the saved SPT adapter tunes modules that are not SPT targets of this model: {unknown[:5]}; load it "
            f"into the architecture it was trained on (SPT targets here include {sorted(names)[:5]})."
        )
    ranges = {(u.module, u.start, u.stop) for u in all_units if u.matrix}
    structured: dict[str, list[tuple[int, int]]] = {}
    sparse: dict[str, Tensor] = {}
    vectors: dict[str, dict[str, Tensor]] = {}
    for name, module in targets:
        prefix = f"{name}.adapters."
        if prefix + "structured_rows" in state:
            rows = [(int(s), int(e)) for s, e in state[prefix + "structured_rows"].tolist()]
            bad = [r for r in rows if (name, *r) not in ranges]
            if bad:
                raise ValueError(
                    f"{name}: saved structured rows {bad} are not q/k/v slices or the whole weight here; was the "
                    f"adapter saved with another split_qkv (now {config.split_qkv})?"
                )
            structured[name] = rows
        if prefix + "sparse.indices" in state:
            sparse[name] = state[prefix + "sparse.indices"].long().cpu()
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{prefix}vectors.{pname}.indices"
            if key in state:
                vectors.setdefault(name, {})[pname] = state[key].long().cpu()
    return _assemble(structured, sparse, vectors, all_units)
