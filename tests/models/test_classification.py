"""Sequence classification against transformers' LlamaForSequenceClassification (both ways,
padded rows included), a causal LM checkpoint turned into a classifier, and bad input."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seekdeep  # noqa: E402
from seekdeep.errors import ConfigError  # noqa: E402
from seekdeep.models.classification import ClassificationHeadConfig, ForSequenceClassification  # noqa: E402

PAD = 0
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _hf_classifier(**extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                                      **extra)
    model = transformers.LlamaForSequenceClassification(config).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # non-trivial norms so a missed weight shows up; a head with a clear signal
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.score.weight.normal_(0, 0.5)
    return model


def _padded_batch():
    """Three rows of 5, 9 and 12 real tokens, right-padded with the pad id (never inside a row)."""
    torch.manual_seed(1)
    lengths = [5, 9, 12]
    ids = torch.full((3, 12), PAD)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 96, (n,))
        mask[row, :n] = 1
    return ids, mask, lengths


def test_hf_classifier_loads_with_same_logits_on_padded_rows(tmp_path):
    hf = _hf_classifier(attention_bias=True)
    hf.save_pretrained(tmp_path)
    ours = seekdeep.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(ours, ForSequenceClassification)
    assert ours.num_labels == 3 and ours.id2label == LABELS
    ids, mask, lengths = _padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
        got_no_mask = ours(input_ids=ids).logits  # transformers' rule: rightmost non-pad token
        # each padded row alone, unpadded, scores the same
        alone = torch.cat([ours(input_ids=ids[r:r + 1, :n]).logits for r, n in enumerate(lengths)])
    assert got.shape == (3, 3)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got_no_mask - ref).abs().max().item() <= 1e-4
    assert (alone - ref).abs().max().item() <= 1e-4
    assert ref.std().item() > 0.05  # the rows differ: a wrong pooled position would show


def test_left_padding_matches_transformers_given_positions(tmp_path):
    hf = _hf_classifier()
    hf.save_pretrained(tmp_path)
    ours = seekdeep.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ids, mask, lengths = _padded_batch()
    left_ids, left_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for row, n in enumerate(lengths):
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    positions = (left_mask.cumsum(-1) - 1).clamp(min=0)  # ours derives these from the mask
    with torch.no_grad():
        ref = hf(input_ids=left_ids, attention_mask=left_mask, position_ids=positions).logits
        got = ours(input_ids=left_ids, attention_mask=left_mask).logits
        right = ours(input_ids=ids, attention_mask=mask).logits
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - right).abs().max().item() <= 1e-4


def test_seekdeep_classifier_loads_in_transformers(tmp_path):
    config = seekdeep.AutoConfig.for_model("llama", **COMMON)
    torch.manual_seed(2)
    ours = seekdeep.AutoModelForSequenceClassification.from_config(config, num_labels=3, id2label=LABELS)
    with torch.no_grad():
        ours.score.weight.normal_(0, 0.5)
    ours.eval()
    ours.save_pretrained(tmp_path)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back).__name__ == "LlamaForSequenceClassification"
    assert back.config.id2label == LABELS
    ids, mask, _ = _padded_batch()
    with torch.no_grad():
        diff = (back(input_ids=ids, attention_mask=mask).logits - ours(input_ids=ids, attention_mask=mask).logits)
    assert diff.abs().max().item() <= 1e-4
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ref_loss = back(input_ids=ids, attention_mask=mask, labels=labels).loss
        our_loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(ref_loss.item() - our_loss.item()) <= 1e-4


def test_causal_checkpoint_becomes_classifier_sharing_trunk(tmp_path):
    config = seekdeep.AutoConfig.for_model("llama", **COMMON)
    lm = seekdeep.AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(tmp_path)
    clf = seekdeep.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert clf.num_labels == 4 and clf.score.weight.shape == (4, 64)
    assert torch.equal(clf.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert "lm_head.weight" not in clf.state_dict()
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():  # the pooled hidden state is the LM's last hidden state at the last token
        hidden = lm(ids).hidden_states[:, -1]
        assert torch.allclose(clf(input_ids=ids).logits, hidden @ clf.score.weight.T, atol=1e-5)


def test_bad_input():
    with pytest.raises(ConfigError, match="num_labels"):
        ClassificationHeadConfig(num_labels=0)
    with pytest.raises(ConfigError, match="id2label"):
        ClassificationHeadConfig(num_labels=2, id2label={0: "a", 2: "b"})
    with pytest.raises(ConfigError, match="problem_type"):
        ClassificationHeadConfig(problem_type="ranking")
    config = seekdeep.AutoConfig.for_model("llama", **{**COMMON, "pad_token_id": None})
    model = seekdeep.AutoModelForSequenceClassification.from_config(config, num_labels=2)
    with pytest.raises(ConfigError, match="pad_token_id"):
        model(input_ids=torch.randint(1, 96, (2, 5)))
    with pytest.raises(ConfigError, match="labels"):
        model(input_ids=torch.randint(1, 96, (1, 5)), labels=torch.tensor([5]))
    with pytest.raises(ConfigError, match="cannot generate"):
        model.generate(torch.randint(1, 96, (1, 5)))
