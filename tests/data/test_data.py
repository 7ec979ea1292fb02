"""seekdeep.data: the stdlib split, user-data reading and its errors, the tokenizer cache, token
files and the resumable windows training reads. Small corpora only (a few files, vocab ~400)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

from seekdeep.data import (CorpusSplit, DocumentStats, TokenWindows, build_token_file, default_cache_dir,
                           default_corpus, get_or_train_tokenizer, iter_documents, package_files, prepare_data,
                           read_token_info, split_files, stdlib_files, stdlib_root, tokenizer_fingerprint)
from seekdeep.data import corpus as corpus_module
from seekdeep.data import tokens as tokens_module
from seekdeep.errors import CheckpointError, ConfigError, DataError
from seekdeep.tokenizer import Tokenizer, train_tokenizer

STDLIB = stdlib_root()
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    files = [STDLIB / name for name in ("textwrap.py", "string.py", "bisect.py")]
    return train_tokenizer(files, vocab_size=400)


def _bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _token_file(tmp_path: Path, tokenizer: Tokenizer, n_tokens_min: int = 3000) -> Path:
    """A token file of stdlib text with at least ``n_tokens_min`` tokens."""
    docs = [f.read_text(encoding="utf-8") for f in package_files("json")]
    path = tmp_path / "tokens.bin"
    info = build_token_file(docs, tokenizer, path)
    assert info["num_tokens"] >= n_tokens_min
    return path


# -- the default split ----------------------------------------------------------------------


def test_default_split_is_disjoint_whole_modules_and_about_two_percent():
    split = default_corpus()
    train, heldout = set(split.train_files), set(split.heldout_files)
    assert train and heldout and not train & heldout
    assert train | heldout == set(stdlib_files())
    held_bytes, total = _bytes(heldout), _bytes(train | heldout)
    assert 0.01 * total <= held_bytes <= 0.02 * total
    # a package (or top-level module) never straddles the two sides
    top = lambda f: f.relative_to(split.root).parts[0].removesuffix(".py")  # noqa: E731
    assert not {top(f) for f in train} & {top(f) for f in heldout}
    assert default_corpus() == split


def test_default_split_does_not_depend_on_the_hash_seed():
    code = ("from seekdeep.data import default_corpus; s = default_corpus(); "
            "print(s.fingerprint, *[f.relative_to(s.root).as_posix() for f in s.heldout_files])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    split = default_corpus()
    assert out.stdout.split() == [split.fingerprint, *[f.relative_to(split.root).as_posix()
                                                       for f in split.heldout_files]]


def test_unit_order_is_a_fixed_sha256_not_pythons_hash():
    # Pinned: changing the ranking would silently move modules between train and held-out.
    assert corpus_module._unit_rank("json").startswith("8cd13d88")


def test_split_files_granularity_and_validation(tmp_path):
    files = [_write(tmp_path / "pkg" / name, "x = 1\n" * size)
             for name, size in (("a.py", 10), ("b.py", 20), ("c.py", 30), ("sub/d.py", 40))]
    # one package only: split by module, deterministically
    train, heldout = split_files(files, tmp_path, heldout_fraction=0.2)
    assert split_files(list(reversed(files)), tmp_path, 0.2) == (train, heldout)
    assert heldout and train and set(train) | set(heldout) == set(files)
    assert _bytes(heldout) <= 0.2 * _bytes(files)
    # nothing small enough: the smallest unit is held out
    assert split_files(files, tmp_path, 0.001)[1] == [files[0]]
    assert split_files(files, tmp_path, 0.0) == (sorted(files), [])
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_files(files, tmp_path, 1.0)
    with pytest.raises(ConfigError, match="not under the corpus root"):
        split_files(files, tmp_path / "pkg" / "sub", 0.1)


def test_fingerprint_follows_the_file_list():
    small = default_corpus(limit_bytes=200_000)
    assert small.fingerprint == default_corpus(limit_bytes=200_000).fingerprint
    assert small.fingerprint != default_corpus(limit_bytes=300_000).fingerprint
    assert small.fingerprint != default_corpus(heldout_fraction=0.05, limit_bytes=200_000).fingerprint


def test_package_files():
    json_files = package_files("json")
    assert STDLIB / "json" / "decoder.py" in json_files
    assert all(f.is_relative_to(STDLIB / "json") for f in json_files)
    assert json_files == sorted(json_files)
    assert package_files("email.mime") and all("mime" in f.parts for f in package_files("email.mime"))
    assert package_files("textwrap") == [STDLIB / "textwrap.py"]
    with pytest.raises(ConfigError, match="not a standard-library package"):
        package_files("no_such_package")
    with pytest.raises(ConfigError, match="excluded"):
        package_files("idlelib")
    with pytest.raises(ConfigError, match="dotted module name"):
        package_files("../json")


# -- user data ------------------------------------------------------------------------------


def test_iter_documents_file_folder_jsonl_and_list(tmp_path):
    single = _write(tmp_path / "one.txt", "\ufeffhello world\n")  # the BOM is not text
    folder = tmp_path / "folder"
    _write(folder / "b.txt", "second")
    _write(folder / "a" / "z.md", "first")
    _write(folder / "c.jsonl", '{"text": "third"}\n\n{"text": "fourth", "id": 4}\n')
    _write(folder / "d.txt", "  \n")  # whitespace only: counted as empty, not yielded
    jsonl = _write(tmp_path / "data.jsonl", '{"text": "j1"}\n{"text": ""}\n{"text": "j2"}\n')

    assert list(iter_documents(single)) == ["hello world\n"]
    stats = DocumentStats()
    assert list(iter_documents(folder, stats)) == ["first", "second", "third", "fourth"]
    assert (stats.documents, stats.empty, stats.characters) == (4, 1, 22)
    assert list(iter_documents(str(jsonl))) == ["j1", "j2"]
    assert list(iter_documents([jsonl, single, folder])) == ["j1", "j2", "hello world\n", "first",
                                                            "second", "third", "fourth"]


def test_missing_path_fails_when_called_not_when_consumed(tmp_path):
    good = _write(tmp_path / "a.txt", "text")
    with pytest.raises(DataError, match="no such file") as info:
        iter_documents([good, tmp_path / "missing.txt"])
    assert info.value.path == str(tmp_path / "missing.txt")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(tmp_path / "empty_dir"))
    blank = _write(tmp_path / "blank.txt", "\n\n   \n")
    with pytest.raises(DataError, match="no documents: 1 empty") as info:
        list(iter_documents(blank))
    assert info.value.path == str(blank)
    with pytest.raises(DataError, match="no documents"):
        list(iter_documents(_write(tmp_path / "e.jsonl", '{"text": ""}\n')))
    with pytest.raises(ConfigError, match="empty list"):
        iter_documents([])
    with pytest.raises(ConfigError, match="expected a path"):
        iter_documents(42)


def test_named_binary_or_non_utf8_file_is_an_error(tmp_path):
    binary = _write(tmp_path / "model.bin", b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="binary") as info:
        list(iter_documents(binary))
    assert info.value.path == str(binary)
    latin1 = _write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not utf-8"):
        list(iter_documents(latin1))


def test_binary_and_hidden_files_in_a_folder_are_skipped_and_counted(tmp_path, caplog):
    _write(tmp_path / "code.py", "print('hi')\n")
    _write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    _write(tmp_path / "old.txt", "caf\xe9".encode("latin-1"))
    _write(tmp_path / ".git" / "HEAD", "ref: refs/heads/main\n")
    _write(tmp_path / ".hidden", "secret")
    stats = DocumentStats()
    with caplog.at_level(logging.WARNING, logger="seekdeep.data.corpus"):
        assert list(iter_documents(tmp_path, stats)) == ["print('hi')\n"]
    reasons = {Path(path).name: reason for path, reason in stats.skipped}
    assert reasons["image.png"] == "binary" and reasons["old.txt"].startswith("not utf-8")
    assert reasons[".git"] == reasons[".hidden"] == "hidden"
    assert "image.png" in caplog.text


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a list"]', "got list"),
    ('{"content": "x"}', "no 'text' key"),
    ('{"text": 3}', "'text' is int"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        list(iter_documents(path))
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert f"{path}:3:" in str(info.value)


def test_iter_documents_is_lazy(tmp_path):
    # Only the first line is valid: reading the first document must not look further.
    path = _write(tmp_path / "huge.jsonl", '{"text": "first"}\n' + "garbage\n" * 100_000)
    documents = iter_documents(path)
    assert next(documents) == "first"
    with pytest.raises(DataError) as info:
        next(documents)
    assert info.value.line == 2


# -- tokenizer cache ------------------------------------------------------------------------


def test_tokenizer_cache_trains_once(tmp_path, monkeypatch):
    calls = []
    real = tokens_module.train_tokenizer
    monkeypatch.setattr(tokens_module, "train_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    texts = [f.read_text(encoding="utf-8") for f in package_files("json")]

    first = get_or_train_tokenizer(lambda: iter(texts), 350, tmp_path, "abc123")
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer-abc123-350"]  # no temp leftovers

    def must_not_read():
        raise AssertionError("the cached tokenizer should be loaded, not retrained")

    second = get_or_train_tokenizer(must_not_read, 350, tmp_path, "abc123")
    assert len(calls) == 1
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    assert second.eos_token == EOS and second.encode(texts[0]) == first.encode(texts[0])
    get_or_train_tokenizer(lambda: iter(texts), 300, tmp_path, "abc123")  # another vocab: another entry
    assert len(calls) == 2
    with pytest.raises(ConfigError, match="fingerprint"):
        get_or_train_tokenizer(lambda: iter(texts), 300, tmp_path, "../escape")


# -- token files ----------------------------------------------------------------------------


def test_token_file_round_trip(tmp_path, small_tokenizer):
    docs = [f.read_text(encoding="utf-8") for f in package_files("json")] + ["ünïcode ∑ 🚀\n"]
    path = tmp_path / "t.bin"
    info = build_token_file(iter(docs), small_tokenizer, path)
    assert info["dtype"] == "uint16" and info["num_documents"] == len(docs)
    assert read_token_info(path) == info
    assert json.loads((tmp_path / "t.bin.json").read_text()) == info
    stream = np.fromfile(path, dtype=np.uint16)
    assert len(stream) == info["num_tokens"]
    assert int((stream == small_tokenizer.eos_token_id).sum()) == len(docs)
    assert small_tokenizer.decode(stream.tolist()) == EOS.join(docs) + EOS


def test_token_file_reused_only_when_sidecar_matches(tmp_path, small_tokenizer):
    docs = ["def f(x):\n    return x\n", "class A:\n    pass\n"]
    path = tmp_path / "t.bin"
    info = build_token_file(docs, small_tokenizer, path, source_fingerprint="v1")
    inode = path.stat().st_ino

    def must_not_read():
        raise AssertionError("a matching token file should be reused")
        yield

    assert build_token_file(must_not_read(), small_tokenizer, path, source_fingerprint="v1") == info
    assert path.stat().st_ino == inode
    # other documents, no fingerprint, or a truncated file: rebuilt
    assert build_token_file(docs[:1], small_tokenizer, path, source_fingerprint="v2")["num_documents"] == 1
    assert build_token_file(docs, small_tokenizer, path)["num_documents"] == 2
    with open(path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(CheckpointError, match="promises"):
        TokenWindows(path, 2, 1)
    assert build_token_file(docs, small_tokenizer, path, source_fingerprint=None) == info | {"source_fingerprint": None}


def test_token_file_uses_uint32_for_big_vocabularies(tmp_path):
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, 70_000)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, eos_token=EOS)
    info = build_token_file(["w69999 w5", "w65536"], tokenizer, tmp_path / "big.bin")
    assert info["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "big.bin", dtype=np.uint32).tolist() == [69999, 5, 0, 65536, 0]


def test_build_token_file_validation(tmp_path, small_tokenizer):
    with pytest.raises(ConfigError, match="eos_id"):
        build_token_file(["x"], small_tokenizer, tmp_path / "t.bin", eos_id=10_000)
    with pytest.raises(ConfigError, match="must yield strings"):
        build_token_file([b"bytes"], small_tokenizer, tmp_path / "t.bin")
    assert not (tmp_path / "t.bin").exists() and not list(tmp_path.glob(".t.bin*"))  # nothing half-written


# -- windows --------------------------------------------------------------------------------


def test_windows_shapes_and_epoch_coverage(tmp_path, small_tokenizer):
    path = _token_file(tmp_path, small_tokenizer)
    stream = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
    windows = TokenWindows(path, seq_len=64, batch_size=5, seed=3)
    all_windows = stream[: windows.num_windows * 64].view(-1, 64)  # (num_windows, 64)
    batches_per_epoch = -(-windows.num_windows // 5)
    rows = []
    for _ in range(batches_per_epoch):
        batch = windows.next_batch()
        assert batch.shape == (5, 64) and batch.dtype == torch.long
        rows.append(batch)
    rows = torch.cat(rows)  # (batches_per_epoch * 5, 64)
    # the first epoch visits every window exactly once, in a seed-3 permutation; the last batch
    # is filled from epoch 1, which uses seed 4
    expected = np.random.default_rng(3).permutation(windows.num_windows)
    assert torch.equal(rows[: windows.num_windows], all_windows[expected])
    spill = len(rows) - windows.num_windows
    assert torch.equal(rows[windows.num_windows:], all_windows[np.random.default_rng(4).permutation(
        windows.num_windows)[:spill]])
    assert (windows.epoch, windows.cursor) == (1, spill)


def test_windows_are_deterministic_and_seeded(tmp_path, small_tokenizer):
    path = _token_file(tmp_path, small_tokenizer)
    a, b, c = (TokenWindows(path, 32, 4, seed=s) for s in (7, 7, 8))
    batches_a = [a.next_batch() for _ in range(6)]
    assert all(torch.equal(x, b.next_batch()) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()) for x in batches_a)
    ordered = TokenWindows(path, 32, 4, shuffle=False)
    stream = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    assert torch.equal(ordered.next_batch(), torch.from_numpy(stream[:128].reshape(4, 32)))


@pytest.mark.parametrize("seq_len, batch_size", [(64, 5), (16, 3), (2000, 3)])  # the last crosses epochs
def test_windows_resume_exactly(tmp_path, small_tokenizer, seq_len, batch_size):
    path = _token_file(tmp_path, small_tokenizer)
    windows = TokenWindows(path, seq_len, batch_size, seed=11)
    for _ in range(7):
        windows.next_batch()
    state = json.loads(json.dumps(windows.state_dict()))  # survives a JSON checkpoint
    expected = [windows.next_batch() for _ in range(5)]
    resumed = TokenWindows(path, seq_len, batch_size, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)
    assert resumed.state_dict() == windows.state_dict()


def test_windows_cross_epochs_when_batch_exceeds_windows(tmp_path, small_tokenizer):
    path = tmp_path / "short.bin"
    build_token_file(["def f(x):\n    return x + 1\n"], small_tokenizer, path)
    n = read_token_info(path)["num_tokens"]
    windows = TokenWindows(path, seq_len=n // 2, batch_size=5, seed=0)
    assert windows.num_windows == 2
    assert windows.next_batch().shape == (5, n // 2)
    assert (windows.epoch, windows.cursor) == (2, 1)


def test_eval_batches_are_sequential_and_leave_training_state(tmp_path, small_tokenizer):
    path = _token_file(tmp_path, small_tokenizer)
    windows = TokenWindows(path, 100, 8, seed=1)
    windows.next_batch()
    state = windows.state_dict()
    first = list(windows.eval_batches())
    assert [len(b) for b in first[:-1]] == [8] * (len(first) - 1) and 0 < len(first[-1]) <= 8
    stream = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    assert torch.equal(torch.cat(first), torch.from_numpy(stream[: windows.num_windows * 100].reshape(-1, 100)))
    assert all(torch.equal(x, y) for x, y in zip(first, windows.eval_batches()))
    assert len(list(windows.eval_batches(max_batches=2))) == 2
    assert windows.state_dict() == state


def test_windows_validation(tmp_path, small_tokenizer):
    path = _token_file(tmp_path, small_tokenizer)
    n = read_token_info(path)["num_tokens"]
    with pytest.raises(ConfigError, match=f"seq_len.*{n} tokens"):
        TokenWindows(path, n + 1, 1)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ConfigError, match="batch_size"):
            TokenWindows(path, 16, bad)
    with pytest.raises(CheckpointError, match="not found"):
        TokenWindows(tmp_path / "nothing.bin", 16, 1)
    state = TokenWindows(path, 16, 2).state_dict()
    with pytest.raises(ConfigError, match="seq_len"):
        TokenWindows(path, 32, 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="missing keys"):
        TokenWindows(path, 16, 2).load_state_dict({"epoch": 0})


# -- prepare_data ---------------------------------------------------------------------------


def _docs_folder(root: Path, count: int) -> list[str]:
    docs = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(count)]
    for i, doc in enumerate(docs):
        _write(root / f"doc{i:03d}.py", doc)
    return docs


def test_prepare_data_user_folder_holds_out_every_nth_document(tmp_path, monkeypatch):
    docs = _docs_folder(tmp_path / "src", 120)
    _write(tmp_path / "src" / "blob.bin", b"\x00\x01")
    prepared = prepare_data(tmp_path / "src", vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache",
                            heldout_every=50, progress=False)
    tok = prepared.tokenizer
    heldout_text = tok.decode(np.fromfile(prepared.heldout_path, dtype=np.uint16).tolist())
    train_text = tok.decode(np.fromfile(prepared.train_path, dtype=np.uint16).tolist())
    assert heldout_text == docs[49] + EOS + docs[99] + EOS
    assert train_text == EOS.join(d for i, d in enumerate(docs) if i % 50 != 49) + EOS
    stats = prepared.stats
    assert (stats["train_documents"], stats["heldout_documents"], stats["documents"]) == (118, 2, 120)
    assert stats["skipped_files"] == [[str(tmp_path / "src" / "blob.bin"), "binary"]]
    assert not stats["tokenizer_from_cache"] and not stats["tokens_from_cache"]

    monkeypatch.setattr(tokens_module, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    again = prepare_data(tmp_path / "src", vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache",
                         heldout_every=50, progress=False)
    assert again.stats["tokenizer_from_cache"] and again.stats["tokens_from_cache"]
    assert again.stats["skipped_files"] == stats["skipped_files"]
    assert again.train_path == prepared.train_path

    _write(tmp_path / "src" / "doc000.py", "def changed():\n    pass\n")  # an edit invalidates the cache
    monkeypatch.setattr(tokens_module, "train_tokenizer", train_tokenizer)
    edited = prepare_data(tmp_path / "src", vocab_size=300, seq_len=16, cache_dir=tmp_path / "cache",
                          progress=False)
    assert edited.train_path != prepared.train_path and not edited.stats["tokens_from_cache"]


def test_prepare_data_single_file_holds_out_its_tail(tmp_path):
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    source = _write(tmp_path / "one.py", text)
    prepared = prepare_data(source, vocab_size=300, seq_len=32, cache_dir=tmp_path / "cache", progress=False)
    tok = prepared.tokenizer
    train_text = tok.decode(np.fromfile(prepared.train_path, dtype=np.uint16).tolist())
    heldout_text = tok.decode(np.fromfile(prepared.heldout_path, dtype=np.uint16).tolist())
    assert train_text.endswith(EOS) and heldout_text.endswith(EOS)
    train_part, heldout_part = train_text[: -len(EOS)], heldout_text[: -len(EOS)]
    assert train_part + heldout_part == text
    assert train_part.endswith("\n")  # cut at a line start
    assert 0.02 * len(text) <= len(heldout_part) < 0.05 * len(text)
    assert "last 2%" in prepared.stats["heldout_rule"]


def test_prepare_data_default_corpus_slice_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "cache"
    split = default_corpus(limit_bytes=150_000)
    prepared = prepare_data(split, vocab_size=400, seq_len=64, progress=False)
    assert prepared.train_path.is_relative_to(tmp_path / "home" / "cache")
    assert prepared.stats["fingerprint"] == split.fingerprint
    assert prepared.stats["heldout_documents"] == len([f for f in split.heldout_files if f.stat().st_size])
    windows = TokenWindows(prepared.heldout_path, 64, 4)
    batch = next(windows.eval_batches())
    assert batch.shape[1] == 64 and int(batch.max()) < prepared.tokenizer.vocab_size


def test_prepare_data_validation(tmp_path):
    source = _write(tmp_path / "short.txt", "x = 1\n" * 20)
    with pytest.raises(ConfigError, match="seq_len.*held"):
        prepare_data(source, vocab_size=300, seq_len=64, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match="heldout_every"):
        prepare_data(source, heldout_every=1, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="holds nothing out"):
        prepare_data(CorpusSplit(STDLIB, [STDLIB / "textwrap.py"], [], "x"), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no such file"):
        prepare_data(tmp_path / "missing", cache_dir=tmp_path / "cache")
