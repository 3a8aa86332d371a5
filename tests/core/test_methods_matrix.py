"""Every method x every toy model x every lifecycle invariant of DESIGN.md.

A method joins by registering (``list_methods()`` drives the matrix) and by one entry in ``CASES``: how to
build its config on each toy model (``None``: the method does not apply there) and its parameter-count
formula. No test below knows about any particular method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import attention_children, base_modules
from modalpeft.pointcloud.methods.point_peft import point_peft_parameters
from modalpeft.pointcloud.methods.pointgst import pcsa_parameters
from modalpeft.vision.methods.spt import compute_sensitivity, select

from .toy_models import TOY_MODELS, make

ATOL = 1e-5


def _targets(model: nn.Module, names: list[str]) -> list[nn.Module]:
    return [m for n, m in base_modules(model) if any(n == t or n.endswith("." + t) for t in names)]


def bitfit_count(model: nn.Module, cfg: Any) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.rsplit(".", 1)[-1] in ("bias", "in_proj_bias") and not n.startswith("head.")
    )


def adapter_count(model: nn.Module, cfg: Any) -> int:
    m = cfg.bottleneck_dim
    return sum(2 * t.out_features * m + m + t.out_features for t in _targets(model, cfg.target_modules))


def krona_count(model: nn.Module, cfg: Any) -> int:
    return sum(
        cfg.a1 * cfg.a2 + (t.out_features // cfg.a1) * (t.in_features // cfg.a2)
        for t in _targets(model, cfg.target_modules)
    )


def lora_count(model: nn.Module, cfg: Any) -> int:
    total = 0
    for t in _targets(model, cfg.target_modules):
        if isinstance(t, nn.Conv2d):
            total += cfg.r * t.in_channels * t.kernel_size[0] * t.kernel_size[1] + t.out_channels * cfg.r
        else:
            total += cfg.r * (t.in_features + t.out_features)
    return total


def lokr_count(model: nn.Module, cfg: Any) -> int:
    total = 0
    for t in _targets(model, cfg.target_modules):
        out_l, out_k = factorization(t.out_features, cfg.decompose_factor)
        in_m, in_n = factorization(t.in_features, cfg.decompose_factor)
        w2 = cfg.r * (out_k + in_n) if cfg.r < max(out_k, in_n) / 2 else out_k * in_n
        total += out_l * in_m + w2
    return total


def ln_count(model: nn.Module, cfg: Any) -> int:
    return sum(p.numel() for t in _targets(model, cfg.target_modules) for p in t.parameters())


def vpt_count(model: nn.Module, cfg: Any) -> int:
    return (len(model.blocks) if cfg.deep else 1) * cfg.num_tokens * model.embed_dim


def ssf_count(model: nn.Module, cfg: Any) -> int:
    """2 x the output channels of every Linear/Conv with a bias and every affine norm; the head and MHA internals
    are left out."""
    skip = attention_children(model)
    total = 0
    for n, m in base_modules(model):
        if n in skip or n == "head" or n.startswith("head.") or getattr(m, "bias", None) is None:
            continue
        if isinstance(m, nn.Linear):
            total += m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += m.out_channels
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            total += m.weight.numel()
    return 2 * total


_SPT = {"mlp": ((4, 16), 300), "vit": ((2, 3, 16, 16), 2000), "mha": ((2, 5, 16), 300)}  # input shape, budget


def spt_build(model: str, init: Any) -> Any:
    if model not in _SPT:
        return None  # conv: SPT tunes Linear weights/biases and LayerNorm vectors only
    shape, budget = _SPT[model]
    g = torch.Generator().manual_seed(0)  # the toy heads have 4 classes
    data = [(torch.randn(shape, generator=g), torch.randint(0, 4, shape[:1], generator=g)) for _ in range(2)]
    return mp.create_config("spt", init_weights=init, budget=budget, rank=4, batches=2, sensitivity_data=data)


def spt_count(model: nn.Module, cfg: Any) -> int:
    """The selection recomputed on the unadapted reference (same weights, same data, deterministic)."""
    return select(compute_sensitivity(model, cfg.sensitivity_data, cfg.batches), model, cfg).num_params


@dataclass
class Case:
    """How one method is built on each toy model, and its trainable-parameter formula (head excluded)."""

    build: Callable[[str, Any], Any]  # (toy model name, init) -> config, or None where it does not apply
    count: Callable[[nn.Module, Any], int]
    identity: Any = "identity"  # the init value that must leave outputs unchanged (None: no such init)
    random: Any = False  # the init value giving random non-zero adapters
    mergeable: bool = True
    peft: bool = False
    skip: set[str] = field(default_factory=set)


def native(name: str, per_model: dict[str, dict | None]) -> Callable[[str, Any], Any]:
    def build(model: str, init: Any) -> Any:
        kwargs = per_model.get(model)
        return None if kwargs is None else mp.create_config(name, init_weights=init, **kwargs)

    return build


def via_peft(cls: type, init_field: str | None, per_model: dict[str, dict | None]) -> Callable[[str, Any], Any]:
    def build(model: str, init: Any) -> Any:
        kwargs = per_model.get(model)
        if kwargs is None:
            return None
        return cls(**kwargs, **({init_field: init} if init_field else {}))

    return build


# the text toy (bert) joins only the text methods' cases: BitFit's key bias never changes under softmax there
ALL = {m: {} for m in TOY_MODELS if m != "bert"}


def pointgst_count(model: nn.Module, cfg: Any) -> int:
    """One PCSA per block, plus the class token and its position."""
    return len(model.blocks) * pcsa_parameters(model.embed_dim, cfg.rank) + 2 * model.embed_dim


POINT_PEFT = {"top_k": 3, "prompt_blocks": 1, "num_anchors": 8, "num_neighbors": 4}


def point_peft_build(model: str, init: Any) -> Any:
    """Point-PEFT on the point transformer, its memory bank from two batches of random clouds."""
    if model != "points":
        return None
    g = torch.Generator().manual_seed(1)
    memory = [(torch.randn(4, 128, 3, generator=g), torch.arange(4) % 4) for _ in range(2)]
    return mp.create_config("point_peft", init_weights=init, memory_data=memory, **POINT_PEFT)


def point_peft_count(model: nn.Module, cfg: Any) -> int:
    return point_peft_parameters(model.embed_dim, len(model.blocks), cfg)


def text_bottleneck_count(model: nn.Module, cfg: Any) -> int:
    """Per block of the tiny BERT (d = 32): dense adapters 2·d·r + r + d, PHM adapters (rank 1)
    (d + r + r) + (r + d + d) and one n³ rule; plus every LayerNorm (weight + bias) when they train."""
    d, layers = 32, 2
    per_block = {"houlsby": 2, "pfeiffer": 1, "parallel_adapter": 1, "compacter": 2}[cfg.method]
    if cfg.method == "compacter":
        r = d // cfg.reduction_factor
        adapters = per_block * layers * ((d + r + r) + (r + d + d)) + cfg.phm_n**3
    else:
        r = cfg.bottleneck_dim
        adapters = per_block * layers * (2 * d * r + r + d)
    norms = sum(2 * m.normalized_shape[0] for _, m in base_modules(model) if isinstance(m, nn.LayerNorm))
    return adapters + (norms if cfg.train_layer_norms else 0)


def llm_adapters_count(model: nn.Module, cfg: Any) -> int:
    """No biases: mh_adapter on an expanding Linear 2·d_in·r, output_adapter 2·d_out·r (series)."""
    total = 0
    for t in _targets(model, cfg.target_modules):
        total += 2 * (t.in_features if t.out_features > t.in_features else t.out_features) * cfg.bottleneck_dim
    return total


def sora_count(model: nn.Module, cfg: Any) -> int:
    """r·(d_in + d_out) + r gate entries on every Linear inside the encoder's blocks."""
    return sum(
        cfg.rank * (m.in_features + m.out_features + 1)
        for n, m in base_modules(model)
        if n.startswith("encoder.encoder.layer.") and isinstance(m, nn.Linear)
    )


def lofit_count(model: nn.Module, cfg: Any) -> int:
    return len(cfg.heads) * 32 // 4


CASES: dict[str, Case] = {
    "bitfit": Case(native("bitfit", ALL), bitfit_count),
    "adapter": Case(
        native(
            "adapter",
            {
                "mlp": {"style": "houlsby", "bottleneck_dim": 4, "target_modules": ["fc2"]},
                "vit": {"style": "houlsby", "bottleneck_dim": 4, "target_modules": ["attn.proj", "mlp.fc2"]},
                "mha": {"style": "pfeiffer", "bottleneck_dim": 4, "target_modules": ["linear2"]},
                "conv": None,
            },
        ),
        adapter_count,
        mergeable=False,
    ),
    "krona": Case(
        native(
            "krona",
            {
                "mlp": {"a1": 4, "a2": 4, "target_modules": ["fc1", "fc2"]},
                "vit": {"a1": 4, "a2": 4, "target_modules": ["qkv", "fc1"]},
                "mha": {"a1": 4, "a2": 4, "target_modules": ["linear1", "linear2"]},
                "conv": None,
            },
        ),
        krona_count,
    ),
    "vpt": Case(
        native("vpt", {"vit": {"num_tokens": 3, "deep": True}, "mlp": None, "conv": None, "mha": None}),
        vpt_count,
        identity=None,
        mergeable=False,
    ),
    "ssf": Case(native("ssf", ALL), ssf_count),
    "spt": Case(spt_build, spt_count),
    "peft:lora": Case(
        via_peft(
            peft.LoraConfig,
            "init_lora_weights",
            {
                "mlp": {"r": 2, "target_modules": ["fc1", "fc2"]},
                "vit": {"r": 2, "target_modules": ["qkv"]},
                "mha": {"r": 2, "target_modules": ["linear1"]},
                "conv": {"r": 2, "target_modules": ["conv1", "conv2"]},
            },
        ),
        lora_count,
        identity=True,
        peft=True,
    ),
    "peft:lokr": Case(
        via_peft(
            peft.LoKrConfig,
            "init_weights",
            {
                "mlp": {"r": 2, "target_modules": ["fc1", "fc2"]},
                "vit": {"r": 2, "target_modules": ["qkv"]},
                "mha": {"r": 2, "target_modules": ["linear1"]},
                "conv": None,
            },
        ),
        lokr_count,
        identity=True,
        peft=True,
    ),
    "peft:ln_tuning": Case(
        via_peft(
            peft.LNTuningConfig,
            None,
            {
                "mlp": {"target_modules": ["norm"]},
                "vit": {"target_modules": ["norm1", "norm2"]},
                # peft's LNTuningLayer hides LayerNorm attributes (eps) that nn.TransformerEncoderLayer reads
                "mha": None,
                "conv": None,
            },
        ),
        ln_count,
        identity=True,
        random=True,
        peft=True,
    ),
    # point-transformer methods: PointGST's spectral bases need group centres, Point-PEFT a memory bank
    "pointgst": Case(native("pointgst", {"points": {"rank": 4, "local_size": 4}}), pointgst_count, mergeable=False),
    "point_peft": Case(point_peft_build, point_peft_count, identity=None, mergeable=False),
    # text methods on the tiny transformers BERT (blocks found by structure); counts from the spec's shapes (§9f)
    "houlsby": Case(native("houlsby", {"bert": {"bottleneck_dim": 4}}), text_bottleneck_count, mergeable=False),
    "pfeiffer": Case(native("pfeiffer", {"bert": {"bottleneck_dim": 4}}), text_bottleneck_count, mergeable=False),
    "parallel_adapter": Case(
        native("parallel_adapter", {"bert": {"bottleneck_dim": 4, "scaling": 2.0}}),
        text_bottleneck_count,
        mergeable=False,
    ),
    "compacter": Case(
        native("compacter", {"bert": {"reduction_factor": 4, "phm_n": 4}}), text_bottleneck_count, mergeable=False
    ),
    "llm_adapters": Case(
        native(
            "llm_adapters", {"bert": {"bottleneck_dim": 4, "target_modules": ["intermediate.dense", "output.dense"]}}
        ),
        llm_adapters_count,
        identity=None,
        mergeable=False,
    ),
    "sora": Case(native("sora", {"bert": {"rank": 2}}), sora_count),
    # LoFiT's bias stage on heads of both layers: K·d_h with d_h = 32 / 4
    "lofit": Case(native("lofit", {"bert": {"stage": "bias", "heads": [[0, 1], [1, 0], [1, 3]]}}), lofit_count),
}


def test_every_registered_method_has_a_case() -> None:
    missing = sorted(set(mp.list_methods()) - set(CASES))
    assert not missing, f"add these methods to CASES in {__file__}: {missing}"


PARAMS = [
    pytest.param(method, model, id=f"{method}-{model}")
    for method in sorted(CASES)
    if CASES[method].peft or method in mp.list_methods()
    for model in TOY_MODELS
    if CASES[method].build(model, CASES[method].random) is not None
]


def adapted(method: str, model_name: str, init: Any, save_head: bool = True) -> tuple[nn.Module, mp.AdaptedModel]:
    base = make(model_name)
    reference = copy.deepcopy(base)
    model = mp.adapt(base, CASES[method].build(model_name, init), modules_to_save=["head"] if save_head else None)
    return reference, model


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def module_types(model: nn.Module) -> list[str]:
    return [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_identity_at_init(method: str, model_name: str) -> None:
    case = CASES[method]
    if case.identity is None:
        pytest.skip("no identity init")
    reference, model = adapted(method, model_name, case.identity)
    x = reference.make_input()
    torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_trainable_count_matches_formula(method: str, model_name: str) -> None:
    case = CASES[method]
    reference, model = adapted(method, model_name, case.random)
    config = case.build(model_name, case.random)
    head = sum(p.numel() for p in reference.head.parameters())
    assert model.trainable_summary()["trainable"] == case.count(reference, config) + head


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_only_adapter_and_saved_modules_train(method: str, model_name: str) -> None:
    case = CASES[method]
    base = make(model_name)
    base_params = {id(p): n for n, p in base.named_parameters()}
    head_ids = {id(p) for p in base.head.parameters()}
    frozen = [(n, p, p.detach().clone()) for n, p in base.named_parameters() if id(p) not in head_ids]
    model = mp.adapt(base, case.build(model_name, case.random), modules_to_save=["head"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrong = [base_params[id(p)] for p in trainable if id(p) in base_params and id(p) not in head_ids]
    assert not wrong, f"frozen base parameters were made trainable: {wrong}"
    assert {id(p) for p in trainable} >= head_ids
    starts = [p.detach().clone() for p in trainable]
    train_steps(model, model.make_input())
    for n, p, start in frozen:
        torch.testing.assert_close(p, start, atol=0, rtol=0, msg=f"frozen {n} changed")
    unchanged = sum(torch.equal(p, s) for p, s in zip(trainable, starts, strict=True))
    assert unchanged == 0, f"{unchanged} trainable tensors did not change"


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_disable_adapters_gives_base_output(method: str, model_name: str) -> None:
    reference, model = adapted(method, model_name, CASES[method].random, save_head=False)
    x = reference.make_input()
    train_steps(model, x)
    assert not torch.allclose(model(x), reference(x), atol=ATOL), "the trained adapter should change the output"
    with model.disable_adapters():
        torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=0)
    assert not torch.allclose(model(x), reference(x), atol=ATOL)


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_save_then_load_gives_identical_outputs(method: str, model_name: str, tmp_path) -> None:
    reference, model = adapted(method, model_name, CASES[method].random)
    train_steps(model, reference.make_input())
    x = reference.make_input()
    expected = model(x)
    model.save_adapter(tmp_path / "adapter")
    loaded = mp.load_adapter(make(model_name, seed=0), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=0)
    assert loaded.trainable_summary()["trainable"] == 0
    trainable = mp.load_adapter(make(model_name, seed=0), tmp_path / "adapter", is_trainable=True)
    assert trainable.trainable_summary()["trainable"] == model.trainable_summary()["trainable"]


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_merge_is_exact_and_unmerge_restores(method: str, model_name: str) -> None:
    case = CASES[method]
    reference, model = adapted(method, model_name, case.random)
    x = reference.make_input()
    expected = model(x)
    if not case.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_and_unload()
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # left as it was
        return
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=1e-5)
    assert module_types(merged) == module_types(reference), "merge_and_unload must give the base's modules"
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(("method", "model_name"), [p for p in PARAMS if CASES[p.values[0]].mergeable])
def test_unmerge_restores_base_weights(method: str, model_name: str) -> None:
    reference, model = adapted(method, model_name, CASES[method].random)
    inner = model.base_model
    before = {n: p.detach().clone() for n, p in inner.named_parameters() if not p.requires_grad}
    model.merge_adapter()
    model.unmerge_adapter()
    for n, p in inner.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=ATOL, rtol=1e-5, msg=f"{n} not restored")


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_unload_gives_the_base_model_back(method: str, model_name: str) -> None:
    reference, model = adapted(method, model_name, CASES[method].random)
    x = reference.make_input()
    base = model.unload()
    assert module_types(base) == module_types(reference)
    torch.testing.assert_close(base(x), reference(x), atol=ATOL, rtol=0)
