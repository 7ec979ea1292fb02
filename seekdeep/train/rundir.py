"""Run directories that keep finished work.

Every recipe (train, finetune, distill, compress, fl, ...) writes into one output directory.
Before it writes anything it calls :func:`prepare_run_dir`, which applies one rule for all
of them:

- a missing or empty directory is created and used;
- a directory holding a **finished** run (its ``summary.json`` / ``report.json`` exists) is
  refused, naming the directory and the ways on: ``--output-dir NEW``, ``--overwrite``, or
  (recipes that resume) ``--resume auto`` to continue it with a larger budget;
- a directory holding an **unfinished** run (checkpoints, no summary) is refused unless the
  run resumes it (``--resume auto``) or ``--overwrite`` starts over;
- any other non-empty directory is refused unless ``--overwrite``.

With ``--overwrite`` the previous run's checkpoints are removed (a later ``--resume auto``
must not pick them up), but its final model stays in place until the new one is complete:
:func:`publish_dir` writes the new one beside it and swaps it in with renames, so
``seekdeep generate`` / ``serve`` never see a half-written or missing model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from seekdeep.errors import ConfigError

#: files a recipe writes last, atomically: their presence means the run finished.
FINISHED_MARKERS = ("summary.json", "report.json")
CHECKPOINTS = "checkpoints"


class RunDirectoryError(ConfigError):
    """The output directory holds work that the requested run would overwrite."""

    def __init__(self, message: str):
        super().__init__("output_dir", message)


def run_state(out: Path) -> str:
    """'missing' | 'empty' | 'finished' | 'unfinished' (checkpoints, no summary) | 'foreign'."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        return "foreign"
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return "empty"
    if any((out / name).is_file() for name in FINISHED_MARKERS):
        return "finished"
    ckpt = out / CHECKPOINTS
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "unfinished"
    if {p.name for p in entries} <= {"metrics.jsonl", "tensorboard", CHECKPOINTS}:
        return "unfinished"  # stopped before its first checkpoint: nothing worth keeping but its log
    return "foreign"


def prepare_run_dir(output_dir: str | os.PathLike, *, command: str, overwrite: bool = False,
                    resume: str | None = None, resumable: bool = True, clear: bool = True) -> Path:
    """Check ``output_dir`` against the rule above and return it (created).

    ``resume``: the recipe's resume setting (None, "auto" or a path); ``resumable``: whether the
    recipe can resume at all (compress cannot), which decides the hint in the error; ``clear``:
    whether this process removes an overwritten run's checkpoints (under torchrun every rank
    checks, rank 0 alone clears).
    """
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{out} is a file; accepted: a directory (missing, empty or a previous run of "
                                f"`seekdeep {command}`)")
    state = run_state(out)
    resume_hint = ", or --resume auto to continue it (with a larger --steps)" if resumable else ""
    if state == "finished" and not overwrite and resume is None:
        marker = next(name for name in FINISHED_MARKERS if (out / name).is_file())
        raise RunDirectoryError(
            f"{out} already holds a finished run ({out / marker}); refusing to overwrite it. Choose another "
            f"--output-dir NEW, pass --overwrite to replace it{resume_hint}")
    if state == "unfinished" and not overwrite and resume is None:
        raise RunDirectoryError(
            f"{out} holds an unfinished run (checkpoints, no summary yet); pass --resume auto to continue it, "
            "--overwrite to start over, or choose another --output-dir NEW")
    if state == "foreign" and not overwrite:
        raise RunDirectoryError(
            f"{out} is not empty and is not a `seekdeep {command}` run; choose another --output-dir NEW or pass "
            "--overwrite to write into it")
    if overwrite and resume is not None:
        raise ConfigError("overwrite", "cannot be combined with --resume (one continues the run, the other starts "
                          "it over); accepted: one of them")
    if overwrite and clear and state in ("finished", "unfinished", "foreign"):
        ckpt = out / CHECKPOINTS
        if ckpt.is_dir():
            doomed = out / f".{CHECKPOINTS}.old-{os.getpid()}"
            os.rename(ckpt, doomed)  # rename first: a crash mid-rmtree leaves no half checkpoint dir
            shutil.rmtree(doomed, ignore_errors=True)
        for name in FINISHED_MARKERS:  # the old summary no longer describes what is here
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(final_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a directory (a final model, a merged model) in one piece: ``write(tmp)`` fills a
    temporary sibling, which is fsynced and renamed to ``final_dir``; a previous ``final_dir``
    is replaced only then. A crash leaves either the old directory or the new one."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final_dir, old)
    os.rename(tmp, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir
