"""Small offline files the text tests use: a tiny tokenizer + model folder, GLUE-style TSV / CSV / JSONL splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
from transformers import BertTokenizerFast

from modalpeft.text import tiny_model

WORDS = "the a cat dog sat ran on mat fast slow good bad film movie is was very not".split()  # noqa: SIM905


def write_tokenizer(folder: Path) -> Path:
    """A 128-entry WordPiece vocabulary (the tiny models' vocab size) saved as a tokenizer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def write_tiny_model(folder: Path, arch: str = "bert") -> Path:
    """A tiny random transformers model with the tokenizer above, loadable by name = the folder."""
    tiny_model(arch).save_pretrained(folder)
    return write_tokenizer(folder)


def write_glue_sst(folder: Path, n: int = 12) -> Path:
    """SST-2's layout: ``sentence<TAB>label`` with a header, train/dev; test without labels (``index sentence``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"the film was {'very good' if i % 2 else 'not good'}", i % 2) for i in range(n)]
    for split in ("train", "dev"):
        lines = ["sentence\tlabel", *(f"{s}\t{y}" for s, y in rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (folder / "test.tsv").write_text("index\tsentence\n0\tthe cat sat\n1\tthe dog ran\n")
    return folder


def write_pairs_jsonl(folder: Path, n: int = 12) -> Path:
    """A pair task in JSONL with string labels (MNLI-like)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["entailment", "neutral", "contradiction"]
    for split in ("train", "validation"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"premise": "the cat sat", "hypothesis": f"a dog ran {i}", "label": names[i % 3]}))
                f.write("\n")
    return folder


def cpu_trainer(root: Path, max_steps: int = 3) -> pl.Trainer:
    """A quiet CPU Trainer for a few steps, writing under ``root`` only."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=root,
    )
