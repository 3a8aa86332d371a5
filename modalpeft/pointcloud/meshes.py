"""Offline point-cloud data built from real meshes: pybullet's OBJ models and trimesh's primitives.

No ModelNet, ShapeNet or ScanObjectNN copy is available offline, so the embedded point-cloud demo makes its own
data from what ships with two PyPI packages:

* ``pybullet_data`` (in the ``pybullet`` wheel): about 1,100 OBJ meshes, among them a duck, a teddy bear, the
  Stanford bunny, a mug, a Lego brick, a tray, and 1,000 procedurally generated "random URDF" objects;
* ``trimesh.creation``: boxes, spheres, cylinders, cones, capsules and tori with random proportions.

Two sets are built, each deterministic given its seed and cached as ``.npz`` (never pickle) under
``$MODALPEFT_CACHE`` (default ``~/.cache/modalpeft``) in seconds:

* :func:`build_classification_set`: :data:`CLASSIFICATION_CLASSES` (6 primitives + 6 pybullet objects), each
  cloud a random instance (random proportions or anisotropic scale, a random turn about the vertical y axis and a
  tilt of up to 15 degrees). The ``"scan"`` variant mimics ScanObjectNN's real scans (Uy et al., ICCV 2019): the
  object is cut by a random plane (a partial view), shifted off-centre, jittered with sensor noise, and some of the
  points are background inside the object's widened bounding box (floor around its base, clutter at the box's
  sides), as ScanObjectNN's boxes cut objects out of real scenes (:func:`scan_parts`); ``"clean"`` keeps the
  whole, noise-free surface.
* :func:`build_pretraining_set`: unlabelled clean clouds for masked point modelling, from the 1,000 random URDF
  objects, the other pybullet meshes and the primitives.

Points are drawn uniformly on the surface (area-weighted triangles, uniform barycentric coordinates) and every
cloud is normalised with ``pc_normalize`` (centroid at 0, farthest point at distance 1).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .transforms import pc_normalize

FORMAT_VERSION = 6
"""Bumped whenever the generation changes, so that stale caches are rebuilt."""

PRIMITIVE_CLASSES: tuple[str, ...] = ("box", "sphere", "cylinder", "cone", "capsule", "torus")

PYBULLET_OBJECTS: dict[str, str] = {
    "duck": "duck.obj",
    "teddy": "teddy2_VHACD_CHs.obj",
    "bunny": "bunny.obj",
    "mug": "objects/mug.obj",
    "lego": "lego/lego.obj",
    "tray": "tray/tray_textured.obj",
}
"""Class name -> OBJ file under ``pybullet_data.getDataPath()``."""

CLASSIFICATION_CLASSES: tuple[str, ...] = (*PRIMITIVE_CLASSES, *PYBULLET_OBJECTS)
"""The 12 classes of the offline classification set, in label order."""

Variant = Literal["scan", "clean"]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$MODALPEFT_CACHE/pointcloud``, else ``~/.cache/modalpeft/pointcloud``."""
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("MODALPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "modalpeft")
    return Path(base) / "pointcloud"


def pybullet_data_path() -> Path:
    """The folder of pybullet's meshes; a clear error when pybullet is not installed."""
    try:
        import pybullet_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the offline point-cloud data samples pybullet's meshes: pip install pybullet (it ships pybullet_data)."
        ) from e
    return Path(pybullet_data.getDataPath())


# -- meshes -----------------------------------------------------------------------------------------------------


@cache
def load_mesh(relative: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (V, 3) float64, faces (F, 3) int64)`` of a pybullet OBJ, read once (trimesh, all parts merged)."""
    import trimesh

    path = pybullet_data_path() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from pybullet_data; reinstall pybullet.")
    mesh = trimesh.load(str(path), force="mesh", process=False)
    vertices, faces = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0:
        raise ValueError(f"{path} holds no triangles.")
    return vertices, faces


def primitive(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A trimesh primitive with proportions drawn from ``rng``: ``(vertices, faces)``."""
    import trimesh.creation as create

    u = rng.uniform
    if name == "box":
        mesh = create.box(extents=u(0.5, 1.5, size=3))
    elif name == "sphere":
        mesh = create.icosphere(subdivisions=3, radius=1.0)
    elif name == "cylinder":
        mesh = create.cylinder(radius=u(0.3, 0.6), height=u(0.8, 2.0), sections=32)
    elif name == "cone":
        mesh = create.cone(radius=u(0.4, 0.8), height=u(0.8, 1.8), sections=32)
    elif name == "capsule":
        mesh = create.capsule(radius=u(0.25, 0.5), height=u(0.6, 1.5), count=[16, 16])
    elif name == "torus":
        mesh = create.torus(major_radius=u(0.6, 1.0), minor_radius=u(0.15, 0.35), major_sections=32, minor_sections=16)
    else:
        raise ValueError(f"unknown primitive {name!r}; choose one of {list(PRIMITIVE_CLASSES)}.")
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniformly on the surface: triangles by area, then uniform barycentric coordinates.

    Shapes:
        - output: ``(count, 3)`` float64
    """
    tri = vertices[faces]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = area.sum()
    if not total > 0:
        raise ValueError("the mesh has zero surface area")
    face = rng.choice(len(faces), size=count, p=area / total)
    r1, r2 = np.sqrt(rng.random(count))[:, None], rng.random(count)[:, None]
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    return (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c


def random_rotation(rng: np.random.Generator, max_tilt_deg: float = 15.0) -> np.ndarray:
    """A turn about y by ``U(0, 2 pi)``, then tilts about x and z by up to ``max_tilt_deg`` each: ``(3, 3)``."""
    yaw = rng.uniform(0, 2 * np.pi)
    tx, tz = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, size=2))
    cy, sy, cx, sx, cz, sz = np.cos(yaw), np.sin(yaw), np.cos(tx), np.sin(tx), np.cos(tz), np.sin(tz)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx @ ry


def object_points(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` surface points of a random instance of class ``name``, posed and normalised: ``(count, 3)``.

    Primitives get random proportions; pybullet objects a random anisotropic scale in ``[0.8, 1.2]`` per axis.
    Then a random rotation (:func:`random_rotation`) and ``pc_normalize``.
    """
    if name in PRIMITIVE_CLASSES:
        vertices, faces = primitive(name, rng)
        vertices = vertices * rng.uniform(0.85, 1.15, size=3)
    else:
        vertices, faces = load_mesh(PYBULLET_OBJECTS.get(name, name))
        vertices = (vertices - vertices.mean(axis=0)) * rng.uniform(0.8, 1.2, size=3)
    points = sample_surface(vertices, faces, count, rng) @ random_rotation(rng).T
    return pc_normalize(points)


# -- ScanObjectNN-like corruption -------------------------------------------------------------------------------


def scan_like(obj: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`scan_parts` joined, shuffled and pc-normalised: ``(count, 3)`` float32."""
    visible, background = scan_parts(obj, count, rng)
    cloud = np.concatenate([visible, background])
    cloud = cloud[rng.permutation(len(cloud))]
    return pc_normalize(cloud).astype(np.float32)


SCAN_CUT: tuple[float, float] = (0.05, 0.25)
"""Share of the object's points that the occluding plane removes (uniform in this range)."""
SCAN_BACKGROUND: tuple[float, float] = (0.10, 0.20)
"""Share of a scan's points that are background."""
SCAN_NOISE: tuple[float, float] = (0.005, 0.01)
"""Sensor noise: Gaussian sigma per cloud, in units of the object's radius."""


def scan_parts(obj: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ScanObjectNN-like view of a normalised object cloud: ``(object points, background points)``, ``count`` in all.

    ScanObjectNN (Uy et al., ICCV 2019) cuts each object out of a real scan with its bounding box, so its background
    points are the scene *inside that box* (the floor under the object, parts of neighbouring objects), and its
    perturbed variants (PB_T50_RS) shift, rotate and scale the box so that part of the object is cut off. Here:

    1. Occlusion: a random plane cuts away a share :data:`SCAN_CUT` of the points, the farthest along a random
       direction.
    2. The object is shifted by up to 0.1 per horizontal axis and jittered with Gaussian noise (:data:`SCAN_NOISE`).
    3. Background, a share :data:`SCAN_BACKGROUND` of the points, inside the object's bounding box widened by 10-30%
       per horizontal side: the floor around the object's base (40-80% of the background: points of the object's
       lowest tenth dropped onto its lowest height and spread by a few hundredths) and one or two small vertical
       patches on the box's sides (pieces of neighbouring objects' surfaces).

    How hard each part makes the demo's task (full fine-tuning of the small pretrained Point-MAE, 960 training
    clouds, 150 steps of batch 32, test overall accuracy, one seed): clean clouds 97% (480 training clouds); the cut
    and noise alone 76%; with the floor 64%; with the floor and side patches (this function) 50%. Compact Gaussian
    clutter blobs instead of the side patches, an earlier version, left 34%; the first version (a floor across the
    whole widened box, blobs, a harsher cut, 15-30% background) 25% after 100 steps on 480 clouds.
    """
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    depth = obj @ direction
    keep = depth <= np.quantile(depth, 1.0 - rng.uniform(*SCAN_CUT))
    visible = obj[keep]
    n_background = int(round(count * rng.uniform(*SCAN_BACKGROUND)))
    n_object = count - n_background
    visible = visible[rng.choice(len(visible), size=n_object, replace=len(visible) < n_object)]
    visible = visible + np.array([rng.uniform(-0.1, 0.1), 0.0, rng.uniform(-0.1, 0.1)])
    visible = visible + rng.normal(scale=rng.uniform(*SCAN_NOISE), size=visible.shape)

    low, high = visible.min(axis=0), visible.max(axis=0)
    margin = (high - low) * rng.uniform(0.10, 0.30, size=3)
    low, high = low - margin * np.array([1, 0, 1]), high + margin * np.array([1, 0, 1])
    n_floor = int(round(n_background * rng.uniform(0.4, 0.8)))
    base = visible[visible[:, 1] <= np.quantile(visible[:, 1], 0.1)]
    floor = base[rng.integers(0, len(base), n_floor)] + rng.normal(scale=0.04, size=(n_floor, 3))
    floor[:, 1] = low[1] + rng.normal(scale=0.003, size=n_floor)
    parts = [np.clip(floor, low, high)]
    n_clutter = n_background - n_floor
    n_patches = int(rng.integers(1, 3))
    sizes = np.diff(np.linspace(0, n_clutter, n_patches + 1).round().astype(int))
    for size in sizes:  # a piece of a neighbouring object's surface: a small vertical patch on a side of the box
        axis = int(rng.choice([0, 2]))
        span = (high - low) * rng.uniform(0.15, 0.35)
        corner = low + rng.uniform(0, 1, size=3) * (high - low - span)
        patch = corner + rng.uniform(0, 1, size=(size, 3)) * span
        patch[:, axis] = (low if rng.random() < 0.5 else high)[axis] + rng.normal(scale=0.003, size=size)
        parts.append(patch)
    return visible, np.concatenate(parts)


def classification_cloud(name: str, count: int, variant: Variant, rng: np.random.Generator) -> np.ndarray:
    """One cloud of class ``name``: ``(count, 3)`` float32."""
    if variant == "clean":
        return object_points(name, count, rng).astype(np.float32)
    if variant == "scan":
        return scan_like(object_points(name, 2 * count, rng), count, rng)
    raise ValueError(f"variant={variant!r} is not valid; choose 'scan' or 'clean'.")


# -- cached sets ------------------------------------------------------------------------------------------------


def _cached(kind: str, settings: dict[str, Any], cache_dir: str | os.PathLike[str] | None, build: Callable) -> dict:
    """Load the ``.npz`` for ``settings`` from the cache, or build and write it (atomically)."""
    from importlib.metadata import version

    key = {"kind": kind, "format": FORMAT_VERSION, "trimesh": version("trimesh"), "pybullet": version("pybullet")}
    key.update(settings)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir)
    path = folder / f"{kind}_{digest}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError):
            pass  # a broken cache file: rebuild it
    arrays = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return arrays


def build_classification_set(
    variant: Variant = "scan",
    train_per_class: int = 50,
    test_per_class: int = 30,
    num_points: int = 1024,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """The labelled offline set: ``train_points (M, num_points, 3)``, ``train_labels (M,)``, ``test_points``,
    ``test_labels`` (float32 / int64), class by class in :data:`CLASSIFICATION_CLASSES` order.

    Every cloud has its own random stream, seeded from ``(seed, split, class, index)``: the i-th training cloud of
    a class is the same whatever ``train_per_class`` is, and no test cloud repeats a training one.
    """
    if variant not in ("scan", "clean"):
        raise ValueError(f"variant={variant!r} is not valid; choose 'scan' or 'clean'.")
    if min(train_per_class, test_per_class, num_points) < 1:
        raise ValueError("train_per_class, test_per_class and num_points must be at least 1.")
    settings = {
        "variant": variant,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "num_points": num_points,
        "seed": seed,
        "classes": list(CLASSIFICATION_CLASSES),
    }

    def build() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for split_id, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
            clouds, labels = [], []
            for label, name in enumerate(CLASSIFICATION_CLASSES):
                for i in range(per_class):
                    rng = np.random.default_rng([seed, split_id, label, i])
                    clouds.append(classification_cloud(name, num_points, variant, rng))
                    labels.append(label)
            out[f"{split}_points"] = np.stack(clouds)
            out[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
        return out

    return _cached("meshes_cls", settings, cache_dir, build)


def surface_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    tri = vertices[faces]
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


@cache
def pretraining_sources() -> tuple[str, ...]:
    """Every mesh of the pretraining set: the random URDF objects with a surface (999 of the 1,000; one is flat),
    the named pybullet objects, then the primitive names (drawn with random proportions each time)."""
    root = pybullet_data_path()
    found = sorted(p.relative_to(root).as_posix() for p in (root / "random_urdfs").glob("*/*.obj"))
    found = [name for name in found if surface_area(*load_mesh(name)) > 0]
    return (*found, *PYBULLET_OBJECTS.values(), *PRIMITIVE_CLASSES)


def build_pretraining_set(
    num_clouds: int = 4000,
    num_points: int = 1024,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Unlabelled clean clouds for masked point modelling: ``(num_clouds, num_points, 3)`` float32.

    Cloud ``i`` comes from source ``i mod S`` of :func:`pretraining_sources` (every source is used about equally),
    with its own random instance, pose and anisotropic scale (:func:`object_points`).
    """
    if min(num_clouds, num_points) < 1:
        raise ValueError("num_clouds and num_points must be at least 1.")
    sources = pretraining_sources()
    settings = {"num_clouds": num_clouds, "num_points": num_points, "seed": seed, "sources": len(sources)}

    def build() -> dict[str, np.ndarray]:
        clouds = []
        for i in range(num_clouds):
            rng = np.random.default_rng([seed, 7, i])
            clouds.append(object_points(sources[i % len(sources)], num_points, rng).astype(np.float32))
        return {"points": np.stack(clouds)}

    return _cached("meshes_pretrain", settings, cache_dir, build)["points"]


__all__ = [
    "CLASSIFICATION_CLASSES",
    "PRIMITIVE_CLASSES",
    "PYBULLET_OBJECTS",
    "build_classification_set",
    "build_pretraining_set",
    "cache_root",
    "classification_cloud",
    "object_points",
    "pretraining_sources",
    "sample_surface",
    "scan_like",
    "scan_parts",
]
