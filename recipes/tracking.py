"""Tracking recipes through LightningCLI: SPMTrack's one-stream tracker on DINOv2 ViT-B/14, adapted with TMoE, peft's
LoRA, full fine-tuning or only its head, trained on GOT-10k (and LaSOT / TrackingNet).

python recipes/tracking.py fit --config recipes/tracking/dinov2_b14_tmoe_got10k.yaml \\
    --data.init_args.got10k=/path/to/GOT-10k
python recipes/tracking.py test --config ... --ckpt_path=<the .ckpt the fit wrote>
python recipes/tracking.py track --config recipes/tracking/dinov2_b14_tmoe_got10k.yaml \\
    --adapter <log_dir>/adapter --input clip.mp4 --box 120,80,40,60 --output boxes.txt --draw boxes.gif
python recipes/tracking.py evaluate --config ... --adapter <log_dir>/adapter --dataset got10k \\
    --root /path/to/GOT-10k --split test --results results/got10k_test

``track`` runs the trained tracker (the adapter directory fit wrote) on a video file or a frame folder from a first
box and writes the per-frame boxes (and, with ``--draw``, the frames with the boxes drawn); ``evaluate`` tracks a
benchmark split and writes the official result files, and the metrics where annotated
(:mod:`modalpeft.tracking.track`). The model is any LightningModule chosen by ``class_path``
(:class:`modalpeft.tracking.tasks.TrackingTask`); the data module likewise
(:class:`modalpeft.tracking.data.TrackingDataModule`).
"""

import sys

import pytorch_lightning as pl

from modalpeft.lightning import cli_main
from modalpeft.tracking.track import evaluate_main, track_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["track"]:
        sys.exit(track_main(sys.argv[2:]))
    if sys.argv[1:2] == ["evaluate"]:
        sys.exit(evaluate_main(sys.argv[2:]))
    cli_main(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
