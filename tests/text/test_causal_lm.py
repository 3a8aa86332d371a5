"""Instruction data with the prompt masked out of the loss, and CausalLMTask: its loss, generation-based exact match,
a few training steps with native adapters on a tiny LLaMA, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import modalpeft as mp
from modalpeft.text.data import TextDataModule
from modalpeft.text.instructions import ALPACA_TEMPLATE, IGNORE_INDEX, InstructionCollate, InstructionDataset
from modalpeft.text.tasks import CausalLMTask, causal_lm

from .fixtures import cpu_trainer, write_tiny_model


def write_instructions(folder, n: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                row = {"instruction": f"is the {'cat' if i % 2 else 'dog'} good", "answer": "yes" if i % 2 else "no"}
                f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("llama") / "llama", "llama")


def test_collate_masks_the_prompt_and_pads_prompts_on_the_left(model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    items = [("the cat sat\n", "good film"), ("a dog\n", "bad")]
    batch = InstructionCollate(tok, max_length=32)(items)
    for row, (prompt, answer) in enumerate(items):
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]  # the test tokenizer has no EOS to append
        n = len(p) + len(a)
        assert batch["input_ids"][row, :n].tolist() == p + a
        assert batch["labels"][row, :n].tolist() == [IGNORE_INDEX] * len(p) + a
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and batch["attention_mask"][row].sum() == n
        width = batch["prompt_input_ids"].shape[1]
        assert batch["prompt_input_ids"][row, width - len(p) :].tolist() == p  # left padding
        assert batch["prompt_attention_mask"][row].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert [t for t in batch["answer_ids"][row].tolist() if t != IGNORE_INDEX] == a
    kept = InstructionCollate(tok, max_length=32, train_on_prompt=True)(items)
    torch.testing.assert_close(kept["labels"][0, : len(tok(items[0][0])["input_ids"])], kept["input_ids"][0, :5])
    assert InstructionCollate(tok, max_length=4)(items)["input_ids"].shape[1] == 4


def test_datamodule_reads_instructions_with_a_template(tmp_path, model_dir) -> None:
    data = TextDataModule(
        str(write_instructions(tmp_path / "d")),
        tokenizer=str(model_dir),
        task="causal_lm",
        prompt_template=ALPACA_TEMPLATE,
    )
    data.setup()
    prompt, answer = data.datasets["train"][0]
    assert prompt.endswith("### Instruction:\nis the dog good\n\n### Response:\n") and answer == "no"
    assert set(next(iter(data.val_dataloader()))) >= {"input_ids", "labels", "prompt_input_ids", "answer_ids"}


def test_bad_instruction_records_are_named() -> None:
    with pytest.raises(ValueError, match=r"record 2: no column\(s\) \['answer'\]"):
        InstructionDataset([{"instruction": "a", "answer": "b"}, {"instruction": "c"}], ["instruction"], "answer")
    with pytest.raises(ValueError, match="prompt_template names the column 'input'"):
        InstructionDataset([{"instruction": "a", "answer": "b"}], [], "answer", "{instruction} {input}")
    with pytest.raises(ValueError, match="task='lm' is not valid"):
        TextDataModule("x", task="lm")


def test_loss_is_the_answer_tokens_cross_entropy_and_exact_match_follows_generation(tmp_path, model_dir) -> None:
    torch.manual_seed(0)
    task = CausalLMTask(causal_lm(str(model_dir)), adapter=mp.LoFiTConfig(stage="scale", init_weights=False)).eval()
    data = TextDataModule(str(write_instructions(tmp_path / "d", n=4)), tokenizer=str(model_dir), task="causal_lm")
    data.setup()
    batch = next(iter(data.val_dataloader()))
    out = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]  # next-token prediction: position t predicts token t + 1
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    generated = task.generate(batch)
    answers = batch["answer_ids"]
    manual = [
        generated[i, : int((answers[i] != -100).sum())].tolist() == [t for t in answers[i] if t != -100]
        for i in range(len(answers))
    ]
    assert task.exact_match(batch).tolist() == manual
    right = {**batch, "answer_ids": generated}  # answers the model does generate are matched
    assert task.exact_match(right).all()


@pytest.mark.parametrize(
    "adapter",
    [
        mp.LLMAdaptersConfig(bottleneck_dim=4, target_modules=["up_proj", "gate_proj"]),
        mp.create_config("dept", num_tokens=3, rank=2, max_length=32),
    ],
    ids=["llm_adapters", "dept"],
)
def test_fit_a_few_steps_and_validate(adapter, tmp_path, model_dir) -> None:
    data = TextDataModule(
        str(write_instructions(tmp_path / "d")), tokenizer=str(model_dir), task="causal_lm", batch_size=4, max_length=32
    )
    task = CausalLMTask(causal_lm(str(model_dir)), adapter=adapter, lr=1e-2)
    trainer = cpu_trainer(tmp_path)
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 3
    metrics = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["val/exact_match"] <= 1.0 and torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_json_array_files_and_their_errors(tmp_path, model_dir) -> None:
    """LLM-Adapters' math_10k.json layout: one JSON array of {instruction, input, output, answer}."""
    folder = tmp_path / "math"
    folder.mkdir()
    rows = [
        {"instruction": f"{i} plus 1", "input": "", "output": f"the answer is {i + 1}", "answer": i + 1}
        for i in range(4)
    ]
    (folder / "train.json").write_text(json.dumps(rows))
    data = TextDataModule(str(folder), tokenizer=str(model_dir), task="causal_lm", answer_field="output")
    data.setup()
    assert data.datasets["train"][1] == ("1 plus 1\n", "the answer is 2")
    (folder / "train.json").write_text('[{"instruction": "a"}, 3]')
    with pytest.raises(ValueError, match="element 1 of the array is a int"):
        TextDataModule(str(folder), tokenizer=str(model_dir), task="causal_lm").setup()
    (folder / "train.json").write_text('[{"instruction": "a",\n}]')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        TextDataModule(str(folder), tokenizer=str(model_dir), task="causal_lm").setup()
