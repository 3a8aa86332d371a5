"""Text data: CSV / TSV (GLUE's layout included) / JSONL files and ``datasets``' saved-to-disk folders.

A folder holds one file per split, ``train``, ``dev`` (or ``validation`` / ``val``) and ``test``, each
``.tsv`` (tab-separated with a header row and no quoting: GLUE's layout, e.g. ``SST-2/train.tsv`` with columns
``sentence  label``, ``MRPC`` with ``#1 String  #2 String  Quality``), ``.csv`` (with a header), ``.jsonl``
(one object per line) or ``.json`` (one array of objects: Alpaca / LLM-Adapters' ``math_10k.json``); or it is a
``datasets.DatasetDict.save_to_disk`` folder (``dataset_dict.json``), read with ``datasets.load_from_disk`` when
``datasets`` is installed.

Batches are dicts of the tokenizer's tensors (``input_ids``, ``attention_mask``, ...) plus ``labels``:
class indices, or floats for regression (``num_labels == 1``, STS-B). With ``task="causal_lm"`` the records are
instruction / answer pairs and the batches those of :class:`~modalpeft.text.instructions.InstructionCollate`
(the prompt masked out of the loss).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .instructions import InstructionCollate, InstructionDataset

SPLITS = {"train": ("train",), "val": ("dev", "validation", "val"), "test": ("test",)}
SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
DataTask = Literal["classification", "causal_lm"]

Record = dict[str, Any]


def read_records(path: str | Path) -> list[Record]:
    """The rows of a ``.tsv``/``.csv``/``.jsonl``/``.json`` file as dicts.

    Raises:
        ValueError: an unknown suffix, an empty file, or a malformed line (named with its number).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown text file type {path.suffix!r}; use one of {list(SUFFIXES)}.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs a header row (.tsv/.csv) or one JSON object per line (.jsonl).")
    if path.suffix == ".json":
        return _json_array(path, text)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}); fix or remove the line.") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
        return records
    tsv = path.suffix == ".tsv"
    reader = csv.reader(text.splitlines(), delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else 0)
    rows = list(reader)
    header = rows[0]
    records = []
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(row)} fields where the header {header} has {len(header)}; fix the line "
                f"(a stray {'tab' if tsv else 'comma or quote'}?)."
            )
        records.append(dict(zip(header, row, strict=True)))
    return records


def _json_array(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file.") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(data).__name__}; or use .jsonl.")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: element {bad} of the array is a {type(data[bad]).__name__}, not an object.")
    return data


def split_file(folder: str | Path, split: str) -> Path | None:
    """The file of ``split`` (``"train"``, ``"val"``, ``"test"``) in ``folder``, or ``None``."""
    for stem in SPLITS[split]:
        for suffix in SUFFIXES:
            if (path := Path(folder) / f"{stem}{suffix}").is_file():
                return path
    return None


def read_split(folder: str | Path, split: str) -> list[Record] | None:
    """The records of one split of a folder of files or of a ``datasets`` saved-to-disk folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"text data folder {str(folder)!r} does not exist; give the folder with train/dev/test files.")
    if (folder / "dataset_dict.json").is_file():
        try:
            import datasets
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"{folder} is a datasets save_to_disk folder: pip install datasets") from e
        data = datasets.load_from_disk(str(folder))
        names = [n for n in SPLITS[split] if n in data]
        return [dict(r) for r in data[names[0]]] if names else None
    path = split_file(folder, split)
    return None if path is None else read_records(path)


class TextDataset(torch.utils.data.Dataset):
    """``(texts, label)`` pairs from records: one text field (single sentences) or two (pairs).

    Args:
        records: rows as dicts.
        text_fields: one or two column names (``["sentence"]``; ``["#1 String", "#2 String"]`` for MRPC).
        label_field: the label column; rows without it get label ``-1`` (GLUE's unlabelled test files).
        labels: the class names, in index order; ``None``: regression (float labels).
        source: where the records come from (for messages).

    Raises:
        ValueError: a missing text column, or a label outside ``labels`` (the row named).
    """

    def __init__(
        self,
        records: Sequence[Record],
        text_fields: Sequence[str],
        label_field: str,
        labels: Sequence[str] | None,
        source: str = "",
    ) -> None:
        index = {str(name): i for i, name in enumerate(labels)} if labels is not None else None
        self.items: list[tuple[tuple[str, ...], float | int]] = []
        for number, record in enumerate(records, 1):
            missing = [f for f in text_fields if f not in record]
            if missing:
                raise ValueError(
                    f"{source}, record {number}: no column(s) {missing}; columns are {sorted(record)}. Set text_fields."
                )
            texts = tuple(str(record[f]) for f in text_fields)
            value = record.get(label_field)
            if value is None or value == "":
                label: float | int = -1
            elif index is None:
                label = float(value)
            elif str(value) in index:
                label = index[str(value)]
            else:
                raise ValueError(
                    f"{source}, record {number}: label {value!r} is not one of the configured classes {list(index)}; "
                    "fix the row or add the class to labels."
                )
            self.items.append((texts, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[tuple[str, ...], float | int]:
        return self.items[i]


class TextCollate:
    """Tokenize a list of ``(texts, label)`` with dynamic padding into the model's batch dict."""

    def __init__(self, tokenizer: Any, max_length: int, regression: bool) -> None:
        self.tokenizer, self.max_length, self.regression = tokenizer, max_length, regression

    def __call__(self, items: list[tuple[tuple[str, ...], float | int]]) -> dict[str, torch.Tensor]:
        columns = list(zip(*(texts for texts, _ in items), strict=True))
        batch = dict(
            self.tokenizer(
                *[list(c) for c in columns],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        labels = [label for _, label in items]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return batch


def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer by name or path; ``"minilm"``: the offline all-MiniLM-L6-v2's."""
    from transformers import AutoTokenizer

    from .backbones import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()) if name_or_path == "minilm" else name_or_path)


class TextDataModule(pl.LightningDataModule):
    """Train / val / test loaders from a folder of text files (see the module docstring).

    Args:
        data_dir: the folder.
        text_fields: one column (single sentences) or two (sentence pairs).
        label_field: the label column.
        labels: the class names in index order (``["0", "1"]`` for SST-2; ``["entailment", "neutral",
            "contradiction"]`` for MNLI); ``None``: read from the training split (sorted), ``[]``: regression.
        tokenizer: a tokenizer name or path (``"minilm"``: the offline all-MiniLM-L6-v2's).
        max_length: truncation length in tokens.
        batch_size: training batch size (evaluation uses twice as many).
        num_workers: DataLoader workers.
        task: ``"classification"`` or ``"causal_lm"`` (instruction / answer pairs: ``text_fields`` are the
            prompt's columns, default ``["instruction"]``; ``label_field`` and ``labels`` are unused).
        answer_field: the answer column (``causal_lm``).
        prompt_template: a ``str.format`` template over the columns that builds the prompt (``causal_lm``;
            ``None``: the ``text_fields`` joined by newlines).
        train_on_prompt: keep the prompt tokens in the loss (``causal_lm``; LLM-Adapters' default).
    """

    def __init__(
        self,
        data_dir: str,
        text_fields: list[str] | None = None,
        label_field: str = "label",
        labels: list[str] | None = None,
        tokenizer: str = "minilm",
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        task: DataTask = "classification",
        answer_field: str = "answer",
        prompt_template: str | None = None,
        train_on_prompt: bool = False,
    ) -> None:
        super().__init__()
        if task not in get_args(DataTask):
            raise ValueError(f"task={task!r} is not valid; choose one of {list(get_args(DataTask))}.")
        self.task, self.answer_field, self.prompt_template = task, answer_field, prompt_template
        self.train_on_prompt = train_on_prompt
        default = ["instruction"] if task == "causal_lm" else ["sentence"]
        text_fields = default if text_fields is None else list(text_fields)
        if task == "classification" and not 1 <= len(text_fields) <= 2:
            raise ValueError(f"text_fields={text_fields!r} must name one column (sentences) or two (pairs).")
        self.data_dir, self.text_fields, self.label_field = data_dir, text_fields, label_field
        self.labels = labels
        self.tokenizer_name, self.max_length = tokenizer, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, TextDataset | InstructionDataset] = {}
        self.tokenizer: Any = None

    @property
    def regression(self) -> bool:
        return self.labels is not None and len(self.labels) == 0

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = read_split(self.data_dir, "train")
        if train is None:
            raise ValueError(f"{self.data_dir} holds no train.tsv/.csv/.jsonl/.json (or datasets split 'train').")
        if self.task == "causal_lm":
            self._setup_instructions(train)
            return
        if self.labels is None:
            values = sorted({str(r[self.label_field]) for r in train if r.get(self.label_field) not in (None, "")})
            numeric = all(v.lstrip("-").isdigit() for v in values)
            self.labels = sorted(values, key=int) if numeric else values
        classes = None if self.regression else self.labels
        for split in SPLITS:
            records = train if split == "train" else read_split(self.data_dir, split)
            if records is not None:
                source = f"{self.data_dir} ({split})"
                self.datasets[split] = TextDataset(records, self.text_fields, self.label_field, classes, source)
        self._load_tokenizer()

    def _setup_instructions(self, train: list[Record]) -> None:
        for split in SPLITS:
            records = train if split == "train" else read_split(self.data_dir, split)
            if records is not None:
                source = f"{self.data_dir} ({split})"
                self.datasets[split] = InstructionDataset(
                    records, self.text_fields, self.answer_field, self.prompt_template, source
                )
        self._load_tokenizer()

    def _load_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.tokenizer.pad_token is None:  # decoder tokenizers (LLaMA, GPT-2) have none: pad with EOS, on the right
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # last-token pooling reads the last non-padding position

    def collate(self) -> TextCollate | InstructionCollate:
        """The batch builder of the task."""
        if self.task == "causal_lm":
            return InstructionCollate(self.tokenizer, self.max_length, self.train_on_prompt)
        return TextCollate(self.tokenizer, self.max_length, self.regression)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(
                f"{self.data_dir} has no {split} split (files: {'/'.join(SPLITS[split])}.tsv|.csv|.jsonl|.json)."
            )
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if shuffle else 2 * self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
