"""Adapter files on disk: ``adapter_config.json`` + ``adapter_model.safetensors``, written atomically.

Nothing here unpickles: configs are JSON, tensors are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (the committed pretrained weights are checked with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], sha256: str, owner: str, hint: str) -> Path:
    """Check that the file ``path`` exists and has the hex sha256 ``sha256``; return it as a ``Path``.

    ``owner`` names the caller in the messages; ``hint`` says where the file comes from and what to do instead.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: its sha256 differs (a corrupted or replaced file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: weights file {str(path)!r} does not exist; {hint}")
    digest = sha256_of(path)
    if digest != sha256:
        raise ValueError(
            f"{owner}: sha256 mismatch for {str(path)!r}: got {digest}, expected {sha256}. The file is corrupted or "
            f"was replaced; {hint}"
        )
    return path


def read_verified_weights(path: str | os.PathLike[str], sha256: str, owner: str, hint: str) -> dict[str, torch.Tensor]:
    """The tensors of a committed safetensors file, after :func:`verify_sha256`."""
    return load_file(str(verify_sha256(path, sha256, owner, hint)))


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(files: Mapping[str, Any], directory: str | os.PathLike[str]) -> None:
    """Write several files into ``directory`` so that either all of them change or none does.

    Args:
        files: file name -> a dict (written as JSON) or a ``{key: tensor}`` mapping under a ``.safetensors``
            name, or ``bytes``.
        directory: created when missing.

    Every file is first written under a temporary name in ``directory``; only when all are written are they
    renamed into place. A failure removes the temporary files and leaves the old files as they were. The files get
    the permissions the process's umask gives a new file (``0o666 & ~umask``, as ``open`` would), not the
    owner-only mode of the temporary file.

    Raises:
        ValueError: ``directory`` (or a folder above it) is an existing file, not a folder.
    """
    directory = Path(directory)
    blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(
            f"{str(directory)!r} must be a folder to write {', '.join(files)} into, but {str(blocking)!r} is an "
            "existing file; give a folder path (it is created when missing), or move the file away."
        )
    directory.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~current_umask()
    temps: dict[str, str] = {}
    try:
        for name, content in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            temps[name] = tmp
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().contiguous().cpu() for k, v in content.items()}
                save_file(tensors, tmp, metadata={"format": "pt"})
            elif isinstance(content, bytes):
                Path(tmp).write_bytes(content)
            else:
                Path(tmp).write_text(json.dumps(content, indent=2) + "\n")
            os.chmod(tmp, mode)  # after writing: a writer may replace the file (safetensors does)
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
        temps.clear()
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with errors that say what is wrong."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {directory} is not an adapter directory (expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}, as written by save_adapter)."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupted: save the adapter again.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(directory: str | os.PathLike[str], name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory's safetensors file (never unpickled)."""
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; save the adapter again with save_adapter().")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupted: save the adapter again."
        ) from e
