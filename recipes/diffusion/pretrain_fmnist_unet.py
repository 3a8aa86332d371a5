"""Pretrain the offline text-to-image model (:mod:`modalpeft.diffusion.tiny`) on Fashion-MNIST and commit it.

    OMP_NUM_THREADS=1 python recipes/diffusion/pretrain_fmnist_unet.py --out outputs/fmnist_unet
    OMP_NUM_THREADS=2 python recipes/diffusion/pretrain_fmnist_unet.py --threads 2 --seed 1 --steps 2400 \
        --init outputs/fmnist_unet/step_001200.safetensors --out outputs/fmnist_unet_cont
    python recipes/diffusion/pretrain_fmnist_unet.py --export outputs/fmnist_unet_cont/step_001800.safetensors

Two stages (:data:`COMMANDS`): 1,200 steps from scratch, then more from those EMA weights (``--init``: the
optimizer, the learning-rate schedule and the average start anew; ``--seed 1``: other batches and noise than the
first stage's). The committed weights are the second stage's step 1,800 of its 2,400-step cosine schedule (the
learning rate there is 15% of its peak): the run was stopped there for time. Runtime: ~2-3 s per step at batch 64
on one thread of a shared 2-core CPU, ~1.8 s on two threads (1200 + 1800 steps: ~45 + ~60 min). Expected result:
the committed Fashion-MNIST ViT recognises most samples of each class prompt (the manifest records the accuracy).

Training: the 60,000 Fashion-MNIST training images (padded to 32x32, in [-1, 1]) with captions
``"a photo of a {class}"`` (10% empty, for classifier-free guidance); the UNet and the text encoder learn together
from scratch: AdamW (lr 1e-3, no weight decay), 100 warm-up steps then cosine decay, ε-prediction with Min-SNR-5
weighting; an exponential moving average of the weights (decay 0.999, warmed up) is what is saved, every
``--save-every`` steps. The test images are never seen: the demo's subject comes from them.

``--export`` evaluates a saved step (samples per class prompt at each of :data:`GUIDANCES`, classified by the
Fashion-MNIST ViT), picks the demo's subject, and writes, all or nothing, ``modalpeft/diffusion/pretrained/``
``fmnist_unet.safetensors``, ``fmnist_unet.json``, ``README.md`` and ``subject.png``; then set
``FMNIST_DIFFUSION_SHA256`` in ``modalpeft/diffusion/tiny.py`` to the printed digest and ``FMNIST_GUIDANCE`` to the
printed scale (the one the ViT recognises the most samples at).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from modalpeft.core.state import atomic_write, sha256_of
from modalpeft.diffusion.demo import DiffusionSettings
from modalpeft.diffusion.pipeline import png_bytes
from modalpeft.diffusion.tiny import (
    CLASS_NAMES,
    FMNIST_DIFFUSION_FILE,
    TinyTextToImage,
    caption,
    to_classifier,
    to_model,
)
from modalpeft.vision.idx import read_fashion_mnist

DATA = "/usr/share/datasets/fashion-mnist"
COMMANDS = (
    "OMP_NUM_THREADS=1 python recipes/diffusion/pretrain_fmnist_unet.py --out outputs/fmnist_unet",
    "OMP_NUM_THREADS=2 python recipes/diffusion/pretrain_fmnist_unet.py --threads 2 --seed 1 --steps 2400 "
    "--init outputs/fmnist_unet/step_001200.safetensors --out outputs/fmnist_unet_cont",
)
"""The training stages of the committed weights (the second continues from the first's last step)."""


GUIDANCES = (1.0, 1.5, 2.0, 3.0)
"""The classifier-free guidance scales ``--export`` compares (at the demo's sampler, :data:`SAMPLE_STEPS`)."""
SAMPLE_STEPS = DiffusionSettings.sample_steps


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    images, labels = read_fashion_mnist(args.data, "train")
    x = to_model(torch.as_tensor(images))
    y = torch.as_tensor(labels)
    model = TinyTextToImage()
    if args.init:  # continue from saved weights (EMA); the optimizer, schedule and EMA start anew
        model.load_state_dict(load_file(args.init), strict=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch_size,), generator=generator)
        drop = torch.rand(args.batch_size, generator=generator) < 0.1
        prompts = ["" if d else caption(CLASS_NAMES[int(c)]) for c, d in zip(y[idx], drop, strict=True)]
        loss = model.loss(x[idx], prompts, generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f} s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            state = {k: v.detach().clone().contiguous() for k, v in ema.state_dict().items()}
            save_file(state, str(out / f"step_{step:06d}.safetensors"))
    print(f"done: {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def class_accuracy(model: TinyTextToImage, per_class: int, seed: int, steps: int, guidance: float) -> float:
    """The Fashion-MNIST ViT's accuracy on ``per_class`` samples of each class prompt."""
    from modalpeft.vision.backbones import fmnist_vit

    judge = fmnist_vit().eval()
    prompts = [caption(name) for name in CLASS_NAMES for _ in range(per_class)]
    images = model.sample(prompts, seed, steps, guidance)
    predicted = judge(to_classifier(images)).argmax(-1)
    target = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    return (predicted == target).float().mean().item()


@torch.no_grad()
def pick_subject(data: str, subject_class: str = "bag") -> tuple[int, torch.Tensor]:
    """The demo's subject: among the test images of ``subject_class`` that the Fashion-MNIST ViT classifies right
    with probability > 0.9, the one whose ViT embedding is least similar to the mean embedding of that class's
    training images (the item least like what pretraining saw). Returns its test index and the uint8 image."""
    from modalpeft.vision.backbones import fmnist_vit

    label = CLASS_NAMES.index(subject_class)
    vit = fmnist_vit().eval()

    def embed(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float().div(255).unsqueeze(1) - 0.5) / 0.5
        features = vit.forward_head(vit.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(features, dim=-1), vit.get_classifier()(features).softmax(-1)

    train_images, train_labels = read_fashion_mnist(data, "train")
    mean = embed(torch.as_tensor(train_images[train_labels == label][:2000]))[0].mean(0)
    test_images, test_labels = read_fashion_mnist(data, "t10k")
    candidates = torch.as_tensor((test_labels == label).nonzero()[0])
    features, probs = embed(torch.as_tensor(test_images[candidates.numpy()]))
    similarity = torch.where(probs[:, label] > 0.9, features @ mean, torch.inf)
    index = int(candidates[similarity.argmin()])
    return index, torch.as_tensor(test_images[index])


def export(args: argparse.Namespace) -> None:
    state = load_file(args.export)
    model = TinyTextToImage()
    model.load_state_dict(state, strict=True)
    model.eval()
    by_guidance = {g: class_accuracy(model, args.eval_per_class, 1234, SAMPLE_STEPS, g) for g in GUIDANCES}
    guidance = max(by_guidance, key=by_guidance.__getitem__)  # the first of equals: the lower scale
    acc = by_guidance[guidance]
    subject_index, subject = pick_subject(args.data)
    tmp = Path(args.export).with_suffix(".export.safetensors")
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp), metadata={"format": "pt"})  # the bytes atomic_write writes below
    digest = sha256_of(tmp)
    unet = sum(p.numel() for p in model.unet.parameters())
    text = sum(p.numel() for p in model.text_encoder.parameters())
    manifest = {
        "file": {"name": FMNIST_DIFFUSION_FILE.name, "bytes": tmp.stat().st_size, "sha256": digest},
        "model": {"unet_parameters": unet, "text_encoder_parameters": text},
        "commands": list(COMMANDS),
        "checkpoint": Path(args.export).name,
        "data": "Fashion-MNIST (Xiao et al. 2017, MIT), the 60,000 training images of Debian's dataset-fashion-mnist",
        "metrics": {
            "class_accuracy_fmnist_vit": acc,
            "class_accuracy_by_guidance": {f"{g:g}": a for g, a in by_guidance.items()},
            "guidance": guidance,
            "samples_per_class": args.eval_per_class,
            "sampler": f"DDIM {SAMPLE_STEPS} steps (the demo's), seed 1234",
        },
        "runtime": args.runtime,
        "subject": {"file": "subject.png", "fashion_mnist_test_index": subject_index, "class": "bag"},
    }
    readme = f"""# The Fashion-MNIST text-to-image model

`fmnist_unet.safetensors` holds the weights that `modalpeft.diffusion.tiny.fmnist_diffusion()` loads: a diffusers
`UNet2DConditionModel` ({unet:,} parameters, pixel space 32x32 grey, `FMNIST_UNET`) and a CLIP-style text encoder
({text:,} parameters, `FMNIST_TEXT`) with a word-level tokenizer built offline from `VOCABULARY`, fp32,
{tmp.stat().st_size / 2**20:.2f} MiB. It is the diffusion section's offline embedded default (`make demo`).

- sha256: `{digest}` (checked before every load; also in `fmnist_unet.json`)
- Data: Fashion-MNIST (Xiao et al. 2017, MIT licence), the 60,000 training images of Debian's `dataset-fashion-mnist`
  (`apt-get install dataset-fashion-mnist`; `{DATA}`), captions "a photo of a {{class}}" (10% empty).
  The test images are never seen (the demo's subject is one of them).
- Quality: the committed Fashion-MNIST ViT (`modalpeft.vision.backbones.fmnist_vit`) classifies {acc:.1%} of
  {args.eval_per_class} samples per class prompt (DDIM {SAMPLE_STEPS} steps, seed 1234) as the prompted class at
  classifier-free guidance {guidance:g}, the scale of {", ".join(f"{g:g}" for g in GUIDANCES)} under which it
  recognises the most ({", ".join(f"{g:g}: {a:.1%}" for g, a in by_guidance.items())});
  `FMNIST_GUIDANCE`, the demo's default, is that scale.
- `subject.png`: the diffusion demo's subject, Fashion-MNIST test image {subject_index} (`pick_subject`: the test bag
  least like the training bags under the ViT, among those it classifies with probability > 0.9).
- Training: {args.runtime or "see the manifest"}; checkpoint `{Path(args.export).name}` (EMA weights).

Made with:

```
{chr(10).join(COMMANDS)}
python recipes/diffusion/pretrain_fmnist_unet.py --export {args.export}
```
"""
    files = {
        FMNIST_DIFFUSION_FILE.name: weights,
        "fmnist_unet.json": manifest,
        "README.md": readme.encode(),
        "subject.png": png_bytes(Image.fromarray(subject.numpy())),
    }
    atomic_write(files, FMNIST_DIFFUSION_FILE.parent)
    tmp.unlink()
    print(f"class accuracy by guidance {by_guidance}; sha256 {digest}")
    print(f"set FMNIST_DIFFUSION_SHA256 = {digest!r} and FMNIST_GUIDANCE = {guidance} in modalpeft/diffusion/tiny.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DATA, help="the folder of Fashion-MNIST's idx files")
    parser.add_argument("--out", default="outputs/fmnist_unet", help="where the step checkpoints go")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="continue from these weights (a saved step or the committed file)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export", help="a saved step to evaluate and commit (instead of training)")
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--runtime", default="", help="the training's measured wall time, for the manifest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
