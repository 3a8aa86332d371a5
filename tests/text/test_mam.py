"""MAM: our parallel adapter + peft's prefix, one adapter. The prefix part equals peft's own prefix tuning where peft
runs it (a LLaMA causal LM); both parts train, save and load together; the count is the spec's."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

import modalpeft as mp
from modalpeft.text import MAMConfig, tiny_model
from modalpeft.text.backbones import tiny_config
from modalpeft.text.methods.mam import PeftPrefix
from modalpeft.text.tasks import TextClassifier


def mam(**kwargs) -> MAMConfig:
    return mp.create_config("mam", **{"bottleneck_dim": 4, "prefix_tokens": 3, "prefix_hidden": 8, **kwargs})


def prefix_module(model: mp.AdaptedModel) -> PeftPrefix:
    return next(m for m in model.modules() if isinstance(m, PeftPrefix))


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config("llama")).eval()


def test_prefix_equals_peft_prefix_tuning_on_a_causal_lm() -> None:
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    reference = peft.get_peft_model(
        llama(),
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8, prefix_projection=True
        ),
    )
    ours = mp.adapt(llama(), mam(init_weights="identity"))  # the parallel adapters start at 0 (up = 0)
    prefix = prefix_module(ours)
    prefix.encoder.load_state_dict(reference.prompt_encoder["default"].state_dict())
    expected = reference(input_ids=ids, attention_mask=mask, labels=ids)
    got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


def test_count_is_parallel_adapters_plus_peft_prefix_encoder() -> None:
    d, layers, r, n, hidden = 32, 2, 4, 3, 8  # the tiny BERT; n = l, the prefix length
    model = mp.adapt(TextClassifier(tiny_model("bert"), 2), mam())
    parallel = layers * (2 * d * r + r + d)
    prefix = n * d + (d * hidden + hidden) + (hidden * 2 * layers * d + 2 * layers * d)
    assert model.trainable_summary()["trainable"] == parallel + prefix
    flat = mp.adapt(TextClassifier(tiny_model("bert"), 2), mam(prefix_projection=False))
    assert flat.trainable_summary()["trainable"] == parallel + n * 2 * layers * d
    # grouped-query LLaMA (4 heads, 2 key/value heads of 8): the prefix holds key/value widths, 2 x 8 = 16
    kv = 16
    decoder = mp.adapt(llama(), mam())
    assert decoder.trainable_summary()["trainable"] == parallel + n * kv + (kv * hidden + hidden) + (
        hidden * 2 * layers * kv + 2 * layers * kv
    )


def test_both_parts_train_and_save_and_load_together(tmp_path) -> None:
    torch.manual_seed(0)
    model = mp.adapt(
        TextClassifier(tiny_model("bert"), 3), mam(init_weights=False, scaling=2.0), modules_to_save=["head"]
    )
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split("adapters.default.")[1] for n in trainable if "head" not in n} == {
        *(f"{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")),
        "encoder.embedding.weight",
        *(f"encoder.transform.{i}.{t}" for i in (0, 2) for t in ("weight", "bias")),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask).sum().backward()
        optimizer.step()
    model.eval()
    expected = model(input_ids=ids, attention_mask=mask)
    model.save_adapter(tmp_path / "mam")
    torch.manual_seed(0)
    loaded = mp.load_adapter(TextClassifier(tiny_model("bert"), 3), tmp_path / "mam")
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask), expected)
    with loaded.disable_adapters():
        assert not torch.allclose(loaded(input_ids=ids, attention_mask=mask), expected)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="prefix_tokens=0 must be an integer"):
        mam(prefix_tokens=0)
    with pytest.raises(ValueError, match="encoder-decoder models"):
        mp.adapt(transformers.T5ForConditionalGeneration(tiny_config("t5")), mam())
    with pytest.raises(ValueError, match="not a bare BertModel"):
        mp.adapt(tiny_model("bert"), mam())
