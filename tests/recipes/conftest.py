"""Fixtures the recipe tests share: a private SEEKDEEP_HOME and a small corpus of stdlib modules
(a test module may define its own ``corpus``)."""

from __future__ import annotations

import pytest

from seekdeep.data.corpus import stdlib_root

#: standard-library modules copied three times: more documents than the every-20th hold-out rule needs
MODULES = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "pprint.py", "shlex.py", "fnmatch.py", "calendar.py"]


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEEKDEEP_HOME", str(tmp_path_factory.getbasetemp() / "seekdeep-home"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("module-corpus")
    for i in range(3):
        for name in MODULES:
            (root / f"{i}_{name}").write_text((stdlib_root() / name).read_text(encoding="utf-8"), encoding="utf-8")
    return root
