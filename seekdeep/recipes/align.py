"""``seekdeep align``: text, image and audio encoders aligned in one embedding space on the
embedded digits data, then a fusion model probed under noise.

1. Alignment (ImageBind-style hub): a CLIP dual encoder (causal text tower + the VLM's ViT) and
   an audio encoder; text~image and audio~image InfoNCE (or SigLIP) with a learnable, clamped
   temperature; audio and text are never trained together.
2. Retrieval on the test split (multi-positive: every caption/clip of the same digit counts):
   text<->image and, zero-shot through the hub, audio<->text; R@1/5/10, median rank, mAP@10,
   zero-shot classification through "the digit seven" prompts; next to chance and the same
   model before training (the untrained-projection baseline).
3. Fusion: an image + audio (``--fusion-modalities``: + text) digit classifier (``--fusion`` concat / sum / gmu / unified) trained
   with corruption augmentation and modality dropout; noise-response curves, accuracy with a
   modality removed, and the modality-contribution dashboard (dashboard.html / .png).

Writes checkpoints, metrics.jsonl, retrieval.json, dashboard.*, final/ (HF CLIP layout +
vocab.json + preprocessor_config.json, audio/ and fusion/ subfolders) and summary.json last."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from seekdeep.errors import ConfigError
from seekdeep.validate import MAX_SEED, check_float, check_int

LOSSES = ("infonce", "siglip")
#: objectives of the alignment stage; "contrastive" (the hub losses) is always on, the others join
#: after the first third of the steps (progressive alignment) once the hub space has formed
OBJECTIVES = ("contrastive", "distill", "missing")
FUSION_CHOICES = ("concat", "sum", "gmu", "unified")
FUSION_MODALITIES = ("image", "audio", "text")


@dataclass
class AlignConfig:
    output_dir: str = "runs/align"
    steps: int = 250
    batch_size: int = 64
    lr: float = 3e-3
    loss: str = "infonce"
    # contrastive[,distill][,missing]: distill = the audio~image similarity matrix learns the image
    # tower's own image~image one (soft relations, not only pairs); missing = predictors of the hub
    # (image) embedding from text and from audio, for inputs that come without an image
    objectives: str = "contrastive"
    hidden_size: int = 32
    layers: int = 1
    projection_dim: int = 32
    image_size: int = 16
    init_std: float = 0.3  # at 0.02 or 0.08 the 32-wide towers start collapsed (image cos ~0.999) and the loss sits at ln(batch) for 150+ steps
    fusion: str = "gmu"
    # the fusion classifier's modalities (comma list of image, audio, text); text: the captions,
    # corrupted by token drop in the robustness probe
    fusion_modalities: str = "image,audio"
    fusion_steps: int = 200
    max_samples: int = 2000  # per split (digits has 1,438 train / 359 test): smaller for a quick run
    checkpoint_every: int = 100
    seed: int = 0
    overwrite: bool = False
    resume: str | None = None  # 'auto' (latest checkpoint in output_dir/checkpoints) or a checkpoint directory
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "layers", "projection_dim", "fusion_steps", "checkpoint_every"):
            check_int(name, getattr(self, name), hi=1_000_000)
        check_int("image_size", self.image_size, lo=8, hi=224)
        check_int("max_samples", self.max_samples, lo=20, hi=1_000_000)
        if self.image_size % 4:
            raise ConfigError("image_size", f"got {self.image_size}; accepted: a multiple of the patch size 4")
        check_int("seed", self.seed, lo=0, hi=MAX_SEED)
        check_float("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_float("init_std", self.init_std, 0.0, 1.0, lo_open=True)
        if self.batch_size < 2:
            raise ConfigError("batch_size", f"got {self.batch_size}; accepted: >= 2 (contrastive losses need negatives)")
        if self.hidden_size % 4:
            raise ConfigError("hidden_size", f"got {self.hidden_size}; accepted: a multiple of the 4 attention heads")
        if self.loss not in LOSSES:
            raise ConfigError("loss", f"unknown {self.loss!r}; accepted: {', '.join(LOSSES)}")
        names = [x.strip() for x in self.objectives.split(",") if x.strip()] if isinstance(self.objectives, str) else None
        if not names or any(x not in OBJECTIVES for x in names) or "contrastive" not in names:
            raise ConfigError("objectives", f"got {self.objectives!r}; accepted: a comma list of {', '.join(OBJECTIVES)} "
                              "that includes contrastive")
        if self.fusion not in FUSION_CHOICES:
            raise ConfigError("fusion", f"unknown {self.fusion!r}; accepted: {', '.join(FUSION_CHOICES)}")
        mods = [x.strip() for x in self.fusion_modalities.split(",")] if isinstance(self.fusion_modalities, str) else None
        if not mods or any(x not in FUSION_MODALITIES for x in mods) or len(set(mods)) != len(mods):
            raise ConfigError("fusion_modalities", f"got {self.fusion_modalities!r}; accepted: a comma list of distinct "
                              f"{', '.join(FUSION_MODALITIES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AlignConfig":
        return cls(**d)


class AlignedEncoders(torch.nn.Module):
    """CLIP (text + image) and the audio encoder, one embedding space; image is the hub."""

    def __init__(self, clip, audio, predictors: bool = False):
        super().__init__()
        self.clip, self.audio = clip, audio
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))  # SigLIP only
        if predictors:  # the missing-modality objective: text -> image and audio -> image embeddings
            from seekdeep.multimodal.alignment import ModalityPredictor

            dim = clip.config.projection_dim
            self.predict = torch.nn.ModuleDict({"text": ModalityPredictor(dim), "audio": ModalityPredictor(dim)})

    def embed(self, batch, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.clip(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
        return {"text": out.text_embeds, "image": out.image_embeds, "audio": F.normalize(self.audio.projection(self.audio.encode_features(mel)), dim=-1)}

    def scale(self) -> torch.Tensor:
        from seekdeep.multimodal.alignment import MAX_LOGIT_SCALE

        return self.clip.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()


def build_aligned(cfg: AlignConfig, vocab_size: int, mel_mean: torch.Tensor, mel_std: torch.Tensor, tokenizer) -> AlignedEncoders:
    from seekdeep.multimodal.audio import AudioConfig, AudioEncoder
    from seekdeep.multimodal.clip import ClipConfig, ClipModel, ClipTextConfig
    from seekdeep.multimodal.config import VisionConfig

    h = cfg.hidden_size
    text = ClipTextConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.layers, num_attention_heads=4,
                          max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    vision = VisionConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.layers, num_attention_heads=4, image_size=cfg.image_size,
                          patch_size=4)
    clip = ClipModel(ClipConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))
    clip.init_weights(std=cfg.init_std)
    clip.vision_model.init_weights(std=cfg.init_std, position_init="sincos")
    audio = AudioEncoder(AudioConfig(hidden_size=h, num_layers=cfg.layers, num_heads=4, intermediate_size=2 * h, projection_dim=cfg.projection_dim))
    with torch.no_grad():
        audio.feature_mean.copy_(mel_mean)
        audio.feature_std.copy_(mel_std)
    return AlignedEncoders(clip, audio, predictors="missing" in cfg.objectives)


def alignment_loss(model: AlignedEncoders, emb: dict[str, torch.Tensor], labels: torch.Tensor, loss: str,
                   objectives: tuple[str, ...] = ("contrastive",)) -> dict[str, torch.Tensor]:
    """The hub losses (text~image, audio~image; audio and text never meet), plus ``distill``
    (audio~image similarities taught by the image tower's image~image ones, the teacher side
    detached) and ``missing`` (1 - cosine of each predicted hub embedding to the real one)."""
    from seekdeep.multimodal.alignment import hub_binding_loss, siglip_loss, similarity_distillation

    positives = labels[:, None] == labels[None, :]  # same digit: multi-positive
    if loss == "infonce":
        out = hub_binding_loss(emb, model.scale(), hub="image", positives=positives)
    else:
        out = {f"{m}~image": siglip_loss(emb[m], emb["image"], model.scale(), model.logit_bias, positives)
               for m in ("text", "audio")}
    if "distill" in objectives:
        image = emb["image"].detach()
        out["distill"] = similarity_distillation(emb["audio"], emb["image"], image, image)
    if "missing" in objectives:
        for m, predictor in model.predict.items():
            out[f"missing:{m}->image"] = predictor.loss(emb[m].detach(), emb["image"])
    return out


@torch.no_grad()
def evaluate_retrieval(model: AlignedEncoders, batch, mel: torch.Tensor, tokenizer) -> dict[str, Any]:
    from seekdeep.multimodal.align_data import DIGIT_WORDS, PROMPT
    from seekdeep.multimodal.retrieval import bidirectional_metrics, chance_metrics, labels_to_positives, zero_shot_accuracy

    model.eval()
    emb = model.embed(batch, mel)
    pos = labels_to_positives(batch.labels.numpy(), batch.labels.numpy())
    prompts = tokenizer([PROMPT.format(w) for w in DIGIT_WORDS])
    class_text = model.clip(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"]).text_embeds
    out = {
        "text_image": bidirectional_metrics(emb["text"] @ emb["image"].t(), pos, names=("text_to_image", "image_to_text")),
        "audio_text_zero_shot": bidirectional_metrics(emb["audio"] @ emb["text"].t(), pos, names=("audio_to_text", "text_to_audio")),
        "audio_image": bidirectional_metrics(emb["audio"] @ emb["image"].t(), pos, names=("audio_to_image", "image_to_audio")),
        "zero_shot_classification": {"image": zero_shot_accuracy(emb["image"], class_text, batch.labels),
                                     "audio_via_hub": zero_shot_accuracy(emb["audio"], class_text, batch.labels)},
        "chance": chance_metrics(pos),
    }
    if hasattr(model, "predict"):  # the image left out: its embedding predicted from the audio clip
        predicted = F.normalize(model.predict["audio"](emb["audio"]), dim=-1)
        out["text_to_predicted_image"] = bidirectional_metrics(emb["text"] @ predicted.t(), pos,
                                                               names=("text_to_image", "image_to_text"))
    model.train()
    return out


def fit_alignment(model: AlignedEncoders, cfg: AlignConfig, train, train_mel: torch.Tensor, on_step=None,
                  resume_from=None) -> None:
    """AdamW on the hub losses; ``on_step(step, record, optimizer)`` after each step.
    ``resume_from``: a checkpoint of this run; the model and optimizer are restored from it and
    the batch sampler is replayed to its step, so the rest equals an uninterrupted run."""
    from seekdeep.train import load_checkpoint

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, opt).step
        for _ in range(start):  # the sampler's draws so far: cheaper than storing its state
            torch.randint(len(train), (cfg.batch_size,), generator=g)
    model.train()
    extra = tuple(x.strip() for x in cfg.objectives.split(",") if x.strip() != "contrastive")
    for step in range(start + 1, cfg.steps + 1):
        idx = torch.randint(len(train), (cfg.batch_size,), generator=g)
        batch = train.subset(idx)
        on = ("contrastive", *extra) if step > cfg.steps // 3 else ("contrastive",)  # progressive
        losses = alignment_loss(model, model.embed(batch, train_mel[idx]), batch.labels, cfg.loss, on)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # open_clip's clamp after the step
            model.clip.logit_scale.clamp_(0.0, math.log(100.0))
        record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}, "temperature": float(1 / model.scale().detach())}
        if on_step is not None:
            on_step(step, record, opt)
    model.eval()


def train_align(cfg: AlignConfig) -> dict[str, Any]:
    from seekdeep.files import write_json_atomic
    from seekdeep.multimodal.align_data import WordTokenizer, caption_words, image_processor, load_digits_aligned
    from seekdeep.multimodal.audio import save_audio_encoder
    from seekdeep.multimodal.dashboard import contribution_report, write_dashboard
    from seekdeep.multimodal.fusion import FusionConfig, build_image_audio_model, count_parameters
    from seekdeep.multimodal.robustness import Featurizer, FusionData, noise_curves, normalised_auc, removal_effects, train_fusion
    from seekdeep.recipes.train import MetricsLog
    from seekdeep.train import load_checkpoint, prepare_run_dir, publish_dir, resume_checkpoint, save_checkpoint

    out = prepare_run_dir(cfg.output_dir, command="align", overwrite=cfg.overwrite, resume=cfg.resume)
    ckpt_dir = out / "checkpoints"
    resume_path = resume_checkpoint(cfg.resume, ckpt_dir)
    start_step = 0
    if resume_path is not None:  # the run's identity comes from the checkpoint; only the budget may grow
        saved = load_checkpoint(resume_path, restore_rng=False)
        config = (saved.extra or {}).get("config")
        if not isinstance(config, dict):
            raise ConfigError("resume", f"{resume_path}: not a `seekdeep align` checkpoint (no config in it)")
        if saved.step > cfg.steps:
            raise ConfigError("steps", f"the checkpoint is at step {saved.step}; give --steps >= {saved.step} to resume it")
        cfg = AlignConfig(**{**config, "steps": cfg.steps, "resume": cfg.resume, "progress": cfg.progress,
                             "output_dir": cfg.output_dir, "overwrite": False})
        start_step = saved.step
    started = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer = WordTokenizer(caption_words())
    train = load_digits_aligned("train", seed=cfg.seed, image_size=cfg.image_size, tokenizer=tokenizer, limit=cfg.max_samples)
    test = load_digits_aligned("test", seed=cfg.seed, image_size=cfg.image_size, tokenizer=tokenizer, limit=cfg.max_samples)
    featurize = Featurizer()
    train_mel, test_mel = featurize(train.audio), featurize(test.audio)
    mel_mean, mel_std = train_mel.mean(dim=(0, 2)), train_mel.std(dim=(0, 2)).clamp_min(1e-3)
    model = build_aligned(cfg, len(tokenizer), mel_mean, mel_std, tokenizer)
    untrained = evaluate_retrieval(model, test, test_mel, tokenizer)

    log = MetricsLog(out / "metrics.jsonl", start_step if resume_path is not None else None, use_tensorboard=False)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"align ({cfg.loss})", disable=not cfg.progress,
               dynamic_ncols=True)

    def on_step(step, record, opt):
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", T=f"{record['temperature']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt_dir, step, model, opt, extra={"config": cfg.to_dict()})

    fit_alignment(model, cfg, train, train_mel, on_step, resume_from=resume_path)
    bar.close()
    log.close()
    trained = evaluate_retrieval(model, test, test_mel, tokenizer)
    retrieval = {"trained": trained, "untrained": untrained}
    write_json_atomic(out / "retrieval.json", retrieval)

    # -- fusion under noise
    mods = tuple(x.strip() for x in cfg.fusion_modalities.split(","))
    fusion_cfg = FusionConfig(fusion=cfg.fusion, modalities=mods, hidden_size=cfg.hidden_size, num_layers=cfg.layers,
                              modality_dropout=0.2 if len(mods) > 1 else 0.0)
    fusion = build_image_audio_model(fusion_cfg, cfg.image_size, tuple(train_mel.shape[1:]), mel_mean, mel_std, tower_layers=cfg.layers,
                                     text_vocab_size=len(tokenizer))
    fbar = tqdm(total=cfg.fusion_steps, desc=f"fusion ({cfg.fusion})", disable=not cfg.progress, dynamic_ncols=True)
    def fusion_data(b):
        return FusionData(b.pixel_values, b.audio, b.labels, b.input_ids, b.attention_mask, tokenizer.unk_token_id)

    train_fusion(fusion, fusion_data(train), featurize, steps=cfg.fusion_steps, batch_size=cfg.batch_size,
                 lr=cfg.lr, seed=cfg.seed, progress=lambda s, l: (fbar.update(1), fbar.set_postfix(loss=f"{l:.3f}")))
    fbar.close()
    test_data = fusion_data(test)
    curves = noise_curves(fusion, test_data, featurize, seed=cfg.seed)
    removal = removal_effects(fusion, test_data, featurize)
    report = contribution_report(fusion, test_data, featurize)
    write_dashboard(out, curves, removal, report, title=f"seekdeep align: {cfg.fusion} fusion of {' + '.join(mods)} digits")

    def write_final(tmp):
        model.clip.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor(cfg.image_size).save_pretrained(tmp)
        save_audio_encoder(model.audio, tmp / "audio")
        if hasattr(model, "predict"):
            from safetensors.torch import save_file

            (tmp / "predictors").mkdir()
            save_file({k: v.contiguous() for k, v in model.predict.state_dict().items()},
                      str(tmp / "predictors" / "model.safetensors"))
        (tmp / "fusion").mkdir()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in fusion.state_dict().items()}, str(tmp / "fusion" / "model.safetensors"))
        write_json_atomic(tmp / "fusion" / "config.json", {**fusion_cfg.to_dict(), "image_size": cfg.image_size})

    final = publish_dir(out / "final", write_final)
    summary = {
        "command": "align", "config": cfg.to_dict(), "final": str(final), "seconds": round(time.time() - started, 1),
        "temperature": float(1 / model.scale().detach()), "retrieval": retrieval,
        "fusion": {"fusion": cfg.fusion, "parameters": count_parameters(fusion), "removal": removal,
                   "normalised_auc": {k: normalised_auc(v) for k, v in curves.items()}, "curves": curves},
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def format_table(retrieval: dict[str, Any]) -> str:
    lines = [f"{'direction':<16}{'model':<11}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medR':>7}{'mAP@10':>8}"]
    for group in ("text_image", "audio_text_zero_shot"):
        for direction in retrieval["trained"][group]:
            for name in ("trained", "untrained"):
                m = retrieval[name][group][direction]
                lines.append(f"{direction:<16}{name:<11}{m['R@1']:>7.3f}{m['R@5']:>7.3f}{m['R@10']:>7.3f}{m['median_rank']:>7.1f}{m['mAP@10']:>8.3f}")
    c = retrieval["trained"]["chance"]
    lines.append(f"{'any':<16}{'chance':<11}{c['R@1']:>7.3f}{c['R@5']:>7.3f}{c['R@10']:>7.3f}{c['median_rank']:>7.1f}{c['mAP@10']:>8.3f}")
    return "\n".join(lines)


_HELP = {
    "output_dir": "run directory (checkpoints, metrics.jsonl, retrieval.json, dashboard.html/png, final/, summary.json)",
    "loss": "infonce (symmetric, learnable clamped temperature) or siglip (pairwise sigmoid)",
    "objectives": "contrastive[,distill][,missing]: the extra ones join after the first third of the steps "
                  "(distill: audio~image similarities learn the image~image ones; missing: predict the image "
                  "embedding from text / audio, reported as text_to_predicted_image)",
    "fusion": "fusion probed under noise: concat, sum, gmu (per-sample alpha) or unified (one shared trunk)",
    "fusion_modalities": "the fusion classifier's modalities: a comma list of image, audio, text (text: the captions, "
                         "corrupted by token drop in the probe), e.g. text,image,audio",
    "layers": "transformer blocks per tower (the unified fusion trunk has this many, shared)",
    "resume": "'auto' (latest checkpoint in --output-dir) or a checkpoint directory; the alignment stage continues "
              "from it (a larger --steps extends it), the fusion stage is retrained",
}


def cmd_align(args: argparse.Namespace) -> int:
    from dataclasses import fields

    given = {f.name: getattr(args, f.name) for f in fields(AlignConfig)}
    cfg = AlignConfig(**{k: v for k, v in given.items() if v is not None})
    summary = train_align(cfg)
    print(format_table(summary["retrieval"]))
    zs = summary["retrieval"]["trained"]["zero_shot_classification"]
    print(f"zero-shot classification: image {zs['image']:.3f}, audio (through the image hub) {zs['audio_via_hub']:.3f}")
    f = summary["fusion"]
    print(f"fusion {f['fusion']}: clean accuracy {f['removal']['clean']:.3f}; normalised AUC "
          + ", ".join(f"{k} {v:.3f}" for k, v in f["normalised_auc"].items()))
    print(f"dashboard: {cfg.output_dir}/dashboard.html\nmodel: {summary['final']}")
    return 0


def register(subparsers) -> None:
    """Add ``seekdeep align`` (see the module docstring)."""
    from seekdeep.cli import add_recipe_command

    add_recipe_command(subparsers, "align", "align text, image and audio encoders on the embedded digits data, probe fusion under noise",
                       AlignConfig, "output_dir", _HELP, cmd_align)
