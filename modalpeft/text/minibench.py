"""A small GLUE-like benchmark from real text that installs offline (Debian ``wordnet-base`` and ``fortunes``).

Four tasks, each written as a GLUE-layout folder (``train.tsv``, ``dev.tsv`` with a header row) that
:class:`~modalpeft.text.data.TextDataModule` reads like any GLUE task:

- ``wn-supersense`` (single sentence, 8 classes, SST/CoLA-like): a WordNet noun definition (its gloss before the
  first ``;``) -> the synset's lexicographer file among ``act, animal, artifact, communication, location, person,
  plant, state``. Columns ``sentence, label``.
- ``fortunes-topic`` (single sentence, 6 classes): a BSD fortune cookie -> its file (``computers, politics, work,
  songs-poems, science, men-women``). Columns ``sentence, label``.
- ``wn-glossmatch`` (sentence pairs, binary, MRPC/QNLI-like): a word and a WordNet definition -> ``1`` when the
  definition defines the word, ``0`` when it defines another word. Columns ``sentence1, sentence2, label``;
  balanced. The frozen mean-pooled sentence embedding of the pair barely separates them (its probe stays near 60%),
  while the encoder's attention between the two parts learns it within one epoch: the pair task of the demo.
- ``wn-sensematch`` (sentence pairs, binary, WiC/MRPC-like): a WordNet definition and a usage example of a lemma
  with several senses -> ``1`` when the example illustrates that sense, ``0`` when it comes from another sense of
  the same lemma (a hard negative). Columns ``sentence1, sentence2, label``; balanced. Harder: at the demo's
  budget (one epoch) the probe, full fine-tuning and every adapter stay near chance (48-54% at 60 steps), so the
  demo leaves it out; it needs several epochs.

Construction (deterministic; no randomness but ``random.Random(seed)``):

- fortunes: each file of the package (found with ``dpkg -L fortunes`` semantics: the named files under the
  fortunes folder) is split on ``"\\n%\\n"``, whitespace collapsed, texts of 20-400 characters kept; a text that
  occurs twice (in one file or in two) is kept once, in the first category that has it.
- WordNet ``data.noun``: field 2 of a line is the lexicographer file number, the gloss follows ``" | "``; the
  definition is the gloss before the first ``;``, examples are its double-quoted strings. Supersense items are
  the definitions of the 8 classes' synsets (one per synset, definitions of 20-300 characters).
- Gloss matching: the noun synsets with a definition of 20-300 characters, in file order (``N`` of them); synset
  ``i`` gives its first lemma and its definition (``1``) when ``i`` is even, and the first lemma of synset
  ``(i + N // 2) mod N``, far in the file and so almost always of another supersense, with its own definition
  (``0``) when ``i`` is odd, unless that lemma is also one of synset ``i``'s (then the item is left out).
- Sense matching: for each lemma (word with ``_`` as space) with at least two synsets that have examples, in
  sorted lemma order: one positive (the first synset's definition, its first example) and one negative (the
  second synset's definition, the first synset's first example); a synset enters at most once.
- Each task's items are shuffled with ``Random(seed)`` and cut into ``train`` (at most ``max_train``) and ``dev``
  (at most ``max_eval``) with no overlap; class balance is left as the data has it (supersense, topic).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from ..core.state import atomic_write

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
INSTALL = "apt-get install wordnet-base fortunes (make setup does it as root)"

SUPERSENSES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 15: "location", 18: "person", 20: "plant"}
SUPERSENSES[26] = "state"
TOPICS = ("computers", "politics", "work", "songs-poems", "science", "men-women")
TASKS = ("wn-supersense", "fortunes-topic", "wn-glossmatch", "wn-sensematch")
DEMO_TASKS = ("wn-supersense", "fortunes-topic", "wn-glossmatch")
"""The demo's three: a single-sentence, a topic and a pair task, each with headroom over the frozen probe."""
_QUOTED = re.compile(r'"([^"]+)"')


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; install it: {INSTALL}.")
    return path


def fortunes(root: str | Path = FORTUNES_DIR, categories: tuple[str, ...] = TOPICS) -> dict[str, list[str]]:
    """The fortunes of each category, parsed and de-duplicated as the module docstring says."""
    root = Path(root)
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for category in categories:
        text = _require(root / category, f"the fortunes file {category!r}").read_text(encoding="latin-1")
        kept = []
        for item in text.split("\n%\n"):
            item = re.sub(r"\s+", " ", item).strip()
            if 20 <= len(item) <= 400 and item not in seen:
                seen.add(item)
                kept.append(item)
        out[category] = kept
    return out


def noun_synsets(root: str | Path = WORDNET_DIR) -> Iterator[tuple[int, list[str], str, list[str]]]:
    """``(lex_filenum, lemmas, definition, examples)`` of every synset in WordNet's ``data.noun``."""
    path = _require(Path(root) / "data.noun", "WordNet's data.noun")
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or " | " not in line:
                continue  # the license header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            definition = gloss.split(";")[0].strip()
            examples = [e.strip() for e in _QUOTED.findall(gloss)]
            yield int(parts[1]), lemmas, definition, examples


def supersense_items(root: str | Path = WORDNET_DIR) -> list[tuple[tuple[str, ...], str]]:
    return [
        ((definition,), SUPERSENSES[lex])
        for lex, _, definition, _ in noun_synsets(root)
        if lex in SUPERSENSES and 20 <= len(definition) <= 300 and not definition.startswith('"')
    ]


def glossmatch_items(root: str | Path = WORDNET_DIR) -> list[tuple[tuple[str, ...], str]]:
    synsets = [
        (lemmas, definition)
        for _, lemmas, definition, _ in noun_synsets(root)
        if 20 <= len(definition) <= 300 and not definition.startswith('"')
    ]
    n, items = len(synsets), []
    for i, (lemmas, definition) in enumerate(synsets):
        if i % 2 == 0:
            items.append(((lemmas[0], definition), "1"))
            continue
        other = synsets[(i + n // 2) % n][0][0]
        if other.lower() not in {lemma.lower() for lemma in lemmas}:
            items.append(((other, definition), "0"))
    return items


def sensematch_items(root: str | Path = WORDNET_DIR) -> list[tuple[tuple[str, ...], str]]:
    senses: dict[str, list[tuple[str, list[str]]]] = {}
    for _, lemmas, definition, examples in noun_synsets(root):
        if examples and not definition.startswith('"'):
            for lemma in lemmas:
                senses.setdefault(lemma.lower(), []).append((definition, examples))
    used: set[str] = set()
    items = []
    for lemma in sorted(senses):
        candidates = [s for s in senses[lemma] if s[0] not in used]
        if len(candidates) < 2:
            continue
        (first, examples), (second, _) = candidates[0], candidates[1]
        used.update((first, second))
        items.append(((first, examples[0]), "1"))
        items.append(((second, examples[0]), "0"))
    return items


def task_items(task: str, wordnet: str | Path = WORDNET_DIR, fortunes_dir: str | Path = FORTUNES_DIR) -> list:
    """``[(texts, label)]`` of one task, before shuffling and splitting."""
    if task == "wn-supersense":
        return supersense_items(wordnet)
    if task == "wn-sensematch":
        return sensematch_items(wordnet)
    if task == "wn-glossmatch":
        return glossmatch_items(wordnet)
    if task == "fortunes-topic":
        return [((t,), c) for c, texts in fortunes(fortunes_dir).items() for t in texts]
    raise ValueError(f"task={task!r} is not valid; choose one of {list(TASKS)}.")


def labels_of(task: str) -> list[str]:
    """The class names of a task, in index order."""
    if task == "wn-supersense":
        return list(SUPERSENSES.values())
    if task == "fortunes-topic":
        return list(TOPICS)
    if task in ("wn-sensematch", "wn-glossmatch"):
        return ["0", "1"]
    raise ValueError(f"task={task!r} is not valid; choose one of {list(TASKS)}.")


def text_fields_of(task: str) -> list[str]:
    return ["sentence1", "sentence2"] if task in ("wn-sensematch", "wn-glossmatch") else ["sentence"]


def _tsv(items: list[tuple[tuple[str, ...], str]], fields: list[str]) -> bytes:
    lines = ["\t".join([*fields, "label"])]
    lines += ["\t".join([*(t.replace("\t", " ") for t in texts), label]) for texts, label in items]
    return ("\n".join(lines) + "\n").encode()


def write_task(
    task: str,
    folder: str | Path,
    *,
    seed: int = 0,
    max_train: int = 2400,
    max_eval: int = 800,
    wordnet: str | Path = WORDNET_DIR,
    fortunes_dir: str | Path = FORTUNES_DIR,
) -> Path:
    """Build one task and write it as a GLUE-layout folder (``train.tsv``, ``dev.tsv``), atomically.

    Raises:
        FileNotFoundError: a Debian data package is missing (the message says how to install it).
        ValueError: an unknown task, or too few items for the splits.
    """
    items = task_items(task, wordnet, fortunes_dir)
    if task == "wn-sensematch":  # keep each positive with its negative: shuffle pairs of rows
        pairs = [items[i : i + 2] for i in range(0, len(items), 2)]
        random.Random(seed).shuffle(pairs)
        items = [row for pair in pairs for row in pair]
    else:
        random.Random(seed).shuffle(items)
    if len(items) < 4:
        raise ValueError(f"{task}: only {len(items)} items were found; the data files are incomplete: {INSTALL}.")
    n_eval = min(max_eval, len(items) // 4)
    n_eval -= n_eval % 2
    dev, train = items[:n_eval], items[n_eval : n_eval + max_train]
    fields = text_fields_of(task)
    atomic_write({"train.tsv": _tsv(train, fields), "dev.tsv": _tsv(dev, fields)}, Path(folder))
    return Path(folder)
