"""Compression: size, held-out perplexity and CPU decode latency of compressed models against
the fp32 model (and, for int8, torch's own dynamic quantisation), all in this process.

Two models:
- quality: a small code model trained on the embedded corpus (``--quality-model`` directory,
  trained here with ``seekdeep.recipes.train`` when it does not exist); perplexity on the
  held-out modules.
- speed: a random-init Llama large enough to be memory-bound on CPU (default: the ``125m``
  preset with a 32k vocabulary, ~134M parameters, 537 MB fp32); per-token decode with the KV
  cache, batch 1, greedy, median over steps and rounds (candidates interleaved, so load on a
  shared machine hits all of them alike).

Sizes are the bytes of ``torch.save(model.state_dict())`` for every model (the anchor's
packed weights included). Each stage is one function printing JSON lines (``STAGES``).

Seeds' claims -> targets: INT8 static size <= 0.26x, perplexity +<1%, decode <= 0.5x fp32;
INT4 weight-only (g128) size <= 0.16x, perplexity within 5%, decode <= 0.35x; QAT at int4
recovers >= 50% of the post-training-quantisation perplexity loss.

Pruning 40% of the prunable parameters with recovery: perplexity <= +10%; distilled
half-depth student: decode >= 1.8x faster, perplexity gap reported (with a cross-entropy-only
control trained the same way).

Usage: python benchmarks/compression.py [--stages int8_static,int4_weight_only,qat_int4,mixed_precision,prune,distill]
       [--threads 1] [--quality-model runs/compression/base/final] [--qat-steps 200]
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, emit  # noqa: E402

from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from seekdeep.quantization import QuantConfig, mixed_precision_config, model_size_bytes  # noqa: E402


# ----------------------------------------------------------------------------- shared context


@dataclass
class Context:
    args: argparse.Namespace
    device: str
    quality: nn.Module | None = None  # trained fp32 model
    eval_batches: list[torch.Tensor] = field(default_factory=list)  # held-out, for perplexity
    probe_batches: list[torch.Tensor] = field(default_factory=list)  # held-out, disjoint: sensitivity
    calib_batches: list[torch.Tensor] = field(default_factory=list)  # training side: calibration
    train_windows: Any = None  # training side: fresh batches for QAT and its control
    speed: nn.Module | None = None  # random-init fp32 model
    speed_calib: list[torch.Tensor] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(model(batch, labels=batch).loss) * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def decode_step_times(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[float]:
    """Seconds per generated token (batch 1, KV cache, greedy), prefill excluded."""
    model.eval()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return times


def decode_latency(models: dict[str, nn.Module], prompt: torch.Tensor, steps: int, rounds: int) -> dict[str, float]:
    """Median per-token seconds of each model; rounds interleave the models."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: first-call allocations, lazy inits
        decode_step_times(model, prompt, 4)
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(statistics.median(decode_step_times(model, prompt, steps)))
    return {name: statistics.median(s) for name, s in samples.items()}


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """The anchor: torch's own dynamic int8 quantisation of every nn.Linear (fbgemm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


# ----------------------------------------------------------------------------- setup


def setup_quality(ctx: Context) -> None:
    from seekdeep.data import TokenWindows, prepare_data
    from seekdeep.recipes.train import TrainConfig, train

    args = ctx.args
    model_dir = Path(args.quality_model)
    if not (model_dir / "config.json").exists():
        print(f"training the quality model into {model_dir.parent} ...", file=sys.stderr)
        train(TrainConfig(preset="small", attention_backend="sdpa", steps=args.train_steps, max_time=args.train_time,
                          output_dir=str(model_dir.parent), progress=False))
    ctx.quality = LlamaForCausalLM.from_pretrained(model_dir)
    data = prepare_data(None, vocab_size=ctx.quality.config.vocab_size, seq_len=args.seq_len, progress=False)
    heldout = TokenWindows(data.heldout_path, args.seq_len, args.eval_batch, shuffle=False)
    batches = list(heldout.eval_batches())
    ctx.eval_batches = batches[: args.eval_batches]
    ctx.probe_batches = batches[args.eval_batches : args.eval_batches + args.probe_batches]
    calib_windows = TokenWindows(data.train_path, args.seq_len, args.calib_batch, seed=1)
    ctx.calib_batches = [calib_windows.next_batch() for _ in range(args.calib_batches)]
    ctx.train_windows = TokenWindows(data.train_path, args.seq_len, args.qat_batch, seed=2)
    ctx.cache["train_path"] = data.train_path
    ctx.cache["fp32_ppl"] = perplexity(ctx.quality, ctx.eval_batches)
    ctx.cache["fp32_quality_bytes"] = state_bytes(ctx.quality)
    print(f"quality model {model_dir}: {ctx.quality.num_parameters() / 1e6:.2f}M parameters, fp32 held-out perplexity "
          f"{ctx.cache['fp32_ppl']:.3f} on {sum(b.numel() for b in ctx.eval_batches)} tokens", file=sys.stderr)


def setup_speed(ctx: Context) -> None:
    args = ctx.args
    config = LlamaConfig.from_name(args.speed_preset, vocab_size=args.speed_vocab, max_position_embeddings=1024,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ctx.speed = LlamaForCausalLM(config)
    ctx.speed.init_weights()
    ctx.speed.eval()
    g = torch.Generator().manual_seed(0)
    ctx.speed_calib = [torch.randint(0, config.vocab_size, (1, 128), generator=g) for _ in range(4)]
    ctx.cache["fp32_speed_bytes"] = state_bytes(ctx.speed)
    print(f"speed model: {args.speed_preset} preset, vocab {args.speed_vocab}, "
          f"{ctx.speed.num_parameters() / 1e6:.1f}M parameters, {ctx.cache['fp32_speed_bytes'] / 1e6:.0f} MB fp32",
          file=sys.stderr)


def fp32_latency(ctx: Context, **others: nn.Module) -> dict[str, float]:
    """Decode latency of ``others`` measured with the fp32 speed model in the same rounds."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ctx.speed.config.vocab_size, (1, ctx.args.prompt_len), generator=g)
    return decode_latency({"fp32": ctx.speed, **others}, prompt, ctx.args.decode_steps, ctx.args.rounds)


def compare(ctx: Context, label: str, quality_model: nn.Module, speed_model: nn.Module, anchor_label: str = "fp32",
            **extra: Any) -> None:
    """Emit size, perplexity and decode latency rows of one compressed model against fp32."""
    ppl = perplexity(quality_model, ctx.eval_batches)
    emit(f"{label}_perplexity", ppl, "perplexity", ctx.cache["fp32_ppl"], f"{anchor_label} (same trained model)",
         ctx.device, eval_tokens=sum(b.numel() for b in ctx.eval_batches), **extra)
    emit(f"{label}_size", state_bytes(speed_model) / 1e6, "MB", ctx.cache["fp32_speed_bytes"] / 1e6,
         f"{anchor_label} ({ctx.args.speed_preset} preset, vocab {ctx.args.speed_vocab})", ctx.device,
         quality_model_ratio=round(state_bytes(quality_model) / ctx.cache["fp32_quality_bytes"], 4), **extra)
    latency = fp32_latency(ctx, candidate=speed_model)
    emit(f"{label}_decode_latency", latency["candidate"] * 1e3, "ms/token", latency["fp32"] * 1e3,
         f"{anchor_label} ({ctx.args.speed_preset}, batch 1, KV cache)", ctx.device, **extra)


# ----------------------------------------------------------------------------- stages


def stage_int8_static(ctx: Context) -> None:
    """INT8 W8A8 static (calibrated per-tensor activation scales, torch._int_mm) vs fp32, and
    torch.ao.quantization.quantize_dynamic (the anchor) measured in the same rounds."""
    cfg = QuantConfig(method="static", bits=8, observe_steps=len(ctx.calib_batches))
    quality = cfg.apply(copy.deepcopy(ctx.quality), ctx.calib_batches)
    speed = QuantConfig(method="static", bits=8).apply(copy.deepcopy(ctx.speed), ctx.speed_calib)
    extra = dict(method="static", bits=8, kernel="torch._int_mm (int8 x int8 -> int32)", calibration_batches=len(ctx.calib_batches),
                 calibration_tokens=sum(b.numel() for b in ctx.calib_batches))
    compare(ctx, "int8_static", quality, speed, **extra)
    anchor_quality, anchor_speed = torch_dynamic_int8(ctx.quality), torch_dynamic_int8(ctx.speed)
    anchor_ppl = perplexity(anchor_quality, ctx.eval_batches)
    ppl = perplexity(quality, ctx.eval_batches)
    emit("int8_static_vs_torch_dynamic_perplexity", ppl, "perplexity", anchor_ppl, "torch.ao quantize_dynamic (qint8 Linear)",
         ctx.device, fp32_perplexity=round(ctx.cache["fp32_ppl"], 4))
    emit("int8_static_vs_torch_dynamic_size", state_bytes(speed) / 1e6, "MB", state_bytes(anchor_speed) / 1e6,
         "torch.ao quantize_dynamic (embeddings stay fp32)", ctx.device)
    latency = fp32_latency(ctx, seekdeep=speed, anchor=anchor_speed)
    emit("int8_static_vs_torch_dynamic_decode_latency", latency["seekdeep"] * 1e3, "ms/token", latency["anchor"] * 1e3,
         "torch.ao quantize_dynamic (fbgemm)", ctx.device, fp32_ms=round(latency["fp32"] * 1e3, 3),
         anchor_vs_fp32=round(latency["anchor"] / latency["fp32"], 4))


def stage_int8_dynamic(ctx: Context) -> None:
    """INT8 W8A8 with per-token dynamic activation scales (torch._int_mm)."""
    compare(ctx, "int8_dynamic", QuantConfig(method="dynamic").apply(copy.deepcopy(ctx.quality)),
            QuantConfig(method="dynamic").apply(copy.deepcopy(ctx.speed)), method="dynamic", bits=8,
            kernel="torch._int_mm")


def stage_int8_weight_only(ctx: Context) -> None:
    """INT8 weight-only (torch._weight_int8pack_mm, bf16 activations)."""
    cfg = QuantConfig(method="weight_only", bits=8)
    compare(ctx, "int8_weight_only", cfg.apply(copy.deepcopy(ctx.quality)), cfg.apply(copy.deepcopy(ctx.speed)),
            method="weight_only", bits=8, kernel="torch._weight_int8pack_mm (bf16 activations)")


def stage_int4_weight_only(ctx: Context) -> None:
    """INT4 group-wise weight-only, group 128 (torch._weight_int4pack_mm_for_cpu, bf16 activations)."""
    cfg = QuantConfig(method="weight_only", bits=4, group_size=128)
    quality = cfg.apply(copy.deepcopy(ctx.quality))
    ctx.cache["int4_ptq_ppl"] = perplexity(quality, ctx.eval_batches)
    compare(ctx, "int4_weight_only_g128", quality, cfg.apply(copy.deepcopy(ctx.speed)), method="weight_only", bits=4,
            group_size=128, kernel="torch._weight_int4pack_mm_for_cpu (bf16 activations)")


def _finetune_float(model: nn.Module, batches: list[torch.Tensor], steps: int, lr: float) -> nn.Module:
    """The control for QAT: the same fine-tune (data, steps, optimizer, schedule) without fake quantisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        model(batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def stage_qat_int4(ctx: Context) -> None:
    """QAT at int4 g128: share of the post-training perplexity loss recovered. Also reports the
    control (the float model fine-tuned the same way, then post-training quantised), since a
    fine-tune on more data can lower perplexity by itself."""
    args = ctx.args
    ptq_cfg = QuantConfig(method="weight_only", bits=4, group_size=128)
    fp32_ppl = ctx.cache["fp32_ppl"]
    ptq_ppl = ctx.cache.get("int4_ptq_ppl") or perplexity(ptq_cfg.apply(copy.deepcopy(ctx.quality)), ctx.eval_batches)
    data = [ctx.train_windows.next_batch() for _ in range(args.qat_steps)]  # each step a fresh batch
    t0 = time.perf_counter()
    qat = QuantConfig(method="qat", bits=4, group_size=128, qat_steps=args.qat_steps, qat_lr=args.qat_lr).apply(
        copy.deepcopy(ctx.quality), data)
    qat_seconds = time.perf_counter() - t0
    qat_ppl = perplexity(qat, ctx.eval_batches)
    control = _finetune_float(copy.deepcopy(ctx.quality), data, args.qat_steps, args.qat_lr)
    control_ppl = perplexity(control, ctx.eval_batches)
    control_ptq_ppl = perplexity(ptq_cfg.apply(control), ctx.eval_batches)
    recovered = (ptq_ppl - qat_ppl) / (ptq_ppl - fp32_ppl) if ptq_ppl > fp32_ppl else float("nan")
    recovered_control = ((control_ptq_ppl - qat_ppl) / (control_ptq_ppl - control_ppl)
                         if control_ptq_ppl > control_ppl else float("nan"))
    emit("qat_int4_g128_perplexity", qat_ppl, "perplexity", ptq_ppl, "post-training int4 g128 (same model)", ctx.device,
         fp32_perplexity=round(fp32_ppl, 4), recovered_fraction=round(recovered, 4),
         control_finetuned_fp32_perplexity=round(control_ppl, 4), control_finetuned_ptq_perplexity=round(control_ptq_ppl, 4),
         recovered_fraction_vs_control=round(recovered_control, 4), qat_steps=args.qat_steps, qat_lr=args.qat_lr,
         qat_tokens_per_step=data[0].numel(), qat_seconds=round(qat_seconds, 1))


def stage_mixed_precision(ctx: Context) -> None:
    """4 / 8 / 16 bits per layer from measured sensitivity under a size budget, vs uniform int4
    at about the same size."""
    budget = ctx.args.mixed_budget
    model = copy.deepcopy(ctx.quality)
    t0 = time.perf_counter()
    cfg = mixed_precision_config(model, ctx.probe_batches, budget=budget, bits=(4, 8, 16), group_size=128)
    seconds = time.perf_counter() - t0
    mixed = cfg.apply(model)
    uniform = QuantConfig(method="weight_only", bits=4, group_size=128).apply(copy.deepcopy(ctx.quality))
    counts = {b: sum(1 for v in cfg.layer_bits.values() if v == b) for b in (4, 8, 16)}
    float_bytes = model_size_bytes(ctx.quality)  # the budget's measure: tensor bytes, no file headers
    emit("mixed_precision_perplexity", perplexity(mixed, ctx.eval_batches), "perplexity",
         perplexity(uniform, ctx.eval_batches), "uniform int4 g128", ctx.device, budget=budget,
         size_ratio=round(model_size_bytes(mixed) / float_bytes, 4),
         uniform_int4_size_ratio=round(model_size_bytes(uniform) / float_bytes, 4),
         fp32_perplexity=round(ctx.cache["fp32_ppl"], 4), layers_per_bits=counts, sensitivity_seconds=round(seconds, 1))


def stage_prune(ctx: Context) -> None:
    """Structured pruning of ``--prune-ratio`` of the prunable (attention + MLP) parameters, by
    L1 norm and by activation-aware scores, each followed by the same recovery fine-tune; the
    control is the unpruned model fine-tuned with the same data and steps. Speed: the speed
    model pruned alike (L1; speed does not depend on which channels go) against fp32."""
    from seekdeep.data import TokenWindows
    from seekdeep.pruning import PruneConfig, prune, recover

    args, fp32_ppl = ctx.args, ctx.cache["fp32_ppl"]

    def recovery_windows():  # the same batches for every candidate and the control
        return TokenWindows(ctx.cache["train_path"], args.seq_len, args.qat_batch, seed=3)

    t0 = time.perf_counter()
    control = copy.deepcopy(ctx.quality)
    recover(control, recovery_windows(), args.recovery_steps, lr=args.recovery_lr)
    control_ppl = perplexity(control, ctx.eval_batches)
    control_seconds = time.perf_counter() - t0
    label = f"prune{round(100 * args.prune_ratio)}"
    for method in ("l1", "activation"):
        t0 = time.perf_counter()
        calibration = ctx.calib_batches if method == "activation" else None
        pruned, report = prune(ctx.quality, PruneConfig(ratio=args.prune_ratio, method=method), calibration)
        ppl_pruned = perplexity(pruned, ctx.eval_batches)
        recover(pruned, recovery_windows(), args.recovery_steps, lr=args.recovery_lr)
        ppl = perplexity(pruned, ctx.eval_batches)
        emit(f"{label}_{method}_recovered_perplexity", ppl, "perplexity", fp32_ppl, "fp32 (same trained model)", ctx.device,
             prunable_fraction_removed=round(report.prunable_fraction_removed, 4),
             total_fraction_removed=round(report.total_fraction_removed, 4),
             parameters=report.total_params_after, parameters_before=report.total_params_before,
             perplexity_before_recovery=round(ppl_pruned, 4), control_finetuned_unpruned_perplexity=round(control_ppl, 4),
             ratio_vs_control=round(ppl / control_ppl, 4), recovery_steps=args.recovery_steps,
             recovery_lr=args.recovery_lr, recovery_tokens_per_step=args.qat_batch * args.seq_len,
             intermediate_size=f"{report.intermediate_size_before}->{report.intermediate_size_after}",
             heads=f"{report.num_attention_heads_before}->{report.num_attention_heads_after}",
             seconds=round(time.perf_counter() - t0, 1), control_seconds=round(control_seconds, 1))
    speed, report = prune(ctx.speed, PruneConfig(ratio=args.prune_ratio, method="l1"))
    latency = fp32_latency(ctx, candidate=speed.eval())
    emit(f"{label}_decode_latency", latency["candidate"] * 1e3, "ms/token", latency["fp32"] * 1e3,
         f"fp32 ({args.speed_preset}, batch 1, KV cache)", ctx.device,
         total_fraction_removed=round(report.total_fraction_removed, 4),
         size_ratio=round(state_bytes(speed) / ctx.cache["fp32_speed_bytes"], 4))


def stage_distill(ctx: Context) -> None:
    """A half-depth student (every other layer of the quality model) distilled with the
    ``seekdeep distill`` recipe; the control is the same student trained on cross-entropy
    alone (alpha = 0) for the same steps. Speed: a half-depth student of the speed model."""
    from seekdeep.distill import make_student
    from seekdeep.recipes.distill import DistillRunConfig, distill

    args, fp32_ppl = ctx.args, ctx.cache["fp32_ppl"]
    runs = {}
    for name, alpha in (("distill", args.distill_alpha), ("ce_only", 0.0)):
        t0 = time.perf_counter()
        summary = distill(DistillRunConfig(
            teacher=args.quality_model, steps=args.distill_steps, lr=args.distill_lr, alpha=alpha,
            temperature=args.distill_temperature, seq_len=args.seq_len, batch_size=args.qat_batch,
            eval_interval=args.distill_steps, checkpoint_interval=args.distill_steps,
            output_dir=f"{args.distill_out}/{name}", progress=False))
        student = LlamaForCausalLM.from_pretrained(summary["model_dir"])
        runs[name] = (perplexity(student, ctx.eval_batches), summary, time.perf_counter() - t0)
    ppl, summary, seconds = runs["distill"]
    emit("distill_half_depth_perplexity", ppl, "perplexity", fp32_ppl, "teacher (fp32, full depth)", ctx.device,
         teacher_layers=summary["teacher_layers"], student_layers=summary["student_layers"],
         parameter_ratio=round(summary["parameter_ratio"], 4), student_init_perplexity=round(summary["student_init_ppl"], 4),
         ce_only_control_perplexity=round(runs["ce_only"][0], 4), ratio_vs_ce_only=round(ppl / runs["ce_only"][0], 4),
         steps=args.distill_steps, lr=args.distill_lr, temperature=args.distill_temperature, alpha=args.distill_alpha,
         tokens_per_step=args.qat_batch * args.seq_len, seconds=round(seconds, 1))
    student = make_student(ctx.speed, "every_other").eval()
    latency = fp32_latency(ctx, candidate=student)
    emit("distill_half_depth_decode_latency", latency["candidate"] * 1e3, "ms/token", latency["fp32"] * 1e3,
         f"fp32 teacher ({args.speed_preset}, batch 1, KV cache)", ctx.device,
         speedup=round(latency["fp32"] / latency["candidate"], 4), student_layers=student.config.num_hidden_layers,
         parameter_ratio=round(student.num_parameters() / ctx.speed.num_parameters(), 4))


STAGES: dict[str, Callable[[Context], None]] = {
    "int8_static": stage_int8_static,
    "int8_dynamic": stage_int8_dynamic,
    "int8_weight_only": stage_int8_weight_only,
    "int4_weight_only": stage_int4_weight_only,
    "qat_int4": stage_qat_int4,
    "mixed_precision": stage_mixed_precision,
    "prune": stage_prune,
    "distill": stage_distill,
}
NEEDS_SPEED = {"int8_static", "int8_dynamic", "int8_weight_only", "int4_weight_only", "prune", "distill"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="int8_static,int4_weight_only,qat_int4,mixed_precision,prune,distill",
                        help=f"comma-separated, from: {', '.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--quality-model", default="runs/compression/base/final")
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--train-time", type=float, default=2700.0, help="seconds budget when the quality model is trained here")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--probe-batches", type=int, default=1)
    parser.add_argument("--calib-batch", type=int, default=4)
    parser.add_argument("--calib-batches", type=int, default=32)
    parser.add_argument("--speed-preset", default="125m")
    parser.add_argument("--speed-vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-batch", type=int, default=8)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--mixed-budget", type=float, default=0.2)
    parser.add_argument("--prune-ratio", type=float, default=0.4, help="fraction of the prunable parameters removed")
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--distill-alpha", type=float, default=0.5)
    parser.add_argument("--distill-temperature", type=float, default=2.0)
    parser.add_argument("--distill-out", default="runs/compression/distill")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; accepted: {', '.join(STAGES)}")
    torch.set_num_threads(args.threads)
    ctx = Context(args, device_name())
    setup_quality(ctx)
    if NEEDS_SPEED & set(stages):
        setup_speed(ctx)
    for stage in stages:
        t0 = time.perf_counter()
        STAGES[stage](ctx)
        print(f"stage {stage}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
