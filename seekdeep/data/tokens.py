"""Token caches for training: a cached tokenizer, documents encoded once into a flat binary
token file (nanoGPT style), and seeded, resumable windows read through ``np.memmap`` so memory
stays flat whatever the corpus size.

A token file ``train.bin`` holds the ids of every document followed by an EOS, as uint16 (or
uint32 for vocabularies over 65536); ``train.bin.json`` beside it records dtype, counts and
fingerprints of the tokenizer and of the documents, so a matching file is reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seekdeep.data.corpus import (CorpusSplit, DocumentStats, Source, default_corpus, iter_documents,
                                  source_fingerprint)
from seekdeep.errors import CheckpointError, ConfigError
from seekdeep.files import atomic_write, read_json, write_json_atomic
from seekdeep.tokenizer import Tokenizer, train_tokenizer

_FORMAT = 1
# Documents are encoded in batches of this many (or this many characters), which the Rust side
# spreads over all cores; big enough to keep them busy, small enough to keep memory flat.
_BATCH_DOCUMENTS = 512
_BATCH_CHARACTERS = 8_000_000


def default_cache_dir() -> Path:
    """``$SEEKDEEP_HOME/cache`` (SEEKDEEP_HOME defaults to ``~/.cache/seekdeep``), read now."""
    home = os.environ.get("SEEKDEEP_HOME") or Path.home() / ".cache" / "seekdeep"
    return Path(home).expanduser() / "cache"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's full definition (vocabulary, merges, normalisation)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# -- tokenizer cache ------------------------------------------------------------------------


def get_or_train_tokenizer(documents_factory: Callable[[], Iterable[str]], vocab_size: int,
                           cache_dir: str | os.PathLike, fingerprint: str,
                           show_progress: bool = False) -> Tokenizer:
    """The byte-level BPE tokenizer cached in ``cache_dir/tokenizer-<fingerprint>-<vocab_size>/``,
    trained on ``documents_factory()`` first if that directory does not exist yet.

    documents_factory: called only when training, returns an iterable of texts.
    fingerprint: identifies the training documents (e.g. ``CorpusSplit.fingerprint``)."""
    _check_name_part("fingerprint", fingerprint)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokenizer-{fingerprint}-{vocab_size}"
    if (final / "tokenizer.json").is_file():
        return Tokenizer.from_pretrained(final)
    tokenizer = train_tokenizer(documents_factory(), vocab_size, show_progress=show_progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Save into a temporary folder and rename it: the cache never holds a half-written tokenizer.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name}."))
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / "tokenizer.json").is_file():  # not just a concurrent run that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.from_pretrained(final)


# -- token files ----------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_token_info(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of token file ``path``, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: token file not found (build it with build_token_file)")
    info = read_json(sidecar_path(path))
    dtype, count = info.get("dtype"), info.get("num_tokens")
    if dtype not in ("uint16", "uint32") or not isinstance(count, int) or count < 0:
        raise ConfigError("dtype", f"expected dtype uint16/uint32 and an int num_tokens, got "
                          f"{dtype!r} and {count!r}", source=str(sidecar_path(path)))
    if path.stat().st_size != count * np.dtype(dtype).itemsize:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, but its sidecar promises "
                              f"{count} {dtype} tokens; rebuild it")
    return info


def build_token_file(documents: Iterable[str], tokenizer: Tokenizer, path: str | os.PathLike,
                     eos_id: int | None = None, *, source_fingerprint: str | None = None,
                     progress: bool | None = False, total: int | None = None,
                     desc: str | None = None) -> dict[str, Any]:
    """Encode ``documents`` into token file ``path`` (each followed by ``eos_id``) and return
    its sidecar dict (dtype, num_tokens, num_documents, eos_id, fingerprints).

    The tokenizer's own special tokens (bos, ...) are not added. With ``source_fingerprint``
    naming the documents, an existing file whose sidecar matches is reused without reading
    ``documents``; without it the file is always rebuilt. File and sidecar are written
    atomically. progress: a tqdm bar (None: only when stderr is a terminal); total/desc for it."""
    path = Path(path)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < tokenizer.vocab_size:
        hint = " (the tokenizer has no eos_token to default to)" if eos_id is None else ""
        raise ConfigError("eos_id", f"must be a token id in [0, {tokenizer.vocab_size}), got {eos_id!r}{hint}")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    wanted = {"format": _FORMAT, "dtype": np.dtype(dtype).name, "eos_id": eos_id,
              "vocab_size": tokenizer.vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
              "source_fingerprint": source_fingerprint}
    if source_fingerprint is not None and path.is_file() and sidecar_path(path).is_file():
        try:
            info = read_token_info(path)
        except (ConfigError, CheckpointError):
            info = {}
        if all(info.get(key) == value for key, value in wanted.items()):
            return info

    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(path).unlink(missing_ok=True)  # a crash from here on leaves no stale match
    backend = tokenizer.backend_tokenizer
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
    counts = {"num_tokens": 0, "num_documents": 0}

    def flush(batch: list[str], out) -> None:
        ids = [enc.ids for enc in encode_batch(batch, add_special_tokens=False)]
        n = sum(map(len, ids)) + len(ids)
        flat = np.fromiter(itertools.chain.from_iterable(seq + [eos_id] for seq in ids), dtype=dtype, count=n)
        flat.tofile(out)
        counts["num_tokens"] += n
        counts["num_documents"] += len(batch)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            batch: list[str] = []
            characters = 0
            for text in tqdm(documents, desc=desc or path.name, total=total, unit="doc",
                             disable=None if progress is None else not progress):
                if not isinstance(text, str):
                    raise ConfigError("documents", f"must yield strings, got {type(text).__name__}")
                batch.append(text)
                characters += len(text)
                if len(batch) >= _BATCH_DOCUMENTS or characters >= _BATCH_CHARACTERS:
                    flush(batch, out)
                    batch, characters = [], 0
            if batch:
                flush(batch, out)

    atomic_write(path, write)
    info = {**wanted, **counts}
    write_json_atomic(sidecar_path(path), info)
    return info


class TokenWindows:
    """Batches of non-overlapping ``seq_len``-token windows of a token file.

    ``next_batch()`` returns a (batch_size, seq_len) LongTensor; pass it as both ``input_ids``
    and ``labels`` (seekdeep models, like transformers, shift labels by one inside). Every epoch
    visits each window once (the last ``num_tokens % seq_len`` tokens are never read), in a
    permutation seeded with ``seed + epoch`` (in file order when
    ``shuffle`` is False); a batch that runs past the end of an epoch continues in the next.
    ``state_dict()`` / ``load_state_dict()`` resume the exact same sequence of batches."""

    def __init__(self, path: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an int >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", f"must be an int >= 0, got {seed!r}")
        self.path = Path(path)
        info = read_token_info(self.path)
        self.num_tokens: int = info["num_tokens"]
        if seq_len > self.num_tokens:
            raise ConfigError("seq_len", f"{seq_len} is longer than the whole token stream ({self.num_tokens} "
                              f"tokens); use seq_len <= {self.num_tokens} or more data", source=str(self.path))
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.num_windows = self.num_tokens // seq_len
        self.epoch, self.cursor = 0, 0
        self._tokens = np.memmap(self.path, dtype=info["dtype"], mode="r", shape=(self.num_tokens,))
        self._order: tuple[int, np.ndarray] | None = None

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len) int64 batch of the shuffled stream."""
        starts: list[int] = []
        while len(starts) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(starts), self.num_windows - self.cursor)
            starts.extend(order[self.cursor:self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return self._gather(starts)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """The windows in file order, in batches of batch_size (the last may be smaller), at most
        ``max_batches``; the same every time, and leaves the training position alone."""
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < 0):
            raise ConfigError("max_batches", f"must be None or an int >= 0, got {max_batches!r}")
        count = math.ceil(self.num_windows / self.batch_size)
        if max_batches is not None:
            count = min(count, max_batches)
        for b in range(count):
            first = b * self.batch_size
            yield self._gather(list(range(first, min(first + self.batch_size, self.num_windows))))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (seed and shuffle are taken from it; seq_len and the token
        count must match, since they define the windows)."""
        missing = {"epoch", "cursor", "seed", "shuffle", "seq_len", "num_tokens"} - set(state)
        if missing:
            raise ConfigError("state_dict", f"missing keys {sorted(missing)}")
        for key in ("seq_len", "num_tokens"):
            if state[key] != getattr(self, key):
                raise ConfigError("state_dict", f"{key} is {state[key]!r} in the saved state but "
                                  f"{getattr(self, key)!r} here; resume with the same data and seq_len")
        epoch, cursor = state["epoch"], state["cursor"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(cursor, int)
                and 0 <= cursor < self.num_windows):
            raise ConfigError("state_dict", f"epoch must be an int >= 0 and cursor in [0, {self.num_windows}), "
                              f"got epoch={epoch!r}, cursor={cursor!r}")
        self.epoch, self.cursor = epoch, cursor
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                order = np.random.default_rng(self.seed + self.epoch).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = (self.epoch, order)
        return self._order[1]

    def _gather(self, window_indices: list[int]) -> torch.Tensor:
        L = self.seq_len
        rows = np.stack([self._tokens[i * L:(i + 1) * L] for i in window_indices])  # (B, L)
        return torch.from_numpy(rows.astype(np.int64))


# -- one call for a training run ------------------------------------------------------------


@dataclass
class PreparedData:
    """A tokenizer and the token files of both sides of the split; ``stats`` holds counts
    (documents, tokens, skipped files, cache hits, seconds) for logging."""

    tokenizer: Tokenizer
    train_path: Path
    heldout_path: Path
    stats: dict[str, Any]


def prepare_data(source: Source | CorpusSplit | None = None, vocab_size: int = 4096, seq_len: int = 256,
                 cache_dir: str | os.PathLike | None = None, *, heldout_fraction: float = 0.02,
                 heldout_every: int = 50, progress: bool | None = None) -> PreparedData:
    """Tokenizer + train / held-out token files for ``source``, from the cache when possible.

    source: None for the standard library with its module split (``default_corpus``), a
    ``CorpusSplit``, or user data as ``iter_documents`` takes it. User data holds out every
    ``heldout_every``-th document; a source with fewer documents holds out the last
    ``heldout_fraction`` of its text (cut at a line start) instead. The tokenizer is trained on
    the training side only. Both sides must hold at least ``seq_len`` tokens.
    cache_dir: defaults to ``$SEEKDEEP_HOME/cache``. progress: tqdm bars (None: on a terminal)."""
    started = time.perf_counter()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("seq_len", f"must be an int >= 1, got {seq_len!r}")
    if isinstance(heldout_every, bool) or not isinstance(heldout_every, int) or heldout_every < 2:
        raise ConfigError("heldout_every", f"must be an int >= 2, got {heldout_every!r}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source is None:
        source = default_corpus(heldout_fraction)
    stats = DocumentStats()

    if isinstance(source, CorpusSplit):
        split = source
        if not split.heldout_files:
            raise ConfigError("heldout_fraction", "the corpus split holds nothing out; use a fraction > 0")
        fingerprint, rule = split.fingerprint, "whole modules and packages, by hash"
        totals = {"train": len(split.train_files), "heldout": len(split.heldout_files)}

        def documents(side: str, counted: DocumentStats | None = None) -> Iterator[str]:
            return iter_documents(split.train_files if side == "train" else split.heldout_files, counted)
    else:
        if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
                or not 0 < heldout_fraction < 1:
            raise ConfigError("heldout_fraction", f"must be a number in (0, 1), got {heldout_fraction!r}")
        plan = plan_heldout(source, heldout_every, heldout_fraction)
        fingerprint = hashlib.sha256(json.dumps(
            [_FORMAT, source_fingerprint(source), heldout_every, heldout_fraction]).encode()).hexdigest()[:16]
        rule = (f"every {heldout_every}th document" if plan is None else
                f"the last {heldout_fraction:.0%} of the text (fewer than {heldout_every} documents)")
        totals = {"train": None, "heldout": None}

        def documents(side: str, counted: DocumentStats | None = None) -> Iterator[str]:
            return split_side(source, plan, heldout_every, side, counted)

    show = sys.stderr.isatty() if progress is None else progress
    tokenizer_dir = cache_dir / f"tokenizer-{fingerprint}-{vocab_size}"
    tokenizer_cached = (tokenizer_dir / "tokenizer.json").is_file()
    tokenizer = get_or_train_tokenizer(lambda: documents("train"), vocab_size, cache_dir, fingerprint,
                                       show_progress=show)
    token_dir = cache_dir / f"tokens-{fingerprint}-{vocab_size}"
    token_fingerprint = f"{fingerprint}-{tokenizer_fingerprint(tokenizer)}"
    infos, built = {}, set()
    for side in ("train", "heldout"):
        path = token_dir / f"{side}.bin"
        before = _file_identity(path)
        # Heldout documents of user data are counted in the train pass, which reads them all.
        counted = stats if side == "train" or isinstance(source, CorpusSplit) else None
        infos[side] = build_token_file(documents(side, counted), tokenizer, path,
                                       source_fingerprint=f"{token_fingerprint}-{side}", progress=show,
                                       total=totals[side], desc=f"tokenizing {side}")
        if _file_identity(path) != before:
            built.add(side)
    stats_file = token_dir / "documents.json"
    # `stats` is complete only when the passes that count documents all ran this time.
    if built >= ({"train", "heldout"} if isinstance(source, CorpusSplit) else {"train"}):
        document_stats = {"documents": stats.documents, "empty_documents": stats.empty,
                          "skipped_files": [list(s) for s in stats.skipped]}
        write_json_atomic(stats_file, document_stats)
    else:
        document_stats = read_json(stats_file, optional=True)

    for side, info in infos.items():
        if info["num_tokens"] < seq_len:
            raise ConfigError("seq_len", f"{seq_len} is longer than the {side} token stream "
                              f"({info['num_tokens']} tokens in {token_dir / (side + '.bin')}); use "
                              "a smaller seq_len or more data", source=str(token_dir / f"{side}.bin"))
    return PreparedData(tokenizer, token_dir / "train.bin", token_dir / "heldout.bin", {
        "fingerprint": fingerprint, "heldout_rule": rule, "vocab_size": tokenizer.vocab_size,
        "train_documents": infos["train"]["num_documents"], "train_tokens": infos["train"]["num_tokens"],
        "heldout_documents": infos["heldout"]["num_documents"],
        "heldout_tokens": infos["heldout"]["num_tokens"], **document_stats,
        "tokenizer_from_cache": tokenizer_cached, "tokens_from_cache": not built,
        "seconds": round(time.perf_counter() - started, 3)})


def plan_heldout(source: Source, every: int, fraction: float) -> tuple[int, int] | None:
    """How :func:`prepare_data` splits user data ``source``: None when it has at least ``every``
    documents (every ``every``-th document is held out); otherwise where the held-out tail, the
    last ``fraction`` of the text, starts: (document index, character offset). Pass the result to
    :func:`split_side`."""
    lengths = []
    for text in iter_documents(source):
        lengths.append(len(text))
        if len(lengths) >= every:
            return None
    position = sum(lengths) - max(1, math.ceil(sum(lengths) * fraction))
    for index, length in enumerate(lengths):
        if position < length:
            return index, position
        position -= length
    raise AssertionError("unreachable: the cut lies inside the text")


def split_side(source: Source, plan: tuple[int, int] | None, every: int, side: str,
               stats: DocumentStats | None = None) -> Iterator[str]:
    """The documents of one ``side`` (``"train"`` or ``"heldout"``) of ``source`` split by
    ``plan`` (from :func:`plan_heldout` with the same ``every``). A tail cut falls back to the
    start of its line. ``stats``: counts the documents read (all of them, on either side)."""
    if side not in ("train", "heldout"):
        raise ConfigError("side", f"unknown {side!r}; accepted: 'train', 'heldout'")
    for index, text in enumerate(iter_documents(source, stats)):
        if plan is None:
            if (index % every == every - 1) == (side == "heldout"):
                yield text
            continue
        cut_index, offset = plan
        if index == cut_index:
            # Move the cut back to a line start, unless that would leave no training text.
            line_start = text.rfind("\n", 0, offset) + 1
            if line_start > 0 or index > 0:
                offset = line_start
            piece = text[:offset] if side == "train" else text[offset:]
            if piece:
                yield piece
        elif (index < cut_index) == (side == "train"):
            yield text


def _file_identity(path: Path) -> tuple[int, int] | None:
    # An atomic rewrite replaces the inode, so this tells a reused file from a rebuilt one.
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.is_file() else None


def _check_name_part(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ConfigError(name, f"must be a non-empty string of letters, digits, '-', '_' or '.', "
                          f"got {value!r}")


__all__ = ["PreparedData", "TokenWindows", "build_token_file", "default_cache_dir", "get_or_train_tokenizer",
           "plan_heldout", "prepare_data", "read_token_info", "sidecar_path", "split_side", "tokenizer_fingerprint"]
