"""Small models that every method is tested on: each has a ``head`` to save and a ``make_input``.

:func:`make` gives them random biases, norm affines and BatchNorm running statistics (:func:`perturb`): PyTorch's
default init leaves many biases at 0 and every norm weight at 1, under which a merge that forgets to scale a
bias, or drops a norm weight, still looks exact.
"""

from __future__ import annotations

import timm
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))))

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randn(4, 16)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv2(torch.relu(self.norm(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randn(2, 3, 8, 8)


class MHAModel(nn.Module):
    """A torch ``nn.TransformerEncoderLayer`` (its attention is ``nn.MultiheadAttention``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randn(2, 5, 16)


def tiny_vit() -> nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
    )
    model.make_input = lambda: torch.randn(2, 3, 16, 16)
    return model


def tiny_point_transformer() -> nn.Module:
    """modalpeft's Point-MAE encoder in its test size (width 32, 2 blocks, 16 groups; clouds of 128 points)."""
    from modalpeft.pointcloud import create_backbone

    model = create_backbone("point_mae_test", num_classes=4)
    model.make_input = lambda: torch.randn(2, 128, 3)
    return model


class TinyUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` (widths 8/16, one cross-attention level, text width 12) denoising
    latents at a fixed timestep under a fixed prompt embedding; the head pools the predicted noise."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            sample_size=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        self.register_buffer("text", torch.randn(1, 3, 12))
        self.head = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sample = self.unet(x, 10, self.text.expand(len(x), -1, -1)).sample
        return self.head(sample.mean(dim=(2, 3)))

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randn(2, 4, 4, 4)


class TinyBert(nn.Module):
    """A 2-layer transformers BERT (width 32), mean-pooled over tokens, with a head; input: token ids."""

    def __init__(self) -> None:
        super().__init__()
        from modalpeft.text import tiny_model

        self.encoder = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(1))

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randint(0, 128, (2, 6))


class TinyMusicgen(nn.Module):
    """A 2-block transformers ``MusicgenForCausalLM`` (width 16, 2 codebooks of 16 codes), a causal decoder; the
    head maps each position's logits to 4 outputs. Input: code ids ``(B·K, T)``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

        config = MusicgenDecoderConfig(
            vocab_size=16,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            num_codebooks=2,
            max_position_embeddings=32,
            pad_token_id=16,
            bos_token_id=16,
            decoder_start_token_id=16,
            dropout=0.0,
        )
        self.decoder = MusicgenForCausalLM(config)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(input_ids=input_ids, use_cache=False).logits)

    @staticmethod
    def make_input() -> torch.Tensor:
        return torch.randint(0, 16, (2 * 2, 6))


TOY_MODELS = {
    "mlp": MLP,
    "conv": ConvNet,
    "vit": tiny_vit,
    "mha": MHAModel,
    "points": tiny_point_transformer,
    "unet": TinyUNet,
    "bert": TinyBert,
    "musicgen": TinyMusicgen,
}
MODALITY = {
    "mlp": ("core",),
    "conv": ("vision",),
    "vit": ("vision", "tracking"),
    "mha": ("core",),
    "points": ("pointcloud",),
    "unet": ("diffusion",),
    "bert": ("text",),
    "musicgen": ("audio",),
}
"""The modalities each toy model stands for: a method registered for a modality must apply to one of its toys. The
ViT stands for tracking too: a tracker is a ViT with tokens and heads around it, and its methods adapt the ViT."""


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``model`` (in place) random biases (``N(0, 0.2²)``), norm weights (``U(0.5, 1.5)``) and BatchNorm
    running statistics (mean ``N(0, 0.3²)``, variance ``U(0.5, 2)``), drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(like.shape, generator=g)).to(like.dtype)

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("bias"):  # bias, nn.MultiheadAttention's in_proj_bias
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if isinstance(module, NORMS) and getattr(module, "weight", None) is not None:
            module.weight.copy_(draw(module.weight, 0.5, 1.5))
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(draw(module.running_var, 0.5, 2.0))
            module.num_batches_tracked.fill_(10)
    return model


def make(name: str, seed: int = 0) -> nn.Module:
    r"""A fresh toy model with deterministic weights (:func:`perturb`\ ed), in eval mode."""
    torch.manual_seed(seed)
    return perturb(TOY_MODELS[name](), seed).eval()
