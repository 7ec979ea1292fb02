"""Attention maps are the ones the layers use (masks included), the dsa selection view shows the
keys the layer really attended to, and the HTML report / `seekdeep explain` hold every section
and load nothing from the network."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch

from seekdeep.attention.base import repeat_kv
from seekdeep.cli import main
from seekdeep.explain import capture_attention, explain, selection_view, write_report
from seekdeep.models.llama import LlamaForCausalLM

from keyword_models import tiny_config

TEXT = "import os\nfor name in os.listdir(path):\n    print(name)"


def _random_lm(tokenizer, backend="sdpa", **options):
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config(tokenizer, num_hidden_layers=2, attention_backend=backend,
                                         attention_options=options))
    model.init_weights(std=0.3)  # peaked attention, so a wrong selection loses visible mass
    return model.eval()


def _backend_io(model, ids, mask=None):
    """(q, k, v, output) of every attention backend call."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((args[0], args[1], args[2], out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in model.named_modules() if n.endswith(".inner")]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return calls


def test_attention_probs_are_what_the_layer_computes_with_padding(tokenizer):
    model = _random_lm(tokenizer, "eager")
    ids = torch.randint(1, tokenizer.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    maps = capture_attention(model, ids, mask)
    calls = _backend_io(model, ids, mask)
    assert len(maps.probs) == 2
    for probs, (q, k, v, out) in zip(maps.probs, calls):
        assert torch.triu(probs, diagonal=1).abs().max() == 0  # causal
        assert probs[1, :, :, :4].abs().max() == 0  # padded keys
        recon = probs @ repeat_kv(v, q.shape[1] // v.shape[1]).float()
        assert torch.allclose(recon, out.float(), atol=1e-5)


@pytest.mark.parametrize("options", [dict(topk=4, local_window=1), dict(topk=4, block_size=2)],
                         ids=["token", "block"])
def test_dsa_selection_is_what_the_layer_attends_to(tokenizer, options):
    model = _random_lm(tokenizer, "dsa", **options)
    view = selection_view(model, tokenizer, TEXT)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    calls = _backend_io(model, ids)
    t = ids.shape[1]
    assert t > 12 and view.has_sparse_layers
    for layer, (q, k, v, out) in enumerate(calls):
        chosen = view.maps.selected[layer][0]  # (T, T)
        assert not torch.triu(chosen, diagonal=1).any()
        assert chosen.sum(-1).max() <= 4 and bool(chosen.diagonal().all())
        # attention restricted to the shown keys reproduces the layer's output
        kr, vr = (repeat_kv(x, q.shape[1] // x.shape[1]).float() for x in (k, v))
        scores = (q.float() @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
        recon = scores.masked_fill(~chosen, float("-inf")).softmax(-1) @ vr
        assert torch.allclose(recon, out.float(), atol=1e-4)
        cov = view.coverage_by_query[layer]
        dense_mass = (view.maps.probs[layer][0] * chosen).sum(-1).mean(0)
        assert torch.allclose(cov, dense_mass, atol=1e-6)
        assert torch.allclose(cov[:4], torch.ones(4), atol=1e-5)  # <= topk keys visible: all kept
        assert 0.0 < view.coverage[layer] < 1.0


def _sections(path) -> tuple[set[str], list[str]]:
    ids, remote = set(), []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "id" in attrs:
                ids.add(attrs["id"])
            for key in ("src", "href"):
                if re.match(r"\s*(https?:)?//", attrs.get(key) or ""):
                    remote.append(attrs[key])

    Parser().feed(path.read_text(encoding="utf-8"))
    return ids, remote


def test_report_has_every_section_and_no_remote_resources(keyword_lm, tokenizer, tmp_path):
    model = _random_lm(tokenizer, "dsa", topk=4, local_window=1)
    exp = explain(model, "an excellent box", tokenizer, method="ablation", max_new_tokens=3, progress=False)
    ids = exp.prepared[0].units.token_ids + exp.prepared[0].continuation
    maps = capture_attention(model, torch.tensor([ids]))
    path = write_report(tmp_path / "r.html", exp, model_name="tiny dsa", maps=maps,
                        tokens=[tokenizer.decode([i]) for i in ids])
    sections, remote = _sections(path)
    assert {"summary", "tokens", "shap-text", "matrix", "attention", "selection"} <= sections
    assert remote == [] and "<script src" not in path.read_text()
    text = path.read_text()
    assert "dense mass covered" in text and text.count("data:image/png;base64,") >= 2


def test_cli_writes_report_and_rejects_bad_input(keyword_classifier, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "clf"
    keyword_classifier.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "report.html"
    rc = main(["explain", str(model_dir), "--text", "this excellent tool saved me hours", "--method", "ablation",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "'positive'" in printed and "' excellent'" in printed.splitlines()[1]
    sections, remote = _sections(out)
    assert {"summary", "tokens", "shap-text", "attention", "selection"} <= sections and remote == []
    for argv, field in [(["--text", ""], "--text"), (["--text", "x", "--target", "neutral"], "--target"),
                        (["--text", "x", "--method", "lime"], "--method"),
                        (["--text", "word " * 200, "--method", "ablation"], "--text"),
                        (["--text", "x", "--output", str(tmp_path / "r.txt")], "--output")]:
        assert main(["explain", str(model_dir), *argv, "--output", str(tmp_path / "bad.html")]
                    if "--output" not in argv else ["explain", str(model_dir), *argv]) == 2
        assert f"error: {field}" in capsys.readouterr().err
    assert main(["explain", "--text", "x"]) == 2 and "MODEL" in capsys.readouterr().err


def test_cli_fixed_context_flag(keyword_classifier, tokenizer, tmp_path, capsys):
    """--fixed-context reaches the explainer (the report names the coalitions used) and a bad
    value, or one given to a method it does not apply to, is refused naming the flag."""
    model_dir = tmp_path / "clf"
    keyword_classifier.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = "this excellent tool saved me hours"
    for value, shown in [("1", "fixed context 1: each group scored with the rest of the input kept"),
                         ("owen", "Owen values: every coalition")]:
        out = tmp_path / f"report-{value}.html"
        assert main(["explain", str(model_dir), "--text", text, "--method", "shap", "--fixed-context", value,
                     "--output", str(out), "--no-progress"]) == 0
        assert "' excellent'" in capsys.readouterr().out.splitlines()[1]
        assert shown in out.read_text()
    for argv in (["--fixed-context", "2"], ["--fixed-context", "none"], ["--fixed-context", "1", "--method", "ig"]):
        assert main(["explain", str(model_dir), "--text", text, *argv, "--output", str(tmp_path / "bad.html")]) == 2
        err = capsys.readouterr().err
        assert "error: --fixed-context" in err and "auto" in err
    assert not (tmp_path / "bad.html").exists()
