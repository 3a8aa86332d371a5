"""Instruction / answer pairs for causal-LM fine-tuning, with the prompt masked out of the loss.

Each record gives a prompt (its ``prompt_fields`` joined by newlines, or ``prompt_template.format(**record)``) and
an answer (``answer_field``). A training example is ``prompt tokens + answer tokens + EOS``, cut to ``max_length``;
its labels are ``-100`` on the prompt (no loss there) and the token ids on the answer, as alpaca-lora /
LLM-Adapters' ``finetune.py`` do with ``train_on_inputs=False`` (``train_on_prompt=True`` keeps the prompt in the
loss, their default). The prompt and the answer are tokenized separately (the prompt with the tokenizer's special
tokens, the answer without), so the mask falls exactly on the boundary.

For evaluation by generation a batch also carries the prompts alone, padded on the *left*
(``prompt_input_ids``, ``prompt_attention_mask``), and the answer ids padded with ``-100`` (``answer_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Record = dict[str, Any]
IGNORE_INDEX = -100
"""The label cross-entropy ignores (transformers' and torch's default)."""

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""LLM-Adapters' ``generate_prompt`` without an input (its lines indented by 16 spaces there; not here)."""


class InstructionDataset(torch.utils.data.Dataset):
    """``(prompt, answer)`` string pairs from records.

    Args:
        records: rows as dicts.
        prompt_fields: columns joined by newlines into the prompt (a newline follows); ignored with a template.
        answer_field: the answer column.
        prompt_template: ``str.format`` template over the record's columns (e.g. :data:`ALPACA_TEMPLATE`).
        source: where the records come from (for messages).

    Raises:
        ValueError: a missing column (the record named).
    """

    def __init__(
        self,
        records: Sequence[Record],
        prompt_fields: Sequence[str],
        answer_field: str,
        prompt_template: str | None = None,
        source: str = "",
    ) -> None:
        self.items: list[tuple[str, str]] = []
        for number, record in enumerate(records, 1):
            needed = [*([] if prompt_template is not None else prompt_fields), answer_field]
            missing = [f for f in needed if f not in record]
            if missing:
                raise ValueError(
                    f"{source}, record {number}: no column(s) {missing}; columns are {sorted(record)}. Set text_fields "
                    "(the prompt columns) and answer_field."
                )
            if prompt_template is None:
                prompt = "\n".join(str(record[f]) for f in prompt_fields) + "\n"
            else:
                try:
                    prompt = prompt_template.format(**record)
                except KeyError as e:
                    raise ValueError(
                        f"{source}, record {number}: prompt_template names the column {e.args[0]!r}, which the record "
                        f"lacks (columns: {sorted(record)}); fix the template."
                    ) from e
            self.items.append((prompt, str(record[answer_field])))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, str]:
        return self.items[i]


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


class InstructionCollate:
    """Tokenize ``(prompt, answer)`` pairs into a causal-LM batch (see the module docstring).

    Shapes:
        - ``input_ids``, ``attention_mask``, ``labels``: ``(N, T)``, right-padded, ``T <= max_length``
        - ``prompt_input_ids``, ``prompt_attention_mask``: ``(N, P)``, left-padded
        - ``answer_ids``: ``(N, A)``, padded with ``-100``
    """

    def __init__(self, tokenizer: Any, max_length: int, train_on_prompt: bool = False) -> None:
        self.tokenizer, self.max_length, self.train_on_prompt = tokenizer, max_length, train_on_prompt

    def __call__(self, items: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        ids, labels, prompts, answers = [], [], [], []
        for prompt, answer in items:
            p = list(tok(prompt, add_special_tokens=True)["input_ids"])[: self.max_length]
            a = list(tok(answer, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
            ids.append((p + a)[: self.max_length])
            labels.append(((p if self.train_on_prompt else [IGNORE_INDEX] * len(p)) + a)[: self.max_length])
            prompts.append(p)
            answers.append(a)
        input_ids = _pad(ids, pad)
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "labels": _pad(labels, IGNORE_INDEX),
            "prompt_input_ids": _pad(prompts, pad, left=True),
            "prompt_attention_mask": _pad([[1] * len(r) for r in prompts], 0, left=True),
            "answer_ids": _pad(answers, IGNORE_INDEX),
        }
