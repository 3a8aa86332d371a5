"""The base dataclass of every native method's configuration."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

TargetSpec = list[str] | str | None
"""Which modules a method adapts: a list of names (a name matches a module whose full dotted name equals
it or ends with ``"." + name``), a regular expression matched against the full name, or ``None`` for the
method's default placement. A callable ``(name, module) -> bool`` is also accepted in Python (it cannot be
saved to JSON)."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class AdapterConfig:
    """Fields shared by every native method, with peft's names and meanings.

    Subclasses are dataclasses too; each field has a type, a default and ``metadata={"help": ...}``,
    and ``__post_init__`` validates values and combinations (calling ``super().__post_init__()``).
    """

    target_modules: TargetSpec | Callable[[str, nn.Module], bool] = field(
        default=None,
        metadata=_help(
            "Modules to adapt: names (exact or dotted suffix), a regex on full names, or None for the method's "
            "default placement."
        ),
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_help("Modules never to adapt, in the same forms as target_modules.")
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata=_help("Modules trained in place and saved with the adapter, e.g. a new classification head."),
    )
    init_weights: bool | Literal["identity"] = field(
        default=True,
        metadata=_help(
            "True: the paper's initialisation. 'identity': outputs unchanged at the start. False: random "
            "non-zero values (for tests)."
        ),
    )

    method: ClassVar[str] = ""
    """The registered method name, set by :func:`modalpeft.core.registry.register_method`."""
    data_field: ClassVar[str | None] = None
    """Methods that score parameters on training data (SPT) name the run-time field that takes it (a
    ``metadata={"save": False}`` field); the Lightning task fills it with the training loader when empty."""

    def __post_init__(self) -> None:
        if self.init_weights not in (True, False, "identity"):
            raise ValueError(
                f"init_weights={self.init_weights!r} is not valid; use True (the paper's init), 'identity' or False."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            ok = value is None or isinstance(value, str) or callable(value)
            ok = ok or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            if not ok:
                raise TypeError(f"{name}={value!r} must be a list of module names, a regex string, a callable or None.")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready, plus the ``method`` name.

        Fields declared with ``metadata={"save": False}`` (run-time inputs such as the data a method scores
        parameters on) are left out; what they produced is saved with the adapter's tensors instead.
        """
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.metadata.get("save", True) is False:
                continue
            value = getattr(self, f.name)
            if callable(value) and not isinstance(value, type):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} is a callable and cannot be saved to JSON; give module "
                    "names or a regex instead."
                )
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error that names them."""
        data = {k: v for k, v in data.items() if k not in ("method", "modalpeft_version", "base_model_class")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields: {sorted(names)}. The adapter may come "
                "from a newer modalpeft: upgrade, or drop those keys."
            )
        return cls(**data)

    @classmethod
    def missing_fields(cls, data: dict[str, Any]) -> list[str]:
        """The saved fields (those :meth:`to_dict` writes) that ``data`` lacks: :meth:`from_dict` gives them their
        defaults (right for a file from an older version, which had no such field)."""
        return [
            f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("save", True) and f.name not in data
        ]

    def to_json_file(self, path: str | os.PathLike[str], **extra: Any) -> None:
        with open(path, "w") as f:
            json.dump({**self.to_dict(), **extra}, f, indent=2, sort_keys=False)
            f.write("\n")
