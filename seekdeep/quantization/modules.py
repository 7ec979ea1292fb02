"""Quantised drop-in replacements for ``nn.Linear`` / ``nn.Embedding``.

Each class has three parts, as gpt-fast's ``QuantHandler`` splits them:

- ``quantize_weights(module, scheme, ...)``: the offline step, a float module -> the new
  tensors (a local state dict);
- ``empty(module, scheme)``: a module with the right buffers and no data, built on the meta
  device when a model is converted or loaded;
- ``forward``: the integer kernel of :mod:`seekdeep.quantization.kernels`.

State lives in buffers (the checkpoint keys), never in parameters: these modules run
inference. After a load or a ``.to()`` the buffers are brought back to the dtypes the kernels
need (``_canonical``) and derived data is rebuilt (``_finalize``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.quantization import kernels as K
from seekdeep.quantization.config import LayerScheme


class QuantizedModule(nn.Module):
    #: buffer name -> dtype it is kept in whatever the model is cast to
    _canonical: dict[str, torch.dtype] = {}

    def _finalize(self) -> None:
        for name, dtype in self._canonical.items():
            tensor = getattr(self, name)
            if tensor is not None and tensor.dtype != dtype:
                setattr(self, name, tensor.to(dtype))
        for name, tensor in self._buffers.items():
            # Tensors read from a safetensors file can sit at any offset; torch's CPU int8 / int4
            # kernels crash on weights that are not 64-byte aligned (what torch allocates).
            if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                self._buffers[name] = tensor.clone()

    def _to_storage_layout(self) -> None:
        """Undo device-specific packing before buffers are moved or replaced."""

    def _apply(self, fn, recurse=True):
        self._to_storage_layout()
        super()._apply(fn, recurse)
        self._finalize()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._to_storage_layout()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._finalize()


def _empty_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else torch.empty(bias.shape, dtype=bias.dtype)


def _bias_state(module: nn.Module) -> dict[str, torch.Tensor]:
    bias = getattr(module, "bias", None)
    return {} if bias is None else {"bias": bias.detach().clone()}


# ----------------------------------------------------------------------------- int8 linears


class _Int8Linear(QuantizedModule):
    """int8 ``weight_int8`` (N, K), per-channel ``weight_scale`` (N,), float ``bias``."""

    scale_dtype = torch.float32

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=self.scale_dtype))
        self.register_buffer("bias", bias)

    _canonical = {"weight_scale": torch.float32}

    @classmethod
    def empty(cls, module: nn.Linear, scheme: LayerScheme) -> "_Int8Linear":
        return cls(module.in_features, module.out_features, _empty_bias(module))

    @classmethod
    def quantize_weights(cls, module: nn.Linear, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        q, scale = K.quantize_int8(module.weight, scheme.per_channel)
        return {"weight_int8": q, "weight_scale": scale.to(cls.scale_dtype), **_bias_state(module)}

    def dequantize(self) -> torch.Tensor:
        return K.dequantize_int8(self.weight_int8, self.weight_scale)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantised rows of the weight, fp32 (M, K) (a tied embedding reads these)."""
        return self.weight_int8[rows].float() * self.weight_scale[rows].float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_Int8Linear):
    """int8 weights, bf16 activations: ``torch._weight_int8pack_mm``."""

    scale_dtype = torch.bfloat16
    _canonical = {"weight_scale": torch.bfloat16}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.int8_weight_only_linear(x, self.weight_int8, self.weight_scale, self.bias)


class Int8DynamicLinear(_Int8Linear):
    """int8 weights and int8 activations quantised per token at run time: ``torch._int_mm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.int8_dynamic_linear(x, self.weight_int8, self.weight_scale, self.bias)


class Int8StaticLinear(_Int8Linear):
    """int8 weights and int8 activations with a calibrated per-tensor scale / zero point
    (``input_scale``, ``input_zero_point``).

    Kernel: fbgemm's prepacked static int8 linear on CPUs with VNNI (``layout == 'fbgemm'``:
    the packed weight replaces ``weight_int8``, which then holds an empty placeholder; the
    state dict still carries the int8 weight), else ``torch._int_mm`` (``layout == 'plain'``)."""

    _canonical = {"weight_scale": torch.float32, "input_scale": torch.float32, "input_zero_point": torch.int32}

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.empty((), dtype=torch.int32))
        self._scale, self._zero_point, self._w_sum, self._out_scale = 1.0, 0, None, None
        self.layout, self._packed = "plain", None

    @classmethod
    def quantize_weights(cls, module: nn.Linear, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        if activation is None:
            raise ValueError("int8_static needs the calibrated activation (scale, zero_point)")
        scale, zero_point = activation
        state = super().quantize_weights(module, scheme)
        state["input_scale"] = torch.tensor(float(scale), dtype=torch.float32)
        state["input_zero_point"] = torch.tensor(int(zero_point), dtype=torch.int32)
        return state

    def _finalize(self) -> None:
        super()._finalize()
        if self.input_scale.is_meta or self.layout != "plain":
            return
        # Python numbers: the per-call quantisation then needs no device sync.
        self._scale, self._zero_point = float(self.input_scale), int(self.input_zero_point)
        self._packed = K.fbgemm_pack_int8(self.weight_int8, self.weight_scale)
        if self._packed is not None:
            self.weight_int8 = torch.empty(0, dtype=torch.int8)  # the packed copy is the weight now
            self.layout, self._w_sum, self._out_scale = "fbgemm", None, None
            return
        self._w_sum = self.weight_int8.sum(dim=1, dtype=torch.int32) if self._zero_point else None
        self._out_scale = self.weight_scale * self._scale  # (N,): one multiply per call instead of two

    def _to_storage_layout(self) -> None:
        if self.layout == "fbgemm":
            self.weight_int8 = K.fbgemm_unpack_int8(self._packed)
            self.layout, self._packed = "plain", None

    def int8_weight(self) -> torch.Tensor:
        return K.fbgemm_unpack_int8(self._packed) if self.layout == "fbgemm" else self.weight_int8

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "fbgemm":
            destination[prefix + "weight_int8"] = self.int8_weight()

    def dequantize(self) -> torch.Tensor:
        return K.dequantize_int8(self.int8_weight(), self.weight_scale)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.int8_weight()[rows].float() * self.weight_scale[rows].float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "fbgemm":
            return K.int8_static_linear_fbgemm(x, self._packed, self._scale, self._zero_point, self.bias,
                                               self.out_features)
        return K.int8_static_linear(x, self.weight_int8, self._out_scale, self._scale, self._zero_point,
                                    self._w_sum, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}"


# ----------------------------------------------------------------------------- int4 linear


class Int4WeightOnlyLinear(QuantizedModule):
    """Group-wise int4 weights, bf16 activations: tinygemm (``torch._weight_int4pack_mm*``).

    ``weight_int4`` is saved in the portable layout (uint8 (N, K/2)) and repacked into the
    kernel layout of the device it lives on; ``layout`` says which ('portable' when no kernel
    fits this shape or device: then the weight is dequantised per call, a fallback)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16))
        self.register_buffer("bias", bias)
        self.layout = "portable"
        self._rows_cache: torch.Tensor | None = None

    _canonical = {"scales_and_zeros": torch.bfloat16}

    @classmethod
    def empty(cls, module: nn.Linear, scheme: LayerScheme) -> "Int4WeightOnlyLinear":
        return cls(module.in_features, module.out_features, scheme.group_size, _empty_bias(module))

    @classmethod
    def quantize_weights(cls, module: nn.Linear, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        q, scales_and_zeros = K.quantize_int4(module.weight, scheme.group_size, scheme.symmetric)
        return {"weight_int4": K.pack_int4(q), "scales_and_zeros": scales_and_zeros, **_bias_state(module)}

    # -- layouts
    def _finalize(self) -> None:
        super()._finalize()
        weight = self.weight_int4
        if weight.is_meta or self.layout != "portable":
            return
        layout = K.int4_kernel_layout(weight.device)
        if K.int4_kernel_supports(self.out_features, self.in_features, self.group_size, layout):
            self.weight_int4 = K.pack_int4_for_kernel(weight, layout)
            self.layout = layout
        else:
            K._warn_once(f"int4-fallback-{weight.device.type}-{self.out_features}-{self.in_features}",
                         f"no int4 kernel for a {self.out_features}x{self.in_features} weight (group {self.group_size}) "
                         f"on {weight.device.type}; dequantising it on every call instead")

    def _to_storage_layout(self) -> None:
        self._rows_cache = None
        if self.layout != "portable":
            self.weight_int4 = self.portable_weight()
            self.layout = "portable"

    def int4_values(self) -> torch.Tensor:
        """The stored values, int32 (N, K) in [0, 15], whatever the layout."""
        n, k = self.out_features, self.in_features
        if self.layout == "portable":
            return K.unpack_int4(self.weight_int4)
        if self.layout == "cpu" and self._cpu_layout_readable():
            values = K.unpack_int4_cpu_layout(self.weight_int4, n, k)
            if torch.equal(K.pack_int4_for_kernel(K.pack_int4(values), "cpu"), self.weight_int4):
                return values
            K._warn_once("int4-cpu-layout", "torch's CPU int4 layout changed; recovering the values through the kernel")
        return K.unpack_int4_with_kernel(self.weight_int4, self.layout, n, k, self.group_size)

    @staticmethod
    def _cpu_layout_readable() -> bool:
        """Whether this machine's CPU int4 layout is one :mod:`kernels` reads directly."""
        try:
            K.cpu_int4_block_n()
        except RuntimeError:
            K._warn_once("int4-cpu-layout", "torch's CPU int4 layout is not one seekdeep reads directly; recovering "
                         "the values through the kernel")
            return False
        return True

    def portable_weight(self) -> torch.Tensor:
        return self.weight_int4 if self.layout == "portable" else K.pack_int4(self.int4_values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_int4.is_meta:
            destination[prefix + "weight_int4"] = torch.empty(self.out_features, self.in_features // 2,
                                                              dtype=torch.uint8, device="meta")
        else:
            destination[prefix + "weight_int4"] = self.portable_weight()

    # -- compute
    def dequantize(self) -> torch.Tensor:
        return K.dequantize_int4(self.int4_values(), self.scales_and_zeros, self.group_size)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.layout == "portable":
            values = K.unpack_int4_rows(self.weight_int4, rows)
        elif self.layout == "cpu" and self._cpu_layout_readable():
            values = K.int4_cpu_layout_rows(self.weight_int4, self.out_features, self.in_features, rows)
        else:  # no row access into this kernel layout: keep one portable copy (+0.5 byte per weight)
            if self._rows_cache is None:
                self._rows_cache = self.portable_weight()
            values = K.unpack_int4_rows(self._rows_cache, rows)
        sz = self.scales_and_zeros[:, rows].float().transpose(0, 1)  # (M, G, 2)
        scale = sz[..., 0].repeat_interleave(self.group_size, dim=1)  # (M, K)
        zero = sz[..., 1].repeat_interleave(self.group_size, dim=1)
        return (values.float() - 8.0) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "portable":
            return K.int4_weight_only_linear_reference(x, K.unpack_int4(self.weight_int4), self.scales_and_zeros,
                                                       self.group_size, self.bias)
        return K.int4_weight_only_linear(x, self.weight_int4, self.layout, self.group_size, self.scales_and_zeros,
                                         self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"layout={self.layout}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- 16-bit


class Bf16Linear(QuantizedModule):
    """bf16 weights (the 16-bit choice of mixed precision); computes in bf16. The buffer is not
    called ``weight`` so that a tied ``lm_head`` is still saved."""

    _canonical = {"weight_bf16": torch.bfloat16}

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_bf16", torch.empty(out_features, in_features, dtype=torch.bfloat16))
        self.register_buffer("bias", bias)

    @classmethod
    def empty(cls, module: nn.Linear, scheme: LayerScheme) -> "Bf16Linear":
        return cls(module.in_features, module.out_features, _empty_bias(module))

    @classmethod
    def quantize_weights(cls, module: nn.Linear, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        return {"weight_bf16": module.weight.detach().to(torch.bfloat16), **_bias_state(module)}

    def dequantize(self) -> torch.Tensor:
        return self.weight_bf16.float()

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight_bf16[rows].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), self.weight_bf16, bias).to(x.dtype)


# ----------------------------------------------------------------------------- embeddings


class _QuantizedEmbedding(QuantizedModule):
    """Row lookups that dequantise only the rows asked for. ``output_dtype`` follows the
    model's float dtype through ``.to()``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, output_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.output_dtype = output_dtype

    def _apply(self, fn, recurse=True):
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return super()._apply(fn, recurse)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        return self.rows(flat).to(self.output_dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, output_dtype={self.output_dtype}"


class Int8Embedding(_QuantizedEmbedding):
    """int8 rows with one fp32 scale per row."""

    _canonical = {"weight_scale": torch.float32}

    def __init__(self, num_embeddings: int, embedding_dim: int, output_dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, output_dtype)
        self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32))

    @classmethod
    def empty(cls, module: nn.Embedding, scheme: LayerScheme, output_dtype: torch.dtype | None = None) -> "Int8Embedding":
        return cls(module.num_embeddings, module.embedding_dim, output_dtype or module.weight.dtype)

    @classmethod
    def quantize_weights(cls, module: nn.Embedding, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        q, scale = K.quantize_int8(module.weight, per_channel=True)
        return {"weight_int8": q, "weight_scale": scale}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].float() * self.weight_scale[ids][:, None]


class Int4Embedding(_QuantizedEmbedding):
    """Group-wise int4 rows in the portable layout (lookups need no kernel)."""

    _canonical = {"scales_and_zeros": torch.bfloat16}

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, output_dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, output_dtype)
        self.group_size = group_size
        self.register_buffer("weight_int4", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(embedding_dim // group_size, num_embeddings, 2, dtype=torch.bfloat16))

    @classmethod
    def empty(cls, module: nn.Embedding, scheme: LayerScheme, output_dtype: torch.dtype | None = None) -> "Int4Embedding":
        return cls(module.num_embeddings, module.embedding_dim, scheme.group_size, output_dtype or module.weight.dtype)

    @classmethod
    def quantize_weights(cls, module: nn.Embedding, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        q, scales_and_zeros = K.quantize_int4(module.weight, scheme.group_size, scheme.symmetric)
        return {"weight_int4": K.pack_int4(q), "scales_and_zeros": scales_and_zeros}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        values = K.unpack_int4_rows(self.weight_int4, ids)  # (M, C)
        sz = self.scales_and_zeros[:, ids].float().transpose(0, 1)  # (M, G, 2)
        scale = sz[..., 0].repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].repeat_interleave(self.group_size, dim=1)
        return (values.float() - 8.0) * scale + zero


class Bf16Embedding(_QuantizedEmbedding):
    _canonical = {"weight_bf16": torch.bfloat16}

    def __init__(self, num_embeddings: int, embedding_dim: int, output_dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, output_dtype)
        self.register_buffer("weight_bf16", torch.empty(num_embeddings, embedding_dim, dtype=torch.bfloat16))

    @classmethod
    def empty(cls, module: nn.Embedding, scheme: LayerScheme, output_dtype: torch.dtype | None = None) -> "Bf16Embedding":
        return cls(module.num_embeddings, module.embedding_dim, output_dtype or module.weight.dtype)

    @classmethod
    def quantize_weights(cls, module: nn.Embedding, scheme: LayerScheme, activation=None) -> dict[str, torch.Tensor]:
        return {"weight_bf16": module.weight.detach().to(torch.bfloat16)}

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_bf16[ids]


class TiedEmbedding(_QuantizedEmbedding):
    """The input embedding of a model whose ``lm_head`` shares its weight: reads dequantised
    rows of the quantised head, so the shared matrix is stored once. Holds no tensors; the
    head is referenced, not registered (it is saved and moved as ``lm_head``)."""

    def __init__(self, source: nn.Module, output_dtype: torch.dtype = torch.float32):
        super().__init__(source.out_features, source.in_features, output_dtype)
        self.__dict__["source"] = source  # not a submodule: no second copy in state_dict / named_modules

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.weight_rows(ids)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied to lm_head"


LAYER_CLASSES: dict[str, type[QuantizedModule]] = {
    "int8_static": Int8StaticLinear,
    "int8_dynamic": Int8DynamicLinear,
    "int8_weight_only": Int8WeightOnlyLinear,
    "int4_weight_only": Int4WeightOnlyLinear,
    "bf16": Bf16Linear,
    "int8_embedding": Int8Embedding,
    "int4_embedding": Int4Embedding,
    "bf16_embedding": Bf16Embedding,
}
