"""Worker run under torchrun by the tests (and importable for the one-process reference).

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel/parallel_worker.py parity OUT.json FAMILY:SPEC [...]
    ... worker.py ckpt-save DIR FAMILY:SPEC   (train 2 steps, save, then 1 more step; records the losses)
    ... worker.py ckpt-load DIR FAMILY:SPEC [...]   (per layout: load, take the 3rd step; records the loss)
    ... worker.py compress OUT.json HOOK [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

STEPS = 5
VOCAB, SEQ, BATCH = 64, 16, 4


def make_model(family: str):
    """"llama" (tied, GQA), "qwen3" (untied, per-head q/k norms, gated attention) or "deepseek" (MLA + MoE)."""
    if family in ("llama", "qwen3"):
        from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

        extra = dict(model_type="qwen3", qk_norm=True, attention_backend="gated") if family == "qwen3" else {}
        cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=family == "llama", attention_backend="sdpa"), **extra})
        return LlamaForCausalLM(cfg)
    from seekdeep.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config.from_name("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                                     q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                     n_routed_experts=4, n_group=1, topk_group=1, max_position_embeddings=64,
                                     attention_backend="sdpa")
    return DeepseekV3ForCausalLM(cfg)


def reference_state(family: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = make_model(family)
    model.init_weights()
    return {k: v.clone() for k, v in model.state_dict().items()}


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


COMPRESS_STEPS = 40


def pattern_batches(n: int) -> list[torch.Tensor]:
    """A learnable task: rows are arithmetic progressions mod VOCAB (x_t = a + b*t)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        a = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        b = torch.randint(1, 4, (BATCH, 1), generator=g)
        out.append((a + b * torch.arange(SEQ)) % VOCAB)
    return out


def _opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)


def single_process_losses(family: str, steps: int = STEPS) -> list[float]:
    model = make_model(family)
    model.load_state_dict(reference_state(family))
    opt = _opt(model.parameters())
    losses = []
    for batch in batches(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def parallel_model(family: str, spec: str):
    from seekdeep.parallel import ParallelConfig, build_mesh, parallelize

    config = ParallelConfig.from_string(spec)
    mesh = build_mesh(config)
    with torch.device("meta"):
        model = make_model(family)
    pm = parallelize(model, mesh, config)
    pm.materialize(reference_state(family))
    return pm


def seed_wrapper_steps(family: str) -> list[float]:
    """The seed-shaped call on an already materialised model: ``TensorParallel(model)``."""
    from seekdeep.parallel import TensorParallel, clip_grad_norm_

    model = make_model(family)
    model.load_state_dict(reference_state(family))
    model = TensorParallel(model)  # every rank of the process group, sequence parallel on
    opt = _opt(model.parameters())
    losses = []
    for batch in batches():
        loss = model(batch, labels=batch).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def parallel_steps(pm, opt, data) -> list[float]:
    losses = []
    for batch in data:
        loss = pm.forward_backward(pm.local_batch(batch))
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(pm.global_mean(loss))
    return losses


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from seekdeep.parallel import init_distributed
    from seekdeep.parallel.optim import PartsOptimizer

    mode, out = argv[0], Path(argv[1])
    init_distributed()
    rank = dist.get_rank()
    results = {}
    if mode == "parity":
        for item in argv[2:]:
            family, spec = item.split(":", 1)
            if spec == "TensorParallel":
                results[item] = seed_wrapper_steps(family)
                continue
            pm = parallel_model(family, spec)
            opt = PartsOptimizer(pm.parts, lambda part: _opt(part.parameters()))
            results[item] = parallel_steps(pm, opt, batches())
    elif mode == "ckpt-save":
        from seekdeep.parallel.checkpoint import save_distributed_checkpoint

        family, spec = argv[2].split(":", 1)
        pm = parallel_model(family, spec)
        opt = PartsOptimizer(pm.parts, lambda part: _opt(part.parameters()))
        data = batches(3)
        results["first"] = parallel_steps(pm, opt, data[:2])
        save_distributed_checkpoint(out / "run", 2, pm.parts, opt, data_state={"cursor": 2})
        results["next"] = parallel_steps(pm, opt, data[2:])
        out = out / "save.json"
    elif mode == "ckpt-load":
        from seekdeep.parallel.checkpoint import load_distributed_checkpoint

        for item in argv[2:]:
            family, spec = item.split(":", 1)
            pm = parallel_model(family, spec)
            opt = PartsOptimizer(pm.parts, lambda part: _opt(part.parameters()))
            state = load_distributed_checkpoint(out / "run" / "checkpoint-00000002", pm.parts, opt)
            results[item] = {"data_state": state.data_state, "next": parallel_steps(pm, opt, batches(3)[2:])}
        out = out / "load.json"
    elif mode == "compress":
        from seekdeep.parallel.compression import CollectiveCounter

        for hook in argv[2:]:
            pm = parallel_model("llama", f"dp_replicate=2,compression={hook}")
            opt = PartsOptimizer(pm.parts, lambda part: _opt(part.parameters()))
            with CollectiveCounter() as counter:
                losses = parallel_steps(pm, opt, pattern_batches(COMPRESS_STEPS))
            results[hook] = {"losses": losses, "bytes_per_step": counter.bytes_sent / COMPRESS_STEPS}
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])


def single_process_resume(run_dir: Path, family: str = "llama") -> dict:
    """Load a distributed checkpoint into a plain one-process model and take the next step."""
    from seekdeep.parallel import ParallelConfig, parallelize
    from seekdeep.parallel.checkpoint import load_distributed_checkpoint
    from seekdeep.parallel.optim import PartsOptimizer

    model = make_model(family)  # real tensors, overwritten by the load
    pm = parallelize(model, None, ParallelConfig())
    opt = PartsOptimizer(pm.parts, lambda part: _opt(part.parameters()))
    state = load_distributed_checkpoint(run_dir / "checkpoint-00000002", pm.parts, opt)
    return {"data_state": state.data_state, "next": parallel_steps(pm, opt, batches(3)[2:])}
