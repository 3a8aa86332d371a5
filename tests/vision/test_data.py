"""Vision data modules on tiny datasets the tests write in the real layouts: class folders, a VTAB-1k task
folder with its four list files, and Fashion-MNIST idx files (plain and gzip)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from modalpeft.lightning import EpochSeededSampler
from modalpeft.vision.data import FashionMNISTDataModule, ImageFolderDataModule, VTAB1kDataModule
from modalpeft.vision.idx import read_fashion_mnist, read_idx
from modalpeft.vision.transforms import ImageConfig, ImageTransform, load_image, resolve_image_config

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A random image of PIL ``mode`` and ``size`` (width, height), in the format the file ending names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert("P")
    else:
        shape = (size[1], size[0]) if channels[mode] == 1 else (size[1], size[0], channels[mode])
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    image.save(path)
    return path


def write_image_folder(root: Path) -> Path:
    """train/val/test with three classes in PNG, JPEG and GIF; grey, RGBA and palette images; mixed sizes."""
    kinds = [("png", "RGB", (40, 30)), ("jpg", "L", (16, 16)), ("png", "RGBA", (32, 32)), ("gif", "P", (20, 50))]
    for split, per_class in (("train", 4), ("val", 2), ("test", 2)):
        for c, name in enumerate(("bird", "cat", "dog")):
            for i in range(per_class):
                ext, mode, size = kinds[(i + c) % len(kinds)]
                write_image(root / split / name / f"{i}.{ext}", mode, size, seed=100 * c + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image; ignored")
    return root


def write_vtab_task(root: Path, num_classes: int = 3, sizes: dict[str, int] | None = None) -> Path:
    """A VTAB-1k task folder: ``images/<list>/<i>.jpg`` and the four list files, ``<path> <label>`` per line."""
    sizes = sizes or {"train800": 6, "val200": 3, "test": 4}
    lines: dict[str, list[str]] = {}
    for name, count in sizes.items():
        lines[name] = []
        for i in range(count):
            rel = f"images/{name}/{i}.jpg"
            write_image(root / rel, "RGB" if i % 2 else "L", (24 + i, 24), seed=i)
            lines[name].append(f"{rel} {i % num_classes}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, content in lines.items():
        (root / f"{name}.txt").write_text("\n".join(content) + "\n")
    return root


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The idx encoding: 0, 0, type, ndim, big-endian uint32 dims, big-endian data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_fashion_mnist(root: Path, compress: bool, n_train: int = 30, n_test: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (
            ("images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10),
        ):
            data = idx_bytes(array)
            name = f"{part}-{kind}"
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


def tiny_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **{**TINY_VIT, **kwargs})


def attach(datamodule, model: torch.nn.Module, num_classes: int) -> None:
    """What a Trainer gives a data module: ``trainer.lightning_module`` with ``model`` and ``hparams``."""
    datamodule.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(model=model, hparams={"num_classes": num_classes})
    )


# -- the transform ---------------------------------------------------------------------------------------------


def test_transform_converts_modes_resizes_and_normalises() -> None:
    config = ImageConfig(size=(8, 12), channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    transform = ImageTransform(config)
    white = Image.new("L", (30, 20), 255)
    out = transform(white)
    assert out.shape == (3, 8, 12) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.ones(8, 12)) and torch.allclose(out[1], torch.full((8, 12), 3.0))
    assert torch.allclose(out[2], torch.ones(8, 12))
    rgba = Image.new("RGBA", (12, 8), (255, 0, 0, 0))  # alpha is dropped, not composited
    assert torch.allclose(transform(rgba)[0], torch.ones(8, 12))
    grey = ImageTransform(ImageConfig((8, 8), 1, (0.0,), (1.0,)))(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert grey.shape == (1, 8, 8) and torch.allclose(grey, torch.ones(1, 8, 8))
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))  # 16-bit grey PNGs: scaled, not clipped
    assert torch.allclose(ImageTransform(ImageConfig((4, 4), 1, (0.0,), (1.0,)))(sixteen), torch.ones(1, 4, 4))


def test_resize_modes_squash_or_crop_the_shorter_side() -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :10] = (255, 0, 0)  # the left quarter is red, the rest black
    image = Image.fromarray(array)
    config = ImageConfig((20, 20), 3, (0.0,) * 3, (1.0,) * 3, "nearest")
    squashed = ImageTransform(config, "squash")(image)
    cropped = ImageTransform(config, "shorter_crop")(image)
    assert squashed[0, :, :5].min() == 1 and squashed[0, :, 5:].max() == 0
    assert cropped[0].max() == 0  # the centre crop keeps columns 10-29 only


def test_image_config_comes_from_the_model_then_explicit_values() -> None:
    model = tiny_vit(in_chans=1)
    config = resolve_image_config(model)
    # timm's pretrained config says 224 x 3; the model was built for 32 x 32 x 1
    assert config == ImageConfig((32, 32), 1, (0.5,), (0.5,), "bicubic")
    explicit = resolve_image_config(model, image_size=16, channels=3, mean=[0.1], std=[0.2, 0.3, 0.4])
    assert explicit == ImageConfig((16, 16), 3, (0.1, 0.1, 0.1), (0.2, 0.3, 0.4), "bicubic")
    assert resolve_image_config().size == (224, 224)
    with pytest.raises(ValueError, match="channels=2"):
        resolve_image_config(channels=2)
    with pytest.raises(ValueError, match=r"mean=\[0.1, 0.2\] has 2 values"):
        resolve_image_config(mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        resolve_image_config(interpolation="cubic")


# -- class folders ---------------------------------------------------------------------------------------------


def test_image_folder_reads_every_format_and_size_as_the_model_wants(tmp_path) -> None:
    root = write_image_folder(tmp_path / "data")
    model = tiny_vit()
    datamodule = ImageFolderDataModule(str(root), batch_size=4, backbone=model)
    assert datamodule.classes == ["bird", "cat", "dog"] and datamodule.num_classes == 3
    datamodule.setup("fit")
    train = datamodule.datasets["train"]
    assert len(train) == 12 and len(datamodule.datasets["val"]) == 6
    assert sorted({label for _, label in train.samples}) == [0, 1, 2]
    assert all(path.suffix != ".txt" for path, _ in train.samples)
    for image, _ in train:  # RGB 40x30, grey 16x16, RGBA 32x32, palette 20x50: all (3, 32, 32)
        assert image.shape == (3, 32, 32)
    path = root / "train" / "bird" / "1.jpg"  # a grey JPEG: resized bicubic, 0.5/0.5 normalised, as timm says
    expected = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC), np.float32)
    expected = (torch.from_numpy(expected / 255.0).permute(2, 0, 1) - 0.5) / 0.5
    got = train[[str(p) for p, _ in train.samples].index(str(path))][0]
    assert torch.allclose(got, expected, atol=1e-6)
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededSampler)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert model(images).shape == (4, 3)
    datamodule.setup("test")
    assert len(datamodule.test_dataloader().dataset) == 6


def test_image_folder_under_a_trainer_uses_the_task_model(tmp_path) -> None:
    root = write_image_folder(tmp_path / "data")
    datamodule = ImageFolderDataModule(str(root), val_split=None, test_split=None, batch_size=2)
    attach(datamodule, tiny_vit(in_chans=1), num_classes=3)
    datamodule.setup("fit")
    assert datamodule.transform.config.size == (32, 32) and datamodule.transform.config.channels == 1
    assert datamodule.datasets["train"][0][0].shape == (1, 32, 32)
    assert datamodule.val_dataloader() == []
    attach(datamodule, tiny_vit(), num_classes=2)
    with pytest.raises(ValueError, match="has 3 classes but the model was built for 2.*num_classes=3"):
        datamodule.setup("fit")
    with pytest.raises(ValueError, match="needs test data"):
        ImageFolderDataModule(str(root), test_split=None).setup("test")


def test_image_folder_errors_name_the_folder_or_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="root .*missing.* is not a folder"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup("fit")
    root = write_image_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"split folder .*valid.* does not exist; .* holds: test/, train/, val/"):
        ImageFolderDataModule(str(root), val_split="valid").setup("fit")
    (root / "train" / "fish").mkdir()
    (root / "train" / "fish" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="class folder .*fish.* holds no images"):
        ImageFolderDataModule(str(root)).setup("fit")
    (root / "train" / "fish" / "readme.md").unlink()
    (root / "train" / "fish").rmdir()
    write_image(root / "val" / "horse" / "0.png")
    with pytest.raises(ValueError, match="horse.* is a class the training split 'train' does not have"):
        ImageFolderDataModule(str(root)).setup("fit")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolderDataModule(str(empty)).num_classes  # noqa: B018


def test_corrupt_and_truncated_images_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        load_image(bad)
    full = write_image(tmp_path / "full.jpg", "RGB", (64, 64))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg"):
        load_image(cut)
    root = write_image_folder(tmp_path / "data")
    (root / "train" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    datamodule = ImageFolderDataModule(str(root), image_size=8, batch_size=64)
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"cannot read image .*dog.9\.png"):
        next(iter(datamodule.train_dataloader()))


# -- VTAB-1k ---------------------------------------------------------------------------------------------------


def test_vtab1k_splits_as_the_papers_use_them(tmp_path) -> None:
    root = write_vtab_task(tmp_path / "cifar")
    select = VTAB1kDataModule(str(root), image_size=16, batch_size=4)
    assert select.num_classes == 3
    select.setup("fit")
    assert [len(select.datasets[s]) for s in ("train", "val")] == [6, 3]
    images, labels = next(iter(select.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}
    assert isinstance(select.train_dataloader().sampler, EpochSeededSampler)
    final = VTAB1kDataModule(str(root), split="train800val200", num_classes=10, image_size=16)
    assert final.num_classes == 10
    final.setup("fit")
    assert len(final.datasets["train"]) == 9 and len(final.datasets["val"]) == 4  # validates on test.txt
    final.setup("test")
    assert len(final.test_dataloader().dataset) == 4
    model = tiny_vit()
    under_trainer = VTAB1kDataModule(str(root))
    attach(under_trainer, model, num_classes=3)
    under_trainer.setup("fit")
    batch = next(iter(under_trainer.val_dataloader()))[0]
    assert batch.shape == (3, 3, 32, 32) and model(batch).shape == (3, 3)


def test_vtab1k_errors_name_the_list_file_and_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="task folder .*nowhere.* does not exist"):
        VTAB1kDataModule(str(tmp_path / "nowhere")).setup("fit")
    root = write_vtab_task(tmp_path / "task")
    (root / "val200.txt").unlink()
    with pytest.raises(ValueError, match=r"lacks val200\.txt .*present: \['train800\.txt', 'train800val200\.txt', "):
        VTAB1kDataModule(str(root)).setup("fit")
    VTAB1kDataModule(str(root), split="train800val200").setup("fit")  # the final run needs no val200.txt
    with pytest.raises(ValueError, match="split='val200' is not valid"):
        VTAB1kDataModule(str(root), split="val200")

    def fit_with(line: str, **kwargs) -> None:
        (root / "test.txt").write_text(f"images/test/0.jpg 0\n\n{line}\n")
        VTAB1kDataModule(str(root), split="train800val200", **kwargs).setup("fit")

    with pytest.raises(ValueError, match=r"test\.txt, line 3: label 5 is out of range \(labels must be \[0, 3\)\)"):
        fit_with("images/test/1.jpg 5", num_classes=3)
    with pytest.raises(ValueError, match=r"test\.txt, line 3: label -1 is out of range"):
        fit_with("images/test/1.jpg -1")
    with pytest.raises(ValueError, match=r"test\.txt, line 3: 'images/test/1.jpg' is not '<relative image path>"):
        fit_with("images/test/1.jpg")
    with pytest.raises(ValueError, match=r"test\.txt, line 3: .* is not '<relative image path> <integer label>'"):
        fit_with("images/test/1.jpg cat")
    with pytest.raises(ValueError, match=r"test\.txt, line 3: image .*gone\.jpg.* does not exist"):
        fit_with("images/test/gone.jpg 1")
    with pytest.raises(ValueError, match=r"has 3 classes but the model was built for 2"):
        (root / "test.txt").write_text("images/test/0.jpg 2\n")
        datamodule = VTAB1kDataModule(str(root), split="train800val200")
        attach(datamodule, tiny_vit(), num_classes=2)
        datamodule.setup("fit")


# -- Fashion-MNIST idx files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("type_code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trips_every_type(tmp_path, type_code) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.float64)
    if type_code == 0x08:
        array = np.abs(array)
    path = tmp_path / "data.idx"
    path.write_bytes(idx_bytes(array, type_code))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and np.array_equal(out, array) and out.dtype.isnative
    gz = tmp_path / "data.idx.gz"
    gz.write_bytes(gzip.compress(idx_bytes(array, type_code)))
    assert np.array_equal(read_idx(gz), array)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_from_idx_files(tmp_path, compress) -> None:
    root = write_fashion_mnist(tmp_path / "fmnist", compress)
    images, labels = read_fashion_mnist(root, "train")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and labels.tolist()[:11] == [*range(10), 0]
    datamodule = FashionMNISTDataModule(str(root), val_size=6, batch_size=8)
    assert datamodule.num_classes == 10
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) == 24 and len(datamodule.datasets["val"]) == 6
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    raw = torch.from_numpy(images.astype(np.float32) / 255.0)
    index = int(np.sort(np.random.default_rng(0).permutation(30)[6:])[0])  # the first training image after the split
    expected = (raw[index] - 0.2860) / 0.3530  # normalised with Fashion-MNIST's mean and std
    mean = float(datamodule.datasets["train"][0][0].mean())
    assert math.isclose(mean, (float(raw[index].mean()) - 0.2860) / 0.3530, abs_tol=1e-5)
    assert torch.allclose(datamodule.datasets["train"][0][0][0], expected, atol=1e-5)
    datamodule.setup("test")
    assert len(datamodule.test_dataloader().dataset) == 8
    sized = FashionMNISTDataModule(str(root), image_size=32, channels=3, mean=[0.5], std=[0.5])
    sized.setup("test")
    assert sized.datasets["test"][0][0].shape == (3, 32, 32)


def test_idx_errors_name_the_file_and_the_format(tmp_path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte is not an idx file: it starts with 0x12345678; .*0x00000803"
    ):
        read_idx(bad)
    full = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    bad.write_bytes(full[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated: the header gives shape \(3, 28, 28\)"):
        read_idx(bad)
    bad.write_bytes(full[:10])
    with pytest.raises(ValueError, match="truncated idx header"):
        read_idx(bad)
    gz = tmp_path / "labels.gz"
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(ValueError, match=r"labels\.gz: corrupt or truncated gzip"):
        read_idx(gz)
    with pytest.raises(ValueError, match="does not exist"):
        read_idx(tmp_path / "nothing")

    root = write_fashion_mnist(tmp_path / "fmnist", compress=False)
    labels = (root / "train-labels-idx1-ubyte").read_bytes()
    (root / "train-images-idx3-ubyte").write_bytes(labels)  # a labels file where images belong
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected idx3-ubyte images \(magic 0x00000803"):
        read_fashion_mnist(root, "train")
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="holds 5 images but .* holds 30 labels"):
        read_fashion_mnist(root, "train")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="neither t10k-labels-idx1-ubyte nor t10k-labels-idx1-ubyte.gz is in"):
        FashionMNISTDataModule(str(root)).setup("test")
    with pytest.raises(ValueError, match="FashionMNISTDataModule: folder .*absent.* does not exist"):
        FashionMNISTDataModule(str(tmp_path / "absent")).setup("fit")
    with pytest.raises(ValueError, match="val_size=30 leaves no training images"):
        FashionMNISTDataModule(str(write_fashion_mnist(tmp_path / "ok", True)), val_size=30).setup("fit")


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist_files() -> None:
    for part, count in (("train", 60_000), ("t10k", 10_000)):
        images, labels = read_fashion_mnist(DEBIAN_FASHION_MNIST, part)
        assert images.shape == (count, 28, 28) and np.bincount(labels).tolist() == [count // 10] * 10
