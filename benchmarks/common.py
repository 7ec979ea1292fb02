"""Helpers shared by the benchmark scripts: one JSON line per result."""

from __future__ import annotations

import json
import platform

import torch


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def emit(name: str, value: float, unit: str, anchor: float | None, anchor_name: str, device: str, **extra) -> None:
    """Print one result. ``ratio`` is value / anchor (for times and memory: < 1 means seekdeep uses less)."""
    record = {
        "name": name,
        "value": round(value, 6),
        "unit": unit,
        "anchor": anchor_name,
        "anchor_value": None if anchor is None else round(anchor, 6),
        "ratio": None if not anchor else round(value / anchor, 4),
        "device": device,
        **extra,
    }
    print(json.dumps(record), flush=True)


def cpu_capability_fields() -> dict:
    """The CPU class a CPU number belongs to: ATen's capability (``AVX2``, ``AVX512``, ...), the
    class the dsa kernel choice reads (capability + ``+BF16`` where oneDNN has native bf16), and
    any capability caps set in the environment (an emulated class, e.g. AVX2 on an AVX-512 host)."""
    import os

    from seekdeep.attention.cpu_kernels import cpu_class

    caps = {name: os.environ[name] for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if name in os.environ}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_class": cpu_class(),
            "capability_caps": caps or None}
