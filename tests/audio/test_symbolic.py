"""Symbolic music: the melody encoding, windows and batches, style distances, MIDI and soundfont rendering, music21
reading (skipped without music21), the task and the pretraining recipe through the CLI on a tiny ABC folder."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import yaml

from modalpeft.audio.backbones import symbolic_music_lm
from modalpeft.audio.render import render_audio, soundfont_missing_reason, write_midi
from modalpeft.audio.style import js_divergence, style_distances, style_statistics
from modalpeft.audio.symbolic import MelodyTokenizer, abc_tunes
from modalpeft.audio.symbolic_data import IGNORE, collate, transpose_window, windows
from modalpeft.audio.tasks import SymbolicMusicTask, sample_tokens, token_nll

ROOT = Path(__file__).resolve().parents[2]
TOK = MelodyTokenizer()
# a 6/8 bar-and-a-half: pickup eighth, then D E F# | G A B (eighths), a rest and a dotted quarter
NOTES = [(0.0, 0.5, 74), (0.5, 0.5, 76), (1.0, 0.5, 78), (1.5, 0.5, 79), (2.0, 0.5, 81), (2.5, 0.5, 83), (4.0, 1.5, 74)]
BARS = [0.0, 1.5, 3.0]
JIGS = """X: 1
T: Tune one
R: jig
M: 6/8
L: 1/8
K:D
A|dfa agf|edc d2A|dfa agf|e3 d2||

X: 2
T: Tune two
R: reel
M: 4/4
L: 1/8
K:G
GABc dedB|dBGB A2AB|
"""


def test_encoding_round_trips_notes_rests_and_bars() -> None:
    ids = TOK.encode_line(NOTES, BARS, "6/8")
    names = [TOK.tokens[i] for i in ids]
    assert names[:4] == ["TS_6/8", "BAR", "P74", "D1/2"] and names[-1] == "EOS"
    assert names.count("BAR") == 3 and names.count("REST") == 1
    events, meter, skipped = TOK.decode(ids)
    assert meter == "6/8" and skipped == 0
    notes = [(e.onset, e.duration, e.pitch) for e in events if e.pitch is not None]
    assert notes == NOTES
    assert [e.bar for e in events if e.pitch is not None] == [1, 1, 1, 2, 2, 2, 3]
    rest = next(e for e in events if e.pitch is None)
    assert (rest.onset, rest.duration, rest.position) == (3.0, 1.0, 0.0)


def test_skyline_quantisation_and_range() -> None:
    ids = TOK.encode_line([(0, 1, 60), (0, 1, 64), (1, 0.3, 100), (1.3, 0, 70)], [0], "5/4")
    events, meter, _ = TOK.decode(ids)
    assert meter == "other" and [e.pitch for e in events] == [64, 88]  # the top note; 100 moved down an octave
    assert events[1].duration == pytest.approx(1 / 3)  # 0.3 -> the nearest duration; the grace note dropped
    assert TOK.decode([TOK.ids["D1"], TOK.ids["P60"], TOK.bar])[2] == 2  # a lone duration, a note without one


def test_windows_cut_at_bars_and_batches_shift_by_one() -> None:
    line = TOK.encode_line([(i * 0.5, 0.5, 60 + i % 12) for i in range(60)], [i * 1.5 for i in range(20)], "6/8")
    parts = windows(line, 32, TOK)
    assert sum(len(t) - c for t, c in parts) == len(line) and all(len(t) <= 32 for t, _ in parts)
    assert parts[0][1] == 0 and all(c == 1 and t[0] == line[0] and t[1] == TOK.bar for t, c in parts[1:])
    batch = collate(parts[:2], start_token=len(TOK))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0, 0] == len(TOK) and torch.equal(ids[0, 1 : len(parts[0][0])], labels[0, : len(parts[0][0]) - 1])
    assert labels[1, 0] == IGNORE  # the repeated time signature is context
    up = transpose_window(parts[0][0], 2, TOK)
    assert TOK.decode(up)[0][0].pitch == TOK.decode(parts[0][0])[0][0].pitch + 2


def test_style_distances_are_zero_for_the_same_music_and_large_for_other_music() -> None:
    jig = TOK.decode(TOK.encode_line(NOTES, BARS, "6/8"))[:2]
    other = TOK.decode(TOK.encode_line([(i * 2.0, 2.0, 40 + 5 * i) for i in range(8)], [0, 4, 8, 12], "4/4"))[:2]
    same = style_distances(style_statistics([jig]), style_statistics([jig]))
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in same.values())
    far = style_distances(style_statistics([other]), style_statistics([jig]))
    assert far["local"] > 0.5 and far["long_range"] > 0.3
    assert js_divergence(torch.tensor([1.0, 0]).numpy(), torch.tensor([0, 1.0]).numpy()) == pytest.approx(1.0)


def test_midi_file_and_soundfont_rendering() -> None:
    events = TOK.decode(TOK.encode_line(NOTES, BARS, "6/8"))[0]
    midi = write_midi(events, tempo=120)
    assert midi[:4] == b"MThd" and midi.count(b"\x90") >= len(NOTES)
    reason = soundfont_missing_reason()
    if reason:
        pytest.skip(f"audio rendering: {reason}")
    audio = render_audio(events, tempo=120, sample_rate=8000, seconds=1.0)
    assert audio.shape == (8000,) and 0.5 < abs(audio).max() <= 0.9 + 1e-6


def test_lm_loss_sampling_and_cache() -> None:
    torch.manual_seed(0)
    model = symbolic_music_lm("test")
    parts = windows(TOK.encode_line(NOTES, BARS, "6/8"), 16, TOK)
    nll, count = token_nll(model, collate(parts, len(TOK)))
    assert count == sum(len(t) - c for t, c in parts) and math.isfinite(nll.item())
    a = sample_tokens(model, 3, 12, len(TOK), TOK.eos, seed=1)
    assert a == sample_tokens(model, 3, 12, len(TOK), TOK.eos, seed=1) and all(0 < len(t) <= 12 for t in a)
    with pytest.raises(TypeError, match="one-codebook"):
        from modalpeft.audio.backbones import musicgen_decoder

        SymbolicMusicTask(musicgen_decoder("test"))


def test_abc_files_split_into_tunes_with_their_rhythm(tmp_path) -> None:
    (tmp_path / "tunes.abc").write_text(JIGS)
    assert [(n, r) for n, r, _ in abc_tunes(tmp_path / "tunes.abc")] == [
        ("tunes.abc#1", "jig"),
        ("tunes.abc#2", "reel"),
    ]


def test_music21_reads_scores_and_counts_the_bad_ones(tmp_path) -> None:
    pytest.importorskip("music21", reason="music21 is not installed (pip install music21; make setup does)")
    from modalpeft.audio.symbolic_data import source_pieces

    (tmp_path / "tunes.abc").write_text(JIGS)
    pieces = source_pieces(str(tmp_path), cache_dir=tmp_path / "cache")
    assert len(pieces) == 2 and TOK.tokens[pieces[0][0][0]] == "TS_6/8" and TOK.tokens[pieces[1][0][0]] == "TS_4/4"
    assert source_pieces(str(tmp_path), cache_dir=tmp_path / "cache") == pieces  # from the cache
    (tmp_path / "bad.mid").write_bytes(b"not a midi file")
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        assert len(source_pieces(str(tmp_path))) == 2
    empty = tmp_path / "only_bad"
    empty.mkdir()
    (empty / "bad.mid").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of its 1 scores"):
        source_pieces(str(empty))


@pytest.mark.slow
def test_pretraining_recipe_trains_two_steps_on_a_tiny_folder(tmp_path, monkeypatch) -> None:
    pytest.importorskip("music21", reason="music21 is not installed (pip install music21; make setup does)")
    import pytorch_lightning as pl

    from modalpeft.lightning import cli_main

    recipe = ROOT / "recipes" / "audio" / "symbolic_lm_pretrain_music21.yaml"
    header = recipe.read_text().split("\nseed_everything:")[0]
    assert header.startswith(f"# Command:  python recipes/audio.py fit --config recipes/audio/{recipe.name}")
    assert yaml.safe_load(recipe.read_text())["model"]["init_args"]["export_name"]
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "tunes.abc").write_text(JIGS)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(recipe), "--model.init_args.backbone.init_args.size=test"]
    args += [f"--data.init_args.sources=[{tmp_path / 'scores'}]", "--data.init_args.val_fraction=0.5"]
    args += ["--data.init_args.batch_size=2", "--data.init_args.cache_dir=null", "--model.init_args.sample_tokens=8"]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, pl.LightningModule, pl.LightningDataModule)
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    log_dir = Path(cli.trainer.log_dir)
    exported = log_dir / "symbolic_lm_music21.safetensors"
    assert exported.is_file() and (log_dir / "samples" / "sample_0.mid").is_file()
    assert hashlib.sha256(exported.read_bytes()).hexdigest()
