"""Vision-language models on the synthetic spatial VQA default, per question type, >= 3 seeds.

For every seed, in this one process:

- ``seekdeep vlm`` (LLaVA prefix: projected patch tokens in the LM's input),
- ``seekdeep vlm --fusion cross_attention`` (Flamingo gated cross-attention blocks),
- anchors: the question-only prior (the majority training answer for each question text:
  what a model that ignores the image scores) and a concat-fusion baseline with the same
  vision encoder, text trunk, steps, batch and learning rate (mean-pooled image features
  concatenated with the question's last hidden state -> MLP over the answer words).

Prints one JSON line per (model, split, question type): mean accuracy over seeds, its spread
(std, min, max), the prior as anchor and the gap to it; then CPU train time, and the latency
of an image request through ``seekdeep serve`` vs a text-only request of the same token length.

    .venv/bin/python benchmarks/vlm.py                 # 3 seeds, the recipe's default budget
    .venv/bin/python benchmarks/vlm.py --steps 200 --seeds 0 1 2 --skip-serving   # quick
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from seekdeep.multimodal.data import ANSWERS, QUESTION_TYPES, SpatialVQA  # noqa: E402
from seekdeep.recipes.vlm import (VLMTrainConfig, accuracy_by_type, build_model, build_tokenizer, encode_batch,  # noqa: E402
                                  question_only_prior, train_vlm, training_data)

ANSWER_WORDS = sorted({a for answers in ANSWERS.values() for a in answers})


class ConcatFusion(nn.Module):
    """The anchor: image and question encoded apart, fused only by concatenation."""

    def __init__(self, vlm):
        super().__init__()
        self.vision_tower = vlm.vision_tower
        self.text = vlm.language_model.model  # the decoder trunk
        v, t = vlm.config.vision_config.hidden_size, vlm.config.text_config.hidden_size
        self.layers = vlm.config.feature_layers  # the same ViT hidden states as the VLMs' projector reads
        self.head = nn.Sequential(nn.Linear(v * len(self.layers) + t, 2 * t), nn.GELU(), nn.Linear(2 * t, len(ANSWER_WORDS)))

    def forward(self, input_ids, attention_mask, pixel_values):
        states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        image = torch.cat([states[i][:, 1:] for i in self.layers], -1).mean(1)  # (B, Cv * layers): patches, no class token
        text = self.text(input_ids, attention_mask, None, None)[:, -1]  # (B, Ct): left padded, last = 'answer:'
        return self.head(torch.cat([image, text], dim=-1))


def _text_only_batch(processor, samples):
    """The question without the image placeholders (the baseline sees the image separately)."""
    batch = encode_batch(processor, samples, train=False)
    keep = batch["input_ids"] != processor.image_token_id
    rows = [row[k].tolist() for row, k in zip(batch["input_ids"], keep)]
    width = max(map(len, rows))
    pad = processor.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, batch["pixel_values"]


def train_concat(cfg: VLMTrainConfig) -> tuple[dict[str, dict[str, float]], float]:
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor
    from seekdeep.train import make_scheduler

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    vlm = build_model(cfg, tok)
    processor = MultimodalProcessor.for_model(vlm, tok, ImageProcessor(ImageProcessorConfig.clip(cfg.image_size)))
    model = ConcatFusion(vlm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = make_scheduler(optimizer, cfg.warmup, cfg.steps)
    data = training_data(cfg)  # the VLMs' training stream (with the column / row aids when they get them)
    began = time.perf_counter()
    for step in range(cfg.steps):
        model.train()
        samples = [data[step * cfg.batch_size + i] for i in range(cfg.batch_size)]
        ids, mask, pixels = _text_only_batch(processor, samples)
        target = torch.tensor([ANSWER_WORDS.index(s.answer) for s in samples])
        loss = nn.functional.cross_entropy(model(ids, mask, pixels), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - began
    model.eval()
    results = {}
    with torch.no_grad():
        for split in ("test", "heldout"):
            samples = SpatialVQA(split, cfg.seed, cfg.image_size).take(cfg.eval_samples)
            preds = []
            for i in range(0, len(samples), 100):
                ids, mask, pixels = _text_only_batch(processor, samples[i : i + 100])
                preds.extend(ANSWER_WORDS[j] for j in model(ids, mask, pixels).argmax(-1).tolist())
            results[split] = accuracy_by_type(samples, preds)
    return results, seconds


def _spread(values: list[float]) -> dict[str, float]:
    return {"std": round(statistics.pstdev(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "per_seed": [round(v, 4) for v in values]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_latency(model_dir: Path, repeats: int, device: str) -> None:
    """Median latency of a chat request with one image vs a text-only one of the same token length."""
    import httpx
    import openai

    from seekdeep.auto import AutoModel

    per_image = AutoModel.from_pretrained(model_dir).config.tokens_per_image
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seekdeep.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning", "--kv-cache-memory", "32MiB"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=120)
        sample = SpatialVQA("test", 0, 48)[0]
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = f"question: {sample.question} answer:"
        filler = " ".join(["the"] * per_image)  # as many text tokens as the image's placeholders
        image_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]
        text_msgs = [{"role": "user", "content": filler + " " + question}]

        def timed(messages) -> tuple[float, int]:
            t = time.perf_counter()
            reply = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=2, temperature=0)
            return time.perf_counter() - t, reply.usage.prompt_tokens

        for msgs in (image_msgs, text_msgs):  # warm-up
            timed(msgs)
        image_times, text_times = [], []
        for _ in range(repeats):
            dt, image_tokens = timed(image_msgs)
            image_times.append(dt)
            dt, text_tokens = timed(text_msgs)
            text_times.append(dt)
        emit("serve_chat_latency_image", statistics.median(image_times) * 1e3, "ms", statistics.median(text_times) * 1e3,
             "text-only request of the same token length", device, prompt_tokens_image=image_tokens, prompt_tokens_text=text_tokens,
             repeats=repeats, max_tokens=2)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the recipe's)")
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--out", default="runs/bench-vlm")
    parser.add_argument("--question-loss", action="store_true", help="VLMs: loss on the question's words too (the recipe's flag)")
    parser.add_argument("--caption-every", type=int, default=0, help="VLMs: every k-th training row a scene caption (0: none)")
    parser.add_argument("--spatial-weight", type=int, default=None,
                        help="all models: spatial training rows per row of each other type (the recipe's flag; default 1)")
    parser.add_argument("--caption-steps", type=int, default=0,
                        help="VLMs: the first k steps on scene captions only (the recipe's caption stage; the concat anchor, "
                             "which has no text output, trains on questions for all its steps)")
    parser.add_argument("--vision-feature-layer", default=None,
                        help="the recipe's flag (ViT hidden states for the projector, comma-separated; the concat anchor mean-pools the same ones)")
    parser.add_argument("--position-questions", action="store_true",
                        help="all models: also train on 'which column / row is the <object> in ?' (the recipe's flag)")
    parser.add_argument("--grounded", action=argparse.BooleanOptionalAction, default=None,
                        help="VLMs: spatial targets name both objects' column / row before the side (the recipe's flag and "
                             "default; scored on the side only; --no-grounded: one-word answers); the concat anchor keeps "
                             "its one-word answer head")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch per model (default: the recipe's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate per model (default: the recipe's)")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--serving-repeats", type=int, default=10)
    parser.add_argument("--train-only", action="store_true",
                        help="train and write <out>/accuracy.json + seconds.json only (run one process per seed, then --aggregate)")
    parser.add_argument("--aggregate", nargs="+", default=None, metavar="OUT",
                        help="report over the --train-only outputs of several processes instead of training")
    args = parser.parse_args()
    if len(args.seeds) < 3:
        print("note: fewer than 3 seeds; the spread is not meaningful", file=sys.stderr)
    device = f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    out = Path(args.out)
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}  # model -> split -> qtype -> per-seed values
    seconds: dict[str, list[float]] = {}

    def record(model: str, split_results: dict[str, dict[str, float]]) -> None:
        for split, by_type in split_results.items():
            for qtype, value in by_type.items():
                acc.setdefault(model, {}).setdefault(split, {}).setdefault(qtype, []).append(value)

    if args.aggregate:
        for run in args.aggregate:
            for model, splits in json.loads((Path(run) / "accuracy.json").read_text()).items():
                for split, by_type in splits.items():
                    for qtype, values in by_type.items():
                        acc.setdefault(model, {}).setdefault(split, {}).setdefault(qtype, []).extend(values)
            for model, secs in json.loads((Path(run) / "seconds.json").read_text()).items():
                seconds.setdefault(model, []).extend(secs)
        args.seeds = []
    for seed in args.seeds:
        base = VLMTrainConfig(seed=seed, eval_samples=args.eval_samples, progress=False, overwrite=True,
                              question_loss=args.question_loss, caption_every=args.caption_every, caption_steps=args.caption_steps,
                              **({"vision_feature_layer": args.vision_feature_layer} if args.vision_feature_layer else {}),
                              **({"spatial_weight": args.spatial_weight} if args.spatial_weight else {}),
                              position_questions=args.position_questions,
                              **({"grounded": args.grounded} if args.grounded is not None else {}),
                              **({"steps": args.steps} if args.steps else {}), **({"batch_size": args.batch_size} if args.batch_size else {}),
                              **({"lr": args.lr} if args.lr else {}))
        for fusion in ("prefix", "cross_attention"):
            cfg = VLMTrainConfig(**{**base.to_dict(), "fusion": fusion, "output_dir": str(out / f"{fusion}-seed{seed}")})
            summary = train_vlm(cfg)
            record(fusion, {k: summary["accuracy"][k] for k in ("test", "heldout")})
            record("question_only_prior", summary["accuracy"]["question_only_prior"]) if fusion == "prefix" else None
            seconds.setdefault(fusion, []).append(summary["train_seconds_this_run"])
        concat, secs = train_concat(VLMTrainConfig(**{**base.to_dict(), "output_dir": str(out / "concat")}))
        record("concat_fusion", concat)
        seconds.setdefault("concat_fusion", []).append(secs)

    if args.train_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.json").write_text(json.dumps(acc, indent=1))
        (out / "seconds.json").write_text(json.dumps(seconds))
        return
    steps = args.steps or VLMTrainConfig().steps
    for model in ("prefix", "cross_attention", "concat_fusion"):
        for split in ("heldout", "test"):
            for qtype in (*QUESTION_TYPES, "all"):
                values = acc[model][split][qtype]
                prior = acc["question_only_prior"][split][qtype]
                value, prior_mean = statistics.mean(values), statistics.mean(prior)
                emit(f"vlm_accuracy_{model}_{split}_{qtype}", value, "accuracy", prior_mean, "question-only prior", device,
                     gap_to_prior=round(value - prior_mean, 4), seeds=len(values), **_spread(values),
                     concat_fusion=round(statistics.mean(acc["concat_fusion"][split][qtype]), 4))
    for model, secs in seconds.items():
        emit(f"vlm_train_seconds_{model}", statistics.mean(secs), "s", statistics.mean(seconds["prefix"]), "prefix VLM train time", device,
             steps=steps, batch_size=args.batch_size or VLMTrainConfig().batch_size, **_spread(secs))
    if not args.aggregate:
        (out / "accuracy.json").write_text(json.dumps(acc, indent=1))
    if not args.skip_serving:
        first = Path(args.aggregate[0]) if args.aggregate else out
        serving_latency(next(first.glob("prefix-seed*")) / "final", args.serving_repeats, device)


if __name__ == "__main__":
    main()
