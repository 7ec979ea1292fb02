"""The tiny random llama the engine tests serve (imported by name: pytest puts this directory
on sys.path for the tests in it)."""

import torch

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM


def tiny_llama(backend: str = "sdpa", *, seed: int = 1, layers: int | None = None, vocab: int = 256, std: float = 0.3,
               **options) -> LlamaForCausalLM:
    """The "tiny" preset without bos/eos; ``std`` 0.3 gives peaky logits, so greedy choices are
    far from ties and token-for-token comparisons are not decided by rounding."""
    torch.manual_seed(seed)
    extra = {} if layers is None else {"num_hidden_layers": layers}
    cfg = LlamaConfig.from_name("tiny", vocab_size=vocab, max_position_embeddings=256, eos_token_id=None,
                                bos_token_id=None, attention_backend=backend, attention_options=options, **extra)
    model = LlamaForCausalLM(cfg)
    model.init_weights(std=std)
    return model.eval()
