"""Fixtures for the explain tests (the models are built in keyword_models.py)."""

from __future__ import annotations

import os

# shap compiles its numba kernels in every new process (10-15 s here, several minutes on a loaded
# 2-core machine); for the <= 20-unit inputs of these tests the same kernels run as plain Python
# in milliseconds. Set before shap (and numba) are first imported; a caller may override it.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from keyword_models import build_keyword_classifier, build_keyword_lm, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def keyword_classifier(tokenizer):
    return build_keyword_classifier(tokenizer)


@pytest.fixture(scope="session")
def keyword_lm(tokenizer):
    return build_keyword_lm(tokenizer)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: on a shared 2-core machine two intra-op threads make each small
    matmul ~10x slower (they wait for each other), so the tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
