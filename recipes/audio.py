"""Audio recipes through LightningCLI: MusicGen-medium text-to-music fine-tuning on a low-resource genre with the
music adapters (linear, convolutional, transformer; ``music_adapter``), peft's LoRA, or full fine-tuning.

python recipes/audio.py fit --config recipes/audio/musicgen_medium_conv_adapter.yaml \\
    --data.init_args.data_dir=/path/to/genre_folder
python recipes/audio.py validate --config ... --ckpt_path=<the .ckpt the fit wrote>

The model is :class:`modalpeft.audio.tasks.MusicGenTask` on :func:`modalpeft.audio.tasks.musicgen` (a Hub name or a
local folder); the data :class:`modalpeft.audio.data.MusicCaptionsDataModule` (audio files with captions.csv or
captions.jsonl beside them; codes cached by the model's codec).
"""

import pytorch_lightning as pl

from modalpeft.lightning import cli_main

if __name__ == "__main__":
    cli_main(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
