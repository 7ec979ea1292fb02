"""`/v1/embeddings` for a CLIP-layout model (what `seekdeep align` saves): text and images in one
space through the official openai client against a real `seekdeep serve` process."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from servers import ServerProcess

openai = pytest.importorskip("openai")

from seekdeep.multimodal.align_data import PROMPT, WordTokenizer, caption_words, image_processor  # noqa: E402
from seekdeep.multimodal.clip import ClipConfig, ClipModel, ClipTextConfig  # noqa: E402
from seekdeep.multimodal.config import VisionConfig  # noqa: E402


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-serve") / "clip"
    tok = WordTokenizer(caption_words())
    torch.manual_seed(0)
    text = ClipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=16, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          image_size=16, patch_size=4)
    model = ClipModel(ClipConfig(text_config=text, vision_config=vision, projection_dim=24))
    model.init_weights(std=0.3)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    image_processor(16).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def client(clip_dir):
    server = ServerProcess([str(clip_dir), "--max-images", "3"], clip_dir.parent / "server.log")
    try:
        server.wait_ready(120)
        yield openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=60), server.url
    finally:
        server.stop()


def _local(clip_dir, texts=(), images=()):
    model = ClipModel.from_pretrained(clip_dir)
    tok = WordTokenizer.from_pretrained(clip_dir)
    out = {}
    with torch.no_grad():
        if texts:
            batch = tok(list(texts))
            out["text"] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
        if images:
            pixels = image_processor(16)(list(images))["pixel_values"]
            out["image"] = model(pixel_values=pixels).image_embeds
    return out


def test_text_and_image_embeddings_match_the_model_in_one_space(client, clip_dir):
    api, _ = client
    texts = [PROMPT.format("seven"), "the digit two"]
    images = [_image(0), _image(1)]
    # one request, mixed modalities, order kept
    reply = api.embeddings.create(model="clip", input=[
        texts[0], {"type": "image_url", "image_url": {"url": _png(images[0])}},
        {"type": "text", "text": texts[1]}, {"type": "image_url", "image_url": {"url": _png(images[1])}}])
    got = torch.tensor([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])
    local = _local(clip_dir, texts, images)
    expected = torch.stack([local["text"][0], local["image"][0], local["text"][1], local["image"][1]])
    assert got.shape == (4, 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)
    # the plain string form (openai's own types) gives the same text vectors; a repeat is a cache hit
    again = api.embeddings.create(model="clip", input=texts)
    torch.testing.assert_close(torch.tensor([d.embedding for d in again.data]), local["text"], atol=1e-5, rtol=1e-4)
    assert again.usage.prompt_tokens == sum(len(t.split()) + 2 for t in texts)


def test_models_list_and_health_describe_the_embedding_model(client):
    api, url = client
    card = httpx.get(f"{url}/v1/models/clip").json()
    assert card["kind"] == "embedding" and card["dimensions"] == 24 and card["modalities"] == ["text", "image"]
    assert [m.id for m in api.models.list().data] == ["clip"]
    assert httpx.get(f"{url}/health").json()["embedding_models"]["clip"]["dimensions"] == 24


@pytest.mark.parametrize("payload, code", [
    ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}, "remote_image_url"),
    ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}, "invalid_image"),
    ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}] * 4}, "too_many_images"),
    ({"input": "x " * 40}, "context_length_exceeded"),
    ({"input": "hello", "dimensions": 7}, None),
])
def test_bad_embedding_inputs_are_400s(client, payload, code):
    _, url = client
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "clip", **payload}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] in ("input", "dimensions")
    if code is not None:
        assert err["code"] == code


def test_generation_routes_refuse_the_embedding_model(client):
    api, _ = client
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="clip", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.body["code"] == "embedding_model"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="clip", prompt="hi", max_tokens=2)


def test_concurrent_requests_get_their_own_vectors(client, clip_dir):
    from concurrent.futures import ThreadPoolExecutor

    api, _ = client
    images = [_image(10 + i) for i in range(4)]
    local = _local(clip_dir, images=images)["image"]

    def one(i):
        reply = api.embeddings.create(model="clip", input=[{"type": "image_url", "image_url": {"url": _png(images[i])}}])
        return torch.tensor(reply.data[0].embedding)

    with ThreadPoolExecutor(4) as pool:  # worker threads share the model and its cache
        got = list(pool.map(one, [0, 1, 2, 3, 0, 1]))
    for i, vector in zip([0, 1, 2, 3, 0, 1], got):
        torch.testing.assert_close(vector, local[i], atol=1e-5, rtol=1e-4)


# -- a CLIP embedding model beside language models in one `seekdeep serve` process


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """Two tiny random llamas sharing one byte-level BPE (a routed pair: 'small' first)."""
    from seekdeep.data import stdlib_files
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM
    from seekdeep.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm-serve")
    tok = train_tokenizer([str(p) for p in stdlib_files(limit_bytes=200_000)], vocab_size=512)
    dirs = []
    for name, layers in (("small", 1), ("large", 2)):
        torch.manual_seed(layers)
        cfg = LlamaConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256, bos_token_id=None,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_hidden_layers=layers)
        model = LlamaForCausalLM(cfg)
        model.init_weights()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


@pytest.fixture(scope="module")
def mixed(lm_dirs, clip_dir):
    small, large = lm_dirs
    # the encoder between the pair: the router and the compact/full order count language models only
    server = ServerProcess([str(small), str(clip_dir), str(large), "--route-threshold", "8", "--num-blocks", "64"],
                           clip_dir.parent / "mixed.log")
    try:
        server.wait_ready(180)
        yield openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=60), server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_clip_served_beside_language_models(mixed, clip_dir, lm_dirs):
    from seekdeep.auto import AutoModel, AutoTokenizer

    api, url = mixed
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert sorted(cards) == ["auto", "clip", "large", "small"]
    assert cards["clip"]["kind"] == "embedding" and cards["small"].get("kind") != "embedding"
    health = httpx.get(f"{url}/health").json()
    assert sorted(health["models"]) == ["large", "small"] and list(health["embedding_models"]) == ["clip"]

    # each language model answers completions with its own greedy continuation
    for name, path in zip(("small", "large"), lm_dirs):
        model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        ids = tok.encode("def add(a, b):")
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=4)[0, len(ids):].tolist()  # greedy
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        reply = api.completions.create(model=name, prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert reply.model == name and reply.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    # "auto" routes between the language models, never to the encoder
    short = api.completions.create(model="auto", prompt="x", max_tokens=2, temperature=0)
    long = api.completions.create(model="auto", prompt="x", max_tokens=20, temperature=0)
    assert (short.model, long.model) == ("small", "large")
    # the embedding model answers /v1/embeddings with text and images in one space; a completion sent to it is a 400
    image = _image(3)
    reply = api.embeddings.create(model="clip", input=["the digit two", {"type": "image_url", "image_url": {"url": _png(image)}}])
    local = _local(clip_dir, ["the digit two"], [image])
    torch.testing.assert_close(torch.tensor([d.embedding for d in reply.data]), torch.cat([local["text"], local["image"]]),
                               atol=1e-5, rtol=1e-4)
    for call in (lambda: api.completions.create(model="clip", prompt="hi", max_tokens=2),
                 lambda: api.chat.completions.create(model="clip", messages=[{"role": "user", "content": "hi"}], max_tokens=2)):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400 and info.value.body["code"] == "embedding_model"
    # a language model's /v1/embeddings stays its pooled hidden states (text only; image parts are the encoder's)
    lm = api.embeddings.create(model="small", input="def add(a, b):")
    assert len(lm.data[0].embedding) == AutoModel.from_pretrained(lm_dirs[0]).config.hidden_size != 24
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "small", "input": [{"type": "image_url", "image_url": {"url": _png(image)}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


@pytest.mark.parametrize("encoder_at", [0, 2], ids=["encoder-first", "encoder-last"])
def test_draft_speculation_pairs_the_language_models_around_an_encoder(lm_dirs, clip_dir, encoder_at):
    """--speculative draft: the first language model drafts for the last one, wherever the
    embedding model's directory sits in the list."""
    from seekdeep.serve.encoders import EncoderModel
    from seekdeep.serve.engine import EngineConfig
    from seekdeep.serve.server import ServerConfig, load_served_models

    dirs = [str(p) for p in lm_dirs]
    dirs.insert(encoder_at, str(clip_dir))
    served = load_served_models(ServerConfig(model_dirs=dirs, speculative="draft", engine=EngineConfig(num_blocks=32)))
    try:
        lms = {m.name: m for m in served if not isinstance(m, EncoderModel)}
        assert sorted(lms) == ["large", "small"] and [m.name for m in served if isinstance(m, EncoderModel)] == ["clip"]
        assert lms["large"].engine.engine.speculator is not None and lms["small"].engine.engine.speculator is None
    finally:
        for m in served:
            if not isinstance(m, EncoderModel):
                m.engine.shutdown(drain=False)


def test_draft_speculation_needs_two_language_models(lm_dirs, clip_dir):
    from seekdeep.errors import ConfigError
    from seekdeep.serve.server import ServerConfig, load_served_models

    with pytest.raises(ConfigError, match="speculative"):  # two directories, but one is an embedding model
        load_served_models(ServerConfig(model_dirs=[str(clip_dir), str(lm_dirs[0])], speculative="draft"))
