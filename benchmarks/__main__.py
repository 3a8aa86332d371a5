"""``make bench``: the ViT benchmark, then the Point-MAE, the text, the diffusion, the tracking and the audio ones,
into one run folder.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks                               # every benchmark, full size
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks --quick                       # the test-size models: a check
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks --results-dir benchmarks/results  # the committed results

``--quick`` (also implied by ``--model vit_tiny_test``) runs every benchmark on its test-size model
(``vit_tiny_test``, ``point_mae_test``, ``bert_test``, ``unet_test``, ``tracker_test``, ``musicgen_test``) in a few
minutes; the full run takes 25-35 minutes on 2 CPU cores without the SD-2.1-base UNet's (see
``benchmarks/diffusion.py``) and the tracker's, whose SPMTrack-B shape (1,318 tokens, two passes per sample) runs at
batch 2 here and takes far longer (``python -m benchmarks.tracking`` alone runs batch 8, tens of GB on a CPU). The
results go to a new ``outputs/bench/<timestamp>`` (git-ignored, printed at the end) unless ``--results-dir`` says
otherwise. Other options (``--batch``, ``--steps``, ``--warmup``, ``--device``, ``--threads``, ``--methods``) go to
every run; ``--model`` to the ViT run.
"""

from __future__ import annotations

import argparse
import sys

from modalpeft.lightning.demo import run_folder

from . import audio, diffusion, pointcloud, run, text, tracking

QUICK_MODELS = {
    "vit": "vit_tiny_test",
    "pointcloud": "point_mae_test",
    "text": "bert_test",
    "diffusion": "unet_test",
    "tracking": "tracker_test",
    "audio": "musicgen_test",
}
"""The test-size model of each benchmark, for ``--quick``."""
TRACKER_BATCH = ["--batch", "2"]
"""The tracker's batch here (a ``--batch`` given on the command line overrides it): on a CPU one training step of the
SPMTrack-B shape grew the process by 1.6-4.2 GiB at batch 1 (head only .. TMoE), so batch 8 needs tens of GB;
``python -m benchmarks.tracking`` runs batch 8 (on a GPU or a large machine)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="other options go to both runs")
    parser.add_argument("--quick", action="store_true", help="the test-size models: a check in about a minute")
    parser.add_argument("--model", default=None, help="the ViT run's model (vit_tiny_test implies --quick)")
    parser.add_argument("--results-dir", "--out", dest="out", default=None, help="default: outputs/bench/<timestamp>")
    args, rest = parser.parse_known_args(argv)
    quick = args.quick or args.model == QUICK_MODELS["vit"]
    out = args.out or str(run_folder("outputs/bench"))
    vit = ["--model", args.model or (QUICK_MODELS["vit"] if quick else "vit_base_patch16_224")]
    tracker = ["--model", QUICK_MODELS["tracking"]] if quick else ["--model", "spmtrack_b", *TRACKER_BATCH]
    codes = [
        run.main([*vit, "--results-dir", out, *rest]),
        pointcloud.main(["--model", QUICK_MODELS["pointcloud"] if quick else "point_mae", "--results-dir", out, *rest]),
        text.main(["--model", QUICK_MODELS["text"] if quick else "roberta_base", "--results-dir", out, *rest]),
        diffusion.main(
            ["--model", QUICK_MODELS["diffusion"] if quick else "sd21_base_unet", "--results-dir", out, *rest]
        ),
        tracking.main([*tracker, "--results-dir", out, *rest]),
        audio.main(["--model", QUICK_MODELS["audio"] if quick else "musicgen_small", "--results-dir", out, *rest]),
    ]
    print(f"bench: results in {out}/")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
