"""Labelled JSONL for `seekdeep finetune --task classification`: reading, label mapping, the
held-out split, left-padded batches, accuracy, and errors naming the line."""

from __future__ import annotations

import json

import pytest
import torch

from seekdeep.data.classification import (ClassificationBatches, LabelledTexts, evaluate_classifier,
                                          read_labelled_jsonl, split_heldout)
from seekdeep.errors import ConfigError, DataError
from seekdeep.tokenizer import train_tokenizer


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_split_batch(tmp_path):
    rows = [{"text": f"item {i} is {'good' if i % 3 else 'bad'}", "label": "pos" if i % 3 else "neg"} for i in range(30)]
    data = read_labelled_jsonl(_write(tmp_path / "d.jsonl", rows))
    assert data.id2label == {0: "neg", 1: "pos"} and data.labels[:3] == [0, 1, 1]
    train, held = split_heldout(data, 0.2, seed=1)
    assert len(held) == 6 and sorted(train.texts + held.texts) == sorted(data.texts)
    assert split_heldout(data, 0.2, seed=1)[1].texts == held.texts  # deterministic
    tok = train_tokenizer(iter(data.texts * 5), vocab_size=300)
    batches = ClassificationBatches(train, tok, max_length=2, batch_size=5, seed=0)
    assert batches.truncated == len(train)  # every text is longer than 2 tokens: its end is kept
    b = batches.next_batch()
    assert b["input_ids"].shape == (5, 2) and b["labels"].dtype == torch.long
    state = batches.state_dict()
    nxt = batches.next_batch()
    batches.load_state_dict(state)
    assert torch.equal(batches.next_batch()["input_ids"], nxt["input_ids"])  # resumes mid-epoch


def test_integer_labels_and_accuracy(tmp_path):
    data = read_labelled_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a b", "label": 1}, {"text": "c", "label": 0}]))
    assert data.id2label == {0: "0", 1: "1"}

    class Constant(torch.nn.Module):  # predicts class 1 for every row
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, labels):
            logits = torch.tensor([[0.0, 1.0]]).expand(len(labels), 2) + self.w
            return type("Out", (), {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)})

    tok = train_tokenizer(iter(["a b c"] * 10), vocab_size=270)
    result = evaluate_classifier(Constant(), ClassificationBatches(data, tok, 16, 4, shuffle=False))
    assert result["accuracy"] == 0.5 and result["examples"] == 2


def test_bad_data(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:2: not JSON"):
        read_labelled_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, "{oops"]))
    with pytest.raises(DataError, match=r":1: field 'label'"):
        read_labelled_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b", "label": 1}]))
    with pytest.raises(DataError, match="only one label"):
        read_labelled_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]))
    with pytest.raises(DataError, match="missing"):
        read_labelled_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}]))
    with pytest.raises(DataError, match="jsonl"):
        read_labelled_jsonl(_write(tmp_path / "d.txt", ["x"]))
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_heldout(LabelledTexts(["a", "b"], [0, 1], {0: "a", 1: "b"}), 1.5)
