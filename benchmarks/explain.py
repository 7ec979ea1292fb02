"""Faithfulness and cost of seekdeep.explain's attributions on a task whose answer is known.

The task: windows of real standard-library code (about 20, 50 and 160 tokens) where the label
is 1 ("month") exactly when the keyword " month" is planted at a random word boundary. Half the
label-0 ("other") inputs carry a distractor keyword, " week", planted the same way, the other half
none; a decoy, " zero", is planted in every input of both classes. So "a word was inserted" and
"this word is unusual here" are no shortcuts, and the keyword is both needed and enough: deleting
it from a label-1 input makes it a label-0 input of the training distribution. (With two
symmetric keywords and no keyword-free inputs, a model may learn "week -> 0, else 1", and then
deleting " month" changes nothing — measured on an earlier seed: log-odds 3.8 with and without
it — so no attribution could be scored against it.) Snippets that already hold any of the three
words are skipped.

Per seed (default 3 seeds; data, model initialisation and the random baseline all follow it):

1. the default model layout (``seekdeep.cli.make_default_model``: tokenizer trained on the
   standard library, tiny llama) with dense attention is fine-tuned as a sequence classifier with
   ``seekdeep finetune --task classification --method full``; the run is refused unless its
   held-out accuracy is >= 95%. (With ``dsa`` the recipe keeps the base's indexer as it is —
   random here — and the classifier stalled at ~84%: a last token whose top-64 keys miss the
   keyword cannot see it. That is what the selection view of part 5 measures.)
2. on fresh test inputs (not trained on) of each length, every method explains the predicted
   class's log-odds: ``shap`` (ours: SHAPExplainer, default settings), ``shap_owen500`` (ours
   with Owen values cut at shap's 500 evaluations, the default before fixed_context="auto"),
   ``shap_fc1`` (ours with ``fixed_context=1`` at every length: differs from the default only
   where "auto" picks Owen values, ~20 tokens), ``shap_default`` (shap's
   own Partition explainer at its defaults — ``shap.Explainer(f, shap.maskers.Text(tokenizer))``
   with f(list of strings) running the model, max_evals 500, batch size 5 — the anchor for
   time), ``ig``, ``gradxinput``, ``ablation``, ``attention``, ``rollout`` and ``random``;
3. scored on correctly classified inputs: top-1 / top-3 hit rate of the planted (label-deciding)
   keyword; the deletion curve (units removed most-important first, probability of the
   predicted class after each removal, area under it over the fraction removed; lower is
   better); ERASER comprehensiveness (drop of that probability when the top 5/10/20/50% units
   are removed, mean; higher is better) and sufficiency (drop when only they are kept; lower is
   better); seconds, model calls, model rows and real (unpadded) tokens per explanation — the
   time of every method on an input is taken in turn, so load hits all alike; as a diagnosis of
   the misses (no goal is scored on it): whether deleting the keyword alone flips the
   prediction (``keyword_needed_share``) and the top-1 rate on those inputs only;
4. the model-randomisation check: the same inputs explained (our default method) on a
   re-initialised model — the hit rate must fall to chance (mean 1 / number of units);
5. the dsa selection view on the default trained model (``runs/train/final`` from ``seekdeep
   train``, or ``--dsa-model``, else ``seekdeep train --steps DSA_STEPS`` is run into
   ``OUT/dsa-train``): the dense attention mass covered by the keys each layer kept, per layer
   and input length, on the same test inputs.

Output: one JSON line per result (mean over seeds, ``spread`` = standard deviation, ``seeds``),
anchors measured in the same run. Seconds are wall time and process CPU time (one thread: the
CPU time an explanation needs hardly moves with the machine's load). Usage:
    python benchmarks/explain.py [--seeds 3] [--n 30] [--threads 1] [--out runs/bench-explain]
    python benchmarks/explain.py --first-seed 1 --seeds 2   # one seed per process, then
    python benchmarks/explain.py --from-raw --seeds 3       # the report over all seeds
    python benchmarks/explain.py --batch-cost               # CPU ms per row vs rows per call
    python benchmarks/explain.py --dsa-stall --n 24         # why a dsa classifier stalls at ~84%
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

LABEL_WORDS = {1: " month", 0: " week"}  # 0: the distractor
LABEL_NAMES = {1: "month", 0: "other"}  # the label names in the training JSONL
NO_KEYWORD_SHARE = 0.5  # of label-0 training inputs: decoy only, no distractor
TASK = "month-vs-other-v2"  # written next to each trained seed; a model of another task is retrained
DECOY = " zero"
LENGTHS = (20, 50, 160)
METHODS = ("shap", "shap_owen500", "shap_fc1", "shap_default", "ig", "gradxinput", "ablation", "attention", "rollout", "random")
FRACTIONS = (0.05, 0.1, 0.2, 0.5)
#: attributions are scored on label-1 inputs, whose keyword is the evidence; label-0 inputs have
#: none (with the distractor deleted they are still label 0). evidence_label checks that a trained
#: model agrees: it predicts label 0 for keyword-free code.
SCORED_LABEL = 1


def evidence_label(model, tokenizer, files, rng: random.Random, count: int = 24) -> int:
    """The label (key of LABEL_NAMES) that the model does not predict for keyword-free inputs:
    ``count`` test-like snippets with the decoy planted and no keyword, majority vote."""
    from seekdeep.explain.target import Scorer

    scorer = Scorer(model, tokenizer)
    votes = []
    for length in LENGTHS:
        for ex in make_examples(tokenizer, length, count // len(LENGTHS), rng, files, labels=(1,)):
            a, b = ex["planted"]
            ids = tokenizer.encode(ex["text"][:a] + ex["text"][b:])
            votes.append(model.id2label[int(scorer.logits([ids])[0].argmax())])
    default = max(set(votes), key=votes.count)
    return next(k for k, name in LABEL_NAMES.items() if name != default)


# ----------------------------------------------------------------------------- the task


def _plant(text: str, words: list[str], rng: random.Random) -> tuple[str, dict[str, tuple[int, int]]]:
    """Insert each word (leading space included) after a random word end; returns the new text
    and each word's character span in it."""
    spans: dict[str, tuple[int, int]] = {}
    for word in words:
        ends = [i + 1 for i in range(len(text) - 1) if (text[i].isalnum() or text[i] == "_")
                and not (text[i + 1].isalnum() or text[i + 1] == "_")]
        taken = [s for s in spans.values()]
        ends = [e for e in ends if all(not (a <= e <= b) for a, b in taken)]
        at = rng.choice(ends)
        text = text[:at] + word + text[at:]
        spans = {w: ((a + len(word), b + len(word)) if a >= at else (a, b)) for w, (a, b) in spans.items()}
        spans[word] = (at, at + len(word))
    return text, spans


def make_examples(tokenizer, length: int, count: int, rng: random.Random, files: list[Path],
                  labels: tuple[int, ...] = (0, 1), no_keyword_share: float = NO_KEYWORD_SHARE) -> list[dict]:
    """``count`` labelled inputs of about ``length`` tokens (see the module docstring);
    ``planted`` is the keyword's character span (None for a label-0 input without one)."""
    banned = [w.strip() for w in (*LABEL_WORDS.values(), DECOY)]
    planted_tokens = sum(len(tokenizer.encode(w)) for w in (LABEL_WORDS[0], DECOY))
    out = []
    while len(out) < count:
        source = files[rng.randrange(len(files))].read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(source)
        if len(ids) < length * 2:
            continue
        start = rng.randrange(0, len(ids) - length)
        snippet = tokenizer.decode(ids[start:start + length - planted_tokens]).strip()
        if any(b in snippet for b in banned) or len(snippet) < 10 or "\ufffd" in snippet:
            continue
        label = labels[rng.randrange(len(labels))]
        keyword = label == 1 or rng.random() >= no_keyword_share
        order = [LABEL_WORDS[label], DECOY] if keyword else [DECOY]
        rng.shuffle(order)
        try:
            text, spans = _plant(snippet, order, rng)
        except IndexError:  # no word end to plant at
            continue
        out.append({"text": text, "label": label, "planted": spans.get(LABEL_WORDS[label]), "decoy": spans[DECOY],
                    "length": length})
    return out


# ----------------------------------------------------------------------------- the classifier


def train_classifier(seed: int, base_dir: Path, tokenizer, out: Path, n_train: int, steps: int, files,
                     min_accuracy: float = 0.95) -> tuple[Path, dict]:
    """Fine-tune the base as a classifier with the recipe; refuse a model under 95% held-out accuracy."""
    from seekdeep.recipes.finetune import FinetuneConfig, finetune

    final = out / f"seed{seed}" / "final"
    done = out / f"seed{seed}" / "summary.json"
    task = out / f"seed{seed}-task.json"
    if done.is_file() and task.is_file():  # a finished run of the same task and settings is reused
        summary = json.loads(done.read_text())
        same = summary["config"]["steps"] == steps and summary.get("train_examples", 0) + summary.get(
            "heldout_examples", 0) == n_train // len(LENGTHS) * len(LENGTHS) and json.loads(task.read_text()) == TASK
        if same and (final / "config.json").is_file() and summary["accuracy_after"] >= min_accuracy:
            return final, summary
    rng = random.Random(1000 + seed)
    examples = [e for length in LENGTHS for e in make_examples(tokenizer, length, n_train // len(LENGTHS), rng, files)]
    rng.shuffle(examples)
    data = out / f"seed{seed}-train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": e["text"], "label": LABEL_NAMES[e["label"]]}) + "\n"
                            for e in examples))
    summary = finetune(FinetuneConfig(task="classification", base=str(base_dir), data=str(data), method="full",
                                      steps=steps, lr=3e-3, batch_size=16, seq_len=256, warmup_steps=10,
                                      eval_interval=steps, checkpoint_interval=steps, keep_last=1,
                                      output_dir=str(out / f"seed{seed}"), overwrite=True, progress=False, seed=seed))
    if summary["accuracy_after"] < min_accuracy:
        raise SystemExit(f"seed {seed}: held-out accuracy {summary['accuracy_after']:.3f} < {min_accuracy} after {steps} steps; "
                         "raise --steps (attributions are only scored on a model that solved the task)")
    task.write_text(json.dumps(TASK))
    return Path(summary["model_dir"]), summary


# ----------------------------------------------------------------------------- attributions


class ShapDefault:
    """shap's own Partition explainer at its defaults on the same model and output: f takes the
    masked strings shap builds (mask token '...', re-tokenised), max_evals 500, batch size 5."""

    def __init__(self, model, tokenizer):
        import shap

        self.model, self.tokenizer = model, tokenizer
        self.masker = shap.maskers.Text(tokenizer)
        self.calls = self.rows = self.tokens = 0

    def explain(self, text: str, target: int):
        import shap

        def f(strings):
            strings = [s if s.strip() else self.tokenizer.decode([self.tokenizer.pad_token_id]) for s in strings]
            enc = self.tokenizer(list(strings), padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            self.calls += 1
            self.rows += len(strings)
            self.tokens += int(enc["attention_mask"].sum())
            return (logits[:, target] - logits[:, 1 - target]).numpy()

        exp = shap.Explainer(f, self.masker, silent=True)([text])
        enc = self.tokenizer.backend_tokenizer.encode(text)
        return np.asarray(exp.values[0], dtype=float), list(enc.offsets)


def _to_units(token_values, offsets, units) -> np.ndarray:
    """Sum per-token values into our units by character position."""
    starts = [a for a, _ in units.char_spans]
    out = np.zeros(len(units))
    for value, (a, _) in zip(token_values, offsets):
        u = max(i for i, s in enumerate(starts) if s <= a) if a >= starts[0] else 0
        out[u] += value
    return out


def _unit_of_span(units, span) -> int:
    a, b = span
    for u, (s, e) in enumerate(units.char_spans):
        if s <= a < e or (s < b <= e):
            return u
    raise ValueError(f"span {span} is in no unit")


def faithfulness(scorer, prepared, values: np.ndarray) -> dict:
    """Deletion-curve AUC and ERASER comprehensiveness / sufficiency of an ordering by ``values``."""
    m = len(prepared.units)
    order = list(np.argsort(-values, kind="stable"))
    points = sorted({round(x) for x in np.linspace(0, m, min(m, 20) + 1)})
    rows = [np.ones(m, dtype=bool)]
    for j in points[1:]:
        keep = np.ones(m, dtype=bool)
        keep[order[:j]] = False
        rows.append(keep)
    eraser = []
    for q in FRACTIONS:
        k = max(1, round(q * m))
        without, only = np.ones(m, dtype=bool), np.zeros(m, dtype=bool)
        without[order[:k]] = False
        only[order[:k]] = True
        eraser += [without, only]
    probs = 1.0 / (1.0 + np.exp(-scorer.score_units(np.array(rows + eraser), prepared)[:, 0]))
    curve = probs[:len(rows)]
    x = np.array(points, dtype=float) / m
    auc = float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(x)))
    p_full = curve[0]
    e = probs[len(rows):]
    return {"deletion_auc": auc, "comprehensiveness": float(np.mean(p_full - e[0::2])),
            "sufficiency": float(np.mean(p_full - e[1::2]))}


def evaluate_seed(model, tokenizer, tests: list[dict], seed: int, progress: bool, scored: int = SCORED_LABEL,
                  checkpoint=None) -> dict:
    """Per (length, method): lists of hit / faithfulness / cost numbers; plus the randomised
    model's hit rate. ``checkpoint(partial_result)`` is called after each input, so a run cut
    short still reports the inputs it finished (``--from-raw``)."""
    import copy

    from tqdm import tqdm

    from seekdeep.explain import make_explainer
    from seekdeep.explain.target import Scorer

    ours = {m: make_explainer(model, tokenizer, m, progress=False)
            for m in ("shap", "ig", "gradxinput", "ablation", "attention", "rollout")}
    ours["shap_owen500"] = make_explainer(model, tokenizer, "shap", progress=False, fixed_context=None, max_evals=500)
    # fixed context 1 at every length: "auto" picks it past ~22 units, so it differs from the default
    # only on short inputs (there the default's record is reused: the same computation)
    ours["shap_fc1"] = make_explainer(model, tokenizer, "shap", progress=False, fixed_context=1)
    anchor = ShapDefault(model, tokenizer)
    scorer = Scorer(model, tokenizer)
    # shap's first explanation in a process compiles its numba kernels (~10 s here): not part of
    # either method's time, so both run once before anything is timed
    warm = tests[0]["text"]
    ours["shap"].explain(warm)
    ours["shap_owen500"].explain(warm)
    anchor.explain(warm, 1)
    rng = np.random.default_rng(seed)
    # the model-randomisation check: same inputs, re-initialised weights, our default method
    torch.manual_seed(10_000 + seed)
    random_model = copy.deepcopy(model)
    random_model.init_weights()
    random_model.eval()
    shap_random = make_explainer(random_model, tokenizer, "shap", progress=False)
    results: dict = {}
    randomised: dict = {}
    done: list[dict] = []
    for ex in tqdm(tests, desc=f"seed {seed}", disable=not progress):
        if checkpoint is not None and done:
            checkpoint({"results": results, "randomised": randomised, "scored": scored, "tests": list(done)})
        done.append(ex)
        length = ex["length"]
        if ex["label"] != scored:
            continue
        prepared = scorer.prepare(ex["text"])
        if model.id2label[prepared.target] != LABEL_NAMES[ex["label"]]:  # the JSONL's labels are names
            results.setdefault((length, "misclassified"), []).append(1)
            continue
        units = prepared.units
        planted = _unit_of_span(units, ex["planted"])
        # not part of any goal, a diagnosis of the misses: does deleting the keyword alone flip the
        # prediction (log-odds of the predicted class below 0)? Where it does not, the model does
        # not need the keyword on this input and another unit ranking first can be faithful.
        without = np.ones((1, len(units)), dtype=bool)
        without[0, planted] = False
        needed = float(scorer.score_units(without, prepared)[0, 0] < 0)
        for method in METHODS:
            start, cpu_start = time.perf_counter(), time.process_time()
            if method == "random":
                values, calls, rows, tokens = rng.random(len(units)), 0, 0, 0
            elif method == "shap_fc1" and results[(length, "shap")][-1]["fixed_context"] == 1:
                results.setdefault((length, method), []).append(dict(results[(length, "shap")][-1]))
                continue
            elif method == "shap_default":
                c0, r0, t0 = anchor.calls, anchor.rows, anchor.tokens
                token_values, offsets = anchor.explain(ex["text"], prepared.target)
                values = _to_units(token_values, offsets, units)
                calls, rows, tokens = anchor.calls - c0, anchor.rows - r0, anchor.tokens - t0
            else:
                exp = ours[method].explain(ex["text"])
                values, calls, rows = np.asarray(exp.values[0], dtype=float), exp.model_calls, exp.model_rows
                tokens = getattr(exp, "model_tokens", 0)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            ranked = list(np.argsort(-values, kind="stable"))
            record = {"label": ex["label"], "top1": float(ranked[0] == planted), "top3": float(planted in ranked[:3]),
                      "keyword_needed": needed, "first_unit": units.texts[ranked[0]],
                      "seconds": seconds, "cpu_seconds": cpu_seconds, "calls": calls, "rows": rows, "tokens": tokens,
                      "units": len(units),
                      **faithfulness(scorer, prepared, values)}
            if method.startswith("shap") and method != "shap_default":
                record["truncated"] = float(exp.truncated[0])
                record["fixed_context"] = exp.fixed_context[0]
            results.setdefault((length, method), []).append(record)
        exp = shap_random.explain(ex["text"])
        units = exp.prepared[0].units
        values = np.asarray(exp.values[0], dtype=float)
        randomised.setdefault(ex["length"], []).append(
            (float(int(np.argmax(values)) == _unit_of_span(units, ex["planted"])), 1.0 / len(units), ex["label"]))
    return {"results": results, "randomised": randomised, "scored": scored, "tests": tests}


def dsa_coverage(model_dir: Path, tests: list[dict]) -> dict[int, list[list[float | None]]]:
    """Per length: the per-layer dense-mass coverage of the dsa model's kept keys, per input."""
    from seekdeep.explain.cli import load_model_and_tokenizer
    from seekdeep.explain.selection import selection_view

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    out: dict[int, list] = {}
    for ex in tests:
        out.setdefault(ex["length"], []).append(selection_view(model, tokenizer, ex["text"]).coverage)
    return out


def batch_cost(model, tokenizer, files, device: str, sizes=(5, 16, 64, 128), rows: int = 128) -> None:
    """CPU seconds per model row at several rows-per-call widths, on a 160-token test input:
    half-masked rows (what Owen values evaluate) and rows missing one word (what the fixed
    context evaluates). Process CPU time, one thread: a loaded machine stretches wall time but
    hardly the CPU time a row needs. The anchor is 5 rows a call (shap's default)."""
    from seekdeep.explain.target import Scorer

    example = make_examples(tokenizer, 160, 1, random.Random(1), files, labels=(1,))[0]
    g = np.random.default_rng(0)
    for kind in ("half_masked", "one_word_missing"):
        scorer = Scorer(model, tokenizer)
        prepared = scorer.prepare(example["text"])
        m = len(prepared.units)
        masks = (g.random((rows, m)) < 0.5 if kind == "half_masked"
                 else ~np.eye(m, dtype=bool)[g.integers(0, m, rows)])
        cost = {}
        for size in sizes:
            scorer.batch_size = size
            runs = []
            for _ in range(2):
                start = time.process_time()
                scorer.score_units(masks, prepared)
                runs.append((time.process_time() - start) / rows * 1e3)
            cost[size] = min(runs)
        for size in sizes:
            emit(f"explain.cpu_ms_per_row.{kind}.batch{size}", cost[size], "ms (CPU)", cost[sizes[0]],
                 f"{sizes[0]} rows a call", device, units=m, rows=rows)


def dsa_stall(model_dir: Path, files, device: str, n: int = 24, seed: int = 0) -> None:
    """Why a classifier fine-tuned on the dsa layout stalls at ~84%: the dense-trained classifier
    run with the dsa backend and the indexer the recipe would leave it (random: finetune freezes
    the base's indexer, and the base here is untrained). Per length: accuracy dense vs dsa, and
    for label-1 inputs the share whose keyword token is among the keys each layer kept for the
    scored (last) query. Inputs that fit in the top-k keys run dense; past that the last query
    cannot see the keyword when its layer's indexer drops it."""
    from seekdeep.explain.attention import capture_attention
    from seekdeep.explain.cli import load_model_and_tokenizer

    for backend in (None, "dsa"):
        torch.manual_seed(seed)  # the indexer's random initialisation
        model, tokenizer = load_model_and_tokenizer(str(model_dir), backend)
        rng = random.Random(7000 + seed)
        for length in LENGTHS:
            correct, kept = [], []
            for ex in make_examples(tokenizer, length, n, rng, files):
                enc = tokenizer.backend_tokenizer.encode(ex["text"])
                ids = torch.tensor([enc.ids])
                with torch.no_grad():
                    predicted = model.id2label[int(model(input_ids=ids).logits[0].argmax())]
                correct.append(predicted == LABEL_NAMES[ex["label"]])
                if backend == "dsa" and ex["label"] == 1:
                    a, b = ex["planted"]
                    where = [i for i, (s, e) in enumerate(enc.offsets) if s < b and e > a]
                    maps = capture_attention(model, ids)
                    kept.append([1.0 if sel is None else float(sel[0, -1, where].any()) for sel in maps.selected])
            extra = {}
            if kept:
                extra = {"keyword_kept_by_last_query_per_layer": [float(np.mean(k)) for k in zip(*kept)],
                         "label1_inputs": len(kept)}
            emit(f"explain.dsa_stall.accuracy.{backend or 'dense'}.len{length}", float(np.mean(correct)), "fraction",
                 None, "none", device, inputs=len(correct), model=str(model_dir),
                 attention_options=dict(model.config.attention_options or {}), **extra)


# ----------------------------------------------------------------------------- report


def scored_only(result: dict) -> dict:
    """The records of the scored label's inputs (all of them in runs of this task)."""
    scored = result.get("scored", SCORED_LABEL)
    return {"results": {k: [r for r in v if r["label"] == scored] for k, v in result["results"].items()
                        if k[1] != "misclassified"},
            "randomised": {k: [(h, c) for h, c, label in v if label == scored] for k, v in result["randomised"].items()}}


def _mean_spread(per_seed: list[float]) -> tuple[float, float]:
    return float(np.mean(per_seed)), float(statistics.pstdev(per_seed)) if len(per_seed) > 1 else 0.0


def report(seed_results: list[dict], accuracies: list[float], coverage: list[dict], dsa_model: str, device: str,
           out: Path) -> None:
    seeds = len(seed_results)
    mean, spread = _mean_spread(accuracies)
    emit("explain.classifier_heldout_accuracy", mean, "fraction", None, "none", device, spread=spread, seeds=seeds)
    table = {}
    for length in LENGTHS:
        def per_seed(method, key):
            values = []
            field = "top1" if key == "top1_needed" else key
            for r in seed_results:
                records = r["results"].get((length, method), [])
                if key == "top1_needed":  # top-1 on the inputs whose keyword alone flips the prediction
                    records = [rec for rec in records if rec.get("keyword_needed") == 1.0]
                if records and all(field in rec for rec in records):
                    values.append(float(np.mean([rec[field] for rec in records])))
            return values

        for method in METHODS:
            row = {key: _mean_spread(per_seed(method, key)) for key in
                   ("top1", "top3", "top1_needed", "keyword_needed", "deletion_auc", "comprehensiveness", "sufficiency", "seconds", "cpu_seconds", "calls",
                    "rows", "tokens", "units")}
            if method in ("shap", "shap_owen500", "shap_fc1"):
                row["truncated"] = _mean_spread(per_seed(method, "truncated"))
            table[(length, method)] = row
        n_scored = [len(r["results"].get((length, "shap"), [])) for r in seed_results]
        for method in METHODS:
            row = table[(length, method)]
            extra = dict(length=length, seeds=seeds, scored_inputs=n_scored)
            emit(f"explain.top1_hit.{method}.len{length}", row["top1"][0], "fraction", table[(length, "random")]["top1"][0],
                 "random attribution", device, spread=row["top1"][1], top3=row["top3"][0],
                 keyword_needed_share=row["keyword_needed"][0], top1_keyword_needed=row["top1_needed"][0], **extra)
            emit(f"explain.deletion_auc.{method}.len{length}", row["deletion_auc"][0], "prob x fraction",
                 table[(length, "random")]["deletion_auc"][0], "random attribution", device, spread=row["deletion_auc"][1],
                 attention_auc=table[(length, "attention")]["deletion_auc"][0],
                 rollout_auc=table[(length, "rollout")]["deletion_auc"][0], **extra)
            emit(f"explain.eraser_comprehensiveness.{method}.len{length}", row["comprehensiveness"][0], "prob",
                 table[(length, "random")]["comprehensiveness"][0], "random attribution", device,
                 spread=row["comprehensiveness"][1], sufficiency=row["sufficiency"][0],
                 random_sufficiency=table[(length, "random")]["sufficiency"][0], **extra)
            if method != "random":
                emit(f"explain.seconds_per_explanation.{method}.len{length}", row["seconds"][0], "s",
                     table[(length, "shap_default")]["seconds"][0], "shap Partition explainer at its defaults", device,
                     spread=row["seconds"][1], cpu_seconds=row["cpu_seconds"][0],
                     anchor_cpu_seconds=table[(length, "shap_default")]["cpu_seconds"][0], model_calls=row["calls"][0],
                     model_rows=row["rows"][0],
                     model_tokens=row["tokens"][0], anchor_model_calls=table[(length, "shap_default")]["calls"][0],
                     anchor_model_rows=table[(length, "shap_default")]["rows"][0],
                     anchor_model_tokens=table[(length, "shap_default")]["tokens"][0], units=row["units"][0],
                     **({"truncated": row["truncated"][0]} if "truncated" in row else {}), **extra)
        hits = [float(np.mean([h for h, _ in r["randomised"][length]])) for r in seed_results]
        chance = [float(np.mean([c for _, c in r["randomised"][length]])) for r in seed_results]
        m, s = _mean_spread(hits)
        emit(f"explain.randomised_model_top1.shap.len{length}", m, "fraction", float(np.mean(chance)),
             "chance (mean 1/units)", device, spread=s, trained_top1=table[(length, "shap")]["top1"][0], seeds=seeds)
        layers = len(coverage[0][length][0])
        for layer in range(layers):
            vals = [float(np.mean([c[layer] for c in per_seed_cov[length] if c[layer] is not None]))
                    for per_seed_cov in coverage if any(c[layer] is not None for c in per_seed_cov[length])]
            if vals:
                m, s = _mean_spread(vals)
                emit(f"explain.dsa_dense_mass_coverage.layer{layer}.len{length}", m, "fraction", 1.0,
                     "dense attention (covers all)", device, spread=s, seeds=len(vals), dsa_model=dsa_model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in table.items()}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=30, help="test inputs per length and seed")
    parser.add_argument("--train", type=int, default=2100, help="training examples per seed (all lengths)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per seed (100 reached 0.82 on seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dsa-model", default=None, help="dsa model for the selection view (default: runs/train/final, "
                        "else `seekdeep train --steps DSA_STEPS` into OUT/dsa-train)")
    parser.add_argument("--dsa-steps", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-explain")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--min-accuracy", type=float, default=0.95, help="refuse a classifier below this (smoke runs: 0)")
    parser.add_argument("--from-raw", action="store_true", help="report from the raw results of earlier runs in OUT")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED..SEEDS-1 (parallel runs)")
    parser.add_argument("--batch-cost", action="store_true", help="only: CPU time per row vs rows per call, seed 0's model")
    parser.add_argument("--dsa-stall", action="store_true", help="only: seed FIRST_SEED's classifier with the dsa "
                        "backend and a random indexer: accuracy per length, keyword kept by the last query per layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from seekdeep.cli import make_default_model
    from seekdeep.data import default_corpus
    from seekdeep.explain.cli import load_model_and_tokenizer

    out = Path(args.out)
    base_dir = out / "base"
    if not (base_dir / "config.json").is_file():
        # the default layout (stdlib tokenizer, tiny llama) with dense attention: with dsa and its indexer
        # frozen at random (finetune keeps backends as pre-trained) the classifier stalled at ~84%
        make_default_model(base_dir, backend="sdpa")
    from seekdeep.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(base_dir)
    files = default_corpus().train_files
    device = f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    seed_results, accuracies, coverage, seed_tests = [], [], [], []
    if args.batch_cost:
        model_dir, _ = train_classifier(0, base_dir, tokenizer, out, args.train, args.steps, files, args.min_accuracy)
        batch_cost(load_model_and_tokenizer(str(model_dir))[0], tokenizer, files, device)
        return 0
    if args.dsa_stall:
        model_dir, _ = train_classifier(args.first_seed, base_dir, tokenizer, out, args.train, args.steps, files,
                                        args.min_accuracy)
        dsa_stall(model_dir, files, device, n=args.n, seed=args.first_seed)
        return 0
    if args.from_raw:  # every seed's raw results of earlier runs of this task (raw-seedK.pkl)
        found = {}
        for path in sorted(out.glob("raw-seed*.pkl")):
            with open(path, "rb") as f:
                raw = pickle.load(f)
            if isinstance(raw, dict) and raw.get("task") == TASK:
                found[int(path.stem.removeprefix("raw-seed"))] = raw
        for k in sorted(found)[:args.seeds]:
            seed_results.append(found[k]["result"])
            accuracies.append(found[k]["accuracy"])
            seed_tests.append(found[k]["tests"])
        print(f"raw results of seeds {sorted(found)[:args.seeds]}", file=sys.stderr)
    for seed in ([] if args.from_raw else range(args.first_seed, args.seeds)):
        started = time.perf_counter()
        model_dir, summary = train_classifier(seed, base_dir, tokenizer, out, args.train, args.steps, files,
                                              args.min_accuracy)
        accuracies.append(summary["accuracy_after"])
        model, _ = load_model_and_tokenizer(str(model_dir))
        rng = random.Random(2000 + seed)
        scored = evidence_label(model, tokenizer, files, random.Random(3000 + seed))
        if scored != SCORED_LABEL:  # the held-out accuracy makes this unlikely; the scores would mean nothing
            raise SystemExit(f"seed {seed}: the classifier predicts {LABEL_NAMES[SCORED_LABEL]!r} for keyword-free code")
        per_length = [make_examples(tokenizer, length, args.n, rng, files, labels=(scored,)) for length in LENGTHS]
        tests = [e for group in zip(*per_length) for e in group]  # 20, 50, 160, 20, ...: a cut run has every length

        def save(result, seed=seed, accuracy=summary["accuracy_after"]):  # report later with --from-raw
            with open(out / f"raw-seed{seed}.pkl.tmp", "wb") as f:
                pickle.dump({"task": TASK, "result": result, "accuracy": accuracy, "tests": result["tests"]}, f)
            (out / f"raw-seed{seed}.pkl.tmp").replace(out / f"raw-seed{seed}.pkl")

        seed_results.append(evaluate_seed(model, tokenizer, tests, seed, args.progress, scored, checkpoint=save))
        seed_tests.append(tests)
        save(seed_results[-1])
        print(f"seed {seed}: accuracy {summary['accuracy_after']:.3f}, {time.perf_counter() - started:.0f}s",
              file=sys.stderr)
    dsa_dir = Path(args.dsa_model) if args.dsa_model else Path("runs/train/final")
    if not (dsa_dir / "config.json").is_file():
        from seekdeep.recipes.train import TrainConfig, train

        dsa_dir = out / "dsa-train" / "final"
        if not (dsa_dir / "config.json").is_file():
            print(f"no trained default model: `seekdeep train --steps {args.dsa_steps}` into {dsa_dir.parent}",
                  file=sys.stderr)
            train(TrainConfig(steps=args.dsa_steps, output_dir=str(dsa_dir.parent), overwrite=True,
                              progress=args.progress, eval_interval=args.dsa_steps,
                              checkpoint_interval=args.dsa_steps, sample_tokens=8))
    if not args.from_raw and args.first_seed > 0:
        return 0  # a partial run: report all seeds together with --from-raw
    coverage = [dsa_coverage(dsa_dir, tests) for tests in seed_tests]
    seed_results = [scored_only(r) for r in seed_results]
    report(seed_results, accuracies, coverage, str(dsa_dir), device, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
