"""Fixtures for the explain tests (the models are built in keyword_models.py)."""

from __future__ import annotations

import pytest
import torch

from keyword_models import build_keyword_classifier, build_keyword_lm, build_tokenizer


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
