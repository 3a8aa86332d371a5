"""The text demo's quick path on a tiny BERT and fixture WordNet / fortunes files: one contender of each kind (a
baseline, peft, a mergeable and prunable native method, a prompt, a two-stage method) trains, reloads and (where it
merges) merges to the same outputs, and the report is written; missing data is reported, not fatal."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from modalpeft.demo import SECTIONS
from modalpeft.text import demo, tiny_model

from .fixtures import write_tokenizer
from .test_minibench import write_fortunes, write_wordnet

METHODS = ("full fine-tuning", "lora (peft)", "sora", "dept", "lofit")


@pytest.mark.slow
def test_quick_demo_on_a_tiny_model(tmp_path) -> None:
    model = tmp_path / "bert"
    # width 128: Compacter's d/16 = 8 is divisible by its n = 4
    tiny_model("bert", hidden_size=128, intermediate_size=256, num_attention_heads=4).save_pretrained(model)
    write_tokenizer(model)
    out = tmp_path / "run"
    console = Console(record=True, width=200)
    ok = demo.run(
        quick=True,
        out_dir=out,
        console=console,
        model=str(model),
        wordnet=str(write_wordnet(tmp_path / "wn")),
        fortunes=str(write_fortunes(tmp_path / "fortunes")),
        methods=METHODS,
    )
    assert ok
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == list(METHODS)
    assert all(r["reload"] for r in rows.values())
    merges = {name for name, r in rows.items() if r["merge"] is not None}
    assert merges == {"lora (peft)", "sora", "lofit"} and all(rows[m]["merge"] for m in merges)
    head = 128 * 8 + 8  # 8 supersenses
    assert rows["dept"]["trainable"] == 20 * 128 + 32 * 8 + 8 * 128 + head  # m·d + L_max·r + r·d, spec §2(f)
    assert rows["full fine-tuning"]["trainable"] == rows["full fine-tuning"]["total"]
    assert rows["sora"]["pruned_trainable"] <= rows["sora"]["trainable"]
    page = (out / "text.md").read_text()
    assert "| sora, pruned |" in page and "Environment: Python" in page


def test_missing_data_is_reported_with_the_install_command(tmp_path) -> None:
    console = Console(record=True, width=200)
    assert demo.run(quick=True, out_dir=tmp_path, console=console, model="unused", wordnet=str(tmp_path / "none"))
    assert "apt-get install wordnet-base fortunes" in console.export_text()
    assert not (tmp_path / "text.md").exists()


def test_the_demo_wires_the_text_section(tmp_path, monkeypatch) -> None:
    """``modalpeft demo --modality text``: SECTIONS["text"] runs this demo into <out>/text with the steps override
    (the run itself is the test above; with the real MiniLM it takes too long for the suite)."""
    calls = []
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: calls.append((args, kwargs)) or True)
    console = Console(record=True)
    assert SECTIONS["text"](True, tmp_path, None, console, steps=7, tasks=("faces",), methods=("ssf",))
    assert calls == [((True, tmp_path / "text"), {"console": console, "results_dir": None, "steps": 7})]
