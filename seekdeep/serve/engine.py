"""The serving engine: a loop of schedule -> run the model -> sample -> stop checks.

:class:`Engine` is synchronous and single-threaded: ``add_request`` / ``abort`` / ``step``.
Requests join and leave the running batch at every step (iteration-level scheduling).
:class:`AsyncEngine` runs that loop in a background thread and hands each request's tokens to
an ``asyncio`` stream; leaving the stream early (a client that disconnects) aborts the request
and frees its KV blocks. Neither knows about HTTP or text: prompts are token ids, outputs are
token ids (text stop strings are the detokenizing layer's job, which calls ``abort``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence as SequenceT

import torch

from seekdeep.errors import ConfigError, GenerationError, SeekdeepError
from seekdeep.validate import check_float, check_int, parse_size
from seekdeep.serve.kv_cache import BlockAllocator, PagedKVCache, probe_layer_specs
from seekdeep.serve.runner import ModelRunner
from seekdeep.serve.sampling import RequestSampler, SamplingParams, TokenLogprobs, sample
from seekdeep.serve.length_predictor import LengthPredictor
from seekdeep.serve.scheduler import POLICIES, Scheduler, SchedulerConfig, Sequence

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """``num_blocks`` overrides ``kv_cache_memory`` (bytes for keys, values and per-token
    backend state of every layer). ``max_model_len`` defaults to the model's
    ``max_position_embeddings``. ``static_decode`` / ``compile_decode``: see
    :class:`~seekdeep.serve.runner.ModelRunner` (None = on when CUDA is used).
    ``prefix_caching``: share the KV blocks of common prompt prefixes between requests (see
    :class:`~seekdeep.serve.kv_cache.BlockAllocator`). ``schedule``: admission order, ``fcfs``
    or ``predicted`` (shortest predicted output first, ageing ``schedule_aging`` tokens per
    step waited; see :mod:`~seekdeep.serve.scheduler`)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | str = 512 * 2**20  # bytes, or a size such as "512MiB" / "2GiB"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    static_decode: bool | None = None
    compile_decode: bool | None = None
    compile_backend: str = "inductor"
    prefix_caching: bool = True
    schedule: str = "fcfs"
    schedule_aging: float = 1.0
    decode_buckets: int = 4  # most length buckets a ragged decode batch is split into (1: never split)
    transposed_head: bool = True  # CPU: lm_head through a (C, V) weight copy where bitwise exact (runner.OutputHead)

    def __post_init__(self) -> None:
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = parse_size("kv_cache_memory", self.kv_cache_memory)
        check_int("block_size", self.block_size, 1, 1 << 16)
        check_int("kv_cache_memory", self.kv_cache_memory, 1, 1 << 46)
        check_int("max_num_seqs", self.max_num_seqs, 1, 1 << 16)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        check_int("max_model_len", self.max_model_len, 1, 1 << 24, optional=True)
        check_int("num_blocks", self.num_blocks, 2, 1 << 28, optional=True)  # >= 2: block 0 is reserved
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError("prefix_caching", f"must be True or False, got {self.prefix_caching!r}")
        if self.schedule not in POLICIES:
            raise ConfigError("schedule", f"unknown {self.schedule!r}; accepted: {', '.join(POLICIES)}")
        check_float("schedule_aging", self.schedule_aging, 0, 1e6, lo_open=True)
        check_int("decode_buckets", self.decode_buckets, 1, 64)
        if not isinstance(self.transposed_head, bool):
            raise ConfigError("transposed_head", f"must be True or False, got {self.transposed_head!r}")


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta, not the whole output)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" while finished
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission (OpenAI's cached_tokens)


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    sampler: RequestSampler
    stop_ids: frozenset[int]
    arrival: float


class Engine:
    """Continuous-batching generation over a paged KV cache.

    ``eos_token_id``: id(s) that end a request (default: the model config's).
    ``speculative``: a :class:`~seekdeep.serve.speculative.SpeculativeConfig` to draft and
    verify several tokens per decode step (``draft_model``: the compact drafter for "draft").
    ``length_predictor``: learns output lengths from the finished requests and orders
    admission under ``schedule="predicted"`` (default: a cold one kept in memory).
    """

    def __init__(self, model, config: EngineConfig | None = None, eos_token_id: int | list[int] | None = None,
                 length_predictor: LengthPredictor | None = None,
                 speculative=None, draft_model=None):
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        model_len = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise ConfigError("max_model_len", f"{config.max_model_len} exceeds the model's max_position_embeddings ({model_len})")
        self.max_model_len = config.max_model_len or model_len
        eos = eos_token_id if eos_token_id is not None else getattr(model.config, "eos_token_id", None)
        self.eos_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))

        specs = probe_layer_specs(model, self.device)
        num_blocks = config.num_blocks or PagedKVCache.blocks_that_fit(specs, config.kv_cache_memory, config.block_size)
        self.allocator = BlockAllocator(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self.kv_cache = PagedKVCache(specs, num_blocks, config.block_size, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            policy=config.schedule, aging=config.schedule_aging), self.allocator
        )
        self.length_predictor = length_predictor if length_predictor is not None else LengthPredictor()
        self.runner = ModelRunner(
            model, self.kv_cache, static_decode=config.static_decode, compile_decode=config.compile_decode,
            compile_backend=config.compile_backend, max_batch=config.max_num_seqs, transposed_head=config.transposed_head,
            decode_buckets=config.decode_buckets,
        )
        self.speculator = None
        if speculative is not None:
            from seekdeep.serve.speculative import Speculator

            self.speculator = Speculator(self, speculative, draft_model)
        self._requests: dict[str, _Request] = {}
        self.num_preemptions = 0
        # the dataclass repr of the config names the attention backend and its options
        self._model_salt = hashlib.blake2b(repr((type(model).__qualname__, model.config, next(model.parameters()).dtype))
                                           .encode(), digest_size=16).digest()
        self.num_steps = 0

    # -- requests
    def validate(self, prompt_ids: SequenceT[int], params: SamplingParams) -> None:
        """Raise GenerationError (naming the field) if the request can never run."""
        if not isinstance(params, SamplingParams):
            raise GenerationError("params", f"expected SamplingParams, got {type(params).__name__}")
        if len(prompt_ids) == 0:
            raise GenerationError("prompt", "is empty; pass at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise GenerationError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise GenerationError(
                "prompt", f"is {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens "
                "including at least one generated token"
            )
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise GenerationError(
                "max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length ({self.max_model_len}); at most {self.max_model_len - len(prompt_ids)} new tokens fit"
            )
        if self.allocator.blocks_for(len(prompt_ids) + params.max_tokens) > self.allocator.num_usable:
            raise GenerationError(
                "max_tokens", f"prompt + max_tokens needs more KV-cache blocks than the engine has "
                f"({self.allocator.num_usable} of {self.allocator.block_size} tokens)"
            )

    def add_request(self, request_id: str, prompt_ids: SequenceT[int], params: SamplingParams | None = None,
                    pixel_values: torch.Tensor | None = None) -> None:
        """``pixel_values``: (num_images, 3, H, W) for a vision-language model whose prompt holds
        that many images' placeholder tokens; the image features are computed once here."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, params)
        if request_id in self._requests:
            raise GenerationError("request_id", f"{request_id!r} is already running")
        if pixel_values is not None:
            self.runner.add_images(request_id, prompt_ids, pixel_values)
        seq = Sequence(request_id, prompt_ids, params.max_tokens, cache_salt=self._cache_salt(pixel_values),
                       predicted_output=self.length_predictor.predict(prompt_ids, params.max_tokens))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        self._requests[request_id] = _Request(seq, params, RequestSampler(params, self.device), stop_ids, time.monotonic())
        self.scheduler.add(seq)

    def _cache_salt(self, pixel_values: torch.Tensor | None) -> bytes:
        """What a request's keys and values depend on besides its tokens: the model (class,
        config with its attention backend and options, dtype), the adapter state (active,
        disabled, merged) and, for image requests, the image pixels (placeholder tokens are the
        same for every image). Recomputed per request so that switching adapters on a served
        model never reuses blocks computed under the other adapter."""
        h = hashlib.blake2b(self._model_salt, digest_size=16)
        peft = self.model.__dict__.get("_peft")
        if peft is not None and peft["configs"]:
            merged = sorted({n for _, layer in self.model._tuner_layers() for n in getattr(layer, "merged", [])})
            applied = [] if peft["disabled"] else list(peft["active"])
            if applied or merged:  # adapters present but off: the base model's blocks are valid
                h.update(repr((applied, merged)).encode())
        if pixel_values is not None:
            h.update(pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.digest()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix not in use (call after changing the model's weights in
        place); returns the number of blocks dropped."""
        return self.allocator.reset_prefix_cache()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up, since start."""
        return self.scheduler.prefix_hit_rate

    def abort(self, request_id: str) -> bool:
        """Drop a request (queued or running) and free its blocks; False if it is unknown."""
        req = self._requests.pop(request_id, None)
        self.runner.drop_images(request_id)
        if self.speculator is not None:
            self.speculator.drop(request_id)
        if req is None:
            return False
        self.scheduler.finish(req.seq)
        if not self._requests:
            self.runner.release()
        return True

    def abort_all(self) -> list[str]:
        ids = list(self._requests)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.allocator.usage

    # -- the loop body
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if not batch:
            return []
        self.num_steps += 1
        items, produced = batch.items, []
        if self.speculator is not None:  # decoding rows draft and verify: several tokens each
            items, produced = self.speculator.run(items)
        logits = self.runner.execute(items) if items else None  # (N, V)
        rows, reqs = [], []
        for i, (seq, n) in enumerate(items):
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:  # the whole sequence is cached: sample its next token
                rows.append(i)
                reqs.append(self._requests[seq.seq_id])
        suppress = [
            sorted(r.stop_ids) if r.seq.num_output < r.params.min_tokens else [] for r in reqs
        ]
        chosen_logits = logits if len(rows) == len(items) else logits[rows]
        tokens, logprobs = sample(chosen_logits, [r.sampler for r in reqs], [r.seq.token_ids for r in reqs],
                                  suppress) if rows else ([], [])
        outputs = []
        singles = [(r, [t], [lp] if lp is not None else []) for r, t, lp in zip(reqs, tokens, logprobs)]
        for req, new, lps in produced + singles:
            seq = req.seq
            reason = None
            for kept, token in enumerate(new, 1):
                seq.token_ids.append(token)
                if token in req.stop_ids and seq.num_output >= req.params.min_tokens:
                    reason = "stop"
                elif seq.num_output >= req.params.max_tokens or seq.num_tokens >= self.max_model_len:
                    reason = "length"
                if reason is not None:  # a verified row may stop inside its accepted drafts
                    new, lps = new[:kept], lps[:kept]
                    seq.num_computed = min(seq.num_computed, seq.num_tokens)
                    break
            if reason is not None:
                self.length_predictor.observe(seq.prompt_ids, req.params.max_tokens, seq.num_output)
                del self._requests[seq.seq_id]
                self.runner.drop_images(seq.seq_id)
                if self.speculator is not None:
                    self.speculator.drop(seq.seq_id)
                self.scheduler.finish(seq)
                if not self._requests:
                    self.runner.release()
            outputs.append(
                RequestOutput(seq.seq_id, new, reason is not None, reason, seq.num_prompt, seq.num_output, lps,
                              seq.num_cached_tokens)
            )
        return outputs

    # -- conveniences
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Offline batch: every prompt's output ids (the engine schedules them continuously)."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"offline-{id(self)}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self._requests for rid in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]

    @torch.no_grad()
    def embed(self, prompt_ids: SequenceT[int]) -> torch.Tensor:
        """Mean-pooled final hidden state (after the final norm) of one input, (C,) float32."""
        if len(prompt_ids) == 0:
            raise GenerationError("input", "is empty; pass at least one token")
        if len(prompt_ids) > self.max_model_len:
            raise GenerationError("input", f"is {len(prompt_ids)} tokens; this model's context is {self.max_model_len}")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise GenerationError("input", f"token ids must be integers in [0, {self.vocab_size})")
        ids = torch.tensor([list(prompt_ids)], device=self.device)
        hidden = self.model(ids, logits_to_keep=1).hidden_states  # (1, T, C)
        return hidden[0].float().mean(0).cpu()


class QueueFullError(SeekdeepError):
    """More requests are waiting than the engine accepts; retry later."""

    def __init__(self, waiting: int, limit: int):
        self.waiting, self.limit = waiting, limit
        super().__init__(f"{waiting} requests are already waiting (limit {limit}); retry later")


class EngineDeadError(SeekdeepError):
    """The engine loop failed while this request was in it."""


class AsyncEngine:
    """Runs :meth:`Engine.step` in a background thread and streams outputs to asyncio.

    ``max_waiting``: requests allowed to wait for a slot before :meth:`generate` raises
    :class:`QueueFullError` (None = unbounded).
    """

    def __init__(self, engine: Engine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain = True
        self._counter = 0
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="seekdeep-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with ``drain`` the requests in flight finish first (up to ``timeout`` s),
        then whatever is left is aborted."""
        self._drain = drain
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # drain timed out: abort what is left and stop
                self._drain = False
                self._wake.set()
                self._thread.join()
            self._thread = None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._streams) - self.engine.num_running)

    @property
    def kv_cache_usage(self) -> float:
        return self.engine.kv_cache_usage

    def new_request_id(self, prefix: str = "req") -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    # -- requests
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       pixel_values: torch.Tensor | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs step by step; the last one has ``finished=True``.

        Raises GenerationError for an invalid request and QueueFullError when the queue is
        full, both before anything is queued. Closing the iterator early aborts the request."""
        if self._stop.is_set():
            raise EngineDeadError("the engine is shutting down")
        self.engine.validate(prompt_ids, params)
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise QueueFullError(self.num_waiting, self.max_waiting)
        self._loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt_ids, params, pixel_values))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe: the request leaves the engine at the next step."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def embed(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run :meth:`Engine.embed` on the engine thread (between steps)."""
        if self._stop.is_set():
            raise EngineDeadError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("embed", prompt_ids, future, loop))
        self._wake.set()
        return await future

    # -- the loop thread
    def _deliver(self, outputs: list) -> None:
        for request_id, item in outputs:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _send(self, outputs: list) -> None:
        if outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "add":
                _, rid, prompt_ids, params, pixel_values = msg
                try:
                    self.engine.add_request(rid, prompt_ids, params, pixel_values)
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    self._send([(rid, exc)])
            elif kind == "abort":
                self.engine.abort(msg[1])
            elif kind == "embed":
                _, prompt_ids, future, loop = msg
                try:
                    result: object = self.engine.embed(prompt_ids)
                except Exception as exc:  # noqa: BLE001
                    result = exc

                def settle(future=future, result=result):
                    if not future.done():
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(result)

                if not loop.is_closed():
                    loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        while True:
            self._drain_inbox()
            if self._stop.is_set() and (not self._drain or not self.engine.has_unfinished()):
                break
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed; aborting the requests in flight")
                failed = self.engine.abort_all()
                self._send([(rid, EngineDeadError(f"engine step failed: {exc}")) for rid in failed])
                continue
            self._send([(out.request_id, out) for out in outputs])
        aborted = self.engine.abort_all()
        self._send([(rid, RequestOutput(rid, [], True, "abort", 0, 0)) for rid in aborted])
