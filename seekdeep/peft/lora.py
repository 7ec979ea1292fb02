"""LoRA around any linear-like layer: ``nn.Linear`` or a quantized linear (anything with
``in_features`` / ``out_features`` and a forward), QLoRA-style when the base is int8 / int4.

Per adapter ``name`` the wrapper holds ``lora_A[name]`` (in -> r), ``lora_B[name]`` (r -> out),
``lora_dropout[name]`` and, for DoRA, ``lora_magnitude_vector[name].weight`` (one magnitude per
output row) -- the slot names peft uses, so state-dict keys translate one to one.

    y = base(x) + scaling * B(A(dropout(x)))            scaling = alpha / r  (alpha / sqrt(r): rsLoRA)
    (B has a bias with ``lora_bias``; ``rank_pattern`` / ``alpha_pattern`` set r and alpha per module)
    DoRA: y = m / ||W + scaling*BA||_row * (W + scaling*BA) x + bias

(the row norm is detached in training, as the DoRA paper suggests). Adapter weights are kept in
fp32 whatever the base dtype, and merging writes ``W + scaling*BA`` (DoRA: scaled by
``m / norm``) into a float base weight; a quantized base cannot be merged into.

Quantized bases (QLoRA-style). Quantize first, then add the adapter: LoRA needs from a base
layer only ``in_features``, ``out_features`` and a forward. Integer kernels have no derivative,
so adding an adapter also hooks every quantized linear that can dequantize its weight
(``dequantize()`` as in ``seekdeep.quantization``, or ``dequantize_weight()``) to give it the
input gradient ``dx = dy @ W`` -- the frozen base runs its int8 / int4 kernel forward and
gradients still reach the adapters of earlier layers. DoRA reads the dequantized weight too.
(torch.ao's dynamic int8 ``Linear`` offers neither and cannot carry trained adapters below it.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.peft.config import LoRAConfig
from seekdeep.peft.layers import TunerLayer, module_device_dtype


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude: ``weight`` (out_features,)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) floating-point weight of a linear-like base layer: ``weight`` itself, or
    its dequantized value for a quantized layer (``dequantize_weight()``, a quantized
    ``weight`` tensor, or ``weight()`` returning one, as torch's dynamic int8 Linear does)."""
    for method in ("dequantize_weight", "dequantize"):  # seekdeep.quantization's linears: dequantize()
        if callable(getattr(layer, method, None)):
            weight = getattr(layer, method)()
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                return weight
    weight = getattr(layer, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    if isinstance(weight, torch.Tensor):
        if weight.is_quantized:
            return weight.dequantize()
        if weight.is_floating_point():
            return weight
    raise ConfigError("use_dora", f"{type(layer).__name__} exposes no floating-point or dequantizable weight; DoRA and "
                      "merging need one (a quantized layer can offer it through dequantize_weight())")


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear-like layer whose weight is not a float tensor (int8 / int4 kernels)."""
    if isinstance(module, (nn.Linear, TunerLayer)) or not isinstance(getattr(module, "out_features", None), int) \
            or not isinstance(getattr(module, "in_features", None), int):
        return False
    weight = getattr(module, "weight", None)
    return not (isinstance(weight, torch.Tensor) and weight.is_floating_point())


def _dequantizes(module: nn.Module) -> bool:
    return callable(getattr(module, "dequantize_weight", None)) or callable(getattr(module, "dequantize", None))


class _InputGradBridge(torch.autograd.Function):
    """Identity on a quantized layer's output ``y``, with the input gradient the integer kernel
    lacks: ``dx = dy @ W`` with W dequantized (what QLoRA does). ``y``'s own graph is cut."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = base_weight(ctx.layer).float()  # (out, in)
        return (grad_out.float() @ weight).to(ctx.x_dtype), None, None


def _bridge_hook(module: nn.Module, args: tuple, output: torch.Tensor):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _InputGradBridge.apply(x, output.detach(), module)
    return None


def enable_quantized_input_grads(model: nn.Module) -> list:
    """Give every quantized linear of ``model`` that can dequantize its weight an input
    gradient (a forward hook; nothing is swapped), so adapters before it get gradients through
    a frozen int8 / int4 base. Returns the hook handles."""
    return [module.register_forward_hook(_bridge_hook) for module in model.modules()
            if is_quantized_linear(module) and _dequantizes(module)]


def _base_bias(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    if callable(bias) and not isinstance(bias, torch.Tensor):
        bias = bias()
    return bias if isinstance(bias, torch.Tensor) else None


class LoRALinear(TunerLayer):
    """A linear-like ``base_layer`` plus LoRA adapters in named slots (see the module docstring)."""

    slot_names = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")
    kind = "LoRA"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.scaling: dict[str, float] = {}
        self._merged: list[str] = []
        self._dora_factor: dict[str, torch.Tensor] = {}  # m / norm at merge time, to unmerge exactly

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def add(self, name: str, config: LoRAConfig, path: str = "") -> None:
        """Add adapter ``name``; ``path`` (this layer's module path) selects the rank and alpha
        of ``config.rank_pattern`` / ``alpha_pattern``."""
        device, _ = module_device_dtype(self.base_layer)
        r = config.rank_for(path)
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        lora_B = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device, dtype=torch.float32)
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
            nn.init.zeros_(lora_B.weight)
        if config.lora_bias and config.init_lora_weights is not False:
            nn.init.zeros_(lora_B.bias)
        # init_lora_weights=False keeps nn.Linear's random init for both: a non-zero start (tests)
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(path)
        if config.use_dora:
            with torch.no_grad():
                weight = base_weight(self.base_layer).float()
                norm = torch.linalg.norm(weight + self.delta_weight(name), dim=1)  # (out,)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, (out, in)."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self._merged:
            self.unmerge()
        result = base_result = self.base_layer(x, *args, **kwargs)
        for name in self.active_here():
            if name in self._merged:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            x_lora = x.to(lora_A.weight.dtype)
            if name in self.lora_magnitude_vector:
                # rescale the base layer's output, not one that already holds other adapters' deltas
                # (that would make each adapter's effect depend on the activation order)
                delta = self._dora_delta(name, x_lora, base_result)
            else:
                delta = lora_B(lora_A(self.lora_dropout[name](x_lora))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def _dora_delta(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``base_result``: ``(m/n - 1) * W x + m/n * scaling * B A x``."""
        lora_A, lora_B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
        dropout = self.lora_dropout[name]
        weight = base_weight(self.base_layer).to(x.dtype)  # (out, in)
        lora_weight = (lora_B.weight @ lora_A.weight).detach()  # (out, in)
        norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1).detach()  # (out,)
        mag_scale = self.lora_magnitude_vector[name].weight / norm  # (out,)
        x_in = dropout(x)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = base_result.to(x.dtype)
            bias = _base_bias(self.base_layer)
            if bias is not None:
                base_out = base_out - bias.to(x.dtype)
        else:  # dropout changes the input of the rescaled base term too
            base_out = F.linear(x_in, weight)
        return (mag_scale - 1) * base_out + mag_scale * lora_B(lora_A(x_in)) * scaling

    # -- merging
    def _float_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ConfigError("merge", f"the base layer ({type(self.base_layer).__name__}) holds quantized weights; merging "
                              "would need re-quantizing. Keep the adapter unmerged (it runs on top of the quantized "
                              "base), or dequantize the base first")
        return weight

    def _delta_bias(self, name: str) -> torch.Tensor | None:
        """``scaling * lora_B.bias`` (lora_bias adapters), else None."""
        bias = self.lora_B[name].bias
        return None if bias is None else bias.float() * self.scaling[name]

    def lora_bias_unmergeable(self, name: str) -> bool:
        """Whether adapter ``name`` has a LoRA bias this layer has no float bias to merge into."""
        base_bias = _base_bias(self.base_layer)
        return name in self.lora_B and self.lora_B[name].bias is not None \
            and not (isinstance(base_bias, torch.Tensor) and base_bias.is_floating_point())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        weight = self._float_weight()
        base_bias = _base_bias(self.base_layer)
        for name in names:
            if name not in self._merged and self.lora_bias_unmergeable(name):
                raise ConfigError("lora_bias", f"adapter {name!r} has a LoRA bias but this {type(self.base_layer).__name__} "
                                  "has no bias to merge it into; keep the adapter unmerged (as peft does)")
        for name in names:
            if name not in self.lora_A or name in self._merged:
                continue
            merged = weight.float() + self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                factor = (self.lora_magnitude_vector[name].weight.float() / torch.linalg.norm(merged, dim=1))[:, None]
                merged = merged * factor
                self._dora_factor[name] = factor
            if safe_merge and not torch.isfinite(merged).all():
                raise ConfigError("adapter_names", f"merging {name!r} gives non-finite weights; the adapter is broken")
            weight.copy_(merged.to(weight.dtype))
            delta_bias = self._delta_bias(name)
            if delta_bias is not None:
                base_bias.add_(delta_bias.to(base_bias.dtype))
            self._merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        weight = self._float_weight()
        for name in reversed(self._merged):
            restored = weight.float()
            if name in self._dora_factor:
                restored = restored / self._dora_factor.pop(name)
            weight.copy_((restored - self.delta_weight(name)).to(weight.dtype))
            delta_bias = self._delta_bias(name)
            if delta_bias is not None:
                base_bias = _base_bias(self.base_layer)
                base_bias.sub_(delta_bias.to(base_bias.dtype))
        self._merged = []
