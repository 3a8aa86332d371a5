"""Vision recipes: a timm ViT adapted on a VTAB-1k task (or any image data module) through LightningCLI.

python recipes/vision.py fit --config recipes/vision/vit_b16_ssf_vtab1k.yaml \\
    --data.init_args.root=/path/to/vtab-1k/cifar

The task is :class:`modalpeft.vision.tasks.ImageClassificationTask` (or a subclass); the data module is any
:class:`modalpeft.vision.data.ImageDataModule` chosen by ``class_path``: ``VTAB1kDataModule``,
``ImageFolderDataModule`` or ``FashionMNISTDataModule``.
"""

from modalpeft.lightning import cli_main
from modalpeft.vision.data import ImageDataModule
from modalpeft.vision.tasks import ImageClassificationTask

if __name__ == "__main__":
    cli_main(model_class=ImageClassificationTask, datamodule_class=ImageDataModule)
