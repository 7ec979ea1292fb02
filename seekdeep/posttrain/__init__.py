"""Post-training: instruction tuning on chat data (``seekdeep sft``) and reinforcement learning
with verifiable rewards (GRPO) or preferences (DPO) (``seekdeep rl``).

- ``config``: SFTConfig, RLConfig (no training code imported);
- ``chat``: chat JSONL -> template-rendered ids with assistant-only labels, padded batches;
- ``instructions``: the embedded write-the-body tasks cut from the standard library;
- ``rewards`` / ``sandbox``: reward callables and the sandboxed doctest runner;
- ``losses``: token log-probs, GRPO advantages and objective, DPO;
- ``rollout``: batched group sampling and policy evaluation;
- ``policy``: the LoRA / full policy, its reference, checkpoints and the published model.
"""

from seekdeep.posttrain.config import RLConfig, SFTConfig
from seekdeep.posttrain.losses import dpo_loss, group_advantages, grpo_loss, token_logprobs
from seekdeep.posttrain.rewards import DoctestReward, LengthReward, RewardSet, RLPrompt, parse_reward, prefix_reward
from seekdeep.posttrain.sandbox import SandboxResult, run_doctests

__all__ = ["DoctestReward", "LengthReward", "RLConfig", "RLPrompt", "RewardSet", "SFTConfig", "SandboxResult",
           "dpo_loss", "group_advantages", "grpo_loss", "parse_reward", "prefix_reward", "run_doctests",
           "token_logprobs"]
