"""The offline mini-GLUE: parsing of WordNet's data.noun and fortune files (fixtures in the same formats),
deterministic disjoint splits, GLUE-layout output that TextDataModule reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalpeft.text import minibench
from modalpeft.text.data import read_records

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUNS = [
    # offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt ... | gloss
    '00001 04 n 01 abandon 0 000 | the trait of lacking restraint or control; "she danced with abandon"  ',
    '00002 12 n 01 abandon 1 000 | a feeling of extreme emotional intensity; "the wildness of his anger"  ',
    "00003 05 n 02 big_cat 0 cat 0 000 | any of several large cats typically able to roar  ",
    '00004 06 n 01 cat 1 000 | a whip with nine knotted cords; "the cat was used on sailors"  ',
    "00005 18 n 01 baker 0 000 | someone who bakes bread or cake for a living  ",
    "00006 03 n 01 entity 0 000 | that which is perceived or known or inferred to exist  ",
]
for i in range(6):  # two senses with examples per lemma: more supersense items and sense pairs
    NOUNS.append(
        f'{10 + 2 * i:05d} 04 n 01 thing{i} 0 000 | the act number {i} of doing things; "a thing{i} was done"  '
    )
    NOUNS.append(f'{11 + 2 * i:05d} 05 n 01 thing{i} 1 000 | an animal kind number {i}; "a thing{i} barked"  ')


def write_wordnet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_text(HEADER + "\n".join(NOUNS) + "\n")
    return folder


def write_fortunes(folder: Path, per_category: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c in minibench.TOPICS:
        texts = [f"A {c} fortune number {i},\n  over  two lines." for i in range(per_category)] + [
            "short",
            "dup text here",
        ]
        (folder / c).write_text("\n%\n".join(texts) + "\n%\n")
    return folder


def test_wordnet_parsing_and_tasks(tmp_path) -> None:
    root = write_wordnet(tmp_path / "wn")
    synsets = list(minibench.noun_synsets(root))
    assert synsets[2] == (5, ["big cat", "cat"], "any of several large cats typically able to roar", [])
    assert synsets[0][3] == ["she danced with abandon"]
    supersense = minibench.supersense_items(root)
    assert [label for _, label in supersense[:4]] == ["act", "animal", "artifact", "person"]  # 12, 03: no classes
    pairs = minibench.sensematch_items(root)
    assert len(pairs) == 14 and pairs[:2] == [
        (("the trait of lacking restraint or control", "she danced with abandon"), "1"),
        (("a feeling of extreme emotional intensity", "she danced with abandon"), "0"),
    ]


def test_gloss_matching_pairs_words_with_their_own_and_far_definitions(tmp_path) -> None:
    """Even synsets: their first lemma and definition (1); odd synset i: the first lemma of synset (i + N/2) mod N
    with synset i's definition (0), left out when that word is also one of synset i's lemmas."""
    items = minibench.glossmatch_items(write_wordnet(tmp_path / "wn"))
    assert len(items) == 18 and [label for _, label in items] == ["1", "0"] * 9
    assert items[:4] == [
        (("abandon", "the trait of lacking restraint or control"), "1"),
        (("thing2", "a feeling of extreme emotional intensity"), "0"),  # synset (1 + 9) mod 18 = 10
        (("big cat", "any of several large cats typically able to roar"), "1"),
        (("thing3", "a whip with nine knotted cords"), "0"),
    ]
    banks = [
        "00001 06 n 01 bank 0 000 | a building where a bank does business  ",
        "00002 14 n 02 bank 1 depository 0 000 | a financial institution that accepts deposits  ",
        "00003 17 n 01 shore 0 000 | the land along the edge of a body of water  ",
        "00004 17 n 01 bank 2 000 | sloping land beside a body of water  ",
    ]
    (tmp_path / "banks").mkdir()
    (tmp_path / "banks" / "data.noun").write_text(HEADER + "\n".join(banks) + "\n")
    assert minibench.glossmatch_items(tmp_path / "banks") == [  # both negatives would be "bank": left out
        (("bank", "a building where a bank does business"), "1"),
        (("shore", "the land along the edge of a body of water"), "1"),
    ]


def test_fortunes_are_cleaned_filtered_and_deduplicated(tmp_path) -> None:
    texts = minibench.fortunes(write_fortunes(tmp_path / "f"))
    assert texts["computers"][0] == "A computers fortune number 0, over two lines."
    assert "short" not in texts["work"]  # under 20 characters
    assert sum("dup text here" in t for t in texts.values()) == 0  # 13 characters: filtered too
    assert all(len(v) == 5 for v in texts.values())


@pytest.mark.parametrize("task", minibench.TASKS)
def test_written_splits_are_deterministic_disjoint_and_readable(task, tmp_path) -> None:
    wn, fo = write_wordnet(tmp_path / "wn"), write_fortunes(tmp_path / "f")
    a = minibench.write_task(task, tmp_path / "a", wordnet=wn, fortunes_dir=fo, max_train=20, max_eval=8)
    b = minibench.write_task(task, tmp_path / "b", wordnet=wn, fortunes_dir=fo, max_train=20, max_eval=8)
    for split in ("train.tsv", "dev.tsv"):
        assert (a / split).read_bytes() == (b / split).read_bytes()
    train, dev = read_records(a / "train.tsv"), read_records(a / "dev.tsv")
    fields = minibench.text_fields_of(task)
    assert set(train[0]) == {*fields, "label"} and dev
    key = [tuple(r[f] for f in fields) for r in train]
    assert not set(key) & {tuple(r[f] for f in fields) for r in dev}
    assert {r["label"] for r in train + dev} <= set(minibench.labels_of(task))


def test_missing_packages_say_how_to_install(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base fortunes"):
        minibench.write_task("wn-supersense", tmp_path / "x", wordnet=tmp_path / "none")
    with pytest.raises(ValueError, match="task='glue'"):
        minibench.labels_of("glue")
