"""One optimizer object over the model parts a rank holds (one per local pipeline stage).

LR schedulers and the loss scaler see an ordinary ``torch.optim.Optimizer`` (its
``param_groups`` are the parts' groups, shared, so a schedule's LR changes reach them); its
state dict is keyed by parameter name (``get_optimizer_state_dict``, flattened), so it can be
saved on one layout and loaded on another.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class PartsOptimizer(torch.optim.Optimizer):
    """``make(part) -> Optimizer`` is called once per part."""

    def __init__(self, parts: list[nn.Module], make: Callable[[nn.Module], torch.optim.Optimizer]):
        self.parts = list(parts)
        self.optimizers = [make(part) for part in self.parts]
        params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, dict(self.optimizers[0].defaults))
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    def step(self, closure=None):  # noqa: D102
        if closure is not None:
            raise NotImplementedError("PartsOptimizer.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Flattened, name-keyed state of every part (``state.<fqn>.<key>``, ``param_groups.<fqn>.<key>``)."""
        merged: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers):
            merged.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.optimizers):
            names = [name for name, _ in part.named_parameters()]
            prefixes = tuple(p for n in names for p in (f"state.{n}.", f"param_groups.{n}."))
            mine = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
            set_optimizer_state_dict(part, opt, optim_state_dict=mine, options=_FLAT)
