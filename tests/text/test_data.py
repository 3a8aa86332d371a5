"""TextDataModule: GLUE TSV, CSV, JSONL; labels; errors that name the line."""

from __future__ import annotations

import pytest
import torch

from modalpeft.text.data import TextDataModule, TextDataset, read_records

from .fixtures import write_glue_sst, write_pairs_jsonl, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_glue_tsv_single_sentences(tmp_path, tokenizer) -> None:
    dm = TextDataModule(str(write_glue_sst(tmp_path / "SST-2")), tokenizer=tokenizer, batch_size=4, max_length=16)
    dm.setup("fit")
    assert dm.labels == ["0", "1"] and len(dm.datasets["train"]) == 12 and len(dm.datasets["test"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long
    assert (batch["attention_mask"].sum(1) > 2).all()
    test = next(iter(dm.test_dataloader()))
    assert test["labels"].tolist() == [-1, -1]  # GLUE test files carry no labels


def test_jsonl_pairs_with_configured_labels(tmp_path, tokenizer) -> None:
    labels = ["entailment", "neutral", "contradiction"]
    dm = TextDataModule(
        str(write_pairs_jsonl(tmp_path / "mnli")),
        text_fields=["premise", "hypothesis"],
        labels=labels,
        tokenizer=tokenizer,
        batch_size=3,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (batch["token_type_ids"] == 1).any()  # the second sentence of each pair


def test_csv_regression(tmp_path, tokenizer) -> None:
    (tmp_path / "train.csv").write_text('sentence1,sentence2,score\n"a cat, sat",the cat,4.5\na dog,the mat,0.5\n')
    dm = TextDataModule(str(tmp_path), ["sentence1", "sentence2"], "score", labels=[], tokenizer=tokenizer)
    dm.setup("fit")
    assert dm.datasets["train"].items[0] == (("a cat, sat", "the cat"), 4.5)
    assert next(iter(dm.train_dataloader()))["labels"].dtype == torch.float32


def test_bad_files_name_the_line(tmp_path) -> None:
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="empty.tsv is empty"):
        read_records(tmp_path / "empty.tsv")
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\ngood\t1\nstray\ttab\t0\n")
    with pytest.raises(ValueError, match=r"bad.tsv, line 3: 3 fields where the header"):
        read_records(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unknown text file type '.txt'"):
        read_records(tmp_path / "x.txt")


def test_labels_outside_the_classes_and_missing_columns() -> None:
    with pytest.raises(
        ValueError, match=r"record 2: label 'maybe' is not one of the configured classes \['no', 'yes'\]"
    ):
        TextDataset([{"s": "a", "y": "yes"}, {"s": "b", "y": "maybe"}], ["s"], "y", ["no", "yes"], "f.tsv")
    with pytest.raises(ValueError, match=r"record 1: no column\(s\) \['sentence'\]"):
        TextDataset([{"s": "a", "y": "yes"}], ["sentence"], "y", ["yes"], "f.tsv")
    with pytest.raises(ValueError, match="does not exist"):
        TextDataModule("/nonexistent/folder").setup("fit")
