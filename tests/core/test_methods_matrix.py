"""Every method x every toy model x every lifecycle invariant of DESIGN.md.

A method joins by registering (``list_methods()`` drives the matrix, and its registry flags ``mergeable`` and
``modality`` are checked against what it does) and by one entry in ``CASES``, a :class:`Case`:

- ``build(toy, init)``: its config on each toy model of ``TOY_MODELS`` (``None``: it does not apply there). Give
  non-trivial settings: a scale other than 1, a rank other than the default, dropout on where the method has them
  (training runs in train mode, so dropout and BatchNorm statistics are exercised; exactness checks run in eval
  mode).
- ``count(reference, adapted, config)``: its trainable-parameter count, head excluded, written from the shapes
  in the spec and never by calling the method's own code (the formulas live in ``matrix_counts.py``).
  ``reference`` is the unadapted toy; ``adapted`` serves data-dependent methods (SPT), whose count is read from
  the structure the adapter recorded.
- ``identity`` / ``random``: the ``init_weights`` values that leave the outputs unchanged (``None``: none does) /
  that give random non-zero adapters.
- ``peft=True`` for peft's methods, which are not in the registry; they alone say ``mergeable`` here.

No test below knows about any particular method.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.registry import get_method

from . import matrix_counts as counts
from .toy_models import MODALITY, TOY_MODELS, make

ATOL = 1e-5


@dataclass
class Case:
    """One method's row (see the module docstring)."""

    build: Callable[[str, Any], Any]  # (toy name, init) -> config, or None where the method does not apply
    count: Callable[[nn.Module, nn.Module, Any], int]  # (reference, adapted, config) -> trainable count, no head
    identity: Any = "identity"  # the init leaving outputs unchanged (None: none does)
    random: Any = False  # the init giving random non-zero adapters
    peft: bool = False  # a peft method (not in the registry)
    mergeable: bool | None = None  # peft methods only; native methods' flag is the registry's


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


# the text toy (bert) and the audio toy (musicgen) join only their modality's cases: BitFit's key bias never
# changes under softmax there
ALL = {m: {} for m in TOY_MODELS if m not in ("bert", "musicgen")}
_SPT = {"mlp": ((4, 16), 300), "vit": ((2, 3, 16, 16), 2000), "mha": ((2, 5, 16), 300)}  # input shape, budget


def spt_build(model: str, init: Any) -> Any:
    if model not in _SPT:
        return None  # conv: SPT tunes Linear weights/biases and LayerNorm vectors only
    shape, budget = _SPT[model]
    g = torch.Generator().manual_seed(0)  # the toy heads have 4 classes
    data = [(torch.randn(shape, generator=g), torch.randint(0, 4, shape[:1], generator=g)) for _ in range(2)]
    return mp.create_config(
        "spt", init_weights=init, budget=budget, rank=3, batches=2, dropout=0.2, drop_path=0.2, sensitivity_data=data
    )


POINT_PEFT = dict(top_k=3, prompt_blocks=1, num_anchors=8, num_neighbors=4, bottleneck_dim=6, cache_bottleneck_dim=3)
POINT_PEFT.update(local_heads=2, local_head_dim=5, adapter_scaling=1.5, geo_scaling=0.6)


def point_peft_build(model: str, init: Any) -> Any:
    """Point-PEFT on the point transformer (one of its two blocks prompted), its memory bank from random clouds."""
    if model != "points":
        return None
    g = torch.Generator().manual_seed(1)
    memory = [(torch.randn(4, 128, 3, generator=g), torch.arange(4) % 4) for _ in range(2)]
    return mp.create_config("point_peft", init_weights=init, memory_data=memory, **POINT_PEFT)


CASES: dict[str, Case] = {
    "bitfit": Case(native("bitfit", ALL), counts.bitfit),
    "adapter": Case(
        native(
            "adapter",
            {
                "mlp": {
                    "style": "houlsby",
                    "bottleneck_dim": 4,
                    "target_modules": ["fc2"],
                    "scaling": 0.5,
                    "dropout": 0.2,
                },
                "vit": {
                    "style": "houlsby",
                    "bottleneck_dim": 3,
                    "target_modules": ["attn.proj", "mlp.fc2"],
                    "scaling": "learnable",
                    "layer_norm": "in",
                },
                "mha": {
                    "style": "pfeiffer",
                    "bottleneck_dim": 5,
                    "target_modules": ["linear2"],
                    "scaling": 2.0,
                    "layer_norm": "out",
                },
            },
        ),
        counts.adapter,
    ),
    "krona": Case(
        native(
            "krona",
            {
                "mlp": {"a1": 4, "a2": 4, "target_modules": ["fc1", "fc2"], "scaling": 0.5, "dropout": 0.2},
                "vit": {"a1": 2, "a2": 8, "target_modules": ["qkv", "fc1"], "scaling": 2.0},
                "mha": {"a1": 8, "a2": 2, "target_modules": ["linear1", "linear2"], "scaling": 3.0},
            },
        ),
        counts.krona,
    ),
    "vpt": Case(native("vpt", {"vit": {"num_tokens": 3, "deep": True, "dropout": 0.2}}), counts.vpt, identity=None),
    "ssf": Case(native("ssf", ALL), counts.ssf),
    "spt": Case(spt_build, counts.spt),
    "peft:lora": Case(
        via_peft(
            peft.LoraConfig,
            "init_lora_weights",
            {
                "mlp": {"r": 2, "lora_alpha": 5, "lora_dropout": 0.2, "target_modules": ["fc1", "fc2"]},
                "vit": {"r": 3, "lora_alpha": 1, "target_modules": ["qkv"]},
                "mha": {"r": 2, "lora_alpha": 6, "target_modules": ["linear1"]},
                "conv": {"r": 2, "lora_alpha": 3, "target_modules": ["conv1", "conv2"]},
            },
        ),
        counts.lora,
        identity=True,
        peft=True,
        mergeable=True,
    ),
    "peft:lokr": Case(
        via_peft(
            peft.LoKrConfig,
            "init_weights",
            {
                "mlp": {"r": 2, "alpha": 5, "rank_dropout": 0.2, "target_modules": ["fc1", "fc2"]},
                "vit": {"r": 3, "alpha": 1, "decompose_factor": 4, "target_modules": ["qkv"]},
                "mha": {"r": 2, "alpha": 6, "target_modules": ["linear1"]},
            },
        ),
        counts.lokr,
        identity=True,
        peft=True,
        mergeable=True,
    ),
    "peft:ln_tuning": Case(
        via_peft(
            peft.LNTuningConfig,
            None,
            # mha: peft's LNTuningLayer hides LayerNorm attributes (eps) that nn.TransformerEncoderLayer reads
            {"mlp": {"target_modules": ["norm"]}, "vit": {"target_modules": ["norm1", "norm2"]}},
        ),
        counts.ln_tuning,
        identity=True,
        random=True,
        peft=True,
        mergeable=True,
    ),
    "diffusekrona": Case(
        native(
            "diffusekrona",
            {
                "unet": {"a1": 4, "a2": 2, "scale": 0.7},  # the official placement: attn1/attn2 q, k, v, out.0
                "mlp": {"a1": 8, "a2": 4, "target_modules": ["fc1", "fc2"], "layout": "kron", "scale": 2.0},
                "vit": {"a1": 4, "a2": 8, "target_modules": ["qkv", "attn.proj"], "scale": 0.5},
            },
        ),
        counts.diffusekrona,
    ),
    # point-transformer methods: PointGST's spectral bases need group centres, Point-PEFT a memory bank
    "pointgst": Case(native("pointgst", {"points": {"rank": 5, "local_size": 4, "scaling": 0.5}}), counts.pointgst),
    "point_peft": Case(point_peft_build, counts.point_peft, identity=None),
    # tracking: TMoE on the ViT (default placement, qkv split in three), and on the plain Linears of the others
    "tmoe": Case(
        native(
            "tmoe",
            {
                "vit": {"rank": 3, "num_experts": 3, "alpha": 6.0, "dropout": 0.2},
                "mlp": {
                    "rank": 2,
                    "num_experts": 2,
                    "alpha": 1.0,
                    "target_modules": ["fc1", "fc2"],
                    "shared_expert": True,
                },
                "mha": {"rank": 4, "num_experts": 5, "alpha": 2.0, "target_modules": ["linear1", "linear2"]},
            },
        ),
        counts.tmoe,
    ),
    # text methods on the tiny transformers BERT (blocks found by structure); counts from the spec's shapes
    "houlsby": Case(native("houlsby", {"bert": {"bottleneck_dim": 4, "scaling": 0.5, "dropout": 0.1}}), counts.text),
    "pfeiffer": Case(native("pfeiffer", {"bert": {"bottleneck_dim": 3, "scaling": 1.5, "dropout": 0.1}}), counts.text),
    "parallel_adapter": Case(
        native("parallel_adapter", {"bert": {"bottleneck_dim": 4, "scaling": 2.0, "dropout": 0.1}}), counts.text
    ),
    "compacter": Case(
        native("compacter", {"bert": {"reduction_factor": 4, "phm_n": 4, "scaling": 0.7, "dropout": 0.1}}),
        counts.text,
    ),
    "llm_adapters": Case(
        native(
            "llm_adapters",
            {"bert": {"bottleneck_dim": 5, "scaling": 1.5, "dropout": 0.1, "target_modules": ["intermediate.dense"]}},
        ),
        counts.llm_adapters,
        identity=None,
    ),
    "sora": Case(native("sora", {"bert": {"rank": 3, "alpha": 5.0, "dropout": 0.1}}), counts.sora),
    "lofit": Case(native("lofit", {"bert": {"stage": "bias", "heads": [[0, 1], [1, 0], [1, 3]]}}), counts.lofit),
    "mam": Case(
        native(
            "mam",
            {"bert": {"bottleneck_dim": 3, "scaling": 1.5, "dropout": 0.1, "prefix_tokens": 2, "prefix_hidden": 5}},
        ),
        counts.mam,
        identity=None,
    ),
    "dept": Case(
        native("dept", {"bert": {"num_tokens": 3, "rank": 2, "max_length": 9, "alpha": 5.0}}),
        counts.dept,
        identity=None,
    ),
    # issue 19: weight-space methods on any model with Linears
    "svfit": Case(
        native(
            "svfit",
            {
                "mlp": {"rank": 5, "target_modules": ["fc1", "fc2"]},
                "vit": {"target_modules": ["qkv", "attn.proj"]},  # full rank
                "mha": {"rank": 3, "target_modules": ["linear1", "linear2"]},
                "bert": {"rank": 7, "target_modules": ["query", "value"]},
            },
        ),
        counts.factorized,
    ),
    "loldu": Case(
        native(
            "loldu",
            {
                "mlp": {"rank": 4, "alpha": 2.0, "target_modules": ["fc1", "fc2"]},
                "vit": {"rank": 6, "alpha": 3.0, "target_modules": ["qkv", "fc1"]},
                "mha": {"alpha": 0.5, "target_modules": ["linear1"]},  # full rank
            },
        ),
        counts.factorized,
    ),
    "neuroada": Case(
        native(
            "neuroada",
            {
                "mlp": {"k": 3, "target_modules": ["fc1", "fc2"]},
                "vit": {"k": 2, "target_modules": ["qkv", "fc2"]},
                "mha": {"k": 32, "target_modules": ["linear1"]},  # k = the fan-in: every connection
                "bert": {"k": 1, "target_modules": ["query", "value", "intermediate.dense"]},
            },
        ),
        counts.neuroada,
    ),
    "mtlora": Case(
        native(
            "mtlora",
            {
                "mlp": {"structure": "SHIM", "rank": 3, "alpha": 6.0, "dropout": 0.2, "target_modules": ["fc1", "fc2"]},
                "vit": {"structure": "ICFM", "rank": 2, "alpha": 1.0, "target_modules": ["qkv", "fc1"]},
                "mha": {"structure": "CTCM", "rank": 4, "alpha": 2.0, "target_modules": ["linear1", "linear2"]},
                "bert": {
                    "structure": "DTSM",
                    "rank": 3,
                    "alpha": 5.0,
                    "dropout": 0.1,
                    "target_modules": ["query", "value"],
                },
            },
        ),
        counts.mtlora,
    ),
    "paca": Case(
        native(
            "paca",
            {
                "mlp": {"rank": 5, "alpha": 10.0, "target_modules": ["fc1", "fc2"]},
                "vit": {"rank": 3, "alpha": 1.0, "seed": 4, "target_modules": ["qkv", "fc2"]},
                "mha": {"rank": 32, "target_modules": ["linear1"]},  # every column
                "bert": {"rank": 2, "alpha": 0.5, "target_modules": ["query", "value", "output.dense"]},
            },
        ),
        counts.paca,
    ),
    "increlora": Case(
        native(
            "increlora",
            {
                "mlp": {
                    "init_rank": 1,
                    "target_rank": 2,
                    "max_rank": 3,
                    "alpha": 8.0,
                    "target_modules": ["fc1", "fc2"],
                },
                "vit": {"target_rank": 4, "max_rank": 4, "target_modules": ["qkv"], "dropout": 0.2},
                "mha": {"init_rank": 2, "target_rank": 2, "advance_learn": False, "target_modules": ["linear1"]},
                "bert": {"target_rank": 2, "incre_rank_num": 2, "target_modules": ["query", "value"]},
            },
        ),
        counts.increlora,
    ),
    # music adapters, one kind per toy: the transformer kind after the blocks of a tiny MusicGen decoder (causal),
    # the conv kind after a bidirectional torch encoder layer, the linear kind after a Linear
    "music_adapter": Case(
        native(
            "music_adapter",
            {
                "musicgen": {"kind": "transformer", "bottleneck": 8, "num_heads": 2, "ffn_mult": 2, "scaling": 1.5},
                "mha": {"kind": "conv", "bottleneck": 6, "target_modules": ["encoder"], "dilations": [1, 3]},
                "mlp": {"kind": "linear", "bottleneck": 5, "target_modules": ["fc2"], "scaling": 0.5},
            },
        ),
        counts.music_adapter,
    ),
}


def mergeable(method: str) -> bool:
    """The registry's flag for a native method; the table's for a peft one."""
    return bool(CASES[method].mergeable) if CASES[method].peft else get_method(method).mergeable


def test_every_registered_method_has_a_case() -> None:
    missing = sorted(set(mp.list_methods()) - set(CASES))
    assert not missing, f"add these methods to CASES in {__file__}: {missing}"
    copies = sorted(m for m, case in CASES.items() if not case.peft and case.mergeable is not None)
    assert not copies, f"native methods take `mergeable` from the registry, not from CASES: {copies}"


@pytest.mark.parametrize("method", mp.list_methods())
def test_registry_modality_is_where_the_method_lives_and_what_it_runs_on(method: str) -> None:
    info = get_method(method)
    assert info.apply.__module__.startswith(f"modalpeft.{info.modality}."), (info.modality, info.apply.__module__)
    importlib.import_module(f"modalpeft.{info.modality}")
    case = CASES[method]
    toys = [t for t in TOY_MODELS if case.build(t, case.random) is not None]
    assert any(info.modality == "core" or info.modality in MODALITY[t] for t in toys), (
        f"{method} runs on no {info.modality} toy"
    )


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
    """A few AdamW steps in train mode (dropout on, BatchNorm statistics updated); the model ends in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    target = torch.randn_like(model(x))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    model.eval()


def module_types(model: nn.Module) -> list[str]:
    return [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]


def batch_norm_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
    ]


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
    assert model.trainable_summary()["trainable"] == case.count(reference, model, config) + head


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
    base = copy.deepcopy(model).unload()  # the base as training left it (train mode updates BatchNorm statistics)
    assert not torch.allclose(model(x), base(x), atol=ATOL), "the trained adapter should change the output"
    with model.disable_adapters():
        torch.testing.assert_close(model(x), base(x), atol=ATOL, rtol=0)
    assert not torch.allclose(model(x), base(x), atol=ATOL)


@pytest.mark.parametrize(("method", "model_name"), PARAMS)
def test_save_then_load_gives_identical_outputs(method: str, model_name: str, tmp_path) -> None:
    reference, model = adapted(method, model_name, CASES[method].random)
    train_steps(model, reference.make_input())
    trained_base = copy.deepcopy(model).unload()
    for trained, start in zip(batch_norm_statistics(trained_base), batch_norm_statistics(reference), strict=True):
        assert not torch.equal(trained, start), "training in train mode should update every BatchNorm's statistics"
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
    reference, model = adapted(method, model_name, CASES[method].random)
    x = reference.make_input()
    expected = model(x)
    if not mergeable(method):
        types, state = module_types(model), {k: v.clone() for k, v in model.state_dict().items()}
        for merge in (model.merge_and_unload, model.merge_adapter):
            with pytest.raises(ValueError, match=r"cannot be merged: .* Keep the model unmerged, or call unload\(\)"):
                merge()
            assert module_types(model) == types  # left as it was
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
        return
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=1e-5)
    assert module_types(merged) == module_types(reference), "merge_and_unload must give the base's modules"
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(("method", "model_name"), [p for p in PARAMS if mergeable(p.values[0])])
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
