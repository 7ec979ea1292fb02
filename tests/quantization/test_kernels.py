"""Every kernel against its float reference, with error bounds from the quantisation grid.

CUDA cases run where a GPU exists (the same assertions as on CPU); on a CPU-only machine
they are skipped, and the CPU kernels are checked against the dequantising fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekdeep.quantization import kernels as K
from seekdeep.quantization.config import LayerScheme
from seekdeep.quantization.modules import Int4WeightOnlyLinear

from quant_helpers import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _weights(n=96, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(5, k, generator=g)


def test_int8_quantisation_error_is_within_half_a_step():
    w, _ = _weights()
    q, scale = K.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    err = (K.dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())
    q_t, scale_t = K.quantize_int8(w, per_channel=False)
    assert bool((scale_t == scale_t[0]).all()) and float(scale_t[0]) == pytest.approx(float(w.abs().max()) / 127)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_quantisation_error_is_within_half_a_step(symmetric, group):
    w, _ = _weights()
    q, sz = K.quantize_int4(w, group, symmetric)
    assert int(q.min()) >= 0 and int(q.max()) <= 15 and sz.shape == (256 // group, 96, 2) and sz.dtype == torch.bfloat16
    scale = sz[..., 0].float().t().repeat_interleave(group, dim=1)  # (N, K)
    err = (K.dequantize_int4(q, sz, group) - w).abs()
    # half a step, plus the bf16 rounding of the zero point for asymmetric groups
    slack = 0 if symmetric else sz[..., 1].float().abs().t().repeat_interleave(group, dim=1) * 2**-8
    assert bool((err <= scale / 2 + slack + 1e-6).all())
    if symmetric:
        assert bool((sz[..., 1] == 0).all())


def test_portable_int4_pack_round_trip():
    q = torch.randint(0, 16, (48, 64), dtype=torch.int32)
    packed = K.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32)
    assert torch.equal(K.unpack_int4(packed), q)
    rows = torch.tensor([3, 0, 47, 3])
    assert torch.equal(K.unpack_int4_rows(packed, rows), q[rows])


def test_cpu_int4_block_width_is_found_for_this_machine():
    # 64 rows per block where torch's int4 CPU kernels use AVX-512, 32 on AVX2-only machines
    assert K.cpu_int4_block_n() in (64, 32)


@pytest.mark.parametrize("n", [16, 48, 64, 96, 128, 208])
def test_cpu_int4_layout_inverse_and_row_gather(n):
    k = 128
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = K.pack_int4_for_kernel(K.pack_int4(q), "cpu")
    assert torch.equal(K.unpack_int4_cpu_layout(packed, n, k), q)
    rows = torch.tensor([r for r in (0, n - 1, n // 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130) if r < n])
    assert torch.equal(K.int4_cpu_layout_rows(packed, n, k, rows).to(torch.int32), q[rows])
    assert torch.equal(K.unpack_int4_with_kernel(packed, "cpu", n, k, 32), q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_matmul_is_exact(device, m):
    x = torch.randint(-128, 128, (m, 256), dtype=torch.int8, device=device)
    w = torch.randint(-127, 128, (96, 256), dtype=torch.int8, device=device)
    expected = (x.long() @ w.long().t()).to(torch.int32)
    assert torch.equal(K.int8_matmul(x, w), expected)
    assert torch.equal(K.int8_matmul_reference(x.cpu(), w.cpu()), expected.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_dynamic_linear(device):
    w, x = _weights()
    w, x, bias = w.to(device), x.to(device).view(1, 5, 256), torch.randn(96, device=device)
    q, scale = K.quantize_int8(w)
    out = K.int8_dynamic_linear(x, q, scale, bias)
    assert out.shape == (1, 5, 96) and out.dtype == torch.float32
    # the integer kernel equals the dequantised reference up to fp32 rounding
    assert rel_err(out, K.int8_dynamic_linear_reference(x, q, scale, bias)) < 1e-6
    # and is within int8 error of the float layer (two 8-bit roundings: < 2%)
    assert rel_err(out, F.linear(x, w, bias)) < 0.02


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_point", [0, 9])
def test_int8_static_linear(device, zero_point):
    w, x = _weights()
    w, x = w.to(device), x.to(device)
    q, scale = K.quantize_int8(w)
    in_scale = float(x.abs().max()) / 110  # the range holds every value, even with the zero point shift
    w_sum = q.sum(dim=1, dtype=torch.int32)
    out = K.int8_static_linear(x, q, scale * in_scale, in_scale, zero_point, w_sum, None)
    reference = K.int8_static_linear_reference(x, q, scale, in_scale, zero_point, None)
    assert rel_err(out, reference) < 1e-6
    assert rel_err(out, F.linear(x, w)) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_int8_weight_only_linear(device):
    w, x = _weights()
    w, x = w.to(device), x.to(device)
    q, scale = K.quantize_int8(w)
    out = K.int8_weight_only_linear(x, q, scale.bfloat16(), None)
    assert out.dtype == torch.float32
    reference = K.int8_weight_only_linear_reference(x, q, scale.bfloat16().float(), None)
    assert rel_err(out, reference) < 1e-2  # bf16 activations and accumulation
    assert rel_err(out, F.linear(x, w)) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_weight_only_linear(device, group):
    w, x = _weights()
    w, x = w.to(device), x.to(device)
    q, sz = K.quantize_int4(w, group)
    layout = K.int4_kernel_layout(torch.device(device))
    packed = K.pack_int4_for_kernel(K.pack_int4(q), layout)
    out = K.int4_weight_only_linear(x, packed, layout, group, sz, None, 96)
    reference = K.int4_weight_only_linear_reference(x, q, sz, group, None)
    assert rel_err(out, reference) < 1e-2  # bf16 activations
    # int4 with 16 levels per group: a few percent against the float layer
    assert rel_err(out, F.linear(x, w)) < 0.12


def test_int4_module_kernel_and_dequantising_fallback_agree():
    linear = torch.nn.Linear(256, 96, bias=True)
    scheme = LayerScheme("int4_weight_only", group_size=64, symmetric=False)
    fast = Int4WeightOnlyLinear.empty(linear, scheme)
    fast.load_state_dict(Int4WeightOnlyLinear.quantize_weights(linear, scheme), assign=True)
    assert fast.layout == "cpu"
    slow = Int4WeightOnlyLinear.empty(linear, scheme)
    slow.load_state_dict(fast.state_dict(), assign=True)
    slow._to_storage_layout()  # what a device without a kernel keeps
    assert slow.layout == "portable"
    x = torch.randn(3, 4, 256)
    assert rel_err(fast(x), slow(x)) < 1e-2
    assert torch.equal(fast.state_dict()["weight_int4"], slow.state_dict()["weight_int4"])
    assert torch.allclose(fast.dequantize(), slow.dequantize())
    rows = torch.tensor([5, 0, 95])
    assert torch.equal(fast.weight_rows(rows), slow.weight_rows(rows))


def test_int4_module_survives_device_and_dtype_moves():
    linear = torch.nn.Linear(128, 64, bias=False)
    scheme = LayerScheme("int4_weight_only", group_size=32)
    module = Int4WeightOnlyLinear.empty(linear, scheme)
    module.load_state_dict(Int4WeightOnlyLinear.quantize_weights(linear, scheme), assign=True)
    before = module.dequantize()
    module.to(torch.bfloat16).to("cpu").float()
    assert module.layout == "cpu" and module.scales_and_zeros.dtype == torch.bfloat16
    assert torch.equal(module.dequantize(), before)


@pytest.mark.parametrize("zero_point", [0, -7])
def test_static_module_fbgemm_and_int_mm_paths_agree(zero_point):
    from seekdeep.quantization.modules import Int8StaticLinear

    linear = torch.nn.Linear(256, 96, bias=True)
    scheme = LayerScheme("int8_static")
    state = Int8StaticLinear.quantize_weights(linear, scheme, (0.02, zero_point))
    fast = Int8StaticLinear.empty(linear, scheme)
    fast.load_state_dict(state, assign=True)
    plain = Int8StaticLinear.empty(linear, scheme)
    plain.load_state_dict(state, assign=True)
    plain._to_storage_layout()
    plain._packed = None  # force the torch._int_mm path
    plain.layout = "plain"
    plain._out_scale = plain.weight_scale * plain._scale
    plain._w_sum = plain.weight_int8.sum(dim=1, dtype=torch.int32) if zero_point else None
    x = torch.randn(3, 5, 256)
    expected = K.int8_static_linear_reference(x, state["weight_int8"], state["weight_scale"], 0.02, zero_point, linear.bias)
    assert rel_err(plain(x), expected) < 1e-6
    if not K.fbgemm_int8_available():
        pytest.skip("fbgemm's int8 kernel is not used on this CPU (no VNNI)")
    assert fast.layout == "fbgemm"
    assert rel_err(fast(x), expected) < 1e-6  # the same int32 sums
    assert torch.equal(fast.state_dict()["weight_int8"], state["weight_int8"])  # the checkpoint holds int8, not fbgemm's packing
    copied = __import__("copy").deepcopy(fast)
    assert torch.equal(copied(x), fast(x))
