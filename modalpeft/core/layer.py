"""The adapter-layer contract: what every native method places in a model.

Two kinds of object work together:

* an :class:`AdapterModule` holds *one* adapter's parameters at *one* place in the model and says how
  they act there, through any of the hooks below;
* an :class:`AdapterLayer` is the host that replaces a base module in the model tree. It keeps the
  original module as ``base_layer``, one :class:`AdapterModule` per adapter name in ``adapters``, and
  runs the active adapter around the base module. Freezing, saving and merging find adapters by
  walking the model for ``AdapterLayer`` instances, never by matching parameter names.

The hooks an adapter module may override, applied by the host in this order::

    context(args, kwargs)                          # read the call's other inputs (attention mask, KV cache)
    x   = pre(x)                                   # transform the host's first input (prompt insertion)
    out = base_layer(x, ...)  with  param_deltas  # additive deltas on the base's own parameters (BitFit)
       or replace_base(base_layer, x)              # the adapted module computed by the adapter (NeuroAda, PaCA)
    out = out + parallel(x)                        # a branch beside the base layer (LoRA, KronA, MoE)
    out = post(out)                                # transform the output (SSF, sequential adapters)

When the base layer returns a tuple (``nn.MultiheadAttention``, Hugging Face layers), ``parallel`` and
``post`` act on its first element. An adapter module that must rewrite several inputs and the output together
overrides ``around(base, args, kwargs)`` instead, which takes over the whole call (DePT builds ``inputs_embeds``
from ``input_ids`` and lengthens the attention mask); the four hooks above are then not applied. An adapter
module with ``skips_base = True`` takes the base module out of the path while it runs (``out = x``;
:class:`~modalpeft.core.layers.Bypass`), for a base module that a method's own recipe does not have. An adapter
module that overrides ``replace_base`` computes the base module's output itself, from its parameters and the
input: an adapted Linear ``x W'ᵀ + b`` in one product, with a backward pass of its own (NeuroAda's sparse delta,
PaCA's partial connections), where a parallel branch would cost a second product.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

InitMode = bool | Literal["identity"]


class AdapterModule(nn.Module):
    """One adapter's parameters at one place of the model.

    Subclasses override any of :meth:`pre`, :meth:`param_deltas`, :meth:`parallel`, :meth:`post`. A
    mergeable subclass sets ``mergeable = True`` and implements :meth:`merge` and :meth:`unmerge`
    (exact, in place, on the host's ``base_layer``); the defaults merge :meth:`delta_weight` into
    ``base.weight`` and :meth:`param_deltas` into the named parameters.
    """

    mergeable: ClassVar[bool] = False
    no_weight_decay: ClassVar[bool] = False
    """Set by layers whose parameters the papers never decay (prompts, scale/shift vectors)."""
    has_context: ClassVar[bool] = False
    has_pre: ClassVar[bool] = False
    has_param_deltas: ClassVar[bool] = False
    has_parallel: ClassVar[bool] = False
    has_post: ClassVar[bool] = False
    has_around: ClassVar[bool] = False
    has_replace_base: ClassVar[bool] = False
    skips_base: ClassVar[bool] = False
    """Set by adapters that replace the base module by the identity while they run (the host returns ``x``)."""
    input_arg: int = 0
    """Which positional input of the host ``pre`` and ``parallel`` act on (0: the first; 1 serves hosts such as
    BERT's ``BertOutput(hidden_states, input_tensor)``, whose second input is the residual stream)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in ("context", "pre", "param_deltas", "parallel", "post", "around", "replace_base"):
            setattr(cls, f"has_{hook}", getattr(cls, hook) is not getattr(AdapterModule, hook))

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        """(Re)initialise the adapter's parameters.

        ``True`` is the method's own initialisation (what its paper does), ``"identity"`` leaves the host's
        output unchanged, ``False`` draws random non-zero values (for merge and save/load tests).
        """
        raise NotImplementedError

    def merge_hint(self) -> str:
        """Why a non-mergeable adapter cannot be merged and what to use instead, for ``merge_and_unload``'s error."""
        return ""

    def context(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """See the host call's inputs before the other hooks run (an adapter that mixes positions over time
        reads the attention mask and the key/value cache of an autoregressive decoder block here)."""

    def pre(self, x: Tensor) -> Tensor:
        """Transform the host's first input."""
        return x

    def param_deltas(self, base: nn.Module) -> dict[str, Tensor]:
        """Additive deltas for the base module's own parameters, by parameter name."""
        return {}

    def parallel(self, x: Tensor) -> Tensor:
        """A branch added to the base output; ``x`` is the (pre-transformed) input."""
        raise NotImplementedError

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        """The adapted base module's output on ``x``, in place of ``base(x)`` (single-input modules such as
        ``nn.Linear``); its update of ``base.weight`` is :meth:`delta_weight`."""
        raise NotImplementedError

    def post(self, out: Tensor) -> Tensor:
        """Transform the base output."""
        return out

    def around(self, base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The whole adapted call: ``base(*args, **kwargs)`` with inputs and output rewritten together."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense update of ``base.weight`` that this adapter's ``parallel`` branch equals."""
        raise NotImplementedError(f"{type(self).__name__} has no dense weight delta")

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """Fold this adapter into ``base`` in place, so that ``base(x)`` equals the adapted output."""
        self._add_to_base(base, sign=1.0)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """Undo :meth:`merge`."""
        self._add_to_base(base, sign=-1.0)

    def _add_to_base(self, base: nn.Module, sign: float) -> None:
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} cannot be merged into {type(base).__name__}")
        for name, delta in self.param_deltas(base).items():
            param = base.get_parameter(name)
            param.add_(delta.to(param.dtype), alpha=sign)
        if self.has_parallel or self.has_replace_base:
            weight = base.weight
            weight.add_(self.delta_weight().reshape(weight.shape).to(weight.dtype), alpha=sign)


def _first_input(args: tuple, kwargs: dict, index: int = 0) -> tuple[Tensor, str | int | None]:
    """The host input an adapter acts on, and where it came from (``None``: ``args[0]``, an int: ``args[index]``,
    a str: that keyword)."""
    if index:
        if len(args) > index:
            return args[index], index
        raise TypeError(
            f"the adapter reads the host's positional input {index}, but the host was called with {len(args)} "
            f"positional input(s) and keywords {sorted(kwargs)}"
        )
    if args:
        return args[0], None
    if kwargs:
        key = next(iter(kwargs))
        return kwargs[key], key
    raise TypeError("an adapted module was called without inputs")


class AdapterLayer(nn.Module):
    """Host that wraps a base module and runs the active adapter around it.

    Args:
        base_layer: the module being adapted; it stays in the tree as ``base_layer`` and is restored by
            :meth:`unwrap`.

    Attributes:
        adapters: ``nn.ModuleDict`` from adapter name to :class:`AdapterModule`.
        active_adapter: the adapter that runs in ``forward`` (``None``: none).
        merged: names of adapters currently folded into ``base_layer``.
        disabled: when ``True``, ``forward`` is the base module's (merged adapters stay merged).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        # Code that reads the wrapped module's attributes directly (``layer.weight``, ``layer.in_features``;
        # ``nn.MultiheadAttention`` reads ``out_proj.weight``) still finds them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)

    def add(self, name: str, adapter: AdapterModule) -> None:
        assert name not in self.adapters, name
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        self.adapters[name].merge(self.base_layer)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.adapters[name].unmerge(self.base_layer)
        self.merged.remove(name)

    def unwrap(self) -> nn.Module:
        """The base module, with merged adapters left in and unmerged ones dropped."""
        return self.base_layer

    def _running(self) -> AdapterModule | None:
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged or name not in self.adapters:
            return None
        return self.adapters[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter = self._running()
        if adapter is None:
            return self.base_layer(*args, **kwargs)
        if adapter.has_context:
            adapter.context(args, kwargs)
        if adapter.has_around:
            return adapter.around(self.base_layer, args, kwargs)
        x, key = _first_input(args, kwargs, adapter.input_arg)
        if adapter.has_pre:
            x = adapter.pre(x)
            if key is None:
                args = (x, *args[1:])
            elif isinstance(key, int):
                args = (*args[:key], x, *args[key + 1 :])
            else:
                kwargs = {**kwargs, key: x}
        if adapter.skips_base:
            out = x
        elif adapter.has_replace_base:
            out = adapter.replace_base(self.base_layer, x)
        elif adapter.has_param_deltas:
            deltas = adapter.param_deltas(self.base_layer)
            params = {k: self.base_layer.get_parameter(k) + d for k, d in deltas.items()}
            out = functional_call(self.base_layer, params, args, kwargs, strict=False)
        else:
            out = self.base_layer(*args, **kwargs)
        if not (adapter.has_parallel or adapter.has_post):
            return out
        rest = None
        if isinstance(out, tuple):
            out, rest = out[0], out[1:]
        if adapter.has_parallel:
            out = out + adapter.parallel(x).to(out.dtype)
        if adapter.has_post:
            out = adapter.post(out)
        return out if rest is None else (out, *rest)

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged}, disabled={self.disabled}"
