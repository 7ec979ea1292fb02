"""Speculative decoding rows of ``benchmarks/serving.py`` (``--parts speculative``).

Greedy decoding, eos ignored, the same prompts for every system; each system's outputs are
compared token for token with the full model alone (``outputs_equal`` in every row). Systems
are interleaved, ``--repeats`` times, medians reported.

The compact model is the repository's default small trained code model (the fine-tuning
recipe's base: ``seekdeep.recipes.finetune.default_base``, a 0.92M-parameter 2-layer llama
trained on the standard library; trained once into ``$SEEKDEEP_HOME`` if missing, ~17 min).
The repository has no trained model large enough for drafting to pay off on a CPU (at this
scale a forward costs per-op overhead, so a model 4x larger costs ~2x), so the "draft" rows
use a constructed full model: the compact model with ``--spec-extra-layers`` residual-identity
layers appended (output projections zero: exactly the compact model's function at ~8x its
cost). With the compact model as drafter the acceptance is 1 by construction: that row
measures the ceiling of the machinery (drafting, verifying, bookkeeping) at that cost ratio,
not a drafter's quality; the "early exit" row drafts with the compact model's first layer
only, which disagrees with the full model on a measured share of tokens. The "ngram"
rows need no compact model: prompt lookup on the default model itself, and on the full model,
with code prompts whose greedy continuations the lookup can follow (a small model's greedy
output loops; the lookup follows the loop).
"""

from __future__ import annotations

import statistics
import time

import torch

from common import cpu_capability_fields, emit

from seekdeep.serve.engine import Engine, EngineConfig
from seekdeep.serve.sampling import SamplingParams
from seekdeep.serve.speculative import SpeculativeConfig


def add_arguments(parser) -> None:
    parser.add_argument("--spec-new-tokens", type=int, default=64, help="speculative part: greedy tokens per request")
    parser.add_argument("--spec-k", type=int, default=4, help="speculative part: draft tokens per step")
    parser.add_argument("--spec-batches", default="1,8", help="speculative part: concurrent requests, comma-separated")
    parser.add_argument("--spec-extra-layers", type=int, default=14,
                        help="speculative part: identity layers appended to the compact model to make the full one")
    parser.add_argument("--spec-prompt-len", type=int, default=160, help="speculative part: prompt tokens")


def deepened(model, extra_layers: int):
    """The compact model with ``extra_layers`` layers appended whose attention and MLP output
    projections are zero: every hidden state, hence every logit, is bitwise the compact model's."""
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_hf_dict({**model.config.to_hf_dict(),
                                    "num_hidden_layers": model.config.num_hidden_layers + extra_layers})
    full = LlamaForCausalLM(cfg)
    full.init_weights()
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".layers." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in full.model.layers[model.config.num_hidden_layers :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return full.eval()


def first_layers(model, layers: int):
    """The model cut after its first ``layers`` layers (final norm and head kept): an early-exit
    drafter that disagrees with the whole model on a measured share of tokens."""
    from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

    cut = LlamaForCausalLM(LlamaConfig.from_hf_dict({**model.config.to_hf_dict(), "num_hidden_layers": layers}))
    missing, unexpected = cut.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".layers." in k for k in unexpected), (missing, unexpected)
    return cut.eval()


def code_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens cut from standard-library modules (one per module)."""
    from seekdeep.data import stdlib_files

    prompts = []
    for path in stdlib_files(limit_bytes=4_000_000):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= 2 * length:
            start = len(ids) // 3
            prompts.append(ids[start : start + length])
        if len(prompts) == n:
            return prompts
    raise RuntimeError(f"found only {len(prompts)} standard-library modules of {2 * length}+ tokens")


def timed(engine: Engine, prompts: list[list[int]], new_tokens: int,
          temperature: float = 0.0) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(max_tokens=new_tokens, temperature=temperature, ignore_eos=True, seed=i if temperature else None)
              for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return time.perf_counter() - start, outputs


def bench_speculative(args, dev_name: str) -> None:
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.recipes.finetune import default_base

    base_dir = default_base(progress=False)
    compact = AutoModel.from_pretrained(base_dir, device=args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    full = deepened(compact, args.spec_extra_layers).to(args.device)
    early = first_layers(compact, 1).to(args.device)
    n_compact, n_full = compact.num_parameters(), full.num_parameters()
    batches = [int(b) for b in args.spec_batches.split(",")]
    prompts_all = code_prompts(tokenizer, max(batches), args.spec_prompt_len)
    k = args.spec_k
    common = dict(new_tokens=args.spec_new_tokens, prompt_len=args.spec_prompt_len, k=k, greedy=True,
                  compact_model=f"default trained code model ({base_dir.name}: {n_compact / 1e6:.2f}M, "
                                f"{compact.config.num_hidden_layers} layers)",
                  **cpu_capability_fields())

    def engine(model, spec=None, draft=None, seqs=8):
        return Engine(model, EngineConfig(max_num_seqs=seqs, num_blocks=512), speculative=spec, draft_model=draft)

    for batch in batches:
        prompts = prompts_all[:batch]
        systems = {
            "full": engine(full, seqs=batch),
            "full+draft": engine(full, SpeculativeConfig("draft", k), compact, seqs=batch),
            "full+early": engine(full, SpeculativeConfig("draft", k), early, seqs=batch),
            "full+ngram": engine(full, SpeculativeConfig("ngram", k), seqs=batch),
            "compact": engine(compact, seqs=batch),
            "compact+ngram": engine(compact, SpeculativeConfig("ngram", k), seqs=batch),
        }
        # a prompt that repeats itself (its first half twice): what prompt lookup is for
        repetitive = [p[: len(p) // 2] * 2 for p in prompts]
        rep_systems = {"compact@rep": engine(compact, seqs=batch),
                       "compact+ngram@rep": engine(compact, SpeculativeConfig("ngram", k), seqs=batch)}
        for e in systems.values():  # warm-up
            timed(e, prompts[:1], 8)
        runs: dict[str, list[float]] = {name: [] for name in systems}
        outputs: dict[str, list[list[int]]] = {}
        runs.update({name: [] for name in rep_systems})
        for _ in range(args.repeats):
            for name, e in systems.items():  # interleaved: load drifts on a shared machine
                seconds, out = timed(e, prompts, args.spec_new_tokens)
                runs[name].append(batch * args.spec_new_tokens / seconds)
                outputs.setdefault(name, out)
            for name, e in rep_systems.items():
                seconds, out = timed(e, repetitive, args.spec_new_tokens)
                runs[name].append(batch * args.spec_new_tokens / seconds)
                outputs.setdefault(name, out)
        med = {name: statistics.median(v) for name, v in runs.items()}
        rounded = {name: [round(x, 2) for x in v] for name, v in runs.items()}

        def stats(name):
            spec = {**systems, **rep_systems}[name].speculator
            return dict(acceptance_rate=round(spec.acceptance_rate, 4), tokens_per_step=round(spec.tokens_per_step, 3))

        full_desc = (f"compact + {args.spec_extra_layers} residual-identity layers ({n_full / 1e6:.2f}M, "
                     f"{full.config.num_hidden_layers} layers; same function, acceptance 1 by construction)")
        emit("speculative_draft_model_greedy_tokens_per_s", med["full+draft"], "output tokens/s", med["full"],
             "the full model alone (same engine, no speculation)", dev_name, batch=batch, full_model=full_desc,
             outputs_equal=outputs["full+draft"] == outputs["full"], full_vs_compact_cost=round(med["compact"] / med["full"], 2),
             target_ratio=1.5, **stats("full+draft"), **common, runs=rounded["full+draft"], anchor_runs=rounded["full"])
        emit("speculative_early_exit_drafter_greedy_tokens_per_s", med["full+early"], "output tokens/s", med["full"],
             "the full model alone", dev_name, batch=batch, full_model=full_desc,
             drafter="the compact model's first layer + its final norm and head (early exit)",
             outputs_equal=outputs["full+early"] == outputs["full"], target_ratio=1.5, **stats("full+early"), **common,
             runs=rounded["full+early"], anchor_runs=rounded["full"])
        emit("speculative_ngram_full_model_greedy_tokens_per_s", med["full+ngram"], "output tokens/s", med["full"],
             "the full model alone", dev_name, batch=batch, full_model=full_desc,
             outputs_equal=outputs["full+ngram"] == outputs["full"], **stats("full+ngram"), **common,
             runs=rounded["full+ngram"], anchor_runs=rounded["full"])
        emit("speculative_ngram_default_model_greedy_tokens_per_s", med["compact+ngram"], "output tokens/s",
             med["compact"], "the default model alone (no compact model to draft with: prompt lookup)", dev_name,
             batch=batch, outputs_equal=outputs["compact+ngram"] == outputs["compact"], **stats("compact+ngram"),
             **common, runs=rounded["compact+ngram"], anchor_runs=rounded["compact"])
        emit("speculative_ngram_repetitive_prompt_greedy_tokens_per_s", med["compact+ngram@rep"], "output tokens/s",
             med["compact@rep"], "the default model alone on the same prompts", dev_name, batch=batch,
             prompt="each code prompt's first half, twice",
             outputs_equal=outputs["compact+ngram@rep"] == outputs["compact@rep"],
             **stats("compact+ngram@rep"), **common, runs=rounded["compact+ngram@rep"], anchor_runs=rounded["compact@rep"])

        # sampled (temperature 0.8, seeded): outputs differ from the plain run's draw by draw, their
        # distribution does not (tests/serve/test_speculative.py checks it); speed and acceptance only
        sampled = {"full": engine(full, seqs=batch),
                   "full+early": engine(full, SpeculativeConfig("draft", k), early, seqs=batch)}
        t_runs: dict[str, list[float]] = {name: [] for name in sampled}
        for _ in range(args.repeats):
            for name, e in sampled.items():
                seconds, _ = timed(e, prompts, args.spec_new_tokens, temperature=0.8)
                t_runs[name].append(batch * args.spec_new_tokens / seconds)
        spec = sampled["full+early"].speculator
        emit("speculative_early_exit_drafter_sampled_tokens_per_s", statistics.median(t_runs["full+early"]),
             "output tokens/s", statistics.median(t_runs["full"]), "the full model alone, temperature 0.8", dev_name,
             batch=batch, full_model=full_desc, drafter="the compact model's first layer + its final norm and head",
             temperature=0.8, acceptance_rate=round(spec.acceptance_rate, 4),
             tokens_per_step=round(spec.tokens_per_step, 3), **{**common, "greedy": False},
             runs=[round(x, 2) for x in t_runs["full+early"]], anchor_runs=[round(x, 2) for x in t_runs["full"]])
