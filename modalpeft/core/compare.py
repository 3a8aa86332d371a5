"""Whether a reloaded or merged model is the trained one: the lifecycle checks the demos run."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CHECK_RTOL = 1e-5
"""A reloaded or merged model must predict the same labels as the trained one, with logits within
``CHECK_RTOL * max(1, max |logit|)`` of its logits (float32 rounding: merging changes the order of sums, and
BLAS results depend on memory alignment)."""


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """``model``'s outputs on ``x`` in eval mode, in chunks of 256."""
    model.eval()
    return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def same_outputs(reference: Tensor, other: Tensor) -> tuple[float, bool]:
    """The largest |logit difference| of ``other`` from ``reference``, and whether ``other`` predicts the same
    labels with logits within ``CHECK_RTOL``."""
    diff = (other - reference).abs().max().item()
    tol = CHECK_RTOL * max(1.0, reference.abs().max().item())
    return diff, diff <= tol and bool((other.argmax(-1) == reference.argmax(-1)).all())


def delta(value: float) -> str:
    """A logit difference for a table: ``0`` or one significant digit."""
    return "0" if value == 0 else f"{value:.0e}"


__all__ = ["CHECK_RTOL", "delta", "logits_of", "same_outputs"]
