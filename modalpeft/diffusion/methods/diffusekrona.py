r"""DiffuseKronA: Kronecker adapters on a diffusion UNet's attention (Marjit et al., WACV 2025).

Paper: https://openaccess.thecvf.com/content/WACV2025/papers/Marjit_DiffuseKronA_A_Parameter_Efficient_Fine-Tuning_Method_for_Personalized_Diffusion_Models_WACV_2025_paper.pdf
(paper page https://diffusekrona.github.io); official code: https://github.com/IBM/DiffuseKronA (``krona.py``).

Each targeted ``nn.Linear`` (``W ∈ R^{d_out×d_in}``) gets a parallel Kronecker update, with
``A ∈ R^{a1×a2}`` and ``B ∈ R^{b1×b2}``, ``b1 = d_out / a1``, ``b2 = d_in / a2``:

- ``layout="official"`` (default) copies the official ``KronALinearLayer.forward``: ``x`` viewed as
  ``X ∈ R^{a2×b2}``, ``Z = B Xᵀ Aᵀ ∈ R^{b1×a1}`` read out row-major, i.e. ``ΔW = s · Q · (A ⊗ B)`` with the fixed
  output perfect shuffle ``Q``: ``out[r·a1 + s] = v[s·b1 + r]`` (METHODS.md §6). Here ``A`` is the transpose of
  the official ``down.weight`` and ``B`` the official ``up.weight``.
- ``layout="kron"``: the paper's plain ``ΔW = s · (A ⊗ B)``, which is LyCORIS/peft LoKr with full factors
  ``w1 = A``, ``w2 = B`` and ``α = r``.

The official layout is not a LoKr: its row index ``r·a1 + s`` nests ``B``'s row outside ``A``'s while the
column index ``j·b2 + l`` nests ``A``'s column outside ``B``'s, so ``Q·(A ⊗ B)`` equals no ``w1 ⊗ w2`` unless
``a1 = 1`` or ``b1 = 1``. Both layouts merge exactly (``delta_weight`` is the dense ``ΔW``).

Init (official): ``A ~ N(0, (1/a1)²)``, ``B = 0``, so ``ΔW = 0`` at the start. No ``network_alpha`` in the
official scripts, so ``s = scale`` (1.0; the attention processor's ``scale`` at inference).

Placement (official ``attn_update_unet="kqvo"``): ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and
``attn2`` in every transformer block of a diffusers ``UNet2DConditionModel``; the cross-attention ``to_k`` /
``to_v`` take the text width as ``d_in``. ``target_modules`` selects other Linears (any model).

Trainable count per layer: ``a1·a2 + (d_out/a1)·(d_in/a2)``; a1=64, a2=8 gives 2,152,320 on SDXL's UNet and
260,656 on SD-2.1-base's (LoRA r=4 on the same layers: 5,806,080 and 829,952).

Shapes:
    - input of an adapted Linear: ``(*, d_in)``; output ``(*, d_out)``
    - ``A``: ``(a1, a2)``; ``B``: ``(d_out/a1, d_in/a2)``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.methods.krona import attach_kronecker
from ...core.registry import register_method

UNET_ATTENTION_TARGETS = [
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
]
"""The official placement: the q/k/v/out projections of self- and cross-attention (dotted name suffixes)."""

LAYOUTS = ("official", "kron")
PAPER = "https://diffusekrona.github.io"  # project page: paper (WACV 2025 PDF), code, data


@dataclass
class DiffuseKronAConfig(AdapterConfig):
    """DiffuseKronA. ``target_modules=None`` adapts every ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0`` of a diffusers UNet."""

    a1: int = field(default=64, metadata=_help("Rows of A; must divide every target's d_out (b1 = d_out / a1)."))
    a2: int = field(default=8, metadata=_help("Columns of A; must divide every target's d_in (b2 = d_in / a2)."))
    layout: str = field(
        default="official",
        metadata=_help("'official': the official code's Q·(A ⊗ B) (output shuffle); 'kron': plain A ⊗ B (LoKr)."),
    )
    scale: float = field(default=1.0, metadata=_help("Scale s of the Kronecker branch (switchable after loading)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("a1", "a2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer that divides the layers' dims.")
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"layout={self.layout!r} is not valid; use 'official' (the official code's output shuffle) or "
                "'kron' (plain A ⊗ B, exportable as LoKr)."
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"scale={self.scale!r} must be a float (e.g. 1.0).")


@register_method("diffusekrona", DiffuseKronAConfig, modality="diffusion", mergeable=True, paper=PAPER)
def apply_diffusekrona(
    model: nn.Module, config: DiffuseKronAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    layout: Literal["kron", "official"] = "official" if config.layout == "official" else "kron"
    attach_kronecker(
        model, config, adapter_name, scaling=float(config.scale), layout=layout, default=UNET_ATTENTION_TARGETS
    )
