"""A tokenizer trained on a few sentences and hand-built models whose answer depends on whether
one keyword is present anywhere in the input (so every attribution method has a known answer)."""

from __future__ import annotations

import torch

from seekdeep.models.classification import ClassificationHeadConfig, ForSequenceClassification
from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
from seekdeep.tokenizer import train_tokenizer

SENTENCES = [
    "the product arrived quickly and works as described",
    "def parse_header(line):\n    return line.split(':')",
    "this excellent tool saved me hours of work",
    "an ordinary box with a cable and a manual inside",
    "import os\nfor name in os.listdir(path):\n    print(name)",
]
KEYWORD = " excellent"


def build_tokenizer():
    tok = train_tokenizer(iter(SENTENCES * 20), vocab_size=400)
    assert len(tok.encode(KEYWORD)) == 1  # one token: the answer hangs on one id
    return tok


def _keyword_trunk(config, keyword_id: int, strength: float = 6.0) -> dict[str, torch.Tensor]:
    """Weights making the last position's hidden state carry 'was the keyword anywhere?' in
    channel 0: embeddings are small noise except the keyword's channel 0; queries are zero
    (uniform causal attention averages the values); v/o copy channel 0; the MLP is off."""
    g = torch.Generator().manual_seed(0)
    c = config.hidden_size
    embed = torch.randn(config.vocab_size, c, generator=g) * 0.02
    embed[:, 0] = 0.0
    embed[keyword_id, 0] = strength
    state = {"model.embed_tokens.weight": embed}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        kv = config.num_key_value_heads * config.head_dim
        state[p + "self_attn.q_proj.weight"] = torch.zeros(config.num_attention_heads * config.head_dim, c)
        state[p + "self_attn.k_proj.weight"] = torch.randn(kv, c, generator=g) * 0.02
        v = torch.zeros(kv, c)
        v[0, 0] = 1.0
        state[p + "self_attn.v_proj.weight"] = v
        o = torch.zeros(c, config.num_attention_heads * config.head_dim)
        o[0, 0] = 4.0 * config.num_attention_heads  # undo the head averaging of the copied channel
        state[p + "self_attn.o_proj.weight"] = o
        state[p + "mlp.down_proj.weight"] = torch.zeros(c, config.intermediate_size)
    return state


def tiny_config(tokenizer, **extra) -> LlamaConfig:
    settings = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=None,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**{**settings, **extra})


def build_keyword_classifier(tokenizer):
    """Class 1 ('positive') exactly when the keyword occurs; class 0 otherwise."""
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = ForSequenceClassification(config, ClassificationHeadConfig(2, {0: "negative", 1: "positive"}))
    model.init_weights()
    state = _keyword_trunk(config, tokenizer.encode(KEYWORD)[0])
    score = torch.zeros(2, config.hidden_size)
    score[1, 0], score[0, 0] = 3.0, -3.0
    state["score.weight"] = score
    model.load_state_dict(state, strict=False)
    return model.eval()


def build_keyword_lm(tokenizer):
    """A causal LM that predicts ' tool' strongly exactly when the keyword occurred."""
    config = tiny_config(tokenizer, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.init_weights()
    state = _keyword_trunk(config, tokenizer.encode(KEYWORD)[0])
    head = torch.zeros(config.vocab_size, config.hidden_size)
    head[tokenizer.encode(" tool")[0], 0] = 3.0
    state["lm_head.weight"] = head
    model.load_state_dict(state, strict=False)
    return model.eval()
