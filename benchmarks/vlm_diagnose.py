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

    python benchmarks/vlm_diagnose.py --qtypes spatial --features oracle --batch-size 64 --lr 1e-3 --steps 1500
    python benchmarks/vlm_diagnose.py --qtypes spatial --features oracle --batch-size 64 --lr 1e-3 --steps 1500 --grounded
    python benchmarks/vlm_diagnose.py --qtypes spatial --features oracle --batch-size 64 --lr 1e-3 --steps 1500 --candidates

(Before commit b521d29 ``--features oracle`` silently ran the ViT: see the README.)

Two earlier rungs of the ladder, no language model involved:

- ``--ladder labels``: are the spatial labels decidable? Logistic regression and an MLP
  (scikit-learn) from the scene graph (the two named objects' colours and grid cells) to the
  answer, and the generator's own rule re-derived from the coordinates; all should be 1.0.
- ``--ladder classifier``: a small non-LM transformer (torch's TransformerEncoder, bidirectional
  or ``--causal``) over the same oracle patch tokens + the question's words, trained with
  cross-entropy on the four answers: does a generic model learn "which side" at all, and how
  many steps does it sit at chance first?

    python benchmarks/vlm_diagnose.py --ladder labels
    python benchmarks/vlm_diagnose.py --ladder classifier --causal --steps 3000 --batch-size 64 --lr 1e-3
    python benchmarks/vlm_diagnose.py --ladder classifier --trunk llama --embed-std 1.0 --lm-layout --head tied \
        --steps 1500 --batch-size 64 --lr 1e-3        # the recipe's head on the recipe's trunk and prompt layout
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

from seekdeep.multimodal.data import ANSWERS, QUESTION_TYPES, SpatialVQA, grounded_answer  # noqa: E402
from seekdeep.recipes.vlm import (GROUNDED_TOKENS, VLMTrainConfig, accuracy_by_type, build_model, build_tokenizer,  # noqa: E402
                                  caption_rows, encode_batch, predict)


class OracleFeatures(nn.Module):
    """(N, 3, H, W) pixels -> (N, P, C): mean colour of each patch + its (column, row) in [-1, 1]."""

    def __init__(self, patch: int, grid: int, width: int, raw: tuple | None = None):
        super().__init__()
        self.patch = patch
        idx = torch.arange(grid * grid)
        coords = torch.stack([idx % grid, idx // grid], dim=1).float() / (grid - 1) * 2 - 1  # (P, 2)
        # raw = (mean, std): undo the processor's normalisation and give (column, row) once, as the classifier rung's tokens
        self.raw = None if raw is None else (torch.tensor(raw[0]).view(1, 3, 1, 1), torch.tensor(raw[1]).view(1, 3, 1, 1))
        self.register_buffer("coords", coords if raw else coords.repeat_interleave(grid, dim=1), persistent=False)  # (P, 2 or 2 * grid)
        self.mlp = nn.Sequential(nn.Linear(3 + self.coords.shape[1], width), nn.GELU(), nn.Linear(width, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.raw is not None:
            pixel_values = pixel_values * self.raw[1] + self.raw[0]
        colour = nn.functional.avg_pool2d(pixel_values, self.patch).flatten(2).transpose(1, 2)  # (N, P, 3)
        return self.mlp(torch.cat([colour, self.coords.expand(colour.shape[0], -1, -1)], dim=-1))


def _spatial_pool(split: str, n: int, seed: int):
    return SpatialVQA(split, seed, 48, qtypes=("spatial",)).take(n)


def ladder_labels(args) -> None:
    """Scene graph -> answer with off-the-shelf classifiers (rung a)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from seekdeep.multimodal.data import COLOURS

    colours = sorted(COLOURS)

    def table(samples):
        rows, answers = [], []
        for s in samples:
            w = s.question.split()  # which side of the C S is the C S ?
            ref = next(o for o in s.objects if (o.colour, o.shape) == (w[4], w[5]))
            obj = next(o for o in s.objects if (o.colour, o.shape) == (w[8], w[9]))
            x = np.zeros(2 * len(colours) + 6)
            x[colours.index(ref.colour)] = x[len(colours) + colours.index(obj.colour)] = 1
            x[-6:] = [ref.col, ref.row, obj.col, obj.row, obj.col - ref.col, obj.row - ref.row]
            rows.append(x)
            answers.append(s.answer)
        return np.array(rows), np.array(answers)

    x_tr, y_tr = table(_spatial_pool("train", 3000, args.seed))
    device = f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    for split in ("test", "heldout"):
        x, y = table(_spatial_pool(split, 1000, args.seed))
        dx, dy = x[:, -2], x[:, -1]
        rule = np.where(np.abs(dx) > np.abs(dy), np.where(dx > 0, "right", "left"), np.where(dy > 0, "below", "above"))
        for name, acc in (("rule", float((rule == y).mean())),
                          ("logreg", LogisticRegression(max_iter=3000).fit(x_tr, y_tr).score(x, y)),
                          ("mlp", MLPClassifier((64, 64), max_iter=2000, random_state=args.seed).fit(x_tr[:, :-2], y_tr).score(x[:, :-2], y))):
            emit(f"vlm_ladder_labels_{name}_{split}", acc, "accuracy", 1.0, "decidable labels", device, seed=args.seed,
                 features="colours + cells" + (" + offsets" if name != "mlp" else ""))


class _Classifier(nn.Module):
    """Oracle patch tokens (mean colour + cell coordinates) and question words -> one of 4 answers."""

    def __init__(self, vocab: int, width: int = 64, layers: int = 2, causal: bool = False, grid: int = 4, length: int = 11,
                 trunk: str = "torch", init_std: float = 0.08, abs_positions: bool = False, rope_theta: float = 10000.0,
                 embed_std: float = 0.0, head: str = "answers", bos: int | None = None):
        super().__init__()
        self.abs_positions = abs_positions
        idx = torch.arange(grid * grid)
        self.register_buffer("coords", torch.stack([idx % grid, idx // grid], 1).float() / (grid - 1) * 2 - 1, persistent=False)  # (P, 2)
        self.patch = nn.Sequential(nn.Linear(5, width), nn.GELU(), nn.Linear(width, width))
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(grid * grid + length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.llama = None
        if trunk == "llama":  # the recipe's decoder (RoPE, RMSNorm, SwiGLU, GQA, its init) instead of torch's encoder
            from seekdeep.models.llama import LlamaConfig, LlamaForCausalLM

            lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                              initializer_range=init_std, rope_theta=rope_theta))
            lm.init_weights(init_std)
            self.llama, self.encoder, self.embed = lm.model, None, lm.model.embed_tokens
            if embed_std:  # the word embeddings at torch's own scale instead of the LM's init (a rung-c probe)
                nn.init.normal_(self.embed.weight, std=embed_std)
            else:
                for sub in self.patch:
                    if isinstance(sub, nn.Linear):
                        nn.init.normal_(sub.weight, std=init_std)
        # answers: a 4-way linear head; tied: the whole vocabulary through the word embeddings (as the recipe's LM head);
        # tied_scaled: the same / sqrt(width); vocab: a linear head of its own over the whole vocabulary
        self.head_kind = head
        self.head = nn.Linear(width, vocab if head == "vocab" else 4)
        self.causal = causal or trunk == "llama"
        self.bos = bos  # a start token before the patches, as the recipe's prompt (--lm-layout)

    def forward(self, colours: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        patches = self.patch(torch.cat([colours, self.coords.expand(len(colours), -1, -1)], -1))  # (B, P, C)
        x = torch.cat([patches, self.embed(words)], 1)
        if self.bos is not None:
            x = torch.cat([self.embed.weight[self.bos].expand(len(x), 1, -1), x], 1)
        if self.llama is not None:  # positions from RoPE (as in the recipe), plus learned absolute ones with --abs-positions
            h = self.llama(None, None, None, None, x + self.position[: x.shape[1]] if self.abs_positions else x)[:, -1]
            if self.head_kind.startswith("tied"):
                return h @ self.embed.weight.T / (h.shape[-1] ** 0.5 if self.head_kind == "tied_scaled" else 1.0)
            return self.head(h)
        x = x + self.position[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        return self.head(self.encoder(x, mask=mask, is_causal=self.causal)[:, -1])


def ladder_classifier(args) -> None:
    """A generic transformer on oracle patch tokens + question words (rung b)."""
    import numpy as np

    from seekdeep.multimodal.data import ANSWERS, vocabulary

    words = {w: i for i, w in enumerate(vocabulary())}
    answers = ANSWERS["spatial"]

    def tensors(samples):
        pixels = torch.stack([torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 255.0).permute(2, 0, 1) for s in samples])  # (N, 3, H, W)
        colours = nn.functional.avg_pool2d(pixels, 12).flatten(2).transpose(1, 2)  # (N, P, 3), raster order
        layout = (lambda q: ["question:", *q, "answer:"]) if args.lm_layout else (lambda q: q)
        question = torch.tensor([[words[w] for w in layout(s.question.split())] for s in samples])
        target = [words[s.answer] if args.head != "answers" else answers.index(s.answer) for s in samples]  # a vocabulary id with --tied-head
        return colours, question, torch.tensor(target)

    torch.manual_seed(args.seed)
    train = tensors(_spatial_pool("train", args.pool, args.seed))
    evals = {split: tensors(_spatial_pool(split, 500, args.seed)) for split in ("test", "heldout")}
    model = _Classifier(len(words) + int(args.lm_layout), length=14 if args.lm_layout else 11, causal=args.causal, bos=len(words) if args.lm_layout else None, trunk=args.trunk, init_std=args.init_std,
                        abs_positions=args.abs_positions, rope_theta=args.rope_theta, embed_std=args.embed_std,
                        head=args.head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    began = time.perf_counter()

    @torch.no_grad()
    def accuracy(split):
        c, q, y = evals[split]
        return round((model(c, q).argmax(-1) == y).float().mean().item(), 3)

    for step in range(1, args.steps + 1):
        pick = torch.randint(len(train[2]), (args.batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(train[0][pick], train[1][pick]), train[2][pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - began), "loss": round(loss.item(), 3),
                              "test": accuracy("test"), "heldout": accuracy("heldout")}), file=sys.stderr, flush=True)
    emit(f"vlm_ladder_classifier_{args.trunk}{'_causal' if args.causal else ''}_heldout_spatial", accuracy("heldout"), "accuracy", 0.25,
         "chance / question-only prior (4 answers)", f"cpu ({torch.backends.cpu.get_cpu_capability()}, 1 thread)",
         steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, trunk=args.trunk,
         abs_positions=args.abs_positions, rope_theta=args.rope_theta, init_std=args.init_std, embed_std=args.embed_std, head=args.head, lm_layout=args.lm_layout, test=accuracy("test"))


def ladder_heldout_shape(args) -> None:
    """Held-out shape questions to a trained model: how often it answers a shape that colour had
    in training (the held-out shape of that colour is never one)."""
    from collections import Counter

    from seekdeep.auto import AutoModel
    from seekdeep.multimodal.data import HELD_OUT, SHAPES
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor

    if not args.model:
        raise SystemExit("--ladder heldout-shape needs --model DIR (a seekdeep vlm final/ directory)")
    model = AutoModel.from_pretrained(args.model)
    tok = build_tokenizer()
    proc = MultimodalProcessor.for_model(model, tok, ImageProcessor(ImageProcessorConfig.clip(model.config.vision_config.image_size)))
    for split in ("test", "heldout"):
        questions = SpatialVQA(split, args.seed, model.config.vision_config.image_size, qtypes=("shape",)).take(200)
        answers = predict(model, proc, questions)
        seen = sum(a in SHAPES and (q.question.split()[3], a) not in HELD_OUT for q, a in zip(questions, answers)) / len(questions)
        accuracy = sum(a == q.answer for q, a in zip(questions, answers)) / len(questions)
        emit(f"vlm_ladder_shape_{split}_training_shape_of_colour", seen, "fraction", accuracy, "shape accuracy",
             f"cpu ({torch.backends.cpu.get_cpu_capability()}, 1 thread)", model=str(args.model), answers=dict(Counter(answers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladder", choices=("lm", "labels", "classifier", "heldout-shape"), default="lm",
                        help="lm: the recipe's model (default); labels / classifier: the rungs without a language model; "
                             "heldout-shape: what a trained --model answers to held-out shape questions")
    parser.add_argument("--model", default=None, help="--ladder heldout-shape: a trained model directory")
    parser.add_argument("--causal", action="store_true", help="--ladder classifier: causal attention, read at the last word")
    parser.add_argument("--trunk", choices=("torch", "llama"), default="torch",
                        help="--ladder classifier: torch's TransformerEncoder or the recipe's llama decoder (always causal)")
    parser.add_argument("--head", choices=("answers", "tied", "tied_scaled", "vocab"), default="answers",
                        help="--trunk llama: a 4-way head, the whole vocabulary through the word embeddings (/ sqrt(width) with "
                             "tied_scaled), or a linear head of its own over the vocabulary")
    parser.add_argument("--lm-layout", action="store_true",
                        help="--ladder classifier: the recipe's prompt layout (start token, patches, 'question:' ... 'answer:')")
    parser.add_argument("--abs-positions", action="store_true", help="--trunk llama: add learned absolute positions (as the torch trunk)")
    parser.add_argument("--embed-std", type=float, default=0.0,
                        help="--trunk llama: word embeddings N(0, this) and torch's default init for the patch MLP (0: the LM's init); "
                             "--ladder lm: the recipe's embed_std (0: its default)")
    parser.add_argument("--untied", action="store_true", help="--ladder lm: an output head of its own (at --init-std), not the word embeddings")
    parser.add_argument("--final-norm", type=float, default=1.0, help="--ladder lm: the final RMSNorm's weight starts at this (scales the logits)")
    parser.add_argument("--warmup", type=int, default=-1, help="--ladder lm: warmup steps (-1: min(30, steps / 10))")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="--ladder lm: the cosine schedule ends at this x lr (1: constant)")
    parser.add_argument("--beta2", type=float, default=0.98, help="--ladder lm: AdamW's beta2 (the recipe's 0.98; torch's default 0.999)")
    parser.add_argument("--clip", type=float, default=1.0, help="--ladder lm: gradient-norm clip (0: none)")
    parser.add_argument("--rope-theta", type=float, default=10000.0, help="--trunk llama: RoPE base")
    parser.add_argument("--features", choices=("vit", "oracle"), default="vit")
    parser.add_argument("--qtypes", default=",".join(QUESTION_TYPES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--pool", type=int, default=8000,
                        help="pre-encoded training rows (and as many caption rows); 0: a fresh scene for every row, as the recipe")
    parser.add_argument("--question-loss", action="store_true")
    parser.add_argument("--oracle-raw", action="store_true",
                        help="--features oracle: pixel colours in [0, 1] and (column, row) once, as the classifier rung")
    parser.add_argument("--candidates", action="store_true",
                        help="--ladder lm: the loss and the argmax over the 4 spatial answers' logits only (a 4-way head inside the LM)")
    parser.add_argument("--grounded", action="store_true", help="--ladder lm: spatial targets name the positions first (the recipe's flag)")
    parser.add_argument("--caption-every", type=int, default=0)
    parser.add_argument("--caption-steps", type=int, default=0, help="--ladder lm: the first k steps on captions only (the recipe's flag)")
    parser.add_argument("--vision-feature-layer", default="-1", help="--ladder lm: ViT hidden states for the projector (the recipe's flag)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--init-std", type=float, default=0.08)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core per run
    if args.ladder != "lm":
        return {"labels": ladder_labels, "classifier": ladder_classifier, "heldout-shape": ladder_heldout_shape}[args.ladder](args)
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor, collate
    from seekdeep.train import make_scheduler

    warmup = min(30, args.steps // 10) if args.warmup < 0 else args.warmup
    cfg = VLMTrainConfig(seed=args.seed, steps=args.steps, warmup=warmup, text_layers=args.text_layers, lr=args.lr,
                         batch_size=args.batch_size, init_std=args.init_std, tie_embeddings=not args.untied,
                         caption_every=args.caption_every, caption_steps=args.caption_steps, vision_feature_layer=args.vision_feature_layer,
                         **({"embed_std": args.embed_std} if args.embed_std else {}))
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    with torch.no_grad():
        model.language_model.model.norm.weight.fill_(args.final_norm)
    if args.features == "oracle":
        grid = cfg.image_size // cfg.patch_size
        ipc = ImageProcessorConfig.clip(cfg.image_size)
        raw = (list(ipc.image_mean), list(ipc.image_std)) if args.oracle_raw else None
        model.oracle = OracleFeatures(cfg.patch_size, grid, cfg.hidden_size, raw)  # a submodule: trained with the rest
        # a plain function, not the module: assigning an nn.Module registers a submodule and leaves the class's method in
        # place, so the forward kept calling the ViT (every oracle run before this fix trained on the ViT's features)
        model.get_image_features = lambda pixel_values: model.oracle(pixel_values)
    proc = MultimodalProcessor.for_model(model, tok, ImageProcessor(ImageProcessorConfig.clip(cfg.image_size)))

    def rows(samples, train, captions=False):
        batch = [encode_batch(proc, [s], train=train, question_loss=args.question_loss, captions=[captions], grounded=args.grounded)
                 for s in samples]
        return [{k: (v[0].tolist() if k != "pixel_values" else v) for k, v in b.items()} for b in batch]

    qtypes = tuple(args.qtypes.split(","))
    stream = SpatialVQA("train", cfg.seed, cfg.image_size, qtypes=qtypes)
    caption_stream = SpatialVQA("train", cfg.seed + 1000, cfg.image_size)
    pool = rows(stream.take(args.pool), True)
    captions = rows(caption_stream.take(args.pool), True, captions=True) if args.pool and (args.caption_every or args.caption_steps) else []
    scored = tuple(q for q in qtypes if q in QUESTION_TYPES) or QUESTION_TYPES  # 400 questions of the trained types per split
    evals = {split: SpatialVQA(split, cfg.seed, cfg.image_size, qtypes=scored).take(400) for split in ("test", "heldout")}
    eval_rows = {split: rows(samples, False) for split, samples in evals.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, args.beta2))
    scheduler = make_scheduler(optimizer, cfg.warmup, cfg.steps, min_lr_ratio=args.min_lr_ratio)
    answer_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in ANSWERS["spatial"]])
    if args.candidates and qtypes != ("spatial",):
        raise SystemExit("--candidates: spatial questions only (--qtypes spatial)")
    shape_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in ("circle", "square", "triangle")])

    @torch.no_grad()
    def evaluate(split):
        if args.grounded:  # greedy chain, scored on its last word (the recipe's own predict)
            texts: list[str] = []
            preds = predict(model, proc, evals[split], max_new_tokens=GROUNDED_TOKENS, texts=texts)
            model.train()
            out = {k: round(v, 3) for k, v in accuracy_by_type(evals[split], preds).items()}
            # each step of the chain on its own: the reference's colour / column / row, the object's, the side
            chains = [(t.split(), grounded_answer(s).split()) for s, t in zip(evals[split], texts) if s.qtype == "spatial"]
            if chains:
                names = ("ref_colour", "ref_col", "ref_row", "obj_colour", "obj_col", "obj_row")
                out["chain_steps"] = {n: round(sum(len(g) > k and g[k] == t[k] for g, t in chains) / len(chains), 3)
                                      for k, n in enumerate(names)}
            return out
        model.eval()
        preds = []
        for i in range(0, len(eval_rows[split]), 100):
            b = collate(eval_rows[split][i : i + 100], tok.pad_token_id, "left")
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], logits_to_keep=1).logits
            last = logits[:, -1]
            if args.candidates:  # argmax over the answers only, as the 4-way head
                last = torch.full_like(last, float("-inf")).index_copy(1, answer_ids, last[:, answer_ids])
            preds += tok.convert_ids_to_tokens(last.argmax(-1).tolist())
        model.train()
        return {k: round(v, 3) for k, v in accuracy_by_type(evals[split], preds).items()}

    g = torch.Generator().manual_seed(cfg.seed)
    began = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        is_caption = [False] * cfg.batch_size
        if not args.pool:  # fresh rows (and caption rows from their own scenes), as the recipe's stream
            is_caption = caption_rows(cfg, step - 1)
            at = (step - 1) * cfg.batch_size
            picked = [rows([(caption_stream if c else stream)[at + i]], True, captions=c)[0] for i, c in enumerate(is_caption)]
        else:
            picked = [pool[i] for i in torch.randint(len(pool), (cfg.batch_size,), generator=g).tolist()]
        if captions:  # every k-th row a caption, as the recipe (every row during the first --caption-steps steps)
            rows_at = range(cfg.batch_size) if step <= args.caption_steps else \
                range(args.caption_every - 1, cfg.batch_size, args.caption_every) if args.caption_every else ()
            for j in rows_at:
                picked[j] = captions[int(torch.randint(len(captions), (1,), generator=g))]
                is_caption[j] = True
        b = collate(picked, tok.pad_token_id, "right")
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], labels=b["labels"])
        loss = out.loss
        if args.candidates:  # the 4-way head's loss inside the LM: softmax over the spatial answers' logits only, no eos term
            at = (b["labels"] == tok.eos_token_id).float().argmax(1) - 2  # the position that predicts the answer word
            picked_logits = out.logits[torch.arange(len(at)), at][:, answer_ids]  # (B, 4)
            target = (b["input_ids"][torch.arange(len(at)), at + 1][:, None] == answer_ids).float().argmax(1)
            loss = nn.functional.cross_entropy(picked_logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
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
         caption_steps=args.caption_steps, pool=args.pool, vision_feature_layer=args.vision_feature_layer, text_layers=cfg.text_layers, seed=cfg.seed, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, untied=args.untied, grounded=args.grounded, candidates=args.candidates, oracle_raw=args.oracle_raw, min_lr_ratio=args.min_lr_ratio, clip=args.clip, beta2=args.beta2,
         final_norm=args.final_norm, embed_std=cfg.embed_std, heldout=final, test=evaluate("test"))


if __name__ == "__main__":
    main()
