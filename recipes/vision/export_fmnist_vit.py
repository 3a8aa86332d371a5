"""Turn the weights that ``vit_fmnist_pretrain.yaml`` trained into the committed Fashion-MNIST ViT.

    python recipes/vision/export_fmnist_vit.py outputs/vit_fmnist_pretrain/lightning_logs/version_0 \\
        [--data /usr/share/datasets/fashion-mnist] [--runtime "41 min on 2 CPU cores"]

Reads ``<run>/adapter/model.safetensors`` (every parameter, timm key names, written by the fit), checks it loads
into the architecture of :func:`modalpeft.vision.backbones.fmnist_vit` strictly, measures its accuracy on the
10,000 Fashion-MNIST test images (and on the first 500, which the tests re-check), and writes, all or nothing,
``modalpeft/vision/pretrained/{vit_fmnist.safetensors, vit_fmnist.json, README.md}``. Then set
``FMNIST_VIT_SHA256`` in ``modalpeft/vision/backbones.py`` to the printed digest.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from modalpeft.core.state import atomic_write
from modalpeft.vision.backbones import FMNIST_VIT_FILE, FMNIST_VIT_KWARGS, FMNIST_VIT_NAME, sha256_of
from modalpeft.vision.idx import read_fashion_mnist

RECIPE = "recipes/vision/vit_fmnist_pretrain.yaml"


@torch.no_grad()
def accuracy(model: torch.nn.Module, images, labels) -> float:
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - 0.5) / 0.5  # timm's config for the architecture, as the fit's data module applied it
    predictions = torch.cat([model(x[i : i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    return (predictions == torch.as_tensor(labels.astype("int64"))).float().mean().item()


def last_val_acc(run: Path) -> float | None:
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/acc")]
    return float(rows[-1]["val/acc"]) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the fit's log folder (holds adapter/ and metrics.csv)")
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--runtime", default="", help="the fit's measured wall time, for the manifest")
    args = parser.parse_args()

    state = load_file(str(args.run / "adapter" / "model.safetensors"))
    model = timm.create_model(FMNIST_VIT_NAME, pretrained=False, **FMNIST_VIT_KWARGS)
    model.load_state_dict(state, strict=True)
    model.eval()
    images, labels = read_fashion_mnist(args.data, "t10k")
    test_acc, first_500 = accuracy(model, images, labels), accuracy(model, images[:500], labels[:500])
    val_acc = last_val_acc(args.run)
    parameters = sum(p.numel() for p in model.parameters())

    target = FMNIST_VIT_FILE.parent
    tmp = target / ".export"
    atomic_write({"vit_fmnist.safetensors": model.state_dict()}, tmp)
    digest = sha256_of(tmp / "vit_fmnist.safetensors")
    size = (tmp / "vit_fmnist.safetensors").stat().st_size
    manifest = {
        "file": {"name": "vit_fmnist.safetensors", "bytes": size, "sha256": digest},
        "model": {"name": FMNIST_VIT_NAME, "kwargs": FMNIST_VIT_KWARGS, "parameters": parameters},
        "recipe": RECIPE,
        "data": "Fashion-MNIST (Xiao et al. 2017, MIT), the four idx.gz files of Debian's dataset-fashion-mnist",
        "metrics": {"test_acc": test_acc, "test_acc_first_500": first_500, "val_acc": val_acc},
        "runtime": args.runtime,
    }
    readme = f"""# The Fashion-MNIST ViT

`vit_fmnist.safetensors` holds the weights that `modalpeft.vision.backbones.fmnist_vit()` loads: a timm
`{FMNIST_VIT_NAME}` built with `{FMNIST_VIT_KWARGS}` ({parameters:,} parameters, fp32, {size / 2**20:.2f} MiB),
trained from scratch on Fashion-MNIST. It is vision's offline embedded default (`make demo`) and the frozen
encoder of the deepfake demo.

- sha256: `{digest}` (checked before every load; also in `vit_fmnist.json`)
- Data: Fashion-MNIST (Xiao et al. 2017, MIT licence), the idx.gz files of Debian's `dataset-fashion-mnist`
  (`apt-get install dataset-fashion-mnist`; `/usr/share/datasets/fashion-mnist`); 55,000 training images,
  5,000 held out for validation (seed 0), the 10,000 test images for the figures below.
- Accuracy: {100 * test_acc:.2f}% on the 10,000 test images ({100 * first_500:.1f}% on the first 500, which
  `tests/vision/test_backbones.py` re-checks){f"; {100 * val_acc:.2f}% on validation" if val_acc is not None else ""}.
- Training: {args.runtime or "see the recipe's header"}.

Made with:

```
python recipes/vision.py fit --config {RECIPE}
python recipes/vision/export_fmnist_vit.py outputs/vit_fmnist_pretrain/lightning_logs/version_0
```
"""
    atomic_write({"vit_fmnist.json": manifest, "README.md": readme.encode()}, tmp)
    for name in ("vit_fmnist.safetensors", "vit_fmnist.json", "README.md"):
        (tmp / name).replace(target / name)
    tmp.rmdir()
    print(f"test accuracy {test_acc:.4f} (first 500: {first_500:.4f}); sha256 {digest}; {size} bytes")


if __name__ == "__main__":
    main()
