"""DePT: Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024).

Paper: https://arxiv.org/abs/2309.05173; official code: ZhengxiangShi/DePT (``peft/tuners/prompt_tuning_lora.py``,
the ``PROMPT_TUNING_LORA`` branches of ``peft/peft_model.py``, ``train.py``).

A short soft prompt ``P ∈ R^{m×d}`` plus a low-rank **position-wise** update of the input embeddings,
``A ∈ R^{L_max×r}``, ``B ∈ R^{r×d}``, scaled by ``s = alpha / √r`` (not ``alpha / r``). For token embeddings
``E ∈ R^{N×L×d}`` of ``input_ids``:

    E ← E + s · (A B)[:L]          (the same offset for position i of every example, whatever token sits there)
    X = [P, E]  ∈ R^{N×(m+L)×d},   attention_mask ← [1_m, attention_mask]

and the transformer body runs on ``inputs_embeds=X``. ``P``, ``A`` and ``B`` train (the backbone is frozen) with
two learning rates: ``P`` at the task's ``lr``, ``A`` and ``B`` at ``embedding_lr`` (official ``learning_rate``
3e-1/4e-1 and ``lora_embedding_lr`` 1e-4..5e-3); :meth:`DePTConfig.build_optimizer` makes the two AdamW groups
the Lightning task uses.

Init (official): ``P`` from the word embeddings of ``init_text`` tokenised with the model's tokenizer (ids
repeated, then cut, to ``m``; official default text ``"Classify this text is postive or not:"``), else
``N(0, 1)`` (``nn.Embedding``'s default, the official RANDOM); ``A`` ``kaiming_uniform_(a=√5)``, ``B`` zeros, so the
update starts at 0. The prompt always changes the output: no init is the identity (``"identity"`` is the paper's).

Placement: the adapter hosts the transformer *body* that embeds ``input_ids`` (a module whose ``forward`` takes
``input_ids``, ``attention_mask`` and ``inputs_embeds``: ``BertModel`` inside a classifier, LLaMA's ``model``,
T5's encoder stack), found by structure. Where the body's outputs feed a task that indexes them by input position
(classification pooling, a causal LM's labels), the ``m`` prompt positions are dropped from its hidden states:
for a decoder this equals the official ``-100`` labels on the prompt, except that officially the last prompt
position also predicts the first input token (here nothing does: a loss from the second token on, as a plain
causal LM's); for an encoder classifier the pooling then covers the real tokens only. In an encoder-decoder (T5)
only the encoder gets the prompt (official ``num_transformer_submodules=1``) and keeps its outputs, and the
decoder's cross-attention mask is lengthened by ``m`` ones, as the official code passes the lengthened mask to the
whole model. Generation: the first call (empty cache) gets the prompt and the update; later cached steps only shift
positions and masks by ``m``.

Trainable count: ``m·d + L_max·r + r·d`` (t5-base, m=60, r=30, L_max=256: 76,800, the size of 100-token prompt
tuning). Not mergeable: the prompt adds ``m`` tokens, and the offset is per position, not per token.

Differences from the official code:

- inputs shorter than ``L_max`` use ``(A B)[:L]`` (the official code needs every batch padded to exactly
  ``L_max``); for right-padded inputs with an attention mask this computes the same thing on the real tokens;
  inputs longer than ``L_max`` are an error.
- the official classification models (``PeftModelForSequenceClassification``) have no DePT branch; here an
  encoder body with its own pooler (BERT's ``pooler_output``) pools the first prompt token's output.
- the official optimiser ignores ``--weight_decay`` (transformers' ``AdamW`` with the default 0.0): here the
  three tensors are never decayed (``no_weight_decay``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets, hosts
from ...core.layer import AdapterModule, InitMode
from ...core.registry import register_method
from ..structure import bind_arguments, cache_length, find_bodies

OFFICIAL_INIT_TEXT = "Classify this text is postive or not:"
"""The official ``prompt_tuning_init_text`` default (``train.py``), typo included."""


class DecomposedPrompt(AdapterModule):
    """DePT's ``P``, ``A``, ``B`` on the body that embeds ``input_ids`` (see the module docstring).

    Args:
        num_tokens: ``m``.
        dim: ``d``, the embedding width.
        rank: ``r``.
        max_length: ``L_max``, the rows of ``A``.
        alpha: the update is scaled by ``alpha / √r``.
        keep_prompt_outputs: keep the ``m`` prompt positions in the body's outputs (an encoder-decoder's encoder).
        max_positions: learned positions of the body (``None``: no limit), for the length check.
        init_embeddings: ``(m, d)`` word embeddings of the init text (``None``: ``N(0, 1)``).

    Shapes:
        - ``input_ids``, ``attention_mask``: ``(N, L)`` with ``L <= max_length``; the body sees ``(N, m + L, d)``
        - output hidden states: ``(N, L, d)``, or ``(N, m + L, d)`` with ``keep_prompt_outputs``
        - ``prompt``: ``(m, d)``; ``lora_A``: ``(max_length, r)``; ``lora_B``: ``(r, d)``
    """

    no_weight_decay = True

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        rank: int,
        max_length: int,
        alpha: float,
        *,
        keep_prompt_outputs: bool = False,
        max_positions: int | None = None,
        init_embeddings: Tensor | None = None,
        init_weights: InitMode = True,
    ) -> None:
        super().__init__()
        self.scaling = alpha / math.sqrt(rank)
        self.keep_prompt_outputs, self.max_positions = keep_prompt_outputs, max_positions
        self.prompt = nn.Parameter(torch.zeros(num_tokens, dim))
        self.lora_A = nn.Parameter(torch.zeros(max_length, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, dim))
        self.register_buffer("init_embeddings", init_embeddings, persistent=False)
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        if self.init_embeddings is not None:
            self.prompt.copy_(self.init_embeddings)
        else:
            nn.init.normal_(self.prompt)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_weights is False:
            nn.init.normal_(self.lora_B, std=0.1)
        else:
            nn.init.zeros_(self.lora_B)

    def merge_hint(self) -> str:
        return "DePT's prompt adds tokens and its update depends on the position, not the token"

    def embed(self, embeddings: Tensor) -> Tensor:
        """``[P, E + s·(A B)[:L]]`` for token embeddings ``E`` of shape ``(N, L, d)``."""
        n, length = embeddings.shape[:2]
        rows = self.lora_A.shape[0]
        if length > rows:
            raise ValueError(
                f"dept: the input has {length} tokens but the position-wise update has max_length={rows} rows; "
                f"truncate the inputs to {rows} tokens (TextDataModule max_length) or adapt with a larger max_length."
            )
        if self.max_positions is not None and length + self.prompt.shape[0] > self.max_positions:
            raise ValueError(
                f"dept: {self.prompt.shape[0]} prompt tokens + {length} input tokens exceed the model's "
                f"{self.max_positions} learned positions; lower num_tokens or truncate the inputs to "
                f"{self.max_positions - self.prompt.shape[0]} tokens."
            )
        offset = self.scaling * (self.lora_A[:length] @ self.lora_B)  # (L, d)
        prompt = self.prompt.to(embeddings.dtype).expand(n, -1, -1)
        return torch.cat([prompt, embeddings + offset.to(embeddings.dtype)], dim=1)

    def around(self, base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        kwargs = bind_arguments(base, args, kwargs)
        m = self.prompt.shape[0]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError(f"dept takes a 2-D attention_mask (N, L), got shape {tuple(mask.shape)}.")
        cached = cache_length(kwargs)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)
        position_ids = kwargs.get("position_ids")
        if cached:  # a later generation step: the prompt is in the cache already
            if position_ids is not None:
                kwargs["position_ids"] = position_ids + m
            return base(**kwargs)
        input_ids, embeddings = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeddings is None:
            if input_ids is None:
                raise ValueError("dept needs input_ids or inputs_embeds.")
            embeddings = base.get_input_embeddings()(input_ids)
        x = self.embed(embeddings)
        n = x.shape[0]
        if position_ids is not None:
            prompt_positions = torch.arange(m, device=x.device).expand(position_ids.shape[0], m)
            kwargs["position_ids"] = torch.cat([prompt_positions, position_ids + m], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(n, m), types], dim=1)
        out = base(inputs_embeds=x, **kwargs)
        return out if self.keep_prompt_outputs else _drop_positions(out, m)


def _drop_positions(out: Any, m: int) -> Any:
    """The body's output without its first ``m`` positions (hidden states; attentions are left as they are)."""
    if isinstance(out, tuple):
        return (out[0][:, m:], *out[1:])
    out["last_hidden_state"] = out["last_hidden_state"][:, m:]
    if out.get("hidden_states") is not None:
        out["hidden_states"] = tuple(h[:, m:] for h in out["hidden_states"])
    return out


class CrossAttentionMaskPad(AdapterModule):
    """On an encoder-decoder's decoder: ``encoder_attention_mask ← [1_m, mask]`` when the encoder output carries
    DePT's ``m`` prompt positions (no parameters)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens

    def reset_adapter(self, init_weights: InitMode = True) -> None:
        return None

    def merge_hint(self) -> str:
        return "it belongs to DePT's prompt"

    def around(self, base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        kwargs = bind_arguments(base, args, kwargs)
        states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if states is not None and mask is not None and states.shape[1] == mask.shape[-1] + self.num_tokens:
            kwargs["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.num_tokens), mask], -1)
        return base(**kwargs)


@dataclass
class DePTConfig(AdapterConfig):
    """DePT (registered as ``"dept"``); see the module docstring. ``target_modules=None``: the body found by
    structure (the module that embeds ``input_ids``; an encoder-decoder's encoder)."""

    num_tokens: int = field(default=60, metadata=_help("m, the soft prompt's length (official t5-base: 60)."))
    rank: int = field(default=30, metadata=_help("r of the position-wise update A B (official t5-base: 30)."))
    max_length: int = field(
        default=256, metadata=_help("L_max, the longest input (rows of A; official max_seq_length 256).")
    )
    alpha: float = field(default=8.0, metadata=_help("lora_alpha; the update is scaled by alpha / sqrt(rank)."))
    embedding_lr: float | None = field(
        default=None, metadata=_help("Learning rate of A and B (official lora_embedding_lr); None: the task's lr.")
    )
    init_text: str | None = field(
        default=None, metadata=_help(f"Text whose token embeddings start P (official: {OFFICIAL_INIT_TEXT!r}).")
    )
    tokenizer: str | None = field(
        default=None, metadata=_help("Tokenizer (name or path) for init_text; used once, to fill init_token_ids.")
    )
    init_token_ids: list[int] | None = field(
        default=None, metadata=_help("Token ids of init_text (set from init_text; None with no text: N(0,1) init).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_tokens", "rank", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ValueError(f"embedding_lr={self.embedding_lr!r} must be > 0 (or None for the task's lr).")
        if self.init_text is not None and self.init_token_ids is None:
            if self.tokenizer is None:
                raise ValueError(
                    f"init_text={self.init_text!r} needs tokenizer= (the model's tokenizer name or path) to find its "
                    "token ids, or give init_token_ids directly."
                )
            from transformers import AutoTokenizer

            self.init_token_ids = list(AutoTokenizer.from_pretrained(self.tokenizer)(self.init_text)["input_ids"])
        if self.init_token_ids is not None:
            self.init_token_ids = [int(i) for i in self.init_token_ids]
            if not self.init_token_ids or min(self.init_token_ids) < 0:
                raise ValueError(f"init_token_ids={self.init_token_ids!r} must be a non-empty list of token ids.")

    def build_optimizer(self, model: nn.Module, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """AdamW with ``A`` and ``B`` in groups of their own at ``embedding_lr`` (official ``train.py``: two groups,
        the prompt and everything else at ``learning_rate``)."""
        from ...lightning.optim import with_learning_rate

        low_rank = {id(p) for m in dept_modules(model) for p in (m.lora_A, m.lora_B)}
        return torch.optim.AdamW(with_learning_rate(groups, low_rank, self.embedding_lr or lr), lr=lr)


def _bodies(model: nn.Module, config: DePTConfig) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The encoder body to prompt (or the ``target_modules``), and the decoders that cross-attend to it."""
    if config.target_modules is not None:
        return find_targets(model, config), []
    return find_bodies(model, "dept")


def _max_positions(body: nn.Module) -> int | None:
    """Learned absolute positions of the body (BERT/RoBERTa), less RoBERTa's ``padding_idx + 1`` offset."""
    embeddings = getattr(body, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    padding = getattr(embeddings, "padding_idx", None)
    return table.num_embeddings - (padding + 1 if isinstance(padding, int) else 0)


def _init_embeddings(body: nn.Module, config: DePTConfig) -> Tensor | None:
    """Word embeddings of ``init_token_ids`` repeated then cut to ``m`` rows (official PromptEmbeddingLoRA)."""
    if config.init_token_ids is None:
        return None
    table = body.get_input_embeddings()
    ids = config.init_token_ids
    if max(ids) >= table.num_embeddings:
        raise ValueError(
            f"dept: init_token_ids reach id {max(ids)} but the model embeds {table.num_embeddings} tokens; "
            "give the tokenizer saved with this model."
        )
    ids = (ids * math.ceil(config.num_tokens / len(ids)))[: config.num_tokens]
    with torch.no_grad():
        return table(torch.tensor(ids, device=table.weight.device)).detach().float().clone()


@register_method("dept", DePTConfig, modality="text", mergeable=False, paper="https://arxiv.org/abs/2309.05173")
def apply_dept(
    model: nn.Module, config: DePTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    encoders, decoders = _bodies(model, config)
    for name, body in encoders:
        if not hasattr(body, "get_input_embeddings"):
            raise ValueError(f"dept: {name!r} ({type(body).__name__}) has no get_input_embeddings(); target the body.")
        table = body.get_input_embeddings()
        layer = DecomposedPrompt(
            config.num_tokens,
            table.embedding_dim,
            config.rank,
            config.max_length,
            config.alpha,
            keep_prompt_outputs=bool(decoders),
            max_positions=_max_positions(body),
            init_embeddings=_init_embeddings(body, config),
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)
    for name in decoders:
        attach(model, name, adapter_name, CrossAttentionMaskPad(config.num_tokens))


def dept_modules(model: nn.Module, adapter_name: str | None = None) -> list[DecomposedPrompt]:
    """The :class:`DecomposedPrompt` modules of the active (or named) adapter."""
    name = adapter_name or getattr(model, "active_adapter", None)
    return [
        h.adapters[name]
        for _, h in hosts(model)
        if name in h.adapters and isinstance(h.adapters[name], DecomposedPrompt)
    ]
