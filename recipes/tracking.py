"""Tracking recipes through LightningCLI: SPMTrack's one-stream tracker on DINOv2 ViT-B/14, adapted with TMoE, peft's
LoRA, full fine-tuning or only its head, trained on GOT-10k (and LaSOT / TrackingNet).

python recipes/tracking.py fit --config recipes/tracking/dinov2_b14_tmoe_got10k.yaml \\
    --data.init_args.got10k=/path/to/GOT-10k
python recipes/tracking.py test --config ... --ckpt_path=<the .ckpt the fit wrote>

The model is any LightningModule chosen by ``class_path`` (:class:`modalpeft.tracking.tasks.TrackingTask`); the data
module likewise (:class:`modalpeft.tracking.data.TrackingDataModule`).
"""

import pytorch_lightning as pl

from modalpeft.lightning import cli_main

if __name__ == "__main__":
    cli_main(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
