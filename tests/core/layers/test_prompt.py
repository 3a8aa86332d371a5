import math

import pytest
import timm
import torch
from torch import nn

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import PromptTokens


def _tiny_vit(**kwargs) -> nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3, **kwargs
    )
    return model.eval().requires_grad_(False)


def _host_blocks(model: nn.Module, prompts: list[PromptTokens]) -> list[AdapterLayer]:
    hosts = []
    for i, adapter in enumerate(prompts):
        host = AdapterLayer(model.blocks[i])
        host.add("default", adapter)
        host.active_adapter = "default"
        model.blocks[i] = host
        hosts.append(host)
    return hosts


def _record_inputs(modules: list[nn.Module]) -> list[torch.Tensor]:
    seen = []
    for module in modules:
        module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    return seen


def test_insert_places_prompts_after_prefix():
    torch.manual_seed(0)
    prompt = PromptTokens(3, 4, num_prefix_tokens=2, init_weights=False)
    x = torch.randn(2, 6, 4)
    y = prompt.pre(x)
    assert y.shape == (2, 9, 4)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(y[:, 2:5], prompt.prompts.expand(2, -1, -1))
    torch.testing.assert_close(y[:, 5:], x[:, 2:])


def test_replace_overwrites_previous_prompts():
    torch.manual_seed(0)
    prompt = PromptTokens(3, 4, mode="replace", num_prefix_tokens=1, init_weights=False)
    x = torch.randn(2, 8, 4)
    y = prompt.pre(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :1], x[:, :1])
    torch.testing.assert_close(y[:, 1:4], prompt.prompts.expand(2, -1, -1))
    torch.testing.assert_close(y[:, 4:], x[:, 4:])


def test_remove_after_restores_tokenwise_identity():
    # A token-wise base (no mixing across tokens) sees the prompts but, once they are removed, the other
    # tokens' outputs are exactly the unprompted ones.
    torch.manual_seed(0)
    base = nn.Linear(4, 4)
    host = AdapterLayer(base)
    host.add("default", PromptTokens(3, 4, num_prefix_tokens=1, remove_after=True, init_weights=False))
    host.active_adapter = "default"
    seen = _record_inputs([base])
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(host(x), base(x), atol=0, rtol=0)
    assert seen[0].shape == (2, 8, 4)


def test_init_bound_follows_vpt():
    torch.manual_seed(0)
    prompt = PromptTokens(10, 768)
    bound = math.sqrt(6 / (3 * 16 * 16 + 768))
    assert bound == 0.0625
    assert prompt.prompts.abs().max() <= bound and prompt.prompts.abs().max() > 0.95 * bound
    same = PromptTokens(10, 768, init_weights="identity")
    assert same.prompts.abs().max() <= bound
    assert PromptTokens(10, 64, patch_area=8 * 8).prompts.abs().max() <= math.sqrt(6 / (3 * 64 + 64))
    assert PromptTokens(10, 768, init_weights=False).prompts.std() > 0.5


def test_dropout_draws_a_mask_per_sample():
    torch.manual_seed(0)
    prompt = PromptTokens(4, 16, dropout=0.5, num_prefix_tokens=0)
    x = torch.zeros(2, 3, 16)
    y = prompt.pre(x)[:, :4]
    assert not torch.equal(y[0], y[1])
    prompt.eval()
    torch.testing.assert_close(prompt.pre(x)[:, :4], prompt.prompts.expand(2, -1, -1))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dim=4.*C=4.*shape \\(2, 5, 6\\)"):
        PromptTokens(2, 4).pre(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="needs at least 4 tokens, got a sequence of 3"):
        PromptTokens(3, 4, mode="replace").pre(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mode='remove'"):
        PromptTokens(3, 4, mode="remove")


def test_not_mergeable():
    host = AdapterLayer(nn.Linear(4, 4))
    host.add("default", PromptTokens(2, 4))
    with pytest.raises(ValueError, match="cannot be merged"):
        host.merge("default")


def test_vpt_deep_on_timm_vit():
    torch.manual_seed(0)
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    y_base = model(x)
    num_patches, k, p, dim = 16, model.num_prefix_tokens, 5, model.embed_dim
    prompts = [
        PromptTokens(p, dim, num_prefix_tokens=k, patch_area=64),
        PromptTokens(p, dim, mode="replace", num_prefix_tokens=k, remove_after=True, patch_area=64),
    ]
    hosts = _host_blocks(model, prompts)
    outer = _record_inputs(hosts)
    inner = _record_inputs([host.base_layer for host in hosts])
    out = _record_inputs([model.norm])
    y = model(x)

    assert y.shape == (2, 3) and not torch.allclose(y, y_base)
    assert [t.shape[1] for t in outer] == [k + num_patches, k + p + num_patches]
    assert [t.shape[1] for t in inner] == [k + p + num_patches] * 2
    assert out[0].shape[1] == k + num_patches
    # Block 1 keeps block 0's class and patch outputs and swaps its prompt outputs for its own prompts.
    torch.testing.assert_close(inner[1][:, :k], outer[1][:, :k])
    torch.testing.assert_close(inner[1][:, k : k + p], prompts[1].prompts.expand(2, -1, -1))
    torch.testing.assert_close(inner[1][:, k + p :], outer[1][:, k + p :])

    y.sum().backward()
    assert all(prompt.prompts.grad.abs().sum() > 0 for prompt in prompts)
    assert all(param.grad is None for param in model.parameters() if not param.requires_grad)


def test_vpt_shallow_with_register_tokens():
    torch.manual_seed(0)
    model = _tiny_vit(reg_tokens=4, no_embed_class=True)
    k = model.num_prefix_tokens
    assert k == 5
    prompt = PromptTokens(3, model.embed_dim, num_prefix_tokens=k)
    (host,) = _host_blocks(model, [prompt])
    outer = _record_inputs([host])
    inner = _record_inputs([host.base_layer, model.blocks[1]])
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    assert [t.shape[1] for t in inner] == [k + 3 + 16] * 2
    torch.testing.assert_close(inner[0][:, :k], outer[0][:, :k])
    torch.testing.assert_close(inner[0][:, k : k + 3], prompt.prompts.expand(2, -1, -1))
    torch.testing.assert_close(inner[0][:, k + 3 :], outer[0][:, k:])
