"""DePT against transcriptions of the official ``PROMPT_TUNING_LORA`` branches (ZhengxiangShi/DePT @ f0266a774a45,
``peft/peft_model.py``: ``PeftModelForSeq2SeqLM.forward``, ``PeftModelForCausalLM.forward`` and ``generate``), its
count, text init, two learning rates and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

import modalpeft as mp
from modalpeft.core.state import read_config
from modalpeft.lightning.optim import param_groups
from modalpeft.text import DePTConfig, tiny_model
from modalpeft.text.backbones import tiny_config
from modalpeft.text.methods.dept import OFFICIAL_INIT_TEXT, dept_modules
from modalpeft.text.tasks import TextClassificationTask, TextClassifier

from .fixtures import write_tokenizer


def dept(**kwargs) -> DePTConfig:
    return mp.create_config("dept", **{"num_tokens": 4, "rank": 2, "max_length": 8, "init_weights": False, **kwargs})


def official_inputs(model: mp.AdaptedModel, embed: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """The official branch: ``inputs_embeds += scaling * (A @ B).repeat(N, 1, 1)`` (inputs padded to exactly
    ``max_length``), then ``cat(prompts, inputs_embeds)``."""
    d = dept_modules(model)[0]
    n = input_ids.shape[0]
    inputs_embeds = embed(input_ids)
    inputs_embeds = inputs_embeds + d.scaling * (d.lora_A @ d.lora_B).repeat(n, 1, 1)
    prompts = d.prompt.expand(n, -1, -1)
    return torch.cat((prompts, inputs_embeds), dim=1)


def test_count_is_the_spec_formula_and_t5_base_matches_100_prompt_tokens() -> None:
    # spec §2(f): m·d + L_max·r + r·d; t5-base (d=768), L_max=256: m=60, r=30 and m=80, r=15 both give 100·768
    for m, r in ((60, 30), (80, 15)):
        assert m * 768 + 256 * r + r * 768 == 76_800 == 100 * 768
    model = mp.adapt(transformers.T5ForConditionalGeneration(tiny_config("t5")), dept(num_tokens=5, rank=3))
    assert model.trainable_summary()["trainable"] == 5 * 32 + 8 * 3 + 3 * 32
    d = dept_modules(model)[0]
    assert d.scaling == pytest.approx(8.0 / math.sqrt(3))  # lora_alpha / sqrt(r), official default alpha 8


def test_t5_loss_equals_the_official_seq2seq_branch() -> None:
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(tiny_config("t5")).eval()
    model = mp.adapt(t5, dept())
    ids = torch.randint(2, 128, (2, 8))  # padded to exactly max_length, as the official scripts do
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(2, 128, (2, 3))
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    with model.disable_adapters():
        prefix_attention_mask = torch.ones(2, 4, dtype=mask.dtype)
        official = t5(
            inputs_embeds=official_inputs(model, t5.get_input_embeddings(), ids),
            attention_mask=torch.cat((prefix_attention_mask, mask), dim=1),
            labels=labels,
        )
    torch.testing.assert_close(ours.loss, official.loss)
    torch.testing.assert_close(ours.logits, official.logits)
    assert ours.encoder_last_hidden_state.shape == (2, 4 + 8, 32)  # T5's encoder keeps the prompt positions


def llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config("llama")).eval()


def test_causal_lm_loss_equals_the_official_branch_with_ignored_prompt_labels() -> None:
    lm = llama()
    model = mp.adapt(lm, dept())
    ids = torch.randint(3, 128, (2, 8))
    labels = ids.clone()
    labels[:, 0] = -100  # the one difference: officially the last prompt position predicts the first token
    ours = model(input_ids=ids, labels=labels)
    assert ours.logits.shape == (2, 8, 128)  # the prompt positions are dropped
    with model.disable_adapters():
        prefix_labels = torch.full((2, 4), -100)
        official = lm(
            inputs_embeds=official_inputs(model, lm.get_input_embeddings(), ids),
            labels=torch.cat((prefix_labels, labels), dim=1),
        )
    torch.testing.assert_close(ours.loss, official.loss)
    torch.testing.assert_close(ours.logits, official.logits[:, 4:])


def test_generate_equals_the_official_greedy_decoding() -> None:
    """Official ``generate``: the update and prompt on the prompt-side embeddings only; new tokens embed plainly."""
    lm = llama()
    model = mp.adapt(lm, dept(max_length=16))
    ids = torch.randint(3, 128, (2, 5))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    d = dept_modules(model)[0]
    seq = ids
    with model.disable_adapters(), torch.no_grad():
        for _ in range(4):
            e = lm.get_input_embeddings()(seq)
            e = torch.cat([e[:, :5] + d.scaling * (d.lora_A[:5] @ d.lora_B), e[:, 5:]], 1)
            logits = lm(inputs_embeds=torch.cat([d.prompt.expand(2, -1, -1), e], 1), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(out, seq)


def test_t5_generate_runs_with_the_prompt_in_the_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    model = mp.adapt(transformers.T5ForConditionalGeneration(tiny_config("t5")).eval(), dept())
    ids = torch.randint(2, 128, (2, 6))
    mask = torch.ones_like(ids)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    seq = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(out, seq)
    model.save_adapter(tmp_path / "a")
    fresh = transformers.T5ForConditionalGeneration(tiny_config("t5")).eval()
    with torch.no_grad():
        fresh.load_state_dict(model.unload().state_dict())
    loaded = mp.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3), out)


def test_encoder_classifier_ignores_right_padding_and_keeps_its_outputs_aligned() -> None:
    torch.manual_seed(0)
    clf = TextClassifier(tiny_model("bert"), num_classes=3).eval()
    model = mp.adapt(clf, dept(), modules_to_save=["head"])
    ids = torch.randint(5, 128, (1, 5))
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(
        model(input_ids=padded, attention_mask=mask, token_type_ids=torch.zeros_like(mask)), short
    )


def test_text_init_repeats_the_token_embeddings_to_m_rows(tmp_path) -> None:
    folder = write_tokenizer(tmp_path / "tok")
    text = "the cat sat"
    config = dept(num_tokens=7, init_text=text, tokenizer=str(folder), init_weights=True)
    ids = transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert config.init_token_ids == ids and len(ids) == 5  # [CLS] the cat sat [SEP]
    clf = TextClassifier(tiny_model("bert"), num_classes=2)
    model = mp.adapt(clf, config)
    table = clf.encoder.get_input_embeddings().weight
    d = dept_modules(model)[0]
    torch.testing.assert_close(d.prompt.detach(), table[torch.tensor((ids * 2)[:7])].detach())
    assert torch.count_nonzero(d.lora_B) == 0 and torch.count_nonzero(d.lora_A) > 0  # the update starts at 0
    # the saved config carries the ids: loading needs no tokenizer
    model.save_adapter(tmp_path / "a")
    assert read_config(tmp_path / "a")["init_token_ids"] == ids
    loaded = mp.load_adapter(TextClassifier(tiny_model("bert"), num_classes=2), tmp_path / "a")
    torch.testing.assert_close(dept_modules(loaded)[0].prompt, d.prompt)
    assert OFFICIAL_INIT_TEXT == "Classify this text is postive or not:"


def test_two_learning_rates_in_the_task_optimizer() -> None:
    torch.manual_seed(0)
    task = TextClassificationTask(
        TextClassifier(tiny_model("bert"), num_classes=2), 2, adapter=dept(embedding_lr=5e-3), lr=0.3
    )
    groups = dept_modules(task.model)[0].lora_A, dept_modules(task.model)[0].lora_B
    optimizer = task.adapter_config().build_optimizer(task.model, param_groups(task.model, 1e-5), 0.3)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(groups[0])] == lrs[id(groups[1])] == 5e-3
    assert lrs[id(dept_modules(task.model)[0].prompt)] == 0.3 == lrs[id(task.model.head.weight)]
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(groups[0])] == 0.0 and decay[id(task.model.head.weight)] == 1e-5  # DePT's tensors never decay


def test_bad_input_is_named() -> None:
    clf = TextClassifier(tiny_model("bert", max_position_embeddings=10), num_classes=2)
    model = mp.adapt(clf, dept(max_length=8))
    with pytest.raises(ValueError, match=r"9 tokens but the position-wise update has max_length=8"):
        model(input_ids=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"4 prompt tokens \+ 7 input tokens exceed the model's 10 learned positions"):
        model(input_ids=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="not a bare BertModel"):
        mp.adapt(tiny_model("bert"), dept())
    with pytest.raises(ValueError, match="needs tokenizer="):
        dept(init_text="hello")
    with pytest.raises(ValueError, match="rank=0 must be an integer"):
        dept(rank=0)
