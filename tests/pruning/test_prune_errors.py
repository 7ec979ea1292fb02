"""Bad input to the pruning API raises ConfigError naming the field and what is accepted."""

from __future__ import annotations

import pytest
import torch
from prune_helpers import VOCAB, tiny_model, token_batches
from torch import nn

from seekdeep.attention import register_attention
from seekdeep.errors import ConfigError
from seekdeep.pruning import PruneConfig, prune, prune_model, recover


def _field(exc_info) -> str:
    return exc_info.value.field


@pytest.mark.parametrize("kwargs,field", [
    (dict(ratio=0), "ratio"),
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.2), "ratio"),
    (dict(ratio=True), "ratio"),
    (dict(ratio="0.5"), "ratio"),
    (dict(), "ratio"),  # nothing to prune
    (dict(ratio=0.3, mlp_ratio=0.2), "mlp_ratio"),
    (dict(head_ratio=1.5), "head_ratio"),
    (dict(mlp_ratio=0.2, targets=("heads",)), "mlp_ratio"),
    (dict(ratio=0.3, method="magnitude"), "method"),
    (dict(ratio=0.3, targets=("mlp", "embeddings")), "targets"),
    (dict(ratio=0.3, targets=()), "targets"),
    (dict(ratio=0.3, targets=("mlp", "mlp")), "targets"),
    (dict(ratio=0.3, calibration_batches=0), "calibration_batches"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        PruneConfig(**kwargs)
    assert _field(exc) == field


def test_unknown_key_in_dict():
    with pytest.raises(ConfigError) as exc:
        PruneConfig.from_dict({"ratio": 0.3, "sparsity": 0.5})
    assert _field(exc) == "sparsity"


def test_ratio_that_would_remove_every_head_or_channel():
    model = tiny_model()  # 4 heads in 2 KV groups, 48 channels
    with pytest.raises(ConfigError, match="every attention head") as exc:
        prune(model, PruneConfig(head_ratio=0.9))
    assert _field(exc) == "head_ratio"
    bound = float(str(exc.value).rsplit("below ", 1)[1])
    pruned, _ = prune(model, PruneConfig(head_ratio=bound - 0.01))  # just inside: one head is left
    assert pruned.config.num_attention_heads == 1
    with pytest.raises(ConfigError, match="all 48 MLP channels") as exc:
        prune(model, PruneConfig(mlp_ratio=0.995))
    assert _field(exc) == "mlp_ratio"
    with pytest.raises(ConfigError) as exc:
        prune(model, PruneConfig(ratio=0.95))
    assert _field(exc) == "ratio"


@pytest.mark.parametrize("data,field", [
    (None, "calibration_data"),
    ([], "calibration_data"),
    (torch.zeros(2, 8, dtype=torch.long), "calibration_data"),  # one tensor, not a list of them
    ([torch.zeros(2, 8)], "calibration_data[0]"),  # float
    ([torch.zeros(8, dtype=torch.long)], "calibration_data[0]"),  # 1-D
    ([torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8), VOCAB)], "calibration_data[1]"),  # out of vocab
])
def test_bad_calibration_data(data, field):
    with pytest.raises(ConfigError) as exc:
        prune(tiny_model(), PruneConfig(ratio=0.3, method="activation"), data)
    assert _field(exc) == field


def test_deepseek_v3_is_refused_with_the_supported_family():
    from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, first_k_dense_replace=1, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=64, q_lora_rank=None, n_group=1, topk_group=1)
    with pytest.raises(ConfigError, match="llama family") as exc:
        PruneConfig(ratio=0.3).apply(DeepseekV3ForCausalLM(config))
    assert _field(exc) == "model_type"
    with pytest.raises(ConfigError):
        prune(nn.Linear(4, 4), PruneConfig(ratio=0.3))


def test_models_with_adapters_are_refused():
    from seekdeep.peft import LoRAConfig

    model = tiny_model()
    model.add_adapter("default", LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="merge_and_unload") as exc:
        prune(model, PruneConfig(ratio=0.3))
    assert _field(exc) == "model"


class _PerHeadTemperature(nn.Module):
    """A backend with one parameter per head that pruning knows nothing about."""

    def __init__(self, spec):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(spec.num_heads))

    def forward(self, q, k, v, *, mask, scale, hidden_states=None, cache_state=None):
        from seekdeep.attention.dense import sdpa_attention

        return sdpa_attention(q * self.temperature[:, None, None], k, v, mask, scale)


def test_backend_with_unknown_parameters_cannot_lose_heads():
    register_attention("test_prune_per_head_temperature")(_PerHeadTemperature)
    model = tiny_model(attention_backend="test_prune_per_head_temperature")
    with pytest.raises(ConfigError, match="targets=\\('mlp',\\)") as exc:
        prune(model, PruneConfig(ratio=0.3))
    assert _field(exc) == "attention_backend"
    pruned, _ = prune(model, PruneConfig(ratio=0.3, targets=("mlp",)))  # MLP channels alone are fine
    assert pruned.config.intermediate_size < model.config.intermediate_size


@pytest.mark.parametrize("keep_channels,keep_heads,field", [
    ([range(40), range(41)], None, "keep_channels"),  # different sizes per layer
    ([range(40)], None, "keep_channels"),  # one layer missing
    ([range(40), [0, 0, 1]], None, "keep_channels[1]"),  # duplicate
    ([range(40), [0.5, 1.0]], None, "keep_channels[1]"),  # not integers
    ([range(40), []], None, "keep_channels[1]"),  # empty
    (None, [[0, 1, 2], [0, 1]], "keep_heads[0]"),  # 2 heads of group 0, 1 of group 1
    (None, [[0, 1], [0, 2]], "keep_heads"),  # layer 0: one group of 2; layer 1: two groups of 1
    (None, [[0, 1], [0, 4]], "keep_heads[1]"),  # head 4 does not exist
])
def test_bad_keep_lists(keep_channels, keep_heads, field):
    with pytest.raises(ConfigError) as exc:
        prune_model(tiny_model(), keep_channels, keep_heads)
    assert _field(exc) == field


@pytest.mark.parametrize("kwargs,field", [
    (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(data=None), "data"),
    (dict(data=[torch.zeros(3)]), "data[0]"),
    (dict(precision="fp8"), "precision"),
    (dict(warmup_steps=10), "warmup_steps"),  # longer than steps
])
def test_bad_recovery_arguments(kwargs, field):
    args = dict(data=token_batches(1), steps=2, lr=1e-3)
    args.update(kwargs)
    model = tiny_model()
    with pytest.raises(ConfigError) as exc:
        recover(model, **args)
    assert _field(exc) == field
    assert all(p.requires_grad for p in model.parameters())
