"""``seekdeep compress``: prune -> distil -> quantise a model, and report what each stage bought.

    seekdeep compress runs/train/final --prune 0.4 --distill --quant int8

Stages run in that order, each on the previous stage's model; any subset may be chosen:

- ``--prune R``: remove a fraction R of the prunable (attention + MLP) parameters as whole
  heads / channels (:mod:`seekdeep.pruning`), then a short recovery fine-tune;
- ``--distill``: a student keeping every other layer of the current model, trained on the
  model's temperature-softened logits plus cross-entropy (the ``seekdeep distill`` recipe,
  with its checkpoints and progress);
- ``--quant int8 | int8-dynamic | int8-weight-only | int4``: :mod:`seekdeep.quantization`,
  calibrated on training batches for ``int8`` (static W8A8).

Every stage's model is saved (``OUTPUT_DIR/<stage>/``, loadable with ``AutoModel``) and
measured against the input model: parameters, weight-file size, held-out perplexity, and
decode latency per token (batch 1, KV cache, greedy) on the run's device, all models timed in
interleaved rounds so a busy machine slows them alike. The report is ``report.json``,
``report.md`` and ``report.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from seekdeep.errors import ConfigError
from seekdeep.files import check_data_path, check_model_path
from seekdeep.validate import MAX_BATCH, MAX_SEED, MAX_SEQ_LEN, check_device, check_float, check_int

#: --quant choices -> QuantConfig keyword arguments
QUANT_SCHEMES: dict[str, dict[str, Any]] = {
    "int8": dict(method="static", bits=8),
    "int8-dynamic": dict(method="dynamic", bits=8),
    "int8-weight-only": dict(method="weight_only", bits=8),
    "int4": dict(method="weight_only", bits=4),
}
DEFAULT_MODEL = Path("runs/train/final")  # what `seekdeep train` writes


@dataclass
class CompressConfig:
    """Every knob of a compression run; at least one of prune / distill / quant is required."""

    model: str | None = None  # model directory or hub id; None: runs/train/final
    data: str | None = None  # text file, folder or .jsonl; None: the embedded corpus
    prune: float | None = None  # fraction of the prunable parameters to remove, in (0, 1)
    prune_method: str = "activation"
    prune_targets: str = "mlp,heads"
    recovery_steps: int = 150
    recovery_lr: float = 1e-3
    distill: bool = False
    distill_layers: str = "every_other"
    distill_steps: int = 300
    distill_lr: float = 1e-3
    temperature: float = 2.0
    alpha: float = 0.5
    quant: str | None = None  # see QUANT_SCHEMES
    group_size: int = 128  # int4
    calibration_batches: int = 16  # int8 static observers and activation-aware pruning
    seq_len: int = 256
    batch_size: int = 8
    eval_batches: int = 20
    latency_prompt: int = 64
    latency_tokens: int = 32
    latency_rounds: int = 3
    threads: int | None = None  # torch CPU threads for the whole run (None: torch's default)
    output_dir: str = "runs/compress"
    overwrite: bool = False  # replace a finished run (its report and stage models) in output_dir instead of refusing
    device: str = "cpu"  # the integer kernels and the latency target are CPU ones
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.prune is None and not self.distill and self.quant is None:
            raise ConfigError("prune", "no stage chosen; accepted: --prune RATIO, --distill and/or "
                              f"--quant {{{', '.join(QUANT_SCHEMES)}}}")
        if self.quant is not None and self.quant not in QUANT_SCHEMES:
            raise ConfigError("quant", f"unknown {self.quant!r}; accepted: {', '.join(QUANT_SCHEMES)}")
        for name in ("recovery_steps", "distill_steps", "calibration_batches", "eval_batches", "latency_rounds"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("latency_prompt", self.latency_prompt, 1, MAX_SEQ_LEN)
        check_int("latency_tokens", self.latency_tokens, 1, MAX_SEQ_LEN)
        check_int("group_size", self.group_size, 1, 1 << 16)
        check_int("threads", self.threads, 1, 4096, optional=True)
        check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("recovery_lr", "distill_lr"):
            check_float(name, getattr(self, name), 0, 10, lo_open=True)
        check_model_path("model", self.model)
        check_data_path("data", self.data)
        check_device("device", self.device, optional=False)
        if self.prune is not None:
            self.prune_config()  # ratio, method and targets checked by PruneConfig
        from seekdeep.distill.config import check_alpha, check_temperature

        check_temperature(self.temperature)  # checked with or without --distill: nothing is accepted unseen
        check_alpha(self.alpha)
        if self.distill:
            from seekdeep.distill import DistillConfig

            DistillConfig(layers=self.distill_layers, temperature=self.temperature, alpha=self.alpha)

    def prune_config(self):
        from seekdeep.pruning import PruneConfig

        targets = tuple(t.strip() for t in self.prune_targets.split(",") if t.strip())
        try:
            return PruneConfig(ratio=self.prune, method=self.prune_method, targets=targets)
        except ConfigError as exc:  # name the flag the user gave, not PruneConfig's field
            flag = {"ratio": "prune", "method": "prune_method", "targets": "prune_targets"}.get(exc.field, exc.field)
            raise ConfigError(flag, str(exc).split(": ", 1)[-1]) from None

    def quant_config(self):
        from seekdeep.quantization import QuantConfig

        kwargs = dict(QUANT_SCHEMES[self.quant])
        if kwargs["bits"] == 4:
            kwargs["group_size"] = self.group_size
        if kwargs["method"] == "static":
            kwargs["observe_steps"] = self.calibration_batches
        return QuantConfig(**kwargs)


@dataclass
class StageResult:
    """One row of the report."""

    stage: str
    model_dir: str
    parameters: int
    file_bytes: int
    heldout_ppl: float
    seconds: float  # wall time of the stage itself (training included)
    details: dict[str, Any]
    decode_ms_per_token: float | None = None


# ----------------------------------------------------------------------------- measurements


def weight_file_bytes(directory: Path) -> int:
    """Bytes of the weight files ``save_pretrained`` wrote (safetensors shards)."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def parameter_count(model) -> int:
    """Parameters of the model as a float network: quantised modules keep their weights in
    buffers, so each counts the weights of the layer it replaced (a tied embedding none, like
    the shared float weight); float parameters are counted once each."""
    from seekdeep.quantization.modules import QuantizedModule, TiedEmbedding

    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    for module in model.modules():
        if isinstance(module, TiedEmbedding) or not isinstance(module, QuantizedModule):
            continue
        if hasattr(module, "in_features"):
            total += module.in_features * module.out_features
        else:
            total += module.num_embeddings * module.embedding_dim
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(bias, torch.nn.Parameter):
            total += bias.numel()
    return total


def decode_latency(models: dict[str, Any], prompt_len: int, new_tokens: int, rounds: int) -> dict[str, float]:
    """Median ms per decoded token of each model; each round times every model once, so load on
    a shared machine falls on all of them alike."""
    from seekdeep.profiler import LatencyProfiler

    samples: dict[str, list[float]] = {name: [] for name in models}
    profilers = {name: LatencyProfiler(model, new_tokens=new_tokens, repeats=1, warmup=0) for name, model in models.items()}
    for profiler in profilers.values():  # first-call allocations and lazy inits
        LatencyProfiler(profiler.model, new_tokens=4, repeats=1, warmup=0).measure(1, prompt_len)
    for _ in range(rounds):
        for name, profiler in profilers.items():
            samples[name].append(profiler.measure(1, prompt_len).decode_ms_per_token)
    return {name: statistics.median(values) for name, values in samples.items()}


# ----------------------------------------------------------------------------- report


def write_report(out: Path, results: list[StageResult], meta: dict[str, Any]) -> dict[str, Path]:
    """report.json, report.md and report.png (every metric relative to the input model)."""
    from seekdeep.files import atomic_write, write_json_atomic

    base = results[0]
    rows = []
    for r in results:
        row = asdict(r)
        row["parameters_ratio"] = r.parameters / base.parameters
        row["file_bytes_ratio"] = r.file_bytes / base.file_bytes
        row["heldout_ppl_ratio"] = r.heldout_ppl / base.heldout_ppl
        if r.decode_ms_per_token is not None and base.decode_ms_per_token:
            row["decode_ms_ratio"] = r.decode_ms_per_token / base.decode_ms_per_token
        rows.append(row)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
    write_json_atomic(paths["json"], {**meta, "stages": rows})

    lines = [f"# seekdeep compress: {meta['model']}", "",
             f"Held-out perplexity on {meta['data']['data'] if 'data' in meta['data'] else meta['data']}; "
             f"decode latency: batch 1, {meta['latency']['prompt']}-token prompt, {meta['latency']['tokens']} new "
             f"tokens, median of {meta['latency']['rounds']} interleaved rounds on {meta['device']}.", "",
             "| stage | parameters | weights (MB) | held-out ppl | decode (ms/token) | stage time (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        latency = (f"{row['decode_ms_per_token']:.2f} ({row['decode_ms_ratio']:.2f}x)"
                   if row.get("decode_ms_ratio") is not None else "-")
        lines.append(f"| {row['stage']} | {row['parameters']:,d} ({row['parameters_ratio']:.2f}x) | "
                     f"{row['file_bytes'] / 1e6:.2f} ({row['file_bytes_ratio']:.2f}x) | "
                     f"{row['heldout_ppl']:.2f} ({row['heldout_ppl_ratio']:.3f}x) | {latency} | {row['seconds']:.0f} |")
    lines += ["", "Ratios are against the input model (first row). Stage details are in report.json.", ""]
    markdown = "\n".join(lines)
    atomic_write(paths["markdown"], lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("parameters_ratio", "parameters"), ("file_bytes_ratio", "weight file size"),
               ("heldout_ppl_ratio", "held-out perplexity"), ("decode_ms_ratio", "decode latency / token")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    names = [row["stage"] for row in rows]
    for ax, (key, title) in zip(axes, metrics):
        values = [row.get(key) or 0.0 for row in rows]
        bars = ax.bar(names, values, color=["#888888"] + ["#3b7dd8"] * (len(rows) - 1))
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylim(0, 1.15 * max(values + [1.0]))  # room for the labels above the tallest bar
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel("relative to the input model")
    fig.suptitle(f"seekdeep compress: {meta['model']}")
    fig.tight_layout()
    tmp = paths["plot"].with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(paths["plot"])
    return paths


# ----------------------------------------------------------------------------- the pipeline


def _save(model, tokenizer, directory: Path) -> None:
    from seekdeep.train import publish_dir

    publish_dir(directory, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def resolve_model(model: str | None) -> Path | str:
    if model is not None:
        return model
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    raise ConfigError("model", f"none given and {DEFAULT_MODEL} does not exist; train one with `seekdeep train` "
                      "or pass a model directory or hub id")


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Run the chosen stages; returns the report (also written as report.json / .md / .png)."""
    from seekdeep.auto import AutoModel, AutoTokenizer
    from seekdeep.data import TokenWindows
    from seekdeep.recipes.distill import DistillRunConfig, distill, prepare_distill_data
    from seekdeep.recipes.train import evaluate
    from seekdeep.train import PrecisionPolicy, prepare_run_dir

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = prepare_run_dir(cfg.output_dir, command="compress", overwrite=cfg.overwrite, resumable=False)
    device = torch.device(cfg.device)
    source = resolve_model(cfg.model)
    model = AutoModel.from_pretrained(source, device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    limit = model.config.max_position_embeddings
    if cfg.latency_prompt + cfg.latency_tokens > limit:
        raise ConfigError("latency_prompt", f"{cfg.latency_prompt} + latency_tokens {cfg.latency_tokens} exceeds the "
                          f"model's max_position_embeddings ({limit})")
    train_path, heldout_path, data_info = prepare_distill_data(cfg.data, tokenizer, cfg.seq_len, cfg.progress)
    train_windows = TokenWindows(train_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    heldout = TokenWindows(heldout_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)
    calib_windows = TokenWindows(train_path, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)
    calibration = [calib_windows.next_batch() for _ in range(cfg.calibration_batches)]
    policy = PrecisionPolicy("fp32", device.type)

    def heldout_ppl(m) -> float:
        return math.exp(evaluate(m, heldout, cfg.eval_batches, policy))

    models: dict[str, Any] = {"input": model}
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # the input's size as save_pretrained writes it
        model.save_pretrained(tmp)
        input_bytes = weight_file_bytes(Path(tmp))
    results = [StageResult("input", str(source), parameter_count(model), input_bytes, heldout_ppl(model), 0.0,
                           {"config": model.config.to_hf_dict() if hasattr(model.config, "to_hf_dict") else {}})]
    print(f"input {source}: {results[0].parameters:,d} parameters, held-out perplexity {results[0].heldout_ppl:.2f}",
          file=sys.stderr)
    current, current_dir = model, source

    if cfg.prune is not None:
        from seekdeep.pruning import prune, recover

        started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        pruned, report = prune(current, cfg.prune_config(), calibration)
        ppl_pruned = heldout_ppl(pruned)
        recovery = recover(pruned, train_windows, cfg.recovery_steps, lr=cfg.recovery_lr, progress=cfg.progress)
        pruned.eval()
        current, current_dir = pruned, out / "prune"
        _save(current, tokenizer, current_dir)
        details = {**report.to_dict(), "heldout_ppl_before_recovery": ppl_pruned,
                   "recovery": {k: v for k, v in recovery.to_dict().items() if k != "train_losses"}}
        results.append(StageResult("prune", str(current_dir), parameter_count(current), weight_file_bytes(current_dir),
                                   heldout_ppl(current), time.perf_counter() - started, details))
        models["prune"] = current
        print(f"prune: {report.summary()}; held-out perplexity {ppl_pruned:.2f} before recovery, "
              f"{results[-1].heldout_ppl:.2f} after {cfg.recovery_steps} steps", file=sys.stderr)

    if cfg.distill:
        started = time.perf_counter()
        summary = distill(DistillRunConfig(
            teacher=str(current_dir), data=cfg.data, layers=cfg.distill_layers, temperature=cfg.temperature,
            alpha=cfg.alpha, seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.distill_steps, lr=cfg.distill_lr,
            eval_interval=max(1, cfg.distill_steps // 4), eval_batches=cfg.eval_batches,
            checkpoint_interval=cfg.distill_steps, output_dir=str(out / "distill"), device=cfg.device, seed=cfg.seed,
            progress=cfg.progress, overwrite=True))  # this run's own stage: the check above covered it
        current_dir = Path(summary["model_dir"])
        current = AutoModel.from_pretrained(current_dir, device=device).eval()
        details = {k: summary[k] for k in ("teacher_layers", "student_layers", "teacher_ppl", "student_init_ppl",
                                           "student_ppl", "steps") if k in summary}
        results.append(StageResult("distill", str(current_dir), parameter_count(current), weight_file_bytes(current_dir),
                                   heldout_ppl(current), time.perf_counter() - started, details))
        models["distill"] = current

    if cfg.quant is not None:
        import copy

        started = time.perf_counter()
        qcfg = cfg.quant_config()
        quantized = qcfg.apply(copy.deepcopy(current), calibration if qcfg.method == "static" else None).eval()
        current, current_dir = quantized, out / "quant"
        _save(current, tokenizer, current_dir)
        results.append(StageResult(f"quant-{cfg.quant}", str(current_dir), parameter_count(current),
                                   weight_file_bytes(current_dir), heldout_ppl(current), time.perf_counter() - started,
                                   {"quantization": qcfg.to_dict() if hasattr(qcfg, "to_dict") else asdict(qcfg)}))
        models[f"quant-{cfg.quant}"] = current

    print("timing decode latency ...", file=sys.stderr)
    latency = decode_latency(models, cfg.latency_prompt, cfg.latency_tokens, cfg.latency_rounds)
    for result in results:
        result.decode_ms_per_token = latency[result.stage]
    device_label = f"{device.type} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    meta = {"model": str(source), "data": data_info, "device": device_label, "config": asdict(cfg),
            "latency": {"prompt": cfg.latency_prompt, "tokens": cfg.latency_tokens, "rounds": cfg.latency_rounds}}
    paths = write_report(out, results, meta)
    return {**meta, "stages": [asdict(r) for r in results], "report": {k: str(v) for k, v in paths.items()},
            "model_dir": str(current_dir)}


# ----------------------------------------------------------------------------- CLI


def cmd_compress(args: argparse.Namespace) -> int:
    cfg = CompressConfig(**{f.name: getattr(args, f.name) for f in fields(CompressConfig)})
    report = compress(cfg)
    print((Path(report["report"]["markdown"])).read_text())
    print(f"report: {report['report']['markdown']}, {report['report']['json']}, {report['report']['plot']}")
    print(f"final model: {report['model_dir']}")
    return 0


_HELP = {
    "model": f"model directory or hub id (default: {DEFAULT_MODEL}, what `seekdeep train` writes)",
    "data": "text file, folder or .jsonl (text field); default: the Python standard library with the module split "
            "`seekdeep train` uses",
    "prune": "fraction of the prunable (attention + MLP) parameters to remove, in (0, 1), e.g. 0.4",
    "prune_method": "activation (default; scores from calibration batches) or l1 (weight norms)",
    "prune_targets": "comma-separated: mlp, heads (default: both)",
    "distill": "distil into a student keeping every other layer (see --distill-layers)",
    "distill_layers": "layers the student keeps: every_other or indices such as 0,2,5",
    "quant": f"quantisation: {', '.join(QUANT_SCHEMES)} (int8 = static W8A8, calibrated)",
    "threads": "torch CPU threads (default: torch's choice)",
    "device": "cpu (default: the integer kernels and latency target are CPU ones) or cuda",
}


def register(subparsers) -> None:
    """Add ``seekdeep compress`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "compress", "prune, distil and quantise a model; writes a JSON/Markdown/PNG report",
                       CompressConfig, "model", _HELP, cmd_compress)
