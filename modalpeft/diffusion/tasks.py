r"""DreamBooth through Lightning: personalise a text-to-image pipeline's UNet with an adapter on a few photos.

    task = DreamBoothTask("stabilityai/stable-diffusion-xl-base-1.0", DiffuseKronAConfig(a1=64, a2=8), lr=1e-3,
                          validation_prompts=["a photo of sks dog in the snow"])
    pl.Trainer(max_steps=1000, accumulate_grad_batches=4, precision="16-mixed").fit(task, DreamBoothDataModule(...))

The pipeline (SD 1.x/2.x: one text encoder; SDXL: two, with the micro-conditioning ``time_ids`` and pooled text
embeddings) is loaded by name or path with ``DiffusionPipeline.from_pretrained``; only its UNet is adapted (the VAE
and text encoders are frozen and stay in eval mode). One step (diffusers' ``train_dreambooth_lora*.py``): latents
``z = s·E(x)`` from the VAE, noise ``ε`` and a timestep ``t ~ U{0..T-1}`` per image, ``z_t`` from the training
(DDPM) scheduler built from the pipeline's scheduler config, and the MSE between the UNet's output and the target of
the scheduler's ``prediction_type``: ``ε`` (epsilon) or ``v = √ᾱ_t ε - √(1-ᾱ_t) z`` (v_prediction). With
``snr_gamma`` each image's MSE is weighted by Min-SNR (Hang et al., ICCV 2023, https://arxiv.org/abs/2303.09556):
``min(SNR_t, γ) / SNR_t`` for epsilon and ``min(SNR_t, γ) / (SNR_t + 1)`` for v-prediction, ``SNR_t = ᾱ_t/(1-ᾱ_t)``.
With prior preservation the class images' MSE joins with weight ``prior_loss_weight``.

Every ``validation_every_n_steps`` steps the ``validation_prompts`` are rendered with a fixed seed into a PNG grid,
``<run folder>/validation/step_<N>.png`` (and logged to TensorBoard / a logger with ``log_image``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftConfig
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.config import AdapterConfig
from ..core.model import AdaptedModel
from ..core.state import atomic_write
from ..lightning.optim import OptimizerName, SchedulerName
from ..lightning.task import AdapterTask
from .pipeline import load_pipeline, png_bytes

PREDICTION_TYPES = ("epsilon", "v_prediction")


def diffusion_target(scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet is trained to predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"the scheduler's prediction_type={kind!r} is not supported; DreamBooth trains {PREDICTION_TYPES}."
    )


def min_snr_weights(scheduler: Any, timesteps: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ loss weights per timestep (see the module docstring)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


class DreamBoothTask(AdapterTask):
    """DreamBooth fine-tuning of a pipeline's UNet with an adapter (or ``"full"``).

    Batches come from :class:`~modalpeft.diffusion.data.DreamBoothDataModule`. ``self.model`` is the adapted UNet
    (``pipe.unet`` adapted in place); the exported adapter (``<run folder>/adapter``) loads into a pipeline with
    :func:`modalpeft.diffusion.load_into_pipeline`.

    Args:
        pipeline: a diffusers pipeline's Hub name or local folder (SD 1.x/2.x, SDXL).
        adapter: a method config (``DiffuseKronAConfig``, ``peft.LoraConfig``, ``peft.LoKrConfig``, ...) or ``"full"``.
        revision: the pipeline's Hub revision.
        variant: the weights' variant (``"fp16"``).
        prior_loss_weight: weight of the class images' loss (prior preservation).
        snr_gamma: Min-SNR-γ weighting (5.0 is the paper's); ``None``: plain MSE.
        gradient_checkpointing: recompute the UNet's activations in the backward pass (less memory, slower).
        validation_prompts: prompts rendered every ``validation_every_n_steps`` steps (``None``: none).
        validation_every_n_steps: how often to render them.
        validation_seed: the seed of every rendering (the same noise each time).
        validation_inference_steps: denoising steps of a rendering.
        validation_guidance_scale: classifier-free guidance of a rendering.
        validation_resolution: side of a rendering (``None``: the UNet's default size).
        validation_clip: a CLIP model (transformers ``CLIPModel``: Hub name in the cache, or folder): each rendering
            also logs ``val/clip_i`` (its images against the instance images) and ``val/clip_t`` (against their
            prompts), DreamBooth's metrics (:mod:`modalpeft.diffusion.metrics`). Loaded when fit starts; missing
            weights stop the run there, saying how to get them.
        validation_dino: a timm DINO model name (weights in the cache): each rendering also logs ``val/dino``
            against the instance images. The figures also go to ``validation/step_<N>.json``.
        optimizer: ``"adamw8bit"`` (the official scripts', bitsandbytes on a GPU; AdamW otherwise, with a warning),
            ``"adamw"`` or ``"sgd"``.
        lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr: as :class:`~modalpeft.lightning.AdapterTask`
            (DiffuseKronA's official scripts: constant 1e-3; diffusers' LoRA DreamBooth example: 1e-4).
    """

    def __init__(
        self,
        pipeline: str,
        adapter: AdapterConfig | PeftConfig | Literal["full"],
        revision: str | None = None,
        variant: str | None = None,
        prior_loss_weight: float = 1.0,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        validation_prompts: list[str] | None = None,
        validation_every_n_steps: int = 100,
        validation_seed: int = 0,
        validation_inference_steps: int = 25,
        validation_guidance_scale: float = 5.0,
        validation_resolution: int | None = None,
        validation_clip: str | None = None,
        validation_dino: str | None = None,
        optimizer: OptimizerName = "adamw8bit",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        momentum: float = 0.9,
        scheduler: SchedulerName = "constant",
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        from diffusers import DDPMScheduler

        if validation_every_n_steps < 1:
            raise ValueError(f"validation_every_n_steps={validation_every_n_steps!r} must be >= 1.")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma={snr_gamma!r} must be > 0 (5.0 is Min-SNR's), or None for plain MSE.")
        pipe = load_pipeline(pipeline, revision, variant)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        kind = noise_scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"pipeline={pipeline!r}: prediction_type={kind!r} is not one of {PREDICTION_TYPES}.")
        if gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        super().__init__(
            pipe.unet, adapter, None, optimizer, lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr
        )
        self.pipe, self.noise_scheduler = pipe, noise_scheduler
        self._rendered_at = -1
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.sdxl else [])
        self.frozen = nn.ModuleList([m for m in (pipe.vae, *encoders) if m is not None])
        self.frozen.requires_grad_(False).eval()
        self.judges: dict[str, Any] = {}  # the validation metrics' encoders, loaded when fit starts

    def train(self, mode: bool = True) -> DreamBoothTask:
        super().train(mode)
        self.frozen.eval()  # the VAE and text encoders only encode
        return self

    # -- one step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """Latents, text embeddings and (SDXL) the added conditioning of a batch, from the frozen encoders."""
        pixels = batch["pixel_values"].to(self.device)
        vae = self.pipe.vae
        if vae is None:  # a pixel-space denoiser
            latents = pixels
        else:
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            with torch.autocast(self.device.type, enabled=False):  # SDXL's VAE overflows in fp16: encode in fp32
                posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
            latents = (posterior.sample() - shift) * vae.config.scaling_factor
        if not self.sdxl:
            embeds, _ = self.pipe.encode_prompt(batch["prompts"], self.device, 1, False)
            return latents, embeds, None
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=batch["prompts"], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = pixels.shape[-2:]
        target = torch.tensor(size, device=self.device).expand(len(pixels), 2)
        time_ids = torch.cat(
            [batch["original_sizes"].to(self.device), batch["crops_top_left"].to(self.device), target], 1
        )
        return latents, embeds, {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}

    def step(self, batch: dict[str, Any], stage: str) -> Tensor:
        latents, embeds, added = self.encode(batch)
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        pred = self.model(noisy, timesteps, encoder_hidden_states=embeds, **kwargs).sample
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        if self.hparams.snr_gamma is not None:
            per_image = per_image * min_snr_weights(self.noise_scheduler, timesteps, self.hparams.snr_gamma)
        n = batch["num_instance"]
        loss = per_image[:n].mean()
        if len(per_image) > n:
            prior = per_image[n:].mean()
            self.log(f"{stage}/prior_loss", prior.detach(), on_step=True, on_epoch=False)
            self.log(f"{stage}/instance_loss", loss.detach(), on_step=True, on_epoch=False)
            loss = loss + self.hparams.prior_loss_weight * prior
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    # -- images ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _frozen_unet(self):
        """Within the block the UNet computes as the frozen base model (adapters disabled)."""
        if isinstance(self.model, AdaptedModel):
            with self.model.disable_adapters():
                yield
        else:
            yield

    @torch.no_grad()
    def render(
        self, prompts: list[str], seed: int, steps: int, resolution: int | None = None, guidance: float = 5.0
    ) -> Tensor:
        """Images ``(len(prompts), 3, H, W)`` in [0, 1] for ``prompts``, from a fixed ``seed``, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            device = self.device
            generator = torch.Generator(device=device).manual_seed(seed)
            size = {"height": resolution, "width": resolution} if resolution else {}
            out = self.pipe(
                prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt",
                **size,
            )  # fmt: skip
            return out.images.float().cpu()
        finally:
            self.model.train(was_training)

    def sample_images(self, prompt: str, count: int, resolution: int, seed: int, steps: int) -> list[Any]:
        """``count`` images of ``prompt`` from the frozen model, as PIL images (prior preservation's class images)."""
        from torchvision.transforms.functional import to_pil_image

        trainer = self._trainer
        if trainer is not None:  # called from prepare_data, before Lightning moves the model to its device
            self.to(trainer.strategy.root_device)
        with self._frozen_unet():
            images = self.render([prompt] * count, seed, steps, resolution)
        return [to_pil_image(image) for image in images]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        hp = self.hparams
        if (hp.validation_clip or hp.validation_dino) and not hp.validation_prompts:
            raise ValueError(
                "validation_clip / validation_dino score the validation renderings: give validation_prompts too."
            )
        from . import metrics

        if hp.validation_clip and "clip" not in self.judges:
            self.judges["clip"] = metrics.load_clip(hp.validation_clip)
        if hp.validation_dino and "dino" not in self.judges:
            self.judges["dino"] = metrics.load_dino(hp.validation_dino)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        hp, step = self.hparams, self.global_step
        # with gradient accumulation global_step stays put for several batches: render once per optimiser step
        if hp.validation_prompts and step % hp.validation_every_n_steps == 0 and step not in (0, self._rendered_at):
            self._rendered_at = step
            self.log_validation_images()

    def log_validation_images(self) -> Tensor:
        """Render the validation prompts into ``<run folder>/validation/step_<N>.png`` and the loggers; returns them."""
        from torchvision.transforms.functional import to_pil_image
        from torchvision.utils import make_grid

        hp = self.hparams
        images = self.render(
            list(hp.validation_prompts), hp.validation_seed, hp.validation_inference_steps, hp.validation_resolution,
            hp.validation_guidance_scale,
        )  # fmt: skip
        grid = make_grid(images, nrow=len(images), padding=2)
        scores = self.validation_scores(images)
        for name, value in scores.items():
            self.log(f"val/{name}", value, on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "validation"
            files: dict[str, Any] = {f"step_{self.global_step:06d}.png": png_bytes(to_pil_image(grid))}
            if scores:
                files[f"step_{self.global_step:06d}.json"] = {"step": self.global_step, **scores}
            atomic_write(files, folder)
            for logger in self.trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):  # TensorBoard
                    experiment.add_image("validation", grid, self.global_step)
                elif hasattr(logger, "log_image"):  # Weights & Biases, ...
                    logger.log_image(key="validation", images=[to_pil_image(grid)], step=self.global_step)
        return images

    @torch.no_grad()
    def validation_scores(self, images: Tensor) -> dict[str, float]:
        """CLIP-I, CLIP-T and DINO of validation renderings against the instance images (the encoders given)."""
        if not self.judges:
            return {}
        from .metrics import personalisation_metrics

        dataset = getattr(getattr(self.trainer, "datamodule", None), "dataset", None)
        references = getattr(dataset, "instance_images", None)
        if not references:
            raise ValueError(
                "the validation metrics compare renderings with the instance images: train with a DreamBoothDataModule "
                "(its dataset's instance_images), or leave validation_clip / validation_dino unset."
            )
        clip = self.judges.get("clip")
        if clip is not None:
            clip = (clip[0].to(self.device), clip[1])
        dino = self.judges.get("dino")
        out = personalisation_metrics(
            images,
            references,
            list(self.hparams.validation_prompts),
            clip,
            None if dino is None else dino.to(self.device),
        )
        return {k: float(v) for k, v in out.items()}


__all__ = ["DreamBoothTask", "diffusion_target", "load_pipeline", "min_snr_weights"]
