"""CLIP dual encoder: parity with transformers' CLIPModel on a tiny random config (both
directions of logits, padded text), loading through seekdeep.AutoModel, save/load round trip."""

import pytest
import torch

from seekdeep.errors import ConfigError
from seekdeep.multimodal.clip import ClipConfig, ClipModel

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    # the 2-core box is shared: more threads than cores made tiny ops ~40x slower (see the rl tests)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_hf_clip(eos_token_id=9):
    torch.manual_seed(0)
    text = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=12, eos_token_id=eos_token_id, bos_token_id=8, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms / scale so that a wrong mapping cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.logit_scale.fill_(1.7)
    return model


def inputs(eos):
    ids = torch.tensor([[8, 5, 6, 7, eos, 1, 1], [8, 11, 12, 13, 14, 15, eos], [8, 3, eos, 1, 1, 1, 1]])
    mask = (torch.arange(7)[None] <= (ids == eos).int().argmax(-1)[:, None]).long()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels


@pytest.mark.parametrize("eos", [9, 2])
def test_parity_with_transformers_clip(tmp_path, eos):
    ref = tiny_hf_clip(eos_token_id=eos)
    ref.save_pretrained(tmp_path)
    from seekdeep import AutoModel

    ours = AutoModel.from_pretrained(tmp_path)
    assert isinstance(ours, ClipModel)
    ids, mask, pixels = inputs(39 if eos == 2 else eos)  # eos == 2: transformers pools at the largest id
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    for name in ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-4, rtol=1e-4, msg=name)
    assert got.logits_per_image.shape == (2, 3)
    # unnormalised features also match
    with torch.no_grad():
        torch.testing.assert_close(ours.get_text_features(ids, mask), ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, atol=1e-4, rtol=1e-4)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    ours = ClipModel.from_config(ClipConfig.from_dict(tiny_hf_clip().config.to_dict()))
    with torch.no_grad():
        ours.logit_scale.fill_(2.0)
    ours.save_pretrained(tmp_path)
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids, mask, pixels = inputs(9)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.testing.assert_close(got.logits_per_text, want.logits_per_text, atol=1e-4, rtol=1e-4)
    again = ClipModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits_per_text, ours(input_ids=ids, pixel_values=pixels).logits_per_text)


def test_one_side_only_and_bad_inputs():
    model = ClipModel.from_config(ClipConfig.from_dict(tiny_hf_clip().config.to_dict()))
    ids, _, pixels = inputs(9)
    out = model(input_ids=ids)
    assert out.image_embeds is None and out.logits_per_text is None
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    with pytest.raises(ConfigError, match="input_ids"):
        model(input_ids=torch.full((1, 3), 40))
    with pytest.raises(ConfigError, match="input_ids"):
        model()
    with pytest.raises(ConfigError, match="pixel_values"):
        model(pixel_values=torch.zeros(1, 3, 8, 8))
