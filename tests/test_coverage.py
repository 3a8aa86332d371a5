"""CONTRIBUTING's promise, driven by the registry: every registered method has a recipe and a benchmark entry."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest
import yaml

import modalpeft as mp
import modalpeft.audio  # noqa: F401  (registers the audio methods)
import modalpeft.diffusion  # noqa: F401  (registers the diffusion methods)
import modalpeft.pointcloud  # noqa: F401  (registers the point-cloud methods)
import modalpeft.text  # noqa: F401  (registers the text methods)
import modalpeft.tracking  # noqa: F401  (registers the tracking methods)
import modalpeft.vision  # noqa: F401  (registers the vision methods)
from benchmarks import audio, diffusion, pointcloud, run, text, tracking

ROOT = Path(__file__).resolve().parents[1]
PENDING: dict[str, str] = {}
"""Methods landed ahead of their modality's task: their recipe and benchmark checks are strict xfails, so the entry
must go (and the check then holds) as soon as the recipe or benchmark exists."""
METHODS = [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=PENDING[m])) if m in PENDING else m
    for m in mp.list_methods()
]


@functools.cache
def recipe_methods() -> dict[str, list[str]]:
    """Registered method name -> the recipes whose adapter is that method's config (by ``class_path``)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        adapter = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args", {}).get("adapter")
        if not isinstance(adapter, dict):
            continue  # a baseline ("full", "linear") or no adapter
        module, _, name = adapter["class_path"].rpartition(".")
        method = getattr(getattr(importlib.import_module(module), name), "method", None)
        if method is not None:
            found.setdefault(method, []).append(path.relative_to(ROOT).as_posix())
    return found


def test_methods_are_registered() -> None:
    assert {"bitfit", "adapter", "krona", "ssf", "vpt", "spt", "pointgst", "point_peft"} <= set(mp.list_methods())
    assert set(PENDING) <= set(mp.list_methods())


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_method_has_a_recipe(method) -> None:
    modality = mp.get_method(method).modality
    assert method in recipe_methods(), (
        f"method {method!r} ({modality}) has no recipe: add recipes/<modality>/<backbone>_{method}_<dataset>.yaml "
        "with the header of CONTRIBUTING.md's step 4"
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_method_is_benchmarked(method) -> None:
    modality = mp.get_method(method).modality
    if modality in ("core", "vision"):
        assert method in run.vit_settings(32, (3, 16, 16)), f"add {method!r} to vit_settings in benchmarks/run.py"
    elif modality == "pointcloud":
        names = {c.name for c in pointcloud.candidates("point_mae_test", 2)}
        assert method in names, f"add {method!r} to the candidates of benchmarks/pointcloud.py"
        assert all(method in preset for preset in pointcloud.MODELS.values()), "settings for every model in MODELS"
    elif modality == "text":
        assert method in {c.name for c in text.candidates("bert_test")}, f"add {method!r} to benchmarks/text.py"
    elif modality == "diffusion":
        names = {c.name for c in diffusion.candidates("unet_test")}
        assert method in names, f"add {method!r} to the candidates of benchmarks/diffusion.py"
    elif modality == "tracking":
        names = {c.name for c in tracking.candidates("tracker_test")}
        assert method in names, f"add {method!r} to the candidates of benchmarks/tracking.py"
    elif modality == "audio":
        assert method in {c.name for c in audio.candidates("musicgen_test")}, f"add {method!r} to benchmarks/audio.py"
    else:
        pytest.fail(f"method {method!r} of modality {modality!r} has no benchmark: add one to benchmarks/")
