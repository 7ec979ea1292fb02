"""`seekdeep vlm` end to end on a tiny budget: outputs, HF-layout final model, resume; and the
synthetic VQA generator's guarantees."""

import json

import pytest
import torch

import seekdeep
from seekdeep.cli import main
from seekdeep.errors import ConfigError
from seekdeep.multimodal.data import ANSWERS, HELD_OUT, QUESTION_TYPES, SpatialVQA
from seekdeep.recipes.vlm import VLMTrainConfig, question_only_prior

TINY = ["--steps", "4", "--batch-size", "4", "--eval-samples", "8", "--eval-every", "4", "--hidden-size", "32",
        "--vision-layers", "1", "--text-layers", "1", "--warmup", "1", "--no-progress"]


def test_gated_variant_trains_and_saves(tmp_path):
    out = tmp_path / "run"
    assert main(["vlm", str(out), "--fusion", "cross_attention", "--num-latents", "4", "--question-loss", "--caption-every", "2",
                 "--position-questions", *TINY]) == 0
    model = seekdeep.AutoModel.from_pretrained(out / "final")
    assert model.config.cross_attention.num_latents == 4
    assert json.loads((out / "summary.json").read_text())["config"]["fusion"] == "cross_attention"


def test_vlm_command_trains_saves_and_resumes(tmp_path):
    fusion = "prefix"
    out = tmp_path / "run"
    assert main(["vlm", str(out), "--fusion", fusion, "--checkpoint-every", "2", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["accuracy"]["heldout"]) == {*QUESTION_TYPES, "all"}
    assert summary["config"]["grounded"] and 0 <= summary["accuracy"]["spatial_chain_exact"]["heldout"] <= 1  # the default
    assert (out / "samples.png").stat().st_size > 0
    model = seekdeep.AutoModel.from_pretrained(out / "final")
    assert (model.config.cross_attention is not None) == (fusion == "cross_attention")
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llava"
    # a finished run is refused; --resume auto with a larger budget continues from its checkpoint
    assert main(["vlm", str(out), *TINY]) == 2
    assert main(["vlm", str(out), "--fusion", fusion, "--resume", "auto", *TINY[:0], "--steps", "6", *TINY[2:]]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6] or \
        [r["step"] for r in lines if r["kind"] == "train"][-2:] == [5, 6]


def test_scenes_are_deterministic_and_splits_keep_the_held_out_combinations():
    a, b = SpatialVQA("train", 3)[17], SpatialVQA("train", 3)[17]
    assert a.question == b.question and a.answer == b.answer and a.image.tobytes() == b.image.tobytes()
    train = SpatialVQA("train", 0).take(400)
    held = SpatialVQA("heldout", 0).take(200)
    assert not any((o.colour, o.shape) in HELD_OUT for s in train for o in s.objects)
    assert all(any((o.colour, o.shape) in HELD_OUT for o in s.objects) for s in held)
    for s in train:
        assert s.answer in ANSWERS[s.qtype]
    exist = [s.answer for s in train if s.qtype == "exist"]
    assert 0.35 < exist.count("yes") / len(exist) < 0.65  # balanced yes / no
    prior = question_only_prior(train, SpatialVQA("test", 0).take(400))
    assert prior["spatial"] < 0.45  # the question alone says little about the side


def test_spatial_answers_follow_the_drawn_positions():
    for s in SpatialVQA("test", 1).take(40):
        if s.qtype != "spatial":
            continue
        words = s.question.split()
        ref = next(o for o in s.objects if o.colour == words[4] and o.shape == words[5])
        obj = next(o for o in s.objects if o.colour == words[8] and o.shape == words[9])
        pixels = torch.from_numpy(__import__("numpy").asarray(s.image).copy())
        assert s.answer in ("left", "right", "above", "below")
        dx, dy = obj.col - ref.col, obj.row - ref.row
        expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
        assert s.answer == expected
        cell = 12  # the object's colour is drawn at its cell's centre
        cy, cx = obj.row * cell + cell // 2, obj.col * cell + cell // 2
        assert pixels[cy, cx].tolist() != [245, 245, 245]


def test_position_questions_answer_the_named_objects_cell_and_stay_out_of_the_default_mix():
    from seekdeep.multimodal.data import AUX_TYPES, POSITION_WORDS
    from seekdeep.recipes.vlm import training_data

    for split in ("train", "heldout"):
        samples = SpatialVQA(split, 2, qtypes=AUX_TYPES).take(40)
        for s in samples:
            words = s.question.split()  # which column|row is the C S in ?
            o = next(o for o in s.objects if (o.colour, o.shape) == (words[4], words[5]))
            assert s.answer == POSITION_WORDS[o.col if s.qtype == "column" else o.row]
        if split == "heldout":  # the held-out combinations are the ones asked about
            assert all((s.question.split()[4], s.question.split()[5]) in HELD_OUT for s in samples)
    assert {s.qtype for s in training_data(VLMTrainConfig()).take(12)} == set(QUESTION_TYPES)
    assert {s.qtype for s in training_data(VLMTrainConfig(position_questions=True)).take(12)} == {*QUESTION_TYPES, *AUX_TYPES}
    with pytest.raises(ConfigError, match="qtypes"):
        SpatialVQA("train", qtypes=("where",))


def test_question_loss_and_caption_rows_label_the_right_tokens():
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor
    from seekdeep.recipes.vlm import build_model, build_tokenizer, encode_batch

    cfg = VLMTrainConfig(hidden_size=32, vision_layers=1, text_layers=1)
    tok = build_tokenizer()
    proc = MultimodalProcessor.for_model(build_model(cfg, tok), tok, ImageProcessor(ImageProcessorConfig.clip(48)))
    samples = SpatialVQA("train", 0).take(2)
    plain = encode_batch(proc, samples, train=True)
    full = encode_batch(proc, samples, train=True, question_loss=True, captions=[False, True])
    words = lambda ids: [w for w in tok.convert_ids_to_tokens([i for i in ids if i != -100]) if w != "<pad>"]
    assert words(plain["labels"][0].tolist()) == [samples[0].answer, "<eos>"]
    # the question's words (not bos, not the image placeholders) and the answer
    assert words(full["labels"][0].tolist()) == ["question:", *samples[0].question.split(), "answer:", samples[0].answer, "<eos>"]
    # a caption row: every object's colour, column, row, shape, as drawn
    caption = words(full["labels"][1].tolist())
    assert caption[-1] == "<eos>" and len(caption) == 4 * len(samples[1].objects) + 1
    for k, o in enumerate(samples[1].objects):
        assert caption[4 * k : 4 * k + 4] == [o.colour, ("one", "two", "three", "four")[o.col], ("one", "two", "three", "four")[o.row], o.shape]
    # training rows keep the image: the placeholders are never labelled
    image_id = proc.image_token_id
    assert not ((full["input_ids"] == image_id) & (full["labels"] != -100)).any()


def test_word_embeddings_start_at_embed_std_and_stay_tied():
    from seekdeep.recipes.vlm import build_model, build_tokenizer

    tok = build_tokenizer()
    for std in (1.0, 0.08):
        model = build_model(VLMTrainConfig(hidden_size=32, vision_layers=1, text_layers=1, embed_std=std), tok)
        emb = model.get_input_embeddings().weight
        assert abs(emb.std().item() - std) < 0.15 * std
        assert model.language_model.lm_head.weight is emb  # tied: the answer is read through the same table
        assert model.multi_modal_projector.linear_1.weight.std().item() < 0.2  # the linears keep init_std
    with pytest.raises(ConfigError, match="embed_std"):
        VLMTrainConfig(embed_std=0)


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="fusion"):
        VLMTrainConfig(fusion="late")
    with pytest.raises(ConfigError, match="patch_size"):
        VLMTrainConfig(image_size=48, patch_size=10)
    with pytest.raises(ConfigError, match="split"):
        SpatialVQA("validation")


def test_grounded_answers_name_the_drawn_cells_and_are_scored_on_the_last_word():
    from seekdeep.multimodal.data import POSITION_WORDS, grounded_answer
    from seekdeep.multimodal.image_processing import ImageProcessor, ImageProcessorConfig
    from seekdeep.multimodal.processing import MultimodalProcessor
    from seekdeep.recipes.vlm import GROUNDED_TOKENS, build_model, build_tokenizer, encode_batch, predict

    samples = SpatialVQA("heldout", 4, qtypes=("spatial", "count")).take(12)
    for s in samples:
        g = grounded_answer(s).split()
        if s.qtype != "spatial":
            assert g == [s.answer]
            continue
        words = s.question.split()
        ref = next(o for o in s.objects if (o.colour, o.shape) == (words[4], words[5]))
        obj = next(o for o in s.objects if (o.colour, o.shape) == (words[8], words[9]))
        assert g == [ref.colour, POSITION_WORDS[ref.col], POSITION_WORDS[ref.row], obj.colour, POSITION_WORDS[obj.col],
                     POSITION_WORDS[obj.row], s.answer]
        assert len(g) + 1 == GROUNDED_TOKENS  # + eos
    tok = build_tokenizer()
    model = build_model(VLMTrainConfig(hidden_size=32, vision_layers=1, text_layers=1), tok)
    proc = MultimodalProcessor.for_model(model, tok, ImageProcessor(ImageProcessorConfig.clip(48)))
    batch = encode_batch(proc, samples[:2], train=True, grounded=True)
    labelled = [w for w in tok.convert_ids_to_tokens([i for i in batch["labels"][0].tolist() if i != -100])]
    assert labelled == grounded_answer(samples[0]).split() + ["<eos>"]
    # the answer is the last generated word before eos; one token, the first word
    texts: list[str] = []
    long = predict(model, proc, samples[:4], max_new_tokens=GROUNDED_TOKENS, texts=texts)
    short = predict(model, proc, samples[:4])
    for word, text, first in zip(long, texts, short):
        assert word == (text.split()[-1] if text else word) and (not text or text.split()[0] == first)


def test_caption_stage_and_feature_layers():
    from seekdeep.recipes.vlm import build_model, build_tokenizer, caption_rows

    cfg = VLMTrainConfig(steps=10, warmup=1, batch_size=4, caption_steps=3, caption_every=2)
    assert [caption_rows(cfg, s) for s in (0, 2)] == [[True] * 4] * 2  # the caption stage: captions only
    assert caption_rows(cfg, 3) == [False, True, False, True]  # then the mix (every 2nd row a caption)
    assert caption_rows(VLMTrainConfig(steps=10, warmup=1, batch_size=4, caption_steps=3), 3) == [False] * 4
    with pytest.raises(ConfigError, match="caption_steps"):
        VLMTrainConfig(steps=10, warmup=1, caption_steps=10)  # no question step left
    # the projector reads the concatenated hidden states named by vision_feature_layer
    cfg = VLMTrainConfig(hidden_size=32, vision_layers=1, text_layers=1, vision_feature_layer="0,-1")
    model = build_model(cfg, build_tokenizer()).eval()
    assert model.config.vision_feature_layer == [0, -1] and model.multi_modal_projector.linear_1.in_features == 64
    pixels = torch.randn(2, 3, 48, 48)
    states = model.vision_tower(pixels, output_hidden_states=True).hidden_states
    expected = model.multi_modal_projector(torch.cat([states[0][:, 1:], states[-1][:, 1:]], -1))
    torch.testing.assert_close(model.get_image_features(pixels), expected)
    for bad in ("2", "x", "", "0,-3"):
        with pytest.raises(ConfigError, match="vision_feature_layer"):
            VLMTrainConfig(vision_layers=1, vision_feature_layer=bad)


def test_spatial_weight_tilts_the_training_stream_only():
    from collections import Counter

    from seekdeep.recipes.vlm import training_data

    counts = Counter(s.qtype for s in training_data(VLMTrainConfig(spatial_weight=3)).take(60))
    assert counts == {"spatial": 30, "shape": 10, "exist": 10, "count": 10}
    default = training_data(VLMTrainConfig()).take(8)  # weight 1: the balanced stream, sample for sample
    assert [s.question for s in default] == [s.question for s in SpatialVQA("train", 0, 48).take(8)]
    with pytest.raises(ConfigError, match="spatial_weight"):
        VLMTrainConfig(spatial_weight=0)
