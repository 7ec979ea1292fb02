"""Tokenizer: a thin layer over the ``tokenizers`` library with Hugging Face file layout.

It reads and writes ``tokenizer.json`` + ``tokenizer_config.json`` so a directory saved here
loads in ``transformers.AutoTokenizer`` and the other way round; batching, padding and chat
templates follow transformers' conventions (left padding by default, for generation).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, trainers

from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import atomic_write_text, read_json, resolve_model_dir

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
_NO_MAX_LENGTH = int(1e29)  # transformers writes int(1e30) when a tokenizer has no limit

# Turns are closed by the eos token, so generation stops there and no extra special tokens are
# needed; the role markers are plain text the model learns.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is not string %}"
    "{{ raise_exception('the default chat template needs string message content') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus its special tokens, chat template and length limit.

    ``vocab_size`` counts added tokens too: it is the number of embedding rows needed.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None, source: str | None = None):
        self._tok = tokenizer
        self._special = {"bos_token": bos_token, "eos_token": eos_token,
                         "pad_token": pad_token, "unk_token": unk_token}
        for key, token in self._special.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ConfigError(key, f"{token!r} is not in the vocabulary", source=source)
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, **special_and_template: Any) -> Tokenizer:
        """Wrap an in-memory tokenizer; keywords as ``__init__`` (bos_token, eos_token, pad_token,
        unk_token, chat_template, model_max_length)."""
        return cls(tok, **special_and_template)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **overrides: Any) -> Tokenizer:
        """Load from a Hugging Face layout directory, or a hub id ``org/name`` (cache first).

        overrides: bos_token / eos_token / pad_token / unk_token / chat_template /
        model_max_length, replacing what the files say.
        """
        unknown = set(overrides) - {*_SPECIAL_KEYS, "chat_template", "model_max_length"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "not a tokenizer setting; accepted: "
                              f"{', '.join(_SPECIAL_KEYS)}, chat_template, model_max_length")
        path = resolve_model_dir(path_or_id, _TOKENIZER_FILES, "tokenizer.json")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{tok_file} is missing: a tokenizer directory needs tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise ConfigError("tokenizer.json", f"cannot be parsed: {exc}", source=str(tok_file)) from exc
        config = read_json(path / "tokenizer_config.json", optional=True)
        settings: dict[str, Any] = {}
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            # special_tokens_map.json wins over tokenizer_config.json, as in transformers
            mapping = config if file == "tokenizer_config.json" else read_json(path / file, optional=True)
            for key in _SPECIAL_KEYS:
                if mapping.get(key) is not None:
                    settings[key] = _token_content(mapping[key], key, str(path / file))
        settings["chat_template"] = _chat_template_from(config.get("chat_template"),
                                                        str(path / "tokenizer_config.json"))
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            settings["chat_template"] = jinja_file.read_text(encoding="utf-8")
        max_length = config.get("model_max_length")
        if isinstance(max_length, int) and max_length < _NO_MAX_LENGTH:
            settings["model_max_length"] = max_length
        return cls(tok, **{**settings, **overrides}, source=str(path))

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (shared, not a copy)."""
        return self._tok

    # -- special tokens -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"] or self.eos_token

    @property
    def unk_token(self) -> str | None:
        return self._special["unk_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def all_special_ids(self) -> list[int]:
        ids = {self._tok.token_to_id(t) for t in self._special.values() if t is not None}
        ids.update(i for i, added in self._tok.get_added_tokens_decoder().items() if added.special)
        return sorted(ids)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """``ids`` is a list of ints or a 0-/1-D tensor."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ConfigError("ids", f"decode takes a 1-D tensor, got shape {tuple(ids.shape)}; "
                                  "use batch_decode for batches")
            ids = ids.reshape(-1).tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            found = self._tok.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str = "left", add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        """Encode one text or a batch into ``input_ids`` / ``attention_mask`` like transformers.

        padding: False, True / "longest" (to the longest in the batch) or "max_length".
        A single text gives flat lists, or (1, T) tensors with ``return_tensors="pt"``.
        """
        if padding not in (False, True, "longest", "max_length"):
            raise ConfigError("padding", f"expected False, True, 'longest' or 'max_length', got {padding!r}")
        if padding_side not in ("left", "right"):
            raise ConfigError("padding_side", f"expected 'left' or 'right', got {padding_side!r}")
        if return_tensors not in (None, "pt"):
            raise ConfigError("return_tensors", f"expected None or 'pt', got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError("text", f"expected a string or a non-empty list of strings, got {text!r:.100}")
        limit = max_length if max_length is not None else self.model_max_length
        if (truncation or padding == "max_length") and limit is None:
            raise ConfigError("max_length", "truncation / padding='max_length' need max_length "
                              "(the tokenizer has no model_max_length)")

        if truncation:
            # Truncate the text's tokens, then add the specials, so bos/eos survive truncation.
            room = limit - (self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0)
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
            for enc in encodings:
                enc.truncate(max(room, 0))
            encodings = [self._tok.post_process(enc, add_special_tokens=add_special_tokens)
                         for enc in encodings]
        else:
            encodings = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        rows = {"input_ids": [enc.ids for enc in encodings],
                "attention_mask": [[1] * len(enc.ids) for enc in encodings]}
        if return_offsets_mapping:
            rows["offset_mapping"] = [list(enc.offsets) for enc in encodings]

        if padding:
            target = max(map(len, rows["input_ids"]))
            if padding == "max_length":
                target = max(target, limit)
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ConfigError("pad_token", "padding needs a pad_token or an eos_token")
            fill = {"input_ids": pad_id, "attention_mask": 0, "offset_mapping": (0, 0)}
            for key, seqs in rows.items():
                for i, seq in enumerate(seqs):
                    pad = [fill[key]] * (target - len(seq))
                    seqs[i] = pad + seq if padding_side == "left" else seq + pad

        if return_tensors == "pt":
            if len({len(seq) for seq in rows["input_ids"]}) > 1:
                raise ConfigError("padding", "sequences differ in length; pass padding=True "
                                  "to return tensors")
            return {key: torch.tensor(seqs, dtype=torch.long) for key, seqs in rows.items()}
        if single:
            return {key: seqs[0] for key, seqs in rows.items()}
        return rows

    # -- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None,
                            **kwargs: Any) -> str | list[int] | torch.Tensor:
        """Render ``messages`` with the chat template (jinja2, sandboxed, like transformers).

        Returns the text (tokenize=False), its ids, or a (1, T) LongTensor with return_tensors="pt".
        Extra kwargs (tools, documents, ...) become template variables.
        """
        if self.chat_template is None:
            raise ConfigError("chat_template", "this tokenizer has no chat template; set "
                              "tokenizer.chat_template (e.g. to DEFAULT_CHAT_TEMPLATE)")
        if return_tensors not in (None, "pt"):
            raise ConfigError("return_tensors", f"expected None or 'pt', got {return_tensors!r}")
        if not isinstance(messages, list) or not messages:
            raise ConfigError("messages", f"expected a non-empty list of dicts, got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or "content" not in message:
                raise ConfigError("messages", f"message {i} must be a dict with a string 'role' and "
                                  f"a 'content', got {message!r}")
        try:
            template = _compile_template(self.chat_template)
            # as transformers: only the tokens that are set (no pad -> eos fallback here)
            variables = {key: token for key, token in self._special.items() if token is not None}
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **{**variables, **kwargs})
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError("chat_template", f"invalid jinja template: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ConfigError("messages", f"the chat template rejected them: {exc}") from exc
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # the template places bos/eos itself
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids

    # -- saving ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (loadable by transformers.AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False}
        config.update({key: token for key, token in self._special.items() if token is not None})
        config["model_max_length"] = self.model_max_length or int(1e30)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def train_tokenizer(files_or_iterator: Sequence[str | os.PathLike] | Iterable[str], vocab_size: int,
                    special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>"), min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer (round-trips any text exactly).

    files_or_iterator: a list/tuple of file paths (or one path), or any other iterable of texts.
    The first special token is eos, the second (if any) pad; chat uses DEFAULT_CHAT_TEMPLATE.
    """
    special_tokens = list(special_tokens)
    if not special_tokens or not all(isinstance(t, str) and t for t in special_tokens):
        raise ConfigError("special_tokens", f"expected a non-empty list of strings, got {special_tokens!r}")
    smallest = 256 + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ConfigError("vocab_size", f"must be an int >= {smallest} (256 bytes + "
                          f"{len(special_tokens)} special tokens), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError("min_frequency", f"must be an int >= 1, got {min_frequency!r}")

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):
        files = [os.fspath(f) for f in files_or_iterator]
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(f"training file {file!r} does not exist")
        tok.train(files, trainer)
    else:
        tok.train_from_iterator(files_or_iterator, trainer)
    return Tokenizer(tok, eos_token=special_tokens[0],
                     pad_token=special_tokens[1] if len(special_tokens) > 1 else None,
                     chat_template=DEFAULT_CHAT_TEMPLATE)


# -- helpers ------------------------------------------------------------------------------


def _token_content(value: Any, key: str, source: str) -> str:
    # transformers writes special tokens either as strings or as AddedToken dicts
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string or a dict with a 'content' string, got {value!r}",
                          source=source)
    return value


def _chat_template_from(value: Any, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ConfigError("chat_template", "expected a string or a list of {name, template} with a "
                      f"'default' entry, got {value!r:.200}", source=source)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt text
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
