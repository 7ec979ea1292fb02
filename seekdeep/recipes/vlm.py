"""``seekdeep vlm``: train a small vision-language model on the synthetic spatial VQA default.

With no arguments it trains a LLaVA-format model (a tiny CLIP-layout ViT + projector + a tiny
llama-family LM, all from scratch) on generated scenes for a few CPU minutes, evaluates the
per-question-type accuracy on the i.i.d. test split and on the held-out colour-shape
combinations, draws sample scenes with the model's answers (``samples.png``) and saves the
model in the Hugging Face layout (``final/``: config.json with ``model_type: llava``,
model.safetensors, tokenizer.json, preprocessor_config.json). ``--fusion cross_attention``
trains the Flamingo-style gated cross-attention variant instead. Checkpoints and
``--resume auto`` work as in ``seekdeep train``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from seekdeep.errors import ConfigError
from seekdeep.validate import MAX_BATCH, MAX_SEED, check_float, check_int
from seekdeep.multimodal.data import ANSWERS, AUX_TYPES, QUESTION_TYPES, SpatialVQA, VQASample, grounded_answer, vocabulary

FUSIONS = ("prefix", "cross_attention")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")


@dataclass
class VLMTrainConfig:
    output_dir: str = "runs/vlm"
    fusion: str = "prefix"
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3  # 3e-3 sat at chance on spatial questions for 1500 steps in benchmarks/vlm_diagnose.py (README)
    warmup: int = 30
    weight_decay: float = 0.01
    image_size: int = 48
    patch_size: int = 12  # one patch per grid cell of the synthetic scenes
    hidden_size: int = 64
    vision_layers: int = 2
    text_layers: int = 2
    attention_backend: str = "sdpa"
    init_std: float = 0.08  # 0.02 (large-model habit) leaves a 64-wide model's image path too weak to learn from
    embed_std: float = 1.0  # the (tied) word embeddings' init: at init_std the LM sits at chance on spatial questions
    tie_embeddings: bool = True  # the output head shares the word embeddings (False: its own, at init_std)
    position_init: str = "sincos"  # the ViT's patch positions start as 2-D sine-cosine codes (or: normal)
    question_loss: bool = False  # loss on the question's words too (a colour word predicts its object's shape: binding)
    caption_every: int = 0  # every k-th training row is a scene caption ('red one three circle ...'); 0: none
    # LLaVA's first stage: the first caption_steps steps train on captions only (every object's colour, column, row and
    # shape: where each colour is, the step the spatial questions need first), then the question mix
    caption_steps: int = 0
    # the ViT hidden states the projector reads, comma-separated (concatenated, as transformers' list form):
    # -1 the last layer, 0 the patch embeddings + positions (before any attention)
    vision_feature_layer: str = "-1"
    spatial_weight: int = 1  # spatial rows per row of each other type in the training stream (1: balanced; evaluation stays balanced)
    position_questions: bool = False  # also train on 'which column / row is the red circle in ?' (data.AUX_TYPES)
    # spatial targets name both objects' column / row before the side (data.grounded_answer), which splits the two-hop
    # question into one-hop steps: on oracle features 0.77 held-out at 1000 steps vs 0.45 plain at 1500 (README)
    grounded: bool = True
    num_latents: int = 0
    media_attention: str = "previous"
    eval_samples: int = 400
    eval_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError("fusion", f"unknown {self.fusion!r}; accepted: {', '.join(FUSIONS)}")
        for name in ("steps", "eval_samples", "eval_every", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        for name in ("image_size", "patch_size", "hidden_size"):
            check_int(name, getattr(self, name), 1, 1 << 14)
        for name in ("vision_layers", "text_layers"):
            check_int(name, getattr(self, name), 1, 1024)
        if self.image_size % self.patch_size:
            raise ConfigError("patch_size", f"{self.patch_size} must divide image_size={self.image_size}")
        check_float("init_std", self.init_std, 0, 10, lo_open=True)
        check_float("embed_std", self.embed_std, 0, 10, lo_open=True)
        check_float("lr", self.lr, 0, 10, lo_open=True)
        check_float("weight_decay", self.weight_decay, 0, 10)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("num_latents", self.num_latents, 0, 1 << 14)
        check_int("caption_every", self.caption_every, 0, MAX_BATCH)
        check_int("caption_steps", self.caption_steps, 0)
        check_int("spatial_weight", self.spatial_weight, 1, 64)
        if self.caption_steps >= self.steps:  # at least one step of questions, or nothing learns to answer
            raise ConfigError("caption_steps", f"must be < steps={self.steps}, got {self.caption_steps}")
        self.feature_layers()  # validates
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ConfigError("warmup", f"must be an integer in [0, steps={self.steps}), got {self.warmup!r}")

    def feature_layers(self) -> int | list[int]:
        """``vision_feature_layer`` as LlavaConfig takes it (an int, or a list to concatenate)."""
        n = self.vision_layers
        try:
            layers = [int(x) for x in str(self.vision_feature_layer).split(",")]
        except ValueError:
            layers = []
        if not layers or not all(-(n + 1) <= i <= n for i in layers):
            raise ConfigError("vision_feature_layer", f"comma-separated ViT hidden-state indices in [-{n + 1}, {n}] "
                              f"(vision_layers={n}; 0: the embeddings, -1: the last layer), got {self.vision_feature_layer!r}")
        return layers[0] if len(layers) == 1 else layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMTrainConfig":
        return cls(**d)


# ----------------------------------------------------------------------------- pieces


def build_tokenizer():
    """A word-level tokenizer over the generator's closed vocabulary."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from seekdeep.tokenizer import Tokenizer

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + vocabulary())}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    return Tokenizer.from_tokenizers(tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_model(cfg: VLMTrainConfig, tokenizer):
    from seekdeep.models.llama import LlamaConfig
    from seekdeep.multimodal.config import CrossAttentionConfig, LlavaConfig, VisionConfig
    from seekdeep.multimodal.llava import LlavaForConditionalGeneration

    h = cfg.hidden_size
    vision = VisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
                          image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=cfg.tie_embeddings,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       attention_backend=cfg.attention_backend, initializer_range=cfg.init_std)
    xattn = None
    if cfg.fusion == "cross_attention":
        xattn = CrossAttentionConfig(every_n_layers=1, num_heads=4, media_attention=cfg.media_attention, num_latents=cfg.num_latents)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=vision.num_patches, vision_feature_layer=cfg.feature_layers(), cross_attention=xattn)
    model = LlavaForConditionalGeneration(config)
    model.init_weights(position_init=cfg.position_init)
    with torch.no_grad():  # word embeddings as torch's nn.Embedding starts them (std 1), not at the linears' init_std:
        # a 64-wide LM whose words start as small as its image features never learns the two-hop spatial questions
        # (benchmarks/vlm_diagnose.py --ladder classifier --trunk llama [--embed-std 1.0]; README, vision-language)
        model.get_input_embeddings().weight.normal_(0.0, cfg.embed_std)
    return model


def training_data(cfg: VLMTrainConfig) -> SpatialVQA:
    """The training stream: the four evaluated question types, plus the column / row aids
    with ``position_questions`` (evaluation never asks those)."""
    qtypes = ("spatial",) * (cfg.spatial_weight - 1) + QUESTION_TYPES  # the generator cycles through qtypes: repeats weigh
    return SpatialVQA("train", cfg.seed, cfg.image_size, qtypes=qtypes + (AUX_TYPES if cfg.position_questions else ()))


def prompt_text(sample: VQASample) -> str:
    return f"<image> question: {sample.question} answer:"


CAPTION_PROMPT = "<image> caption:"


def caption_rows(cfg: VLMTrainConfig, step: int) -> list[bool]:
    """Which rows of training step ``step`` (0-based) are scene captions: all of them during the
    caption stage (``caption_steps``), then every ``caption_every``-th row."""
    every = cfg.caption_every
    return [step < cfg.caption_steps or (every > 0 and i % every == every - 1) for i in range(cfg.batch_size)]


def encode_batch(processor, samples: list[VQASample], train: bool, question_loss: bool = False,
                 captions: list[bool] | None = None, grounded: bool = False) -> dict[str, Any]:
    """Training rows end in the answer word + eos with labels on those (and, with
    ``question_loss``, on the question's words: a colour word must predict its object's shape
    from the image, which teaches the colour -> object binding every question needs); a
    caption row (``captions[i]``) is ``<image> caption:`` + every object's colour, column,
    row and shape, labelled throughout (it teaches where each object is); with ``grounded`` a
    spatial row's target is :func:`grounded_answer` (positions, then the side). Evaluation rows
    stop after 'answer:' (left padded, so the next token is read at the last column)."""
    from seekdeep.multimodal.processing import collate

    tok = processor.tokenizer
    rows = []
    for i, s in enumerate(samples):
        caption = bool(captions and captions[i])
        row = processor.encode(CAPTION_PROMPT if caption else prompt_text(s), [s.image])
        if train:
            target = SpatialVQA.caption(s.objects) if caption else grounded_answer(s) if grounded else s.answer
            answer = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
            if question_loss and not caption:  # labels on the text after the image, not on bos / placeholders
                skip = {processor.image_token_id, tok.bos_token_id}
                row["labels"] = [-100 if t in skip else t for t in row["input_ids"]] + answer
            else:
                row["labels"] = [-100] * len(row["input_ids"]) + answer  # at their own positions, as transformers' labels
            row["input_ids"] = row["input_ids"] + answer
        rows.append(row)
    return collate(rows, pad_token_id=tok.pad_token_id, padding_side="right" if train else "left")


GROUNDED_TOKENS = 8  # 'colour column row' x 2 + the side + eos


@torch.no_grad()
def predict(model, processor, samples: list[VQASample], batch_size: int = 64, max_new_tokens: int = 1,
            texts: list[str] | None = None) -> list[str]:
    """The answer for each sample: greedy decoding after 'answer:' for up to ``max_new_tokens``
    words (1: the next word), the answer being the last word before eos (a grounded answer's
    earlier words are its steps). ``texts``, when given, receives each whole continuation."""
    model.eval()
    tok = processor.tokenizer
    words = []
    for i in range(0, len(samples), batch_size):
        batch = encode_batch(processor, samples[i : i + batch_size], train=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        new = []
        for _ in range(max_new_tokens):  # no cache: the prompts are ~40 tokens, and it serves both fusions alike
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            if bool((torch.cat(new, 1) == tok.eos_token_id).any(1).all()):
                break
        for row in torch.cat(new, 1).tolist():
            cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            generated = tok.convert_ids_to_tokens(row[:cut])
            words.append(generated[-1] if generated else tok.convert_ids_to_tokens(row[:1])[0])
            if texts is not None:
                texts.append(" ".join(generated))
    return words


def accuracy_by_type(samples: list[VQASample], predictions: list[str]) -> dict[str, float]:
    out = {}
    for qtype in QUESTION_TYPES:
        pairs = [(s.answer, p) for s, p in zip(samples, predictions) if s.qtype == qtype]
        if pairs:
            out[qtype] = sum(a == p for a, p in pairs) / len(pairs)
    out["all"] = sum(s.answer == p for s, p in zip(samples, predictions)) / max(len(samples), 1)
    return out


def question_only_prior(train: list[VQASample], evaluate: list[VQASample]) -> dict[str, float]:
    """What a model that ignores the image can score: the majority training answer for each
    exact question text (or for its question type when the text was never seen)."""
    from collections import Counter

    by_text: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    for s in train:
        by_text.setdefault(s.question, Counter())[s.answer] += 1
        by_type.setdefault(s.qtype, Counter())[s.answer] += 1
    guesses = [(by_text.get(s.question) or by_type.get(s.qtype) or Counter({ANSWERS[s.qtype][0]: 1})).most_common(1)[0][0] for s in evaluate]
    return accuracy_by_type(evaluate, guesses)


def plot_samples(samples: list[VQASample], predictions: list[str], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(samples)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s, p in zip(axes.flat, samples, predictions):
        ax.imshow(s.image, interpolation="nearest")
        q = s.question.replace(" is the ", "\nis the ") if len(s.question) > 30 else s.question
        ax.set_title(f"{q}\nmodel: {p} / truth: {s.answer}", fontsize=7, color="green" if p == s.answer else "red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the loop


def train_vlm(cfg: VLMTrainConfig) -> dict[str, Any]:
    from seekdeep.files import write_json_atomic
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.llava import LlavaForConditionalGeneration
    from seekdeep.multimodal.processing import MultimodalProcessor
    from seekdeep.recipes.train import MetricsLog
    from seekdeep.train import load_checkpoint, make_scheduler, prepare_run_dir, publish_dir, resume_checkpoint, save_checkpoint

    out = prepare_run_dir(cfg.output_dir, command="vlm", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    image_processor = ImageProcessor(ImageProcessorConfig.clip(cfg.image_size))
    if resume_path is not None:
        model = LlavaForConditionalGeneration.from_pretrained(resume_path)
    else:
        model = build_model(cfg, tokenizer)
    processor = MultimodalProcessor.for_model(model, tokenizer, image_processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = make_scheduler(optimizer, cfg.warmup, cfg.steps)
    start = 0
    if resume_path is not None:
        start = load_checkpoint(resume_path, optimizer=optimizer, scheduler=scheduler).step
    data = training_data(cfg)
    test = SpatialVQA("test", cfg.seed, cfg.image_size).take(cfg.eval_samples)
    heldout = SpatialVQA("heldout", cfg.seed, cfg.image_size).take(cfg.eval_samples)
    metrics = MetricsLog(out / "metrics.jsonl", start if resume_path is not None else None, use_tensorboard=False)
    new_tokens = GROUNDED_TOKENS if cfg.grounded else 1
    bar = tqdm(total=cfg.steps, initial=start, desc=f"vlm ({cfg.fusion})", disable=not cfg.progress, dynamic_ncols=True)
    began = time.perf_counter()
    step = start
    try:
        while step < cfg.steps:
            model.train()
            captions = caption_rows(cfg, step)
            batch = encode_batch(processor, [data[step * cfg.batch_size + i] for i in range(cfg.batch_size)], train=True,
                                 question_loss=cfg.question_loss, captions=captions, grounded=cfg.grounded)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                         labels=batch["labels"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            record: dict[str, Any] = {"kind": "train", "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            metrics.write(record)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                acc = accuracy_by_type(test[:200], predict(model, processor, test[:200], max_new_tokens=new_tokens))
                metrics.write({"kind": "eval", "step": step, **{f"test_{k}": v for k, v in acc.items()}})
                tqdm.write(f"step {step}: test accuracy {acc}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:  # the last one lets --resume auto extend a finished run
                save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, data_state={"step": step}, extra={"config": cfg.to_dict()})
    finally:
        bar.close()
        metrics.close()
    train_seconds = time.perf_counter() - began
    results = {}
    for name, split in (("test", test), ("heldout", heldout)):
        texts: list[str] = []
        predictions = predict(model, processor, split, max_new_tokens=new_tokens, texts=texts)
        results[name] = accuracy_by_type(split, predictions)
        if cfg.grounded:  # how often the whole chain (both objects' positions and the side) is right on spatial questions
            chains = [t == grounded_answer(s) for s, t in zip(split, texts) if s.qtype == "spatial"]
            results.setdefault("spatial_chain_exact", {})[name] = sum(chains) / max(len(chains), 1)
        if name == "heldout":
            plot_samples(split[:12], predictions[:12], out / "samples.png", f"seekdeep vlm ({cfg.fusion}), held-out colour-shape combinations")
    prior_train = data.take(min(4000, max(200, cfg.steps * cfg.batch_size)))  # (a prefix of) what it trained on
    results["question_only_prior"] = {name: question_only_prior(prior_train, split) for name, split in (("test", test), ("heldout", heldout))}

    def write_final(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)

    publish_dir(out / "final", write_final)
    summary = {"command": "vlm", "config": cfg.to_dict(), "steps": step, "train_seconds_this_run": round(train_seconds, 2),
               "parameters": model.num_parameters(), "accuracy": results, "final": str(out / "final"),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    write_json_atomic(out / "summary.json", summary)
    return summary


_HELP = {
    "output_dir": "run directory (checkpoints, metrics.jsonl, samples.png, final/, summary.json)",
    "fusion": "how the image reaches the LM: prefix (LLaVA projected patch tokens) or cross_attention (Flamingo gated blocks)",
    "num_latents": "cross_attention only: Perceiver resampler latents per image (0: attend to the patch features)",
    "media_attention": "cross_attention only: previous (the last image before a token) or all_previous",
    "resume": "'auto' (latest checkpoint in output_dir) or a checkpoint path",
    "question_loss": "train on the question's words too, not only the answer (teaches which object a colour names)",
    "caption_every": "every k-th training row is a scene caption (colour, column, row, shape of each object); 0: none",
    "embed_std": "init std of the word embeddings (tied with the output head); the linears use --init-std",
    "grounded": "spatial targets name both objects' column and row before the side ('red one two blue three two right'); "
                "scored on the side only, greedy; --no-grounded: the one-word answer",
    "spatial_weight": "spatial questions per question of each other type in the training stream (1: balanced)",
    "caption_steps": "the first k steps train on scene captions only (LLaVA's caption stage), then the question mix; 0: none",
    "vision_feature_layer": "ViT hidden states the projector reads, comma-separated and concatenated (-1: last layer, "
                            "0: patch embeddings + positions; e.g. 0,-1)",
    "position_questions": "also train on 'which column / row is the <object> in ?' (half of a spatial question, with its own answer)",
}


def cmd_vlm(args: argparse.Namespace) -> int:
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(VLMTrainConfig)}
    cfg = VLMTrainConfig(**{k: v for k, v in given.items() if v is not None or k == "resume"})
    summary = train_vlm(cfg)
    acc = summary["accuracy"]
    print(f"test accuracy {acc['test']}\nheld-out accuracy {acc['heldout']}\nquestion-only prior (held-out) {acc['question_only_prior']['heldout']}")
    print(f"model: {summary['final']}")
    return 0


def register(subparsers) -> None:
    """Add ``seekdeep vlm`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "vlm", "train a small vision-language model on the synthetic spatial VQA default",
                       VLMTrainConfig, "output_dir", _HELP, cmd_vlm)
