"""CPU kernel choice for dsa block mode: every kernel and precision forced by name, in bf16, against
the eager reference; the auto choice and its probe cache; the AVX2 decision in an emulated-AVX2 process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from seekdeep.attention import AttentionMask, AttentionSpec, cpu_kernels
from seekdeep.attention.dense import eager_attention
from seekdeep.attention.dsa import DynamicSparseAttention
from seekdeep.errors import ConfigError

B, H, HKV, D, C, BS = 2, 4, 2, 8, 32, 4
SCALE = D**-0.5
KERNELS = ["auto", "gather", "gather_fp32", "gather_sdpa"]


def make(kernel: str, dtype=torch.bfloat16, topk: int = 12) -> DynamicSparseAttention:
    torch.manual_seed(0)
    spec = AttentionSpec(C, H, HKV, D, D, {"block_size": BS, "topk": topk, "index_heads": 4, "block_kernel": kernel})
    return DynamicSparseAttention(spec).to(dtype)


def inputs(t: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((B, H, t, D), (B, HKV, t, D), (B, HKV, t, D), (B, t, C))]


def selected_reference(dsa, q, k, v, x, mask):
    """Eager fp32 attention restricted to the blocks the module selected (the selection itself is
    checked against an independent reference in test_block_sparse.py)."""
    with torch.no_grad():
        _, _, _, _, indices, valid, _ = dsa.block_selection(x, mask)
    nb = indices.shape[1]
    chosen = torch.zeros(B, nb, nb + 1, dtype=torch.bool)  # unused slots go to the extra column
    chosen = chosen.scatter(-1, torch.where(valid, indices, nb), True)[..., :nb]
    blocks_q, blocks_k = torch.arange(mask.q_offset, mask.k_len) // BS, torch.arange(mask.k_len) // BS
    allowed = mask.to_bool("cpu") & chosen[:, blocks_q][:, :, blocks_k][:, None]
    return eager_attention(q.float(), k.float(), v.float(), allowed, SCALE)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("t", [44, 42])  # whole blocks (block-row gather) and a partial last block
def test_bf16_kernels_match_fp32_reference(kernel, t):
    q, k, v, x = inputs(t)
    dsa = make(kernel).eval()
    mask = AttentionMask(t, t)
    with torch.no_grad():
        out = dsa(q, k, v, mask=mask, scale=SCALE, hidden_states=x)
    assert out.dtype == torch.bfloat16
    expected = {"gather": "gather", "gather_fp32": "gather_fp32", "gather_sdpa": "gather_sdpa", "auto": "gather_sdpa"}
    assert dsa.last_kernel == expected[kernel]
    torch.testing.assert_close(out.float(), selected_reference(dsa, q, k, v, x, mask), atol=3e-2, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_decode_rows_match_full_sequence(kernel):
    t, prefill = 30, 17
    q, k, v, x = inputs(t)
    dsa = make(kernel, topk=8).eval()
    with torch.no_grad():
        full = dsa(q, k, v, mask=AttentionMask(t, t), scale=SCALE, hidden_states=x)
        state: dict = {}
        dsa(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], mask=AttentionMask(prefill, prefill),
            scale=SCALE, hidden_states=x[:, :prefill], cache_state=state)
        for end in range(prefill + 1, t + 1):
            out = dsa(q[:, :, end - 1:end], k[:, :, :end], v[:, :, :end], mask=AttentionMask(1, end), scale=SCALE,
                      hidden_states=x[:, end - 1:end], cache_state=state)
            torch.testing.assert_close(out.float(), full[:, :, end - 1:end].float(), atol=3e-2, rtol=0)
    precision = "_fp32" if cpu_kernels.choose_precision(torch.bfloat16, 2, 8, D) == "fp32" else ""
    assert dsa.last_kernel == {"gather": "row_gather", "gather_fp32": "row_gather_fp32", "gather_sdpa": "row_gather_sdpa",
                               "auto": "row_gather" + precision}[kernel]


@pytest.mark.parametrize("kernel", ["gather", "gather_fp32", "auto"])
def test_bf16_training_gradients_match_fp32(kernel):
    """Gradients of q, k, v and of the indexer (straight-through term) in bf16 against the same
    module run in fp32: every path that trains."""
    t = 40
    grads = {}
    q, k, v, x = inputs(t)  # bf16 values, so both runs see the same inputs and weights
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [z.to(dtype).requires_grad_() for z in (q, k, v)]
        dsa = make(kernel).to(dtype).train()
        out = dsa(*leaves, mask=AttentionMask(t, t), scale=SCALE, hidden_states=x.to(dtype))
        assert out.dtype == dtype
        (out.float() * torch.linspace(-1, 1, D)).sum().backward()
        grads[dtype] = [z.grad.float() for z in leaves] + [dsa.index_q.weight.grad.float()]
    for got, want in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_fused_kernel_refuses_to_train():
    t = 24
    q, k, v, x = inputs(t, torch.float32)
    dsa = make("gather_sdpa", torch.float32).train()
    with pytest.raises(ConfigError) as err:
        dsa(q, k, v, mask=AttentionMask(t, t), scale=SCALE, hidden_states=x)
    assert err.value.field == "attention_options.block_kernel"


def test_auto_precision_rule_and_probe_cache():
    assert cpu_kernels.choose_precision(torch.float32, 64, 2048, 128) == "native"
    assert cpu_kernels.compute_dtype(torch.float32, "fp32", rows=64, keys=2048, head_dim=128) == torch.float32
    assert cpu_kernels.compute_dtype(torch.bfloat16, "fp32", rows=64, keys=2048, head_dim=128) == torch.float32
    assert cpu_kernels.compute_dtype(torch.bfloat16, "native", rows=64, keys=2048, head_dim=128) == torch.bfloat16
    with pytest.raises(ValueError, match="accepted"):
        cpu_kernels.compute_dtype(torch.bfloat16, "fp8", rows=64, keys=2048, head_dim=128)
    assert cpu_kernels.shape_bucket(48, 2000, 64) == cpu_kernels.shape_bucket(64, 2048, 64) == (64, 2048, 64)
    choice = cpu_kernels.choose_precision(torch.bfloat16, 2, 32, 16)  # decode-like rows: always measured
    assert choice in cpu_kernels.COMPUTE_CHOICES
    key = (cpu_kernels.cpu_class(), torch.bfloat16, (2, 32, 16))
    assert cpu_kernels.probed_choices()[key] == choice  # measured once, then read from the cache
    assert cpu_kernels.choose_precision(torch.bfloat16, 2, 30, 16) == choice
    gemm = cpu_kernels.choose_precision(torch.bfloat16, 64, 32, 16)
    if "+BF16" not in cpu_kernels.cpu_class():  # no native bf16 GEMM: fp32 without a probe
        assert gemm == "fp32" and (cpu_kernels.cpu_class(), torch.bfloat16, (64, 32, 16)) not in cpu_kernels.probed_choices()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATen's AVX2 capability is x86 only")
def test_emulated_avx2_host_computes_bf16_in_fp32():
    """With ATen and oneDNN capped at AVX2 (what an AVX2-only CPU gives), bf16 runs in fp32 tiles:
    the fused kernel for inference and the fp32 gather kernel (and fp32 indexer) for training."""
    code = (
        "import torch\n"
        "from seekdeep.attention import AttentionMask, AttentionSpec, cpu_kernels\n"
        "from seekdeep.attention.dsa import DynamicSparseAttention\n"
        "spec = AttentionSpec(32, 4, 2, 8, 8, {'block_size': 16, 'topk': 32})\n"  # 32 query rows per tile
        "dsa = DynamicSparseAttention(spec).to(torch.bfloat16)\n"
        "q, k, v, x = (torch.randn(1, 4, 80, 8), torch.randn(1, 2, 80, 8), torch.randn(1, 2, 80, 8), torch.randn(1, 80, 32))\n"
        "q, k, v, x = (z.bfloat16() for z in (q, k, v, x))\n"
        "with torch.no_grad():\n"
        "    dsa(q, k, v, mask=AttentionMask(80, 80), scale=0.35, hidden_states=x)\n"
        "infer = dsa.last_kernel\n"
        "dsa(q.requires_grad_(), k, v, mask=AttentionMask(80, 80), scale=0.35, hidden_states=x).sum().backward()\n"
        "print(cpu_kernels.cpu_class(), cpu_kernels.choose_precision(torch.bfloat16, 64, 2048, 128), infer, "
        "dsa.last_kernel, len(cpu_kernels.probed_choices()))\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AVX2", "fp32", "gather_sdpa", "gather_fp32", "0"]


def test_training_kernel_chunks_agree(monkeypatch):
    """The recomputing training kernel gives the same output and gradients whether a chunk
    holds every query block or one (tiny CHUNK_ELEMENTS), with GQA, padding and an offset-free call."""
    from seekdeep.attention import block_sparse as bsa

    t = 30
    q, k, v, x = inputs(t, torch.float32)
    mask = AttentionMask(t, t, key_valid=torch.stack([torch.arange(t) >= p for p in (0, 5)]))
    results = []
    for chunk in (bsa.CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(bsa, "CHUNK_ELEMENTS", chunk)
        dsa = make("gather", torch.float32, topk=8).train()
        leaves = [z.clone().requires_grad_() for z in (q, k, v)]
        out = dsa(*leaves, mask=mask, scale=SCALE, hidden_states=x)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        results.append([out.detach()] + [z.grad for z in leaves] + [dsa.index_q.weight.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
