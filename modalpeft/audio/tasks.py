"""MusicGen text-to-music fine-tuning: the LM loss on delayed EnCodec codes, and generation to WAV.

:class:`MusicGenTask` adapts a transformers ``MusicgenForConditionalGeneration`` (an adapter on its decoder:
``music_adapter``, peft's LoRA, or full fine-tuning of the decoder, the T5 text encoder and the EnCodec codec
staying frozen as MusicGen trains them) on captioned clips from
:class:`~modalpeft.audio.data.MusicCaptionsDataModule`, whose codes it computes with the model's own codec in
``setup``. The loss is MusicGen's: cross-entropy of each codebook's next code under the codebook delay pattern
(codebook ``k`` shifted right by ``k`` steps, pads where a codebook has no code; audiocraft's
``DelayedPatternProvider``, transformers' ``build_delay_pattern_mask``), averaged over codebooks, pads
ignored. ``sample_prompts`` are rendered to WAV (written atomically) when fit ends.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.state import atomic_write
from ..lightning.task import AdapterTask
from .data import wav_bytes


def musicgen(name: str = "facebook/musicgen-medium") -> nn.Module:
    """A ``MusicgenForConditionalGeneration``: ``"test"`` builds the tiny random one offline
    (:func:`~modalpeft.audio.backbones.tiny_musicgen`), anything else is a Hub name or a local folder."""
    if name == "test":
        from .backbones import tiny_musicgen

        return tiny_musicgen()
    from transformers import MusicgenForConditionalGeneration

    return MusicgenForConditionalGeneration.from_pretrained(name)


def delay_pattern(codes: Tensor, pad: int) -> Tensor:
    """MusicGen's training targets: ``(B, K, T)`` codes -> ``(B, T + K - 1, K)`` delayed labels.

    ``labels[b, s, k] = codes[b, k, s - k]`` for ``k <= s < T + k``, else ``pad`` (the model ignores pads in its
    loss and feeds ``pad`` as the start token): the delayed sequence of ``build_delay_pattern_mask`` without its
    first (all-start) step.
    """
    batch, books, steps = codes.shape
    labels = codes.new_full((batch, books, steps + books - 1), pad)
    for k in range(books):
        labels[:, k, k : k + steps] = codes[:, k]
    return labels.transpose(1, 2)


class MusicGenTask(AdapterTask):
    """Fine-tune MusicGen on captioned music (see the module docstring).

    Batches are dicts from :class:`~modalpeft.audio.data.MusicCaptionsDataModule` (``input_ids``,
    ``attention_mask``, ``codes``). Args as :class:`~modalpeft.lightning.AdapterTask` (``adapter``, ``lr``, ...,
    passed through; ``adapter="full"`` trains the whole decoder), plus:

    Args:
        text_dropout: the share of training captions replaced by the empty condition (MusicGen's classifier-free
            guidance training; 0 keeps every caption).
        sample_prompts: captions rendered to WAV under ``<log_dir>/samples`` when fit ends.
        sample_seconds: length of each sample.
        guidance_scale: classifier-free guidance of the samples (MusicGen's default 3).
        seed: seeds the sampling.
        fad_reference: a folder of reference audio of the target genre: when fit ends, the Fréchet Audio Distance
            between the rendered samples and it is written to ``<log_dir>/samples/fad.json`` and printed
            (:mod:`modalpeft.audio.fad`; it needs ``sample_prompts``, and as many of them as the FAD should rest on).
        fad_model: the embedding model of that FAD: ``"codec"`` (the model's own EnCodec latents) or the folder /
            Hub name of a CLAP, EnCodec or MusicGen model.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_dropout: float = 0.0,
        sample_prompts: list[str] | None = None,
        sample_seconds: float = 8.0,
        guidance_scale: float = 3.0,
        seed: int = 0,
        fad_reference: str | None = None,
        fad_model: str = "codec",
        **kwargs: Any,
    ) -> None:
        if not all(hasattr(backbone, a) for a in ("text_encoder", "audio_encoder", "decoder")):
            raise TypeError(
                f"MusicGenTask needs a MusicgenForConditionalGeneration (text encoder, codec and decoder), got "
                f"{type(backbone).__name__}; build it with modalpeft.audio.tasks.musicgen(name)."
            )
        if backbone.config.decoder.audio_channels != 1:
            raise ValueError("MusicGenTask trains mono MusicGen models; the stereo checkpoints interleave codebooks.")
        if not 0.0 <= text_dropout < 1.0:
            raise ValueError(f"text_dropout={text_dropout} must be in [0, 1).")
        if fad_reference is not None:
            from .fad import audio_files

            audio_files(fad_reference)  # a missing or empty folder fails now, not after training
            if not sample_prompts:
                raise ValueError(
                    f"fad_reference={fad_reference!r} needs sample_prompts: FAD compares the samples rendered for "
                    "them with the reference audio."
                )
        # from_pretrained gives eval mode: the decoder trains with its dropout, the frozen T5 and EnCodec run in eval
        backbone.train()
        backbone.text_encoder.eval()
        backbone.audio_encoder.eval()
        super().__init__(backbone, **kwargs)
        if self.baseline == "full":  # MusicGen fine-tuning trains the LM; T5 and EnCodec stay frozen
            for module in (backbone.text_encoder, backbone.audio_encoder):
                module.requires_grad_(False)
        self.musicgen = [backbone]  # a list: the model is registered once, as self.model
        self.pad = int(backbone.config.decoder.pad_token_id)

    # -- data ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "attach_codec"):
            codec = self.musicgen[0].audio_encoder
            datamodule.attach_codec(
                self.encode, codec.config.sampling_rate, self.musicgen[0].decoder.num_codebooks, self.codec_key()
            )

    def codec_key(self) -> str:
        """The codec's name and a checksum of its weights (the code cache's key)."""
        codec = self.musicgen[0].audio_encoder
        digest = hashlib.sha256()
        for name, tensor in sorted(codec.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return f"{codec.config.name_or_path or type(codec).__name__}:{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def encode(self, waveforms: Tensor) -> Tensor:
        """``(B, 1, N)`` waveforms at the codec's rate -> ``(B, K, T)`` codes."""
        codec = self.musicgen[0].audio_encoder
        ref = next(codec.parameters())
        codes = codec.encode(waveforms.to(ref.device, ref.dtype)).audio_codes  # (1, B, K, T)
        return codes[0].cpu()

    # -- training --------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        labels = delay_pattern(batch["codes"], self.pad)
        mask = batch["attention_mask"]
        if stage == "train" and self.hparams.text_dropout > 0:
            keep = torch.rand(mask.shape[0], 1, device=mask.device) >= self.hparams.text_dropout
            mask = mask * keep  # an all-zero mask is MusicGen's empty condition (its text states are zeroed)
        out = self.model(input_ids=batch["input_ids"], attention_mask=mask, labels=labels, use_cache=False)
        loss = out.loss
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log(f"{stage}/bits_per_code", loss.detach() / math.log(2), sync_dist=stage != "train")
        return loss

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_wav(self, prompts: list[str], tokenizer: Any, out_dir: str | Path, seconds: float) -> list[Path]:
        """Render ``prompts`` with the adapted model to ``out_dir/sample_<i>.wav`` (written atomically)."""
        model = self.musicgen[0]
        codec = model.audio_encoder.config
        text = tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed)
            audio = model.generate(
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
                max_new_tokens=max(1, round(seconds * codec.frame_rate)),
                do_sample=True,
                guidance_scale=self.hparams.guidance_scale,
                num_return_sequences=1,
            )
        model.train(was_training)
        names = [f"sample_{i}.wav" for i in range(len(prompts))]
        files = {n: wav_bytes(a.float().cpu().numpy(), codec.sampling_rate) for n, a in zip(names, audio, strict=True)}
        files["prompts.json"] = {n: p for n, p in zip(names, prompts, strict=True)}
        atomic_write(files, out_dir)
        return [Path(out_dir) / n for n in names]

    def on_fit_end(self) -> None:
        prompts = self.hparams.sample_prompts
        datamodule = getattr(self.trainer, "datamodule", None)
        if prompts and self.trainer.is_global_zero and getattr(datamodule, "tokenizer", None) is not None:
            out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
            files = self.generate_wav(list(prompts), datamodule.tokenizer, out, self.hparams.sample_seconds)
            if self.hparams.fad_reference:
                fad = self.fad(files, self.hparams.fad_reference, self.hparams.fad_model)
                atomic_write({"fad.json": fad}, out)
                print(f"FAD {fad['fad']:.4f} ({fad['model']}) of {len(files)} samples against {fad['reference']}")

    def fad(self, generated: list[Path], reference: str | Path, model: str = "codec") -> dict[str, Any]:
        """The FAD of ``generated`` audio files against a ``reference`` folder, with what it rests on."""
        from .fad import EncodecEmbedder, embed, frechet_distance, load_embedder

        embedder = EncodecEmbedder(self.musicgen[0].audio_encoder, self.device) if model == "codec" else load_embedder(
            model, self.device)  # fmt: skip
        ref, gen = embed(reference, embedder), embed(generated, embedder)
        return {
            "fad": frechet_distance(ref, gen),
            "model": model,
            "reference": str(reference),
            "reference_frames": ref.shape[0],
            "generated_frames": gen.shape[0],
        }


def token_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``(B, T, V)`` next-token logits of a one-codebook MusicGen decoder (or any LM returning ``.logits``)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return logits.reshape(input_ids.shape[0], input_ids.shape[1], -1)  # MusicGen: (B * K, T, V) with K = 1


def token_nll(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """The summed negative log-likelihood (nats) of ``batch["labels"]`` (``-100``: no loss) and the token count."""
    logits = token_logits(model, batch["input_ids"])
    labels = batch["labels"]
    nll = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return nll, int((labels != -100).sum())


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    count: int,
    max_tokens: int,
    start: int,
    eos: int,
    temperature: float = 1.0,
    seed: int = 0,
    prompt: list[int] | None = None,
) -> list[list[int]]:
    """``count`` token sequences sampled from a one-codebook decoder with its key/value cache (plain sampling at
    ``temperature``, a generator seeded by ``seed``), each cut at its first ``eos`` (kept) or after ``max_tokens``;
    ``prompt`` tokens follow the start token and begin every sequence."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([[start, *(prompt or [])]] * count, device=device)
    was_training = model.training
    model.eval()
    out, cache, tokens = None, None, [list(prompt or []) for _ in range(count)]
    done = torch.zeros(count, dtype=torch.bool)
    step = ids
    for _ in range(max_tokens - len(prompt or [])):
        out = model(input_ids=step, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits.reshape(count, step.shape[1], -1)[:, -1].float().cpu() / max(temperature, 1e-6)
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        for i in range(count):
            if not done[i]:
                tokens[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()):
            break
        step = nxt[:, None].to(device)
    model.train(was_training)
    return tokens


class SymbolicMusicTask(AdapterTask):
    """A causal LM over symbolic music tokens (pretraining with ``adapter="full"``, or adaptation to a genre).

    The backbone is a one-codebook MusicGen decoder (:func:`~modalpeft.audio.backbones.symbolic_music_lm`, or the
    committed pretrained one: :func:`~modalpeft.audio.pretrained.pretrained_symbolic_lm`); batches are dicts from
    :class:`~modalpeft.audio.symbolic_data.SymbolicMusicDataModule` (``input_ids``, ``labels``). The loss is the
    mean next-token cross-entropy; ``<stage>/bits_per_token`` is logged beside it. Args as
    :class:`~modalpeft.lightning.AdapterTask` (``adapter``, ``lr``, ...), plus:

    Args:
        export_name: when fit ends, write the backbone's weights (the whole LM, float32) as safetensors to
            ``<log_dir>/<export_name>`` (how the committed pretrained LM was made); ``None``: no export.
        sample_count: tunes sampled to ``<log_dir>/samples`` (MIDI, and WAV with ``soundfont``) when fit ends.
        sample_tokens: the longest sample, in tokens.
        temperature: sampling temperature.
        soundfont: a General MIDI soundfont (``.sf2``/``.sf3``) to render the samples with; ``"default"``: the
            system's (:func:`~modalpeft.audio.render.find_soundfont`).
        tempo: quarter notes per minute of the rendered samples.
        seed: seeds the sampling.
    """

    def __init__(
        self,
        backbone: nn.Module,
        export_name: str | None = None,
        sample_count: int = 0,
        sample_tokens: int = 256,
        temperature: float = 1.0,
        soundfont: str | None = None,
        tempo: float = 120.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        config = getattr(backbone, "config", None)
        if getattr(config, "num_codebooks", None) != 1:
            raise TypeError(
                f"SymbolicMusicTask needs a one-codebook MusicGen decoder (MusicgenForCausalLM), got "
                f"{type(backbone).__name__}; build it with modalpeft.audio.backbones.symbolic_music_lm()."
            )
        super().__init__(backbone, **kwargs)
        self.start = int(config.bos_token_id)
        self.lm = [backbone]  # a list: registered once, as self.model

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        nll, count = token_nll(self.model, batch)
        loss = nll / max(count, 1)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=sync, batch_size=count)
        self.log(f"{stage}/bits_per_token", loss.detach() / math.log(2), sync_dist=sync, batch_size=count)
        return loss

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        hp = self.hparams
        if hp.export_name:
            state = {k: v.detach().float() for k, v in self.lm[0].state_dict().items()}
            atomic_write({hp.export_name: state}, folder)
        if hp.sample_count:
            self.write_samples(folder / "samples")

    def write_samples(self, out_dir: str | Path) -> list[Path]:
        """Sample ``sample_count`` tunes and write them as ``sample_<i>.mid`` (and ``.wav`` with a soundfont)."""
        from .render import render_events, write_midi
        from .symbolic import MelodyTokenizer

        hp, tokenizer = self.hparams, MelodyTokenizer()
        tunes = sample_tokens(self.model, hp.sample_count, hp.sample_tokens, self.start, tokenizer.eos, hp.temperature,
                              hp.seed)  # fmt: skip
        files: dict[str, Any] = {}
        for i, tune in enumerate(tunes):
            events = tokenizer.decode(tune)[0]
            files[f"sample_{i}.mid"] = write_midi(events, hp.tempo)
            if hp.soundfont:
                files[f"sample_{i}.wav"] = render_events(events, hp.tempo, soundfont=hp.soundfont)
        atomic_write(files, out_dir)
        return [Path(out_dir) / n for n in files]


__all__ = [
    "MusicGenTask",
    "SymbolicMusicTask",
    "delay_pattern",
    "musicgen",
    "sample_tokens",
    "token_logits",
    "token_nll",
]
