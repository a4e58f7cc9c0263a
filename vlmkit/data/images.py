"""Image loading and preprocessing: decode to RGB, resize (bicubic, PIL), scale and normalise; or cut
into AnyRes tiles.

Preprocessing is split in two so datasets can cache compact images: `ImageProcessor.to_uint8`
gives a resized ``[size, size, 3]`` uint8 array (what a cache stores), and
`ImageProcessor.normalize` turns such arrays, or a batch of them, into the float tensors the
vision tower expects. ``processor(image)`` does both.

A processor built with ``grid_pinpoints`` also tiles (LLaVA-NeXT's AnyRes, geometry in `vlmkit.anyres`):
`ImageProcessor.tiles_uint8` gives an image's ``[1 + rows * cols, size, size, 3]`` tiles (the
thumbnail first) and its original size; `ImageProcessor.tiles` the normalised `Tiles`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.anyres import check_grid_pinpoints, fit_within, paste_offset, select_best_resolution

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


@dataclass(frozen=True)
class Tiles:
    """One image as the AnyRes tiles the tower sees: `pixels` [1 + rows * cols, 3, S, S] (the thumbnail,
    then the grid's tiles row by row) and `size`, the original image's (height, width), which decides the
    grid and how many of the tiles' tokens are padding."""

    pixels: torch.Tensor
    size: tuple[int, int]

    def to(self, device: str | torch.device) -> Tiles:
        return Tiles(self.pixels.to(device), self.size)


class ImageProcessor:
    """Resize to ``size x size`` (bicubic), scale to [0, 1] and normalise per channel.

    With `grid_pinpoints` (candidate [height, width]s, multiples of `size`) it also cuts images into
    AnyRes tiles of ``size x size`` (`tiles_uint8`, `tiles`)."""

    def __init__(self, size: int, mean: tuple[float, float, float], std: tuple[float, float, float],
                 grid_pinpoints: list[tuple[int, int]] | None = None):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.grid_pinpoints = None if grid_pinpoints is None else check_grid_pinpoints(grid_pinpoints, size)
        self._mean = torch.tensor(self.mean, dtype=torch.float32)
        self._std = torch.tensor(self.std, dtype=torch.float32)

    @classmethod
    def from_vision_config(cls, cfg: Any) -> ImageProcessor:
        """Build from anything with `image_size`, `image_mean` and `image_std` (e.g. `VisionConfig`)."""
        return cls(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))

    @classmethod
    def from_model_config(cls, cfg: Any) -> ImageProcessor:
        """Build from a `ModelConfig`: the tower's normalisation, and AnyRes tiles of ``image.anyres.base``
        pixels when ``image.anyres`` is set (else `from_vision_config`)."""
        anyres = cfg.image.anyres
        if anyres is None:
            return cls.from_vision_config(cfg.vision)
        return cls(anyres.base, tuple(cfg.vision.image_mean), tuple(cfg.vision.image_std), anyres.grid_pinpoints)

    @property
    def tiling(self) -> bool:
        """Whether images become AnyRes tiles (`tiles`) rather than one resized square."""
        return self.grid_pinpoints is not None

    def __repr__(self) -> str:
        tiling = "" if self.grid_pinpoints is None else f", grid_pinpoints={[list(p) for p in self.grid_pinpoints]}"
        return f"ImageProcessor(size={self.size}, mean={self.mean}, std={self.std}{tiling})"

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

    def tiles_uint8(self, image: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """An image or image path -> (uint8 [n, size, size, 3], original (height, width)): the AnyRes tiles
        (thumbnail first) with `grid_pinpoints`, else the one resized image (n = 1).

        AnyRes: the image is resized (bicubic, aspect ratio kept) to fit the best candidate resolution,
        centred on black (zero) padding, and cut into tiles row by row; the thumbnail is the whole image
        squashed to ``size x size``. As transformers' `LlavaNextImageProcessor`.
        """
        image = load_image(image) if isinstance(image, (str, Path)) else to_rgb(image)
        original = (image.height, image.width)
        thumbnail = self.to_uint8(image)
        if self.grid_pinpoints is None:
            return thumbnail[None], original
        target = select_best_resolution(original, self.grid_pinpoints)
        resized = fit_within(original, target)
        top, left = paste_offset(resized, target)
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        if resized != original:
            image = image.resize((resized[1], resized[0]), Image.Resampling.BICUBIC)
        canvas[top : top + resized[0], left : left + resized[1]] = np.asarray(image, dtype=np.uint8)
        rows, cols, s = target[0] // self.size, target[1] // self.size, self.size
        grid = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
        return np.concatenate([thumbnail[None], grid]), original

    def tiles(self, image: ImageInput) -> Tiles:
        """An image or image path -> normalised `Tiles` (`tiles_uint8`, then `normalize`)."""
        pixels, size = self.tiles_uint8(image)
        return Tiles(self.normalize(pixels), size)

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
