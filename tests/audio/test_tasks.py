"""MusicGen data and task: decoding, clips, the code cache, the delay pattern, the loss, generation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

import modalpeft as mp
from modalpeft.audio.backbones import tiny_musicgen
from modalpeft.audio.data import MusicCaptionsDataModule, load_audio, read_captions
from modalpeft.audio.tasks import MusicGenTask, delay_pattern

from .fixtures import RATE, write_music_folder, write_tiny_musicgen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_musicgen(tmp_path_factory.mktemp("tiny_musicgen"))


def test_delay_pattern_matches_transformers() -> None:
    model = tiny_musicgen()
    codes = torch.randint(0, 16, (3, 2, 5))
    labels = delay_pattern(codes, 16)
    assert labels.shape == (3, 5 + 2 - 1, 2)
    # transformers' generate() starts from a column of start tokens; the dreambooth fine-tuning script prepends it too
    started = torch.cat([torch.full((3, 2, 1), 16), codes], -1).reshape(6, 6)
    _, pattern = model.decoder.build_delay_pattern_mask(started, pad_token_id=16, max_length=5 + 2)
    expected = pattern.reshape(3, 2, 7)[..., 1:].transpose(1, 2)  # without the all-start first step
    torch.testing.assert_close(labels, expected)
    assert labels[0, 0, 1] == 16 and labels[0, 1, 1] == codes[0, 1, 0]  # codebook 1 starts one step later


def test_load_audio_resamples_and_names_undecodable_files(tmp_path) -> None:
    folder = write_music_folder(tmp_path / "music", [1.5])
    audio = load_audio(folder / "tune_0.wav", RATE)
    assert audio.dtype == np.float32 and abs(len(audio) - 1.5 * RATE) <= 2
    stereo = np.stack([np.zeros(800, np.int16), np.full(800, 16000, np.int16)], 1)
    wavfile.write(tmp_path / "stereo.wav", 800, stereo)
    assert abs(float(load_audio(tmp_path / "stereo.wav", 800)[400]) - 16000 / 32768 / 2) < 0.02  # down-mixed
    (tmp_path / "broken.wav").write_bytes(b"not audio" * 20)
    with pytest.raises(ValueError, match=r"broken.wav: cannot decode this audio file"):
        load_audio(tmp_path / "broken.wav", RATE)


def test_captions_from_csv_and_jsonl_and_missing_entries(tmp_path, model_dir) -> None:
    jsonl = write_music_folder(tmp_path / "j", [1.0, 1.0], captions="jsonl")
    assert read_captions(jsonl) == {"tune_0.wav": "the cat sat", "tune_1.wav": "the dog ran fast"}
    folder = write_music_folder(tmp_path / "c", [1.0, 1.0, 1.0])
    (folder / "captions.csv").write_text("file,caption\ntune_0.wav,the cat sat\n")
    data = MusicCaptionsDataModule(str(folder), tokenizer=str(model_dir), clip_seconds=0.5)
    with pytest.raises(ValueError, match=r"no entry for 2 audio file\(s\): \['tune_1.wav', 'tune_2.wav'\]"):
        data.setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no caption file"):
        read_captions(tmp_path / "empty")


def test_clips_are_encoded_once_and_cached(tmp_path, model_dir) -> None:
    folder = write_music_folder(tmp_path / "music", [2.2, 1.1, 0.3])
    data = MusicCaptionsDataModule(str(folder), tokenizer=str(model_dir), clip_seconds=0.5, val_fraction=0.34)
    task = MusicGenTask(mp.audio.tasks.musicgen(str(model_dir)), adapter="full")
    calls = []

    def encode(waves):
        calls.append(waves.shape)
        return task.encode(waves)

    with pytest.warns(UserWarning, match=r"tune_2.wav lasts 0.30 s, shorter than clip_seconds=0.5: skipped"):
        data.attach_codec(encode, RATE, 2, task.codec_key())
    assert sum(n for n, *_ in calls) == 4 + 2  # 2.2 s -> 4 clips, 1.1 s -> 2, 0.3 s -> none
    assert {len(data.codes[f]) for f in data.codes} == {4, 2}
    assert all(c.shape[1:] == (2, 50) for c in data.codes.values())  # 0.5 s at 100 Hz frames
    assert len(list((folder / ".codes_cache").glob("*.safetensors"))) == 2
    again = MusicCaptionsDataModule(str(folder), tokenizer=str(model_dir), clip_seconds=0.5, val_fraction=0.34)
    calls.clear()
    with pytest.warns(UserWarning, match="tune_2.wav"):  # short files are not cached: they warn again
        again.attach_codec(encode, RATE, 2, task.codec_key())
    assert not calls and all(torch.equal(again.codes[f], data.codes[f]) for f in data.codes)
    batch = next(iter(again.train_dataloader()))
    assert batch["codes"].shape[1:] == (2, 50) and batch["input_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(ValueError, match="gives 2 codebooks but the decoder reads 4"):
        MusicCaptionsDataModule(str(folder), tokenizer=str(model_dir), clip_seconds=0.5).attach_codec(
            encode, RATE, 4, "another codec"
        )


def test_short_files_only_is_an_error(tmp_path, model_dir) -> None:
    folder = write_music_folder(tmp_path / "music", [0.2, 0.3])
    data = MusicCaptionsDataModule(str(folder), tokenizer=str(model_dir), clip_seconds=1.0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no training clip of 1.0 s.*lower clip_seconds"):
        data.attach_codec(lambda w: torch.zeros(len(w), 2, 100, dtype=torch.long), RATE, 2, "k")


def test_the_loss_is_musicgens_and_only_the_decoder_trains_in_full_fine_tuning(model_dir) -> None:
    backbone = mp.audio.tasks.musicgen(str(model_dir))
    task = MusicGenTask(backbone, adapter="full")
    trainable = {n.split(".")[0] for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "enc_to_dec_proj"} or trainable == {"decoder"}
    codes = torch.randint(0, 16, (2, 2, 6))
    text = torch.randint(0, 128, (2, 4))
    batch = {"input_ids": text, "attention_mask": torch.ones_like(text), "codes": codes}
    task.log = lambda *a, **k: None
    assert backbone.decoder.training and not backbone.text_encoder.training  # the decoder trains with its dropout
    backbone.eval()  # as Lightning validates
    loss = task.step(batch, "val")
    labels = delay_pattern(codes, 16)
    logits = backbone(input_ids=text, attention_mask=torch.ones_like(text), labels=labels).logits.reshape(2, 2, 7, 16)
    per_book = [
        torch.nn.functional.cross_entropy(logits[:, k].reshape(-1, 16), labels[..., k].reshape(-1), ignore_index=16)
        for k in range(2)
    ]
    torch.testing.assert_close(loss, sum(per_book) / 2)


def test_generation_writes_wav_files_atomically(tmp_path, model_dir) -> None:
    from transformers import AutoTokenizer

    task = MusicGenTask(
        mp.audio.tasks.musicgen(str(model_dir)), adapter=mp.MusicAdapterConfig(kind="conv", bottleneck=8)
    )
    paths = task.generate_wav(["the cat sat", "a dog"], AutoTokenizer.from_pretrained(model_dir), tmp_path / "s", 0.1)
    rate, audio = wavfile.read(paths[0])
    assert rate == RATE and audio.dtype == np.int16 and len(audio) > 0
    assert json.loads((tmp_path / "s" / "prompts.json").read_text()) == {
        "sample_0.wav": "the cat sat",
        "sample_1.wav": "a dog",
    }
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["prompts.json", "sample_0.wav", "sample_1.wav"]


def test_the_task_refuses_other_models() -> None:
    with pytest.raises(TypeError, match="needs a MusicgenForConditionalGeneration"):
        MusicGenTask(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="text_dropout=1.5"):
        MusicGenTask(tiny_musicgen(), text_dropout=1.5)
