"""The embedded audio demo: the committed symbolic music LM (a one-codebook MusicGen decoder pretrained on the music21
corpus) adapted to Irish jigs with the music adapters (linear, conv, transformer), peft's LoRA and full fine-tuning.

Runs offline on a CPU (``modalpeft demo --modality audio``; ``--quick`` for a few seconds' check):

1. *Data*: the jigs of O'Neill's *Music of Ireland* (1850) in the music21 corpus (``corpus:oneills-jigs``: 259 tunes
   after removing tunes transcribed twice), tokenised by :class:`~modalpeft.audio.symbolic.MelodyTokenizer`; a seeded
   20% of the tunes is held out. None of them was seen in pretraining (Bach, other common-practice composers,
   Palestrina).
2. *Backbone*: :func:`~modalpeft.audio.pretrained.pretrained_symbolic_lm` (sha256-checked).
3. *Adaptation*: every contender starts from the same weights and trains on the same batches (windows of at most
   ``block_size`` tokens) for the same steps: AdamW, 10% warm-up then cosine, gradient clipping at 1. The adapters
   sit after each of the 4 decoder blocks (:class:`~modalpeft.audio.MusicAdapterConfig`); LoRA (peft) is on every
   self-attention projection and both FFN layers; full fine-tuning trains every parameter the forward pass uses (the
   decoder's cross-attention layers, idle without a text condition, stay frozen and are not counted). Each
   contender's learning rate was picked on a validation split of the training tunes (``lr_grid=True``,
   ``modalpeft demo --modality audio --lr-grid``: ``docs/results/audio_lr_grid.md``); at the rates first used
   (3e-3 for every adapter, not searched) the best adapter stayed 5.9% from full fine-tuning's NLL, at the picked
   ones (1e-2) 1.4%.
4. *Evaluation*: held-out negative log-likelihood in bits per token; ``samples`` tunes sampled from the start token
   (plain sampling) and their style distances to the held-out jigs (:mod:`modalpeft.audio.style`); one sample per
   contender rendered to WAV with the General MIDI soundfont (when tinysoundfont and a soundfont are installed), a
   MIDI file, and a piano roll; every adapter saved, reloaded into a fresh pretrained LM (largest logit difference
   reported) and merged where the method merges (LoRA); each adapter's last ``mwa_keep`` saves merged by MWA
   (uniform, loss- and step-weighted: :func:`modalpeft.lightning.mwa.evaluate_merges`) and scored the same way.

The run folder gets ``results.json``, ``audio.md``, the pictures and the samples; with ``results_dir`` the page, the
pictures and the MIDI samples go there too (``docs/results/audio.md`` and ``docs/results/audio/``).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.compare import delta, same_outputs
from ..core.model import AdaptedModel, parameter_counts
from ..core.state import atomic_write
from ..lightning.demo import (
    environment_note,
    lr_grid_note,
    lr_grid_picks,
    lr_grid_table,
    metric_vs_params_png,
    mwa_table,
    run_environment,
)

IDLE = "encoder_attn"
"""The MusicGen decoder's cross-attention modules: unused without a text condition."""


@dataclass
class AudioSettings:
    """What the demo runs; the defaults take a few minutes on one CPU thread."""

    out: str = "outputs/demo/audio"
    results_dir: str | None = None
    seed: int = 0
    genre: str = "corpus:oneills-jigs"
    test_fraction: float = 0.2
    max_tunes: int | None = None
    steps: int = 100
    batch_size: int = 16
    block_size: int = 256
    lrs: dict[str, float] = field(
        default_factory=lambda: {
            "linear adapter": 1e-2,
            "conv adapter": 1e-2,
            "transformer adapter": 1e-2,
            "lora (peft)": 1e-2,
            "full fine-tuning": 3e-3,
        }
    )
    """One learning rate per contender: the ones ``lr_grid`` picked (``docs/results/audio_lr_grid.md``)."""
    lr_grid: bool = False
    """Instead of the demo: train every contender at each of ``lr_candidates`` and pick, per contender, the rate with
    the lowest bits/token on a validation split of the *training* tunes (``val_fraction`` of them, seeded; the
    held-out tunes are not read); writes ``audio_lr_grid.md``."""
    lr_candidates: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "linear adapter": (1e-3, 3e-3, 1e-2, 3e-2),
            "conv adapter": (1e-3, 3e-3, 1e-2, 3e-2),
            "transformer adapter": (1e-3, 3e-3, 1e-2, 3e-2),
            "lora (peft)": (1e-3, 3e-3, 1e-2, 3e-2),
            "full fine-tuning": (3e-4, 1e-3, 3e-3, 1e-2),
        }
    )
    val_fraction: float = 0.2
    mwa_keep: int = 5
    """Checkpoint merging (MWA, :mod:`modalpeft.lightning.mwa`): the adapter states of the last ``mwa_keep`` saves,
    one every ``mwa_every`` steps, with the mean training loss since the previous save, are merged afterwards by a
    uniform average, loss-weighted averages (``w ∝ loss^-p``, each of ``mwa_penalties``) and a step-weighted one."""
    mwa_every: int = 10
    mwa_penalties: tuple[float, ...] = (1.0, 10.0)
    samples: int = 24
    sample_tokens: int = 320
    temperature: float = 1.0
    render_seconds: float = 10.0
    tempo: float = 150.0
    """Quarter notes per minute of the rendered samples (a jig's dotted quarter at 100)."""
    program: int = 40
    """The General MIDI instrument of the rendered samples (40: violin, 0-based)."""
    threads: int = 1
    pretrained: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> AudioSettings:
        """A run of a few seconds for tests: the same pipeline on a handful of tunes, steps and tokens."""
        quick = {"max_tunes": 12, "steps": 2, "batch_size": 4, "block_size": 64, "samples": 2, "sample_tokens": 24,
                 "mwa_every": 1, "mwa_keep": 2}  # fmt: skip
        return cls(**{**quick, "render_seconds": 1.0, **overrides})


@dataclass
class Result:
    method: str
    trainable_params: int
    share_of_full: float
    bits_per_token: float
    style: dict[str, float]
    step_time: float
    train_seconds: float
    lr: float | None = None
    mwa: dict[str, float] = field(default_factory=dict)
    """Held-out bits/token of the merged checkpoints (``"last"``, ``"uniform"``, ``"loss p=1"``, ...)."""
    reload_max_abs_diff: float | None = None
    reload_ok: bool | None = None
    merge_max_abs_diff: float | None = None
    merge_ok: bool | None = None
    sample_tokens: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reload_ok is not False and self.merge_ok is not False


def contenders() -> list[tuple[str, Any]]:
    """``(name, adapter)``: a modalpeft / peft config, ``"full"``, or ``None`` (the frozen pretrained LM)."""
    import peft

    from .methods import MusicAdapterConfig

    lora_targets = r".*\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
    return [
        ("pretrained (frozen)", None),
        ("linear adapter", MusicAdapterConfig(kind="linear", bottleneck=32)),
        ("conv adapter", MusicAdapterConfig(kind="conv", bottleneck=24)),
        ("transformer adapter", MusicAdapterConfig(kind="transformer", bottleneck=24, num_heads=4)),
        ("lora (peft)", peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets)),
        ("full fine-tuning", "full"),
    ]


class AudioDemo:
    """The jig data as batches, the backbone factory, and the contenders' training and evaluation."""

    def __init__(self, settings: AudioSettings) -> None:
        from .symbolic import MelodyTokenizer
        from .symbolic_data import collate, source_pieces, windows

        self.s = settings
        self.tokenizer = MelodyTokenizer()
        self.start = len(self.tokenizer)
        pieces = [p for p in source_pieces(settings.genre, cache_dir=None, limit=settings.max_tunes) if p]
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(settings.seed)).tolist()
        n_test = max(1, round(settings.test_fraction * len(pieces)))
        self.test_lines = [line for i in order[:n_test] for line in pieces[i]]
        self.train_lines = [line for i in order[n_test:] for line in pieces[i]]
        if settings.lr_grid:  # evaluate on a validation split of the training tunes; the held-out ones stay unread
            rest = order[n_test:]
            n_val = max(1, round(settings.val_fraction * len(rest)))
            self.test_lines = [line for i in rest[:n_val] for line in pieces[i]]
            self.train_lines = [line for i in rest[n_val:] for line in pieces[i]]
        block = settings.block_size
        train = [w for line in self.train_lines for w in windows(line, block, self.tokenizer)]
        test = [w for line in self.test_lines for w in windows(line, block, self.tokenizer)]
        self.test_batches = [collate(test[i : i + 32], self.start) for i in range(0, len(test), 32)]
        g = torch.Generator().manual_seed(settings.seed + 1)
        self.batches: list[dict[str, Tensor]] = []
        while len(self.batches) < settings.steps:
            perm = torch.randperm(len(train), generator=g).tolist()
            for i in range(0, len(perm) - settings.batch_size + 1, settings.batch_size):
                self.batches.append(collate([train[j] for j in perm[i : i + settings.batch_size]], self.start))
                if len(self.batches) == settings.steps:
                    break
        self.n_train_windows, self.n_test_windows = len(train), len(test)

    def backbone(self) -> nn.Module:
        from .pretrained import pretrained_symbolic_lm

        torch.manual_seed(self.s.seed)
        return pretrained_symbolic_lm(self.s.pretrained)

    def prepare(self, adapter: Any) -> nn.Module:
        from ..lightning.task import prepare_backbone

        model = self.backbone()
        if adapter is None:
            model.requires_grad_(False)
            return model
        torch.manual_seed(self.s.seed)  # the adapters' random initialisation
        model = prepare_backbone(model, adapter, None)
        if adapter == "full":
            for name, module in model.named_modules():
                if name.endswith(IDLE):
                    module.requires_grad_(False)
        return model

    def train(
        self, model: nn.Module, lr: float, saves: list[tuple[int, float, dict[str, Tensor]]] | None = None
    ) -> tuple[float, list[float]]:
        """Train ``model`` on the demo's batches; with ``saves`` (an adapter), append ``(step, mean training loss
        since the previous save, adapter state)`` for each of the last ``mwa_keep`` saves, one every ``mwa_every``
        steps (kept outside the timed step)."""
        from ..lightning.optim import build_optimizer, param_groups, warmup_cosine
        from .tasks import token_nll

        optimizer = build_optimizer(param_groups(model, 0.01), "adamw", lr)
        schedule = warmup_cosine(optimizer, len(self.batches), max(1, len(self.batches) // 10))
        trainable = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(self.s.seed + 2)  # dropout
        model.train()
        every, steps = self.s.mwa_every, len(self.batches)
        times, losses, start = [], [], time.perf_counter()
        for step, batch in enumerate(self.batches, start=1):
            t0 = time.perf_counter()
            nll, count = token_nll(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss = nll / count
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if saves is not None and (steps - step) % every == 0 and steps - step < self.s.mwa_keep * every:
                state = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
                saves.append((step, statistics.fmean(losses[-every:]), state))
        model.eval()
        return time.perf_counter() - start, times

    def merged_checkpoints(self, model: AdaptedModel, saves: list[tuple[int, float, dict[str, Tensor]]]) -> dict:
        """Held-out bits/token of the last save and of its MWA merges (``model`` is left as trained)."""
        from ..lightning.mwa import evaluate_merges

        return evaluate_merges(model, saves, self.bits_per_token, self.s.mwa_penalties)

    @torch.no_grad()
    def bits_per_token(self, model: nn.Module) -> float:
        from .tasks import token_nll

        model.eval()
        total, count = 0.0, 0
        for batch in self.test_batches:
            nll, n = token_nll(model, batch)
            total, count = total + float(nll), count + n
        return total / count / math.log(2)

    @torch.no_grad()
    def logits(self, model: nn.Module) -> Tensor:
        from .tasks import token_logits

        model.eval()
        return token_logits(model, self.test_batches[0]["input_ids"]).flatten(0, 1)

    def sample(self, model: nn.Module) -> list[list[int]]:
        from .tasks import sample_tokens

        s = self.s
        return sample_tokens(model, s.samples, s.sample_tokens, self.start, self.tokenizer.eos, s.temperature, s.seed)

    def decoded(self, lines: list[list[int]]) -> list[tuple[list, str | None]]:
        return [self.tokenizer.decode(line)[:2] for line in lines]

    def check(self, name: str, model: nn.Module) -> tuple[float | None, bool | None, float | None, bool | None]:
        """Save and reload into a fresh pretrained LM (and merge LoRA); the largest logit differences and verdicts."""
        from ..core.api import load_adapter, save_baseline

        if not isinstance(model, AdaptedModel) and not any(p.requires_grad for p in model.parameters()):
            return None, None, None, None
        folder = Path(self.s.out) / "adapters" / name.split(" ")[0]
        reference = self.logits(model)
        if isinstance(model, AdaptedModel):
            model.save_adapter(folder)
        else:
            save_baseline(model, folder, "full")
        diff, ok = same_outputs(reference, self.logits(load_adapter(self.backbone(), folder)))
        merge_diff = merge_ok = None
        if name.startswith("lora"):
            merge_diff, merge_ok = same_outputs(reference, self.logits(copy.deepcopy(model).merge_and_unload()))
        return diff, ok, merge_diff, merge_ok

    def run(self, log: Any) -> tuple[list[Result], dict[str, Any]]:
        from .style import style_distances, style_statistics

        reference = style_statistics(self.decoded(self.test_lines))
        floor = style_distances(style_statistics(self.decoded(self.train_lines)), reference)
        results: list[Result] = []
        for name, adapter in contenders():
            model = self.prepare(adapter)
            seconds, times, lr = 0.0, [], None
            saves: list | None = [] if isinstance(model, AdaptedModel) else None
            if adapter is not None:
                lr = self.s.lrs[name]
                seconds, times = self.train(model, lr, saves)
            trainable, _ = parameter_counts(model)
            bits = self.bits_per_token(model)
            mwa = self.merged_checkpoints(model, saves) if saves else {}
            tunes = self.sample(model)
            style = style_distances(style_statistics(self.decoded(tunes)), reference)
            steady = times[1:] or times
            row = Result(name, trainable, 0.0, bits, style, statistics.median(steady) if steady else 0.0, seconds, lr,
                         mwa)  # fmt: skip
            row.reload_max_abs_diff, row.reload_ok, row.merge_max_abs_diff, row.merge_ok = self.check(name, model)
            row.sample_tokens = max(tunes, key=lambda t: len(self.tokenizer.decode(t)[0]))
            results.append(row)
            log(
                f"  {name}: {trainable:,} trainable, {seconds:.0f} s: held-out {bits:.3f} bits/token, style distance "
                f"local {style['local']:.3f}, long-range {style['long_range']:.3f}"
            )
            del model
        full = next(r.trainable_params for r in results if r.method == "full fine-tuning")
        for r in results:
            r.share_of_full = r.trainable_params / full if full else math.nan
        return results, {"floor": floor}


def lr_grid(demo: AudioDemo, log: Any) -> list[dict[str, Any]]:
    """Every trainable contender at each of its candidate rates: validation bits/token (``demo`` built with
    ``lr_grid=True``, so its evaluation windows are the validation split)."""
    rows = []
    for name, adapter in contenders():
        for lr in demo.s.lr_candidates.get(name, ()) if adapter is not None else ():
            model = demo.prepare(adapter)
            seconds, _ = demo.train(model, lr)
            bits = demo.bits_per_token(model)
            rows.append({"method": name, "lr": lr, "bits_per_token": bits, "seconds": seconds})
            log(f"  {name} at lr {lr:g}: validation {bits:.3f} bits/token ({seconds:.0f} s)")
            del model
    return rows


def picked(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per contender, the rate with the lowest validation bits/token."""
    return lr_grid_picks(rows, "bits_per_token", higher_is_better=False)


def grid_markdown(rows: list[dict[str, Any]], settings: AudioSettings, meta: dict[str, Any]) -> str:
    choice = picked(rows)
    lines = [
        "# Audio: the learning rates of the demo, picked on a validation split",
        "",
        "Generated by `modalpeft demo --modality audio --lr-grid --results-dir docs/results`. The demo's jigs split as",
        f"in `audio.md` (the same seeded {100 * settings.test_fraction:.0f}% of the tunes held out, and not read here);"
        f" {100 * settings.val_fraction:.0f}% of the remaining tunes ({meta['test_tunes']}) are the validation split, "
        f"the other {meta['train_tunes']} ({meta['train_windows']} windows) train each contender for "
        f"{settings.steps} steps of batch {settings.batch_size} at each candidate rate, as the demo trains. Validation "
        "bits/token (lower is better; **bold**: picked):",
        "",
    ]
    in_use = AudioSettings().lrs
    lines += lr_grid_table(rows, choice, in_use, lambda r: f"{r['bits_per_token']:.3f}", "in `AudioSettings.lrs`")
    lines += [
        "",
        lr_grid_note(rows, choice, in_use, "`AudioSettings.lrs`"),
        "",
        f"Device: CPU, {settings.threads} thread(s), load average {meta['load']} at the start; total "
        f"{meta['seconds']:.0f} s.",
        environment_note(meta["environment"]),
        "",
    ]
    return "\n".join(lines)


def mwa_lines(results: list[Result], settings: AudioSettings) -> list[str]:
    """The checkpoint-merging table and what it shows (empty when no contender kept saves)."""
    rows = [r for r in results if r.mwa]
    if not rows:
        return []
    first, last = settings.steps - (settings.mwa_keep - 1) * settings.mwa_every, settings.steps
    lines = [
        "",
        "## Checkpoint merging (MWA)",
        "",
        f"Every adapter's states at steps {first}, {first + settings.mwa_every}, ..., {last} (the last "
        f"{settings.mwa_keep} saves, one every {settings.mwa_every} steps), merged by averaging the tensors "
        '(`modalpeft.lightning.mwa`, `mode="factors"`): uniformly, weighted by the mean training loss since the '
        "previous save (`w ∝ loss^-p`), or by the step (`w ∝ step`). Held-out bits/token (lower is better; the "
        "`last` column is the table above):",
        "",
    ]
    table, sentence = mwa_table({r.method: r.mwa for r in rows}, f"loss p={settings.mwa_penalties[0]:g}", False, 4)
    lines += [
        *table,
        "",
        f"{sentence} bits/token (the paper reports up to 5 accuracy points over uniform averaging on its tasks; "
        "one seed here).",
    ]
    return lines


def targets(results: list[Result]) -> dict[str, Any]:
    """The issue's targets on this run: each adapter beats the frozen LM's NLL; the best adapter comes within 5% of
    full fine-tuning's NLL with under 10% of its trainable parameters."""
    by = {r.method: r for r in results}
    base, full = by["pretrained (frozen)"].bits_per_token, by["full fine-tuning"].bits_per_token
    adapters = [r for r in results if r.method.endswith("adapter")]
    best = min(adapters, key=lambda r: r.bits_per_token)
    local = min(adapters, key=lambda r: r.style["local"])
    long_range = min(adapters, key=lambda r: r.style["long_range"])
    return {
        "beats_frozen": {r.method: base - r.bits_per_token for r in adapters},
        "best": best.method,
        "best_vs_full": best.bits_per_token / full - 1,
        "best_share": best.share_of_full,
        "met": all(r.bits_per_token < base for r in adapters)
        and best.bits_per_token <= 1.05 * full
        and best.share_of_full < 0.10,
        "local_winner": local.method,
        "long_range_winner": long_range.method,
    }


def _slug(name: str) -> str:
    return name.split(" ")[0].replace("(", "").replace(")", "")


def write_media(demo: AudioDemo, results: list[Result], folder: Path, console: Any) -> list[str]:
    """Piano rolls, the NLL plot, and per contender a MIDI file and (with a soundfont) a WAV; the names written."""
    from .render import piano_roll, render_events, soundfont_missing_reason, write_midi

    s = demo.s
    quarters = s.render_seconds * s.tempo / 60
    real = max(demo.test_lines, key=len)
    rolls = [("held-out jig (real, O'Neill's)", real)] + [(r.method, r.sample_tokens) for r in results]
    decoded = [(title, demo.tokenizer.decode(tokens)[0]) for title, tokens in rolls]
    piano_roll(decoded, folder / "audio_pianoroll.png", quarters)
    plot(results, folder / "audio_nll_vs_params.png")
    files: dict[str, bytes] = {}
    reason = soundfont_missing_reason()
    if reason:
        console.print(f"[yellow]audio: no WAV samples: {reason}[/]")
    for title, events in decoded:
        slug = "real" if title.startswith("held-out") else _slug(title)
        files[f"{slug}.mid"] = write_midi(events, s.tempo, s.program)
        if not reason:
            files[f"{slug}.wav"] = render_events(events, s.tempo, program=s.program, seconds=s.render_seconds)
    atomic_write(files, folder / "samples")
    return sorted(files)


def plot(results: list[Result], path: Path) -> None:
    """Held-out bits per token vs trainable parameters (log scale); the frozen LM as a dashed line."""
    png = metric_vs_params_png(
        [(r.method, r.trainable_params, r.bits_per_token) for r in results if r.trainable_params],
        ylabel="held-out bits per token",
        title="Irish jigs: held-out NLL vs trainable parameters",
        baselines=[(r.method, r.bits_per_token) for r in results if not r.trainable_params],
    )
    atomic_write({path.name: png}, path.parent)


def markdown(
    results: list[Result], settings: AudioSettings, meta: dict[str, Any], media: list[str], folder: str = ""
) -> str:
    t = meta["targets"]
    lines = [
        "# Audio: the offline demo (symbolic music)",
        "",
        "Generated by `modalpeft demo --modality audio --results-dir docs/results` (`make demo MODALITY=audio` runs",
        "the same and writes to its run folder); every number comes from that run. No MusicGen or EnCodec weights",
        "exist offline, so the music adapters run on a MusicGen decoder over symbolic tokens: transformers'",
        "`MusicgenForCausalLM` with one codebook (width 128, 4 blocks), pretrained on the music21 corpus (Bach,",
        "other common-practice composers, Palestrina; `modalpeft/audio/pretrained/README.md`), adapted here to the",
        f"jigs of O'Neill's *Music of Ireland* (1850): {meta['train_tunes']} training tunes ({meta['train_windows']} "
        f"windows of at most {settings.block_size} tokens), {meta['test_tunes']} held-out tunes; {settings.steps} "
        f"steps of batch {settings.batch_size} for every contender.",
        "",
        "| method | trainable | % of full | held-out bits/token | style: local | style: long-range | lr | step (ms) "
        "| reload | merge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        reload = (
            "n/a"
            if r.reload_ok is None
            else f"{'ok' if r.reload_ok else 'FAILED'} (Δ {delta(r.reload_max_abs_diff or 0)})"
        )
        merge = (
            "n/a"
            if r.merge_ok is None
            else f"{'ok' if r.merge_ok else 'FAILED'} (Δ {delta(r.merge_max_abs_diff or 0)})"
        )
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | {100 * r.share_of_full:.1f} | {r.bits_per_token:.3f} | "
            f"{r.style['local']:.3f} | {r.style['long_range']:.3f} | {f'{r.lr:g}' if r.lr else '-'} | "
            f"{1000 * r.step_time:.0f} | {reload} | {merge} |"
        )
    floor = meta["floor"]
    lines += [
        f"| *real jigs (training split)* | | | | *{floor['local']:.3f}* | *{floor['long_range']:.3f}* | | | | |",
        "",
        "Style distances (`modalpeft/audio/style.py`) are between "
        f"{settings.samples} tunes sampled from each model (plain sampling from the start token, at most "
        f"{settings.sample_tokens} tokens) and the held-out jigs; 0 is the same distribution. *Local*: the mean "
        "Jensen-Shannon divergence (bits) of the pitch-class, melodic-interval and duration histograms; "
        "*long-range*: the mean of the JS divergences of the onset-position-in-bar and notes-per-bar histograms and "
        "the absolute differences of the bar-repetition and bar-fill shares. The last row is the real training "
        "tunes against the held-out ones: the floor sampling noise leaves. Per statistic:",
        "",
        "| method | pitch class | interval | duration | onset in bar | notes per bar | bar repetition | bar fill |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = ("pitch_class", "interval", "duration", "onset_position", "notes_per_bar", "bar_repetition", "bar_fill")
    for r in [*results, None]:
        style = floor if r is None else r.style
        label = "*real jigs (training split)*" if r is None else r.method
        lines.append(f"| {label} | " + " | ".join(f"{style[n]:.3f}" for n in names) + " |")
    lines += mwa_lines(results, settings)
    verdict = "met" if t["met"] else "NOT met"
    lines += [
        "",
        "Targets (issue: every adapter kind beats the frozen LM's NLL clearly; the best comes within 5% of full",
        f"fine-tuning's NLL with under 10% of its parameters): **{verdict}**. Bits/token gained over the frozen LM: "
        + ", ".join(f"{k} {v:+.3f}" for k, v in t["beats_frozen"].items())
        + f"; the best adapter ({t['best']}) is {100 * t['best_vs_full']:+.1f}% from full fine-tuning's NLL with "
        f"{100 * t['best_share']:.1f}% of its trainable parameters. Closest to the genre on local statistics: "
        f"{t['local_winner']}; on long-range ones: {t['long_range_winner']} (one seed, {settings.samples} samples: "
        "differences of a few hundredths are within sampling noise; compare with the floor row).",
        "",
        f"Device: CPU, {settings.threads} thread(s), load average {meta['load']} at the start; total "
        f"{meta['seconds']:.0f} s. Step time is for comparison within this run only.",
        environment_note(meta["environment"]),
        "Learning rates: one per contender ("
        + ", ".join(f"{name} {lr:g}" for name, lr in settings.lrs.items())
        + "), each picked on a validation split of the training tunes (`audio_lr_grid.md`); the held-out tunes "
        "were not used to choose anything. Reload: the adapter saved (`save_adapter`; `save_baseline` for full "
        "fine-tuning), loaded into a fresh pretrained LM (`load_adapter`), Δ = the largest |logit difference| on "
        "held-out windows; merge: `merge_and_unload()` (the music adapters do not merge: their conv and attention "
        "stages are not linear).",
        "",
        "## Samples",
        "",
        f"One sample per contender (the one with the most notes of the {settings.samples}), rendered with the "
        f"General MIDI violin of MuseScore_General_Lite (tinysoundfont) at {settings.tempo:g} quarter notes per "
        f"minute, first {settings.render_seconds:g} s; the first row is a real held-out jig for comparison. "
        "The run folder has each as `samples/<name>.mid` and `samples/<name>.wav`; the committed page keeps the MIDI "
        "files only (the renderings are 0.3 MB each: `make demo MODALITY=audio` writes them).",
        "",
        f"![piano rolls of one sample per contender]({folder}audio_pianoroll.png)",
        "",
    ]
    midis = [m for m in media if m.endswith(".mid")]
    lines += [f"- [{m}]({folder}samples/{m})" for m in midis]
    if not any(m.endswith(".wav") for m in media):
        lines += ["", "(no WAV renderings: tinysoundfont or the soundfont is missing)"]
    lines += ["", f"![held-out NLL vs trainable parameters]({folder}audio_nll_vs_params.png)", ""]
    return "\n".join(lines)


def run(
    quick: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    console: Any = None,
    **overrides: Any,
) -> bool:
    """Run the section; ``True`` when every reload / merge check passed. Writes ``<out_dir>/results.json``,
    ``audio.md``, pictures and samples, and the page with its media to ``results_dir`` when given (never with
    ``quick``)."""
    from rich.console import Console

    console = console or Console()
    try:
        import music21  # noqa: F401
    except ImportError:
        console.print("[yellow]audio: skipped: music21 is not installed (pip install music21; make setup does)[/]")
        return True
    settings = AudioSettings.quick(**overrides) if quick else AudioSettings(**overrides)
    if out_dir is not None:
        settings.out = str(out_dir)
    if quick:
        settings.results_dir = None
    elif results_dir is not None:
        settings.results_dir = str(results_dir)
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        environment = run_environment()
        demo = AudioDemo(settings)
        if settings.lr_grid:
            return _run_lr_grid(demo, console, start, load, environment)
        console.print(
            f"audio: symbolic LM adapted to O'Neill's jigs: {len(demo.train_lines)} training tunes, "
            f"{len(demo.test_lines)} held out; {settings.steps} steps of batch {settings.batch_size} per contender"
        )
        results, extra = demo.run(console.print)
        out = Path(settings.out)
        media = write_media(demo, results, out, console)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    meta = {
        "train_tunes": len(demo.train_lines),
        "test_tunes": len(demo.test_lines),
        "train_windows": demo.n_train_windows,
        "test_windows": demo.n_test_windows,
        "load": f"{load:.1f}",
        "seconds": seconds,
        "targets": targets(results),
        "environment": environment,
        **extra,
    }
    text = markdown(results, settings, meta, media)
    report = {"settings": asdict(settings), "results": [asdict(r) for r in results], **meta}
    atomic_write({"results.json": report, "audio.md": text.encode()}, out)
    if settings.results_dir:
        target = Path(settings.results_dir)
        pictures = {n: (out / n).read_bytes() for n in ("audio_pianoroll.png", "audio_nll_vs_params.png")}
        atomic_write(pictures, target / "audio")
        midis = {m: (out / "samples" / m).read_bytes() for m in media if m.endswith(".mid")}
        atomic_write(midis, target / "audio" / "samples")
        atomic_write({"audio.md": markdown(results, settings, meta, media, folder="audio/").encode()}, target)
    also = f" and {settings.results_dir}/audio.md" if settings.results_dir else ""
    console.print(f"audio: wrote {out}/audio.md{also} ({seconds:.0f} s)")
    failed = [r.method for r in results if not r.ok]
    if failed:
        console.print(f"[bold red]audio: reload or merge checks failed for: {', '.join(failed)}[/]")
    return not failed


def _run_lr_grid(demo: AudioDemo, console: Any, start: float, load: float, environment: Any) -> bool:
    s = demo.s
    console.print(
        f"audio: learning-rate grid on a validation split: {len(demo.train_lines)} training tunes, "
        f"{len(demo.test_lines)} for validation; {s.steps} steps of batch {s.batch_size} per run"
    )
    rows = lr_grid(demo, console.print)
    meta = {
        "train_tunes": len(demo.train_lines),
        "test_tunes": len(demo.test_lines),
        "train_windows": demo.n_train_windows,
        "load": f"{load:.1f}",
        "seconds": time.perf_counter() - start,
        "environment": environment,
    }
    text = grid_markdown(rows, s, meta).encode()
    out = Path(s.out)
    report = {"settings": asdict(s), "rows": rows, "picked": picked(rows)}
    atomic_write({"lr_grid.json": report, "audio_lr_grid.md": text}, out)
    if s.results_dir:
        atomic_write({"audio_lr_grid.md": text}, Path(s.results_dir))
    console.print(f"audio: wrote {out}/audio_lr_grid.md; picked {picked(rows)} ({meta['seconds']:.0f} s)")
    return True


__all__ = ["AudioDemo", "AudioSettings", "Result", "contenders", "run", "targets"]
