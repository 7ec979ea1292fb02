"""The OpenAI-compatible server, exercised with the official ``openai`` client against a real
``seekdeep serve`` subprocess on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from seekdeep.auto import AutoModel, AutoTokenizer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dirs):
    small, _ = model_dirs
    return AutoModel.from_pretrained(small).eval(), AutoTokenizer.from_pretrained(small)


def _expected_text(local, ids: list[int], n: int) -> tuple[str, int]:
    model, tok = local
    out = model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id) + 1]
    return tok.decode(out, skip_special_tokens=True), len(out)


def _kv_idle(server, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        models = httpx.get(f"{server.url}/health").json()["models"]
        if all(m["kv_cache_usage"] == 0 and m["running"] == 0 for m in models.values()) or time.monotonic() > deadline:
            return models
        time.sleep(0.1)


def test_lists_models_and_the_router(client):
    assert [m.id for m in client.models.list().data] == ["small", "large", "auto"]


def test_completion_greedy_matches_the_library(client, local):
    prompt = "def add(a, b):\n"
    ids = local[1].encode(prompt)
    r = client.completions.create(model="small", prompt=prompt, max_tokens=10, temperature=0)
    text, n = _expected_text(local, ids, 10)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert r.model == "small" and r.object == "text_completion"


def test_chat_completion_applies_the_chat_template(client, local):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "print hello"}]
    ids = local[1].apply_chat_template(messages, add_generation_prompt=True)
    r = client.chat.completions.create(model="small", messages=messages, max_completion_tokens=8, temperature=0)
    text, n = _expected_text(local, ids, 8)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)


def test_streaming_equals_non_streaming_and_ends_with_done(client, server):
    body = {"model": "small", "prompt": "import os\n", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = client.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"},
                                      extra_body={"ignore_eos": True})
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain.choices[0].text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"

    stream = client.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"}, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_chat_streaming_with_usage(client):
    messages = [{"role": "user", "content": "def f():"}]
    plain = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n_seed_stop_and_logprobs(client):
    kwargs = dict(model="small", prompt="class Foo:\n", max_tokens=12, temperature=1.0, top_p=0.9, seed=5, n=2,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24

    greedy = client.completions.create(model="small", prompt="x = ", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    stopped = client.completions.create(model="small", prompt="x = ", max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy[: greedy.index(stop)]

    r = client.completions.create(model="small", prompt="x = ", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # greedy: the chosen token is the most likely one
    assert all(v <= 0 and abs(v - max(top.values())) < 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    chat = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)


def test_embeddings_are_pooled_hidden_states_and_cached(client, server, local):
    model, tok = local
    before = httpx.get(f"{server.url}/metrics").text
    r = client.embeddings.create(model="small", input=["x = 1", "x = 1", "y = 2"])  # the client asks for base64
    vectors = [np.asarray(d.embedding) for d in r.data]
    assert len(vectors) == 3 and vectors[0].shape == (model.config.hidden_size,)
    np.testing.assert_array_equal(vectors[0], vectors[1])
    with torch.no_grad():
        hidden = model(torch.tensor([tok.encode("y = 2")])).hidden_states[0].mean(0)
    np.testing.assert_allclose(vectors[2], hidden.numpy(), atol=1e-5)
    as_floats = httpx.post(f"{server.url}/v1/embeddings", json={"model": "small", "input": "y = 2"}).json()
    np.testing.assert_allclose(as_floats["data"][0]["embedding"], vectors[2], atol=1e-6)

    def hits(text):
        prefix = 'seekdeep_embedding_cache_hits_total{model="small"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    after = httpx.get(f"{server.url}/metrics").text
    assert hits(after) - hits(before) >= 2


def test_auto_routes_by_complexity(client):
    short = client.completions.create(model="auto", prompt="x", max_tokens=4, temperature=0)
    long = client.completions.create(model="auto", prompt="x", max_tokens=100, temperature=0)
    named = client.completions.create(model="large", prompt="x", max_tokens=2, temperature=0)
    assert (short.model, long.model, named.model) == ("small", "large", "large")


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=5), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0), "top_p"),
    (dict(prompt=[1] * 2000), "prompt"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(presence_penalty=1.0), None),
])
def test_invalid_input_is_a_400_with_an_openai_error_body(client, kwargs, param):
    args = dict(model="small", prompt="x", max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    err = info.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param and param in err["message"]


def test_other_error_statuses(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-99", prompt="x")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="small", messages=[])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": " ".join(map(str, range(3000)))}])
    bad_json = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="small", prompt="x", max_tokens=3, temperature=0)
    # the same 40-token prompt twice: the second request finds its full blocks in the prefix cache
    long_prompt = list(range(100, 140))
    first, second = (client.completions.create(model="large", prompt=long_prompt, max_tokens=4, temperature=0)
                     for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("seekdeep_num_requests_running", "seekdeep_num_requests_waiting", "seekdeep_kv_cache_usage_ratio",
                 "seekdeep_time_to_first_token_seconds_bucket", "seekdeep_time_per_output_token_seconds_bucket",
                 "seekdeep_generation_tokens_total", "seekdeep_embedding_cache_misses_total",
                 "seekdeep_prefix_cache_hit_rate"):
        assert name in text, name
    assert "# TYPE seekdeep_time_to_first_token_seconds histogram" in text
    hits = [float(line.split()[-1]) for line in text.splitlines()
            if line.startswith('seekdeep_prefix_cache_hit_tokens{model="large"}')]
    assert hits and hits[0] >= 32  # 2 full blocks of 16 tokens
    assert 0 < httpx.get(f"{server.url}/health").json()["models"]["large"]["prefix_cache_hit_rate"] <= 1


def test_usage_reports_prefix_cache_hits_as_cached_tokens(client, server):
    # a 40-token prompt no other test sends: cold first (0 cached), then its 2 full blocks of 16 are hits
    prompt = list(range(300, 340))
    cold = client.completions.create(model="small", prompt=prompt, max_tokens=3, temperature=0)
    warm = client.completions.create(model="small", prompt=prompt, max_tokens=3, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == 32 and warm.usage.prompt_tokens == 40
    assert warm.choices[0].text == cold.choices[0].text
    # n = 2 siblings of a new prompt: the prompt is counted once and was computed by this request
    fresh = list(range(400, 440))
    both = client.completions.create(model="small", prompt=fresh, max_tokens=3, temperature=1.0, seed=1, n=2)
    assert both.usage.prompt_tokens == 40 and both.usage.prompt_tokens_details.cached_tokens == 0
    # a longer prompt sharing the first 40 tokens: 2 cached blocks; streaming usage carries the same field
    longer = prompt + list(range(500, 520))
    stream = client.completions.create(model="small", prompt=longer, max_tokens=3, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = list(stream)[-1].usage
    assert usage.prompt_tokens == 60 and usage.prompt_tokens_details.cached_tokens == 32
    # chat: the same conversation twice
    messages = [{"role": "system", "content": "You answer in Python, briefly and exactly. " * 4},
                {"role": "user", "content": "print hello"}]
    first, second = (client.chat.completions.create(model="small", messages=messages, max_tokens=3, temperature=0)
                     for _ in range(2))
    bs = 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // bs * bs > 0


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(server):
    body = {"model": "small", "prompt": "def main():\n", "max_tokens": 800, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert httpx.get(f"{server.url}/health").json()["models"]["small"]["kv_cache_usage"] > 0
    models = _kv_idle(server)
    assert models["small"]["kv_cache_usage"] == 0 and models["small"]["running"] == 0


def test_health_and_503_while_loading():
    from fastapi.testclient import TestClient

    from seekdeep.serve.server import ServerConfig, create_app

    release = threading.Event()

    def slow_loader(config):
        release.wait(30)
        raise RuntimeError("weights are corrupt")

    app = create_app(ServerConfig(model_dirs=["unused"]), loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["Retry-After"]
        assert c.get("/health").json() == {"status": "loading"}
        release.set()
        for _ in range(100):
            if c.get("/health").json()["status"] == "error":
                break
            time.sleep(0.02)
        r = c.post("/v1/completions", json={"model": "x", "prompt": "y"})
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- a second server:
# one sequence at a time, no queue, an API key


@pytest.fixture(scope="module")
def guarded(model_dirs, tmp_path_factory, server_process):
    small, _ = model_dirs
    proc = server_process([str(small), "--model-name", "only", "--api-key", "sekrit", "--max-num-seqs", "1",
                          "--max-queue", "0", "--shutdown-timeout", "60"],
                         tmp_path_factory.mktemp("guarded-log") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_api_key_is_required(guarded):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(api_key="wrong", base_url=f"{guarded.url}/v1", max_retries=0).models.list()
    assert info.value.body["code"] == "invalid_api_key"
    ok = openai.OpenAI(api_key="sekrit", base_url=f"{guarded.url}/v1", max_retries=0)
    assert [m.id for m in ok.models.list().data] == ["only"]


def test_queue_full_is_a_429_with_retry_after(guarded):
    headers = {"Authorization": "Bearer sekrit"}
    body = {"model": "only", "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=60) as resp:
        lines = resp.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)  # the only batch slot is now taken
        assert resp.status_code == 200
        second = httpx.post(f"{guarded.url}/v1/completions", headers=headers,
                            json={"model": "only", "prompt": "y", "max_tokens": 2})
        assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(api_key="sekrit", base_url=f"{guarded.url}/v1", max_retries=0).completions.create(
                model="only", prompt="z", max_tokens=2)


def _wait_for_free_slot(server, headers, timeout: float = 60.0) -> None:
    """The previous test's stream was closed by the client; the server aborts that request
    when it notices the disconnect, which on a loaded machine can take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        probe = httpx.post(f"{server.url}/v1/completions", headers=headers,
                           json={"model": "only", "prompt": "x", "max_tokens": 1}, timeout=60)
        if probe.status_code != 429 or time.monotonic() > deadline:
            assert probe.status_code == 200, probe.text
            return
        time.sleep(0.2)


def test_graceful_shutdown_drains_requests_in_flight(guarded, model_dirs):
    headers = {"Authorization": "Bearer sekrit"}
    _wait_for_free_slot(guarded, headers)
    body = {"model": "only", "prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        head = []
        while not (head and head[-1].startswith("data: ")):  # a token is out: the request is in flight
            head.append(next(lines))
        guarded.proc.send_signal(signal.SIGTERM)
        rest = [*head, *lines]
    data = [line for line in rest if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, so -15 is a clean exit too
    assert guarded.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in guarded.log()
    # the output lengths it learnt are saved next to the model for the next start
    from seekdeep.serve.length_predictor import FILE_NAME, LengthPredictor

    saved = model_dirs[0] / FILE_NAME
    assert saved.is_file() and LengthPredictor.load(saved).count >= 1
