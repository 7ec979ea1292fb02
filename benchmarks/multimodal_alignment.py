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
    .venv/bin/python benchmarks/multimodal_alignment.py --parts fusion --seeds 5 --fusion-steps 1000 --fusion-schedule cosine \
        --fusion-warmup 50 --fusion-audio-snr 0 --fusion-eval-repeats 3 --fusion-beyond --bootstrap 500 --fusion-workers 2
    .venv/bin/python benchmarks/multimodal_alignment.py --parts align --objectives contrastive contrastive,distill,missing

The milder-augmentation protocol (fixed before its decisive run): every variant trained with the
same augmentation, modality dropout 0.2 with the learned missing embedding plus corruption of one
modality in half the samples at image Gaussian std U(0, 1), occlusion U(0, 0.25), audio SNR
U(10, 30) dB; tested at the issue's levels (image std 0.5-4, occlusion 0.25-1 (1: blank), audio
20 / 10 / 0 / -10 dB) and past them (std 8 / 16, -20 / -30 dB), so std 2-16, occlusion 0.5-1
and audio 0 dB and below are unseen by every variant (auc_unseen_*):

    .venv/bin/python benchmarks/multimodal_alignment.py --parts fusion --seeds 8 --fusion-steps 1200 --fusion-schedule cosine \
        --fusion-warmup 50 --fusion-audio-snr 0 --fusion-eval-repeats 3 --fusion-beyond --bootstrap 500 --fusion-variants concat,gmu \
        --fusion-train-image-std 1 --fusion-train-occlusion 0.25 --fusion-train-audio-snr 10
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
    parser.add_argument("--fusion-schedule", default="constant", choices=("constant", "cosine"),
                        help="the fusion runs' learning rate: constant 3e-3, or warmup + cosine decay to 0.1x (a stable last iterate)")
    parser.add_argument("--fusion-warmup", type=int, default=0, help="warmup steps of --fusion-schedule cosine")
    parser.add_argument("--fusion-eval-repeats", type=int, default=1,
                        help="corruption draws per test level, averaged (the first is the single-draw one)")
    parser.add_argument("--fusion-beyond", action="store_true",
                        help="also image noise std 8, 16 and audio -20, -30 dB: past the training augmentation's range, "
                             "reported as separate auc_beyond_* lines (mean accuracy there / clean)")
    parser.add_argument("--fusion-workers", type=int, default=1,
                        help="processes for the (seed, variant) fusion runs (each --threads); the numbers do not depend on it")
    parser.add_argument("--fusion-variants", default="concat,sum,gmu,unified",
                        help="fusion heads to train (concat, the anchor, always; the single-modality models always)")
    parser.add_argument("--fusion-augment-p", type=float, default=0.5,
                        help="share of training samples with one modality corrupted (0: no corruption augmentation, an ablation)")
    parser.add_argument("--fusion-witness-dropout", type=float, default=0.0,
                        help="> 0 (needs text in --fusion-modalities): the caption is also removed from this share of training samples, "
                             "for every fusion variant (FusionConfig.witness_dropout): the fix for the GMU gate collapsing onto the text")
    parser.add_argument("--fusion-train-image-std", type=float, default=4.0,
                        help="training augmentation: image Gaussian std drawn from U(0, this) (4: the whole test range)")
    parser.add_argument("--fusion-train-occlusion", type=float, default=1.0,
                        help="training augmentation: occluded share of the image drawn from U(0, this) (1: the whole test range)")
    parser.add_argument("--fusion-train-audio-snr", type=float, default=-10.0,
                        help="training augmentation: audio SNR drawn from U(this, 30) dB (-10: the whole test range). A milder range "
                             "leaves the severe test levels unseen by every variant; they are reported as auc_unseen_* "
                             "(mean accuracy at the test levels past the training range, beyond ones included, / clean)")
    parser.add_argument("--fusion-raw", default="",
                        help="append each finished (seed, variant) run's numbers (curves included) to this JSONL file as it "
                             "finishes: a long run cut short still leaves its finished seeds")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="> 0: resample the test set this many times per seed for the test-sample std of each paired area difference")
    args = parser.parse_args()
    if not (0 <= args.fusion_warmup < max(args.fusion_steps, 1) and 1 <= args.fusion_eval_repeats <= 100 and 1 <= args.fusion_workers <= 16
            and 0 <= args.bootstrap <= 100_000):
        parser.error("--fusion-warmup in [0, --fusion-steps), --fusion-eval-repeats in [1, 100], --fusion-workers in [1, 16], "
                     "--bootstrap in [0, 100000]")
    if not (0 <= args.fusion_train_image_std <= 100 and 0 <= args.fusion_train_occlusion <= 1 and -60 <= args.fusion_train_audio_snr <= 30):
        parser.error("--fusion-train-image-std in [0, 100], --fusion-train-occlusion in [0, 1], --fusion-train-audio-snr in [-60, 30]")
    bad = sorted(set(args.fusion_variants.split(",")) - {"concat", "sum", "gmu", "unified"})
    if not 0 <= args.fusion_witness_dropout < 1 or (args.fusion_witness_dropout > 0 and "text" not in args.fusion_modalities.split(",")):
        parser.error("--fusion-witness-dropout: in [0, 1), and the witness is the text: needs text in --fusion-modalities")
    if bad or not 0 <= args.fusion_augment_p <= 1:
        parser.error(f"--fusion-variants: unknown {bad}; accepted: concat, sum, gmu, unified; --fusion-augment-p in [0, 1]")
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
    fusion_part(args, train, test, tokenizer, featurize, train_mel, mean, std, device, common, started)


# one (seed, variant) fusion run; module-level so forked workers (--fusion-workers) find the data
_FUSION: dict = {}
FUSIONS = ("concat", "sum", "gmu", "unified")


def fusion_job(job: tuple[int, str]) -> tuple[int, str, dict]:
    from seekdeep.multimodal.fusion import FusionConfig, build_image_audio_model, count_parameters
    from seekdeep.multimodal.robustness import beyond_area, noise_curves, normalised_auc, removal_effects, train_fusion

    seed, variant = job
    ctx, args = _FUSION, _FUSION["args"]
    ranges = ctx["ranges"]
    torch.set_num_threads(args.threads)
    mods = ctx["variants"][variant]
    torch.manual_seed(seed)
    fusion = variant if variant in FUSIONS else "concat"
    aux = args.fusion_aux_weight if len(mods) > 1 and fusion != "unified" else 0.0
    witness = args.fusion_witness_dropout if len(mods) > 1 else 0.0
    cfg = FusionConfig(fusion=fusion, modalities=mods, modality_dropout=0.2 if len(mods) > 1 else 0.0, aux_weight=aux,
                       witness="text" if witness else "", witness_dropout=witness)
    model = build_image_audio_model(cfg, 16, ctx["mel_shape"], ctx["mean"], ctx["std"], text_vocab_size=ctx["vocab"])
    t0 = time.time()
    losses = train_fusion(model, ctx["data"], ctx["featurize"], steps=args.fusion_steps, seed=seed, schedule=args.fusion_schedule,
                          warmup=args.fusion_warmup, augment_p=args.fusion_augment_p, augment_range=ranges)
    curves = noise_curves(model, ctx["held"], ctx["featurize"], seed=seed, repeats=args.fusion_eval_repeats, beyond=args.fusion_beyond,
                          per_sample=True)
    r = {"clean": next(iter(curves.values()))[0]["accuracy"], "train_loss_last50": float(np.mean(losses[-50:])),
         # inference parameters: the auxiliary heads only train
         "params": count_parameters(model) - (count_parameters(model.aux) if getattr(model, "aux", None) is not None else 0),
         "levels": {}, "correct": {}}
    for name, curve in curves.items():
        r[f"auc_{name}"] = normalised_auc(curve)
        inside = [p for p in curve if not p.get("beyond")]
        r[f"worst_{name}"] = inside[-1]["accuracy"]  # accuracy at the strongest in-range corruption
        if beyond_area(curve) is not None:
            r[f"auc_beyond_{name}"] = beyond_area(curve)
        if ctx["mild"]:  # the test levels no training draw reached (beyond ones included), for every variant alike
            for p in curve:
                p["unseen"] = ranges.unseen(name, p["level"])
            unseen = [p["accuracy"] for p in curve if p["unseen"]]
            if unseen and curve[0]["accuracy"] > 0:
                r[f"auc_unseen_{name}"] = float(np.mean(unseen) / curve[0]["accuracy"])
        r["levels"][name] = [{k: v for k, v in p.items() if k != "correct"} for p in curve]
        r["correct"][name] = torch.stack([p["correct"] for p in curve]).numpy()  # (levels, N): for the bootstrap
        for m in mods:  # the GMU's mean weight on each modality, clean vs the strongest in-range corruption
            if f"alpha_{m}" in curve[0]:
                r[f"alpha_{m}_clean/{name}"] = curve[0][f"alpha_{m}"]
                r[f"alpha_{m}_worst/{name}"] = inside[-1][f"alpha_{m}"]
    if len(mods) > 1:  # accuracy change with each modality removed: ~0 means the model ignores it
        r.update({k: v for k, v in removal_effects(model, ctx["held"], ctx["featurize"]).items() if k != "clean"})
    if fusion in ("concat", "sum", "gmu") and len(mods) > 1:
        add_logit_shares(model, ctx["held"], ctx["featurize"], seed, r["levels"])
    r["seconds"] = time.time() - t0
    return seed, variant, r


def add_logit_shares(model, held, featurize, seed: int, levels: dict[str, list[dict]]) -> None:
    """Each modality's share of the class-discriminative logit mass (robustness.logit_shares) at
    every image-noise / occlusion / audio-SNR level: how much a head without a gate (concat, sum)
    still down-weights the corrupted modality, next to the GMU's alpha. Adds ``share_<m>`` to each point."""
    from seekdeep.multimodal.fusion import corrupt_audio, corrupt_image, corrupt_text
    from seekdeep.multimodal.robustness import logit_contributions, logit_shares

    g = torch.Generator().manual_seed(20_000 + seed)
    mods = model.config.modalities
    for name, curve in levels.items():
        for point in curve:
            lv = point["level"]
            x = {"image": held.pixel_values, "audio": held.audio, "text": held.input_ids}
            if name.startswith("image_") and lv > 0:
                x["image"] = corrupt_image(x["image"], name.removeprefix("image_"), lv, g)
            elif name == "audio_snr":
                x["audio"] = corrupt_audio(x["audio"], lv, g)
            elif name == "text_drop" and lv > 0:
                x["text"] = corrupt_text(x["text"], held.attention_mask, lv, held.unk_token_id, g)
            x["audio"] = featurize(x["audio"])
            shares = logit_shares(logit_contributions(model, {m: x[m] for m in mods}))
            point.update({f"share_{m}": v for m, v in shares.items()})


def bootstrap_paired_std(a: np.ndarray, b: np.ndarray, n: int, seed: int, beyond: np.ndarray | None = None) -> tuple[float, float]:
    """The test-sample part of a paired area difference: resample the test set (with replacement)
    ``n`` times and recompute area(a) - area(b) from per-sample correctness ((levels, N) each); the
    std of that difference (evaluation noise at this test-set size) for the in-range area and,
    with ``beyond`` (a (levels,) bool mask), the beyond-range one."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(a.shape[1], size=(n, a.shape[1]))
    inside = ~beyond if beyond is not None else np.ones(a.shape[0], bool)

    def areas(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acc = c[:, idx].mean(-1).T  # (n, levels)
        clean = np.maximum(acc[:, :1], 1e-9)
        ins = acc[:, inside]
        auc = np.trapezoid(ins, dx=1.0 / (ins.shape[1] - 1), axis=1) / clean[:, 0]
        out = acc[:, ~inside].mean(1) / clean[:, 0] if (~inside).any() else np.zeros(n)
        return auc, out

    (ia, oa), (ib, ob) = areas(a), areas(b)
    return float((ia - ib).std(ddof=1)), float((oa - ob).std(ddof=1))


def fusion_part(args, train, test, tokenizer, featurize, train_mel, mean, std, device, common, started) -> None:
    from seekdeep.multimodal.fusion import corrupt_audio
    from seekdeep.multimodal.robustness import FusionData

    g = torch.Generator().manual_seed(1234)
    unk = tokenizer.unk_token_id
    data = FusionData(train.pixel_values, corrupt_audio(train.audio, args.fusion_audio_snr, g), train.labels, train.input_ids,
                      train.attention_mask, unk)
    held = FusionData(test.pixel_values, corrupt_audio(test.audio, args.fusion_audio_snr, g), test.labels, test.input_ids,
                      test.attention_mask, unk)
    modalities = tuple(m.strip() for m in args.fusion_modalities.split(",") if m.strip())
    common = {**common, "fusion_audio_snr_db": args.fusion_audio_snr, "modalities": list(modalities),
              "fusion_aux_weight": args.fusion_aux_weight, "fusion_steps": args.fusion_steps, "fusion_schedule": args.fusion_schedule,
              "fusion_warmup": args.fusion_warmup, "eval_repeats": args.fusion_eval_repeats, "test_samples": len(held),
              "fusion_augment_p": args.fusion_augment_p, "fusion_witness_dropout": args.fusion_witness_dropout}
    chosen = {"concat", *args.fusion_variants.split(",")}
    variants = {**{f: modalities for f in FUSIONS if f in chosen}, **{f"{m}_only": (m,) for m in modalities}}
    from seekdeep.multimodal.robustness import FULL_RANGE, AugmentRange

    ranges = AugmentRange(image_std=args.fusion_train_image_std, occlusion=args.fusion_train_occlusion, audio_snr_db=args.fusion_train_audio_snr)
    mild = ranges != FULL_RANGE
    if mild:  # only then: the default flags keep the old result lines byte for byte
        common["fusion_train_range"] = {"image_std_max": ranges.image_std, "occlusion_max": ranges.occlusion,
                                        "audio_snr_min_db": ranges.audio_snr_db}
    _FUSION.update(args=args, variants=variants, ranges=ranges, mild=mild, data=data, held=held, featurize=featurize, mel_shape=tuple(train_mel.shape[1:]),
                   mean=mean, std=std, vocab=len(tokenizer))
    jobs = [(seed, v) for seed in range(args.seeds) for v in variants]
    results: dict[str, dict[str, list]] = {v: {} for v in variants}
    per_seed: dict[tuple[int, str], dict] = {}
    if args.fusion_workers > 1:  # forked: the workers inherit _FUSION; every job seeds itself, so the split changes no number
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(args.fusion_workers)
        done = pool.imap_unordered(fusion_job, jobs)
    else:
        pool, done = None, map(fusion_job, jobs)
    for seed, variant, r in done:
        per_seed[(seed, variant)] = r
        if args.fusion_raw:
            import json

            with open(args.fusion_raw, "a") as f:  # a log, not a result: appended line by line
                f.write(json.dumps({"seed": seed, "variant": variant, **{k: v for k, v in r.items() if k != "correct"}}) + "\n")
        print(f"# fusion seed {seed} {variant} clean {r['clean']:.3f} train loss {r['train_loss_last50']:.3f} "
              f"({r['seconds']:.0f} s; {time.time() - started:.0f} s total)", file=sys.stderr, flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    for (seed, variant), r in sorted(per_seed.items()):  # seed order, whatever order the workers finished in
        for k, v in r.items():
            if isinstance(v, (int, float)):
                results[variant].setdefault(k, []).append(v)
    best_single = [max(c) for c in zip(*(results[f"{m}_only"]["clean"] for m in modalities))]
    concat = results["concat"]
    for variant in variants:
        r = results[variant]
        clean_mean, clean_std = stats(r["clean"])
        gap = stats([c - b for c, b in zip(r["clean"], best_single)])
        emit(f"fusion/{variant}/clean_accuracy", clean_mean, "fraction", stats(concat["clean"])[0], "concat", device, std=clean_std,
             gap_over_best_single_mean=gap[0], gap_over_best_single_std=gap[1], parameters=r["params"][0],
             train_loss_last50=stats(r["train_loss_last50"])[0], values=[round(v, 4) for v in r["clean"]], **common)
        for key in sorted(k for k in r if k.startswith(("auc_", "worst_"))):
            if key not in concat:
                continue
            m, s = stats(r[key])
            cm, cs = stats(concat[key])
            # paired over seeds (same data order, same init seed): the spread of the difference, not of each side
            diffs = [a - b for a, b in zip(r[key], concat[key])]
            diff = stats(diffs)
            extra = {}
            if key.startswith("auc_") and args.bootstrap and variant != "concat":
                name = key.removeprefix("auc_beyond_").removeprefix("auc_unseen_").removeprefix("auc_")
                # the "out" part of the bootstrap: the beyond points, or for auc_unseen_* every unseen one
                flag = "unseen" if key.startswith("auc_unseen_") else "beyond"
                boot = [bootstrap_paired_std(per_seed[(s_, variant)]["correct"][name], per_seed[(s_, "concat")]["correct"][name],
                                             args.bootstrap, s_, np.array([bool(p.get(flag)) for p in per_seed[(s_, variant)]["levels"][name]]))
                        for s_ in range(args.seeds)]
                part = 0 if key == f"auc_{name}" else 1  # the in-range area, or the beyond / unseen mean
                extra["paired_diff_test_sample_std"] = float(np.mean([b[part] for b in boot]))
            t = diff[0] / (diff[1] / np.sqrt(len(diffs))) if diff[1] > 0 else None
            emit(f"fusion/{variant}/{key}", m, "normalised AUC" if key.startswith("auc_") else "accuracy", cm, "concat", device, std=s,
                 anchor_std=cs, clean_accuracy=clean_mean, gap_over_best_single=gap[0], paired_diff_mean=diff[0], paired_diff_std=diff[1],
                 paired_diffs=[round(d, 4) for d in diffs], ahead_in=sum(d > 0 for d in diffs), paired_t=t,
                 relative_gain=(m / cm - 1) if cm else None, values=[round(v, 4) for v in r[key]],
                 anchor_values=[round(v, 4) for v in concat[key]], **extra, **common)
        for key in sorted(k for k in r if k.startswith("without_")):
            m, s = stats(r[key])
            emit(f"fusion/{variant}/{key}", m, "accuracy change", 0.0, "with every modality", device, std=s, clean_accuracy=clean_mean,
                 values=[round(v, 4) for v in r[key]], **common)
        for key in sorted(k for k in r if k.startswith("alpha_") and "_worst/" in k):
            clean_key = key.replace("worst", "clean")
            m, s = stats(r[key])
            cm, cs = stats(r[clean_key])
            emit(f"fusion/{variant}/{key}", m, f"mean alpha ({key.split('_')[1]})", cm, "clean input, same model", device, std=s, anchor_std=cs, **common)
        # the whole curve: accuracy (and the GMU's alpha) per level, mean ± std over seeds
        for name, curve in per_seed[(0, variant)]["levels"].items():
            for i, point in enumerate(curve):
                acc = [per_seed[(s_, variant)]["levels"][name][i]["accuracy"] for s_ in range(args.seeds)]
                alphas = {k: stats([per_seed[(s_, variant)]["levels"][name][i][k] for s_ in range(args.seeds)])
                          for k in point if k.startswith(("alpha_", "share_"))}
                anchor = stats([per_seed[(s_, "concat")]["levels"][name][i]["accuracy"] for s_ in range(args.seeds)]) \
                    if name in per_seed[(0, "concat")]["levels"] else (None, None)
                emit(f"fusion/{variant}/curve/{name}@{point['level']}", stats(acc)[0], "accuracy", anchor[0], "concat", device,
                     std=stats(acc)[1], anchor_std=anchor[1], beyond_training_range=bool(point.get("beyond")),
                     **({"unseen_in_training": point["unseen"]} if "unseen" in point else {}),
                     **{f"{k}_mean": round(v[0], 4) for k, v in alphas.items()}, **{f"{k}_std": round(v[1], 4) for k, v in alphas.items()},
                     values=[round(a, 4) for a in acc], **common)
    if "unified" in variants and "gmu" in variants:
        emit("fusion/unified_vs_separate/parameters", results["unified"]["params"][0], "parameters", results["gmu"]["params"][0],
             "separate towers + gmu head", device, unified_clean=stats(results["unified"]["clean"])[0],
             separate_clean=stats(results["gmu"]["clean"])[0], **common)
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
