"""Label-token classification: a causal LM trained on `<IMG> … </IMG> <CLS> <CLS_k> <EOS>` sequences
classifies by the token it predicts after `<CLS>`.

The prediction is the argmax of the next-token distribution at the label position restricted to the
label tokens `<CLS_0>` … `<CLS_{n-1}>`: the model's relative preference among the classes, whatever
probability it leaves on other tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from minillm.data.formats import DataError, LabelledSequence
from minillm.data.labelled import LabelledSequenceDataset, WordLevelTokenizer
from minillm.evaluation.results import EvalResult, markdown_table
from minillm.evaluation.scoring import next_token_logprobs


@dataclass
class ClassificationResult(EvalResult):
    task: ClassVar[str] = "classification"
    accuracy: float
    n: int
    num_classes: int
    confusion: list[list[int]]  # confusion[true][predicted]
    per_class: list[dict[str, Any]]  # label, support, predicted, correct, recall, precision
    predictions: list[int] = field(repr=False)
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "num_classes": self.num_classes}

    def details(self) -> str:
        per_class = markdown_table(["class", "support", "predicted", "correct", "recall", "precision"],
                                   [[c["label"], c["support"], c["predicted"], c["correct"], c["recall"],
                                     c["precision"]] for c in self.per_class])
        confusion = markdown_table(["true \\ predicted", *map(str, range(self.num_classes))],
                                   [[str(k), *row] for k, row in enumerate(self.confusion)])
        return per_class + "\n\n" + confusion


def count_label_tokens(tokenizer: WordLevelTokenizer, prefix: str = "<CLS_") -> int:
    """How many label tokens `<CLS_0>`, `<CLS_1>`, … the vocabulary has, counting up from 0."""
    n = 0
    while f"{prefix}{n}>" in tokenizer.vocab:
        n += 1
    return n


def evaluate_classification(model: nn.Module, tokenizer: WordLevelTokenizer,
                            data: Sequence[LabelledSequence] | str | Path, num_classes: int | None = None,
                            batch_size: int = 64) -> ClassificationResult:
    """Accuracy, confusion matrix (rows: true label, columns: predicted) and per-class counts of
    label-token classification on labelled sequences (a list, or a JSONL file/directory of
    `{"tokens", "label"}` records). `num_classes` defaults to the number of `<CLS_k>` tokens in the
    vocabulary. Sequences longer than the model's context keep their tail, as in training."""
    num_classes = count_label_tokens(tokenizer) if num_classes is None else num_classes
    if num_classes < 2:
        raise DataError(f"need at least 2 label tokens <CLS_0>, <CLS_1>, …; the vocabulary has {num_classes}")
    label_ids = tokenizer.label_token_ids(num_classes)
    dataset = LabelledSequenceDataset(data, tokenizer, max_length=model.config.max_position_embeddings,
                                      loss_on="label")
    source = str(data) if isinstance(data, (str, Path)) else f"{len(dataset)} sequences"
    labels = [int(item["label"]) for item in dataset.items]
    too_large = [label for label in labels if label >= num_classes]
    if too_large:
        raise DataError(f"{source}: label {too_large[0]} is out of range for {num_classes} classes")
    # The label token sits at the last labelled position; the model predicts it from the tokens before.
    contexts = [item["input_ids"][:int((item["labels"] != -100).nonzero()[-1])].tolist() for item in dataset.items]
    scores = next_token_logprobs(model, contexts, [label_ids] * len(contexts), batch_size)
    predictions = [int(s.argmax()) for s in scores]

    confusion = [[0] * num_classes for _ in range(num_classes)]
    for true, predicted in zip(labels, predictions):
        confusion[true][predicted] += 1
    per_class = []
    for k in range(num_classes):
        support, predicted = sum(confusion[k]), sum(row[k] for row in confusion)
        correct = confusion[k][k]
        per_class.append({"label": k, "support": support, "predicted": predicted, "correct": correct,
                          "recall": correct / support if support else 0.0,
                          "precision": correct / predicted if predicted else 0.0})
    n = len(labels)
    accuracy = sum(confusion[k][k] for k in range(num_classes)) / n
    return ClassificationResult(accuracy=accuracy, n=n, num_classes=num_classes, confusion=confusion,
                                per_class=per_class, predictions=predictions, source=source)
