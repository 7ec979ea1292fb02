"""A tiny base model + tokenizer (trained on a few stdlib modules) and a private SEEKDEEP_HOME."""

from __future__ import annotations

import pytest
import torch

from seekdeep.data.corpus import stdlib_root


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path_factory.getbasetemp() / "seekdeep-home"))


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a loaded 2-core machine
    # it made a forward ~40x slower (0.43 s vs 0.011 s, measured) from thread contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from seekdeep.tokenizer import train_tokenizer

    files = [str(stdlib_root() / name) for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py")]
    return train_tokenizer(files, vocab_size=400)


@pytest.fixture(scope="session")
def base(tmp_path_factory, tokenizer):
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                                         max_position_embeddings=1024))
    model.init_weights()
    path = tmp_path_factory.mktemp("posttrain-base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """40 small prompt/completion conversations (two shapes mixed)."""
    import json

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    lines = []
    for i in range(40):
        if i % 2:
            lines.append({"prompt": f"add {i} and 1", "completion": f"return {i} + 1"})
        else:
            lines.append({"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": f"double {i}"},
                                       {"role": "assistant", "content": f"return {i} * 2"}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
