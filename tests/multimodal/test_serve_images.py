"""Images through the OpenAI chat API: the official openai client against a real `seekdeep serve`
process holding a tiny LLaVA-format model and a text-only model."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image
from servers import ServerProcess

openai = pytest.importorskip("openai")

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from seekdeep.multimodal.data import SpatialVQA  # noqa: E402
from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig  # noqa: E402
from seekdeep.multimodal.processing import tokens_per_image  # noqa: E402
from seekdeep.recipes.vlm import VLMTrainConfig, build_model, build_tokenizer  # noqa: E402
from seekdeep.tokenizer import DEFAULT_CHAT_TEMPLATE  # noqa: E402

QUESTION = "question: how many objects are there ? answer:"


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-serve")
    torch.manual_seed(0)
    tok = build_tokenizer()
    vlm = build_model(VLMTrainConfig(output_dir=str(root), hidden_size=32), tok)
    vlm.save_pretrained(root / "vlm")
    tok.save_pretrained(root / "vlm")
    ImageProcessor(ImageProcessorConfig.clip(48)).save_pretrained(root / "vlm")
    text = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256, eos_token_id=tok.eos_token_id))
    text.init_weights()
    text.save_pretrained(root / "text")
    tok.save_pretrained(root / "text")
    return root


@pytest.fixture(scope="module")
def server(dirs):
    proc = ServerProcess([str(dirs / "vlm"), str(dirs / "text"), "--max-images", "2", "--max-image-pixels", "3000",
                          "--kv-cache-memory", "16MiB"], dirs / "server.log")
    try:
        proc.wait_ready(180)
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=f"{server}/v1", max_retries=0, timeout=120)


def _local_answer(dirs, image: Image.Image | None, question: str, max_tokens: int = 4) -> str:
    from seekdeep.auto import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(dirs / ("vlm" if image is not None else "text"))
    tok = AutoTokenizer.from_pretrained(dirs / "vlm")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    content = ("<image> " if image is not None else "") + question
    ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pixels = None
    if image is not None:
        per = tokens_per_image(model.config)
        ids = [t for i in ids for t in ([i] * per if i == model.config.image_token_index else [i])]
        pixels = ImageProcessor.from_pretrained(dirs / "vlm")([image])["pixel_values"]
    kwargs = {"pixel_values": pixels} if pixels is not None else {}
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, **kwargs)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True)


def _ask(client, model, image, question, max_tokens=4):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _png(image)}})
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_image_and_text_requests_batched_together_match_local_generation(client, dirs):
    images = [SpatialVQA("test", 0, 48)[i].image for i in range(3)]
    expected = [_local_answer(dirs, im, QUESTION) for im in images] + [_local_answer(dirs, None, QUESTION)]
    jobs = [("vlm", im) for im in images] + [("text", None)]
    with ThreadPoolExecutor(4) as pool:  # concurrent: the engine batches image and text-only rows together
        got = list(pool.map(lambda job: _ask(client, job[0], job[1], QUESTION), jobs))
    assert got == expected
    assert len(set(got[:3])) >= 1
    # a text-only prompt to the VLM is the plain LM on its own
    assert _ask(client, "vlm", None, QUESTION) == _local_answer_text_on_vlm(dirs)


def _local_answer_text_on_vlm(dirs):
    from seekdeep.auto import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(dirs / "vlm")
    tok = AutoTokenizer.from_pretrained(dirs / "vlm")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return tok.decode(model.generate(torch.tensor([ids]), max_new_tokens=4)[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("url, code", [
    ("https://example.com/cat.png", "remote_image_url"),
    ("data:image/png;base64,@@@not-base64@@@", "invalid_image"),
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), "invalid_image"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    (_png(Image.new("RGB", (64, 64))), "invalid_image"),  # 4096 pixels > --max-image-pixels 3000
])
def test_bad_images_are_400s_and_the_server_lives(client, server, url, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
    assert info.value.body["code"] == code
    assert httpx.get(f"{server}/health").status_code == 200


def test_too_many_images_and_images_to_a_text_model(client):
    small = _png(Image.new("RGB", (48, 48), (255, 0, 0)))
    part = {"type": "image_url", "image_url": {"url": small}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": [part, part, part]}])
    assert info.value.body["code"] == "too_many_images"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="text", max_tokens=2, messages=[{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])
    assert info.value.body["code"] == "images_not_supported"
    with pytest.raises(openai.BadRequestError):  # the image token typed as text has no image behind it
        client.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": "<image> " + QUESTION}])
