"""Why the small VLM does not use the image on spatial questions: short runs that take the
vision tower out of the question.

``--features oracle`` replaces the ViT + projector with hand-made patch features (each patch's
mean colour and its column / row as coordinates in [-1, 1], through a small trained MLP): if
the language model cannot learn "which side" from these, the encoder is not the problem. This
is a diagnostic on purpose, not a stand-in for the model; ``--features vit`` runs the recipe's
own model. Same model builder, prompt and loss as ``seekdeep vlm``; training rows are drawn
from a pre-encoded pool (fast) and every ``--every`` steps it prints the answer loss of the
training batch, the loss on shape words that follow a colour word (the colour -> object
binding; ln 2 = 0.69 is the text-only prior there) and the accuracy on the i.i.d. and
held-out splits; the last line is one JSON result against the question-only prior.

    python benchmarks/vlm_diagnose.py --qtypes spatial --features oracle                       # stays at ~0.25
    python benchmarks/vlm_diagnose.py --qtypes spatial --features oracle --question-loss --caption-every 2 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from seekdeep.multimodal.data import QUESTION_TYPES, SpatialVQA  # noqa: E402
from seekdeep.recipes.vlm import VLMTrainConfig, accuracy_by_type, build_model, build_tokenizer, encode_batch  # noqa: E402


class OracleFeatures(nn.Module):
    """(N, 3, H, W) pixels -> (N, P, C): mean colour of each patch + its (column, row) in [-1, 1]."""

    def __init__(self, patch: int, grid: int, width: int):
        super().__init__()
        self.patch = patch
        idx = torch.arange(grid * grid)
        coords = torch.stack([idx % grid, idx // grid], dim=1).float() / (grid - 1) * 2 - 1  # (P, 2)
        self.register_buffer("coords", coords.repeat_interleave(grid, dim=1), persistent=False)  # (P, 2 * grid)
        self.mlp = nn.Sequential(nn.Linear(3 + 2 * grid, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        colour = nn.functional.avg_pool2d(pixel_values, self.patch).flatten(2).transpose(1, 2)  # (N, P, 3)
        return self.mlp(torch.cat([colour, self.coords.expand(colour.shape[0], -1, -1)], dim=-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", choices=("vit", "oracle"), default="vit")
    parser.add_argument("--qtypes", default=",".join(QUESTION_TYPES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--pool", type=int, default=8000, help="pre-encoded training rows (and as many caption rows)")
    parser.add_argument("--question-loss", action="store_true")
    parser.add_argument("--caption-every", type=int, default=0)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core per run
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor, collate
    from seekdeep.train import make_scheduler

    cfg = VLMTrainConfig(seed=args.seed, steps=args.steps, warmup=min(30, args.steps // 10), text_layers=args.text_layers, lr=args.lr)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    if args.features == "oracle":
        grid = cfg.image_size // cfg.patch_size
        model.oracle = OracleFeatures(cfg.patch_size, grid, cfg.hidden_size)  # a submodule: trained with the rest
        model.get_image_features = model.oracle
    proc = MultimodalProcessor.for_model(model, tok, ImageProcessor(ImageProcessorConfig.clip(cfg.image_size)))

    def rows(samples, train, captions=False):
        batch = [encode_batch(proc, [s], train=train, question_loss=args.question_loss, captions=[captions]) for s in samples]
        return [{k: (v[0].tolist() if k != "pixel_values" else v) for k, v in b.items()} for b in batch]

    qtypes = tuple(args.qtypes.split(","))
    pool = rows(SpatialVQA("train", cfg.seed, cfg.image_size, qtypes=qtypes).take(args.pool), True)
    captions = rows(SpatialVQA("train", cfg.seed + 1000, cfg.image_size).take(args.pool), True, captions=True) if args.caption_every else []
    evals = {split: SpatialVQA(split, cfg.seed, cfg.image_size).take(400) for split in ("test", "heldout")}
    eval_rows = {split: rows(samples, False) for split, samples in evals.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = make_scheduler(optimizer, cfg.warmup, cfg.steps)
    shape_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("circle", "square", "triangle")])

    @torch.no_grad()
    def evaluate(split):
        model.eval()
        preds = []
        for i in range(0, len(eval_rows[split]), 100):
            b = collate(eval_rows[split][i : i + 100], tok.pad_token_id, "left")
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], logits_to_keep=1).logits
            preds += tok.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
        model.train()
        return {k: round(v, 3) for k, v in accuracy_by_type(evals[split], preds).items()}

    g = torch.Generator().manual_seed(cfg.seed)
    began = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        picked = [pool[i] for i in torch.randint(len(pool), (cfg.batch_size,), generator=g).tolist()]
        is_caption = [False] * cfg.batch_size
        if captions:  # every k-th row a caption, as the recipe
            for j in range(args.caption_every - 1, cfg.batch_size, args.caption_every):
                picked[j] = captions[int(torch.randint(len(captions), (1,), generator=g))]
                is_caption[j] = True
        b = collate(picked, tok.pad_token_id, "right")
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], labels=b["labels"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % args.every == 0 or step == cfg.steps:
            ids, labels, logits = b["input_ids"], b["labels"], out.logits.detach()
            qa = ~torch.tensor(is_caption)
            answer_at = (labels == tok.eos_token_id).float().argmax(1) - 1  # the answer sits just before eos
            r = torch.arange(len(picked))[qa]
            answer_loss = nn.functional.cross_entropy(logits[r, answer_at[qa] - 1].float(), ids[r, answer_at[qa]]).item()
            is_shape = torch.isin(ids, shape_ids) & (labels != -100)
            rr, cc = is_shape.nonzero(as_tuple=True)
            shape_loss = nn.functional.cross_entropy(logits[rr, cc - 1].float(), ids[rr, cc]).item() if len(rr) else float("nan")
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - began), "answer_loss": round(answer_loss, 3),
                              "shape_word_loss": round(shape_loss, 3), "test": evaluate("test"), "heldout": evaluate("heldout")}),
                  file=sys.stderr, flush=True)
    device = f"cpu ({torch.backends.cpu.get_cpu_capability()}, 1 thread)"
    final = evaluate("heldout")
    emit(f"vlm_diagnose_{args.features}_heldout_spatial", final["spatial"], "accuracy", 0.25, "chance / question-only prior (4 answers)",
         device, steps=cfg.steps, qtypes=args.qtypes, question_loss=args.question_loss, caption_every=args.caption_every,
         text_layers=cfg.text_layers, seed=cfg.seed, heldout=final, test=evaluate("test"))


if __name__ == "__main__":
    main()
