"""The embedded end-to-end demo: pretrain a small ViT on real digits, then adapt it with every method.

Runs offline on a 2-core CPU in one to two minutes (``modalpeft demo``, ``make demo``):

1. *Pretraining.* A 4-block timm ViT (width 64, 2x2 patches, 0.2M parameters) is trained from scratch on
   scikit-learn's handwritten digits 0-4 (real 8x8 scans that ship with scikit-learn); its accuracy on
   held-out 0-4 digits is reported.
2. *Few-shot transfer* (VTAB-1k style): classify the digits 5-9 from ``shots`` training examples per class
   with a fresh 5-class head; ``shots`` more per class are the validation set and every other 5-9 digit
   is the test set. Each contender starts from the same pretrained backbone and the same fresh head, and
   trains on the same batches for the same number of steps with the same optimiser (AdamW, warm-up and
   cosine decay); its learning rate is picked from ``lrs`` on the validation set, as VTAB does:

   - linear probe (the head alone) and full fine-tuning, the two reference points;
   - every registered native method (``mp.list_methods()``), with ``modules_to_save=["head"]``;
   - peft's LoRA (r=8 on ``qkv``) through ``mp.adapt``.
3. *Lifecycle checks* on every adapted model: ``save_adapter``; ``mp.load_adapter`` into a fresh copy of the
   pretrained backbone whose head starts from other values; ``merge_and_unload`` for mergeable methods.
   The reloaded and merged models must predict what the trained model predicts, with the same logits up
   to float32 rounding (``CHECK_RTOL``), and the merged model must hold no modalpeft or peft module.

Every number printed comes from the run. ``--out`` receives the pretrained backbone, the saved adapters
and ``results.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from torch import Tensor, nn

import modalpeft as mp
from modalpeft.core.state import atomic_write

NUM_CLASSES = 5
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 64
CHECK_RTOL = 1e-5
"""A reloaded or merged model must predict the same labels as the trained one, with logits within
``CHECK_RTOL * max(1, max |logit|)`` of its logits (float32 rounding: merging changes the order of sums, and
BLAS results depend on memory alignment)."""

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "adapter": {"style": "adaptformer", "bottleneck_dim": 8},
    "krona": {"target_modules": ["qkv", "proj"], "a1": 8, "a2": 8},
    "spt": {"budget": 5_000, "structured": "lora", "rank": 4},
    "vpt": {"num_tokens": 5, "deep": True},
}
"""Config arguments per native method for this ViT (width 64); a registered method not listed runs with its
defaults. AdaptFormer's parallel MLP adapter; KronA on the attention projections as in its paper."""

ConfigFactory = Callable[[], Any]


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take one to two minutes on 2 CPU cores."""

    out: str = "outputs/demo"
    seed: int = 0
    pretrain_epochs: int = 30
    steps: int = 150
    shots: int = 20
    batch_size: int = 32
    lrs: tuple[float, ...] = field(default=(1e-3, 3e-3, 1e-2, 3e-2))
    threads: int = 1
    """CPU threads for torch. The model is so small that a second thread gains ~10%, while threads that wait
    on each other stall badly when other processes share the cores."""

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """A version of a few seconds for tests: the same pipeline with almost no training."""
        return cls(**{"pretrain_epochs": 1, "steps": 5, "shots": 5, "lrs": (3e-3,), **overrides})


@dataclass
class Digits:
    """The two tasks cut from scikit-learn's digits: images (N, 1, 8, 8) in [-1, 1], labels in 0..4."""

    pre_train: tuple[Tensor, Tensor]
    pre_test: tuple[Tensor, Tensor]
    down_train: tuple[Tensor, Tensor]
    down_val: tuple[Tensor, Tensor]
    down_test: tuple[Tensor, Tensor]


def load_digits_tasks(shots: int, seed: int) -> Digits:
    """Pretraining: digits 0-4, 80% train and 20% held out. Transfer: digits 5-9, ``shots`` per class for
    training, ``shots`` per class for validation, the rest for testing. Splits are stratified and seeded."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8), pixels 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)

    def split(classes: range, sizes: Callable[[int], list[int]]) -> list[Tensor]:
        """Per class: shuffle, cut into ``sizes(n)`` and the rest; then join each part across classes."""
        per_class = []
        for c in classes:
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            first = sizes(len(idx))
            per_class.append(torch.split(idx, [*first, len(idx) - sum(first)]))
        return [torch.cat(part) for part in zip(*per_class, strict=True)]

    pre_tr, pre_te = split(range(0, 5), lambda n: [int(0.8 * n)])
    down_tr, down_va, down_te = split(range(5, 10), lambda n: [shots, shots])
    return Digits(
        pre_train=(x[pre_tr], y[pre_tr]),
        pre_test=(x[pre_te], y[pre_te]),
        down_train=(x[down_tr], y[down_tr] - 5),
        down_val=(x[down_va], y[down_va] - 5),
        down_test=(x[down_te], y[down_te] - 5),
    )


def make_vit() -> nn.Module:
    """A timm ViT sized for 8x8 digits: 16 patches of 2x2, 4 blocks of width 64, 4 heads, 5 classes."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=NUM_CLASSES,
    )


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` index batches over ``n`` examples, epoch after epoch in seeded random order."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def train(model: nn.Module, data: tuple[Tensor, Tensor], order: list[Tensor], lr: float) -> float:
    """Train the parameters that require grad on the batches ``order`` with AdamW (weight decay 0.05), 10%
    linear warm-up and cosine decay; returns the seconds taken."""
    x, y = data
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    warmup = max(1, len(order) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / len(order)))
    )
    model.train()
    start = time.perf_counter()
    for idx in order:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def same_outputs(reference: Tensor, other: Tensor) -> tuple[float, bool]:
    """The largest |logit difference| of ``other`` from ``reference``, and whether ``other`` predicts the same
    labels with logits within ``CHECK_RTOL``."""
    diff = (other - reference).abs().max().item()
    tol = CHECK_RTOL * max(1.0, reference.abs().max().item())
    return diff, diff <= tol and bool((other.argmax(-1) == reference.argmax(-1)).all())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def leftover_wrappers(model: nn.Module) -> list[str]:
    """Modules of a merged model that still come from modalpeft or peft (there must be none)."""
    return [n for n, m in model.named_modules() if type(m).__module__.split(".")[0] in ("modalpeft", "peft")]


@dataclass
class Result:
    """One contender's row; ``None`` where a check does not apply."""

    method: str
    kind: str
    lr: float
    trainable_params: int
    total_params: int
    file_size: int
    val_metric: float
    metric: float
    train_seconds: float
    reload_max_abs_diff: float
    reload_ok: bool
    mergeable: bool | None = None
    merge_max_abs_diff: float | None = None
    merge_ok: bool | None = None

    @property
    def ok(self) -> bool:
        return self.reload_ok and self.merge_ok is not False


class Demo:
    """The demo's state: the data, the pretrained backbone, and the contenders."""

    def __init__(self, settings: DemoSettings, console: Console) -> None:
        self.s = settings
        self.console = console
        self.out = Path(settings.out)
        self.data = load_digits_tasks(settings.shots, settings.seed)
        self.order = batches(len(self.data.down_train[0]), settings.batch_size, settings.steps, settings.seed + 2)
        self.backbone_state: dict[str, Tensor] = {}

    def pretrain(self) -> float:
        """Train the ViT from scratch on digits 0-4; keeps its backbone weights and returns held-out accuracy."""
        torch.manual_seed(self.s.seed)
        model = make_vit()
        n = len(self.data.pre_train[0])
        steps = self.s.pretrain_epochs * math.ceil(n / PRETRAIN_BATCH)
        order = batches(n, PRETRAIN_BATCH, steps, self.s.seed + 1)
        seconds = train(model, self.data.pre_train, order, PRETRAIN_LR)
        acc = accuracy(logits_of(model, self.data.pre_test[0]), self.data.pre_test[1])
        self.backbone_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        atomic_write({"pretrained_backbone.safetensors": self.backbone_state}, self.out)
        self.console.print(
            f"pretraining: ViT with {parameter_counts(model)[1]:,} parameters on {n} digits 0-4, "
            f"{self.s.pretrain_epochs} epochs ({steps} steps, {seconds:.0f} s): held-out accuracy [bold]{acc:.1%}[/] "
            f"on {len(self.data.pre_test[0])} digits"
        )
        return acc

    def fresh_model(self, head_seed: int) -> nn.Module:
        """The pretrained backbone with a new 5-class head initialised from ``head_seed``."""
        torch.manual_seed(head_seed)
        model = make_vit()
        missing, unexpected = model.load_state_dict(self.backbone_state, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing)
        return model.eval()

    def contenders(self) -> list[tuple[str, str, ConfigFactory | None]]:
        """``(name, kind, make_config)``: the two references, every registered native method, peft's LoRA."""
        import peft

        rows: list[tuple[str, str, ConfigFactory | None]] = [
            ("linear probe", "reference", None),
            ("full fine-tuning", "reference", None),
        ]
        for name in mp.list_methods():
            kwargs = METHOD_SETTINGS.get(name, {})
            rows.append((name, "native", lambda name=name, kwargs=kwargs: self.native_config(name, kwargs)))
        rows.append(("lora (peft)", "peft", lambda: peft.LoraConfig(r=8, target_modules=["qkv"])))
        return rows

    def native_config(self, name: str, kwargs: dict[str, Any]) -> Any:
        """``mp.create_config(name, **kwargs)``; a method that scores parameters on training data (SPT) gets the
        downstream training set in batches."""
        config = mp.create_config(name, **kwargs)
        if config.data_field is not None and getattr(config, config.data_field) is None:
            x, y = self.data.down_train
            size = self.s.batch_size
            setattr(config, config.data_field, [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)])
        return config

    def fit(self, name: str, make_config: ConfigFactory | None, lr: float) -> tuple[nn.Module, float]:
        """A fresh downstream model set up for ``name`` and trained at ``lr``; returns it and the seconds taken."""
        model = self.fresh_model(self.s.seed + 3)
        if make_config is None:
            head_only = name == "linear probe"
            for pname, p in model.named_parameters():
                p.requires_grad_(not head_only or pname.startswith("head."))
        else:
            model = mp.adapt(model, make_config(), modules_to_save=["head"])
        return model, train(model, self.data.down_train, self.order, lr)

    def run_contender(self, name: str, kind: str, make_config: ConfigFactory | None) -> Result:
        """Train at every learning rate, keep the best on validation, test it, then save, reload and merge it."""
        best: tuple[float, float, nn.Module, float] | None = None
        for lr in self.s.lrs:
            model, seconds = self.fit(name, make_config, lr)
            val = accuracy(logits_of(model, self.data.down_val[0]), self.data.down_val[1])
            if best is None or val > best[0]:
                best = (val, lr, model, seconds)
        assert best is not None
        val, lr, model, seconds = best
        x, y = self.data.down_test
        logits = logits_of(model, x)
        trainable, total = parameter_counts(model)
        path = self.out / "adapters" / name.split(" (")[0].replace(" ", "_")

        if make_config is None:  # references: the head alone, or the whole model, as a plain safetensors file
            head_only = name == "linear probe"
            atomic_write({"model.safetensors": (model.head if head_only else model).state_dict()}, path)
            reloaded = self.fresh_model(self.s.seed + 4)
            (reloaded.head if head_only else reloaded).load_state_dict(load_file(str(path / "model.safetensors")))
        else:
            model.save_adapter(path)
            reloaded = mp.load_adapter(self.fresh_model(self.s.seed + 4), path)
        reload_diff, reload_ok = same_outputs(logits, logits_of(reloaded, x))
        result = Result(
            method=name,
            kind=kind,
            lr=lr,
            trainable_params=trainable,
            total_params=total,
            file_size=dir_size(path),
            val_metric=val,
            metric=accuracy(logits, y),
            train_seconds=seconds,
            reload_max_abs_diff=reload_diff,
            reload_ok=reload_ok,
        )

        if make_config is not None:
            result.mergeable = kind == "peft" or mp.get_method(name).mergeable
            if result.mergeable:
                merged = reloaded.merge_and_unload()
                result.merge_max_abs_diff, same = same_outputs(logits, logits_of(merged, x))
                result.merge_ok = same and not leftover_wrappers(merged)
        return result

    def run(self) -> tuple[float, list[Result]]:
        pre_acc = self.pretrain()
        d = self.data
        self.console.print(
            f"transfer: digits 5-9 from {self.s.shots} examples per class ({len(d.down_train[0])} train, "
            f"{len(d.down_val[0])} validation, {len(d.down_test[0])} test); every contender: AdamW, "
            f"{self.s.steps} steps of batch {self.s.batch_size}, learning rate picked on validation from "
            f"{', '.join(f'{lr:g}' for lr in self.s.lrs)}"
        )
        results = []
        for name, kind, make_config in self.contenders():
            with self.console.status(f"training {name}"):
                result = self.run_contender(name, kind, make_config)
            self.console.print(
                f"  {name}: lr {result.lr:g}, validation {result.val_metric:.1%}, test {result.metric:.1%}"
            )
            results.append(result)
        return pre_acc, results


def _delta(value: float) -> str:
    return "0" if value == 0 else f"{value:.0e}"


def results_table(results: list[Result]) -> Table:
    table = Table(
        title="few-shot digits 5-9 on a ViT pretrained on digits 0-4",
        caption="accuracy on the test digits; Δ = max |logit difference| from the trained model",
    )
    for col in ("method", "trainable", "%", "file KB", "lr", "accuracy", "reload ok", "merge"):
        table.add_column(col, justify="left" if col in ("method", "reload ok", "merge") else "right")
    for r in results:
        if r.kind == "reference":
            merge = "-"
        elif not r.mergeable:
            merge = "not mergeable"
        else:
            merge = f"{'ok' if r.merge_ok else 'FAILED'} (Δ {_delta(r.merge_max_abs_diff or 0.0)})"
        table.add_row(
            r.method,
            f"{r.trainable_params:,}",
            f"{100 * r.trainable_params / r.total_params:.2f}",
            f"{r.file_size / 1024:.1f}",
            f"{r.lr:g}",
            f"{r.metric:.1%}",
            f"{'yes' if r.reload_ok else 'NO'} (Δ {_delta(r.reload_max_abs_diff)})",
            merge,
        )
    return table


def run_demo(settings: DemoSettings, console: Console | None = None) -> int:
    """Run the demo, print its table and write ``results.json``; returns 0 when every check passed, else 1."""
    console = console or Console()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        demo = Demo(settings, console)
        pre_acc, results = demo.run()
    finally:
        torch.set_num_threads(threads)
    console.print(results_table(results))
    failed = [r.method for r in results if not r.ok]
    seconds = time.perf_counter() - start
    report = {
        "settings": asdict(settings),
        "pretrain_accuracy": pre_acc,
        "results": [asdict(r) for r in results],
        "all_checks_passed": not failed,
        "seconds": seconds,
    }
    atomic_write({"results.json": report}, demo.out)
    console.print(f"wrote {demo.out}/: results.json, adapters/, pretrained_backbone.safetensors ({seconds:.0f} s)")
    if failed:
        console.print(f"[bold red]reload or merge checks failed for: {', '.join(failed)}[/]")
        return 1
    return 0
