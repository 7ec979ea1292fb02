"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests_running = Gauge("seekdeep_num_requests_running", "Requests in the running batch", ["model"], registry=r)
        self.requests_waiting = Gauge("seekdeep_num_requests_waiting", "Requests waiting for a batch slot", ["model"], registry=r)
        self.kv_cache_usage = Gauge("seekdeep_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", ["model"], registry=r)
        self.preemptions = Gauge("seekdeep_num_preemptions", "Sequences preempted (recomputed) since start", ["model"], registry=r)
        self.ttft = Histogram("seekdeep_time_to_first_token_seconds", "Time from request arrival to its first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("seekdeep_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              ["model"], buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("seekdeep_e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("seekdeep_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("seekdeep_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter("seekdeep_request_success", "Finished generations by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.http = Counter("seekdeep_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.routed = Counter("seekdeep_routed_requests", "Requests sent to 'auto' and the model chosen", ["model"], registry=r)
        self.embedding_cache_hits = Counter("seekdeep_embedding_cache_hits", "Embedding cache hits", ["model"], registry=r)
        self.embedding_cache_misses = Counter("seekdeep_embedding_cache_misses", "Embedding cache misses", ["model"], registry=r)
        self.prefix_cache_hit_rate = Gauge("seekdeep_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / "
                                           "prompt tokens looked up, since start (0-1)", ["model"], registry=r)
        self.prefix_cache_hits = Gauge("seekdeep_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache "
                                       "since start", ["model"], registry=r)
        self.prefix_cache_queries = Gauge("seekdeep_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                          "cache since start", ["model"], registry=r)
        self.prefix_cache_blocks = Gauge("seekdeep_prefix_cache_blocks", "KV blocks registered in the prefix cache "
                                         "(in use or evictable)", ["model"], registry=r)
        self.embedding_cache_size = Gauge("seekdeep_embedding_cache_entries", "Embeddings held in the cache", ["model"], registry=r)
        self.spec_draft_tokens = Gauge("seekdeep_spec_decode_draft_tokens", "Draft tokens verified by the full model "
                                       "since start", ["model"], registry=r)
        self.spec_accepted_tokens = Gauge("seekdeep_spec_decode_accepted_tokens", "Draft tokens accepted since start",
                                          ["model"], registry=r)
        self.spec_acceptance_rate = Gauge("seekdeep_spec_decode_acceptance_rate", "Accepted / verified draft tokens "
                                          "(0-1)", ["model"], registry=r)
        self.spec_tokens_per_step = Gauge("seekdeep_spec_decode_tokens_per_step", "Mean tokens a row emits per "
                                          "verify step (1 + accepted drafts)", ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
