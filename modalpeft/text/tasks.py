"""Lightning systems for text: sequence classification / regression on any transformers encoder or decoder, and
causal-LM fine-tuning on instruction / answer pairs (:class:`CausalLMTask`).

:class:`TextClassifier` is the *model*: a transformers model, a pooling of its hidden states and a Linear head
(``head``). :class:`TextClassificationTask` is the *system*: it adapts the classifier, trains it with
cross-entropy (MSE for regression) and logs the metrics GLUE reports, from torchmetrics:

- ``accuracy`` (SST-2, MNLI, QNLI, RTE, ...), ``f1`` (MRPC, QQP: F1 of the positive class; macro-F1 with more
  than two classes), ``mcc`` (CoLA: Matthews correlation), ``pearson`` / ``spearman`` (STS-B).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args

import torch
import torchmetrics
from torch import Tensor, nn

from ..lightning.task import AdapterTask
from .backbones import ModelKind, last_token_pool, load_backbone, mean_pool
from .instructions import IGNORE_INDEX

Pooling = Literal["mean", "pooler", "last"]
Metric = Literal["accuracy", "f1", "mcc", "pearson", "spearman"]


class TextClassifier(nn.Module):
    """``head(pool(model(input_ids, attention_mask, ...)))``.

    Args:
        model: a transformers model returning ``last_hidden_state`` (``AutoModel``); for an encoder-decoder
            (T5) only its encoder is kept.
        num_classes: head outputs (1: regression).
        pooling: ``"mean"`` over non-padding tokens (sentence-transformers; the default), ``"pooler"`` (the
            model's own ``pooler_output``: BERT's [CLS] dense + tanh), or ``"last"`` (the last non-padding token,
            for decoders; pad on the right).

    Shapes:
        - input_ids, attention_mask: ``(B, L)``; output: ``(B, num_classes)``
    """

    def __init__(self, model: nn.Module, num_classes: int, pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in get_args(Pooling):
            raise ValueError(f"pooling={pooling!r} is not valid; choose one of {list(get_args(Pooling))}.")
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if width is None:
            raise ValueError(f"{type(model).__name__} has no config.hidden_size/d_model; give a transformers model.")
        self.encoder, self.pooling, self.num_classes = model, pooling, num_classes
        # tokenizers return inputs some models do not take (token_type_ids for LLaMA or T5): those are dropped
        self._inputs = set(inspect.signature(model.forward).parameters)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The pooled sentence representation, ``(B, D)``."""
        kwargs = {k: v for k, v in kwargs.items() if k in self._inputs}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{type(self.encoder).__name__} has no pooler; use pooling='mean' or 'last'.")
            return out.pooler_output
        hidden = out.last_hidden_state
        return mean_pool(hidden, attention_mask) if self.pooling == "mean" else last_token_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.head(self.features(input_ids, attention_mask, **kwargs))


def text_classifier(
    name: str = "minilm", num_classes: int = 2, pooling: Pooling = "mean", kind: ModelKind = "encoder"
) -> TextClassifier:
    """A :class:`TextClassifier` on a transformers model by name or path (for YAML recipes).

    Args:
        name: ``"minilm"`` (offline all-MiniLM-L6-v2), a Hub name (``"roberta-base"``) or a local folder.
        num_classes: head outputs (1: regression).
        pooling: see :class:`TextClassifier`.
        kind: ``"encoder"`` (``AutoModel``) or ``"seq2seq"`` (T5: its encoder is used).
    """
    model, _ = load_backbone(name, kind)
    # from_pretrained returns eval mode; fine-tuning runs with the model's dropout, as transformers' Trainer does
    return TextClassifier(model, num_classes, pooling).train()


def _metric(name: Metric, num_classes: int) -> torchmetrics.Metric:
    if name == "accuracy":
        return torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
    if name == "f1":
        if num_classes == 2:
            return torchmetrics.F1Score(task="binary")
        return torchmetrics.F1Score(task="multiclass", num_classes=num_classes, average="macro")
    if name == "mcc":
        return torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=num_classes)
    return torchmetrics.PearsonCorrCoef() if name == "pearson" else torchmetrics.SpearmanCorrCoef()


class TextClassificationTask(AdapterTask):
    """Sentence (pair) classification or regression with an adapted :class:`TextClassifier`.

    Batches are dicts from :class:`~modalpeft.text.data.TextDataModule`: the tokenizer's tensors plus
    ``labels``. Args as :class:`~modalpeft.lightning.AdapterTask` (``adapter``, ``optimizer``, ``lr``, ...,
    passed through), plus:

    Args:
        num_classes: classes; 1 for regression (MSE loss, ``pearson``/``spearman``).
        modules_to_save: as the base; ``None``: ``["head"]``.
        metrics: the metrics to log; ``None``: ``accuracy`` (and ``f1`` for two classes), or ``pearson`` and
            ``spearman`` for regression.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        modules_to_save: list[str] | None = None,
        metrics: list[Metric] | None = None,
        **kwargs: Any,
    ) -> None:
        if getattr(backbone, "num_classes", num_classes) != num_classes and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(num_classes)
        super().__init__(backbone, modules_to_save=["head"] if modules_to_save is None else modules_to_save, **kwargs)
        self.regression = num_classes == 1
        if metrics is None:
            metrics = (
                ["pearson", "spearman"] if self.regression else ["accuracy"] + (["f1"] if num_classes == 2 else [])
            )
        bad = [m for m in metrics if m not in get_args(Metric)]
        wrong = [m for m in metrics if (m in ("pearson", "spearman")) != self.regression]
        if bad or wrong:
            raise ValueError(
                f"metrics={metrics!r}: {bad or wrong} cannot be used with num_classes={num_classes}; classification "
                "takes 'accuracy', 'f1', 'mcc', regression (num_classes=1) 'pearson', 'spearman'."
            )
        self.loss = nn.MSELoss() if self.regression else nn.CrossEntropyLoss()
        collection = torchmetrics.MetricCollection({m: _metric(m, num_classes) for m in metrics})
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = self.model(**inputs)
        return out.squeeze(-1) if self.regression else out

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        labels = batch["labels"]
        if not self.regression and (labels < 0).any():
            raise ValueError(f"{stage} batch has unlabelled rows (label -1, e.g. GLUE's test files); use predict.")
        logits = self.logits(batch)
        loss = self.loss(logits, labels)
        metrics = getattr(self, f"{stage}_metrics")
        preds = logits.detach() if self.regression else logits.detach().argmax(-1)
        metrics.update(preds, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log_dict(metrics, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch)
        return logits if self.regression else logits.softmax(-1)


def causal_lm(name: str, dtype: str | None = None) -> nn.Module:
    """A transformers causal LM (``AutoModelForCausalLM``) by name or path, in train mode (for YAML recipes).

    Args:
        name: a Hub name (``"meta-llama/Llama-2-7b-hf"``) or a local folder.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``None`` (the checkpoint's own).
    """
    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model, _ = load_backbone(name, "causal_lm", **kwargs)
    return model.train()


class CausalLMTask(AdapterTask):
    """Causal-LM fine-tuning on instruction / answer pairs, the prompt masked out of the loss, evaluated by
    generation.

    Batches come from :class:`~modalpeft.text.data.TextDataModule` with ``task="causal_lm"``
    (:class:`~modalpeft.text.instructions.InstructionCollate`). The loss is the model's own next-token
    cross-entropy over the labelled (answer) tokens. In validation and test, the answers are also generated
    greedily from the left-padded prompts and ``exact_match`` is the share whose generated tokens equal the answer's
    (its EOS included, so the answer must also stop). Args as :class:`~modalpeft.lightning.AdapterTask`, plus:

    Args:
        generate_max_new_tokens: tokens generated per prompt in evaluation; ``None``: the batch's longest answer
            (enough for ``exact_match``), ``0``: no generation (loss only).
    """

    def __init__(self, backbone: nn.Module, generate_max_new_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        if generate_max_new_tokens is not None and generate_max_new_tokens < 0:
            raise ValueError(f"generate_max_new_tokens={generate_max_new_tokens!r} must be >= 0 or None.")
        self.generate_max_new_tokens = generate_max_new_tokens
        self.val_exact_match = torchmetrics.MeanMetric()
        self.test_exact_match = torchmetrics.MeanMetric()

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log(f"{stage}/loss", out.loss, prog_bar=stage != "test", sync_dist=stage != "train")
        if stage != "train" and self.generate_max_new_tokens != 0:
            metric = getattr(self, f"{stage}_exact_match")
            metric.update(self.exact_match(batch).float())
            self.log(f"{stage}/exact_match", metric, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return out.loss

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int | None = None) -> Tensor:
        """Greedy continuations of the batch's prompts: the new tokens only, ``(N, <= max_new_tokens)``."""
        prompts = batch["prompt_input_ids"]
        if max_new_tokens is None:
            max_new_tokens = self.generate_max_new_tokens or int((batch["answer_ids"] != IGNORE_INDEX).sum(1).max())
        out = self.model.generate(
            input_ids=prompts,
            attention_mask=batch["prompt_attention_mask"],
            max_new_tokens=max(max_new_tokens, 1),
            do_sample=False,
        )
        return out[:, prompts.shape[1] :]

    def exact_match(self, batch: dict[str, Tensor]) -> Tensor:
        """``(N,)`` booleans: the generated tokens equal the answer's, position by position (its EOS included)."""
        answers = batch["answer_ids"]
        generated = self.generate(batch)
        width = max(answers.shape[1], generated.shape[1])
        generated = nn.functional.pad(generated, (0, width - generated.shape[1]), value=IGNORE_INDEX - 1)
        answers = nn.functional.pad(answers, (0, width - answers.shape[1]), value=IGNORE_INDEX)
        labelled = answers != IGNORE_INDEX
        return ((generated == answers) | ~labelled).all(1)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.generate(batch)


__all__ = ["CausalLMTask", "TextClassificationTask", "TextClassifier", "causal_lm", "text_classifier"]
