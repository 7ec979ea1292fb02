"""Audio: WAV reading (stdlib wave), log-mel with torch.stft, the encoder, and the generated
aligned data (deterministic, learnable from audio alone)."""

import wave

import numpy as np
import pytest
import torch

from seekdeep.multimodal.align_data import DIGIT_WORDS, WordTokenizer, caption_words, scene_captions, synth_spoken_digit
from seekdeep.multimodal.audio import AudioConfig, AudioEncoder, AudioError, LogMel, mel_filterbank, mel_to_hz, hz_to_mel, read_wav, write_wav


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_wav_round_trip_widths_channels_and_resampling(tmp_path):
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / 8000)).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, 8000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and np.abs(y - x).max() < 1 / 32767 + 1e-6
    # stereo 24-bit written by hand: left = +v, right = -v/2 -> mono mean v/4
    v = np.array([0.5, -0.25, 0.125])
    frames = b""
    for s in v:
        for c in (s, -s / 2):
            frames += int(round(c * (1 << 23))).to_bytes(3, "little", signed=True)
    with wave.open(str(tmp_path / "s.wav"), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(3)
        f.setframerate(16000)
        f.writeframes(frames)
    y, rate = read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(y, v / 4, atol=1e-6)
    y, rate = read_wav(tmp_path / "a.wav", sample_rate=16000)
    assert rate == 16000 and len(y) == 1600
    (tmp_path / "bad.wav").write_bytes(b"ID3 not a wave")
    with pytest.raises(AudioError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")


def test_mel_filterbank_and_log_mel_locate_a_tone():
    assert float(mel_to_hz(hz_to_mel(1000.0))) == pytest.approx(1000.0)
    fb = mel_filterbank(32, 256, 8000)
    assert fb.shape == (32, 129) and float(fb.max()) <= 1.0 + 1e-6
    cfg = AudioConfig()
    mel = LogMel(cfg)
    for hz in (300.0, 1000.0, 2500.0):
        tone = torch.sin(2 * torch.pi * hz * torch.arange(4000) / 8000)[None]
        out = mel(tone)  # (1, M, T)
        assert out.shape == (1, 32, 4000 // 80 + 1)
        centres = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(4000), 34))[1:-1]
        band = int(out[0].mean(-1).argmax())
        assert abs(centres[band] - hz) < 0.15 * hz + 60


def test_audio_encoder_batch_equals_per_sample_and_validates():
    torch.manual_seed(0)
    enc = AudioEncoder(AudioConfig(num_layers=1)).eval()
    clips = torch.randn(3, 2000) * 0.1
    with torch.no_grad():
        batch = enc(clips)
        alone = torch.cat([enc(clips[i : i + 1]) for i in range(3)])
        # a zero-padded longer batch with the true lengths gives the same valid-frame pool for
        # every frame the padding cannot reach
        padded = enc(torch.nn.functional.pad(clips, (0, 800)), num_samples=torch.tensor([2000, 2000, 2000]))
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert (padded - batch).norm() / batch.norm() < 0.1
    from seekdeep.errors import ConfigError

    with pytest.raises(ConfigError, match="audio"):
        enc(torch.zeros(2, 10))
    with pytest.raises(ConfigError, match="audio"):
        enc(torch.zeros(2, 3, 100))


def test_synthesised_digits_are_deterministic_and_class_separable():
    a = synth_spoken_digit(7, np.random.default_rng([0, 5]))
    b = synth_spoken_digit(7, np.random.default_rng([0, 5]))
    assert np.array_equal(a, b) and a.dtype == np.float32 and np.abs(a).max() <= 1
    mel = LogMel(AudioConfig())
    feats, labels = [], []
    for i in range(300):
        label = i % 10
        x = torch.from_numpy(synth_spoken_digit(label, np.random.default_rng([1, i])))[None]
        m = mel(x)[0]  # (M, T)
        feats.append(torch.nn.functional.adaptive_avg_pool1d(m[None], 6)[0].flatten())
        labels.append(label)
    feats, labels = torch.stack(feats), torch.tensor(labels)
    feats = (feats - feats[:200].mean(0)) / feats[:200].std(0)
    centroids = torch.stack([feats[:200][labels[:200] == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats[200:], centroids).argmin(1)
    assert (pred == labels[200:]).float().mean() > 0.4  # nearest centroid on pooled log-mel (chance 0.1; room noise at -4..10 dB)


def test_tokenizer_and_scene_captions_repeat():
    tok = WordTokenizer(caption_words())
    out = tok(["the digit seven", "seven"])
    assert out["input_ids"][0].tolist() == [tok.bos_token_id, tok.ids["the"], tok.ids["digit"], tok.ids["seven"], tok.eos_token_id]
    assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert tok.eos_token_id != 2 and set(DIGIT_WORDS) <= set(tok.vocab)
    images, captions = scene_captions(60)
    assert images[0].size == (32, 32) and len(set(captions)) < 60
    assert scene_captions(5)[1] == captions[:5]
