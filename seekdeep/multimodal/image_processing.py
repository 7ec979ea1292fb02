"""Image preprocessing in the shape of transformers' CLIPImageProcessor / SiglipImageProcessor
(PIL + numpy, no torchvision): RGB conversion (transparency composited onto white), resize
(shortest edge or a fixed size, PIL bicubic), centre crop, rescale and normalise; reads and
writes ``preprocessor_config.json``. Also decodes untrusted image bytes with limits."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from seekdeep.errors import ConfigError, SeekdeepError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
PROCESSOR_NAME = "preprocessor_config.json"
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}
#: default cap on decoded image size (pixels), against decompression bombs
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(SeekdeepError, ValueError):
    """An image payload is corrupt, not an image, too large, or images are not accepted."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def decode_image(data: bytes, field: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode PNG / JPEG / ... bytes into an RGB-convertible PIL image, checking the pixel
    count from the header before decoding the pixels."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ImageError(field, "empty image payload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(field, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(field, f"image too large ({exc})") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ... on bad bytes
        raise ImageError(field, f"not a readable image ({type(exc).__name__}: {exc}); accepted: PNG, JPEG, GIF, WEBP, BMP bytes") from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class ImageProcessorConfig:
    """``size``: ``{"shortest_edge": n}`` (keep aspect ratio) or ``{"height": h, "width": w}``."""

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict[str, int] | None = field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN
    image_std: Sequence[float] = OPENAI_CLIP_STD
    image_processor_type: str = "CLIPImageProcessor"

    def __post_init__(self) -> None:
        if not isinstance(self.size, dict) or not (set(self.size) == {"shortest_edge"} or set(self.size) == {"height", "width"}):
            raise ConfigError("size", f"must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {self.size!r}")
        if any(not isinstance(v, int) or v <= 0 for v in self.size.values()):
            raise ConfigError("size", f"sizes must be positive integers, got {self.size!r}")
        if self.do_center_crop and (not isinstance(self.crop_size, dict) or set(self.crop_size) != {"height", "width"}):
            raise ConfigError("crop_size", f"must be {{'height': h, 'width': w}} when do_center_crop, got {self.crop_size!r}")
        if self.resample not in _RESAMPLE:
            raise ConfigError("resample", f"unsupported {self.resample!r}; accepted: PIL resampling codes {sorted(_RESAMPLE)}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = [float(value)] * 3
            if len(value) != 3:
                raise ConfigError(name, f"needs 3 values (R, G, B), got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.image_std):
            raise ConfigError("image_std", f"must be positive, got {self.image_std!r}")

    @classmethod
    def clip(cls, size: int = 224) -> "ImageProcessorConfig":
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    @classmethod
    def siglip(cls, size: int = 224) -> "ImageProcessorConfig":
        return cls(size={"height": size, "width": size}, crop_size=None, do_center_crop=False, image_mean=IMAGENET_STANDARD,
                   image_std=IMAGENET_STANDARD, image_processor_type="SiglipImageProcessor")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kind = str(d.get("image_processor_type", "CLIPImageProcessor"))
        if kind.startswith("Siglip") and "crop_size" not in d:
            kwargs.setdefault("do_center_crop", False)
            kwargs["crop_size"] = None
        kwargs["image_processor_type"] = kind.removesuffix("Pil").removesuffix("Fast")
        return cls(**kwargs)


class ImageProcessor:
    """``processor(images, return_tensors="pt")["pixel_values"]`` -> (N, 3, H, W) float32."""

    def __init__(self, config: ImageProcessorConfig | None = None, **overrides: Any):
        self.config = config or ImageProcessorConfig(**overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessor":
        from seekdeep.files import read_json

        file = Path(path) / PROCESSOR_NAME
        if not file.is_file():
            raise ConfigError(PROCESSOR_NAME, f"not found in {path}")
        return cls(ImageProcessorConfig.from_dict(read_json(file)))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from seekdeep.files import write_json_atomic

        Path(path).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path) / PROCESSOR_NAME, self.config.to_dict())

    @property
    def output_size(self) -> tuple[int, int]:
        c = self.config
        if c.do_center_crop:
            return c.crop_size["height"], c.crop_size["width"]
        if "height" in c.size:
            return c.size["height"], c.size["width"]
        raise ConfigError("size", "a shortest_edge resize without a centre crop gives images of varying size")

    def _resize(self, image: Image.Image) -> Image.Image:
        c = self.config
        width, height = image.size
        if "shortest_edge" in c.size:
            short, long = sorted((width, height))
            new_short, new_long = c.size["shortest_edge"], int(c.size["shortest_edge"] * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_w, new_h = c.size["width"], c.size["height"]
        return image.resize((new_w, new_h), resample=_RESAMPLE[c.resample])

    def preprocess_one(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """(3, H, W) float32 for one image (PIL image or (H, W, 3) uint8 array)."""
        c = self.config
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise ImageError("images", f"arrays must be (H, W, 3|4) uint8, got {image.shape} {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ImageError("images", f"expected PIL images or (H, W, 3) uint8 arrays, got {type(image).__name__}")
        if c.do_convert_rgb:
            image = to_rgb(image)
        if c.do_resize:
            image = self._resize(image)
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        array = array.transpose(2, 0, 1)  # (C, H, W)
        if c.do_center_crop:
            ch, cw = c.crop_size["height"], c.crop_size["width"]
            h, w = array.shape[1:]
            if ch > h or cw > w:
                raise ImageError("images", f"image resized to {h}x{w} is smaller than crop_size {ch}x{cw}")
            top, left = (h - ch) // 2, (w - cw) // 2
            array = array[:, top : top + ch, left : left + cw]
        array = array.astype(np.float64) * c.rescale_factor if c.do_rescale else array
        array = array.astype(np.float32)
        if c.do_normalize:
            mean = np.asarray(c.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(c.image_std, dtype=np.float32)[:, None, None]
            array = (array - mean) / std
        return np.ascontiguousarray(array, dtype=np.float32)

    def __call__(self, images, return_tensors: str | None = "pt") -> dict[str, Any]:
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise ImageError("images", "pass an image or a non-empty list of images")
        arrays = [self.preprocess_one(image) for image in images]
        if return_tensors == "pt":
            return {"pixel_values": torch.from_numpy(np.stack(arrays))}
        if return_tensors == "np":
            return {"pixel_values": np.stack(arrays)}
        if return_tensors is None:
            return {"pixel_values": arrays}
        raise ConfigError("return_tensors", f"unsupported {return_tensors!r}; accepted: 'pt', 'np', None")

    preprocess = __call__
