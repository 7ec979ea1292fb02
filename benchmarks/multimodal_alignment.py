"""Multimodal alignment and fusion robustness on the embedded digits data, >= 3 seeds, one JSON
line per result (mean and std over seeds; anchors measured in the same run).

- retrieval mAP@10 / R@1/5/10 (multi-positive: same digit), text->image, image->text and,
  zero-shot through the image hub, audio->text; anchors: the same model before training
  (untrained projections) and chance;
- robustness: concat / sum / gmu / unified image + audio classifiers trained with the same
  corruption augmentation and modality dropout; normalised area under accuracy-vs-noise per
  corruption, always with clean accuracy and the gap over the best single-modality model;
  anchor: concat. The GMU's mean alpha on the image, clean vs the noisiest image / audio level;
- unified vs separate towers: parameters and clean accuracy.

    .venv/bin/python benchmarks/multimodal_alignment.py --seeds 3 --align-steps 150 --fusion-steps 150
    .venv/bin/python benchmarks/multimodal_alignment.py --parts align --objectives contrastive contrastive,distill,missing
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_capability_fields, device_name, emit  # noqa: E402


TEXT_DROP = (0.25, 0.5, 0.75)  # share of caption words replaced by <unk> at test time


def stats(values):
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--align-steps", type=int, default=150)
    parser.add_argument("--fusion-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="align,fusion", help="comma-separated: align, fusion")
    parser.add_argument("--objectives", nargs="+", default=["contrastive"],
                        help="alignment objective sets to compare, e.g. contrastive contrastive,distill,missing; "
                             "each set beyond contrastive is anchored on the contrastive run of the same seeds")
    parser.add_argument("--fusion-audio-snr", type=float, default=-8.0,
                        help="extra white noise (dB SNR) on the fusion task's audio: at the data's own -4..10 dB the audio "
                             "alone is ~99%% accurate and a fusion model can ignore the image")
    args = parser.parse_args()
    if args.seeds < 3:
        parser.error("--seeds: tiny-scale quality comparisons need >= 3 seeds")
    torch.set_num_threads(args.threads)

    from seekdeep.multimodal.align_data import WordTokenizer, caption_words, load_digits_aligned
    from seekdeep.multimodal.fusion import FusionConfig, build_image_audio_model, count_parameters
    from seekdeep.multimodal.robustness import Featurizer, FusionData, noise_curves, normalised_auc, train_fusion
    from seekdeep.recipes.align import AlignConfig, build_aligned, evaluate_retrieval, fit_alignment

    device = device_name("cpu")
    common = {**cpu_capability_fields(), "seeds": args.seeds}
    tokenizer = WordTokenizer(caption_words())
    train = load_digits_aligned("train", seed=0, tokenizer=tokenizer)
    test = load_digits_aligned("test", seed=0, tokenizer=tokenizer)
    featurize = Featurizer()
    train_mel, test_mel = featurize(train.audio), featurize(test.audio)
    mean, std = train_mel.mean(dim=(0, 2)), train_mel.std(dim=(0, 2)).clamp_min(1e-3)

    # -- retrieval
    rows: dict[tuple[str, str, str, str], list[float]] = {}
    chance = None
    started = time.time()
    for objectives in args.objectives:
        for seed in range(args.seeds if "align" in args.parts else 0):
            torch.manual_seed(seed)
            cfg = AlignConfig(steps=args.align_steps, seed=seed, progress=False, objectives=objectives)
            model = build_aligned(cfg, len(tokenizer), mean, std, tokenizer)
            before = evaluate_retrieval(model, test, test_mel, tokenizer)
            fit_alignment(model, cfg, train, train_mel)
            after = evaluate_retrieval(model, test, test_mel, tokenizer)
            chance = after["chance"]
            if objectives == args.objectives[0]:  # text corrupted at test time: words dropped to <unk>
                from dataclasses import replace

                from seekdeep.multimodal.fusion import corrupt_text

                g = torch.Generator().manual_seed(seed)
                for p in TEXT_DROP:
                    ids = corrupt_text(test.input_ids, test.attention_mask, p, tokenizer.unk_token_id, g)
                    noisy = evaluate_retrieval(model, replace(test, input_ids=ids), test_mel, tokenizer)
                    rows.setdefault(("text_drop", f"text_to_image@p{p}", "mAP@10", "trained"), []).append(
                        noisy["text_image"]["text_to_image"]["mAP@10"])
            for name, result in (("trained", after), ("untrained", before)):
                for group in ("text_image", "audio_text_zero_shot", "text_to_predicted_image"):
                    for direction, m in result.get(group, {}).items():
                        for metric in ("mAP@10", "R@1", "R@5", "R@10"):
                            key = f"{direction}_from_audio" if group == "text_to_predicted_image" else direction
                            rows.setdefault((objectives, key, metric, name), []).append(m[metric])
                for k, v in result["zero_shot_classification"].items():
                    rows.setdefault((objectives, f"zero_shot_{k}", "accuracy", name), []).append(v)
            print(f"# alignment [{objectives}] seed {seed} done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    for (objectives, direction, metric, name), values in sorted(rows.items()):
        if objectives == "text_drop":  # anchor: the same models on clean text
            clean = rows[(args.objectives[0], "text_to_image", "mAP@10", "trained")]
            (m, sd), (cm, csd) = stats(values), stats(clean)
            emit(f"align/{direction}/mAP@10", m, "fraction", cm, "clean text (same models)", device, std=sd,
                 anchor_std=csd, objectives=args.objectives[0], **common)
            continue
        if name != "trained":
            continue
        mean_v, std_v = stats(values)
        plain = ("contrastive", direction, metric, "trained")
        if objectives != "contrastive" and plain in rows:  # the same seeds with the hub losses alone
            base, anchor = rows[plain], "contrastive objective only (same seeds)"
        else:
            base, anchor = rows[(objectives, direction, metric, "untrained")], "untrained projections (same init)"
        base_mean, base_std = stats(base)
        prefix = "align" if objectives == "contrastive" else f"align[{objectives}]"
        emit(f"{prefix}/{direction}/{metric}", mean_v, "fraction", base_mean, anchor, device, std=std_v,
             anchor_std=base_std, chance=(chance.get(metric) if metric in chance else 0.1), **common)

    if "fusion" not in args.parts:
        return
    # -- fusion robustness
    from seekdeep.multimodal.fusion import corrupt_audio

    g = torch.Generator().manual_seed(1234)
    data = FusionData(train.pixel_values, corrupt_audio(train.audio, args.fusion_audio_snr, g), train.labels)
    held = FusionData(test.pixel_values, corrupt_audio(test.audio, args.fusion_audio_snr, g), test.labels)
    common = {**common, "fusion_audio_snr_db": args.fusion_audio_snr}
    variants = {"concat": ("image", "audio"), "sum": ("image", "audio"), "gmu": ("image", "audio"), "unified": ("image", "audio"),
                "image_only": ("image",), "audio_only": ("audio",)}
    results: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    params = {}
    for seed in range(args.seeds):
        for variant, mods in variants.items():
            torch.manual_seed(seed)
            fusion = variant if variant in ("concat", "sum", "gmu", "unified") else "concat"
            cfg = FusionConfig(fusion=fusion, modalities=mods, modality_dropout=0.2 if len(mods) > 1 else 0.0)
            model = build_image_audio_model(cfg, 16, tuple(train_mel.shape[1:]), mean, std)
            params[variant] = count_parameters(model)
            train_fusion(model, data, featurize, steps=args.fusion_steps, seed=seed)
            curves = noise_curves(model, held, featurize, seed=seed)
            r = results[variant]
            r.setdefault("clean", []).append(next(iter(curves.values()))[0]["accuracy"])
            for name, curve in curves.items():
                r.setdefault(f"auc_{name}", []).append(normalised_auc(curve))
                if "alpha_image" in curve[0]:
                    r.setdefault(f"alpha_image_clean/{name}", []).append(curve[0]["alpha_image"])
                    r.setdefault(f"alpha_image_worst/{name}", []).append(curve[-1]["alpha_image"])
            print(f"# fusion seed {seed} {variant} clean {r['clean'][-1]:.3f} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    best_single = [max(a, b) for a, b in zip(results["image_only"]["clean"], results["audio_only"]["clean"])]
    concat = results["concat"]
    for variant in variants:
        r = results[variant]
        clean_mean, clean_std = stats(r["clean"])
        gap = stats([c - b for c, b in zip(r["clean"], best_single)])
        emit(f"fusion/{variant}/clean_accuracy", clean_mean, "fraction", stats(concat["clean"])[0], "concat", device, std=clean_std,
             gap_over_best_single_mean=gap[0], gap_over_best_single_std=gap[1], parameters=params[variant], **common)
        for key in sorted(k for k in r if k.startswith("auc_")):
            if key not in concat:
                continue
            m, s = stats(r[key])
            cm, cs = stats(concat[key])
            emit(f"fusion/{variant}/{key}", m, "normalised AUC", cm, "concat", device, std=s, anchor_std=cs, clean_accuracy=clean_mean,
                 gap_over_best_single=gap[0], **common)
        for key in sorted(k for k in r if k.startswith("alpha_image_worst")):
            clean_key = key.replace("worst", "clean")
            m, s = stats(r[key])
            cm, cs = stats(r[clean_key])
            emit(f"fusion/{variant}/{key}", m, "mean alpha (image)", cm, "clean input, same model", device, std=s, anchor_std=cs, **common)
    emit("fusion/unified_vs_separate/parameters", params["unified"], "parameters", params["gmu"], "separate towers + gmu head", device,
         unified_clean=stats(results["unified"]["clean"])[0], separate_clean=stats(results["gmu"]["clean"])[0], **common)
    print(f"# total {time.time() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
