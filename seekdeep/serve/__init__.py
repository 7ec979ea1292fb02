"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine.

Layers, top to bottom (each knows only the one below):

* :mod:`~seekdeep.serve.server` -- FastAPI routes, tokenization, chat template, detokenization
  and stop strings, SSE streaming, errors, metrics, model routing, the embedding cache;
* :mod:`~seekdeep.serve.engine` -- the step loop: schedule, run, sample, stop, stream (token ids);
* :mod:`~seekdeep.serve.scheduler` -- who runs this step and how many tokens (ids and counts only);
* :mod:`~seekdeep.serve.runner` -- model forwards over the paged KV cache (:mod:`~seekdeep.serve.kv_cache`).

``seekdeep serve MODEL_DIR`` starts the server; ``seekdeep bench`` loads it.
"""

from seekdeep.serve.engine import AsyncEngine, Engine, EngineConfig, RequestOutput
from seekdeep.serve.sampling import SamplingParams

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "ServerConfig", "create_app"]


def __getattr__(name: str):
    # the web stack is imported only by those who serve over HTTP
    if name in ("ServerConfig", "create_app"):
        from seekdeep.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'seekdeep.serve' has no attribute {name!r}")
