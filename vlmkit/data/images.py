"""Image loading and preprocessing: decode to RGB, resize (bicubic, PIL), scale and normalise.

Preprocessing is split in two so datasets can cache compact images: `ImageProcessor.to_uint8`
gives a resized ``[size, size, 3]`` uint8 array (what a cache stores), and
`ImageProcessor.normalize` turns such arrays, or a batch of them, into the float tensors the
vision tower expects. ``processor(image)`` does both.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Image.Image | str | Path
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image file cannot be used; the message names the file and the reason.

    `kind` is ``"missing"`` (no such file), ``"not_an_image"``, ``"too_large"`` (over a pixel limit: see
    `load_image_bytes`) or ``"unreadable"`` (truncated, corrupt, too large, no permission).
    """

    def __init__(self, message: str, *, path: str | Path | None = None, kind: str = "unreadable"):
        super().__init__(message)
        self.path = path
        self.kind = kind


def load_image(path: str | Path) -> Image.Image:
    """Open `path`, decode it fully and return an RGB image (transparency composited on white).

    Decoding happens here (not lazily) so that a truncated or corrupt file fails at this call.
    The EXIF orientation is applied, as photo viewers do.
    """
    path = Path(path)

    def fail(reason: str, kind: str) -> ImageError:
        return ImageError(f"cannot load image {path}: {reason}", path=path, kind=kind)

    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(_upright(image))
    except (FileNotFoundError, NotADirectoryError):
        raise fail("file not found", "missing") from None
    except IsADirectoryError:
        raise fail("is a directory", "not_an_image") from None
    except PermissionError:
        raise fail("permission denied", "unreadable") from None
    except UnidentifiedImageError:
        raise fail("not an image file (unknown format)", "not_an_image") from None
    except Image.DecompressionBombError as err:
        raise fail(f"too large ({err})", "unreadable") from None
    except MemoryError:
        raise
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise fail(f"truncated or corrupt ({type(err).__name__}: {err})", "unreadable") from err


# What `load_image_bytes` opens by default: the usual web formats. PIL's other plugins (EPS runs
# Ghostscript, for one) have no place behind a network service.
WEB_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def load_image_bytes(data: bytes, *, max_pixels: int | None = None, formats: Sequence[str] | None = WEB_FORMATS,
                     name: str = "image") -> Image.Image:
    """Decode an image held in memory (e.g. received over the network) to RGB, as `load_image` does.

    The size is checked against `max_pixels` from the header, before any pixel is decoded (PIL
    reads it lazily), so a small file that would expand to gigabytes (a decompression bomb) is refused
    cheaply. `formats`: the PIL formats allowed (None: all). Failures are `ImageError`s naming `name`.
    """
    def fail(reason: str, kind: str) -> ImageError:
        return ImageError(f"cannot load {name}: {reason}", kind=kind)

    try:
        with Image.open(io.BytesIO(data), formats=None if formats is None else list(formats)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise fail(f"{width} x {height} = {width * height:,} pixels is more than the limit of "
                           f"{max_pixels:,}", "too_large")
            image.load()
            return to_rgb(_upright(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        allowed = "" if formats is None else f" (accepted: {', '.join(formats)})"
        raise fail(f"not an image file, or not of an accepted format{allowed}", "not_an_image") from None
    except Image.DecompressionBombError as err:
        raise fail(f"too large ({err})", "too_large") from None
    except MemoryError:
        raise
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise fail(f"truncated or corrupt ({type(err).__name__}: {err})", "unreadable") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; broken EXIF metadata is ignored rather than failing a good image."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels become white; 16-bit grey is scaled, not clipped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255, which turns most of the image white.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB, so callers may close the source


class ImageProcessor:
    """Resize to ``size x size`` (bicubic), scale to [0, 1] and normalise per channel."""

    def __init__(self, size: int, mean: tuple[float, float, float], std: tuple[float, float, float]):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32)
        self._std = torch.tensor(self.std, dtype=torch.float32)

    @classmethod
    def from_vision_config(cls, cfg: Any) -> ImageProcessor:
        """Build from anything with `image_size`, `image_mean` and `image_std` (e.g. `VisionConfig`)."""
        return cls(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))

    def __repr__(self) -> str:
        return f"ImageProcessor(size={self.size}, mean={self.mean}, std={self.std})"

    def __call__(self, image: ImageInput, size: int | None = None) -> torch.Tensor:
        """An image or image path -> float32 tensor [3, size, size] (`size`: default `self.size`)."""
        return self.normalize(self.to_uint8(image, size))

    def to_uint8(self, image: ImageInput, size: int | None = None) -> np.ndarray:
        """An image or image path -> resized RGB uint8 array [size, size, 3] (`size`: default `self.size`)."""
        size = self.size if size is None else size
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if isinstance(image, (str, Path)):
            image = load_image(image)  # already RGB
        else:
            image = to_rgb(image)
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.array(image, dtype=np.uint8)  # a writable copy, detached from PIL

    def normalize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 channels-last [H, W, 3] or [N, H, W, 3] -> float32 [3, H, W] or [N, 3, H, W].

        Tensors stay on their device, so a batch of cached uint8 images can be normalised on the GPU.
        """
        if isinstance(pixels, np.ndarray):
            # torch warns on read-only arrays (np.asarray of a PIL image is one); a uint8 copy is cheap.
            pixels = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        pixels = torch.as_tensor(pixels)
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 pixels (as from to_uint8), got {pixels.dtype}")
        if pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
            raise ValueError(f"normalize expects [H, W, 3] or [N, H, W, 3] pixels, got shape {tuple(pixels.shape)}")
        mean = self._mean.to(pixels.device)[:, None, None]
        std = self._std.to(pixels.device)[:, None, None]
        x = pixels.movedim(-1, -3).to(torch.float32) / 255.0
        return ((x - mean) / std).contiguous()
