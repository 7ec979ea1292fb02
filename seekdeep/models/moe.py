"""DeepSeek-V3 mixture of experts: a sigmoid router with group-limited top-k, routed SwiGLU
experts and always-on shared experts. Module names follow Hugging Face's checkpoint keys
(``mlp.gate``, ``mlp.experts.{i}.{gate,up,down}_proj``, ``mlp.shared_experts``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from seekdeep.models.llama import SwiGLU

if TYPE_CHECKING:
    from seekdeep.models.deepseek_v3 import DeepseekV3Config


class TopkRouter(nn.Module):
    """Picks ``top_k`` experts per token and their mixing weights.

    Scores are ``sigmoid(x @ weight.T)`` in fp32. Selection uses the scores plus
    ``e_score_correction_bias`` (DeepSeek-V3's auxiliary-loss-free balancing bias): only the
    ``topk_group`` groups with the best sum of their two best experts are eligible. The
    weights come from the un-biased scores, are renormalised when ``norm_topk_prob`` and
    multiplied by ``routed_scaling_factor``.

    After each forward ``tokens_per_expert`` (E,) holds how many tokens chose each expert,
    the signal a balancing-bias update needs.
    """

    def __init__(
        self,
        hidden_size: int,
        n_routed_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.n_routed_experts, self.top_k = n_routed_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size))
        # A buffer, not a parameter: it is set by a load-balancing rule, never by gradients,
        # and Hugging Face checkpoints store it.
        self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts))
        self.tokens_per_expert: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C) -> (weights (N, k) fp32, expert indices (N, k))."""
        n = x.shape[0]
        e, g = self.n_routed_experts, self.n_group
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()  # (N, E)
        if g > 1:
            per_group = e // g
            grouped = choice.view(n, g, per_group)  # (N, G, E/G)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # (N, G)
            top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
            keep = torch.zeros(n, g, dtype=torch.bool, device=x.device).scatter_(1, top_groups, True)
            keep = keep[:, :, None].expand(n, g, per_group).reshape(n, e)  # (N, E)
            choice = choice.masked_fill(~keep, float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (N, k)
        weights = scores.gather(1, indices)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices


class RoutedExperts(nn.ModuleList):
    """``E`` SwiGLU experts; ``experts[i]`` is expert ``i`` (the checkpoint's key layout).

    Dispatch groups the (token, slot) pairs by expert with one sort, runs each expert once on
    its contiguous slice and scatters the weighted results back with one ``index_add``:
    a loop over experts, never over tokens.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__(SwiGLU(hidden_size, intermediate_size) for _ in range(n_experts))

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """x: (N, C); indices / weights: (N, k); counts: (E,) tokens per expert -> (N, C)."""
        k = indices.shape[1]
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        order = indices.reshape(-1).argsort(stable=True)  # (N*k,) slots grouped by expert
        token_of_slot = order // k  # (N*k,)
        routed_in = x.index_select(0, token_of_slot)  # (N*k, C)
        outs = []
        start = 0
        for expert, count in zip(self, counts.tolist()):
            if count:
                outs.append(expert(routed_in[start : start + count]))
                start += count
        routed_out = torch.cat(outs, dim=0)  # (N*k, C)
        # Weights are fp32 (from the router); multiply in fp32 and round once, as transformers does.
        routed_out = (routed_out * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add(0, token_of_slot, routed_out)


class DeepseekV3MoE(nn.Module):
    """``routed experts(x) + shared_experts(x)``."""

    def __init__(self, config: "DeepseekV3Config"):
        super().__init__()
        c = config
        self.gate = TopkRouter(
            c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group,
            c.norm_topk_prob, c.routed_scaling_factor, c.initializer_range,
        )
        self.experts = RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, C)
        flat = x.reshape(-1, shape[-1])  # (N, C)
        weights, indices = self.gate(flat)  # (N, k), (N, k)
        with torch.no_grad():
            counts = torch.bincount(indices.reshape(-1), minlength=self.gate.n_routed_experts)  # (E,)
        self.gate.tokens_per_expert = counts
        out = self.experts(flat, indices, weights, counts).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
