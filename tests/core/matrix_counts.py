"""The matrix's trainable-parameter formulas, one per method: ``count(reference, adapted, config)``, head excluded.

Each is written from the shapes in the spec (METHODS.md, the papers, peft's layer shapes), never by
calling the method's own counting code. ``reference`` is the unadapted toy model; ``adapted`` serves methods
whose structure depends on data (SPT): their count is read from the structure the adapter recorded.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lokr.layer import factorization
from torch import nn

from modalpeft.core.inject import attention_children, base_modules


def _targets(model: nn.Module, names: list[str]) -> list[nn.Module]:
    return [m for n, m in base_modules(model) if any(n == t or n.endswith("." + t) for t in names)]


def bitfit(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    return sum(
        p.numel()
        for n, p in reference.named_parameters()
        if n.rsplit(".", 1)[-1] in ("bias", "in_proj_bias") and not n.startswith("head.")
    )


def adapter(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Per adapted module of width d: down ``d·m + m``, up ``m·d + d``, a LayerNorm ``2d``, a learnable scale 1."""
    m, extra = cfg.bottleneck_dim, (1 if cfg.scaling == "learnable" else 0)
    norm = 2 if cfg.layer_norm != "none" else 0
    return sum(
        2 * d * m + m + d + norm * d + extra for d in (t.out_features for t in _targets(reference, cfg.target_modules))
    )


def krona(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    return sum(
        cfg.a1 * cfg.a2 + (t.out_features // cfg.a1) * (t.in_features // cfg.a2)
        for t in _targets(reference, cfg.target_modules)
    )


def diffusekrona(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §6: ``a1·a2 + (d_out/a1)·(d_in/a2)`` per target; default targets ``attn1``/``attn2``'s
    ``to_q``, ``to_k``, ``to_v``, ``to_out.0``."""
    names = cfg.target_modules or [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    return sum(
        cfg.a1 * cfg.a2 + (t.out_features // cfg.a1) * (t.in_features // cfg.a2) for t in _targets(reference, names)
    )


def lora(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    total = 0
    for t in _targets(reference, cfg.target_modules):
        if isinstance(t, nn.Conv2d):
            total += cfg.r * t.in_channels * t.kernel_size[0] * t.kernel_size[1] + t.out_channels * cfg.r
        else:
            total += cfg.r * (t.in_features + t.out_features)
    return total


def lokr(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    total = 0
    for t in _targets(reference, cfg.target_modules):
        out_l, out_k = factorization(t.out_features, cfg.decompose_factor)
        in_m, in_n = factorization(t.in_features, cfg.decompose_factor)
        w2 = cfg.r * (out_k + in_n) if cfg.r < max(out_k, in_n) / 2 else out_k * in_n
        total += out_l * in_m + w2
    return total


def ln_tuning(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    return sum(p.numel() for t in _targets(reference, cfg.target_modules) for p in t.parameters())


def vpt(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    return (len(reference.blocks) if cfg.deep else 1) * cfg.num_tokens * reference.embed_dim


def ssf(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """2 x the output channels of every Linear/Conv with a bias and every affine norm (LayerNorm, GroupNorm,
    BatchNorm); the head and MHA internals are left out."""
    skip = attention_children(reference)
    total = 0
    for n, m in base_modules(reference):
        if n in skip or n == "head" or n.startswith("head.") or getattr(m, "bias", None) is None:
            continue
        if isinstance(m, nn.Linear):
            total += m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += m.out_channels
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            total += m.weight.numel()
    return 2 * total


def spt(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §3 over the selection the adapter recorded (its saved row ranges and indices; the selection is
    not run again): a LoRA on rows ``[s, e)`` of a Linear ``d_in -> d_out`` costs ``r·(d_in + e − s)``, an adapter
    ``2·r·(e − s) + r + (e − s)``; each sparse weight entry and each tuned vector entry costs 1."""
    r, total = cfg.rank, 0
    for key, value in adapted.adapter_state_dict().items():
        if key.endswith(".adapters.structured_rows"):
            d_in = reference.get_submodule(key.split(".adapters.")[0]).in_features
            for s, e in value.tolist():
                total += r * (d_in + e - s) if cfg.structured == "lora" else 2 * r * (e - s) + r + (e - s)
        elif ".adapters." in key and key.endswith(".indices"):  # sparse (2, n), vector (n,)
            total += value.shape[-1]
    return total


def pointgst(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §4: one PCSA per block, ``down`` C→r ``Cr + r``, ``adapt1`` r→r ``r² + r`` (shared by both
    branches), ``LN1`` and ``LN2`` ``2r`` each, ``up`` r→C ``rC + C`` (29,544 at C=384, r=36); the class token and
    its position ``2C``."""
    c, r = reference.embed_dim, cfg.rank
    pcsa = (c * r + r) + (r * r + r) + 2 * (2 * r) + (r * c + c)
    return len(reference.blocks) * pcsa + (2 * c if cfg.tune_class_token else 0)


BIASES = ("proj", "fc1", "fc2", "norm1", "norm2")  # the bias-tuned modules of a block, by their last name


def point_peft(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §5 (d)/(f) at this width C, without what the official code allocates but never uses (the prompts
    and cp_adapters past ``prompt_blocks``, the gates, ``prompt_cor``; see point_peft.py). Per block: the MLP
    adapter and ``adapter1`` (C→m→C, ``2Cm + m + C`` each), the ``out_transform`` BatchNorm ``2C``, the proj, fc1,
    fc2, norm1, norm2 biases; per prompted block: ``(top_k + 2)·C`` prompts and the C→m'→C ``cp_adapter``; shared:
    the local attention (qkv C→3hd without bias, proj hd→C) and its LayerNorm, the final LayerNorm (with the bias
    tuning), the class token and its position."""
    c, hd = reference.embed_dim, cfg.local_heads * cfg.local_head_dim

    def bottleneck(m: int) -> int:
        return 2 * c * m + m + c

    blocks = list(reference.blocks)
    total = len(blocks) * (2 * bottleneck(cfg.bottleneck_dim) + 2 * c)
    if cfg.bias_tuning:
        total += sum(m.bias.numel() for b in blocks for n, m in b.named_modules() if n.rsplit(".")[-1] in BIASES)
        total += 2 * c
    total += min(cfg.prompt_blocks, len(blocks)) * ((cfg.top_k + 2) * c + bottleneck(cfg.cache_bottleneck_dim))
    total += 3 * hd * c + (hd * c + c) + 2 * c
    return total + (2 * c if cfg.tune_class_token else 0)


def tmoe(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §7a: per Linear ``d_in -> d_out``, A ``r·d_in``, E experts B_i ``E·d_out·r``, the router ``E·d_in``
    (+ ``d_out·r`` for the shared expert); a ``qkv`` split into q, k, v counts three Linears ``d_in -> d_out/3``.
    Default targets: the Linears under an integer-indexed module (the ViT's blocks)."""
    r, e = cfg.rank, cfg.num_experts

    def experts(d_in: int, d_out: int) -> int:
        return r * d_in + e * d_out * r + e * d_in + (d_out * r if cfg.shared_expert else 0)

    if cfg.target_modules is None:
        linears = [(n, m) for n, m in base_modules(reference) if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    else:
        linears = [(n, m) for n, m in base_modules(reference) if m in _targets(reference, cfg.target_modules)]
    total = 0
    for name, m in linears:
        if cfg.split_qkv and name.endswith(".qkv"):
            total += 3 * experts(m.in_features, m.out_features // 3)
        else:
            total += experts(m.in_features, m.out_features)
    return total


def text(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """The bottleneck family on the tiny BERT (d = 32, 2 blocks): dense adapters ``2·d·r + r + d`` (spec §9f), at
    2 places per block (houlsby, compacter) or 1; Compacter's rank-1 PHM adapters ``(d + r + r) + (r + d + d)`` plus
    one ``n³`` rule; every LayerNorm (weight + bias) when they train."""
    d, layers = 32, 2
    per_block = {"houlsby": 2, "pfeiffer": 1, "parallel_adapter": 1, "compacter": 2}[cfg.method]
    if cfg.method == "compacter":
        r = d // cfg.reduction_factor
        adapters = per_block * layers * ((d + r + r) + (r + d + d)) + cfg.phm_n**3
    else:
        r = cfg.bottleneck_dim
        adapters = per_block * layers * (2 * d * r + r + d)
    norms = sum(2 * m.normalized_shape[0] for _, m in base_modules(reference) if isinstance(m, nn.LayerNorm))
    return adapters + (norms if cfg.train_layer_norms else 0)


def llm_adapters(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """No biases: an input-side adapter on an expanding Linear ``2·d_in·r``, an output-side one ``2·d_out·r``."""
    return sum(
        2 * (t.in_features if t.out_features > t.in_features else t.out_features) * cfg.bottleneck_dim
        for t in _targets(reference, cfg.target_modules)
    )


def sora(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """``r·(d_in + d_out) + r`` gate entries on every Linear inside the transformer blocks (spec §7f)."""
    return sum(
        cfg.rank * (m.in_features + m.out_features + 1)
        for n, m in base_modules(reference)
        if n.startswith("encoder.encoder.layer.") and isinstance(m, nn.Linear)
    )


def lofit(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Bias stage: ``K·d_h`` (spec §3f), d_h = 32 / 4 heads in the tiny BERT."""
    return len(cfg.heads) * 32 // 4


def dept(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """``m·d + L_max·r + r·d`` (spec §2f), d = 32 in the tiny BERT."""
    return cfg.num_tokens * 32 + cfg.max_length * cfg.rank + cfg.rank * 32


def mam(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Parallel adapters ``2·d·r + r + d`` per block plus peft's prefix encoder, ``l·d + (d·h + h) + (h·2Ld + 2Ld)``
    with its MLP (h = prefix_hidden), on the tiny BERT (d = 32, L = 2)."""
    d, layers, r, n, h = 32, 2, cfg.bottleneck_dim, cfg.prefix_tokens, cfg.prefix_hidden
    return layers * (2 * d * r + r + d) + n * d + (d * h + h) + (h * 2 * layers * d + 2 * layers * d)


def factorized(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """SVFit and LoLDU (spec §4f, §5f): ``r`` per targeted Linear, ``min(d_in, d_out)`` when ``rank`` is None."""
    return sum(
        cfg.rank if cfg.rank is not None else min(t.in_features, t.out_features)
        for t in _targets(reference, cfg.target_modules)
    )


def neuroada(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Spec §13f: ``k · d_out`` per targeted Linear."""
    return sum(cfg.k * t.out_features for t in _targets(reference, cfg.target_modules))


def mtlora(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Spec §10f: ``r·(d_in + d_out) + r²`` per Linear (SHIM, ICFM), ``+ 2r²`` (CTCM, DTSM)."""
    square = (2 if cfg.structure in ("CTCM", "DTSM") else 1) * cfg.rank**2
    return sum(cfg.rank * (t.in_features + t.out_features) + square for t in _targets(reference, cfg.target_modules))


def paca(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Spec §8f: ``r · d_out`` per targeted Linear."""
    return sum(cfg.rank * t.out_features for t in _targets(reference, cfg.target_modules))


def increlora(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """Spec §11f over the capacity allocated up front: ``(max_rank + pieces per growth) · (d_in + d_out + 1)`` per
    Linear; the official pieces per growth for an average target rank are {2: 1, 4: 2, 6: 3, 8: 4}."""
    pieces = cfg.incre_rank_num or {2: 1, 4: 2, 6: 3, 8: 4}[cfg.target_rank]
    return sum(
        (cfg.max_rank + pieces) * (t.in_features + t.out_features + 1) for t in _targets(reference, cfg.target_modules)
    )


def music_adapter(reference: nn.Module, adapted: nn.Module, cfg: Any) -> int:
    """METHODS.md §9 / the paper's designs, per adapted block of width d, bottleneck m: down and up ``2·d·m + m + d``;
    conv: per dilated block ``k·m² + m`` and its 1x1 mix ``m² + m``, SE ``m·h + h + h·m + m`` (h = m // r);
    transformer: two LayerNorms ``4m``, qkv ``3m² + 3m``, out ``m² + m``, FFN ``m·f + f + f·m + m`` (f = ffn_mult·m).
    Default placement on the tiny MusicGen: after each of its decoder layers."""
    if cfg.target_modules is None:
        widths = [layer.fc2.out_features for layer in reference.decoder.model.decoder.layers]
    else:
        found = _targets(reference, cfg.target_modules)
        widths = [t.out_features if isinstance(t, nn.Linear) else t.linear2.out_features for t in found]
    m = cfg.bottleneck
    if cfg.kind == "conv":
        h = m // cfg.se_reduction
        stage = len(cfg.dilations) * (cfg.kernel_size * m * m + m + m * m + m) + (m * h + h + h * m + m)
    elif cfg.kind == "transformer":
        f = cfg.ffn_mult * m
        stage = 4 * m + (3 * m * m + 3 * m) + (m * m + m) + (m * f + f + f * m + m)
    else:
        stage = 0
    return sum(2 * d * m + m + d + stage for d in widths)
