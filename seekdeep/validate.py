"""Range checks shared by the config dataclasses' ``__post_init__``: one wording for every
field, so an error names the field, the value and what is accepted."""

from __future__ import annotations

import math
from typing import Any

from seekdeep.errors import ConfigError

#: upper bound of counts that size work (steps, batches, lengths): past it a run cannot finish
#: or allocate; catches a mistyped value before any work starts.
MAX_COUNT = 10**9
MAX_SEED = 2**32 - 1  # numpy's and most launchers' seed range
MAX_SEQ_LEN = 1 << 20  # tokens per training window
MAX_BATCH = 1 << 16


def check_int(name: str, value: Any, lo: int = 1, hi: int | None = MAX_COUNT, *, optional: bool = False) -> None:
    """``value`` is an int (not a bool) in ``[lo, hi]`` (``hi`` None: unbounded); None passes
    when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi:,}]"
        raise ConfigError(name, f"got {value!r}; accepted: {accepted}" + (" or None" if optional else ""))


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite number in the interval given by ``lo`` / ``hi`` (open ends when
    ``lo_open`` / ``hi_open``); None passes when ``optional``."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        raise ConfigError(name, f"got {value!r}; accepted: a finite number in {interval}" + (" or None" if optional else ""))


def check_device(name: str, value: Any, *, optional: bool = True) -> None:
    """A torch device string this machine has: 'cpu', 'cuda', 'cuda:N' (None: the default)."""
    if value is None and optional:
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(name, f"got {value!r}; accepted: cpu, cuda, cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(name, f"got {value!r} but this machine has no CUDA device; accepted: cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(name, f"got {value!r} but this machine has {count} CUDA device(s); accepted: "
                              f"cuda:0 .. cuda:{count - 1}")
    elif device.type not in ("cpu", "mps", "xpu", "meta"):
        raise ConfigError(name, f"got {value!r}; accepted: cpu, cuda, cuda:N")


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(name: str, text: str) -> int:
    """``"512MiB"`` / ``"2GiB"`` / ``"1.5GB"`` / ``"4096B"`` -> bytes (a unit is required: a bare
    number was MiB in older command lines and bytes in the Python API)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(name, f"got {text!r}; accepted: a size with a unit such as 512MiB, 2GiB, 1.5GB or 4096B")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
