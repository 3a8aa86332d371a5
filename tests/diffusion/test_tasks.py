"""DreamBoothTask on tiny SD / SDXL pipelines saved to a folder: the loss of the scheduler's prediction type (with
Min-SNR and prior preservation) against a transcription of the formulas, class images generated once into the cache
folder, validation grids (scored with CLIP and DINO when asked), the exported adapter loading into a fresh pipeline,
and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

import modalpeft as mp
from modalpeft.diffusion import DiffuseKronAConfig, load_into_pipeline
from modalpeft.diffusion.data import DreamBoothDataModule
from modalpeft.diffusion.tasks import DreamBoothTask, load_pipeline
from modalpeft.lightning.optim import build_optimizer

from .pipelines import save_tiny_pipeline, tiny_clip, tiny_dino, tiny_tokenizer, write_images


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("pipes")
    return {
        "sd": save_tiny_pipeline(base / "sd"),
        "sd_v": save_tiny_pipeline(base / "sd_v", prediction_type="v_prediction"),
        "sdxl": save_tiny_pipeline(base / "sdxl", sdxl=True),
    }


class ImageLogger(pl.loggers.CSVLogger):
    """A CSV logger that also takes images, as Weights & Biases' does (``log_image``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images: list[tuple] = []

    def log_image(self, key: str, images: list, step: int) -> None:
        self.images.append((key, step, images[0].size))


def _trainer(tmp_path, steps: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", default_root_dir=tmp_path, logger=ImageLogger(tmp_path),
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=1,
    )  # fmt: skip


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_with_min_snr_and_prior_matches_the_formulas(pipes, tmp_path, prediction, snr_gamma) -> None:
    config = DiffuseKronAConfig(init_weights=False)
    pipe_dir = pipes["sd_v" if prediction == "v_prediction" else "sd"]
    task = DreamBoothTask(str(pipe_dir), config, snr_gamma=snr_gamma, prior_loss_weight=0.5)
    assert task.noise_scheduler.config.prediction_type == prediction
    instance = write_images(tmp_path / "photos", 2)
    classes = write_images(tmp_path / "cls", 2, seed=3)
    data = DreamBoothDataModule(
        str(instance), "a photo of sks dog", class_dir=str(classes), class_prompt="a photo of dog",
        num_class_images=2, resolution=16, batch_size=2,
    )  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(7)
    loss = task.step(batch, "train")

    torch.manual_seed(7)  # the same draws, in the same order: VAE sample, noise, timesteps
    pipe = task.pipe
    with torch.no_grad():
        z = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample() * pipe.vae.config.scaling_factor
        text = pipe.text_encoder(pipe.tokenizer(batch["prompts"], padding="max_length", return_tensors="pt").input_ids)
    noise = torch.randn_like(z)
    t = torch.randint(0, 1000, (4,))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # scaled_linear, the DDIM config's
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * z
    target = v if prediction == "v_prediction" else noise
    pred = task.model(noisy, t, encoder_hidden_states=text[0]).sample
    per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:  # Min-SNR-γ (Hang et al., 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
        snr = (abar / (1 - abar)).flatten()
        per = per * torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
    expected = per[:2].mean() + 0.5 * per[2:].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_sd_fit_generates_class_images_once_renders_grids_and_exports(pipes, tmp_path) -> None:
    pl.seed_everything(0)
    task = DreamBoothTask(
        str(pipes["sd"]), DiffuseKronAConfig(), optimizer="adamw8bit", gradient_checkpointing=True,
        validation_prompts=["a sks dog", "a dog"], validation_every_n_steps=1, validation_inference_steps=2,
        validation_resolution=16,
    )  # fmt: skip
    assert task.pipe.unet.is_gradient_checkpointing
    frozen = {n: p.clone() for n, p in task.frozen.named_parameters()}
    instance = write_images(tmp_path / "photos", 3)
    cache = tmp_path / "cache"
    write_images(cache, 1, size=16, seed=9)  # one class image there already: two are generated
    data = DreamBoothDataModule(
        str(instance), "a photo of sks dog", class_dir=str(cache), class_prompt="a photo of dog", num_class_images=3,
        class_inference_steps=2, class_batch_size=1, resolution=16, random_flip=True,
    )  # fmt: skip
    trainer = _trainer(tmp_path)
    with pytest.warns(UserWarning, match="torch's 32-bit AdamW"):
        trainer.fit(task, data)
    assert trainer.global_step == 2
    generated = sorted(p.name for p in cache.iterdir())
    assert generated == ["00.png", "class_00001.png", "class_00002.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    data.prepare_data()  # enough now: nothing is generated again
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    run = tmp_path / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert trainer.logger.images == [("validation", 1, (38, 20)), ("validation", 2, (38, 20))]  # 2 x 16 px + padding
    for name, p in task.frozen.named_parameters():
        torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)
    trained = task.model.eval()
    fresh = load_pipeline(str(pipes["sd"]))
    adapted = load_into_pipeline(fresh, run / "adapter")
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, t, e).sample, trained(x, t, e).sample)
        with trained.disable_adapters():
            assert not torch.allclose(adapted(x, t, e).sample, trained(x, t, e).sample)


def test_validation_renderings_are_scored_with_clip_and_dino(pipes, tmp_path, monkeypatch) -> None:
    from modalpeft.diffusion import metrics

    clip_dir = tmp_path / "clip"
    tiny_clip().save_pretrained(clip_dir)
    tiny_tokenizer().save_pretrained(clip_dir)
    monkeypatch.setattr(metrics, "load_dino", lambda name: tiny_dino() if name == "tiny-dino" else None)
    prompts = ["a sks dog", "a dog"]
    task = DreamBoothTask(
        str(pipes["sd"]), DiffuseKronAConfig(), optimizer="adamw", validation_prompts=prompts,
        validation_every_n_steps=2, validation_inference_steps=2, validation_resolution=16,
        validation_clip=str(clip_dir), validation_dino="tiny-dino",
    )  # fmt: skip
    instance = write_images(tmp_path / "photos", 2)
    data = DreamBoothDataModule(str(instance), "a photo of sks dog", resolution=16)
    trainer = _trainer(tmp_path)
    trainer.fit(task, data)
    scores = json.loads((Path(trainer.log_dir) / "validation" / "step_000002.json").read_text())
    assert set(scores) == {"step", "clip_i", "clip_t", "dino"} and scores["step"] == 2
    images = task.render(prompts, 0, 2, 16)  # the same rendering again: the same seed, the same weights
    references = data.dataset.instance_images
    clip = metrics.load_clip(str(clip_dir))
    assert scores["clip_i"] == pytest.approx(metrics.clip_i(images, references, clip[0]), abs=1e-5)
    assert scores["clip_t"] == pytest.approx(metrics.clip_t(images, prompts, *clip), abs=1e-5)
    assert scores["dino"] == pytest.approx(metrics.dino(images, references, tiny_dino()), abs=1e-5)
    logged = trainer.callback_metrics
    assert {"val/clip_i", "val/clip_t", "val/dino"} <= set(logged)
    with pytest.raises(ValueError, match="give validation_prompts too"):
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False).fit(
            DreamBoothTask(str(pipes["sd"]), DiffuseKronAConfig(), optimizer="adamw", validation_dino="tiny-dino"), data
        )


@pytest.mark.parametrize("adapter", ["diffusekrona", "lora"])
def test_sdxl_trains_with_two_text_encoders_and_micro_conditioning(pipes, tmp_path, adapter) -> None:
    import peft

    config = (
        DiffuseKronAConfig(layout="kron")
        if adapter == "diffusekrona"
        else peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    pl.seed_everything(0)
    task = DreamBoothTask(str(pipes["sdxl"]), config, optimizer="adamw", lr=1e-2)
    assert task.sdxl and len(task.frozen) == 3
    instance = write_images(tmp_path / "photos", 2, size=24)
    data = DreamBoothDataModule(str(instance), "a photo of sks dog", resolution=16, batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    _, embeds, added = task.encode(batch)
    assert embeds.shape == (2, 16, 64) and added["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(added["time_ids"][0], torch.tensor([24.0, 24, 0, 0, 16, 16]))
    before = {n: p.clone() for n, p in task.model.named_parameters() if p.requires_grad}
    _trainer(tmp_path).fit(task, data)
    after = dict(task.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert (tmp_path / "lightning_logs" / "version_0" / "adapter" / "adapter_config.json").is_file()


def test_bf16_mixed_precision_trains_with_the_vae_in_fp32(pipes, tmp_path, monkeypatch) -> None:
    """Lightning's ``bf16-mixed`` (runs on CPU too): the UNet computes under autocast, the VAE encodes in fp32 (the
    block that keeps SDXL's VAE from overflowing), the adapter's weights stay fp32 and train."""
    task = DreamBoothTask(str(pipes["sdxl"]), DiffuseKronAConfig(layout="kron"), optimizer="adamw", lr=1e-2)
    dtypes = []
    encode = task.pipe.vae.encode
    monkeypatch.setattr(task.pipe.vae, "encode", lambda x: dtypes.append(torch.get_autocast_dtype("cpu") if
                        torch.is_autocast_enabled("cpu") else x.dtype) or encode(x))  # fmt: skip
    data = DreamBoothDataModule(str(write_images(tmp_path / "photos", 2, size=24)), "a sks dog", resolution=16)
    before = {n: p.clone() for n, p in task.model.named_parameters() if p.requires_grad}
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", precision="bf16-mixed", default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(task, data)
    assert dtypes == [torch.float32, torch.float32]  # autocast off around the VAE
    trained = {n: p for n, p in task.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(before[n], trained[n]) for n in before)


def test_full_fine_tuning_trains_the_unet_only_and_exports_it(pipes, tmp_path) -> None:
    task = DreamBoothTask(str(pipes["sd"]), "full", optimizer="adamw", lr=1e-4)
    assert all(p.requires_grad for p in task.model.parameters())
    assert not any(p.requires_grad for p in task.frozen.parameters())
    data = DreamBoothDataModule(str(write_images(tmp_path / "photos", 1)), "a photo of sks dog", resolution=16)
    _trainer(tmp_path, steps=1).fit(task, data)
    fresh = load_pipeline(str(pipes["sd"])).unet
    loaded = mp.load_adapter(fresh, tmp_path / "lightning_logs" / "version_0" / "adapter")
    for (name, p), q in zip(task.model.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_bad_input_is_refused(pipes, tmp_path) -> None:
    bad = save_tiny_pipeline(tmp_path / "sample", prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        DreamBoothTask(str(bad), DiffuseKronAConfig())
    with pytest.raises(ValueError, match="snr_gamma=0"):
        DreamBoothTask(str(pipes["sd"]), DiffuseKronAConfig(), snr_gamma=0)
    with pytest.raises(ValueError, match="a1=64.*to_q|to_q.*a1"):
        DreamBoothTask(str(pipes["sd"]), DiffuseKronAConfig(a1=48))


def test_adamw8bit_falls_back_to_adamw_on_cpu_with_a_message() -> None:
    params = [{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.0}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build_optimizer(params, "adamw8bit", 1e-3)
    assert type(optimizer) is torch.optim.AdamW
    assert any("not on a GPU" in str(w.message) for w in caught)
