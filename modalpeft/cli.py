"""The ``modalpeft`` console script.

modalpeft methods              every registered method: modality, mergeability, paper
modalpeft inspect DIR          what an adapter directory holds (native or peft format)
modalpeft demo [--quick]       the embedded end-to-end demo (what ``make demo`` runs)
modalpeft fit|validate|test|predict --config RECIPE.yaml
                               LightningCLI on any recipe (the same as ``python recipes/<modality>.py``)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODALITIES = ("vision", "pointcloud", "diffusion", "tracking", "audio", "text")
"""The modality packages; each registers its own methods when imported."""


LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEMO_SECTIONS = ("vision", "deepfake", "pointcloud", "text", "diffusion", "tracking", "audio")
"""``modalpeft demo --modality`` choices (``modalpeft.demo.SECTIONS``, named here so that parsing imports no torch)."""


def _console() -> Console:
    # Off a terminal (pipes, CI logs, tests) rich would fold the tables to 80 columns.
    return Console(width=None if sys.stdout.isatty() else 120)


def import_modalities() -> list[str]:
    """Import every modality package that exists, so that their methods are registered; returns their names."""
    found = [m for m in MODALITIES if importlib.util.find_spec(f"modalpeft.{m}") is not None]
    for name in found:
        importlib.import_module(f"modalpeft.{name}")
    return found


def cmd_methods(args: argparse.Namespace) -> int:
    import modalpeft as mp

    import_modalities()
    table = Table(title="modalpeft methods (native)")
    for col in ("method", "config", "modality", "mergeable", "paper"):
        table.add_column(col)
    for name in mp.list_methods():
        info = mp.get_method(name)
        table.add_row(name, info.config_cls.__name__, info.modality, "yes" if info.mergeable else "no", info.paper)
    console = _console()
    console.print(table)
    from peft import PeftType

    console.print(
        "peft's methods run through modalpeft.adapt(model, peft.<Name>Config(...)) and save in peft's format: "
        + ", ".join(t.value.lower() for t in PeftType)
    )
    return 0


def _file_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def cmd_inspect(args: argparse.Namespace) -> int:
    from modalpeft.core.state import CONFIG_NAME, WEIGHTS_NAME, read_config, read_tensors

    directory = Path(args.directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; give the folder that save_adapter wrote.")
    config = read_config(directory)
    tensors = read_tensors(directory)
    is_peft = "peft_type" in config
    if not is_peft and "method" not in config and "baseline" not in config:
        raise ValueError(
            f"{directory / CONFIG_NAME} has none of 'method', 'peft_type', 'baseline'; it is not an adapter."
        )

    summary = Table(title=f"adapter {directory}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    if is_peft:
        summary.add_row("format", "peft (loads with peft.PeftModel.from_pretrained too)")
        summary.add_row("method", f"{config['peft_type']} (through peft)")
        summary.add_row("base model", str(config.get("base_model_name_or_path")))
        mapping = config.get("auto_mapping") or {}
        if mapping.get("base_model_class"):
            summary.add_row("base model class", f"{mapping.get('parent_library')}.{mapping['base_model_class']}")
    elif "baseline" in config:
        summary.add_row("format", "modalpeft baseline (the model's own trained tensors, under its state_dict keys)")
        summary.add_row("method", f"{config['baseline']} (mp.load_adapter(model, dir) loads them into model)")
        summary.add_row("modalpeft version", str(config.get("modalpeft_version")))
        summary.add_row("base model class", str(config.get("base_model_class")))
    else:
        summary.add_row("format", "modalpeft")
        summary.add_row("method", _describe_method(config["method"]))
        summary.add_row("modalpeft version", str(config.get("modalpeft_version")))
        summary.add_row("base model class", str(config.get("base_model_class")))
    n_params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    summary.add_row("tensors", f"{len(tensors):,} ({', '.join(dtypes) or 'none'})")
    summary.add_row("parameters", f"{n_params:,}")
    summary.add_row("files", f"{CONFIG_NAME}, {WEIGHTS_NAME}: {_file_size(directory) / 1024:.1f} KB in all")

    skip = {"method", "baseline", "modalpeft_version", "base_model_class", "peft_type", "base_model_name_or_path"}
    fields = Table(title="peft config" if is_peft else "config")
    fields.add_column("field")
    fields.add_column("value", overflow="fold")
    for key, value in config.items():
        if key not in skip:
            fields.add_row(key, json.dumps(value))

    console = _console()
    console.print(summary)
    console.print(fields)
    if args.tensors:
        listing = Table(title="tensors")
        for col in ("key", "shape", "dtype"):
            listing.add_column(col)
        for key, t in tensors.items():
            listing.add_row(key, str(tuple(t.shape)), str(t.dtype).removeprefix("torch."))
        console.print(listing)
    return 0


def _describe_method(name: str) -> str:
    import modalpeft as mp

    import_modalities()
    if name not in mp.list_methods():
        return f"{name} (not registered in this installation)"
    info = mp.get_method(name)
    return f"{name} ({info.modality}, {'mergeable' if info.mergeable else 'not mergeable'}, {info.paper})"


def demo_contenders(modality: str) -> list[str] | None:
    """The contenders that ``demo --methods`` picks from in a section (``None``: the section has no such choice)."""
    if modality == "vision":
        from modalpeft.vision.demo import LRS

        return list(LRS)
    if modality == "text":
        from modalpeft.text.demo import CONTENDERS

        return list(CONTENDERS)
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from modalpeft.demo import run_demo

    chosen = (args.modality or DEMO_SECTIONS) if args.methods else ()
    for modality in chosen:
        names = demo_contenders(modality)
        if names is None:
            print(
                f"modalpeft demo: error: --methods picks the contenders of the vision and text sections; the "
                f"{modality} section runs all of its own (pass --modality vision or --modality text with --methods)",
                file=sys.stderr,
            )
            return 2
        unknown = [m for m in args.methods if m not in names]
        if unknown:
            print(
                f"modalpeft demo: error: unknown {modality} --methods {unknown}; choose from {names}", file=sys.stderr
            )
            return 2

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in ("seed", "seeds", "steps", "batch_size", "threads", "workers", "lr_grid", "tasks", "methods", "suite")
        and v not in (None, False)
    }
    for key in ("tasks", "methods"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return run_demo(
        args.modality,
        quick=args.quick,
        out=args.out,
        results_dir=args.results_dir or None,
        console=_console(),
        **overrides,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modalpeft", description="Parameter-efficient fine-tuning across modalities, on one adapter core."
    )
    from modalpeft import __version__

    parser.add_argument("--version", action="version", version=f"modalpeft {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{methods,inspect,demo,fit,validate,test,predict}"
    )
    for name in LIGHTNING_SUBCOMMANDS:  # listed for --help; main() hands them to LightningCLI before parsing
        sub.add_parser(name, help=f"LightningCLI {name} on a recipe: modalpeft {name} --config RECIPE.yaml")

    p = sub.add_parser("methods", help="list every registered method with its modality, mergeability and paper")
    p.set_defaults(func=cmd_methods, user_errors=())

    p = sub.add_parser("inspect", help="show an adapter directory's method, config, parameter count, base class")
    p.add_argument("directory", help="a folder written by save_adapter (modalpeft or peft format)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with its shape and dtype")
    p.set_defaults(func=cmd_inspect, user_errors=(OSError, ValueError))

    p = sub.add_parser(
        "demo",
        help="the offline end-to-end demo: each modality's embedded default, adapted with every method",
        description="Adapt each modality's committed pretrained model on offline tasks with linear probing, full "
        "fine-tuning and the PEFT methods; save, reload and merge each, print tables and write the reports to a run "
        "folder (outputs/demo/<timestamp>/, printed at the end; the checkout is left unchanged). "
        "Vision: the Fashion-MNIST ViT on mini-VTAB (digits, LFW faces, counting). Diffusion: DreamBooth on a small "
        "Fashion-MNIST text-to-image UNet.",
    )
    p.add_argument("--modality", nargs="+", choices=DEMO_SECTIONS, help="sections to run (default: all of them)")
    p.add_argument("--out", default=None, help="the run folder (default: a new outputs/demo/<timestamp>)")
    p.add_argument(
        "--results-dir",
        default=None,
        help="also write the markdown reports there (maintainers: docs/results regenerates the committed pages)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="seeds per method and task (vision default: 1; docs/results/vision.md: 3); text: the page averages "
        "over them (default: 1; the 180-step pages: 3)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="text: the first seed (default: 0); with --seeds N the runs use seeds SEED to SEED+N-1, e.g. to add "
        "seeds to a page's judged ones",
    )
    p.add_argument("--steps", type=int, help="training steps per run (vision default: 300, point clouds: 150)")
    p.add_argument("--batch-size", type=int, help="batch size (vision default: 32)")
    p.add_argument("--threads", type=int, help="CPU threads for torch per process (default: 1)")
    p.add_argument("--workers", type=int, help="vision: processes training side by side (default: 2)")
    p.add_argument(
        "--lr-grid",
        action="store_true",
        help="vision: pick each method's learning rate on val200 (slower); text, diffusion, tracking, audio: the "
        "learning-rate study on a validation split (diffusion: a validation subject; tracking: validation sequences) "
        "instead of the demo (docs/results/<modality>_lr_grid.md)",
    )
    p.add_argument("--tasks", nargs="+", choices=("digits", "faces", "count"), help="vision: mini-VTAB tasks to run")
    p.add_argument("--methods", nargs="+", help="vision and text: the contenders to run (default: the section's)")
    p.add_argument(
        "--suite",
        choices=("adapters", "weight-space", "mwa"),
        help="text: the contenders, issue 18's adapters (default: docs/results/text.md), the weight-space methods "
        "(text_weight_space.md), or checkpoint merging of adapters' last saves (text_mwa.md)",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds' run with almost no training (for tests)")
    p.set_defaults(func=cmd_demo, user_errors=())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script and return its exit code.

    Bad input (a missing directory, a corrupt adapter file, an unknown option) prints a one-line message and
    returns 2, as argparse does; anything else is a bug and keeps its traceback.
    """
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from modalpeft.lightning import cli_main

        import_modalities()
        cli_main(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself (no 'args' warning)
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except args.user_errors as e:
        print(f"modalpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
