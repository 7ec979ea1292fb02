"""Faithfulness and cost of seekdeep.explain's attributions on a task whose answer is known.

The task: windows of real standard-library code (about 20, 50 and 160 tokens) with one of two
keywords planted at a random word boundary — " month" makes the label 1, " week" label 0 —
and a decoy, " zero", planted in every input of both classes. So "a word was inserted" and
"this word is unusual here" are no shortcuts: only which keyword was planted decides the label.
Snippets that already hold any of the three words are skipped.

Per seed (default 3 seeds; data, model initialisation and the random baseline all follow it):

1. the default model layout (``seekdeep.cli.make_default_model``: tokenizer trained on the
   standard library, tiny llama) with dense attention is fine-tuned as a sequence classifier with
   ``seekdeep finetune --task classification --method full``; the run is refused unless its
   held-out accuracy is >= 95%. (With ``dsa`` the recipe keeps the base's indexer as it is —
   random here — and the classifier stalled at ~84%: a last token whose top-64 keys miss the
   keyword cannot see it. That is what the selection view of part 5 measures.)
2. on fresh test inputs (not trained on) of each length, every method explains the predicted
   class's log-odds: ``shap`` (ours: SHAPExplainer, default settings), ``shap_default`` (shap's
   own Partition explainer at its defaults — ``shap.Explainer(f, shap.maskers.Text(tokenizer))``
   with f(list of strings) running the model, max_evals 500, batch size 5 — the anchor for
   time), ``ig``, ``gradxinput``, ``ablation``, ``attention``, ``rollout`` and ``random``;
3. scored on correctly classified inputs: top-1 / top-3 hit rate of the planted (label-deciding)
   keyword; the deletion curve (units removed most-important first, probability of the
   predicted class after each removal, area under it over the fraction removed; lower is
   better); ERASER comprehensiveness (drop of that probability when the top 5/10/20/50% units
   are removed, mean; higher is better) and sufficiency (drop when only they are kept; lower is
   better); seconds, model calls and model rows per explanation;
4. the model-randomisation check: the same inputs explained (our default method) on a
   re-initialised model — the hit rate must fall to chance (mean 1 / number of units);
5. the dsa selection view on the default trained model (``runs/train/final`` from ``seekdeep
   train``, or ``--dsa-model``, else ``seekdeep train --steps DSA_STEPS`` is run into
   ``OUT/dsa-train``): the dense attention mass covered by the keys each layer kept, per layer
   and input length, on the same test inputs.

Output: one JSON line per result (mean over seeds, ``spread`` = standard deviation, ``seeds``),
anchors measured in the same run. Usage:
    python benchmarks/explain.py [--seeds 3] [--n 20] [--threads 1] [--out runs/bench-explain]
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

LABEL_WORDS = {1: " month", 0: " week"}
LABEL_NAMES = {1: "month", 0: "week"}  # the label names in the training JSONL
DECOY = " zero"
LENGTHS = (20, 50, 160)
METHODS = ("shap", "shap_default", "ig", "gradxinput", "ablation", "attention", "rollout", "random")
FRACTIONS = (0.05, 0.1, 0.2, 0.5)
#: attributions are scored on inputs of one class per model: the class the model does NOT predict
#: for an empty input, whose keyword is then the evidence. A model that has learned "month present
#: -> month, else week" gives a week input the same output as an empty one (measured: log-odds 6.62
#: vs 6.61), so no attribution of a week input is right or wrong; which class a seed's model treats
#: as the default is its own (seed 2: month). SCORED_LABEL is the fallback for raw results of runs
#: that always scored label 1.
SCORED_LABEL = 1


def evidence_label(model, tokenizer) -> int:
    """The label (key of LABEL_NAMES) that the model does not predict for an input with no token
    of the text (the pad token alone)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tokenizer.pad_token_id]])).logits[0]
    default = model.id2label[int(logits.argmax())]
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
                  labels: tuple[int, ...] = (0, 1)) -> list[dict]:
    """``count`` labelled inputs of about ``length`` tokens (see the module docstring)."""
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
        order = [LABEL_WORDS[label], DECOY]
        rng.shuffle(order)
        try:
            text, spans = _plant(snippet, order, rng)
        except IndexError:  # no word end to plant at
            continue
        out.append({"text": text, "label": label, "planted": spans[LABEL_WORDS[label]], "decoy": spans[DECOY],
                    "length": length})
    return out


# ----------------------------------------------------------------------------- the classifier


def train_classifier(seed: int, base_dir: Path, tokenizer, out: Path, n_train: int, steps: int, files,
                     min_accuracy: float = 0.95) -> tuple[Path, dict]:
    """Fine-tune the base as a classifier with the recipe; refuse a model under 95% held-out accuracy."""
    from seekdeep.recipes.finetune import FinetuneConfig, finetune

    final = out / f"seed{seed}" / "final"
    done = out / f"seed{seed}" / "summary.json"
    if done.is_file():  # a finished run with the same settings is reused
        summary = json.loads(done.read_text())
        same = summary["config"]["steps"] == steps and summary.get("train_examples", 0) + summary.get(
            "heldout_examples", 0) == n_train // len(LENGTHS) * len(LENGTHS)
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
    return Path(summary["model_dir"]), summary


# ----------------------------------------------------------------------------- attributions


class ShapDefault:
    """shap's own Partition explainer at its defaults on the same model and output: f takes the
    masked strings shap builds (mask token '...', re-tokenised), max_evals 500, batch size 5."""

    def __init__(self, model, tokenizer):
        import shap

        self.model, self.tokenizer = model, tokenizer
        self.masker = shap.maskers.Text(tokenizer)
        self.calls = self.rows = 0

    def explain(self, text: str, target: int):
        import shap

        def f(strings):
            strings = [s if s.strip() else self.tokenizer.decode([self.tokenizer.pad_token_id]) for s in strings]
            enc = self.tokenizer(list(strings), padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            self.calls += 1
            self.rows += len(strings)
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


def evaluate_seed(model, tokenizer, tests: list[dict], seed: int, progress: bool, scored: int = SCORED_LABEL) -> dict:
    """Per (length, method): lists of hit / faithfulness / cost numbers; plus the randomised
    model's hit rate and the dsa coverage per layer."""
    import copy

    from tqdm import tqdm

    from seekdeep.explain import make_explainer
    from seekdeep.explain.target import Scorer

    ours = {m: make_explainer(model, tokenizer, m, progress=False)
            for m in ("shap", "ig", "gradxinput", "ablation", "attention", "rollout")}
    anchor = ShapDefault(model, tokenizer)
    scorer = Scorer(model, tokenizer)
    # shap's first explanation in a process compiles its numba kernels (~10 s here): not part of
    # either method's time, so both run once before anything is timed
    warm = tests[0]["text"]
    ours["shap"].explain(warm)
    anchor.explain(warm, 1)
    rng = np.random.default_rng(seed)
    results: dict = {}
    for ex in tqdm(tests, desc=f"seed {seed}", disable=not progress):
        length = ex["length"]
        if ex["label"] != scored:
            continue
        prepared = scorer.prepare(ex["text"])
        if model.id2label[prepared.target] != LABEL_NAMES[ex["label"]]:  # the JSONL's labels are names
            results.setdefault((length, "misclassified"), []).append(1)
            continue
        units = prepared.units
        planted = _unit_of_span(units, ex["planted"])
        for method in METHODS:
            start = time.perf_counter()
            if method == "random":
                values, calls, rows = rng.random(len(units)), 0, 0
            elif method == "shap_default":
                c0, r0 = anchor.calls, anchor.rows
                token_values, offsets = anchor.explain(ex["text"], prepared.target)
                values = _to_units(token_values, offsets, units)
                calls, rows = anchor.calls - c0, anchor.rows - r0
            else:
                exp = ours[method].explain(ex["text"])
                values, calls, rows = np.asarray(exp.values[0], dtype=float), exp.model_calls, exp.model_rows
            seconds = time.perf_counter() - start
            ranked = list(np.argsort(-values, kind="stable"))
            record = {"label": ex["label"], "top1": float(ranked[0] == planted), "top3": float(planted in ranked[:3]),
                      "seconds": seconds, "calls": calls, "rows": rows, **faithfulness(scorer, prepared, values)}
            if method == "shap":
                record["truncated"] = float(exp.truncated[0])
            results.setdefault((length, method), []).append(record)
    # the model-randomisation check: same inputs, re-initialised weights, our default method
    torch.manual_seed(10_000 + seed)
    random_model = copy.deepcopy(model)
    random_model.init_weights()
    random_model.eval()
    shap_random = make_explainer(random_model, tokenizer, "shap", progress=False)
    randomised: dict = {}
    for ex in tests:
        if ex["label"] != scored:
            continue
        exp = shap_random.explain(ex["text"])
        units = exp.prepared[0].units
        values = np.asarray(exp.values[0], dtype=float)
        randomised.setdefault(ex["length"], []).append(
            (float(int(np.argmax(values)) == _unit_of_span(units, ex["planted"])), 1.0 / len(units), ex["label"]))
    return {"results": results, "randomised": randomised, "scored": scored}


def dsa_coverage(model_dir: Path, tests: list[dict]) -> dict[int, list[list[float | None]]]:
    """Per length: the per-layer dense-mass coverage of the dsa model's kept keys, per input."""
    from seekdeep.explain.cli import load_model_and_tokenizer
    from seekdeep.explain.selection import selection_view

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    out: dict[int, list] = {}
    for ex in tests:
        out.setdefault(ex["length"], []).append(selection_view(model, tokenizer, ex["text"]).coverage)
    return out


# ----------------------------------------------------------------------------- report


def scored_only(result: dict, tests: list[dict], model_dir: Path) -> dict:
    """Keep the records of SCORED_LABEL inputs. Records written before they carried their label
    (raw.pkl of an earlier run that explained both classes) are matched to their test inputs in
    order, the misclassified ones (which have no record) found by asking the saved model."""
    from seekdeep.explain.cli import load_model_and_tokenizer
    from seekdeep.explain.target import Scorer

    scored = result.get("scored", SCORED_LABEL)
    out = {"results": {}, "randomised": {}}
    scorer = None
    for (length, method), records in result["results"].items():
        if method == "misclassified":
            continue
        if records and "label" in records[0]:
            out["results"][(length, method)] = [r for r in records if r["label"] == scored]
            continue
        pool = [t for t in tests if t["length"] == length]
        if result["results"].get((length, "misclassified")):
            if scorer is None:
                scorer = Scorer(*load_model_and_tokenizer(str(model_dir)))
            names = scorer.model.id2label
            pool = [t for t in pool if names[scorer.prepare(t["text"]).target] == LABEL_NAMES[t["label"]]]
        if len(pool) != len(records):
            raise SystemExit(f"raw results of length {length} do not match their test inputs")
        out["results"][(length, method)] = [r for r, t in zip(records, pool) if t["label"] == scored]
    for length, pairs in result["randomised"].items():
        if pairs and len(pairs[0]) == 3:
            out["randomised"][length] = [(h, c) for h, c, label in pairs if label == scored]
        else:
            pool = [t for t in tests if t["length"] == length]
            out["randomised"][length] = [(h, c) for (h, c), t in zip(pairs, pool) if t["label"] == scored]
    return out


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
            for r in seed_results:
                records = r["results"].get((length, method), [])
                if records:
                    values.append(float(np.mean([rec[key] for rec in records])))
            return values

        for method in METHODS:
            row = {key: _mean_spread(per_seed(method, key)) for key in
                   ("top1", "top3", "deletion_auc", "comprehensiveness", "sufficiency", "seconds", "calls", "rows")}
            table[(length, method)] = row
        n_scored = [len(r["results"].get((length, "shap"), [])) for r in seed_results]
        for method in METHODS:
            row = table[(length, method)]
            extra = dict(length=length, seeds=seeds, scored_inputs=n_scored)
            emit(f"explain.top1_hit.{method}.len{length}", row["top1"][0], "fraction", table[(length, "random")]["top1"][0],
                 "random attribution", device, spread=row["top1"][1], top3=row["top3"][0], **extra)
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
                     spread=row["seconds"][1], model_calls=row["calls"][0], model_rows=row["rows"][0],
                     anchor_model_calls=table[(length, "shap_default")]["calls"][0],
                     anchor_model_rows=table[(length, "shap_default")]["rows"][0], **extra)
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
    parser.add_argument("--n", type=int, default=20, help="test inputs per length and seed")
    parser.add_argument("--train", type=int, default=2100, help="training examples per seed (all lengths)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dsa-model", default=None, help="dsa model for the selection view (default: runs/train/final, "
                        "else `seekdeep train --steps DSA_STEPS` into OUT/dsa-train)")
    parser.add_argument("--dsa-steps", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-explain")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--min-accuracy", type=float, default=0.95, help="refuse a classifier below this (smoke runs: 0)")
    parser.add_argument("--from-raw", action="store_true", help="report from the raw results of earlier runs in OUT")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST_SEED..SEEDS-1 (parallel runs)")
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
    if args.from_raw:  # every seed's raw results of earlier runs (raw.pkl: several seeds; raw-seedK.pkl: one)
        found = {}
        if (out / "raw.pkl").is_file():
            with open(out / "raw.pkl", "rb") as f:
                results, accs, tests_ = pickle.load(f)
            found.update({k: (r, a, t) for k, (r, a, t) in enumerate(zip(results, accs, tests_))})
        for path in sorted(out.glob("raw-seed*.pkl")):
            with open(path, "rb") as f:
                found[int(path.stem.removeprefix("raw-seed"))] = pickle.load(f)
        for k in sorted(found)[:args.seeds]:
            seed_results.append(found[k][0])
            accuracies.append(found[k][1])
            seed_tests.append(found[k][2])
        print(f"raw results of seeds {sorted(found)[:args.seeds]}", file=sys.stderr)
    for seed in ([] if args.from_raw else range(args.first_seed, args.seeds)):
        started = time.perf_counter()
        model_dir, summary = train_classifier(seed, base_dir, tokenizer, out, args.train, args.steps, files,
                                              args.min_accuracy)
        accuracies.append(summary["accuracy_after"])
        model, _ = load_model_and_tokenizer(str(model_dir))
        rng = random.Random(2000 + seed)
        scored = evidence_label(model, tokenizer)
        tests = [e for length in LENGTHS for e in make_examples(tokenizer, length, args.n, rng, files, labels=(scored,))]
        seed_results.append(evaluate_seed(model, tokenizer, tests, seed, args.progress, scored))
        seed_tests.append(tests)
        with open(out / f"raw-seed{seed}.pkl", "wb") as f:  # report later with --from-raw
            pickle.dump((seed_results[-1], accuracies[-1], tests), f)
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
    seed_results = [scored_only(r, t, out / f"seed{k}" / "final") for k, (r, t) in enumerate(zip(seed_results, seed_tests))]
    report(seed_results, accuracies, coverage, str(dsa_dir), device, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
