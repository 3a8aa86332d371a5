"""Text recipes through LightningCLI: RoBERTa-base / T5-base sentence (pair) classification on GLUE tasks with the
bottleneck-adapter family (parallel adapter, Houlsby, Compacter), peft's LoRA, full fine-tuning or a linear probe.

python recipes/text.py fit --config recipes/text/roberta_base_parallel_adapter_sst2.yaml \\
    --data.init_args.data_dir=/path/to/glue/SST-2
python recipes/text.py validate --config ... --ckpt_path=<the .ckpt the fit wrote>

The model is :class:`modalpeft.text.tasks.TextClassificationTask` on :func:`modalpeft.text.tasks.text_classifier`
(any transformers model by name or path); the data :class:`modalpeft.text.data.TextDataModule` (GLUE's TSV layout,
CSV, JSONL or a ``datasets`` save_to_disk folder).
"""

import pytorch_lightning as pl

from modalpeft.lightning import cli_main

if __name__ == "__main__":
    cli_main(model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
