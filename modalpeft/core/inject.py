"""Generic injection: target matching, wrapping modules in hosts, walking hosts, freezing.

Module names here are *clean* names: the names the modules had in the base model, before any host was
put around them (``blocks.0.attn.qkv``, never ``blocks.0.attn.qkv.base_layer``). Targets, saved keys and
error messages all use clean names, so they do not depend on which adapters are already in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .config import AdapterConfig
from .layer import AdapterLayer, AdapterModule

_BASE = ".base_layer"


def clean_name(name: str) -> str:
    """Drop the host segments (``.base_layer``) from a module or parameter name."""
    name = name.replace(_BASE + ".", ".")
    if name.endswith(_BASE):
        name = name[: -len(_BASE)]
    return name.removeprefix("base_layer.").removeprefix("base_layer")


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(clean_name, module)`` for every module of the base model, hosts and adapters left out."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, AdapterLayer):
            skip.append(f"{name}.adapters" if name else "adapters")
            continue
        yield clean_name(name), module


RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def running_statistics(modules: Iterator[tuple[str, nn.Module]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, buffer)`` of the running statistics of the normalisation layers among ``(name, module)`` pairs
    (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats``).

    A forward pass in training mode updates them whether or not the layer's parameters train (the official
    PointGST and Point-PEFT recipes train a frozen mini-PointNet's BatchNorm this way), so they are part of what
    training changed, and saving them is what makes a reloaded model the trained one.
    """
    for name, module in modules:
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for key in RUNNING_STATISTICS:
                buffer = getattr(module, key, None)
                if isinstance(buffer, torch.Tensor):
                    yield (f"{name}.{key}" if name else key), buffer


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(clean_name, host)`` for every :class:`AdapterLayer` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield clean_name(name), module


def name_matches(spec: list[str] | str | Callable | None, name: str, module: nn.Module) -> bool:
    """Whether the module ``name`` is one that ``spec`` names, as ``target_modules`` does: a list of names or
    suffixes (``"attn.qkv"`` matches ``blocks.0.attn.qkv``), a regex that matches the whole name, or a callable
    ``(name, module) -> bool``; ``None`` names nothing."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    if callable(spec):
        return bool(spec(name, module))
    return any(name == t or name.endswith("." + t) for t in spec)


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    *,
    default: list[str] | str | Callable | None = None,
    types: tuple[type[nn.Module], ...] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The base modules a method adapts, in model order.

    Args:
        model: the model to search.
        config: its ``target_modules`` (see :data:`modalpeft.core.config.TargetSpec`; ``None`` means
            ``default``, and a ``None`` default selects every module of ``types``) and ``exclude_modules``
            select; ``modules_to_save`` and everything inside them are never selected (they train whole).
        default: the method's default placement.
        types: when given, only modules of these types are selected.

    Modules inside an ``nn.MultiheadAttention`` (its ``out_proj``) are never selected: the attention reads
    their weights directly and never calls them, so an adapter there would do nothing. A default placement
    skips them; naming them in ``target_modules`` is an error that says to target the attention instead.

    Raises:
        ValueError: nothing matched (the message lists module names that exist), or a target sits inside an
            ``nn.MultiheadAttention``.
    """
    spec = config.target_modules if config.target_modules is not None else default
    saved = config.modules_to_save or []
    inside_attention = attention_children(model)
    found = []
    for name, module in base_modules(model):
        if not name or any(name_matches(saved, n, module) for n in _ancestors(name)):
            continue
        if types is not None and not isinstance(module, types):
            continue
        if spec is not None and not name_matches(spec, name, module):
            continue
        if name_matches(config.exclude_modules, name, module):
            continue
        if name in inside_attention:
            if config.target_modules is None:
                continue
            raise ValueError(
                f"{config.method or 'adapter'}: {name!r} is inside an nn.MultiheadAttention, which reads its weights "
                "directly and never calls it, so an adapter there would do nothing. Target the nn.MultiheadAttention "
                "module itself, or other layers."
            )
        found.append((name, module))
    if not found:
        wanted = "" if types is None else f" of type {' | '.join(t.__name__ for t in types)}"
        candidates = [n for n, m in base_modules(model) if n and (types is None or isinstance(m, types))]
        asked = f"target_modules={spec!r}" if config.target_modules is not None else "the default placement"
        raise ValueError(
            f"{config.method or 'adapter'}: {asked} (exclude_modules={config.exclude_modules!r}) "
            f"matched no module{wanted}. Modules that exist{wanted}: {candidates[:12]}"
            f"{' ...' if len(candidates) > 12 else ''}. Pass names (or dotted suffixes) from that list, or a regex."
        )
    return found


def attention_children(model: nn.Module) -> set[str]:
    """Clean names of the submodules of every ``nn.MultiheadAttention`` in ``model``."""
    return {
        f"{n}.{c}" if n else c
        for n, m in base_modules(model)
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_modules()
        if c
    }


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _real_path(model: nn.Module, clean: str) -> str:
    """The current dotted path of the base module named ``clean`` (through any hosts)."""
    path = ""
    for part in clean.split(".") if clean else []:
        module = model.get_submodule(path) if path else model
        if isinstance(module, AdapterLayer):
            path = f"{path}{_BASE}" if path else _BASE[1:]
        path = f"{path}.{part}" if path else part
    return path


def attach(model: nn.Module, name: str, adapter_name: str, adapter: AdapterModule) -> AdapterLayer:
    """Put ``adapter`` on the base module ``name``, wrapping it in a host unless it has one already.

    The adapter is moved to the base module's device (and floating dtype) first.
    """
    path = _real_path(model, name)
    module = model.get_submodule(path) if path else model
    parent_path = path.rpartition(".")[0]
    if isinstance(model.get_submodule(parent_path) if parent_path else model, nn.MultiheadAttention):
        raise ValueError(
            f"{name!r} sits inside an nn.MultiheadAttention, which reads its weights directly and never calls it; "
            f"target the MultiheadAttention module ({clean_name(parent_path)!r}) instead."
        )
    if not isinstance(module, AdapterLayer):
        if not path:
            raise ValueError("the model itself cannot be wrapped; target one of its submodules")
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        host = AdapterLayer(module)
        setattr(parent, child, host)
        module = host
    ref = next(module.base_layer.parameters(), None)
    if ref is not None:
        adapter.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    if adapter_name in module.adapters:
        raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}")
    # a new adapter follows the mode of what it adapts: no adapter dropout inside a model in eval mode
    module.train(module.base_layer.training)
    adapter.train(module.base_layer.training)
    module.add(adapter_name, adapter)
    return module


def unwrap_empty(model: nn.Module) -> None:
    """Replace every host that holds no adapter by its base module."""
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, AdapterLayer) and len(module.adapters) == 0:
            _replace(model, path, module.unwrap())


def unwrap_all(model: nn.Module) -> nn.Module:
    """Replace every host by its base module (merged adapters stay in, the rest is dropped)."""
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, AdapterLayer):
            _replace(model, path, module.unwrap())
    return model


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def adapter_parameters(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(clean key, tensor)`` of one adapter's parameters and persistent buffers, across all hosts.

    Keys leave the adapter name out: ``blocks.0.attn.qkv.adapters.lora_A``.
    """
    for name, host in hosts(model):
        if adapter_name not in host.adapters:
            continue
        prefix = f"{name}.adapters." if name else "adapters."
        for key, tensor in host.adapters[adapter_name].state_dict(keep_vars=True).items():
            yield prefix + key, tensor


_ADAPTER_SEGMENT = re.compile(r"(?:^|\.)adapters\.([^.]+)\.")


def saved_keys(state: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """A base model's ``state_dict()`` under the keys :func:`adapter_parameters` and ``save_adapter`` use: the
    adapter's name and the hosts' ``base_layer`` segments dropped; other adapters' tensors left out."""
    out = {}
    for key, value in state.items():
        match = _ADAPTER_SEGMENT.search(key)
        if match:
            if match.group(1) != adapter_name:
                continue
            key = key[: match.start(1)] + key[match.end(1) + 1 :]
        out[clean_name(key)] = value
    return out


def set_requires_grad(model: nn.Module, adapter_name: str | None, modules_to_save: list[str]) -> None:
    """Freeze ``model`` except the adapter ``adapter_name`` and the ``modules_to_save``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter_name is not None:
        for _, host in hosts(model):
            if adapter_name in host.adapters:
                for p in host.adapters[adapter_name].parameters():
                    p.requires_grad_(True)
    for _, module in modules_to_save_modules(model, modules_to_save):
        for p in module.parameters():
            p.requires_grad_(True)


def modules_to_save_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules named (exactly or by dotted suffix) in ``names``; a name that matches nothing is an error."""
    if not names:
        return []
    found = []
    for wanted in names:
        matched = [(n, m) for n, m in base_modules(model) if n and (n == wanted or n.endswith("." + wanted))]
        if not matched:
            existing = [n for n, m in base_modules(model) if n and "." not in n]
            raise ValueError(
                f"modules_to_save: no module named {wanted!r}; top-level modules: {existing}. "
                "Give the name of a module to train in place (e.g. the new head)."
            )
        found.extend(matched)
    return found


_FASTPATH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_GUARD = "_modalpeft_fastpath_guard"


def _no_op_pre_hook(module: nn.Module, args: tuple) -> None:
    return None


def guard_torch_fastpath(model: nn.Module, is_adapter: Callable[[nn.Module], bool]) -> None:
    """Keep torch's fused inference path of ``nn.TransformerEncoderLayer`` off where adapters sit inside it.

    In eval mode that fast path reads the layer's weights directly and skips its submodules' ``forward``,
    which would silently drop the adapters. PyTorch takes the fast path only when no forward hook is
    attached, so a no-op pre-hook on each such layer holding an adapter turns it off; layers without adapters
    keep it. :func:`release_fastpath_guards` removes the hooks.
    """
    for module in model.modules():
        guarded = hasattr(module, _GUARD)
        if isinstance(module, _FASTPATH_LAYERS) and not guarded and any(is_adapter(m) for m in module.modules()):
            setattr(module, _GUARD, module.register_forward_pre_hook(_no_op_pre_hook))


def release_fastpath_guards(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, _GUARD):
            getattr(module, _GUARD).remove()
            delattr(module, _GUARD)
