"""Multimodal alignment and fusion robustness on the embedded digits data, >= 3 seeds, one JSON
line per result (mean and std over seeds; anchors measured in the same run).

- retrieval mAP@10 / R@1/5/10 (multi-positive: same digit), text->image, image->text and,
  zero-shot through the image hub, audio->text; anchors: the same model before training
  (untrained projections) and chance;
- robustness: concat / sum / gmu / unified classifiers over ``--fusion-modalities`` (image +
  audio, or with text: caption token drop) trained with the same corruption augmentation and
  modality dropout; normalised area under accuracy-vs-noise per corruption and the accuracy at
  the strongest level, always with clean accuracy, the gap over the best single-modality model
  and the accuracy change with each modality removed; anchor: concat (plus the per-seed paired
  difference). The GMU's mean alpha per modality, clean vs the strongest corruption;
- unified vs separate towers: parameters and clean accuracy.

    .venv/bin/python benchmarks/multimodal_alignment.py --seeds 3 --align-steps 150 --fusion-steps 150
    .venv/bin/python benchmarks/multimodal_alignment.py --parts fusion --seeds 5 --fusion-steps 300 --fusion-audio-snr 0
    .venv/bin/python benchmarks/multimodal_alignment.py --parts fusion --fusion-modalities text,image,audio --fusion-audio-snr 0
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
    parser.add_argument("--parts", default="align,fusion", help="comma-separated: align, fusion, gate (the GMU gate probe: "
                        "tower gradients and alpha over training, seed 0)")
    parser.add_argument("--objectives", nargs="+", default=["contrastive"],
                        help="alignment objective sets to compare, e.g. contrastive contrastive,distill,missing; "
                             "each set beyond contrastive is anchored on the contrastive run of the same seeds")
    parser.add_argument("--fusion-audio-snr", type=float, default=-8.0,
                        help="extra white noise (dB SNR) on the fusion task's audio: at the data's own -4..10 dB the audio "
                             "alone is ~99%% accurate and a fusion model can ignore the image")
    parser.add_argument("--fusion-modalities", default="image,audio",
                        help="the fusion classifier's modalities: image,audio (default) or with text, e.g. text,image,audio "
                             "(text corrupted by token drop: caption words -> <unk>)")
    parser.add_argument("--fusion-aux-weight", type=float, default=0.0,
                        help="> 0: per-modality auxiliary heads with this loss weight on concat / sum / gmu (not unified: one trunk)")
    args = parser.parse_args()
    if args.seeds < 3:
        parser.error("--seeds: tiny-scale quality comparisons need >= 3 seeds")
    bad = sorted(set(args.fusion_modalities.split(",")) - {"image", "audio", "text"})
    if bad or not args.fusion_modalities:
        parser.error(f"--fusion-modalities: unknown {bad}; accepted: a comma list of image, audio, text")
    torch.set_num_threads(args.threads)

    from seekdeep.multimodal.align_data import WordTokenizer, caption_words, load_digits_aligned
    from seekdeep.multimodal.fusion import FusionConfig, build_image_audio_model, count_parameters
    from seekdeep.multimodal.robustness import Featurizer, FusionData, noise_curves, normalised_auc, removal_effects, train_fusion
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

    if "gate" in args.parts:
        gate_probe(args, train, test, tokenizer, featurize, mean, std, device, common)
    if "fusion" not in args.parts:
        return
    # -- fusion robustness
    from seekdeep.multimodal.fusion import corrupt_audio

    g = torch.Generator().manual_seed(1234)
    unk = tokenizer.unk_token_id
    data = FusionData(train.pixel_values, corrupt_audio(train.audio, args.fusion_audio_snr, g), train.labels, train.input_ids,
                      train.attention_mask, unk)
    held = FusionData(test.pixel_values, corrupt_audio(test.audio, args.fusion_audio_snr, g), test.labels, test.input_ids,
                      test.attention_mask, unk)
    modalities = tuple(m.strip() for m in args.fusion_modalities.split(",") if m.strip())
    common = {**common, "fusion_audio_snr_db": args.fusion_audio_snr, "modalities": list(modalities),
              "fusion_aux_weight": args.fusion_aux_weight}
    variants = {**{f: modalities for f in ("concat", "sum", "gmu", "unified")}, **{f"{m}_only": (m,) for m in modalities}}
    results: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    params = {}
    for seed in range(args.seeds):
        for variant, mods in variants.items():
            torch.manual_seed(seed)
            fusion = variant if variant in ("concat", "sum", "gmu", "unified") else "concat"
            aux = args.fusion_aux_weight if len(mods) > 1 and fusion != "unified" else 0.0
            cfg = FusionConfig(fusion=fusion, modalities=mods, modality_dropout=0.2 if len(mods) > 1 else 0.0, aux_weight=aux)
            model = build_image_audio_model(cfg, 16, tuple(train_mel.shape[1:]), mean, std, text_vocab_size=len(tokenizer))
            # inference parameters: the auxiliary heads only train
            params[variant] = count_parameters(model) - (count_parameters(model.aux) if getattr(model, "aux", None) is not None else 0)
            train_fusion(model, data, featurize, steps=args.fusion_steps, seed=seed)
            curves = noise_curves(model, held, featurize, seed=seed)
            r = results[variant]
            r.setdefault("clean", []).append(next(iter(curves.values()))[0]["accuracy"])
            for name, curve in curves.items():
                r.setdefault(f"auc_{name}", []).append(normalised_auc(curve))
                r.setdefault(f"worst_{name}", []).append(curve[-1]["accuracy"])  # accuracy at the strongest corruption
                for m in mods:  # the GMU's mean weight on each modality, clean vs the strongest corruption
                    if f"alpha_{m}" in curve[0]:
                        r.setdefault(f"alpha_{m}_clean/{name}", []).append(curve[0][f"alpha_{m}"])
                        r.setdefault(f"alpha_{m}_worst/{name}", []).append(curve[-1][f"alpha_{m}"])
            if len(mods) > 1:  # accuracy change with each modality removed: ~0 means the model ignores it
                for k, v in removal_effects(model, held, featurize).items():
                    if k != "clean":
                        r.setdefault(k, []).append(v)
            print(f"# fusion seed {seed} {variant} clean {r['clean'][-1]:.3f} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    best_single = [max(c) for c in zip(*(results[f"{m}_only"]["clean"] for m in modalities))]
    concat = results["concat"]
    for variant in variants:
        r = results[variant]
        clean_mean, clean_std = stats(r["clean"])
        gap = stats([c - b for c, b in zip(r["clean"], best_single)])
        emit(f"fusion/{variant}/clean_accuracy", clean_mean, "fraction", stats(concat["clean"])[0], "concat", device, std=clean_std,
             gap_over_best_single_mean=gap[0], gap_over_best_single_std=gap[1], parameters=params[variant], **common)
        for key in sorted(k for k in r if k.startswith(("auc_", "worst_"))):
            if key not in concat:
                continue
            m, s = stats(r[key])
            cm, cs = stats(concat[key])
            # paired over seeds (same data order, same init seed): the spread of the difference, not of each side
            diff = stats([a - b for a, b in zip(r[key], concat[key])])
            emit(f"fusion/{variant}/{key}", m, "normalised AUC" if key.startswith("auc_") else "accuracy", cm, "concat", device, std=s, anchor_std=cs, clean_accuracy=clean_mean,
                 gap_over_best_single=gap[0], paired_diff_mean=diff[0], paired_diff_std=diff[1],
                 relative_gain=(m / cm - 1) if cm else None, values=[round(v, 4) for v in r[key]],
                 anchor_values=[round(v, 4) for v in concat[key]], **common)
        for key in sorted(k for k in r if k.startswith("without_")):
            m, s = stats(r[key])
            emit(f"fusion/{variant}/{key}", m, "accuracy change", 0.0, "with every modality", device, std=s, clean_accuracy=clean_mean,
                 values=[round(v, 4) for v in r[key]], **common)
        for key in sorted(k for k in r if k.startswith("alpha_") and "_worst/" in k):
            clean_key = key.replace("worst", "clean")
            m, s = stats(r[key])
            cm, cs = stats(r[clean_key])
            emit(f"fusion/{variant}/{key}", m, f"mean alpha ({key.split('_')[1]})", cm, "clean input, same model", device, std=s, anchor_std=cs, **common)
    emit("fusion/unified_vs_separate/parameters", params["unified"], "parameters", params["gmu"], "separate towers + gmu head", device,
         unified_clean=stats(results["unified"]["clean"])[0], separate_clean=stats(results["gmu"]["clean"])[0], **common)
    print(f"# total {time.time() - started:.0f} s", file=sys.stderr)


PROBE_STEPS = (0, 10, 25, 50, 100, 200, 299)


def gate_probe(args, train, test, tokenizer, featurize, mean, std, device, common) -> None:
    """Why a GMU can ignore a modality: the training loop of ``train_fusion`` (same augmentation,
    modality dropout, seed 0) for gmu and concat over ``--fusion-modalities``, logging at a few
    steps each tower's gradient norm, the GMU's mean alpha of the first modality (clean, with every
    caption word dropped, with the first modality removed) and the test accuracy in those cases.
    One line per (fusion, step); not a seed comparison."""
    from seekdeep.multimodal.fusion import FusionConfig, build_image_audio_model, corrupt_text, fusion_loss, modality_dropout
    from seekdeep.multimodal.robustness import augment, augment_with_text

    mods = tuple(m.strip() for m in args.fusion_modalities.split(","))
    first = mods[0]
    featurized = {"image": test.pixel_values, "audio": featurize(test.audio), "text": test.input_ids}
    dropped = corrupt_text(test.input_ids, test.attention_mask, 1.0, tokenizer.unk_token_id)
    for fusion in ("gmu", "concat"):
        torch.manual_seed(0)
        model = build_image_audio_model(FusionConfig(fusion=fusion, modalities=mods, aux_weight=args.fusion_aux_weight), 16,
                                        tuple(featurized["audio"].shape[1:]), mean, std, text_vocab_size=len(tokenizer))
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        for step in range(args.fusion_steps):
            record = {}
            if step in PROBE_STEPS:
                model.eval()
                with torch.no_grad():
                    cases = {"clean": {m: featurized[m] for m in mods}, f"without_{first}": {m: featurized[m] for m in mods[1:]}}
                    if "text" in mods:
                        cases["every_word_dropped"] = {**cases["clean"], "text": dropped}
                    for name, inputs in cases.items():
                        out = model(inputs)
                        record[f"accuracy_{name}"] = float((out.logits.argmax(-1) == test.labels).float().mean())
                        if out.alpha is not None:
                            record[f"alpha_{first}_{name}"] = float(out.alpha[:, 0].mean())
                model.train()
            idx = torch.randint(len(train), (64,), generator=g)
            if "text" in mods:
                pixels, audio, ids = augment_with_text(train.pixel_values[idx], train.audio[idx], train.input_ids[idx],
                                                       train.attention_mask[idx], tokenizer.unk_token_id, g, 0.5, mods)
            else:
                (pixels, audio), ids = augment(train.pixel_values[idx], train.audio[idx], g, 0.5), None
            inputs = {"image": pixels, "audio": featurize(audio), "text": ids}
            present = modality_dropout(64, mods, 0.2, g)
            out = model({m: inputs[m] for m in mods}, present)
            loss = fusion_loss(out, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if record:
                grads = {f"grad_norm_{m}_tower": float(sum(p.grad.norm() ** 2 for p in model.towers[m].parameters() if p.grad is not None) ** 0.5)
                         for m in mods}
                emit(f"gate_probe/{fusion}/step{step}", record["accuracy_clean"], "accuracy", None, "none (a trace)", device,
                     loss=loss.item(), **grads, **record, **common)
            opt.step()


if __name__ == "__main__":
    main()
