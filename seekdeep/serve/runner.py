"""Model runner: turns a scheduled batch into forward passes over the paged KV cache.

Sequences that add the same number of tokens this step run in one forward (all decodes
together; prefill chunks grouped by length, which is padding-aware batching: rows of one
forward never pad their new tokens, only their history). Each row's history is gathered
from the pools left-padded to the longest row (see :mod:`seekdeep.serve.kv_cache`). On the
eager path, consecutive decode steps of an unchanged batch extend a dense
:class:`~seekdeep.serve.kv_cache.DecodeView` in place instead of gathering again.

Decode on CUDA goes through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs via
cudagraph trees): the batch is padded up to a power of two and the key length up to a
multiple of ``kv_bucket`` so only a few shapes are ever recorded, and the KV pools are marked
as static addresses so the graphs write into them in place. The same padded ("static")
layout runs eagerly on CPU, where a test checks it gives the eager path's tokens.

Ragged decode batches: every row of a forward is padded to the longest history, so 32 rows
of 16..1024 cached tokens would attend over (and keep a dense copy of) 32 x 1024 key slots.
On the eager path the decode rows are split into up to ``decode_buckets`` length buckets,
each its own forward, where a split removes at least ``bucket_saving`` of the padded slots
(and every bucket keeps ``bucket_min_rows`` rows, so the weights are not re-read for a few
rows). The partition is kept while the set of decoding sequences is unchanged -- their
histories grow in lockstep -- so each bucket's dense view is extended in place as before.
``decode_key_slots`` / ``decode_real_slots`` count what the decode forwards attended over
and how much of it was real (padding fraction = 1 - real / slots).

The output projection (:class:`OutputHead`): on CPU the vocabulary-wide ``lm_head`` is the
largest matmul of a decode step (43% of the CPU time of the 19.5M-parameter benchmark model,
32 rows x 256 -> 32,000), and MKL runs ``x @ W.T`` with ``W`` stored (V, C) -- what
``nn.Linear`` does -- 1.15-1.35x slower than the same product against a contiguous (C, V)
copy. The runner keeps that copy (refreshed when the weight changes) and uses it only at row
and thread counts where it is bitwise equal to ``nn.Linear`` (checked on first use), so the
tokens are exactly those of the model's own forward and of transformers.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from seekdeep.serve.kv_cache import DecodeView, DecodeViewCache, PagedKVCache, StepCache
from seekdeep.serve.scheduler import Sequence

log = logging.getLogger(__name__)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def split_by_length(lengths: list[int], max_parts: int, saving: float, min_rows: int) -> list[list[int]]:
    """Indices of ``lengths`` (each row's key length in a padded forward) in up to ``max_parts``
    groups, shortest first: the recursive best single split of the rows sorted by length, taken
    while it removes at least ``saving`` of its part's padded slots and leaves ``min_rows`` rows
    on each side (so the weights are not re-read for a few rows)."""
    parts = [sorted(range(len(lengths)), key=lengths.__getitem__)]
    while len(parts) < max_parts:
        best = None  # (saving, part index, split point)
        for p, part in enumerate(parts):
            sizes = [lengths[i] for i in part]
            total = len(part) * sizes[-1]
            for i in range(min_rows, len(part) - min_rows + 1):
                saved = total - (i * sizes[i - 1] + (len(part) - i) * sizes[-1])
                if saved >= saving * total and (best is None or saved > best[0]):
                    best = (saved, p, i)
        if best is None:
            break
        _, p, i = best
        parts[p : p + 1] = [parts[p][:i], parts[p][i:]]
    return parts


class OutputHead:
    """The model's ``lm_head`` applied to (N, C) last hidden states through a contiguous
    (C, V) copy of its weight (see the module docstring), wherever that is bitwise the module.

    ``active`` (structural): the device is the CPU and the model uses
    :class:`~seekdeep.models.base.CausalLM`'s own forward with a plain, bias-free
    ``nn.Linear`` head; an adapter or quantisation wrapping the head later turns it off
    (:meth:`usable`). Which MKL kernel runs depends on the row count and the thread count
    (here: 1-3 rows, and 5 or 7 rows on two threads, take other kernels than the copy), so the
    first call at each (rows, threads) computes both products, keeps the module's, and
    remembers whether they were bitwise equal; later calls at that shape take the copy only if
    they were. Outputs are therefore always exactly the module's."""

    def __init__(self, model, enabled: bool = True):
        from seekdeep.models.base import CausalLM

        self.model = model
        self._weight_t: torch.Tensor | None = None
        self._key: tuple | None = None
        self.exact: dict[tuple[int, int], bool] = {}  # (rows, threads) -> the copy is bitwise the module
        self.num_fast = 0  # calls answered through the copy
        self.active = bool(
            enabled and isinstance(model, CausalLM) and type(model).forward is CausalLM.forward
            and self._plain(getattr(model, "lm_head", None)) and model.lm_head.weight.device.type == "cpu"
        )

    @staticmethod
    def _plain(head) -> bool:
        return type(head) is nn.Linear and head.bias is None

    def usable(self) -> bool:
        return self.active and self._plain(self.model.lm_head)

    def _transposed(self) -> torch.Tensor:
        w = self.model.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))  # _version moves on every in-place update
        if key != self._key:
            self._weight_t = None  # free the stale copy before making the new one
            self._weight_t = w.detach().t().contiguous()  # (C, V)
            self._key = key
        return self._weight_t

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, V) logits."""
        shape = (hidden.shape[0], torch.get_num_threads())
        exact = self.exact.get(shape)
        if exact is None:  # first call at this shape: decide by comparing on real data
            ref = self.model.lm_head(hidden)
            self.exact[shape] = torch.equal(ref, hidden @ self._transposed())
            return ref
        if not exact:
            return self.model.lm_head(hidden)
        self.num_fast += 1
        return hidden @ self._transposed()


class ModelRunner:
    """Runs the model for a list of ``(sequence, num_new_tokens)`` and returns each row's
    last logits.

    ``static_decode``: pad decode batches to bucketed shapes (default: on CUDA).
    ``compile_decode``: wrap the decode forward in ``torch.compile`` (default: on CUDA);
    ``compile_backend`` / ``compile_mode`` are passed through (tests use ``backend="eager"``).
    ``transposed_head``: the :class:`OutputHead` fast path wherever it is exact (False: off).
    """

    def __init__(
        self,
        model,
        paged: PagedKVCache,
        *,
        static_decode: bool | None = None,
        compile_decode: bool | None = None,
        compile_backend: str = "inductor",
        compile_mode: str | None = "reduce-overhead",
        transposed_head: bool = True,
        kv_bucket: int = 64,
        max_batch: int = 32,
        decode_buckets: int = 4,
        bucket_saving: float = 0.25,
        bucket_min_rows: int = 4,
    ):
        self.model = model
        self.paged = paged
        self.block_size = paged.block_size
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.compile_decode = on_cuda if compile_decode is None else compile_decode
        self.static_decode = (on_cuda if static_decode is None else static_decode) or self.compile_decode
        self.kv_bucket = kv_bucket
        self.max_batch = max_batch
        self.view_growth = 128
        self._views: dict[int, DecodeView] = {}  # per length bucket: the eager decode path's dense history
        self.decode_buckets, self.bucket_saving, self.bucket_min_rows = decode_buckets, bucket_saving, bucket_min_rows
        self._partition_key: tuple[str, ...] | None = None
        self._partition: dict[str, int] = {}  # seq_id -> length bucket
        self.decode_key_slots = 0
        self.decode_real_slots = 0
        self._compiled = None
        self.head = OutputHead(model, transposed_head and not self.compile_decode)
        # vision-language models: per request, the placeholder positions of its prompt and the
        # image features that replace them (computed once when the request arrives)
        self._images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.compile_decode:
            for pool in paged.pools():
                torch._dynamo.mark_static_address(pool)
            options = {"backend": compile_backend, "dynamic": True}
            if compile_backend == "inductor" and compile_mode:
                options["mode"] = compile_mode
            self._compiled = torch.compile(self._forward, **options)
        self.decode_path = "compiled" if self._compiled is not None else ("static" if self.static_decode else "eager")

    def release(self) -> None:
        """Drop the decode views (the engine calls this when it goes idle)."""
        self._views = {}
        self._partition_key, self._partition = None, {}

    @property
    def decode_padding_fraction(self) -> float:
        """Share of the key slots decode forwards attended over that were padding, since start."""
        return 1.0 - self.decode_real_slots / self.decode_key_slots if self.decode_key_slots else 0.0

    def split_lengths(self, lengths: list[int]) -> list[list[int]]:
        """Row indices grouped into length buckets (see :func:`split_by_length`) with this
        runner's settings; one group when bucketing is off."""
        if self.decode_buckets <= 1 or len(lengths) < 2 * self.bucket_min_rows:
            return [list(range(len(lengths)))]
        return split_by_length(lengths, self.decode_buckets, self.bucket_saving, self.bucket_min_rows)

    def _length_buckets(self, seqs: list[Sequence]) -> dict[str, int]:
        """seq_id -> bucket for one decode batch (kept while the set of sequences is unchanged)."""
        key = tuple(s.seq_id for s in seqs)
        if key == self._partition_key:
            return self._partition
        parts = split_by_length([s.num_computed + 1 for s in seqs], self.decode_buckets, self.bucket_saving,
                                self.bucket_min_rows)
        self._partition_key = key
        self._partition = {seqs[i].seq_id: b for b, part in enumerate(parts) for i in part}
        self._views = {b: v for b, v in self._views.items() if b < len(parts)}
        return self._partition

    def _forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds=None):
        if self.head.usable():  # CausalLM.forward's decoder call, then the head on the last position only
            hidden = self.model.model(None if inputs_embeds is not None else input_ids, attention_mask, position_ids,
                                      cache, inputs_embeds, self.model.sliding_windows())  # (B, T, C)
            return self.head(hidden[:, -1].contiguous())  # (B, V)
        if inputs_embeds is not None:
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]
        out = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1]  # (B, V)

    # -- images (LLaVA-format models)
    @torch.no_grad()
    def add_images(self, seq_id: str, prompt_ids: list[int], pixel_values: torch.Tensor) -> None:
        """Compute a request's image features; each placeholder token of its prompt gets one row."""
        from seekdeep.errors import GenerationError

        config = getattr(self.model, "config", None)
        if not hasattr(self.model, "get_image_features") or getattr(config, "image_token_index", None) is None:
            raise GenerationError("messages", "this model is text-only; it does not accept images")
        if getattr(config, "cross_attention", None) is not None:
            raise GenerationError("messages", "images for a gated cross-attention model are not served yet; use a LLaVA "
                                  "(prefix) model")
        positions = torch.tensor([i for i, t in enumerate(prompt_ids) if t == config.image_token_index], dtype=torch.long)
        dtype = next(self.model.parameters()).dtype
        features = self.model.get_image_features(pixel_values.to(self.device, dtype))  # (N, P, C)
        features = features.reshape(-1, features.shape[-1])  # (N * P, C)
        if features.shape[0] != positions.numel():
            raise GenerationError("messages", f"the prompt holds {positions.numel()} image placeholder tokens but "
                                  f"{pixel_values.shape[0]} image(s) need {features.shape[0]}")
        self._images[seq_id] = (positions, features)

    def drop_images(self, seq_id: str) -> None:
        self._images.pop(seq_id, None)

    def _image_embeds(self, seqs: list[Sequence], computed: list[int], n: int, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, n, C) input embeddings with image features at the placeholder positions of this
        step's tokens, or None when no row's step touches an image."""
        rows = []
        for row, (s, c) in enumerate(zip(seqs, computed)):
            entry = self._images.get(s.seq_id)
            if entry is None:
                continue
            positions, features = entry
            inside = (positions >= c) & (positions < c + n)
            if bool(inside.any()):
                rows.append((row, positions[inside] - c, features[inside.to(features.device)]))
        if not rows:
            return None
        embeds = self.model.get_input_embeddings()(input_ids.to(self.device))  # (B, n, C)
        for row, cols, feats in rows:
            embeds[row, cols.to(self.device)] = feats.to(embeds.dtype)
        return embeds

    @torch.no_grad()
    def execute(self, items: list[tuple[Sequence, int]]) -> torch.Tensor:
        """(N, V) float logits of the last computed token of every item, in ``items`` order."""
        decoding = [seq for seq, n in items if n == 1]
        buckets = {}
        if self.decode_buckets > 1 and not self.static_decode and len(decoding) >= 2 * self.bucket_min_rows:
            buckets = self._length_buckets(decoding)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (seq, n) in enumerate(items):
            groups[(n, buckets.get(seq.seq_id, 0) if n == 1 else 0)].append(i)
        if len(groups) == 1:  # the common all-decode step: no re-stacking
            ((n, bucket),) = groups
            return self._run_group([seq for seq, _ in items], n, bucket)
        logits: list[torch.Tensor | None] = [None] * len(items)
        for (n, bucket), rows in groups.items():
            seqs = [items[i][0] for i in rows]
            out = self._run_group(seqs, n, bucket)
            for j, i in enumerate(rows):
                logits[i] = out[j]
        return torch.stack(logits)

    def _run_group(self, seqs: list[Sequence], n: int, bucket: int = 0) -> torch.Tensor:
        static = n == 1 and self.static_decode
        batch = len(seqs)
        computed = [s.num_computed for s in seqs]
        past = max(computed)
        padded_batch = batch
        if static:
            padded_batch = min(max(_next_pow2(batch), 1), max(self.max_batch, batch))
            past = -(-(past + n) // self.kv_bucket) * self.kv_bucket - n
        k_len = past + n

        pad_rows = padded_batch - batch
        lengths = torch.tensor(computed + [0] * pad_rows) + n  # (B,) tokens per row after this step
        valid = torch.arange(k_len)[None, :] >= (k_len - lengths)[:, None]  # (B, K) real (not padding) key slots
        input_ids = torch.tensor([s.token_ids[c : c + n] for s, c in zip(seqs, computed)] + [[0] * n] * pad_rows)
        position_ids = torch.tensor([list(range(c, c + n)) for c in computed] + [list(range(n))] * pad_rows)  # (B, n)
        bs = self.block_size

        def slot_matrix() -> torch.Tensor:
            """(B, K) pool slot of every key position; padding -> the null slot 0."""
            width = max(len(s.block_ids) for s in seqs)
            table = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
                                 + [[0] * width] * pad_rows)  # (B, blocks); pad rows -> null block
            pos = (torch.arange(k_len)[None, :] - (k_len - lengths)[:, None]).clamp(min=0)  # token position per slot
            return torch.where(valid, table.gather(1, pos // bs) * bs + pos % bs, 0)

        dev = self.device
        if n == 1:
            self.decode_key_slots += padded_batch * k_len
            self.decode_real_slots += sum(computed) + batch
        if n == 1 and not static:
            seq_ids = [s.seq_id for s in seqs]
            view = self._views.get(bucket)
            if view is None or not view.fits(seq_ids, computed):
                self._views.pop(bucket, None)  # free the old buffers first
                view = self._views[bucket] = DecodeView(self.paged, slot_matrix()[:, :past].to(dev),
                                                        past + self.view_growth, seq_ids, computed)
            new_slots = torch.tensor([s.block_ids[c // bs] * bs + c % bs for s, c in zip(seqs, computed)])
            cache = DecodeViewCache(self.paged, view, new_slots.to(dev))
        else:
            slots = slot_matrix()
            cache = StepCache(self.paged, slots.to(dev, non_blocking=True), n)
        mask = None if (not static and bool(valid.all())) else valid.to(dev, torch.long)
        args = (input_ids.to(dev, non_blocking=True), mask, position_ids.to(dev, non_blocking=True), cache)
        embeds = self._image_embeds(seqs, computed, n, input_ids) if self._images else None
        if embeds is not None:  # a step over image placeholders: eager, with the features spliced in
            logits = self._forward(*args, inputs_embeds=embeds)
        elif static and self._compiled is not None:
            try:
                if dev.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                logits = self._compiled(*args)
            except Exception:  # noqa: BLE001 - a compile failure must not take the server down
                log.exception("compiled decode failed; falling back to eager decode for good")
                self._compiled = None
                self.decode_path = "static"
                cache = StepCache(self.paged, slots.to(dev), n)
                logits = self._forward(*args[:3], cache)
        else:
            logits = self._forward(*args)
        cache.commit()
        return logits[:batch].float()
