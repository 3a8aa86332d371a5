"""Deepfake detection recipes: a CLIP visual encoder with LayerNorm tuning, through LightningCLI.

python recipes/deepfake.py fit --config recipes/vision/clip_vitl14_lntune_ffpp.yaml \\
    --data.init_args.root=/path/to/FaceForensics++ --data.init_args.val_root=/path/to/Celeb-DF-v2
python recipes/deepfake.py predict --config recipes/vision/clip_vitl14_lntune_ffpp.yaml --ckpt_path=<fit checkpoint> \\
    --data.init_args.predict_path=<video file or folder of frames> --model.init_args.predictions_path=predictions.csv

The task is :class:`modalpeft.vision.deepfake.DeepfakeDetector` (or a subclass); the data module is any
:class:`modalpeft.vision.deepfake.data.VideoFramesDataModule` chosen by ``class_path``: ``FrameFolderDataModule``
(FF++ or real/fake frame folders) or ``LFWSplicedDataModule`` (the offline spliced LFW faces).
"""

from modalpeft.lightning import cli_main
from modalpeft.vision.deepfake.data import VideoFramesDataModule
from modalpeft.vision.deepfake.detector import DeepfakeDetector

if __name__ == "__main__":
    cli_main(model_class=DeepfakeDetector, datamodule_class=VideoFramesDataModule)
