"""Speculative decoding for the serving engine: draft k tokens cheaply, verify them in one
forward of the full model over the paged KV cache.

Two proposers:

* :class:`DraftModelProposer` -- the compact model of a routed pair (same tokenizer) runs k
  cheap decode steps over its own paged KV cache. It keeps a shadow :class:`Sequence` per
  request whose computed prefix is trimmed back to what the full model accepted, so it only
  ever recomputes the one or two tokens that differ.
* :class:`NgramProposer` -- prompt lookup: the most recent earlier occurrence of the last
  ``n`` tokens (``ngram_max`` down to ``ngram_min``) proposes the tokens that followed it
  (continuing into its own proposal when the match is closer than k: a loop). No model, a
  deterministic proposal.

Verification (:class:`Speculator`): every decoding row's last token plus its drafts go through
the full model in one forward (rows padded at the end to the longest draft; causal attention
keeps the padding from touching real positions), giving the full model's logits at every
draft position. Greedy rows keep the drafts up to the first one that differs from the full
model's argmax and add the full model's own token there (or a bonus token after a fully
accepted draft): the output is token-for-token the full model's greedy output. Sampled rows use
speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft ``d`` with
drafter probability ``q(d)`` is kept with probability ``min(1, p(d) / q(d))``; at the first
rejection the token is drawn from ``max(0, p - q)`` renormalised, which makes each emitted
token distributed exactly as the full model's ``p``. An n-gram draft is a point mass
(``q(d) = 1``): kept with probability ``p(d)``, else drawn from ``p`` without ``d``.

The KV the full model wrote for rejected drafts stays in the sequence's slots past
``num_computed``: nothing reads it, the next step overwrites it, and prefix caching registers
only blocks below ``num_computed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from seekdeep.errors import ConfigError
from seekdeep.generation import process_logits
from seekdeep.validate import check_int
from seekdeep.serve.kv_cache import BlockAllocator, PagedKVCache, StepCache, probe_layer_specs
from seekdeep.serve.runner import ModelRunner, OutputHead
from seekdeep.serve.sampling import TokenLogprobs
from seekdeep.serve.scheduler import Sequence

SPECULATIVE_METHODS = ("none", "draft", "ngram")
MAX_SPECULATIVE_TOKENS = 16
MAX_NGRAM = 16


@dataclass
class SpeculativeConfig:
    """``method``: "draft" (a compact model proposes) or "ngram" (prompt lookup).
    ``num_speculative_tokens``: drafts per step (k). ``ngram_min`` / ``ngram_max``: the
    suffix lengths the lookup tries, longest first."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("draft", "ngram"):
            raise ConfigError("speculative", f"got {self.method!r}; accepted: draft, ngram (or none for no speculation)")
        check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        check_int("ngram_min", self.ngram_min, 1, MAX_NGRAM)
        check_int("ngram_max", self.ngram_max, self.ngram_min, MAX_NGRAM)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SpeculativeConfig":
        return cls(**data)


# ----------------------------------------------------------------------------- a forward over uneven rows


def forward_rows(model, paged: PagedKVCache, seqs: list[Sequence], rows: list[list[int]],
                 head: OutputHead | None = None) -> torch.Tensor:
    """Run ``rows[i]`` (tokens that follow ``seqs[i]``'s first ``num_computed`` tokens) through
    ``model`` in one forward over ``paged``; returns (B, n, V) float logits at every position,
    ``n`` = the longest row. Shorter rows are padded at the end with their last token: the
    padding's keys land in the row's own slots past its real tokens (its blocks must cover
    ``num_computed + n``) and, attention being causal, no real position sees them. ``head``:
    the runner's :class:`~seekdeep.serve.runner.OutputHead` (the same logits, bitwise)."""
    bs = paged.block_size
    dev = paged.device
    n = max(len(r) for r in rows)
    computed = [s.num_computed for s in seqs]
    k_len = max(computed) + n
    lengths = torch.tensor(computed) + n  # (B,) tokens per row after this forward, padding included
    valid = torch.arange(k_len)[None, :] >= (k_len - lengths)[:, None]  # (B, K) real (not left-padding) key slots
    width = max(len(s.block_ids) for s in seqs)
    table = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs])  # (B, blocks)
    pos = (torch.arange(k_len)[None, :] - (k_len - lengths)[:, None]).clamp(min=0)  # (B, K) token position per slot
    slots = torch.where(valid, table.gather(1, pos // bs) * bs + pos % bs, 0)  # (B, K) pool slot; padding -> null slot
    input_ids = torch.tensor([r + [r[-1]] * (n - len(r)) for r in rows])  # (B, n)
    position_ids = torch.tensor([list(range(c, c + n)) for c in computed])  # (B, n)
    cache = StepCache(paged, slots.to(dev), n)
    mask = None if bool(valid.all()) else valid.to(dev, torch.long)
    if head is not None and head.usable():
        hidden = model.model(input_ids.to(dev), mask, position_ids.to(dev), cache, None, model.sliding_windows())
        logits = head(hidden.reshape(-1, hidden.shape[-1])).view(len(rows), n, -1)  # (B * n, V) -> (B, n, V)
    else:
        logits = model(input_ids.to(dev), attention_mask=mask, position_ids=position_ids.to(dev),
                       past_key_values=cache, use_cache=True, logits_to_keep=n).logits
    cache.commit()
    return logits.float()  # (B, n, V)


def forward_padded(model, paged: PagedKVCache, seqs: list[Sequence], rows: list[list[int]],
                   limits: list[int], head: OutputHead | None = None, split=None,
                   stats: dict | None = None) -> list[torch.Tensor]:
    """:func:`forward_rows` in as few forwards as the rows' room allows: a row joins a forward
    padded to ``n`` tokens only if ``num_computed + n <= limits[i]`` (its block capacity and
    context). ``split``: a runner's :meth:`~seekdeep.serve.runner.ModelRunner.split_lengths`,
    which cuts the rows of one forward into history-length buckets (each its own forward) so
    that short histories are not padded to the longest. ``stats`` accumulates ``forwards``,
    ``key_slots`` (rows x key length, what the forwards attended over) and ``real_slots``.
    Returns each row's (len(rows[i]), V) logits, in order."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    pending = list(range(len(rows)))
    while pending:
        n = max(len(rows[i]) for i in pending)
        fit = [i for i in pending if seqs[i].num_computed + n <= limits[i]]  # the longest row always fits its own n
        groups = [fit] if split is None else [[fit[j] for j in g] for g in split([seqs[i].num_computed + n for i in fit])]
        for group in groups:
            if stats is not None:
                stats["forwards"] = stats.get("forwards", 0) + 1
                stats["key_slots"] = stats.get("key_slots", 0) + len(group) * (max(seqs[i].num_computed for i in group) + n)
                stats["real_slots"] = stats.get("real_slots", 0) + sum(seqs[i].num_computed + n for i in group)
            logits = forward_rows(model, paged, [seqs[i] for i in group], [rows[i] for i in group], head)
            for j, i in enumerate(group):
                out[i] = logits[j, : len(rows[i])]
        taken = set(fit)
        pending = [i for i in pending if i not in taken]
    return out


def _reserve(allocator: BlockAllocator, seq: Sequence, num_tokens: int) -> bool:
    """Make ``seq.block_ids`` cover ``num_tokens`` positions; False (nothing taken) if memory is short."""
    need = allocator.blocks_for(num_tokens) - len(seq.block_ids)
    if need <= 0:
        return True
    if need > allocator.num_free:
        return False
    seq.block_ids.extend(allocator.allocate(need))
    return True


def _banned(req, emitted: int) -> list[int]:
    """Stop ids a row may not produce yet (before ``min_tokens``), ``emitted`` tokens into this step."""
    if req.seq.num_output + emitted < req.params.min_tokens:
        return sorted(req.stop_ids)
    return []


def _processed(logits: torch.Tensor, history: list[int], req, banned: list[int]) -> torch.Tensor:
    """(V,) logits after min-tokens suppression and the request's logit processing."""
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    if req.sampler.plain_greedy:
        return logits
    config = req.sampler.config
    seen = torch.tensor([history], device=logits.device) if config.repetition_penalty != 1.0 else None  # (1, T)
    return process_logits(logits[None], seen, config)[0]


# ----------------------------------------------------------------------------- proposers


class NgramProposer:
    """Prompt lookup over each request's own tokens (prompt + output)."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        # per request: n -> {n-gram: end of its most recent occurrence that has a next token}
        self._index: dict[str, tuple[list[dict[tuple, int]], list[int]]] = {}

    def drop(self, seq_id: str) -> None:
        self._index.pop(seq_id, None)

    def _update(self, seq: Sequence) -> list[dict[tuple, int]]:
        grams, done = self._index.setdefault(seq.seq_id, ([{} for _ in range(self.ngram_max + 1)], [0]))
        tokens = seq.token_ids
        # an occurrence ending at e is usable once tokens[e] exists, i.e. for e <= len - 1;
        # the current suffix (ending at len) is therefore never matched against itself
        for e in range(max(done[0], self.ngram_min), len(tokens)):
            for n in range(self.ngram_min, min(self.ngram_max, e) + 1):
                grams[n][tuple(tokens[e - n : e])] = e
        done[0] = max(done[0], len(tokens))
        return grams

    def propose(self, seq: Sequence, k: int) -> list[int]:
        grams = self._update(seq)
        tokens = seq.token_ids
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            end = grams[n].get(tuple(tokens[-n:]))
            if end is not None:
                # copy what followed, reading on into the drafts themselves when the match is
                # recent (a loop shorter than k): the proposal continues the loop
                drafts: list[int] = []
                for i in range(end, end + k):
                    drafts.append(tokens[i] if i < len(tokens) else drafts[i - len(tokens)])
                return drafts
        return []


class DraftModelProposer:
    """A compact model with the full model's vocabulary drafts over its own paged KV cache."""

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, *, static_decode=None,
                 compile_decode=None, compile_backend: str = "inductor", max_batch: int = 32):
        self.model = model.eval()
        self.max_len = model.config.max_position_embeddings
        specs = probe_layer_specs(model, device)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.paged = PagedKVCache(specs, num_blocks, block_size, device)
        self.runner = ModelRunner(model, self.paged, static_decode=static_decode, compile_decode=compile_decode,
                                  compile_backend=compile_backend, max_batch=max_batch)
        self._shadows: dict[str, Sequence] = {}

    def drop(self, seq_id: str) -> None:
        shadow = self._shadows.pop(seq_id, None)
        if shadow is not None:
            self.allocator.free(shadow.block_ids)
            shadow.block_ids = []

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of ``seq`` holding its tokens, its computed prefix cut to where they agree."""
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            shadow = self._shadows[seq.seq_id] = Sequence(seq.seq_id, list(seq.prompt_ids), seq.max_tokens)
        old, new = shadow.token_ids, seq.token_ids
        same = min(shadow.num_computed, len(new))
        for i in range(max(0, shadow.num_computed - 2 * MAX_SPECULATIVE_TOKENS - 2), same):  # only the tail can differ
            if old[i] != new[i]:
                same = i
                break
        shadow.token_ids = list(new)
        shadow.num_computed = min(shadow.num_computed, same, len(new) - 1)
        return shadow

    @torch.no_grad()
    def propose(self, reqs: list, ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per request: up to ``k`` drafts and, for sampled requests, the (k, V) distributions
        they were drawn from (None for greedy ones: their drafts are the drafter's argmax)."""
        results: list[tuple[list[int], list[torch.Tensor]]] = [([], []) for _ in reqs]
        active = []
        for i, (req, k) in enumerate(zip(reqs, ks)):
            k = min(k, self.max_len - req.seq.num_tokens)
            shadow = self._sync(req.seq)
            if k > 0 and _reserve(self.allocator, shadow, shadow.num_tokens + k):
                active.append((i, req, shadow, k))
        step = 0
        while active:
            shadows = [a[2] for a in active]
            if step == 0:  # catch-up rows differ in length (1, 2 or a whole prompt): padded forwards
                rows = [s.token_ids[s.num_computed :] for s in shadows]
                limits = [min(len(s.block_ids) * self.allocator.block_size, self.max_len) for s in shadows]
                logits = forward_padded(self.model, self.paged, shadows, rows, limits, self.runner.head,
                                        self.runner.split_lengths)
                last = torch.stack([x[-1] for x in logits])  # (B, V)
                for s, r in zip(shadows, rows):
                    s.num_computed += len(r)
                self.runner.release()
            else:  # one new token per row: the drafter's own decode path
                last = self.runner.execute([(s, 1) for s in shadows])  # (B, V)
                for s in shadows:
                    s.num_computed += 1
            greedy = [a for a in range(len(active)) if active[a][1].sampler.plain_greedy and not _banned(active[a][1], step)]
            picks = last[greedy].argmax(-1).tolist() if greedy else []
            chosen = dict(zip(greedy, picks))
            still = []
            for a, (i, req, shadow, k) in enumerate(active):
                if a in chosen:
                    token = chosen[a]
                else:
                    row = _processed(last[a], shadow.token_ids, req, _banned(req, step))
                    if req.sampler.generator is None:
                        token = int(row.argmax())
                    else:
                        q = row.softmax(-1)
                        token = int(torch.multinomial(q, 1, generator=req.sampler.generator))
                        results[i][1].append(q)
                results[i][0].append(token)
                shadow.token_ids.append(token)
                if len(results[i][0]) < k:
                    still.append((i, req, shadow, k))
            active = still
            step += 1
        return [(tokens, torch.stack(qs) if qs else None) for tokens, qs in results]


# ----------------------------------------------------------------------------- the engine side


class Speculator:
    """Drafts and verifies the decoding rows of every engine step (see the module docstring).

    ``draft_model``: the compact model for ``method="draft"``; it must share the full model's
    vocabulary (the server checks the tokenizers)."""

    def __init__(self, engine, config: SpeculativeConfig, draft_model=None):
        self.engine = engine
        self.config = config
        self.k = config.num_speculative_tokens
        self.num_draft_tokens = 0  # drafts verified since start
        self.num_accepted_tokens = 0  # of those, kept
        self.num_verify_rows = 0  # row-steps that verified at least one draft
        self.num_emitted_tokens = 0  # tokens those row-steps produced
        self.verify_stats: dict[str, int] = {}  # forward_padded's forwards / key_slots / real_slots of the verifies
        if config.method == "draft":
            if draft_model is None:
                raise ConfigError("speculative", "method 'draft' needs a draft model (the compact model of a routed pair)")
            target_vocab, draft_vocab = engine.model.config.vocab_size, draft_model.config.vocab_size
            if draft_vocab != target_vocab:
                raise ConfigError("speculative", f"the draft model's vocabulary ({draft_vocab}) differs from the full "
                                  f"model's ({target_vocab}); drafting needs the same tokenizer")
            ecfg = engine.config
            # room for every token the full model can hold, plus each row's lookahead
            num_blocks = engine.allocator.num_blocks + ecfg.max_num_seqs * (-(-self.k // ecfg.block_size) + 1)
            self.proposer: DraftModelProposer | NgramProposer = DraftModelProposer(
                draft_model, num_blocks, ecfg.block_size, engine.device, static_decode=ecfg.static_decode,
                compile_decode=ecfg.compile_decode, compile_backend=ecfg.compile_backend, max_batch=ecfg.max_num_seqs)
        else:
            self.proposer = NgramProposer(config.ngram_min, config.ngram_max)

    @property
    def acceptance_rate(self) -> float:
        """Drafts kept / drafts verified (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a row emitted per verify step (1 + its accepted drafts), on average."""
        return self.num_emitted_tokens / self.num_verify_rows if self.num_verify_rows else 0.0

    def drop(self, seq_id: str) -> None:
        self.proposer.drop(seq_id)

    def _budget(self, req) -> int:
        """Drafts a row may verify this step: every emitted token must fit max_tokens and the context."""
        seq = req.seq
        return max(0, min(self.k, req.params.max_tokens - seq.num_output - 1,
                          self.engine.max_model_len - seq.num_tokens - 1))

    @torch.no_grad()
    def run(self, items: list[tuple[Sequence, int]]) -> tuple[list[tuple[Sequence, int]], list[tuple]]:
        """Take the decoding rows of a scheduled batch that can speculate; returns the items left
        for the plain path and, per verified row, ``(request, tokens, logprobs)``. Verified rows
        have their ``num_computed`` set to the tokens whose KV is now valid."""
        engine = self.engine
        plain, reqs, ks = [], [], []
        for seq, n in items:
            req = engine._requests[seq.seq_id]
            k = self._budget(req) if n == 1 and seq.num_computed + 1 == seq.num_tokens else 0
            if k > 0 and _reserve(engine.allocator, seq, seq.num_tokens + k):
                reqs.append(req)
                ks.append(k)
            else:
                plain.append((seq, n))
        if not reqs:
            return items, []
        if isinstance(self.proposer, DraftModelProposer):
            proposals = self.proposer.propose(reqs, ks)
        else:
            proposals = [(self.proposer.propose(r.seq, k), None) for r, k in zip(reqs, ks)]
        if not any(d for d, _ in proposals):  # nothing to verify: a plain decode step is cheaper
            return items, []
        seqs = [r.seq for r in reqs]
        bs = engine.allocator.block_size
        limits = [min(len(s.block_ids) * bs, engine.max_model_len) for s in seqs]
        logits = forward_padded(engine.model, engine.kv_cache, seqs,
                                [[s.token_ids[-1]] + d for s, (d, _) in zip(seqs, proposals)], limits,
                                engine.runner.head, engine.runner.split_lengths, self.verify_stats)
        engine.runner.release()  # rows grew by different amounts: the dense decode view is stale
        produced = []
        for b, (req, (drafts, q)) in enumerate(zip(reqs, proposals)):
            # what plain greedy rows keep: the full model's argmax at every position
            argmax = logits[b].argmax(-1).tolist() if req.sampler.plain_greedy else []
            tokens, lps = self._accept(req, logits[b], drafts, q, argmax)
            accepted = len(tokens) - 1
            req.seq.num_computed += 1 + accepted  # the last token and the kept drafts are cached now
            if drafts:
                self.num_draft_tokens += len(drafts)
                self.num_accepted_tokens += accepted
                self.num_verify_rows += 1
                self.num_emitted_tokens += len(tokens)
            produced.append((req, tokens, lps))
        return plain, produced

    def _accept(self, req, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                argmax: list[int]) -> tuple[list[int], list[TokenLogprobs]]:
        """The tokens one row emits from its verify logits (n, V): the kept drafts and one more."""
        seq, sampler = req.seq, req.sampler
        tokens: list[int] = []
        for j in range(len(drafts) + 1):
            banned = _banned(req, j)
            if sampler.plain_greedy and not banned:
                token = argmax[j]
            else:
                row = _processed(logits[j], seq.token_ids + tokens, req, banned)
                if sampler.generator is None:
                    token = int(row.argmax())
                else:
                    p = row.softmax(-1)
                    if j == len(drafts):  # every draft kept: a bonus token from the full model
                        token = int(torch.multinomial(p, 1, generator=sampler.generator))
                    else:
                        d = drafts[j]
                        q_d = 1.0 if q is None else float(q[j, d])
                        u = float(torch.rand((), generator=sampler.generator, device=p.device))
                        if u * q_d <= float(p[d]):  # kept with probability min(1, p(d) / q(d))
                            tokens.append(d)
                            continue
                        residual = p.clone()
                        if q is None:
                            residual[d] = 0.0
                        else:
                            residual = (p - q[j]).clamp(min=0)
                        if float(residual.sum()) <= 0:  # p == q up to rounding: p itself is the residual
                            residual = p
                        token = int(torch.multinomial(residual, 1, generator=sampler.generator))
                        tokens.append(token)
                        break
            tokens.append(token)
            if j == len(drafts) or token != drafts[j]:
                break
        return tokens, self._logprobs(req, logits, tokens)

    @staticmethod
    def _logprobs(req, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprobs]:
        """Log-probabilities of the model's distribution (before temperature / top-p), as the
        plain sampler reports them."""
        k = req.params.logprobs
        if k is None:
            return []
        out = []
        for j, token in enumerate(tokens):
            row = logits[j].clone()
            banned = _banned(req, j)
            if banned:
                row[banned] = float("-inf")
            logp = torch.log_softmax(row, -1)
            top = []
            if k:
                values, ids = logp.topk(k)
                top = list(zip(ids.tolist(), values.tolist()))
            out.append(TokenLogprobs(token, float(logp[token]), top))
        return out
