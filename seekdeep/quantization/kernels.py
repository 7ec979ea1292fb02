"""Quantisation arithmetic and the integer matmul kernels, with a float reference for each.

Weights are stored as gpt-fast and torchao store them:

- int8, symmetric per output channel: ``w ~= q * scale[n]``, ``q`` int8 ``(N, K)``.
- int4, group-wise along ``K``: ``w ~= (q - 8) * scale[g, n] + zero[g, n]``, ``q`` in ``[0, 15]``,
  ``scales_and_zeros`` ``(K / group, N, 2)`` -- the layout torch's tinygemm kernels read.

Kernels (one function per product, each with a reference that dequantises the weight):

================  ===========================================  ==================================
product           CPU                                          CUDA
================  ===========================================  ==================================
int8 x int8       ``torch._int_mm`` (int32 accumulation);      ``torch._int_mm`` (rows padded to
                  static: fbgemm's prepacked int8 linear        17, K and N multiples of 8)
                  where the CPU has VNNI (same int32 sums)
int8 weight-only  ``torch._weight_int8pack_mm`` (bf16 act.)    same op; dequantised fallback
int4 weight-only  ``torch._weight_int4pack_mm_for_cpu`` (bf16)  ``torch._weight_int4pack_mm``
================  ===========================================  ==================================

The int8/int4 weight-only kernels run with bf16 activations: with fp32 activations torch's
CPU kernels are 10-100x slower than the fp32 matmul they replace. Outputs are cast back to the
input dtype.

int4 weights have a portable layout (``uint8 (N, K/2)``, two values per byte, high nibble
first; what checkpoints hold and what ``torch._convert_weight_to_int4pack`` takes) and a
kernel layout per device, made by torch's packing ops. :func:`unpack_int4_cpu_layout` inverts
the CPU packing; :func:`unpack_int4_with_kernel` recovers the values of any layout through the
kernel itself (a matmul with the identity), used where the layout is not known.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)
_EPS = 1e-8
#: row-block widths torch's CPU int4 packing uses: 64 where its kernels use AVX-512, 32 on AVX2
_CPU_INT4_BLOCK_CANDIDATES = (64, 32)
_CPU_INT4_BLOCK_N: int | None = None
_CUDA_INNER_K_TILES = 8
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------- quantise


def quantize_int8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: ``(q int8 (N, K), scale fp32 (N,))`` with ``weight ~= q * scale[:, None]``.

    per_channel=False uses one scale for the whole tensor (repeated N times, so every kernel
    sees the same shapes)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    scale = (amax / 127.0).clamp(min=_EPS)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int4 along the input dimension.

    Returns ``(q, scales_and_zeros)``: ``q`` int32 (N, K) in [0, 15] and ``scales_and_zeros``
    bf16 (K / group_size, N, 2) with ``w ~= (q - 8) * scale + zero``. Asymmetric groups map
    [min, max] onto [0, 15]; symmetric groups use zero = 0 and scale = absmax / 7. The scale and
    zero are rounded to bf16 (the kernels' dtype) before ``q`` is computed, so the rounding of
    the parameters is accounted for."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    if symmetric:
        scale = (w.abs().amax(dim=-1) / 7.0).clamp(min=_EPS).bfloat16().float()  # (N, G)
        zero = torch.zeros_like(scale)
    else:
        wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((wmax - wmin) / 15.0).clamp(min=_EPS).bfloat16().float()
        zero = (wmin + 8.0 * scale).bfloat16().float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8.0).clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().bfloat16()  # (G, N, 2)
    return q.reshape(n, k), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) float32 from q (N, K) in [0, 15] and scales_and_zeros (K/g, N, 2)."""
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, G, 2)
    scale = sz[..., 0].repeat_interleave(group_size, dim=1)  # (N, K)
    zero = sz[..., 1].repeat_interleave(group_size, dim=1)
    return (q.float() - 8.0) * scale + zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Portable layout: (N, K) values in [0, 15] -> uint8 (N, K/2), high nibble first."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, K/2) -> int32 (N, K)."""
    high, low = (packed >> 4).to(torch.int32), (packed & 0xF).to(torch.int32)
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


def unpack_int4_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the portable layout: (M,) ids -> int32 (M, K)."""
    return unpack_int4(packed.index_select(0, rows))


# ----------------------------------------------------------------------------- int4 kernel layouts


def int4_kernel_layout(device: torch.device) -> str | None:
    """The packed layout torch's int4 kernel uses on ``device`` ('cpu' / 'cuda'), None if none."""
    if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    if device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "cuda"
    return None


def int4_kernel_supports(out_features: int, in_features: int, group_size: int, layout: str | None) -> bool:
    if layout == "cpu":
        return out_features % 16 == 0 and in_features % group_size == 0 and group_size in INT4_GROUP_SIZES
    if layout == "cuda":
        return out_features % 8 == 0 and in_features % (_CUDA_INNER_K_TILES * 16) == 0 and group_size in INT4_GROUP_SIZES
    return False


def pack_int4_for_kernel(portable: torch.Tensor, layout: str) -> torch.Tensor:
    """Portable uint8 (N, K/2) -> the kernel layout of ``layout`` (on the tensor's device)."""
    if layout == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(portable).contiguous(), 1)
    if layout == "cuda":
        return torch._convert_weight_to_int4pack(portable.contiguous(), _CUDA_INNER_K_TILES)
    raise ValueError(f"unknown int4 layout {layout!r}")


def cpu_int4_block_n() -> int:
    """The row-block width of torch's CPU int4 layout on this machine, found once by packing a
    probe whose every row is distinct and reading it back with each candidate width. Raises
    RuntimeError when none reproduces it (callers fall back to recovering the values through
    the kernel)."""
    global _CPU_INT4_BLOCK_N
    if _CPU_INT4_BLOCK_N is None:  # probed once; 0 records that no candidate fits
        rows = torch.arange(64, dtype=torch.int32)
        probe = torch.stack([rows % 16, rows // 16, (rows * 7) % 16, 15 - rows % 16], dim=1)  # (64, 4), rows distinct
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
        _CPU_INT4_BLOCK_N = next((width for width in _CPU_INT4_BLOCK_CANDIDATES
                                  if torch.equal(_unpack_cpu_blocks(packed, 64, 4, width), probe)), 0)
    if not _CPU_INT4_BLOCK_N:
        raise RuntimeError("torch's CPU int4 layout is not one seekdeep can read directly")
    return _CPU_INT4_BLOCK_N


def unpack_int4_cpu_layout(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Values (N, K) int32 from torch's CPU int4 layout (``_convert_weight_to_int4pack_for_cpu``).

    That layout takes the rows in blocks of B (:func:`cpu_int4_block_n`: 64 with AVX-512, 32 on
    AVX2): for each k, byte j of a full block holds rows j (low nibble) and j + B/2 (high
    nibble); the last, partial block pairs neighbouring rows."""
    return _unpack_cpu_blocks(packed, out_features, in_features, cpu_int4_block_n())


def _unpack_cpu_blocks(packed: torch.Tensor, n: int, k: int, width: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    full = n // width * width
    parts = []
    if full:
        blocks = flat[: full * k // 2].view(full // width, k, width // 2)  # (NB, K, B/2)
        rows = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # (NB, K, B): rows j and j + B/2
        parts.append(rows.permute(0, 2, 1).reshape(full, k))
    tail = n - full
    if tail:
        block = flat[full * k // 2 :].view(k, tail // 2)  # (K, tail/2)
        rows = torch.stack([block & 0xF, block >> 4], dim=-1).reshape(k, tail)  # neighbouring rows
        parts.append(rows.t())
    return torch.cat(parts, dim=0).to(torch.int32)


def int4_cpu_layout_rows(packed: torch.Tensor, out_features: int, in_features: int, rows: torch.Tensor) -> torch.Tensor:
    """Selected rows (M,) of the CPU int4 layout -> int32 (M, K), without unpacking the rest."""
    n, k = out_features, in_features
    width = cpu_int4_block_n()
    half = width // 2
    flat = packed.reshape(-1)
    full = n // width * width
    rows = rows.long()
    ks = torch.arange(k, device=packed.device)
    in_full = rows < full
    block, r = rows // width, rows % width
    full_index = block[:, None] * (k * half) + ks[None] * half + (r % half)[:, None]
    full_shift = torch.where(r >= half, 4, 0)
    tail = max(n - full, 2)
    t = rows - full
    tail_index = full * k // 2 + ks[None] * (tail // 2) + (t // 2).clamp(min=0)[:, None]
    tail_shift = torch.where(t % 2 == 1, 4, 0)
    index = torch.where(in_full[:, None], full_index, tail_index)  # (M, K)
    shift = torch.where(in_full, full_shift, tail_shift)[:, None]
    return ((flat[index].to(torch.int32) >> shift) & 0xF)


def unpack_int4_with_kernel(packed: torch.Tensor, layout: str, out_features: int, in_features: int,
                            group_size: int) -> torch.Tensor:
    """Values (N, K) int32 of any kernel layout: multiply the identity by the weight with
    scale 1 and zero 8, so the kernel returns the stored values exactly (they are small
    integers, exact in bf16). Costs one (K, K) x (K, N) matmul."""
    n, k = out_features, in_features
    eye = torch.eye(k, dtype=torch.bfloat16, device=packed.device)
    ones = torch.ones(k // group_size, n, dtype=torch.bfloat16, device=packed.device)
    unit = torch.stack([ones, torch.full_like(ones, 8.0)], dim=-1)  # (G, N, 2): scale 1, zero 8
    values = _int4_kernel_call(eye, packed, layout, group_size, unit)  # (K, N) = q^T
    return values.t().round().to(torch.int32)


def _int4_kernel_call(x_bf16: torch.Tensor, packed: torch.Tensor, layout: str, group_size: int,
                      scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if layout == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x_bf16, packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm(x_bf16, packed, group_size, scales_and_zeros)


# ----------------------------------------------------------------------------- kernels


def int8_matmul(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """``x_int8 (M, K) @ w_int8 (N, K)^T`` -> int32 (M, N), exact.

    CPU: ``torch._int_mm`` on the transposed view of the row-major weight (the fast case).
    CUDA: ``torch._int_mm`` needs M > 16 and K, N multiples of 8: small M is zero-padded; other
    shapes use an exact int32 reference."""
    m, k = x_int8.shape
    n = w_int8.shape[0]
    if x_int8.device.type == "cuda":
        if k % 8 or n % 8:
            return int8_matmul_reference(x_int8, w_int8)
        if m <= 16:
            padded = torch.zeros(17, k, dtype=torch.int8, device=x_int8.device)
            padded[:m] = x_int8
            return torch._int_mm(padded, w_int8.t())[:m]
        return torch._int_mm(x_int8, w_int8.t())
    if x_int8.device.type == "cpu":
        return torch._int_mm(x_int8, w_int8.t())
    return int8_matmul_reference(x_int8, w_int8)


def int8_matmul_reference(x_int8: torch.Tensor, w_int8: torch.Tensor) -> torch.Tensor:
    """Exact int32 product without an integer GEMM (float64 holds every partial sum exactly
    for K < 2^37 / 127^2)."""
    return (x_int8.double() @ w_int8.double().t()).to(torch.int32)


def quantize_activations_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: (M, K) float -> (q int8 (M, K), scale fp32 (M, 1))."""
    x = x2d.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


def int8_dynamic_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 with per-token activation scales computed now. x: (..., K) -> (..., N) in x.dtype."""
    shape = x.shape
    x_q, x_scale = quantize_activations_per_token(x.reshape(-1, shape[-1]))  # (M, K), (M, 1)
    acc = int8_matmul(x_q, w_int8)  # (M, N) int32
    y = acc * x_scale * w_scale  # (M, N) fp32
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*shape[:-1], w_int8.shape[0])


def int8_dynamic_linear_reference(x, w_int8, w_scale, bias):
    shape = x.shape
    x_q, x_scale = quantize_activations_per_token(x.reshape(-1, shape[-1]))
    y = (x_q.float() * x_scale) @ dequantize_int8(w_int8, w_scale).t()
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*shape[:-1], w_int8.shape[0])


def quantize_activations_static(x2d: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """int8 with a fixed (calibrated) per-tensor scale and zero point."""
    x_q = torch.round(x2d.float() / scale)
    if zero_point:
        x_q += zero_point
    return x_q.clamp_(-128, 127).to(torch.int8)


def int8_static_linear(x: torch.Tensor, w_int8: torch.Tensor, out_scale: torch.Tensor, in_scale: float,
                       in_zero_point: int, w_sum: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 with a calibrated activation scale. ``x ~= (x_q - zp) * s_x``, so
    ``y = s_x * s_w * (x_q @ w_q^T - zp * sum_k w_q)``; ``out_scale`` (N,) is ``s_x * s_w`` and
    ``w_sum`` (N,) int32 the row sum of ``w_q``."""
    shape = x.shape
    x_q = quantize_activations_static(x.reshape(-1, shape[-1]), in_scale, in_zero_point)  # (M, K)
    acc = int8_matmul(x_q, w_int8)  # (M, N) int32
    if in_zero_point:
        acc = acc - in_zero_point * w_sum
    y = acc * out_scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*shape[:-1], w_int8.shape[0])


# fbgemm's static int8 linear: one op that quantises the fp32 input with the calibrated scale,
# runs the int8 GEMM on a prepacked weight and dequantises. On CPUs with VNNI it gives the same
# int32 sums as torch._int_mm and streams the weight faster (prepacked layout); without VNNI,
# fbgemm's u8 x s8 multiply can saturate int16 partial sums, so it is not used there. It rests
# on torch's quantized-tensor API (deprecated): any failure falls back to torch._int_mm.


def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


_FBGEMM: bool | None = None


def fbgemm_int8_available() -> bool:
    global _FBGEMM
    if _FBGEMM is None:
        _FBGEMM = ("fbgemm" in torch.backends.quantized.supported_engines and _cpu_has_vnni()
                   and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"))
    return _FBGEMM


def fbgemm_pack_int8(w_int8: torch.Tensor, w_scale: torch.Tensor):
    """Prepacked fbgemm weight from int8 (N, K) + per-channel scales, or None when unavailable."""
    if not fbgemm_int8_available() or w_int8.device.type != "cpu":
        return None
    try:
        zeros = torch.zeros(w_int8.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized-tensor API is deprecated; the fallback covers its removal
            q = torch._make_per_channel_quantized_tensor(w_int8, w_scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(q, None)
    except Exception:  # noqa: BLE001 -- any failure of the optional fast path means: use torch._int_mm
        return None


def fbgemm_unpack_int8(packed) -> torch.Tensor:
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def int8_static_linear_fbgemm(x: torch.Tensor, packed, in_scale: float, in_zero_point: int,
                              bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The fbgemm version of :func:`int8_static_linear` (fbgemm takes uint8 inputs: zero point + 128)."""
    shape = x.shape
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x.reshape(-1, shape[-1]).float(), in_scale, in_zero_point + 128, packed)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*shape[:-1], out_features)


def int8_static_linear_reference(x, w_int8, w_scale, in_scale, in_zero_point, bias):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    x_q = (torch.round(x2 / in_scale) + in_zero_point).clamp(-128, 127)
    y = ((x_q - in_zero_point) * in_scale) @ dequantize_int8(w_int8, w_scale).t()
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*shape[:-1], w_int8.shape[0])


def int8_weight_only_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale_bf16: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """``torch._weight_int8pack_mm`` with bf16 activations (CPU; CUDA when torch has it)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    try:
        y = torch._weight_int8pack_mm(x2, w_int8, w_scale_bf16)
    except (RuntimeError, NotImplementedError):  # no kernel for this device in this torch
        _warn_once(f"int8pack-{x.device.type}", f"torch._weight_int8pack_mm is unavailable on {x.device.type}; "
                   "dequantising the int8 weight on every call instead")
        y = x2 @ (w_int8.to(torch.bfloat16) * w_scale_bf16[:, None]).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).view(*shape[:-1], w_int8.shape[0])


def int8_weight_only_linear_reference(x, w_int8, w_scale, bias):
    y = F.linear(x.float(), dequantize_int8(w_int8, w_scale), None if bias is None else bias.float())
    return y.to(x.dtype)


def int4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, layout: str, group_size: int,
                            scales_and_zeros_bf16: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """tinygemm int4 with bf16 activations; ``layout`` names the packing of ``packed``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = _int4_kernel_call(x2, packed, layout, group_size, scales_and_zeros_bf16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).view(*shape[:-1], out_features)


def int4_weight_only_linear_reference(x, q, scales_and_zeros, group_size, bias):
    """Float reference (and the fallback where no kernel applies): dequantise, then matmul."""
    w = dequantize_int4(q, scales_and_zeros, group_size)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
