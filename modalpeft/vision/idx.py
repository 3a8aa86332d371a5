"""The idx format (MNIST, Fashion-MNIST) and Fashion-MNIST's files."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from .transforms import folder_listing

# -- Fashion-MNIST and the idx format ---------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FORMAT = (
    "an idx file starts with two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D "
    "float32, 0x0E float64) and the number of dimensions, then one big-endian uint32 per dimension and the data "
    "(magic 0x00000803 for idx3-ubyte images, 0x00000801 for idx1-ubyte labels); gzip-compressed files are read too"
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), plain or gzip-compressed, into a numpy array.

    Raises:
        ValueError: naming the file and the expected format, when the magic number is wrong or the file is
            shorter or longer than its header says (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"idx file {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err}); download the file again.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path} is not an idx file: it starts with 0x{raw[:4].hex() or '(empty)'}; {_IDX_FORMAT}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, {ndim} dimensions need {header}).")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {state}: the header gives shape {dims} of {dtype.name} ({expected} bytes) but there are "
            f"{len(raw)} bytes; download the file again."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    raise ValueError(
        f"FashionMNISTDataModule: neither {stem} nor {stem}.gz is in {str(root)!r} "
        f"({folder_listing(root)}). Give the folder of the four idx files (Debian: "
        "`apt-get install dataset-fashion-mnist` puts them in "
        "/usr/share/datasets/fashion-mnist) with --data.init_args.root."
    )


def read_fashion_mnist(root: str | Path, part: Literal["train", "t10k"]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of Fashion-MNIST's ``train`` or ``t10k`` files."""
    root = Path(root)
    image_path = _find_idx(root, f"{part}-images-idx3-ubyte")
    label_path = _find_idx(root, f"{part}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{image_path}: expected idx3-ubyte images (magic 0x00000803: uint8, 3 dimensions), found {images.dtype} "
            f"with shape {images.shape}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{label_path}: expected idx1-ubyte labels (magic 0x00000801: uint8, 1 dimension), found {labels.dtype} "
            f"with shape {labels.shape}."
        )
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels.")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} is out of range; Fashion-MNIST labels are 0-9.")
    return images, labels.astype(np.int64)
