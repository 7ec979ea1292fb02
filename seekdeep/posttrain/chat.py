"""Chat data for supervised fine-tuning: JSONL conversations rendered through the tokenizer's
chat template, with labels on the assistant turns only, and length-grouped batches.

Rendering is incremental: the template is applied to every prefix of the conversation and
each turn's tokens are the difference, so the ids a model is trained on are exactly the ids
it sees at inference (``add_generation_prompt`` opens the assistant turn; the model writes the
content and the eos that closes it). The assistant header is not trained; content + eos are.

Batches are either padded, with the padding kept small by grouping examples of similar
length (a batch holds neighbours in length from a shuffled pool of ``pool_batches`` batches),
or packed (``pack=True``): conversations laid end to end in rows of ``seq_len`` tokens with a
document id per token, which the model turns into a block-diagonal causal mask and positions
restarting per conversation (``document_ids``; dense attention backends only), so no
conversation sees another and each is trained exactly as it would be alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from seekdeep.errors import ConfigError, DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """``input_ids`` of a rendered conversation and ``labels`` (the id where trained, -100 elsewhere)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def record_messages(record: Any, where: str) -> list[dict[str, str]]:
    """One JSONL record -> OpenAI-shaped messages. Accepts ``{"messages": [...]}`` or
    ``{"prompt": str, "completion": str}`` (one user turn, one assistant turn)."""
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object with 'messages' or 'prompt'/'completion', got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, "'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(where, f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r}")
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError(where, "'prompt' and 'completion' must be strings")
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise DataError(where, f"expected 'messages' or 'prompt' + 'completion', got keys {sorted(record)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "the conversation has no assistant turn, so there is nothing to train on")
    return messages


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every non-blank line; a line that is not JSON is a DataError naming it."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError(str(path), "no .jsonl files in this folder")
    for file in files:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(where, f"not valid JSON ({exc.msg})") from None


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Token ids of ``messages`` through the chat template, labels on assistant content + eos."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            opened = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False) \
                if i else _generation_prompt(tokenizer)
            _extend(tokenizer, ids, labels, rendered, opened, trained=False)
            rendered = opened
        text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        _extend(tokenizer, ids, labels, rendered, text, trained=message["role"] == "assistant")
        rendered = text
    return Example(ids, labels)


def _generation_prompt(tokenizer) -> str:
    # A conversation that opens with the assistant: the generation prompt alone is the header.
    probe = [{"role": "user", "content": ""}]
    return tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)[
        len(tokenizer.apply_chat_template(probe, tokenize=False)):]


def _extend(tokenizer, ids: list[int], labels: list[int], before: str, after: str, trained: bool) -> None:
    if not after.startswith(before):
        raise ConfigError("chat_template", "the template does not render a conversation as the concatenation of its "
                          "turns (a later turn changes earlier text), so assistant tokens cannot be told apart")
    new = tokenizer.encode(after[len(before):], add_special_tokens=False)
    trained_ids = list(new) if trained else [IGNORE_INDEX] * len(new)
    eos = tokenizer.eos_token_id
    if trained and eos in new:  # what the template adds after the closing eos is never generated
        last = len(new) - 1 - new[::-1].index(eos)
        trained_ids[last + 1:] = [IGNORE_INDEX] * (len(new) - last - 1)
    ids.extend(new)
    labels.extend(trained_ids)


def render_records(tokenizer, records, seq_len: int) -> tuple[list[Example], dict[str, int]]:
    """Render (where, messages) pairs; examples longer than ``seq_len`` tokens are dropped and counted."""
    examples, dropped = [], 0
    for where, messages in records:
        try:
            example = render_conversation(tokenizer, messages)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{where}: {str(exc).split(': ', 1)[-1]}") from None
        if len(example) > seq_len:
            dropped += 1
            continue
        examples.append(example)
    return examples, {"examples": len(examples), "dropped_too_long": dropped}


def pad_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e)] = torch.tensor(e.input_ids)
        labels[row, :len(e)] = torch.tensor(e.labels)
        mask[row, :len(e)] = 1
    return ids, mask, labels


def pack_rows(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Examples (indices into ``lengths``, in ``order``) laid end to end into rows of at most
    ``seq_len`` tokens: each goes into the first row with room for it (first fit)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(seq_len - lengths[i])
    return rows


def pack_batch(rows: list[list[Example]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Packed (input_ids, attention_mask, labels, document_ids), each (B, T): the examples of a
    row end to end, right-padded; document ids count 0, 1, ... within the row (-1 on padding).
    Each example's first label is dropped: it would be predicted from the previous example."""
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    docs = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, e in enumerate(row):
            end = start + len(e)
            ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start + 1:end] = torch.tensor(e.labels[1:], dtype=torch.long)
            mask[r, start:end] = 1
            docs[r, start:end] = d
            start = end
    return ids, mask, labels, docs


class ChatBatches:
    """Endless shuffled batches of examples, length-grouped and padded, or (``pack_len``) packed
    into rows of that many tokens; ``state_dict`` / ``load_state_dict`` resume at the same batch
    of the same epoch. A batch is (input_ids, attention_mask, labels), + document_ids when packed."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int = 0, pool_batches: int = 16,
                 pack_len: int | None = None):
        if not examples:
            raise DataError("examples", "no examples to train on (all were dropped or the data is empty)")
        self.examples, self.batch_size, self.pad_id, self.seed, self.pool = examples, batch_size, pad_id, seed, pool_batches
        self.pack_len = pack_len
        self.epoch, self.position = 0, 0
        self._plan = self._epoch_plan(0)

    def _epoch_plan(self, epoch: int) -> list[list]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        if self.pack_len is not None:  # a batch: batch_size rows, each a list of example indices
            rows = pack_rows([len(e) for e in self.examples], order, self.pack_len)
            return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        batches = []
        chunk = self.batch_size * self.pool
        for start in range(0, len(order), chunk):
            pool = sorted(order[start:start + chunk], key=lambda i: len(self.examples[i]))
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.position >= len(self._plan):
            self.epoch, self.position = self.epoch + 1, 0
            self._plan = self._epoch_plan(self.epoch)
        batch = self._plan[self.position]
        self.position += 1
        if self.pack_len is not None:
            return pack_batch([[self.examples[i] for i in row] for row in batch], self.pad_id)
        return pad_batch([self.examples[i] for i in batch], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("examples") != len(self.examples) or state.get("seed") != self.seed:
            raise DataError("data_state", f"the checkpoint's data position is for {state.get('examples')} examples / seed "
                            f"{state.get('seed')}, this run has {len(self.examples)} / {self.seed}: the data changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._plan = self._epoch_plan(self.epoch)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, max_batches: int):
    """The first ``max_batches`` batches of ``examples`` in length order (fixed, for comparable losses)."""
    ordered = sorted(examples, key=len)
    for start in range(0, min(len(ordered), batch_size * max_batches), batch_size):
        yield pad_batch(ordered[start:start + batch_size], pad_id)


@torch.no_grad()
def assistant_loss(model, batches, policy) -> float:
    """Token-weighted mean cross-entropy over the trained (assistant) tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, mask, labels in batches:
            ids, mask, labels = (t.to(model.device) for t in (ids, mask, labels))
            with policy.autocast():
                logits = model(ids, attention_mask=mask).logits
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
