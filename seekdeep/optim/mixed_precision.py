"""Mixed-precision optimizer: low-precision model weights, fp32 master weights.

The model holds bf16 / fp16 parameters (fast matmuls, half the memory); the optimizer keeps
an fp32 copy of each of them, steps the fp32 copies with an ordinary torch optimizer and
rounds the result back into the model. Small updates that would vanish when added to a
bf16 weight accumulate in the fp32 master instead.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from seekdeep.errors import ConfigError
from seekdeep.train.precision import DynamicLossScaler, StaticLossScaler

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer_cls`` (default AdamW) so that it steps fp32 masters of the
    low-precision parameters.

    Args:
        params_or_groups: parameters or param-group dicts, as for any torch optimizer (e.g.
            the output of :func:`seekdeep.train.param_groups`).
        optimizer_cls: the inner optimizer class; it only ever sees fp32 masters and the
            parameters that are stepped directly.
        loss_scale: ``"dynamic"`` (a :class:`~seekdeep.train.DynamicLossScaler`), a number
            (a fixed scale), ``None`` (no scaling), or a ``DynamicLossScaler`` instance. In
            every mode a step with an inf/NaN gradient is skipped, never applied.
        fp16_groups: indices of the param groups that hold low-precision parameters and get
            fp32 masters; every parameter in them must be fp16/bf16. Parameters of the other
            groups are stepped directly in their own dtype. Default: every fp16/bf16
            parameter gets a master.
        clip_grad_norm: default max gradient norm for :meth:`step` (None: no clipping).
        optimizer_kwargs: passed to ``optimizer_cls`` (lr, betas, weight_decay, ...).

    Per iteration: ``opt.zero_grad(); opt.backward(loss); applied = opt.step()``.
    It is a ``torch.optim.Optimizer``: its ``param_groups`` are the inner optimizer's, so an
    LR scheduler (``LambdaLR(opt, ...)``, :func:`seekdeep.train.make_scheduler`) works on it
    directly. ``opt.optimizer`` is the inner optimizer.
    """

    # Optimizer.__init__ is deliberately not called: the inner optimizer owns param_groups
    # and state, and this class exposes them as properties instead of keeping a second copy.
    def __init__(
        self,
        params_or_groups: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        loss_scale: str | float | DynamicLossScaler | None = "dynamic",
        fp16_groups: Iterable[int] | None = None,
        clip_grad_norm: float | None = None,
        **optimizer_kwargs: Any,
    ):
        if isinstance(params_or_groups, torch.Tensor):
            raise ConfigError("params_or_groups", "expected an iterable of tensors or param-group dicts, got a single tensor")
        groups = list(params_or_groups)
        if not groups:
            raise ConfigError("params_or_groups", "empty; expected the parameters to optimize")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ConfigError("optimizer_cls", f"expected a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        if clip_grad_norm is not None and not _positive_number(clip_grad_norm):
            raise ConfigError("clip_grad_norm", f"must be a number > 0 or None, got {clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        self._fp16_groups = self._check_fp16_groups(fp16_groups, len(groups))
        # (model parameter, fp32 master) for every low-precision parameter
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._direct: list[torch.Tensor] = []  # stepped in place by the inner optimizer
        inner_groups = [self._inner_group(i, g) for i, g in enumerate(groups)]
        self.optimizer = optimizer_cls(inner_groups, **optimizer_kwargs)
        first = next(p for g in inner_groups for p in g["params"])
        self.scaler = self._make_scaler(loss_scale, first.device.type)
        self.loss_scale_mode = loss_scale if isinstance(loss_scale, (str, int, float)) or loss_scale is None else "custom"
        self.last_grad_norm: torch.Tensor | None = None
        if any(p.dtype == torch.float16 for p in self._direct):
            raise ConfigError(
                "fp16_groups",
                "fp16 parameters outside fp16_groups would be stepped without fp32 masters, and the loss scaler "
                "cannot unscale fp16 gradients; name their groups in fp16_groups (or leave fp16_groups=None)",
            )

    # -- construction helpers
    @staticmethod
    def _check_fp16_groups(fp16_groups: Iterable[int] | None, n_groups: int) -> set[int] | None:
        if fp16_groups is None:
            return None
        indices = list(fp16_groups)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_groups]
        if bad:
            raise ConfigError(
                "fp16_groups",
                f"{bad} are not param-group indices; this optimizer has {n_groups} group(s), accepted: 0..{n_groups - 1}",
            )
        return set(indices)

    def _inner_group(self, index: int, group: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(group, dict) or "params" not in group:
            raise ConfigError("params_or_groups", f"group {index}: expected a dict with 'params', got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        named = self._fp16_groups is not None and index in self._fp16_groups
        inner_params = []
        for param in params:
            if named and param.dtype not in _LOW_PRECISION:
                raise ConfigError(
                    "fp16_groups",
                    f"group {index} is listed as low precision but holds a {param.dtype} parameter of shape "
                    f"{tuple(param.shape)}; cast the model first (seekdeep.train.cast_model_for_training) or drop "
                    "the group from fp16_groups",
                )
            wants_master = named or (self._fp16_groups is None and param.dtype in _LOW_PRECISION)
            if wants_master:
                master = param.detach().to(torch.float32, copy=True)
                self._pairs.append((param, master))
                inner_params.append(master)
            else:
                self._direct.append(param)
                inner_params.append(param)
        return {**group, "params": inner_params}

    @staticmethod
    def _make_scaler(loss_scale: Any, device_type: str) -> DynamicLossScaler:
        if isinstance(loss_scale, DynamicLossScaler):
            return loss_scale
        if loss_scale == "dynamic":
            return DynamicLossScaler(device=device_type)
        if loss_scale is None:
            return StaticLossScaler(1.0, device=device_type)
        if _positive_number(loss_scale):
            return StaticLossScaler(float(loss_scale), device=device_type)
        raise ConfigError(
            "loss_scale", f"unsupported {loss_scale!r}; accepted: 'dynamic', a number > 0, None, or a DynamicLossScaler"
        )

    # -- what schedulers and torch.optim helpers read
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @property
    def master_params(self) -> list[torch.Tensor]:
        """The fp32 masters, in the order their parameters were given."""
        return [m for _, m in self._pairs]

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale_value

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.optimizer).__name__}, masters={len(self._pairs)}, "
            f"direct={len(self._direct)}, loss_scale={self.loss_scale_mode!r})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._fp16_groups is not None:
            raise ConfigError("fp16_groups", "add_param_group is not supported when fp16_groups names the groups")
        self.optimizer.add_param_group(self._inner_group(len(self.param_groups), param_group))

    # -- the training step
    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, master in self._pairs:
            param.grad = None
            master.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss * scale`` backward (``kwargs`` go to ``Tensor.backward``)."""
        self.scaler.scale(loss).backward(**kwargs)

    def step(self, closure=None, clip_grad_norm: float | None = None) -> bool:  # type: ignore[override]
        """Move gradients to the fp32 masters, unscale, clip (``clip_grad_norm`` or the
        constructor's), step unless a gradient is inf/NaN, copy the masters back into the
        model. Returns True when the step was applied, False when it was skipped."""
        if closure is not None:
            raise ConfigError("closure", "not supported; call backward() before step()")
        max_norm = self.clip_grad_norm if clip_grad_norm is None else clip_grad_norm
        if max_norm is not None and not _positive_number(max_norm):
            raise ConfigError("clip_grad_norm", f"must be a number > 0 or None, got {max_norm!r}")
        with torch.no_grad():
            for param, master in self._pairs:
                master.grad = None if param.grad is None else param.grad.detach().to(torch.float32)
        self.scaler.unscale_(self.optimizer)
        if max_norm is not None:
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        applied = self.scaler.step(self.optimizer)
        self.scaler.update()
        if applied:
            with torch.no_grad():
                for param, master in self._pairs:
                    param.copy_(master)
        return applied

    @property
    def skipped_steps(self) -> int:
        return self.scaler.skipped_steps

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "masters": [m for _, m in self._pairs],
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in ("optimizer", "masters", "scaler") if k not in state_dict]
        if missing:
            raise ConfigError("state_dict", f"missing {missing}; expected the output of MixedPrecisionOptimizer.state_dict()")
        masters = state_dict["masters"]
        if len(masters) != len(self._pairs):
            raise ConfigError("masters", f"state holds {len(masters)} master tensors, this optimizer has {len(self._pairs)}")
        for i, (saved, (_, master)) in enumerate(zip(masters, self._pairs)):
            if tuple(saved.shape) != tuple(master.shape):
                raise ConfigError("masters", f"master {i}: saved shape {tuple(saved.shape)}, expected {tuple(master.shape)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for saved, (param, master) in zip(masters, self._pairs):
                master.copy_(saved)
                param.copy_(master)  # the model gets the rounding of the restored master
        self.scaler.load_state_dict(state_dict["scaler"])
