"""Diffusion recipes: DreamBooth personalisation of Stable Diffusion 2.1-base / SDXL with DiffuseKronA, peft's LoRA
or LoKr, through LightningCLI, and a ``generate`` subcommand that renders prompts with the trained adapter.

python recipes/diffusion.py fit --config recipes/diffusion/sdxl_diffusekrona_dreambooth.yaml \\
    --data.init_args.instance_dir=/path/to/dog --data.init_args.instance_prompt="a photo of sks dog"
python recipes/diffusion.py generate --pipeline stabilityai/stable-diffusion-xl-base-1.0 \\
    --adapter <run folder>/adapter --prompts '["a photo of sks dog in the snow"]' --out_dir outputs/generated

The model is :class:`modalpeft.diffusion.tasks.DreamBoothTask` (a pipeline by name or path; its UNet is adapted), the
data :class:`modalpeft.diffusion.data.DreamBoothDataModule` (a folder of the subject's photos, optional prior
preservation); ``generate`` is :func:`modalpeft.diffusion.pipeline.generate` (``generate --help`` lists its options).
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl

from modalpeft.lightning import cli_main


def main(argv: list[str] | None = None) -> object:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["generate"]:
        return cli_main(argv, model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
    from jsonargparse import ArgumentParser

    from modalpeft.diffusion.pipeline import generate

    parser = ArgumentParser(prog="diffusion.py generate", description=generate.__doc__.splitlines()[0])
    parser.add_function_arguments(generate)
    options = parser.parse_args(args[1:])
    try:
        paths = generate(**options.as_dict())
    except (ValueError, TypeError) as e:
        print(f"diffusion.py generate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"generate: wrote {len(paths)} images to {paths[0].parent}/")
    return paths


if __name__ == "__main__":
    main()
