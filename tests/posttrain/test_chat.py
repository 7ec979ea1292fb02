"""Chat rendering, assistant-only labels, bad records and resumable batches."""

from __future__ import annotations

import pytest
import torch

from seekdeep.errors import ConfigError, DataError
from seekdeep.posttrain.chat import IGNORE_INDEX, ChatBatches, pad_batch, record_messages, render_conversation


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "You write code."},
                {"role": "user", "content": "sum of a list?"},
                {"role": "assistant", "content": "return sum(xs)"},
                {"role": "user", "content": "and the max?"},
                {"role": "assistant", "content": "return max(xs)"}]
    ex = render_conversation(tokenizer, messages)
    # the ids are the template's rendering, token for token
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token
    trained = [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ex.input_ids, ex.labels))
    assert tokenizer.decode(trained) == f"return sum(xs){eos}return max(xs){eos}"
    # each trained span is contiguous and is what the model generates after the generation prompt
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert ex.input_ids[:len(prompt)] == prompt and all(label == IGNORE_INDEX for label in ex.labels[:len(prompt)])
    assert ex.labels[len(prompt)] != IGNORE_INDEX


def test_prompt_completion_records_and_bad_records(tokenizer):
    msgs = record_messages({"prompt": "p", "completion": "c"}, "x:1")
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    with pytest.raises(DataError, match="x:2.*no assistant turn"):
        record_messages({"messages": [{"role": "user", "content": "hi"}]}, "x:2")
    with pytest.raises(DataError, match="x:3.*message 0"):
        record_messages({"messages": [{"role": "robot", "content": "hi"}]}, "x:3")
    with pytest.raises(DataError, match="x:4"):
        record_messages({"text": "plain"}, "x:4")


def test_a_template_that_cannot_render_is_a_named_error(tokenizer):
    import copy

    broken = copy.copy(tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor"  # syntax error
    with pytest.raises(ConfigError, match="chat_template"):
        render_conversation(broken, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    reorders = copy.copy(tokenizer)  # renders turns in reverse: earlier text changes as turns are added
    reorders.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(ConfigError, match="concatenation"):
        render_conversation(reorders, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_padding_masks_and_batches_resume(tokenizer):
    from seekdeep.posttrain.chat import Example

    examples = [Example(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in range(2, 30)]
    ids, mask, labels = pad_batch(examples[:3], pad_id=0)
    assert ids.shape == (3, 4) and mask.sum(1).tolist() == [2, 3, 4] and (labels[mask == 0] == IGNORE_INDEX).all()
    a = ChatBatches(examples, 4, 0, seed=3)
    first = [a.next_batch()[0] for _ in range(9)]  # crosses an epoch (7 batches per epoch)
    b = ChatBatches(examples, 4, 0, seed=3)
    for _ in range(5):
        b.next_batch()
    c = ChatBatches(examples, 4, 0, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, c.next_batch()[0]) for x in first[5:])
    # length grouping: a batch spans fewer lengths than a random one would
    widths = [int(m.sum(1).max() - m.sum(1).min()) for _, m, _ in (a.next_batch() for _ in range(7))]
    assert max(widths) <= 8
    with pytest.raises(DataError, match="data changed"):
        ChatBatches(examples[:-1], 4, 0, seed=3).load_state_dict(b.state_dict())


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_rows_train_each_conversation_as_alone(tokenizer, base, chat_jsonl, backend):
    """Packed rows (block-diagonal causal mask, positions restarting per conversation) give
    every conversation the logits and loss it gets alone: no cross-example attention."""
    import torch.nn.functional as F

    from seekdeep.auto import AutoModel
    from seekdeep.posttrain.chat import pack_batch, pack_rows, read_jsonl, render_records

    model = AutoModel.from_pretrained(base, attention_backend=backend).eval()
    records = [(where, record_messages(r, where)) for where, r in read_jsonl(chat_jsonl)][:7]
    examples, _ = render_records(tokenizer, records, 256)
    rows = pack_rows([len(e) for e in examples], list(range(len(examples))), seq_len=3 * max(len(e) for e in examples))
    assert len(rows) < len(examples)  # some rows really hold several conversations
    ids, mask, labels, docs = pack_batch([[examples[i] for i in row] for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, document_ids=docs)
        loss = model(ids, attention_mask=mask, labels=labels, document_ids=docs).loss
        total, count = 0.0, 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                e = examples[i]
                alone = model(torch.tensor([e.input_ids])).logits[0]  # (T, V)
                torch.testing.assert_close(packed.logits[r, start:start + len(e)], alone, atol=1e-5, rtol=1e-4)
                target = torch.tensor(e.labels[1:])
                total += float(F.cross_entropy(alone[:-1], target, ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((target != IGNORE_INDEX).sum())
                start += len(e)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    # without the document ids the later conversations of a row see the earlier ones
    with torch.no_grad():
        leaky = model(ids, attention_mask=mask).logits
    assert not torch.allclose(leaky[mask.bool()], packed.logits[mask.bool()], atol=1e-3)


def test_packing_refuses_sparse_backends_and_resumes(tokenizer, base):
    from seekdeep.auto import AutoModel
    from seekdeep.posttrain.chat import Example

    sparse = AutoModel.from_pretrained(base, attention_backend="dsa", attention_options={"topk": 4})
    ids = torch.ones((1, 6), dtype=torch.long)
    with pytest.raises(ConfigError, match="attention_backend"):
        sparse(ids, document_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    examples = [Example(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in range(2, 30)]
    a = ChatBatches(examples, 2, 0, seed=1, pack_len=40)
    batch = a.next_batch()
    assert len(batch) == 4 and batch[0].shape[1] <= 40 and int(batch[3].max()) >= 1
    first = [a.next_batch()[0] for _ in range(6)]
    b = ChatBatches(examples, 2, 0, seed=1, pack_len=40)
    for _ in range(3):
        b.next_batch()
    c = ChatBatches(examples, 2, 0, seed=1, pack_len=40)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, c.next_batch()[0]) for x in first[2:])
