"""Imports go one way: ``core`` <- ``lightning`` <- modality packages <- ``recipes/`` (DESIGN.md).

Every ``.py`` file under ``modalpeft/`` is parsed with ``ast`` (nothing is imported), every import in it is
resolved to an absolute module name (relative imports included, lazy imports inside functions too), and
checked against the layer of the file:

- ``modalpeft.core`` imports no other modalpeft package;
- ``modalpeft.lightning`` imports ``core`` only;
- a modality package imports ``core`` and ``lightning``, never another modality, with one exception: a tracker
  is a vision model, so ``tracking`` may import ``vision`` (its backbones and transforms), never the reverse;
- the top-level modules (``modalpeft/__init__.py``, ``cli.py``, ``__main__.py``), the ``demo`` package, each
  modality's ``demo`` module (``modalpeft/<modality>/demo.py``: the demo section lives beside its package, and
  may compose modalities, e.g. the diffusion demo judges its samples with vision's frozen classifier) and
  ``recipes/`` are the application layer: they may import anything, and no package may import them (the
  root package itself, for ``__version__``, excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modalpeft"
MODALITIES = ("vision", "pointcloud", "diffusion", "tracking", "audio", "text")

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "lightning": {"core", "lightning"},
    **{m: {"core", "lightning", m} for m in MODALITIES},
}
ALLOWED["tracking"].add("vision")  # the one edge between modalities: trackers are built on vision's ViTs
"""For each layer below the application, the modalpeft layers its modules may import."""

APPLICATION_PACKAGES = {"demo"}
"""Subpackages of the application layer (they may import any modality)."""

APPLICATION_MODULES = {"demo"}
"""Modules of a modality package that belong to the application layer: the demo section lives beside its package
and may compose modalities; no library module imports it."""


def layer_of(module: str) -> str:
    """``"core"``, ``"lightning"``, a modality name, ``"root"`` (the package itself) or ``"app"``."""
    parts = module.split(".")
    assert parts[0] == "modalpeft", module
    if len(parts) == 1:
        return "root"
    if len(parts) == 3 and parts[1] in MODALITIES and parts[2] in APPLICATION_MODULES:
        return "app"
    if parts[1] in ALLOWED:
        return parts[1]
    return "app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import in ``source``, the file of ``module``.

    ``from X import y`` yields ``X.y`` when that is a module in ``known`` (``from modalpeft import vision``
    imports the vision package), else ``X``.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import goes above the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def violations(source: str, module: str, is_package: bool = False, known: set[str] | None = None) -> list[str]:
    """The imports in ``source`` (the file of ``module``) that break the import direction."""
    known = known if known is not None else set()
    here = layer_of(module)
    if here in ("app", "root"):
        return []
    bad = []
    for line, target in imported_modules(source, module, is_package, known):
        if target.split(".")[0] != "modalpeft":
            continue
        there = layer_of(target)
        if there == "root" or there in ALLOWED[here]:
            continue
        bad.append(f"{module}:{line} imports {target} ({here} may import modalpeft's {sorted(ALLOWED[here])} only)")
    return bad


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def known_modules() -> set[str]:
    return {module_name(p) for p in source_files()}


# -- the checker itself, on synthetic sources --------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "is_package", "source"),
    [
        ("modalpeft.core.model", False, "from ..vision import backbones"),
        ("modalpeft.core.model", False, "from modalpeft.lightning.task import AdapterTask"),
        ("modalpeft.core.model", False, "import modalpeft.pointcloud.data"),
        ("modalpeft.core.model", False, "from modalpeft import vision"),
        ("modalpeft.core.model", False, "from .. import cli"),
        ("modalpeft.core", True, "from ..diffusion import x"),
        ("modalpeft.core.methods.ssf", False, "def f():\n    from ...lightning import task\n"),
        ("modalpeft.lightning.task", False, "from ..vision.data import Digits"),
        ("modalpeft.lightning.task", False, "from modalpeft.demo import run_demo"),
        ("modalpeft.vision.tasks", False, "from modalpeft.pointcloud import PointTransformer"),
        ("modalpeft.vision.methods.vpt", False, "from ...audio.layers import x"),
        ("modalpeft.vision.backbones", False, "from ..tracking import TMoEConfig"),
        ("modalpeft.tracking.methods.tmoe", False, "from ...pointcloud import ops"),
        ("modalpeft.lightning.task", False, "import modalpeft.tracking"),
        ("modalpeft.diffusion.tasks", False, "from .demo import Demo"),
        ("modalpeft.vision.backbones", False, "from modalpeft.text.demo import run_text"),
    ],
)
def test_checker_flags_a_wrong_import(module: str, is_package: bool, source: str) -> None:
    known = {"modalpeft.vision", "modalpeft.cli", "modalpeft.lightning", "modalpeft.lightning.task"}
    assert len(violations(source, module, is_package, known)) == 1


@pytest.mark.parametrize(
    ("module", "is_package", "source"),
    [
        ("modalpeft.core.model", False, "from .. import __version__\nfrom .config import AdapterConfig"),
        ("modalpeft.core.methods.ssf", False, "from ..layers import ScaleShift\nimport torch"),
        ("modalpeft.core", True, "from .api import adapt\nfrom .methods import *"),
        ("modalpeft.lightning.task", False, "from ..core import adapt\nimport modalpeft.core.state"),
        ("modalpeft.vision.tasks", False, "from ..lightning import AdapterTask\nfrom ..core import adapt"),
        ("modalpeft.vision.methods.vpt", False, "from ..backbones import vit\nfrom ...core.layers import x"),
        ("modalpeft.cli", False, "from modalpeft import vision, pointcloud\nimport modalpeft.demo"),
        ("modalpeft", True, "from .core import *\nfrom . import vision"),
        ("modalpeft.tracking.models", False, "from ..vision.backbones import x\nfrom modalpeft.vision import y"),
        ("modalpeft.diffusion.demo", False, "from ..vision.backbones import fmnist_vit\nfrom .tasks import x"),
    ],
)
def test_checker_accepts_a_right_import(module: str, is_package: bool, source: str) -> None:
    assert violations(source, module, is_package, {"modalpeft.vision", "modalpeft.pointcloud"}) == []


def test_relative_imports_resolve() -> None:
    source = "from ...core.layers import x\nfrom . import y\n"
    got = imported_modules(source, "modalpeft.vision.methods.vpt", False, {"modalpeft.vision.methods.y"})
    assert [m for _, m in got] == ["modalpeft.core.layers", "modalpeft.vision.methods.y"]
    got = imported_modules("from . import api\nfrom .. import __version__\n", "modalpeft.core", True, set())
    assert [m for _, m in got] == ["modalpeft.core", "modalpeft"]


# -- the real tree -------------------------------------------------------------------------------------------


def test_every_subpackage_has_a_layer() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    unknown = sorted(subpackages - set(ALLOWED) - APPLICATION_PACKAGES)
    assert not unknown, (
        f"modalpeft/{unknown} belong to no layer; add them to ALLOWED in {Path(__file__).name} (and DESIGN.md)"
    )


def test_imports_go_one_way() -> None:
    known = known_modules()
    bad = []
    for path in source_files():
        name = module_name(path)
        bad += violations(path.read_text(), name, path.name == "__init__.py", known)
    assert not bad, "imports against the direction core <- lightning <- modalities <- recipes:\n" + "\n".join(bad)
