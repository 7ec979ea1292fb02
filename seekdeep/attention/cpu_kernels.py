"""Which precision the sparse attention kernels compute in, chosen by what the CPU does fast.

The gather kernels of :mod:`seekdeep.attention.block_sparse` spend their time in batched
matmuls over gathered key / value tiles. In fp32 those run on MKL's fast kernels on every x86
class. In bf16 (or fp16) they are fast only where oneDNN has a native kernel (AVX-512 with
BF16 / AMX): on an AVX2-only CPU a bf16 ``bmm`` falls to a generic loop some 40x slower than
fp32, which made ``dsa`` an order of magnitude slower than dense SDPA there. SDPA's CPU kernel
avoids this by converting its tiles to fp32; the sparse kernels do the same when the host
lacks a fast low-precision matmul, and return the requested dtype.

Decision (:func:`compute_dtype`), cached per (CPU class, dtype, shape bucket):

* fp32 / fp64 inputs compute in their own dtype;
* bf16 / fp16 tiles of at least ``MIN_GEMM_ROWS`` query rows on a host where oneDNN has no
  kernel for that dtype (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` / ``..._fp16_...``
  False, e.g. every AVX2-only CPU): fp32, no measurement needed;
* otherwise (a host with native kernels, or a decode step's one or two rows per head, where the
  matmul is bound by reading the tiles and converting them can cost more than it saves: measured
  on an emulated AVX2 host, 84 ms native vs 224 ms fp32 per 16K decode step under load) a one-time
  probe times the kernel's inner loop (two batched matmuls and a softmax on a tile of the
  bucket's shape) both ways and keeps the faster.

The decode kernel that reads blocks in place (:mod:`seekdeep.attention.block_decode`) has its
own probe (``kernel="blocks"``): per-run matmuls on strided cache views natively against
converting each run into an fp32 buffer first; it times that kernel's own inner loop.

The kernels also take ``native`` or ``fp32`` by name (``block_kernel`` ``gather`` /
``gather_fp32``), so every path can be forced and tested on any host.
"""

from __future__ import annotations

import threading
import time

import torch

#: precisions the gather kernels accept: "native" (the input dtype) or "fp32".
COMPUTE_CHOICES = ("native", "fp32")

_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: query rows per tile from which a matmul without a native low-precision kernel is compute
#: bound (a GEMM, not a GEMV): the capability alone then decides.
MIN_GEMM_ROWS = 16
_LOCK = threading.Lock()
#: (cpu class, dtype, bucket[, kernel]) -> "native" | "fp32"; probed once per key and process.
_CHOICES: dict[tuple, str] = {}


def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN has a native kernel for ``dtype`` on this CPU (honours ONEDNN_MAX_CPU_ISA)."""
    ops = torch.ops.mkldnn
    try:
        if dtype == torch.bfloat16:
            return bool(ops._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(ops._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no native low-precision matmul
        return False
    return False


def cpu_class() -> str:
    """The CPU class the kernel choice depends on: ATen's capability (``AVX2``, ``AVX512``, ...)
    plus ``+BF16`` / ``+FP16`` where oneDNN has native kernels for those dtypes."""
    name = torch.backends.cpu.get_cpu_capability()
    if _onednn_supports(torch.bfloat16):
        name += "+BF16"
    if _onednn_supports(torch.float16):
        name += "+FP16"
    return name


def shape_bucket(rows: int, keys: int, head_dim: int) -> tuple[int, int, int]:
    """Rows per tile and keys per row rounded up to powers of two (the head dim is kept): one
    probe covers every call whose matmuls have about the same shape."""

    def up(x: int) -> int:
        return 1 << max(0, (max(x, 1) - 1).bit_length())

    return up(rows), up(keys), head_dim


def _probe(dtype: torch.dtype, bucket: tuple[int, int, int], repeats: int = 3) -> str:
    """Time the gather kernels' inner loop on a tile of ``bucket`` natively and in fp32; the
    fp32 side includes converting the tiles, as the kernel does. Interleaved, best of
    ``repeats``, so a busy neighbour slows both sides alike."""
    rows, keys, d = bucket
    batch = max(1, min(8, (1 << 21) // max(1, rows * keys)))  # ~2M score elements: a few ms where fast
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, rows, d, generator=g).to(dtype)
    k = torch.randn(batch, keys, d, generator=g).to(dtype)
    v = torch.randn(batch, keys, d, generator=g).to(dtype)

    def native():
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)).float(), -1).to(dtype)
        return torch.bmm(p, v)

    def fp32():
        p = torch.softmax(torch.bmm(q.float(), k.float().transpose(1, 2)), -1)
        return torch.bmm(p, v.float()).to(dtype)

    best = {"native": float("inf"), "fp32": float("inf")}
    with torch.no_grad():
        native(), fp32()  # warm-up (oneDNN primitive creation, allocator)
        for _ in range(repeats):
            for name, fn in (("native", native), ("fp32", fp32)):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return "native" if best["native"] <= best["fp32"] else "fp32"


def _probe_blocks(dtype: torch.dtype, bucket: tuple[int, int, int], repeats: int = 3) -> str:
    """Time the in-place block decode kernel's inner loop (:mod:`seekdeep.attention.block_decode`)
    on ``keys`` keys in 64-key runs of a larger cache, natively and converting each run to fp32."""
    from seekdeep.attention import block_decode

    rows, keys, d = bucket
    heads, run = 8, 64
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, heads, 2 * keys, d, generator=g).to(dtype)
    q = torch.randn(heads, 1, rows, d, generator=g)
    pieces = [(2 * i * run, (2 * i + 1) * run) for i in range(max(1, keys // run))]  # every other run
    ways = {}
    for name, cd in (("native", dtype), ("fp32", torch.float32)):
        convert = (block_decode._Converter(cd, "probe_k"), block_decode._Converter(cd, "probe_v"))
        ways[name] = (q.to(cd), convert)

    def call(name):
        qg, convert = ways[name]
        return block_decode._attend_pieces(qg, cache[0], cache[1], pieces, q_slots=range(4 * keys, 4 * keys + rows),
                                           key_valid=None, window=None, convert=convert)

    best = {"native": float("inf"), "fp32": float("inf")}
    with torch.no_grad():
        call("native"), call("fp32")
        for _ in range(repeats):
            for name in best:
                t0 = time.perf_counter()
                call(name)
                best[name] = min(best[name], time.perf_counter() - t0)
    return "native" if best["native"] <= best["fp32"] else "fp32"


#: the kernels :func:`choose_precision` knows: the gather kernels and the in-place block decode kernel.
PROBED_KERNELS = ("gather", "blocks")


def choose_precision(dtype: torch.dtype, rows: int, keys: int, head_dim: int, kernel: str = "gather") -> str:
    """"native" or "fp32" for a CPU kernel (``kernel``: "gather" or "blocks") whose tiles are
    ``rows`` x ``keys`` in ``dtype`` (see the module docstring). Cached per (CPU class, dtype,
    shape bucket; and the kernel, for "blocks")."""
    if kernel not in PROBED_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; accepted: {', '.join(PROBED_KERNELS)}")
    if dtype not in _LOW_PRECISION:
        return "native"
    if not _onednn_supports(dtype) and rows >= MIN_GEMM_ROWS:
        return "fp32"  # no native kernel on this CPU class: the generic GEMM loop is never the faster
    key = (cpu_class(), dtype, shape_bucket(rows, keys, head_dim))
    if kernel != "gather":
        key += (kernel,)
    with _LOCK:
        choice = _CHOICES.get(key)
        if choice is None:
            choice = _CHOICES[key] = (_probe if kernel == "gather" else _probe_blocks)(dtype, key[2])
    return choice


def compute_dtype(dtype: torch.dtype, precision: str, *, rows: int, keys: int, head_dim: int,
                  kernel: str = "gather") -> torch.dtype:
    """The dtype a CPU kernel computes in for inputs of ``dtype``: ``precision`` is
    "native", "fp32" or "auto" (:func:`choose_precision` for ``kernel``)."""
    if precision == "auto":
        precision = choose_precision(dtype, rows, keys, head_dim, kernel)
    if precision not in COMPUTE_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; accepted: auto, {', '.join(COMPUTE_CHOICES)}")
    return torch.float32 if precision == "fp32" and dtype in _LOW_PRECISION else dtype


def probed_choices() -> dict[tuple, str]:
    """A copy of the probe cache (for benchmarks and tests)."""
    with _LOCK:
        return dict(_CHOICES)


def clear_probe_cache() -> None:
    with _LOCK:
        _CHOICES.clear()
