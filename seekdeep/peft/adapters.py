"""Houlsby-style bottleneck adapters: a small residual MLP on the output of a sublayer.

Wrapping ``o_proj`` and ``down_proj`` (the defaults) puts one adapter after attention and one
after the feed-forward block, before each residual add, as in Houlsby et al. (2019):

    h = base(x);  h <- h + scaling * up(act(down(dropout(h))))

``up`` starts at zero, so a new adapter is the identity. Several active adapters are applied
one after another, in activation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.errors import ConfigError
from seekdeep.peft.config import BottleneckConfig
from seekdeep.peft.layers import TunerLayer, module_device_dtype

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class BottleneckLayer(TunerLayer):
    """``base_layer`` followed by bottleneck adapters in the slots ``adapter_down[name]``
    (out_features -> bottleneck), ``adapter_up[name]`` and ``adapter_dropout[name]``."""

    slot_names = ("adapter_down", "adapter_up", "adapter_dropout")
    kind = "bottleneck"

    def __init__(self, base_layer: nn.Module):
        out_features = getattr(base_layer, "out_features", None)
        if not isinstance(out_features, int):
            raise ConfigError("target_modules", f"a bottleneck adapter needs a layer with out_features (its output width); "
                              f"{type(base_layer).__name__} has none")
        super().__init__(base_layer)
        self.in_features = getattr(base_layer, "in_features", None)
        self.out_features = out_features
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add(self, name: str, config: BottleneckConfig) -> None:
        device, _ = module_device_dtype(self.base_layer)
        down = nn.Linear(self.out_features, config.bottleneck_size, device=device, dtype=torch.float32)
        up = nn.Linear(config.bottleneck_size, self.out_features, device=device, dtype=torch.float32)
        nn.init.normal_(down.weight, std=0.02)  # small: the adapter starts close to the identity ...
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # ... and exactly the identity until up learns
        nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_dropout[name] = nn.Dropout(config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        self.activation[name] = config.non_linearity
        self.scaling[name] = float(config.scaling)

    def delete(self, name: str) -> None:
        super().delete(name)
        self.activation.pop(name, None)
        self.scaling.pop(name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = self.base_layer(x, *args, **kwargs)
        for name in self.active_here():
            h = self.adapter_dropout[name](hidden.to(torch.float32))
            h = self.adapter_up[name](_ACTIVATIONS[self.activation[name]](self.adapter_down[name](h)))
            hidden = hidden + (self.scaling[name] * h).to(hidden.dtype)
        return hidden
