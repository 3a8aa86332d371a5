"""Point-cloud recipes through LightningCLI: Point-MAE fine-tuned with PointGST, Point-PEFT, full fine-tuning or a
linear probe on ModelNet40 / ScanObjectNN, and the masked-point-modelling pretraining of the small offline Point-MAE.

python recipes/pointcloud.py fit --config recipes/pointcloud/point_mae_pointgst_scanobjectnn_pb_t50_rs.yaml \\
    --data.init_args.root=/path/to/ScanObjectNN/h5_files
python recipes/pointcloud.py test --config ... --ckpt_path=<the .ckpt the fit wrote> --data.init_args.vote=10

The model is any LightningModule chosen by ``class_path``
(:class:`modalpeft.pointcloud.tasks.PointCloudClassificationTask` or
:class:`modalpeft.pointcloud.pretrain.MaskedPointModel`); the data module likewise
(:class:`modalpeft.pointcloud.data.ModelNetDataModule`, ``ScanObjectNNDataModule``, ``MeshDataModule``, or
:class:`modalpeft.pointcloud.pretrain.MeshPretrainDataModule`).
"""

import pytorch_lightning as pl

from modalpeft.lightning import cli_main

if __name__ == "__main__":
    cli_main(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
