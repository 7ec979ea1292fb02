"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over :class:`~seekdeep.serve.engine.AsyncEngine`.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``
(with SSE streaming ending in ``data: [DONE]``), ``/health`` and ``/metrics`` (Prometheus).
This layer owns everything textual: tokenization, the chat template, detokenization and stop
strings; the engine below sees token ids only.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for invalid
input (prompt longer than the context included), 401 for a wrong API key, 404 for an unknown
model, 429 with ``Retry-After`` when the queue is full, 503 while the models load or the
server drains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from seekdeep.errors import ConfigError, GenerationError, SeekdeepError
from seekdeep.validate import check_device, check_float, check_int
from seekdeep.serve.detokenizer import IncrementalDetokenizer
from seekdeep.serve.embeddings import EmbeddingCache
from seekdeep.serve.engine import AsyncEngine, Engine, EngineConfig, EngineDeadError, QueueFullError
from seekdeep.serve.length_predictor import FILE_NAME as LENGTH_PREDICTOR_FILE, LengthPredictor
from seekdeep.serve.metrics import ServerMetrics
from seekdeep.serve.encoders import EncoderModel, decode_data_url, is_encoder_dir, load_encoder
from seekdeep.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageURLPart,
    TextPart,
)
from seekdeep.serve.router import ROUTER_NAME, ComplexityRouter
from seekdeep.serve.sampling import SamplingParams, TokenLogprobs

log = logging.getLogger("seekdeep.serve")


# ----------------------------------------------------------------------------- configuration


@dataclass
class ServerConfig:
    """``model_dirs``: Hugging Face layout directories, smallest first (routing sends simple
    requests to the first). ``model_names``: served ids (default: directory names).
    ``max_queue``: requests allowed to wait for a batch slot before 429."""

    model_dirs: list[str]
    model_names: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queue: int = 256
    max_images: int = 8  # per chat request (vision-language models)
    max_image_pixels: int = 4096 * 4096  # per decoded image
    route_threshold: int = 256
    embedding_cache_size: int = 1024
    dtype: str | None = None
    device: str | None = None
    shutdown_timeout: float = 30.0
    speculative: str = "none"  # "draft": the first (compact) model drafts for the last; "ngram": prompt lookup
    num_speculative_tokens: int = 4

    def __post_init__(self) -> None:
        if not self.model_dirs:
            raise ConfigError("model_dirs", "serve needs at least one model directory")
        check_int("max_images", self.max_images, 1, 1024)
        check_int("max_image_pixels", self.max_image_pixels, 1, 1 << 30)  # decoded pixels; past it a decompression bomb
        names = self.model_names or [Path(d).resolve().name for d in self.model_dirs]
        if len(names) != len(self.model_dirs):
            raise ConfigError("model_name", f"got {len(names)} names for {len(self.model_dirs)} model directories; "
                              "give one --model-name per directory or none")
        if len(set(names)) != len(names):
            raise ConfigError("model_name", f"served model names must be unique, got {names}")
        if ROUTER_NAME in names:
            raise ConfigError("model_name", f"{ROUTER_NAME!r} is reserved for routing")
        self.model_names = names
        check_int("port", self.port, 0, 65535)
        check_int("max_queue", self.max_queue, 0, 1 << 20)
        check_int("route_threshold", self.route_threshold, 1, 1 << 24)
        check_int("embedding_cache_size", self.embedding_cache_size, 0, 1 << 24)  # 0 disables
        check_float("shutdown_timeout", self.shutdown_timeout, 0, 86400, lo_open=True)
        check_device("device", self.device)
        from seekdeep.serve.speculative import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS

        if self.speculative not in SPECULATIVE_METHODS:
            raise ConfigError("speculative", f"got {self.speculative!r}; accepted: {', '.join(SPECULATIVE_METHODS)}")
        check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.speculative == "draft" and len(self.model_dirs) < 2:
            raise ConfigError("speculative", "'draft' needs a routed pair: the compact model's directory first, the "
                              "full model's last; with one model use 'ngram'")


@dataclass
class ServedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    engine: AsyncEngine
    embedding_cache: EmbeddingCache
    created: int = field(default_factory=lambda: int(time.time()))
    image_processor: Any = None  # set for vision-language models: they accept image_url parts

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _speculation(config: ServerConfig, loaded: list, model, tokenizer) -> dict:
    """Engine arguments for speculative decoding of the model being loaded: with "draft" the
    last (full) model gets the first (compact) one as its drafter, with "ngram" every model
    uses prompt lookup."""
    from seekdeep.serve.speculative import SpeculativeConfig

    if config.speculative == "ngram":
        return {"speculative": SpeculativeConfig("ngram", config.num_speculative_tokens)}
    # embedding models (CLIP directories) neither draft nor get drafted for: count language models only
    loaded = [m for m in loaded if not isinstance(m, EncoderModel)]
    lm_dirs = [d for d in config.model_dirs if not is_encoder_dir(d)]
    if config.speculative == "draft" and len(lm_dirs) < 2:
        raise ConfigError("speculative", "'draft' needs two language models (embedding models do not draft)")
    if config.speculative != "draft" or len(loaded) != len(lm_dirs) - 1:
        return {}
    compact = loaded[0]
    def vocab(tok) -> dict:
        backend = getattr(tok, "backend_tokenizer", None)  # seekdeep's Tokenizer and transformers' fast ones
        return (backend or tok).get_vocab()

    if getattr(compact, "tokenizer", None) is None or vocab(compact.tokenizer) != vocab(tokenizer):
        raise ConfigError("speculative", f"the compact model {compact.name!r} does not share the full model's "
                          "tokenizer; drafting needs the same vocabulary")
    return {"speculative": SpeculativeConfig("draft", config.num_speculative_tokens), "draft_model": compact.model}


def load_served_models(config: ServerConfig) -> list[ServedModel]:
    """Load every model directory with its tokenizer and start an engine for it."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.tokenizer import DEFAULT_CHAT_TEMPLATE

    served = []
    for path, name in zip(config.model_dirs, config.model_names):
        if is_encoder_dir(path):  # a CLIP dual encoder: /v1/embeddings only, no engine
            served.append(load_encoder(path, name, dtype=config.dtype, device=config.device,
                                       cache_size=config.embedding_cache_size, max_pixels=config.max_image_pixels))
            log.info("loaded %s from %s (embedding model: text and images)", name, path)
            continue
        model = AutoModel.from_pretrained(path, dtype=config.dtype, device=config.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
        # learnt output lengths live next to the model, so a restarted server keeps them
        predictor = LengthPredictor.load(Path(path) / LENGTH_PREDICTOR_FILE)
        engine = AsyncEngine(Engine(model, config.engine, eos_token_id=eos, **_speculation(config, served, model, tokenizer), length_predictor=predictor),
                             max_waiting=None)
        engine.start()
        served.append(ServedModel(name, str(path), model, tokenizer, engine, EmbeddingCache(config.embedding_cache_size),
                                  image_processor=_image_processor_for(model, path)))
        log.info("loaded %s from %s (decode path: %s, %d KV blocks)", name, path,
                 engine.engine.runner.decode_path, engine.engine.allocator.num_usable)
    return served


# ----------------------------------------------------------------------------- images (vision-language models)


def _image_processor_for(model, path):
    """The image processor of a LLaVA-format model directory (preprocessor_config.json, or the
    vision tower's family default); None for a text-only model."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llava":
        return None
    from seekdeep.multimodal.image_processing import PROCESSOR_NAME, ImageProcessor, ImageProcessorConfig

    if (Path(path) / PROCESSOR_NAME).is_file():
        return ImageProcessor.from_pretrained(path)
    vision = config.vision_config
    size = vision.image_size
    if vision.model_type == "siglip_vision_model":
        return ImageProcessor(ImageProcessorConfig.siglip(size))
    return ImageProcessor(ImageProcessorConfig.clip(size))


def _decode_images(messages, config: ServerConfig) -> list:
    """Every image_url part of the conversation, decoded, in order. Only inline ``data:`` URLs
    with base64 image bytes are accepted: the server fetches nothing from the network."""
    urls = [url for m in messages for url in m.image_urls()]
    if len(urls) > config.max_images:
        raise APIError(400, f"messages: {len(urls)} images in one request; the limit is {config.max_images}",
                       param="messages", code="too_many_images")
    return [decode_data_url(url, f"messages: image {i}", "messages", config.max_image_pixels)
            for i, url in enumerate(urls)]


def _expand_image_tokens(served: ServedModel, ids: list[int], num_images: int) -> list[int]:
    """Each image marker of the templated prompt becomes the model's placeholder tokens."""
    from seekdeep.multimodal.processing import tokens_per_image

    config = served.model.config
    found = ids.count(config.image_token_index)
    if found != num_images:
        raise APIError(400, f"messages: the conversation holds {found} image placeholder(s) for {num_images} image(s); "
                       "send images as image_url parts and do not write the image token in text", param="messages")
    per = tokens_per_image(config)
    out: list[int] = []
    for t in ids:
        out.extend([t] * per if t == config.image_token_index else [t])
    return out


# ----------------------------------------------------------------------------- app state


class _State:
    def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], list[ServedModel]]):
        self.config = config
        self.loader = loader
        self.models: dict[str, ServedModel] = {}
        self.encoders: dict[str, EncoderModel] = {}  # embedding-only models (no engine)
        self.router: ComplexityRouter | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.loading_thread: threading.Thread | None = None

    def load(self) -> None:
        try:
            loaded = self.loader(self.config)
            self.encoders = {m.name: m for m in loaded if isinstance(m, EncoderModel)}
            served = [m for m in loaded if not isinstance(m, EncoderModel)]
            self.models = {m.name: m for m in served}
            names = [m.name for m in served]
            if served:
                self.router = ComplexityRouter(names, {m.name: m.max_model_len for m in served},
                                               self.config.route_threshold)
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            log.exception("model loading failed")
            self.load_error = f"{type(exc).__name__}: {exc}"


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _generation_error(exc: SeekdeepError, default_param: str | None = None) -> APIError:
    field_name = getattr(exc, "field", None) or default_param
    code = "context_length_exceeded" if "context" in str(exc) else None
    return APIError(400, str(exc), param=field_name, code=code)


# ----------------------------------------------------------------------------- per-choice generation


@dataclass
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens this choice found in the prefix cache
    first_token_at: float | None = None
    finished_at: float | None = None


async def _run_choice(served: ServedModel, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      choice: _Choice, emit: Callable[[tuple], None] | None, metrics: ServerMetrics, arrival: float,
                      pixel_values=None) -> None:
    """Drive one choice through the engine; ``emit((index, text, logprobs, finish_reason))``
    per delta when streaming. Leaving early (cancellation, stop string) aborts the request."""
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    gen = served.engine.generate(request_id, prompt_ids, params, **images)
    try:
        async with contextlib.aclosing(gen):
            async for out in gen:
                now = time.monotonic()
                if choice.first_token_at is None and out.new_token_ids:
                    choice.first_token_at = now
                    metrics.ttft.labels(served.name).observe(now - arrival)
                text = choice.detok.add(out.new_token_ids, final=out.finished)
                choice.token_ids.extend(out.new_token_ids)
                choice.logprobs.extend(out.new_logprobs)
                choice.num_cached_tokens = out.num_cached_tokens
                finish = None
                if choice.detok.stopped:
                    finish = "stop"
                elif out.finished:
                    finish = out.finish_reason
                if emit is not None and (text or finish or out.new_logprobs):
                    emit((choice.index, text, out.new_logprobs, finish))
                if finish is not None:
                    choice.finish_reason = finish
                    break
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client, the server carries on
        if emit is not None:
            emit((choice.index, exc, None, None))
            return
        raise
    finally:
        choice.finished_at = time.monotonic()
    n = len(choice.token_ids)
    metrics.generation_tokens.labels(served.name).inc(n)
    metrics.finished.labels(served.name, choice.finish_reason or "abort").inc()
    metrics.e2e.labels(served.name).observe(choice.finished_at - arrival)
    if n > 1 and choice.first_token_at is not None:
        metrics.tpot.labels(served.name).observe((choice.finished_at - choice.first_token_at) / (n - 1))


def _cached_tokens(choices: list[_Choice], n: int) -> int:
    """``usage.prompt_tokens_details.cached_tokens``: per prompt (counted once, like
    ``prompt_tokens``), the tokens found in the prefix cache by the first of its ``n`` choices
    to be admitted -- the least of them, since siblings admitted later reuse the blocks the
    first one computed for this very request."""
    return sum(min(c.num_cached_tokens for c in choices[i : i + n]) for i in range(0, len(choices), n))


async def _wait_or_disconnect(request: Request, tasks: list[asyncio.Task]) -> bool:
    """Wait for the tasks; cancel them and return False if the client goes away first."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=0.5)
        if pending and await request.is_disconnected():
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return False
    return True


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------------------- the app


def create_app(config: ServerConfig, loader: Callable[[ServerConfig], list[ServedModel]] | None = None) -> FastAPI:
    """The FastAPI app. Models load in a background thread after startup (``loader``,
    default :func:`load_served_models`); until then /v1 routes answer 503."""
    state = _State(config, loader or load_served_models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loading_thread = threading.Thread(target=state.load, name="seekdeep-load", daemon=True)
        state.loading_thread.start()
        yield
        state.draining = True
        deadline = time.monotonic() + config.shutdown_timeout
        for served in state.models.values():
            await asyncio.to_thread(served.engine.shutdown, True, max(0.0, deadline - time.monotonic()))
            predictor = served.engine.engine.length_predictor
            if predictor.path is not None and predictor.count:
                predictor.save()

    app = FastAPI(title="seekdeep", lifespan=lifespan)
    app.state.seekdeep = state

    # -- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
        elif param:
            msg = f"{param}: {msg}"
        return _error_response(APIError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.http.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # -- dependencies
    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    async def require_ready(_: None = Depends(check_api_key)) -> None:
        if state.load_error is not None:
            raise APIError(503, f"model loading failed: {state.load_error}", "server_error", code="model_load_failed")
        if not state.ready:
            raise APIError(503, "the models are still loading; retry shortly", "server_error", code="model_loading",
                           headers={"Retry-After": "2"})
        if state.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")

    # -- helpers that need the state
    def pick_model(requested: str, estimate: Callable[[ServedModel], tuple[int, int]]) -> ServedModel:
        """A named model, or the router's choice for ``auto`` from (prompt tokens, new tokens)."""
        if requested in state.models:
            return state.models[requested]
        if requested in state.encoders:
            raise APIError(400, f"model: `{requested}` is an embedding model (text and image encoders); it answers "
                           "/v1/embeddings only", param="model", code="embedding_model")
        if requested == ROUTER_NAME and state.router is not None:
            first = state.models[state.router.models[0]]
            prompt_tokens, new_tokens = estimate(first)
            chosen = state.router.route(prompt_tokens, new_tokens)
            state.metrics.routed.labels(chosen).inc()
            return state.models[chosen]
        known = ", ".join([*state.models, ROUTER_NAME])
        raise APIError(404, f"The model `{requested}` does not exist; served models: {known}", param="model",
                       code="model_not_found")

    def check_capacity(served: ServedModel, new_requests: int) -> None:
        eng = served.engine
        waiting_after = eng.num_in_flight + new_requests - eng.engine.config.max_num_seqs
        if waiting_after > config.max_queue:
            raise APIError(429, f"the queue of {served.name} is full ({eng.num_waiting} waiting, limit "
                           f"{config.max_queue}); retry later", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    def sampling_params(req, served: ServedModel, max_tokens: int, prompt_len: int, choice_idx: int,
                        logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=req.top_k or 0,
                repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
                seed=None if req.seed is None else (req.seed + choice_idx) % 2**63,
                stop=list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                min_tokens=min(req.min_tokens, max_tokens),
                logprobs=logprobs,
            )
        except GenerationError as exc:
            raise _generation_error(exc) from None

    def validate_prompt(served: ServedModel, ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            served.engine.engine.validate(ids, params)
        except GenerationError as exc:
            err = _generation_error(exc, param)
            if err.param == "prompt":
                err.param = param
            raise err from None

    async def run_generation(request: Request, served: ServedModel, prompts: list[list[int]],
                             params: list[list[SamplingParams]], stream: bool, on_stream: Callable,
                             on_done: Callable, pixel_values=None) -> Response:
        """Start every (prompt, choice) and answer either as SSE (``on_stream``) or JSON (``on_done``)."""
        arrival = time.monotonic()
        check_capacity(served, sum(len(p) for p in params))
        state.metrics.prompt_tokens.labels(served.name).inc(sum(len(p) for p in prompts))
        base_id = uuid.uuid4().hex[:24]
        choices: list[_Choice] = []
        jobs = []
        for pi, (ids, plist) in enumerate(zip(prompts, params)):
            for sp in plist:
                choice = _Choice(len(choices), IncrementalDetokenizer(served.decode, sp.stop))
                choices.append(choice)
                jobs.append((f"{base_id}-{choice.index}", ids, sp, choice))

        if not stream:
            tasks = [asyncio.create_task(_run_choice(served, rid, ids, sp, ch, None, state.metrics, arrival, pixel_values))
                     for rid, ids, sp, ch in jobs]
            if not await _wait_or_disconnect(request, tasks):
                return Response(status_code=499)
            for t in tasks:
                exc = t.exception()
                if isinstance(exc, (EngineDeadError, QueueFullError)):
                    raise APIError(503 if isinstance(exc, EngineDeadError) else 429, str(exc), "server_error")
                if isinstance(exc, GenerationError):
                    raise _generation_error(exc)
                if exc is not None:
                    raise exc
            return JSONResponse(on_done(base_id, choices, sum(len(p) for p in prompts)))

        events: asyncio.Queue = asyncio.Queue()

        async def body():
            tasks = [asyncio.create_task(_run_choice(served, rid, ids, sp, ch, events.put_nowait, state.metrics, arrival,
                                                     pixel_values))
                     for rid, ids, sp, ch in jobs]
            remaining = len(tasks)
            try:
                for chunk in on_stream(base_id, choices, None):  # opening chunks (chat role, echo)
                    yield chunk
                while remaining:
                    index, text, lps, finish = await events.get()
                    if isinstance(text, BaseException):
                        yield _sse({"error": APIError(500, f"generation failed: {text}", "server_error").body()["error"]})
                        remaining -= 1
                        continue
                    for chunk in on_stream(base_id, choices, (index, text, lps, finish)):
                        yield chunk
                    if finish is not None:
                        remaining -= 1
                for chunk in on_stream(base_id, choices, "usage"):
                    yield chunk
                yield "data: [DONE]\n\n"
            finally:
                for t in tasks:
                    t.cancel()  # a client that left: every choice aborts and frees its KV blocks
                await asyncio.gather(*tasks, return_exceptions=True)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes
    @app.get("/health")
    async def health():
        if state.load_error is not None:
            return JSONResponse({"status": "error", "detail": state.load_error}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "models": {
            name: {"running": m.engine.num_running, "waiting": m.engine.num_waiting,
                   "kv_cache_usage": m.engine.kv_cache_usage, "decode_path": m.engine.engine.runner.decode_path,
                   "prefix_cache_hit_rate": m.engine.engine.prefix_cache_hit_rate}
            for name, m in state.models.items()},
            **({"embedding_models": {name: {"dimensions": m.dimensions, "cached": len(m.embedding_cache)}
                                     for name, m in state.encoders.items()}} if state.encoders else {})}

    @app.get("/metrics")
    async def metrics():
        mt = state.metrics
        for name, m in state.models.items():
            mt.requests_running.labels(name).set(m.engine.num_running)
            mt.requests_waiting.labels(name).set(m.engine.num_waiting)
            mt.kv_cache_usage.labels(name).set(m.engine.kv_cache_usage)
            mt.preemptions.labels(name).set(m.engine.engine.num_preemptions)
            sched = m.engine.engine.scheduler
            mt.prefix_cache_hit_rate.labels(name).set(sched.prefix_hit_rate)
            mt.prefix_cache_hits.labels(name).set(sched.prefix_hit_tokens)
            mt.prefix_cache_queries.labels(name).set(sched.prefix_query_tokens)
            mt.prefix_cache_blocks.labels(name).set(m.engine.engine.allocator.num_cached)
            mt.embedding_cache_size.labels(name).set(len(m.embedding_cache))
            spec = m.engine.engine.speculator
            if spec is not None:
                mt.spec_draft_tokens.labels(name).set(spec.num_draft_tokens)
                mt.spec_accepted_tokens.labels(name).set(spec.num_accepted_tokens)
                mt.spec_acceptance_rate.labels(name).set(spec.acceptance_rate)
                mt.spec_tokens_per_step.labels(name).set(spec.tokens_per_step)
        return Response(mt.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "seekdeep",
                "root": m.path, "max_model_len": m.max_model_len,
                "vocab_size": m.model.config.vocab_size}

    @app.get("/v1/models", dependencies=[Depends(require_ready)])
    async def list_models():
        data = [model_card(m) for m in state.models.values()] + [m.card() for m in state.encoders.values()]
        if len(state.models) > 1:
            data.append({"id": ROUTER_NAME, "object": "model", "created": min(m.created for m in state.models.values()),
                         "owned_by": "seekdeep", "root": None, "routes_to": list(state.models)})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(require_ready)])
    async def get_model(model_id: str):
        if model_id in state.encoders:
            return state.encoders[model_id].card()
        if model_id not in state.models:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card(state.models[model_id])

    # ---- /v1/completions
    @app.post("/v1/completions", dependencies=[Depends(require_ready)])
    async def completions(req: CompletionRequest, request: Request):
        def encode(served: ServedModel) -> list[list[int]]:
            p = req.prompt
            if isinstance(p, str):
                texts = [p]
            elif all(isinstance(x, str) for x in p):
                texts = list(p)
            elif all(isinstance(x, int) for x in p):
                return [list(p)]
            else:
                if any(len(x) == 0 for x in p):
                    raise APIError(400, "prompt: token-id prompts must not be empty", param="prompt")
                return [list(x) for x in p]
            ids = [served.tokenizer.encode(t) for t in texts]
            if any(len(x) == 0 for x in ids):
                raise APIError(400, "prompt: a prompt encodes to no tokens; send non-empty text", param="prompt")
            return ids

        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        served = pick_model(req.model, lambda m: (max(len(x) for x in encode(m)), max_tokens))
        prompts = encode(served)
        params = []
        for ids in prompts:
            plist = [sampling_params(req, served, max_tokens, len(ids), j, req.logprobs) for j in range(req.n)]
            validate_prompt(served, ids, plist[0], "prompt")
            params.append(plist)
        created = int(time.time())
        echo_texts = [served.decode(ids) if req.echo else "" for ids in prompts]

        def logprobs_obj(lps: list[TokenLogprobs], offset: int) -> dict:
            tokens = [served.tokenizer.decode([lp.token_id]) for lp in lps]
            offsets, pos = [], offset
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                    "top_logprobs": [{served.tokenizer.decode([i]): v for i, v in lp.top} for lp in lps],
                    "text_offset": offsets}

        def usage(choices) -> dict:
            prompt_tokens = sum(len(p) for p in prompts)
            completion = sum(len(c.token_ids) for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
                    "prompt_tokens_details": {"cached_tokens": _cached_tokens(choices, req.n)}}

        def chunk(base_id, choices_payload, with_usage=None) -> str:
            payload = {"id": f"cmpl-{base_id}", "object": "text_completion", "created": created, "model": served.name,
                       "choices": choices_payload}
            if req.stream_options and req.stream_options.include_usage:
                payload["usage"] = with_usage
            return _sse(payload)

        sent_chars: dict[int, int] = {}

        def on_stream(base_id, choices, event):
            if event is None:
                if req.echo:
                    for c in choices:
                        text = echo_texts[c.index // req.n]
                        sent_chars[c.index] = len(text)
                        yield chunk(base_id, [{"index": c.index, "text": text, "logprobs": None, "finish_reason": None}])
                return
            if event == "usage":
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(base_id, [], usage(choices))
                return
            index, text, lps, finish = event
            lp = None
            if req.logprobs is not None and lps:
                lp = logprobs_obj(lps, sent_chars.get(index, 0))
            sent_chars[index] = sent_chars.get(index, 0) + len(text)
            yield chunk(base_id, [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}])

        def on_done(base_id, choices, _prompt_tokens):
            out = []
            for c in choices:
                prefix = echo_texts[c.index // req.n]
                lp = logprobs_obj(c.logprobs, len(prefix)) if req.logprobs is not None else None
                out.append({"index": c.index, "text": prefix + c.detok.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            return {"id": f"cmpl-{base_id}", "object": "text_completion", "created": created, "model": served.name,
                    "choices": out, "usage": usage(choices)}

        return await run_generation(request, served, prompts, params, req.stream, on_stream, on_done)

    # ---- /v1/chat/completions
    @app.post("/v1/chat/completions", dependencies=[Depends(require_ready)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        images = _decode_images(req.messages, config)

        def encode(served: ServedModel) -> list[int]:
            vision = served.image_processor is not None
            if images and not vision:
                raise APIError(400, f"messages: model {served.name!r} is text-only; it does not accept image_url parts",
                               param="messages", code="images_not_supported")
            marker = served.tokenizer.convert_ids_to_tokens(served.model.config.image_token_index) if vision else ""
            messages = [{"role": m.role, "content": m.text(marker), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            try:
                ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except ConfigError as exc:
                raise APIError(400, f"messages: {exc}", param="messages") from None
            if not ids:
                raise APIError(400, "messages: the conversation encodes to no tokens", param="messages")
            return _expand_image_tokens(served, ids, len(images)) if vision else ids

        def estimate(m: ServedModel):
            ids = encode(m)
            return len(ids), req.token_limit or max(1, m.max_model_len - len(ids))

        served = pick_model(req.model, estimate)
        ids = encode(served)
        if len(ids) >= served.max_model_len:
            raise APIError(400, f"messages: the conversation is {len(ids)} tokens; this model's context is "
                           f"{served.max_model_len} tokens including at least one generated token",
                           param="messages", code="context_length_exceeded")
        max_tokens = req.token_limit or served.max_model_len - len(ids)
        top = (req.top_logprobs or 0) if req.logprobs else None
        plist = [sampling_params(req, served, max_tokens, len(ids), j, top) for j in range(req.n)]
        validate_prompt(served, ids, plist[0], "messages")
        created = int(time.time())

        def logprobs_obj(lps: list[TokenLogprobs]) -> dict:
            def entry(token_id: int, logprob: float) -> dict:
                text = served.tokenizer.decode([token_id])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                                for lp in lps], "refusal": None}

        def usage(choices) -> dict:
            completion = sum(len(c.token_ids) for c in choices)
            return {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion,
                    "prompt_tokens_details": {"cached_tokens": _cached_tokens(choices, req.n)}}

        def chunk(base_id, choices_payload, with_usage=None) -> str:
            payload = {"id": f"chatcmpl-{base_id}", "object": "chat.completion.chunk", "created": created,
                       "model": served.name, "choices": choices_payload}
            if req.stream_options and req.stream_options.include_usage:
                payload["usage"] = with_usage
            return _sse(payload)

        def on_stream(base_id, choices, event):
            if event is None:
                for c in choices:
                    yield chunk(base_id, [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}])
                return
            if event == "usage":
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(base_id, [], usage(choices))
                return
            index, text, lps, finish = event
            lp = logprobs_obj(lps) if req.logprobs and lps else None
            delta = {"content": text} if text else {}
            yield chunk(base_id, [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}])

        def on_done(base_id, choices, _):
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.detok.text, "refusal": None},
                    "logprobs": logprobs_obj(c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason} for c in choices]
            return {"id": f"chatcmpl-{base_id}", "object": "chat.completion", "created": created, "model": served.name,
                    "choices": out, "usage": usage(choices)}

        pixel_values = served.image_processor([im for im in images])["pixel_values"] if images else None
        return await run_generation(request, served, [ids], [plist], req.stream, on_stream, on_done, pixel_values)

    # ---- /v1/embeddings
    async def encoder_embeddings(req: EmbeddingRequest, served: EncoderModel):
        """Text and image inputs of an embedding-only model, in one shared space."""
        if req.dimensions is not None and req.dimensions != served.dimensions:
            raise APIError(400, f"dimensions: this model's embeddings have {served.dimensions} dimensions, got "
                           f"{req.dimensions}", param="dimensions")
        images = sum(isinstance(x, ImageURLPart) for x in (req.input if isinstance(req.input, list) else []))
        if images > config.max_images:  # counted before any image is decoded
            raise APIError(400, f"input: {images} images in one request; the limit is {config.max_images}",
                           param="input", code="too_many_images")
        items = served.parse(req.input)
        vectors, hits = await asyncio.to_thread(served.embed, items)
        state.metrics.embedding_cache_hits.labels(served.name).inc(hits)
        state.metrics.embedding_cache_misses.labels(served.name).inc(len(items) - hits)
        data = []
        for i, vector in enumerate(vectors):
            if req.encoding_format == "base64":
                value: Any = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(v) for kind, v in items if kind == "text")
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/embeddings", dependencies=[Depends(require_ready)])
    async def embeddings(req: EmbeddingRequest):
        if req.model in state.encoders:
            return await encoder_embeddings(req, state.encoders[req.model])

        def encode(served: ServedModel) -> list[list[int]]:
            inp = req.input
            if any(isinstance(x, (TextPart, ImageURLPart)) for x in (inp if isinstance(inp, list) else [])):
                raise APIError(400, f"input: {served.name} embeds text only (content parts need an embedding model "
                               "such as a CLIP directory from `seekdeep align`)", param="input")
            if isinstance(inp, str):
                return [served.tokenizer.encode(inp)]
            if all(isinstance(x, str) for x in inp):
                return [served.tokenizer.encode(x) for x in inp]
            if all(isinstance(x, int) for x in inp):
                return [list(inp)]
            if any(len(x) == 0 for x in inp):
                raise APIError(400, "input: token-id inputs must not be empty", param="input")
            return [list(x) for x in inp]

        served = pick_model(req.model, lambda m: (max(len(x) for x in encode(m)), 0))
        inputs = encode(served)
        hidden = served.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions, got {req.dimensions}",
                           param="dimensions")
        for ids in inputs:
            if not ids:
                raise APIError(400, "input: an input encodes to no tokens", param="input")
            if len(ids) > served.max_model_len:
                raise APIError(400, f"input: {len(ids)} tokens exceed this model's context ({served.max_model_len})",
                               param="input", code="context_length_exceeded")
            if any(not 0 <= t < served.model.config.vocab_size for t in ids):
                raise APIError(400, f"input: token ids must be in [0, {served.model.config.vocab_size})", param="input")
        data = []
        cache = served.embedding_cache
        for i, ids in enumerate(inputs):
            key = cache.key(served.name, ids)
            vector = cache.get(key)
            if vector is None:
                state.metrics.embedding_cache_misses.labels(served.name).inc()
                try:
                    vector = await served.engine.embed(ids)
                except GenerationError as exc:
                    raise _generation_error(exc, "input") from None
                cache.put(key, vector)
            else:
                state.metrics.embedding_cache_hits.labels(served.name).inc()
            if req.encoding_format == "base64":
                value: Any = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


# ----------------------------------------------------------------------------- launcher


def run_server(config: ServerConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; on shutdown uvicorn stops accepting connections and waits
    for open requests (``shutdown_timeout``), then the engines drain and stop."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level,
                timeout_graceful_shutdown=max(1, int(math.ceil(config.shutdown_timeout))))
