"""Pretrain the diffusion demo's subject-fidelity encoder (:class:`modalpeft.diffusion.tiny.SubjectEncoder`) on
Fashion-MNIST by self-supervised instance discrimination, and commit it.

    OMP_NUM_THREADS=1 python recipes/diffusion/pretrain_fmnist_ssl.py --out outputs/fmnist_ssl
    python recipes/diffusion/pretrain_fmnist_ssl.py --export outputs/fmnist_ssl/step_001000.safetensors

Why: DreamBooth measures subject fidelity with a self-supervised ViT (DINO) because its features tell one item of a
class from another; the Fashion-MNIST ViT was trained to classify, so every bag looks alike to it (the demo's base
model scored 0.945 against its instance images' 0.967 among themselves, before any training). This encoder learns to
recognise each training image under augmentations (SimCLR's NT-Xent, Chen et al., ICML 2020) and nothing else.

Training: the 60,000 Fashion-MNIST training images (padded to 32x32, in [0, 1]); two views of each image per batch
(random affine: zoom 0.8-1.2, rotation +-10 degrees, shift +-2.4 pixels, mirror; brightness and contrast; a blur;
Gaussian noise, as generated samples carry); a projection head (Linear-ReLU-Linear, 64 out) that is dropped on export;
AdamW (lr 2e-3, weight decay 1e-4), 50 warm-up steps then cosine decay, temperature 0.2. The test images are never
seen: the diffusion demo's subjects come from them.

``--export`` evaluates a saved step on the test set (instance retrieval of augmented views, and a k-NN class accuracy,
each beside the Fashion-MNIST ViT's features) and writes, all or nothing, ``modalpeft/diffusion/pretrained/``
``fmnist_ssl_encoder.safetensors`` (the encoder only), ``.json`` and ``.md``; then set ``FMNIST_ENCODER_SHA256`` in
``modalpeft/diffusion/tiny.py`` to the printed digest.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from modalpeft.core.state import atomic_write, sha256_of
from modalpeft.diffusion.tiny import FMNIST_ENCODER_FILE, SubjectEncoder
from modalpeft.vision.idx import read_fashion_mnist

DATA = "/usr/share/datasets/fashion-mnist"
COMMAND = "OMP_NUM_THREADS=1 python recipes/diffusion/pretrain_fmnist_ssl.py --out outputs/fmnist_ssl"


def to_unit(images: Tensor) -> Tensor:
    """Fashion-MNIST uint8 ``(N, 28, 28)`` -> ``(N, 1, 32, 32)`` in [0, 1], padded with the black background."""
    return F.pad(images.float().div(255).unsqueeze(1), (2, 2, 2, 2))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random view of each image of ``x`` ``(N, 1, 32, 32)`` in [0, 1] (see the module docstring)."""
    n = len(x)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    zoom, angle = uniform(0.8, 1.2), uniform(-10, 10) * math.pi / 180
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, uniform(-0.15, 0.15)], -1),
            torch.stack([sin * mirror, cos, uniform(-0.15, 0.15)], -1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * uniform(0.6, 1.2).view(n, 1, 1, 1) + uniform(-0.1, 0.1).view(n, 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = uniform(0, 1).view(n, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.4)
    x = torch.lerp(x, blurred, amount)
    x = x + uniform(0, 0.08).view(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss over ``z`` ``(2N, D)``: rows ``i`` and ``i + N`` are the two views of one image."""
    z = F.normalize(z, dim=-1)
    n = len(z) // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    images, _ = read_fashion_mnist(args.data, "train")
    x = to_unit(torch.as_tensor(images))
    encoder = SubjectEncoder()
    head = nn.Sequential(nn.Linear(encoder.dim, 256), nn.ReLU(inplace=True), nn.Linear(256, 64))
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    encoder.train()
    for step in range(1, args.steps + 1):
        batch = x[torch.randint(0, len(x), (args.batch_size,), generator=generator)]
        views = torch.cat([augment(batch, generator), augment(batch, generator)])
        loss = nt_xent(head(encoder(views)), args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
            save_file(state, str(out / f"step_{step:06d}.safetensors"))
    print(f"done: {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def evaluate(
    embed, test: Tensor, test_labels: Tensor, train: Tensor, train_labels: Tensor, seed: int
) -> dict[str, float]:
    """Instance retrieval (an augmented view of each of 1,000 test images finds its original among those 1,000, by
    cosine similarity: top-1) and 20-NN class accuracy (1,000 test images against 10,000 training images)."""
    generator = torch.Generator().manual_seed(seed)
    originals = embed(test[:1000])
    views = embed(augment(test[:1000], generator))
    retrieval = ((views @ originals.T).argmax(-1) == torch.arange(1000)).float().mean().item()
    reference = embed(train[:10000])
    neighbours = (embed(test[:1000]) @ reference.T).topk(20, dim=-1).indices
    votes = F.one_hot(train_labels[:10000][neighbours], 10).sum(1)
    knn = (votes.argmax(-1) == test_labels[:1000]).float().mean().item()
    return {"instance_retrieval_top1": retrieval, "knn20_class_accuracy": knn}


def export(args: argparse.Namespace) -> None:
    from modalpeft.diffusion.tiny import to_classifier
    from modalpeft.vision.backbones import fmnist_vit

    state = load_file(args.export)
    encoder = SubjectEncoder()
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    vit = fmnist_vit().eval()
    test_images, test_labels = read_fashion_mnist(args.data, "t10k")
    train_images, train_labels = read_fashion_mnist(args.data, "train")
    test, train = to_unit(torch.as_tensor(test_images)), to_unit(torch.as_tensor(train_images))
    tl, rl = torch.as_tensor(test_labels).long(), torch.as_tensor(train_labels).long()

    def ours(images: Tensor) -> Tensor:
        return torch.cat([F.normalize(encoder(b), dim=-1) for b in images.split(500)])

    def vits(images: Tensor) -> Tensor:
        return torch.cat(
            [F.normalize(vit.forward_head(vit.forward_features(to_classifier(b)), pre_logits=True), dim=-1)
             for b in images.split(500)]
        )  # fmt: skip

    metrics = {"encoder": evaluate(ours, test, tl, train, rl, 1), "fmnist_vit": evaluate(vits, test, tl, train, rl, 1)}
    tmp = Path(args.export).with_suffix(".export.safetensors")
    weights = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(weights, str(tmp), metadata={"format": "pt"})  # the bytes atomic_write writes below
    digest, size = sha256_of(tmp), tmp.stat().st_size
    params = sum(p.numel() for p in encoder.parameters())
    e, v = metrics["encoder"], metrics["fmnist_vit"]
    manifest = {
        "file": {"name": FMNIST_ENCODER_FILE.name, "bytes": size, "sha256": digest},
        "model": {"parameters": params, "features": encoder.dim},
        "command": COMMAND,
        "checkpoint": Path(args.export).name,
        "data": "Fashion-MNIST (Xiao et al. 2017, MIT), the 60,000 training images of Debian's dataset-fashion-mnist",
        "metrics": metrics,
        "runtime": args.runtime,
    }
    doc = f"""# The self-supervised Fashion-MNIST encoder (subject fidelity)

`{FMNIST_ENCODER_FILE.name}` holds the weights that `modalpeft.diffusion.tiny.fmnist_subject_encoder()` loads: a
`SubjectEncoder` (four conv-BatchNorm-ReLU stages, {params:,} parameters, {encoder.dim} pooled features, fp32,
{size / 1024:.0f} KiB), trained by SimCLR's instance discrimination on Fashion-MNIST's training images. The diffusion
demo measures subject fidelity with it (DreamBooth's DINO metric: the mean cosine similarity of generated and real
images' features).

- sha256: `{digest}` (checked before every load; also in `fmnist_ssl_encoder.json`)
- Data: Fashion-MNIST (Xiao et al. 2017, MIT licence), the 60,000 training images of Debian's `dataset-fashion-mnist`.
  The test images are never seen.
- Instance retrieval (an augmented view of each of 1,000 test images finds its original among them, top-1):
  {e["instance_retrieval_top1"]:.1%} (the Fashion-MNIST ViT's pooled features: {v["instance_retrieval_top1"]:.1%}).
- 20-NN class accuracy (1,000 test images against 10,000 training images): {e["knn20_class_accuracy"]:.1%} (the ViT,
  a supervised classifier: {v["knn20_class_accuracy"]:.1%}).
- Training: {args.runtime or "see the manifest"}; checkpoint `{Path(args.export).name}`.

Made with:

```
{COMMAND}
python recipes/diffusion/pretrain_fmnist_ssl.py --export outputs/fmnist_ssl/{Path(args.export).name}
```
"""
    files = {
        FMNIST_ENCODER_FILE.name: weights,
        "fmnist_ssl_encoder.json": manifest,
        "fmnist_ssl_encoder.md": doc.encode(),
    }
    atomic_write(files, FMNIST_ENCODER_FILE.parent)
    tmp.unlink()
    print(f"{metrics}; sha256 {digest}; set FMNIST_ENCODER_SHA256 in modalpeft/diffusion/tiny.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="the folder of Fashion-MNIST's idx files")
    parser.add_argument("--out", default="outputs/fmnist_ssl", help="where the step checkpoints go")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", help="a saved step to evaluate and commit (instead of training)")
    parser.add_argument("--runtime", default="", help="the training's measured wall time, for the manifest")
    args = parser.parse_args()
    torch.set_num_threads(1)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
