"""``python recipes/tracking.py track``: run a trained tracker on a video file or a frame folder from a first box.

    python recipes/tracking.py track --config recipes/tracking/dinov2_b14_tmoe_got10k.yaml \\
        --adapter outputs/lightning_logs/version_0/adapter --input clip.mp4 --box 120,80,40,60 \\
        --output boxes.txt --draw boxes.gif

The tracker is built as the recipe's ``model.init_args.backbone`` says (``--backbone-arg key=value`` overrides an
argument, the value read as JSON when it parses), then the adapter directory that ``fit`` wrote
(``<log_dir>/adapter``: an adapter, or a baseline's trained tensors) is loaded into it. The boxes (``x,y,w,h`` per
frame, frame 0 the given box) go to ``--output``; ``--draw`` writes the frames with the boxes drawn: a ``.gif``,
an ``.mp4`` (PyAV) or a ``.png`` strip of up to 8 evenly spaced frames.
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


__all__ = ["build_from_recipe", "draw", "track_main", "write_drawing"]
