"""Gated cross-attention: equal to the text-only LM at init (bit for bit), media masking,
the Perceiver resampler, CrossModalAttention, and batches with 0 / 1 / several images."""

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.models.llama import LlamaConfig
from seekdeep.multimodal import CrossAttentionConfig, LlavaConfig, VisionConfig
from seekdeep.multimodal.cross_attention import CrossModalAttention, GatedCrossAttentionBlock, MediaContext, PerceiverResampler
from seekdeep.multimodal.llava import ImagePlaceholderError, LlavaForConditionalGeneration
from seekdeep.multimodal.processing import collate

IMAGE = 9


def _model(cross_attention=None, seed=0):
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None),
        image_token_index=IMAGE, image_seq_length=4, cross_attention=cross_attention)
    return LlavaForConditionalGeneration.from_config(config).eval()


def _open_gates(model):
    with torch.no_grad():
        for block in model.cross_attention_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(0.5)


def test_gated_model_equals_the_text_only_lm_at_init_bit_for_bit():
    model = _model(CrossAttentionConfig(every_n_layers=2, num_heads=4))
    assert len(model.cross_attention_layers) == 2
    ids = torch.tensor([[1, IMAGE, 5, 6, 7, IMAGE, 8, 3], [1, 2, IMAGE, 4, IMAGE, 5, 6, 7]])
    pixels = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        with_images = model(input_ids=ids, pixel_values=pixels).logits
        text_only = model.language_model(ids).logits
        assert torch.equal(with_images, text_only)
        _open_gates(model)
        assert not torch.allclose(model(input_ids=ids, pixel_values=pixels).logits, text_only)


def test_frozen_language_model_trains_only_the_new_parts():
    model = _model(CrossAttentionConfig(freeze_language_model=True))
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.cross_attention_layers.parameters())


def test_media_masking_previous_vs_all_previous():
    feats = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1).expand(3, 2, 4)  # 3 images, 2 latents each
    is_image = torch.tensor([[True, False, True, False], [False, False, True, False]])
    prev = MediaContext.build(feats, is_image, "previous")
    mask = prev.attention_mask()  # (B, T, M * L) with M = 2
    assert mask.shape == (2, 4, 4)
    assert mask[0].tolist() == [[True, True, False, False], [True, True, False, False], [False, False, True, True], [False, False, True, True]]
    assert mask[1].tolist() == [[False] * 4, [False] * 4, [True, True, False, False], [True, True, False, False]]
    allp = MediaContext.build(feats, is_image, "all_previous").attention_mask()
    assert allp[0, 3].tolist() == [True, True, True, True]
    assert torch.equal(prev.media[1, 0], feats[2]) and not bool(prev.valid[1, 1])
    # a decode step continues the count: a new marker moves the token on to the next image
    step = prev.advance(torch.tensor([[False], [False]]))
    assert step.media_index.tolist() == [[2], [1]]


def test_tokens_before_any_image_are_untouched():
    block = GatedCrossAttentionBlock(8, 2)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ff_gate.fill_(1.0)
    x = torch.randn(1, 4, 8)
    media = MediaContext.build(torch.randn(1, 3, 8), torch.tensor([[False, False, True, False]]), "previous")
    y = block(x, media)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])


def test_gated_generation_with_cache_matches_full_recompute():
    model = _model(CrossAttentionConfig(num_latents=3, media_attention="all_previous"))
    _open_gates(model)
    ids = torch.tensor([[1, IMAGE, 5, 6, IMAGE, 7]])
    pixels = torch.randn(2, 3, 16, 16)
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=5)
    with torch.no_grad():  # greedy decoding without a cache, one full forward per token
        seq = ids
        for _ in range(5):
            nxt = model(input_ids=seq, pixel_values=pixels).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


def test_resampler_and_cross_modal_attention_shapes_and_gate():
    r = PerceiverResampler(16, num_latents=5, depth=2, num_heads=4)
    assert r(torch.randn(3, 11, 16)).shape == (3, 5, 16)
    bridge = CrossModalAttention(16, {"image": 24, "audio": 8}, num_heads=4)
    x = torch.randn(2, 6, 16)
    feats = {"image": torch.randn(2, 4, 24), "audio": torch.randn(2, 7, 8)}
    assert torch.equal(bridge(x, feats), x)  # gate 0 at init
    with torch.no_grad():
        bridge.gate.fill_(1.0)
    y = bridge(x, feats, masks={"audio": torch.zeros(2, 7, dtype=torch.bool)})
    y_image_only = bridge(x, {"image": feats["image"]})
    torch.testing.assert_close(y, y_image_only)  # masked-out audio contributes nothing
    with pytest.raises(ConfigError, match="unknown modality"):
        bridge(x, {"video": torch.randn(2, 3, 5)})
    with pytest.raises(ConfigError, match="media_attention"):
        CrossAttentionConfig(media_attention="next")


@pytest.mark.parametrize("xattn", [None, CrossAttentionConfig(num_heads=4)])
def test_mixed_batch_equals_each_sample_alone(xattn):
    model = _model(xattn)
    if xattn is not None:
        _open_gates(model)
    per = 1 if xattn is not None else model.config.tokens_per_image
    torch.manual_seed(3)
    samples = [
        {"input_ids": [1, 5, 6, 7], "pixel_values": None},  # text only
        {"input_ids": [1] + [IMAGE] * per + [5, 8], "pixel_values": torch.randn(1, 3, 16, 16)},
        {"input_ids": [1] + [IMAGE] * per + [4] + [IMAGE] * per + [5, 6, 2], "pixel_values": torch.randn(2, 3, 16, 16)},
    ]
    batch = collate(samples, pad_token_id=0, padding_side="left")
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        for row, s in enumerate(samples):
            alone = model(input_ids=torch.tensor([s["input_ids"]]), pixel_values=s["pixel_values"]).logits[0]
            n = len(s["input_ids"])
            torch.testing.assert_close(together[row, -n:], alone, atol=1e-5, rtol=0)
    text_only = samples[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.tensor([text_only])).logits, model.language_model(torch.tensor([text_only])).logits)
    with pytest.raises(ImagePlaceholderError):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"][:2])


def test_gradient_checkpointing_is_refused_for_the_gated_path():
    model = _model(CrossAttentionConfig())
    model.train()
    model.language_model.gradient_checkpointing = True
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        model(input_ids=torch.tensor([[1, IMAGE, 5]]), pixel_values=torch.randn(1, 3, 16, 16))
