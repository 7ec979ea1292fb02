"""Data: the embedded default corpus (the running Python's standard library sources), user
data readers, the tokenizer cache and the token files / windows that training reads."""

from seekdeep.data.corpus import (CorpusSplit, DocumentStats, default_corpus, iter_documents, package_files,
                                  source_fingerprint, split_files, stdlib_files, stdlib_root)
from seekdeep.data.tokens import (PreparedData, TokenWindows, build_token_file, default_cache_dir,
                                  get_or_train_tokenizer, prepare_data, read_token_info, tokenizer_fingerprint)

__all__ = [
    "CorpusSplit", "DocumentStats", "PreparedData", "TokenWindows", "build_token_file", "default_cache_dir",
    "default_corpus", "get_or_train_tokenizer", "iter_documents", "package_files", "prepare_data",
    "read_token_info", "source_fingerprint", "split_files", "stdlib_files", "stdlib_root",
    "tokenizer_fingerprint",
]
