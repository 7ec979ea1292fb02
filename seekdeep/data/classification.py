"""Labelled text for sequence classification (``seekdeep finetune --task classification``).

A JSONL file with one object per line holding a text field and a label field (names
configurable; labels are strings or integers). Examples are split once into train / held-out
by a seeded shuffle, batches are left-padded (the classifier reads each row's last real
token), and :func:`evaluate_classifier` gives the held-out loss and accuracy."""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from seekdeep.errors import ConfigError, DataError


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    id2label: dict[int, str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "LabelledTexts":
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.id2label)


def read_labelled_jsonl(path, text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """Read ``path``; string labels become classes in sorted order (so the class of a label does
    not depend on which line comes first); integer labels are their own class (every class from
    0 to the largest must occur)."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise DataError(path, "classification data must be a .jsonl file with one {text, label} object per line")
    texts, raw = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not JSON ({exc.msg})", line=number) from None
            if not isinstance(record, dict):
                raise DataError(path, f"expected an object with {text_field!r} and {label_field!r}", line=number)
            text, label = record.get(text_field), record.get(label_field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(path, f"field {text_field!r} must be a non-empty string, got {text!r:.60}", line=number)
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise DataError(path, f"field {label_field!r} must be a string or an integer, got {label!r:.60}",
                                line=number)
            texts.append(text)
            raw.append(label)
    if len(texts) < 2:
        raise DataError(path, f"needs at least 2 labelled examples, found {len(texts)}")
    if all(isinstance(x, int) for x in raw):
        classes = max(raw) + 1
        missing = sorted(set(range(classes)) - set(raw))
        if min(raw) < 0 or missing:
            raise DataError(path, f"integer labels must cover 0..{classes - 1}; missing {missing[:5]}, min {min(raw)}")
        id2label = {i: str(i) for i in range(classes)}
        labels = list(raw)
    else:
        names = sorted({str(x) for x in raw})
        id2label = dict(enumerate(names))
        index = {name: i for i, name in id2label.items()}
        labels = [index[str(x)] for x in raw]
    if len(id2label) < 2:
        raise DataError(path, f"only one label ({id2label[0]!r}) occurs; a classifier needs at least two")
    return LabelledTexts(texts, labels, id2label)


def split_heldout(data: LabelledTexts, fraction: float = 0.1, seed: int = 0) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, held-out): a seeded shuffle, the last ``fraction`` (at least one example) held out."""
    if not 0 < fraction < 1:
        raise ConfigError("heldout_fraction", f"must lie in (0, 1), got {fraction!r}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(order) * fraction))
    return data.subset(order[n_held:]), data.subset(order[:n_held])


class LabelledBatch(dict):
    """``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (B,): ``model(**batch)``."""

    def to(self, device) -> "LabelledBatch":
        return LabelledBatch({k: v.to(device) for k, v in self.items()})


class ClassificationBatches:
    """Shuffled left-padded batches, epoch after epoch; texts longer than ``max_length`` tokens
    keep their last ``max_length`` tokens (the end is what the classifier reads) and are counted
    in ``truncated``. ``state_dict`` / ``load_state_dict`` resume mid-epoch."""

    def __init__(self, data: LabelledTexts, tokenizer, max_length: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.ids = []
        self.truncated = 0
        for text in data.texts:
            ids = tokenizer.encode(text)
            if len(ids) > max_length:
                ids = ids[-max_length:]
                self.truncated += 1
            self.ids.append(ids)
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.ids)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def collate(self, indices: list[int]) -> LabelledBatch:
        rows = [self.ids[i] for i in indices]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        labels = torch.tensor([self.data.labels[i] for i in indices], dtype=torch.long)
        return LabelledBatch(input_ids=ids, attention_mask=mask, labels=labels)

    def next_batch(self) -> LabelledBatch:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._make_order()
        indices = self._order[self.position:self.position + self.batch_size]
        self.position += len(indices)
        return self.collate(indices)

    def eval_batches(self, max_batches: int | None = None):
        """Every example once, in order (``max_batches`` caps the count)."""
        for b, start in enumerate(range(0, len(self.ids), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.collate(list(range(start, min(start + self.batch_size, len(self.ids)))))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = self._make_order()


@torch.no_grad()
def evaluate_classifier(model, batches: ClassificationBatches, policy=None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every held-out example (eval mode, mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in batches.eval_batches():
            batch = batch.to(device)
            with policy.autocast() if policy is not None else contextlib.nullcontext():
                out = model(**batch)
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += n
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "examples": count}


def load_classification_data(path, tokenizer, max_length: int, batch_size: int, seed: int = 0,
                             text_field: str = "text", label_field: str = "label", heldout_fraction: float = 0.1):
    """(train batches, held-out batches, info) for ``seekdeep finetune --task classification``."""
    data = read_labelled_jsonl(path, text_field, label_field)
    train, held = split_heldout(data, heldout_fraction, seed)
    train_batches = ClassificationBatches(train, tokenizer, max_length, batch_size, seed)
    held_batches = ClassificationBatches(held, tokenizer, max_length, batch_size, seed, shuffle=False)
    info = {"data": str(path), "task": "classification", "labels": data.id2label, "train_examples": len(train),
            "heldout_examples": len(held), "heldout_rule": f"seeded shuffle, last {heldout_fraction:.0%}",
            "truncated_examples": train_batches.truncated + held_batches.truncated}
    return train_batches, held_batches, info


class HeldoutAccuracy:
    """Drop-in for the recipes' ``evaluate(model, batches, max_batches, policy) -> loss``: the
    held-out cross-entropy over every held-out example (``max_batches`` is not used: the split
    is small and accuracy should count all of it), each call's accuracy kept in ``accuracies``."""

    def __init__(self):
        self.accuracies: list[float] = []

    def __call__(self, model, batches: ClassificationBatches, max_batches=None, policy=None) -> float:
        result = evaluate_classifier(model, batches, policy)
        self.accuracies.append(result["accuracy"])
        return result["loss"]
