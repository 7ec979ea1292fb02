"""seekdeep.tokenizer: training, round trips, batching, chat templates, file layout and errors,
with transformers as the reference for what a saved directory must load as."""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import processors

from seekdeep.errors import CheckpointError, ConfigError, ModelNotFoundError
from seekdeep.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = [STDLIB / name for name in ("textwrap.py", "string.py", "bisect.py", "colorsys.py")]
CODE = (STDLIB / "keyword.py").read_text(encoding="utf-8")  # not in the training set

SAMPLES = [
    CODE,
    "def f(x):\n\treturn x  # trailing   \r\n\n\n    indented\t\ttabs",
    "  leading spaces and a final newline\n",
    "héllo wörld — ünïcode ∑ ∫ 中文字符 日本語 한국어 🚀🐍👩‍💻 e\u0301 \u200b zero-width",
    "null \x00 byte, bell \x07, and \U0010ffff at the top of unicode",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You write <b>Python</b> & 'ünïcode'."},
    {"role": "user", "content": "Reverse a list <fast> & 'safe'?"},
    {"role": "assistant", "content": "xs[::-1]"},
]
# Exercises what must render the same as in transformers: whitespace control, tojson without
# HTML escaping, loop controls, namespace, the special-token variables.
RICH_TEMPLATE = """{{ bos_token or '' }}
{% set ns = namespace(seen=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{{ '[sys] ' + message['content'] | tojson }}
{% continue %}{% endif %}
    {% set ns.seen = ns.seen + 1 %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant ({{ ns.seen }} turns)
{% endif %}"""


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TRAIN_FILES, vocab_size=500)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tok(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(saved)


def _bos_tokenizer(tok: Tokenizer, **kwargs) -> Tokenizer:
    """A copy of ``tok`` whose post-processor prepends <|bos|>, as Llama-style tokenizers do."""
    backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<|bos|>"])
    bos_id = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                           special_tokens=[("<|bos|>", bos_id)])
    return Tokenizer.from_tokenizers(backend, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                     pad_token="<|pad|>", **kwargs)


# -- training and round trips ------------------------------------------------------------


def test_training_learns_merges_and_places_special_tokens(tok):
    assert tok.vocab_size == 500
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.bos_token_id is None
    assert tok.all_special_ids == [0, 1]
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    # Special tokens stay atomic inside text; merges compress unseen code (no merges: 1 id per byte).
    assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [0] + tok.encode("b")
    assert len(tok.encode(CODE)) < 0.75 * len(CODE.encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode_exactly(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    pools = [" \t\n\r", "abcXYZ_09(){}:#'\"", "éßøñ€", "中日한🚀🐍", "\u0301\u200d\ufeff"]
    for _ in range(200):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40)))
        assert tok.decode(tok.encode(text)) == text


def test_train_from_iterator_of_strings():
    texts = (path.read_text(encoding="utf-8") for path in TRAIN_FILES[:2])
    tok = train_tokenizer(texts, vocab_size=300, special_tokens=["<eos>"])
    assert tok.vocab_size == 300
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 0)  # pad falls back to eos
    assert tok.decode(tok.encode(SAMPLES[3])) == SAMPLES[3]


def test_decode_tensor_batch_and_skip_special(tok):
    ids = tok.encode("x = 1") + [tok.eos_token_id]
    assert tok.decode(torch.tensor(ids)) == "x = 1<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "x = 1"
    batch = torch.tensor([ids, list(reversed(ids))])
    assert tok.batch_decode(batch, skip_special_tokens=True)[0] == "x = 1"
    with pytest.raises(ConfigError, match="ids"):
        tok.decode(batch)


def test_token_id_conversions(tok):
    ids = tok.encode("return self")
    tokens = tok.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_tokens_to_ids("<|pad|>") == 1
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("no-such-token-here") is None  # no unk in byte-level BPE


# -- batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_padding_and_attention_mask(tok, padding_side):
    texts = ["a", "for item in items:\n    yield item", "x = 1"]
    out = tok(texts, padding=True, padding_side=padding_side, return_tensors="pt")
    width = max(len(tok.encode(t)) for t in texts)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (3, width)
    for row, mask, text in zip(out["input_ids"].tolist(), out["attention_mask"].tolist(), texts):
        ids = tok.encode(text)
        pad = width - len(ids)
        if padding_side == "left":
            assert row == [tok.pad_token_id] * pad + ids and mask == [0] * pad + [1] * len(ids)
        else:
            assert row == ids + [tok.pad_token_id] * pad and mask == [1] * len(ids) + [0] * pad


def test_default_padding_is_left_and_single_text_is_flat(tok):
    out = tok(["a", "a b c d"], padding="longest")
    assert out["attention_mask"][0][0] == 0 and out["attention_mask"][0][-1] == 1
    single = tok("a b c")
    assert single == {"input_ids": tok.encode("a b c"), "attention_mask": [1] * len(tok.encode("a b c"))}
    assert tok("a b c", return_tensors="pt")["input_ids"].shape == (1, len(tok.encode("a b c")))


def test_truncation_and_max_length_padding(tok):
    text = "def function_with_a_long_name(argument): pass"
    out = tok([text, "a"], truncation=True, max_length=4, padding="max_length", padding_side="right")
    assert out["input_ids"][0] == tok.encode(text)[:4]
    assert out["input_ids"][1] == tok.encode("a") + [tok.pad_token_id] * 3
    assert out["attention_mask"][1] == [1, 0, 0, 0]


def test_truncation_keeps_post_processor_bos(tok):
    bos_tok = _bos_tokenizer(tok)
    text = "import os, sys, json"
    assert bos_tok.encode(text)[0] == bos_tok.bos_token_id
    assert bos_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    out = bos_tok(text, truncation=True, max_length=3)
    assert out["input_ids"] == [bos_tok.bos_token_id] + tok.encode(text)[:2]


def test_offsets_mapping_points_into_text(tok):
    texts = ["naive code()\n\tpass", "x"]
    out = tok(texts, padding=True, padding_side="right", return_offsets_mapping=True)
    offsets = out["offset_mapping"]
    assert "".join(texts[0][s:e] for s, e in offsets[0]) == texts[0]
    # a character split over several byte-level tokens: each token points at the whole character
    assert len(tok.encode("ï")) == 2
    assert tok("ï", return_offsets_mapping=True)["offset_mapping"] == [(0, 1)] * len(tok.encode("ï"))
    assert offsets[1][1:] == [(0, 0)] * (len(offsets[1]) - 1)


def test_ragged_tensors_need_padding(tok):
    with pytest.raises(ConfigError, match="padding"):
        tok(["a", "a b c d e"], return_tensors="pt")


# -- chat templates ----------------------------------------------------------------------


def test_default_chat_template_renders_turns_closed_by_eos(tok):
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == ("<|system|>\nYou write <b>Python</b> & 'ünïcode'.<|endoftext|>\n"
                    "<|user|>\nReverse a list <fast> & 'safe'?<|endoftext|>\n"
                    "<|assistant|>\nxs[::-1]<|endoftext|>\n")
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("'safe'?<|endoftext|>\n<|assistant|>\n")
    ids = tok.apply_chat_template(MESSAGES)
    assert ids.count(tok.eos_token_id) == 3 and tok.decode(ids) == text
    assert tok.apply_chat_template(MESSAGES, return_tensors="pt").tolist() == [ids]


def test_rich_template_variables_and_kwargs(tok):
    bos_tok = _bos_tokenizer(tok, chat_template=RICH_TEMPLATE + "{{ extra }}")
    text = bos_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, extra="!")
    assert text.startswith('<|bos|>\n[sys] "You write <b>Python</b> & \'ünïcode\'."\n<|im_start|>user\nReverse')
    assert text.endswith("<|im_start|>assistant (2 turns)\n!")


# -- saving and loading ------------------------------------------------------------------


def test_save_load_round_trip(tok, saved):
    assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = Tokenizer.from_pretrained(saved)
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == (0, 1, 500)
    assert loaded.chat_template == tok.chat_template
    assert loaded.model_max_length is None


def test_load_hf_style_files(tok, saved, tmp_path):
    """Special tokens as AddedToken dicts, special_tokens_map.json, named template lists."""
    (tmp_path / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|endoftext|>", "special": True, "lstrip": False},
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|pad|>"}}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (0, 1)
    assert loaded.chat_template == "D" and loaded.model_max_length == 2048
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    loaded = Tokenizer.from_pretrained(tmp_path, pad_token="<|endoftext|>")
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == "JYou write <b>Python</b> & 'ünïcode'."
    assert loaded.pad_token_id == 0


def test_hub_id_tries_cache_then_download(saved, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((repo_id, local_files_only))
        assert "tokenizer.json" in allow_patterns and "tokenizer_config.json" in allow_patterns
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert Tokenizer.from_pretrained("some-org/some-model").vocab_size == 500
    assert calls == [("some-org/some-model", True), ("some-org/some-model", False)]


def test_unreachable_hub_id_raises_model_not_found(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="nobody/nothing"):
        Tokenizer.from_pretrained("nobody/nothing")


# -- parity with transformers ------------------------------------------------------------


def test_transformers_loads_saved_dir_with_same_ids(tok, hf_tok):
    for text in SAMPLES:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    batch = SAMPLES[1:4]
    ours = tok(batch, padding=True, padding_side="right")
    theirs = hf_tok(batch, padding=True, padding_side="right")
    assert theirs["input_ids"] == ours["input_ids"]
    assert theirs["attention_mask"] == ours["attention_mask"]


@pytest.mark.parametrize("template", [None, RICH_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, tmp_path, template, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    ours = _bos_tokenizer(tok, chat_template=template or DEFAULT_CHAT_TEMPLATE)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(MESSAGES, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == \
        theirs.encode(text, add_special_tokens=False)
    # and the bos-prepending post-processor survives the save, with the same truncation
    assert theirs("import os", truncation=True, max_length=2)["input_ids"] == \
        ours("import os", truncation=True, max_length=2)["input_ids"]


def test_loads_directory_written_by_transformers(tok, saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(saved)
    hf_tok.chat_template = RICH_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode(CODE) == tok.encode(CODE)
    assert (loaded.eos_token, loaded.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert loaded.chat_template == RICH_TEMPLATE


# -- errors ------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    # same error as AutoModel for a path that is neither a directory nor a hub id
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("file, content", [
    ("tokenizer_config.json", "{not json"),
    ("tokenizer_config.json", "[1, 2]"),
    ("special_tokens_map.json", "{"),
    ("tokenizer.json", '{"model": 3}'),
])
def test_malformed_files_name_the_file(saved, tmp_path, file, content):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    (tmp_path / file).write_text(content)
    with pytest.raises(ConfigError, match=file.replace(".", r"\.")) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert info.value.field == file


@pytest.mark.parametrize("key, value", [("eos_token", "<|not-in-vocab|>"), ("pad_token", 7),
                                        ("chat_template", [{"name": "tool_use", "template": "T"}])])
def test_bad_config_values_name_the_key(saved, tmp_path, key, value):
    (tmp_path / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=key) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert info.value.field == key


def test_unknown_override(saved):
    with pytest.raises(ConfigError, match="accepted"):
        Tokenizer.from_pretrained(saved, padding_sid="left")


@pytest.mark.parametrize("vocab_size", [100, 257, "500", 500.0, True])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ConfigError, match="vocab_size") as info:
        train_tokenizer(TRAIN_FILES, vocab_size=vocab_size)
    assert info.value.field == "vocab_size" and ">= 258" in str(info.value)


def test_missing_training_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CheckpointError, match="nope.txt"):
        train_tokenizer([TRAIN_FILES[0], missing], vocab_size=400)


@pytest.mark.parametrize("kwargs, field", [
    ({"padding_side": "center"}, "padding_side"),
    ({"return_tensors": "np"}, "return_tensors"),
    ({"padding": "longestest"}, "padding"),
    ({"truncation": True}, "max_length"),
    ({"text": []}, "text"),
    ({"text": ["a", 3]}, "text"),
])
def test_bad_call_arguments(tok, kwargs, field):
    with pytest.raises(ConfigError) as info:
        tok(**{"text": ["a", "b c"], **kwargs})
    assert info.value.field == field


def test_bad_padding_side_lists_accepted_values(tok):
    with pytest.raises(ConfigError, match="'left' or 'right'.*'center'"):
        tok("a", padding_side="center")


def test_no_chat_template(tok):
    bare = Tokenizer.from_tokenizers(tok.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(ConfigError, match="chat_template") as info:
        bare.apply_chat_template(MESSAGES)
    assert info.value.field == "chat_template"


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    ["hello"],
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": 3, "content": "x"}],
    [{"role": "user", "content": ["a list"]}],  # rejected by the template's raise_exception
])
def test_malformed_messages(tok, messages):
    with pytest.raises(ConfigError) as info:
        tok.apply_chat_template(messages)
    assert info.value.field == "messages"
