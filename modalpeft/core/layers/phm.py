"""PHM linear map: ``y = x H + b`` with ``H = Σ_i A_i ⊗ W_i`` (Zhang et al., ICLR 2021; Compacter).

Parameterized hypercomplex multiplication (https://openreview.net/forum?id=rcQdycl0zyk) builds a
``d_in x d_out`` weight from ``n`` Kronecker products of a small "rule" matrix ``A_i ∈ R^{n x n}`` and a block
``W_i ∈ R^{(d_in/n) x (d_out/n)}``. Compacter (Karimi Mahabadi et al., NeurIPS 2021,
https://arxiv.org/abs/2106.04647) factorises each block to rank ``k`` (``W_i = L_i R_i``, ``k = 1`` in the
paper) and shares one rule tensor ``A`` across every PHM layer of the model.

Sharing: a layer built with ``rule=None`` owns its rule (a registered parameter, saved with it); a layer built
with ``rule=<a Parameter of another layer>`` only refers to it, so the shared tensor is registered, trained and
saved once, under the owner's name, and loading it into the owner updates every layer that refers to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PHMLinear(nn.Module):
    """``y = x H + b``, ``H = Σ_{i=1..n} A_i ⊗ W_i``, ``W_i = L_i R_i`` when ``rank`` is given.

    Args:
        in_features: ``d_in``; divisible by ``n``.
        out_features: ``d_out``; divisible by ``n``.
        n: the number of Kronecker summands (Compacter's ``hypercomplex_division``).
        rank: rank ``k`` of each block ``W_i`` (Compacter: 1); ``None``: full blocks (the PHM-Adapter).
        rule: a shared rule tensor ``(n, n, n)`` owned by another layer; ``None``: this layer owns one.
        bias: a bias ``b`` of size ``d_out``.
        rule_init_std: std of the normal init of an owned rule (Compacter: ``phm_init_range = 1e-4``).

    Shapes:
        - input: ``(*, d_in)``; output: ``(*, d_out)``
        - parameters: ``n·(d_in/n)·k + n·k·(d_out/n) = k·(d_in + d_out)`` (factorised) or
          ``d_in·d_out/n`` (full), ``+ d_out`` (bias), ``+ n³`` when it owns its rule
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int,
        *,
        rank: int | None = 1,
        rule: nn.Parameter | None = None,
        bias: bool = True,
        rule_init_std: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, dim in (("in_features", in_features), ("out_features", out_features)):
            if n < 1 or dim % n:
                raise ValueError(
                    f"PHM: n={n} does not divide {name}={dim}; choose n among the common divisors of "
                    f"{in_features} and {out_features} (Compacter uses n=4)."
                )
        if rank is not None and rank < 1:
            raise ValueError(f"PHM: rank={rank} must be >= 1, or None for full blocks")
        if rule is not None and tuple(rule.shape) != (n, n, n):
            raise ValueError(f"PHM: the shared rule has shape {tuple(rule.shape)}, expected {(n, n, n)}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        self.rule_init_std = rule_init_std
        a, b = in_features // n, out_features // n
        if rank is None:
            self.W = nn.Parameter(torch.empty(n, a, b, **kw))
        else:
            self.W_left = nn.Parameter(torch.empty(n, a, rank, **kw))
            self.W_right = nn.Parameter(torch.empty(n, rank, b, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if rule is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, **kw))
            self._shared: tuple[nn.Parameter, ...] = ()
        else:
            self.phm_rule = None
            self._shared = (rule,)  # a plain attribute: not registered here, so saved once by its owner
        self.reset_parameters()

    @property
    def owns_rule(self) -> bool:
        return self.phm_rule is not None

    @property
    def rule(self) -> Tensor:
        """The rule tensor ``A``, ``(n, n, n)``: this layer's own or the shared one."""
        return self.phm_rule if self.phm_rule is not None else self._shared[0]

    @torch.no_grad()
    def reset_parameters(self, zero_output: bool = False) -> None:
        """Compacter's init: blocks glorot-uniform with gain √2 per summand, bias 0, an owned rule ~ N(0, std²).

        ``zero_output=True`` zeroes ``W_right`` (or ``W``) so that ``H = 0``.
        """
        blocks = [self.W] if self.rank is None else [self.W_left, self.W_right]
        for tensor in blocks:
            for i in range(self.n):
                nn.init.xavier_uniform_(tensor[i], gain=math.sqrt(2))
        if zero_output:
            nn.init.zeros_(blocks[-1])
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.phm_rule is not None:
            nn.init.normal_(self.phm_rule, std=self.rule_init_std)

    def blocks(self) -> Tensor:
        """``W``, ``(n, d_in/n, d_out/n)``."""
        return self.W if self.rank is None else torch.bmm(self.W_left, self.W_right)

    def weight_matrix(self) -> Tensor:
        """``H = Σ_i A_i ⊗ W_i``, ``(d_in, d_out)`` (note: input-major, ``y = x H``)."""
        rule, w = self.rule, self.blocks()
        n, a, b = w.shape
        # (n, n, n) x (n, a, b) -> (n, n, a, n, b) -> sum over i -> (n·a, n·b)
        return torch.einsum("ipq,iab->paqb", rule.to(w.dtype), w).reshape(n * a, n * b)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight_matrix()
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        shared = "owned" if self.owns_rule else "shared"
        return f"in={self.in_features}, out={self.out_features}, n={self.n}, rank={self.rank}, rule={shared}"
