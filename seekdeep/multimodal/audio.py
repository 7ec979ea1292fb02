"""Audio encoder: WAV files read with the stdlib ``wave`` module, log-mel features computed with
``torch.stft`` (no torchaudio), then a strided 1-D conv stem and a transformer encoder pooled
over the valid frames, ending in a projection to the shared embedding size."""

from __future__ import annotations

import math
import os
import wave
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from seekdeep.errors import ConfigError, SeekdeepError
from seekdeep.validate import check_int


class AudioError(SeekdeepError, ValueError):
    """A WAV file that cannot be read (not RIFF/WAVE, compressed, empty)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def read_wav(path: str | os.PathLike, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """-> (mono float32 samples in [-1, 1], sample rate). 8/16/24/32-bit PCM; channels are
    averaged; ``sample_rate`` resamples (linear interpolation) when the file's rate differs."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise AudioError(str(path), f"not a PCM WAV file ({exc})") from exc
    except OSError as exc:
        raise AudioError(str(path), f"cannot be read ({exc})") from exc
    if frames == 0:
        raise AudioError(str(path), "has no samples")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise AudioError(str(path), f"unsupported sample width {width} bytes; accepted: 1-4 (PCM)")
    x = x.reshape(-1, channels).mean(axis=1)  # (samples,)
    if sample_rate is not None and sample_rate != rate:
        n = max(1, round(len(x) * sample_rate / rate))
        x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
        rate = sample_rate
    return x, rate


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit mono PCM, written atomically."""
    from seekdeep.files import atomic_write

    pcm = (np.clip(np.asarray(samples, dtype=np.float64), -1, 1) * 32767).round().astype("<i2")

    def write(tmp: str) -> None:
        with wave.open(tmp, "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(sample_rate)
            f.writeframes(pcm.tobytes())

    atomic_write(path, write)


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)  # HTK


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale, each
    peaking at 1 on its centre frequency."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down))).float()


@dataclass
class AudioConfig:
    sample_rate: int = 8000
    n_fft: int = 256
    hop_length: int = 80
    n_mels: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_frames: int = 512
    projection_dim: int = 32

    def __post_init__(self) -> None:
        check_int("audio.sample_rate", self.sample_rate, lo=1000, hi=192_000)
        for name in ("n_fft", "hop_length", "n_mels", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_frames", "projection_dim"):
            check_int(f"audio.{name}", getattr(self, name), hi=1 << 16)
        if self.n_mels > self.n_fft // 2 + 1:
            raise ConfigError("audio.n_mels", f"{self.n_mels} exceeds the {self.n_fft // 2 + 1} frequency bins of n_fft={self.n_fft}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("audio.num_heads", f"{self.num_heads} must divide hidden_size={self.hidden_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AudioConfig":
        return cls(**d)


class LogMel(nn.Module):
    """(N, samples) -> (N, n_mels, frames) natural-log mel power, floor 1e-6."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.n_fft, self.hop = config.n_fft, config.hop_length
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(config.n_mels, config.n_fft, config.sample_rate), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform.float(), self.n_fft, self.hop, window=self.window, center=True, return_complex=True)  # (N, F, T)
        return torch.log((self.filters @ spec.abs().pow(2)).clamp_min(1e-6))

    def frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        return num_samples // self.hop + 1  # torch.stft with center=True


def sinusoidal(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)[:, : dim // 2]
    return table


class AudioEncoder(nn.Module):
    """``encoder(waveform, num_samples=None)`` -> (N, projection_dim) embeddings.

    ``num_samples`` (N,) gives each clip's true length in a zero-padded batch; padded frames
    are masked out of attention and of the mean pool. (The last frame or two of a shorter clip
    still see the zero padding through the STFT window, so equal-length batches are exact.)"""

    def __init__(self, config: AudioConfig):
        super().__init__()
        c = self.config = config
        self.features = LogMel(c)
        self.stem = nn.Sequential(nn.Conv1d(c.n_mels, c.hidden_size, 3, padding=1), nn.GELU(),
                                  nn.Conv1d(c.hidden_size, c.hidden_size, 3, stride=2, padding=1), nn.GELU())
        self.register_buffer("positions", sinusoidal(c.max_frames, c.hidden_size), persistent=False)
        layer = nn.TransformerEncoderLayer(c.hidden_size, c.num_heads, c.intermediate_size, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)
        self.feature_mean = nn.Parameter(torch.zeros(c.n_mels), requires_grad=False)  # set from data by fit_normalizer
        self.feature_std = nn.Parameter(torch.ones(c.n_mels), requires_grad=False)

    def check_waveform(self, waveform: Any) -> None:
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 2 or not waveform.is_floating_point():
            got = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
            raise ConfigError("audio", f"expected a float tensor (clips, samples), got {got}")
        if waveform.shape[1] < self.config.n_fft // 2 + 1:
            raise ConfigError("audio", f"clips of {waveform.shape[1]} samples are shorter than n_fft // 2 + 1 = {self.config.n_fft // 2 + 1}")
        frames = (waveform.shape[1] // self.config.hop_length + 2) // 2
        if frames > self.config.max_frames:
            raise ConfigError("audio", f"{waveform.shape[1]} samples give {frames} frames; accepted: at most max_frames={self.config.max_frames}")

    @torch.no_grad()
    def fit_normalizer(self, waveform: torch.Tensor) -> None:
        mel = self.features(waveform)  # (N, M, T)
        self.feature_mean.copy_(mel.mean(dim=(0, 2)))
        self.feature_std.copy_(mel.std(dim=(0, 2)).clamp_min(1e-3))

    def hidden(self, waveform: torch.Tensor, num_samples: torch.Tensor | None = None) -> torch.Tensor:
        """(N, hidden_size) pooled states before the projection."""
        self.check_waveform(waveform)
        frames = None if num_samples is None else self.features.frames(num_samples.to(waveform.device))
        return self.encode_features(self.features(waveform), frames)

    def encode_features(self, mel: torch.Tensor, num_frames: torch.Tensor | None = None) -> torch.Tensor:
        """From log-mel features (N, n_mels, T) (precomputed once for a data set): (N, hidden_size)."""
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels:
            raise ConfigError("audio", f"expected log-mel features (clips, {self.config.n_mels}, frames), got {tuple(mel.shape)}")
        mel = (mel - self.feature_mean[:, None]) / self.feature_std[:, None]  # (N, M, T)
        x = self.stem(mel).transpose(1, 2)  # (N, T', C)
        t = x.shape[1]
        if t > self.config.max_frames:
            raise ConfigError("audio", f"{t} frames after the stem; accepted: at most max_frames={self.config.max_frames}")
        if num_frames is None:
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            frames = (num_frames.to(x.device) + 1) // 2  # after the stride-2 conv
            valid = torch.arange(t, device=x.device)[None] < frames[:, None]  # (N, T')
            # frames past a clip's end saw padding through the convs: zeroing keeps them out
            x = x * valid[..., None]
        x = self.encoder(x + self.positions[:t], src_key_padding_mask=~valid)
        x = self.norm(x)
        w = valid[..., None].float()
        return (x * w).sum(1) / w.sum(1).clamp_min(1)

    def forward(self, waveform: torch.Tensor, num_samples: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.hidden(waveform, num_samples))


def save_audio_encoder(encoder: AudioEncoder, directory) -> None:
    """``directory/model.safetensors`` + ``config.json`` (``model_type: seekdeep_audio``)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from seekdeep.files import atomic_write, write_json_atomic

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json_atomic(out / "config.json", {"model_type": "seekdeep_audio", **encoder.config.to_dict()})


def load_audio_encoder(directory) -> AudioEncoder:
    from pathlib import Path

    from safetensors.torch import load_file

    from seekdeep.files import read_json

    d = read_json(Path(directory) / "config.json")
    if d.pop("model_type", None) != "seekdeep_audio":
        raise ConfigError("model_type", f"{directory}/config.json is not a seekdeep audio encoder (model_type seekdeep_audio)")
    encoder = AudioEncoder(AudioConfig.from_dict(d))
    encoder.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    return encoder.eval()
