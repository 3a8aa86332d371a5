"""The embedded end-to-end demo: pretrain a small ViT on real digits, then adapt it with every method.

Runs offline on a 2-core CPU in about a minute (``modalpeft demo``, ``make demo``):

1. *Pretraining.* A 4-block timm ViT (64 wide, 2x2 patches, 0.2M parameters) is trained from scratch on
   scikit-learn's handwritten digits 0-4 (real 8x8 scans, shipped with scikit-learn); its accuracy on
   held-out 0-4 digits is reported.
2. *Downstream, few-shot* (VTAB-1k style): classify the digits 5-9 from ``shots`` training examples per
   class with a fresh 5-class head; every other 5-9 digit is the test set. Each contender starts from the
   same pretrained backbone and the same fresh head, and trains with the same optimiser (AdamW, cosine
   schedule), learning rate, batches and number of steps:

   - linear probe (the head alone) and full fine-tuning: the two reference points;
   - every registered native method (``mp.list_methods()``), with ``modules_to_save=["head"]``;
   - peft's LoRA (r=8 on ``qkv``) through ``mp.adapt``.
3. *Lifecycle checks* for every adapted model: ``save_adapter``, ``mp.load_adapter`` into a fresh copy of
   the pretrained backbone whose head is initialised differently, and (for mergeable methods)
   ``merge_and_unload``; the reloaded and merged models must give the trained model's logits.

Every number printed comes from the run. Outputs go to ``--out``: the pretrained backbone, the saved
adapters and ``results.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
CHECK_TOL = 1e-5
"""Largest |logit difference| accepted between the trained model and its reloaded or merged copy."""

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "adapter": {"style": "adaptformer", "bottleneck_dim": 8},
}
"""Config arguments per native method for this ViT; a registered method not listed runs with its defaults."""


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take about a minute on 2 CPU cores."""

    out: str = "outputs/demo"
    seed: int = 0
    pretrain_epochs: int = 30
    steps: int = 150
    shots: int = 20
    batch_size: int = 32
    lr: float = 2e-3

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """A few seconds' version for tests: the same pipeline with almost no training."""
        return cls(**{"pretrain_epochs": 1, "steps": 5, "shots": 5, **overrides})


@dataclass
class Digits:
    """The two tasks cut from scikit-learn's digits. Images are (N, 1, 8, 8) in [-1, 1]; labels in 0..4."""

    pre_train: tuple[Tensor, Tensor]
    pre_test: tuple[Tensor, Tensor]
    down_train: tuple[Tensor, Tensor]
    down_test: tuple[Tensor, Tensor]


def load_digits_tasks(shots: int, seed: int) -> Digits:
    """Pretraining on 0-4 (80% train, 20% held out) and few-shot 5-9 (``shots`` per class, rest test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8); pixels 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)

    def split(classes: range, take: Callable[[int], int]) -> tuple[Tensor, Tensor]:
        train, test = [], []
        for c in classes:
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            k = take(len(idx))
            train.append(idx[:k])
            test.append(idx[k:])
        return torch.cat(train), torch.cat(test)

    pre_tr, pre_te = split(range(0, 5), lambda n: int(0.8 * n))
    down_tr, down_te = split(range(5, 10), lambda n: shots)
    return Digits(
        pre_train=(x[pre_tr], y[pre_tr]),
        pre_test=(x[pre_te], y[pre_te]),
        down_train=(x[down_tr], y[down_tr] - 5),
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
    """``steps`` index batches over ``n`` examples, epoch by epoch in seeded random order."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size) if len(out) < steps)
        out = out[:steps]
    return out


def train(model: nn.Module, data: tuple[Tensor, Tensor], order: list[Tensor], lr: float) -> float:
    """Train the parameters that require grad with AdamW and a cosine schedule; returns the seconds taken."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / len(order))))
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
    trainable_params: int
    total_params: int
    file_size: int
    metric: float
    train_seconds: float
    reload_max_abs_diff: float | None = None
    reload_ok: bool | None = None
    mergeable: bool | None = None
    merge_max_abs_diff: float | None = None
    merge_ok: bool | None = None

    @property
    def ok(self) -> bool:
        return self.reload_ok is not False and self.merge_ok is not False


class Demo:
    """The demo's state: data, the pretrained backbone, and how to make fresh downstream models."""

    def __init__(self, settings: DemoSettings, console: Console) -> None:
        self.s = settings
        self.console = console
        self.out = Path(settings.out)
        self.data = load_digits_tasks(settings.shots, settings.seed)
        self.order = batches(len(self.data.down_train[0]), settings.batch_size, settings.steps, settings.seed + 2)
        self.backbone_state: dict[str, Tensor] = {}

    def pretrain(self) -> float:
        torch.manual_seed(self.s.seed)
        model = make_vit()
        n = len(self.data.pre_train[0])
        steps = self.s.pretrain_epochs * math.ceil(n / 64)
        seconds = train(model, self.data.pre_train, batches(n, 64, steps, self.s.seed + 1), lr=1e-3)
        acc = accuracy(logits_of(model, self.data.pre_test[0]), self.data.pre_test[1])
        self.backbone_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        atomic_write({"pretrained_backbone.safetensors": self.backbone_state}, self.out)
        self.console.print(
            f"pretrained ViT ({sum(p.numel() for p in model.parameters()):,} parameters) on digits 0-4: "
            f"{self.s.pretrain_epochs} epochs, {steps} steps, {seconds:.1f} s; held-out accuracy "
            f"[bold]{acc:.1%}[/] on {len(self.data.pre_test[0])} digits"
        )
        return acc

    def fresh_model(self, head_seed: int) -> nn.Module:
        """The pretrained backbone with a new 5-class head initialised from ``head_seed``."""
        torch.manual_seed(head_seed)
        model = make_vit()
        missing, unexpected = model.load_state_dict(self.backbone_state, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing)
        return model.eval()

    def contenders(self) -> list[tuple[str, str, Callable[[], Any] | None]]:
        """``(name, kind, make_config)``: the two references, every registered native method, peft's LoRA."""
        import peft

        rows: list[tuple[str, str, Callable[[], Any] | None]] = [
            ("linear probe", "reference", None),
            ("full fine-tuning", "reference", None),
        ]
        for name in mp.list_methods():
            kwargs = METHOD_SETTINGS.get(name, {})
            rows.append((name, "native", lambda name=name, kwargs=kwargs: mp.create_config(name, **kwargs)))
        rows.append(("lora (peft)", "peft", lambda: peft.LoraConfig(r=8, target_modules=["qkv"])))
        return rows

    def run_reference(self, name: str) -> Result:
        x, y = self.data.down_test
        model = self.fresh_model(self.s.seed + 3)
        head_only = name == "linear probe"
        for pname, p in model.named_parameters():
            p.requires_grad_(not head_only or pname.startswith("head."))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = train(model, self.data.down_train, self.order, self.s.lr)
        logits = logits_of(model, x)
        saved = model.head if head_only else model
        path = self.out / "adapters" / name.replace(" ", "_")
        atomic_write({"model.safetensors": saved.state_dict()}, path)
        reloaded = self.fresh_model(self.s.seed + 4)
        (reloaded.head if head_only else reloaded).load_state_dict(load_file(str(path / "model.safetensors")))
        diff = (logits_of(reloaded, x) - logits).abs().max().item()
        return Result(name, "reference", trainable, total, dir_size(path), accuracy(logits, y), seconds, diff,
                      diff <= CHECK_TOL)  # fmt: skip

    def run_adapted(self, name: str, kind: str, make_config: Callable[[], Any]) -> Result:
        x, y = self.data.down_test
        model = mp.adapt(self.fresh_model(self.s.seed + 3), make_config(), modules_to_save=["head"])
        summary = model.trainable_summary()
        seconds = train(model, self.data.down_train, self.order, self.s.lr)
        logits = logits_of(model, x)
        path = self.out / "adapters" / name.split(" ")[0]
        model.save_adapter(path)

        reloaded = mp.load_adapter(self.fresh_model(self.s.seed + 4), path)
        reload_diff = (logits_of(reloaded, x) - logits).abs().max().item()
        result = Result(name, kind, int(summary["trainable"]), int(summary["total"]), dir_size(path),
                        accuracy(logits, y), seconds, reload_diff, reload_diff <= CHECK_TOL)  # fmt: skip

        result.mergeable = kind == "peft" or mp.get_method(name).mergeable
        if result.mergeable:
            merged = reloaded.merge_and_unload()
            merged_logits = logits_of(merged, x)
            result.merge_max_abs_diff = (merged_logits - logits).abs().max().item()
            result.merge_ok = result.merge_max_abs_diff <= CHECK_TOL and not leftover_wrappers(merged)
        return result

    def run(self) -> tuple[float, list[Result]]:
        pre_acc = self.pretrain()
        n_train, n_test = len(self.data.down_train[0]), len(self.data.down_test[0])
        self.console.print(
            f"downstream: digits 5-9, {self.s.shots} training examples per class ({n_train}), {n_test} test digits; "
            f"every method: AdamW lr {self.s.lr:g}, cosine schedule, {self.s.steps} steps of batch {self.s.batch_size}"
        )
        results = []
        for name, kind, make_config in self.contenders():
            with self.console.status(f"training {name}"):
                if make_config is None:
                    result = self.run_reference(name)
                else:
                    result = self.run_adapted(name, kind, make_config)
            self.console.print(f"  {name}: accuracy {result.metric:.1%} ({result.train_seconds:.1f} s)")
            results.append(result)
        return pre_acc, results


def results_table(results: list[Result]) -> Table:
    table = Table(title="few-shot digits 5-9 from a ViT pretrained on digits 0-4 (accuracy on the test digits)")
    for col in ("method", "trainable", "%", "file KB", "accuracy", "reload ok", "merge"):
        table.add_column(col, justify="left" if col in ("method", "reload ok", "merge") else "right")
    for r in results:
        reload = f"{'yes' if r.reload_ok else 'NO'} (Δ {r.reload_max_abs_diff:.1e})"
        if r.kind == "reference":
            merge = "-"
        elif not r.mergeable:
            merge = "not mergeable"
        else:
            merge = f"{'ok' if r.merge_ok else 'FAILED'} (Δ {r.merge_max_abs_diff:.1e})"
        table.add_row(
            r.method,
            f"{r.trainable_params:,}",
            f"{100 * r.trainable_params / r.total_params:.2f}",
            f"{r.file_size / 1024:.1f}",
            f"{r.metric:.1%}",
            reload,
            merge,
        )
    return table


def run_demo(settings: DemoSettings, console: Console | None = None) -> int:
    """Run the demo, print its table, write ``results.json``; returns 0 when every check passed, else 1."""
    console = console or Console()
    start = time.perf_counter()
    demo = Demo(settings, console)
    pre_acc, results = demo.run()
    console.print(results_table(results))
    failed = [r.method for r in results if not r.ok]
    report = {
        "settings": asdict(settings),
        "pretrain_accuracy": pre_acc,
        "results": [asdict(r) for r in results],
        "all_checks_passed": not failed,
        "seconds": time.perf_counter() - start,
    }
    atomic_write({"results.json": report}, demo.out)
    console.print(f"wrote {demo.out}/results.json, the adapters and the pretrained backbone ({report['seconds']:.0f} s)")
    if failed:
        console.print(f"[bold red]checks failed for: {', '.join(failed)}[/]")
        return 1
    return 0
