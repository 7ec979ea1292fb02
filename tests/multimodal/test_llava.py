"""The LLaVA-format model against transformers' LlavaForConditionalGeneration on tiny random
checkpoints, both ways: logits within 1e-4 and the same greedy generation."""

import json

import pytest
import torch

import seekdeep
from seekdeep.errors import ConfigError
from seekdeep.multimodal.llava import ImagePlaceholderError, LlavaForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMAGE = 99
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, eos_token_id=None, bos_token_id=1)


def _hf_config(kind="clip", **kw):
    if kind == "clip":
        vision = transformers.CLIPVisionConfig(**VISION)
        extra = {}
    else:
        vision = transformers.SiglipVisionConfig(**VISION)
        extra = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1}
    return transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE,
                                    image_seq_length=16, **{**extra, **kw})


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _inputs(n_rows=2):
    torch.manual_seed(2)
    rows = [[1, 5, 6] + [IMAGE] * 16 + [7, 8, 9], [1, 11] + [IMAGE] * 16 + [12, 13, 14, 15]][:n_rows]
    return torch.tensor(rows), torch.randn(n_rows, 3, 32, 32)


@pytest.mark.parametrize("kind,layer", [("clip", -2), ("clip", [-3, -1]), ("siglip", -1)])
def test_transformers_checkpoint_loads_with_same_logits_and_generation(kind, layer, tmp_path):
    kw = {"vision_feature_layer": layer} if kind == "clip" else {}
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(_hf_config(kind, **kw)).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    ours = seekdeep.AutoModel.from_pretrained(tmp_path)
    assert isinstance(ours, LlavaForConditionalGeneration)
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    hf_gen = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    our_gen = ours.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    assert our_gen.tolist() == hf_gen.tolist()


def test_seekdeep_checkpoint_loads_in_transformers(tmp_path):
    config = seekdeep.AutoConfig.from_pretrained  # noqa: F841 (the llava config goes through from_hf_dict below)
    torch.manual_seed(0)
    hf_cfg = _hf_config("clip")
    from seekdeep.multimodal import LlavaConfig

    ours = LlavaForConditionalGeneration.from_config(LlavaConfig.from_hf_dict(hf_cfg.to_dict()))
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llava" and saved["text_config"]["model_type"] == "llama"
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pixels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, pixel_values=pixels).logits, hf.eval()(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)
    assert ours.generate(ids, pixel_values=pixels, max_new_tokens=6).tolist() == hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False).tolist()
    # and a second round trip through seekdeep is lossless
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_placeholder_count_must_match_images(tmp_path):
    from seekdeep.multimodal import LlavaConfig

    model = LlavaForConditionalGeneration.from_config(LlavaConfig.from_hf_dict(_hf_config().to_dict()))
    ids, pixels = _inputs()
    with pytest.raises(ImagePlaceholderError, match="32 image placeholder token.*1 image"):
        model(input_ids=ids, pixel_values=pixels[:1])
    with pytest.raises(ImagePlaceholderError, match="0 image"):
        model(input_ids=ids)
    short = ids[:, :-1].clone()
    short[0, 4] = 3  # one placeholder fewer in row 0
    with pytest.raises(ImagePlaceholderError, match="31"):
        model(input_ids=short, pixel_values=pixels)
    with pytest.raises(ConfigError, match="pixel_values"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="image_token_index"):
        LlavaConfig.from_hf_dict({**_hf_config().to_dict(), "image_token_index": 500})


def test_text_only_prompt_equals_the_language_model():
    from seekdeep.multimodal import LlavaConfig

    model = LlavaForConditionalGeneration.from_config(LlavaConfig.from_hf_dict(_hf_config().to_dict())).eval()
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.language_model(ids).logits)
    assert model.generate(ids, max_new_tokens=5).tolist() == model.language_model.generate(ids, max_new_tokens=5).tolist()


@pytest.mark.parametrize("backend", ["dsa", "gated"])
def test_sparse_and_gated_attention_backends_load(backend, tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(_hf_config()).eval()
    hf.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path, text_overrides={"attention_backend": backend})
    assert model.config.text_config.attention_backend == backend
    ids, pixels = _inputs()
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=4)
    assert out.shape == (2, ids.shape[1] + 4)
