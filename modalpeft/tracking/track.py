"""``python recipes/tracking.py track`` / ``evaluate``: run a trained tracker on a video or a benchmark's sequences.

    python recipes/tracking.py track --config recipes/tracking/dinov2_b14_tmoe_got10k.yaml \\
        --adapter outputs/lightning_logs/version_0/adapter --input clip.mp4 --box 120,80,40,60 \\
        --output boxes.txt --draw boxes.gif

The tracker is built as the recipe's ``model.init_args.backbone`` says (``--backbone-arg key=value`` overrides an
argument, the value read as JSON when it parses), then the adapter directory that ``fit`` wrote
(``<log_dir>/adapter``: an adapter, or a baseline's trained tensors) is loaded into it. The boxes (``x,y,w,h`` per
frame, frame 0 the given box) go to ``--output``; ``--draw`` writes the frames with the boxes drawn: a ``.gif``,
an ``.mp4`` (PyAV) or a ``.png`` strip of up to 8 evenly spaced frames.

    python recipes/tracking.py evaluate --config ... --adapter ... --dataset got10k --root /path/to/GOT-10k \
        --split test --results results/got10k_test

tracks every sequence of a split (``--batch`` in parallel) and writes the official result files: GOT-10k's
``<seq>/<seq>_001.txt`` and ``<seq>_time.txt`` (zip the folder for the evaluation server), one ``<seq>.txt`` per
sequence for LaSOT and TrackingNet; on GOT-10k val and LaSOT test it also prints and writes ``metrics.json`` (AO,
SR@0.5, SR@0.75 / success AUC, precision, normalised precision).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from ..core.state import atomic_write
from .inference import Tracker, read_video


def build_from_recipe(config: str | Path, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The backbone (the tracker) a recipe's ``model.init_args.backbone`` describes, with ``overrides``."""
    data = yaml.safe_load(Path(config).read_text()) or {}
    spec = ((data.get("model") or {}).get("init_args") or {}).get("backbone")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{config} has no model.init_args.backbone with a class_path; give a tracking recipe.")
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(spec.get("init_args") or {}), **(overrides or {})})


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--backbone-arg {text!r}: write key=value, e.g. pretrained=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box {text!r}: give x,y,w,h of the first frame's box, e.g. 120,80,40,60")
    return values


def draw(frame: Tensor, box: np.ndarray, width: int = 2) -> np.ndarray:
    """``frame`` (``(3, H, W)`` in [0, 1]) as an RGB uint8 array with ``box`` (``x, y, w, h``) drawn in red."""
    from PIL import Image, ImageDraw

    image = Image.fromarray((frame.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    x, y, w, h = (float(v) for v in box)
    ImageDraw.Draw(image).rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=width)
    return np.asarray(image)


def write_drawing(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> None:
    """Write drawn frames as a GIF, an MP4 or a PNG strip (by ``path``'s suffix), atomically."""
    import io

    from PIL import Image

    suffix = path.suffix.lower()
    buffer = io.BytesIO()
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif suffix == ".png":
        picked = [frames[i] for i in np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)]
        Image.fromarray(np.concatenate(picked, axis=1)).save(buffer, format="PNG")
    elif suffix == ".mp4":
        import av

        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=int(fps))
            stream.height, stream.width = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
            stream.pix_fmt = "yuv420p"
            for f in frames:
                image = av.VideoFrame.from_ndarray(f[: stream.height, : stream.width], format="rgb24")
                for packet in stream.encode(image):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise ValueError(f"--draw {path}: use a .gif, .mp4 or .png (a strip of frames) file name.")
    atomic_write({path.name: buffer.getvalue()}, path.parent)


def track_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracking.py track", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the tracking recipe the adapter was trained with")
    parser.add_argument("--adapter", required=True, help="the adapter directory fit wrote (<log_dir>/adapter)")
    parser.add_argument("--input", required=True, help="a video file (PyAV) or a folder of frames")
    parser.add_argument("--box", required=True, type=_box, help="x,y,w,h of the target in the first frame")
    parser.add_argument("--output", required=True, help="the text file of per-frame boxes (x,y,w,h)")
    parser.add_argument("--draw", default=None, help="also write the frames with boxes: .gif, .mp4 or .png strip")
    parser.add_argument("--backbone-arg", action="append", type=_override, default=[], help="key=value override")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from ..core.api import load_adapter

    tracker = build_from_recipe(args.config, dict(args.backbone_arg))
    model = load_adapter(tracker, args.adapter)
    boxes, scores = Tracker(model, device=args.device).track_batch([read_video(args.input)], [args.box], True)[0]
    output = Path(args.output)
    lines = "".join(f"{x:.4f},{y:.4f},{w:.4f},{h:.4f}\n" for x, y, w, h in boxes)
    atomic_write({output.name: lines.encode()}, output.parent)
    if args.draw:
        write_drawing(Path(args.draw), [draw(f, b) for f, b in zip(read_video(args.input), boxes, strict=False)])
    print(
        f"tracked {len(boxes)} frames (mean confidence {scores[1:].mean() if len(scores) > 1 else 1.0:.3f}): {output}"
    )
    return 0


def _read(dataset: str, root: str, split: str) -> list:
    from .data import read_got10k, read_lasot, read_trackingnet

    if dataset == "got10k":
        return read_got10k(root, split)
    if dataset == "lasot":
        return read_lasot(root, split)
    return read_trackingnet(root, [split] if split != "train" else None)


def evaluate_main(argv: list[str] | None = None) -> int:
    """``python recipes/tracking.py evaluate``: track a benchmark's sequences, write the official result files and,
    where the annotations are complete (GOT-10k val, LaSOT test), print and write the metrics."""
    parser = argparse.ArgumentParser(prog="tracking.py evaluate", description=evaluate_main.__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the tracking recipe the adapter was trained with")
    parser.add_argument("--adapter", required=True, help="the adapter directory fit wrote (<log_dir>/adapter)")
    parser.add_argument("--dataset", required=True, choices=["got10k", "lasot", "trackingnet"])
    parser.add_argument("--root", required=True, help="the data set's root folder")
    parser.add_argument("--split", default="test", help="got10k: val or test; lasot: test; trackingnet: TEST")
    parser.add_argument("--results", required=True, help="folder for the per-sequence result files")
    parser.add_argument("--batch", type=int, default=8, help="sequences tracked in parallel")
    parser.add_argument("--limit", type=int, default=0, help="only the first N sequences (0: all)")
    parser.add_argument("--memory", choices=["segments", "thirds"], default=None, help="default: thirds for LaSOT")
    parser.add_argument("--backbone-arg", action="append", type=_override, default=[], help="key=value override")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from ..core.api import load_adapter
    from .metrics import got10k_metrics, ope_metrics, write_got10k_results, write_ope_results

    sequences = _read(args.dataset, args.root, args.split)[: args.limit or None]
    memory = args.memory or ("thirds" if args.dataset == "lasot" else "segments")
    model = load_adapter(build_from_recipe(args.config, dict(args.backbone_arg)), args.adapter)
    tracker = Tracker(model, memory=memory, device=args.device)
    results, predictions = Path(args.results), []
    for start in range(0, len(sequences), args.batch):
        chunk = sequences[start : start + args.batch]
        boxes = tracker.track_batch([s.frames for s in chunk], [s.boxes[0] for s in chunk])
        for sequence, predicted, seconds in zip(chunk, boxes, tracker.last_times, strict=True):
            if args.dataset == "got10k":
                write_got10k_results(results, sequence.name, predicted, seconds)
            else:
                write_ope_results(results, sequence.name, predicted)
        predictions += boxes
    print(f"tracked {len(sequences)} sequences; results in {results}/")
    if not sequences or any(len(s.boxes) < len(s.frames) for s in sequences):
        return 0  # a test split without annotations: submit the files to the benchmark's server
    truths = [s.boxes for s in sequences]
    if args.dataset == "got10k":
        result = got10k_metrics(predictions, truths, covers=[s.visible.astype(int) for s in sequences])
        metrics = {"ao": result.ao, "sr50": result.sr50, "sr75": result.sr75}
    else:
        result = ope_metrics(predictions, truths, visible=[s.visible for s in sequences])
        metrics = {"success_auc": result.success_auc, "precision": result.precision}
        metrics["norm_precision"] = result.norm_precision
    atomic_write({"metrics.json": {k: round(v, 6) for k, v in metrics.items()}}, results)
    print(", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items()))
    return 0


__all__ = ["build_from_recipe", "draw", "evaluate_main", "track_main", "write_drawing"]
