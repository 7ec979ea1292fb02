"""What the post-training recipes share around their loops: the base model, the trainable
policy (LoRA through ``seekdeep.recipes.finetune.attach_method``, or full), the reference
policy, the optimizer, resumable checkpoints and the published final model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ADAPTER = "default"


class AdapterArtifact:
    """What a LoRA run's checkpoints hold: the adapter alone, in peft's layout."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, directory) -> None:
        self.model.save_adapter(directory, adapter_name=ADAPTER)


def attach(model, method: str, lora: str, base: str) -> None:
    """LoRA (mergeable: checked now, not after training) or full fine-tuning of ``model``."""
    from seekdeep.recipes.finetune import FinetuneConfig, attach_method

    attach_method(model, FinetuneConfig(base=base, method=method, lora=lora, merge=method == "lora",
                                        adapter_name=ADAPTER, progress=False))


def frozen_reference(model, method: str):
    """Full fine-tuning needs a copy of the starting weights as the reference; LoRA does not."""
    if method == "lora":
        return None
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_optimizer(model, cfg, device):
    from seekdeep.train import make_scheduler, param_groups

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
    return optimizer, scheduler


def restore(resume_path, model, method: str, optimizer, scheduler, scaler):
    """Load a checkpoint written with :func:`checkpoint_artifact` into the policy and optimizer."""
    from seekdeep.peft.io import copy_into_adapter, read_adapter_weights
    from seekdeep.train import load_checkpoint

    state = load_checkpoint(resume_path, model if method == "full" else None, optimizer, scheduler, scaler)
    if method != "full":
        copy_into_adapter(model, ADAPTER, read_adapter_weights(resume_path), str(resume_path))
    print(f"resumed from {resume_path} at step {state.step}", file=sys.stderr)
    return state


def checkpoint_artifact(model, method: str):
    return model if method == "full" else AdapterArtifact(model)


def publish_final(out: Path, model, tokenizer, method: str) -> dict[str, str]:
    """``out/final``: the whole model in the Hugging Face layout (a LoRA adapter merged in, so
    ``seekdeep serve`` / ``generate`` load it unchanged); LoRA runs also keep ``out/adapter``."""
    from seekdeep.train import publish_dir

    written = {}
    if method == "lora":
        publish_dir(out / "adapter", lambda tmp: model.save_adapter(tmp, adapter_name=ADAPTER))
        written["adapter_dir"] = str(out / "adapter")
        model.merge_and_unload()
    publish_dir(out / "final", lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    written["model_dir"] = str(out / "final")
    return written


def ensure_chat_template(tokenizer) -> None:
    """seekdeep-trained tokenizers carry the default template; one without any gets it too."""
    if tokenizer.chat_template is None:
        from seekdeep.tokenizer import DEFAULT_CHAT_TEMPLATE

        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
