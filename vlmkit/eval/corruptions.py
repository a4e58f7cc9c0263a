"""Deterministic image corruptions with a severity scale, for out-of-distribution stress tests.

Every corruption is a small pure function ``f(pixels, severity, rng) -> pixels`` on RGB uint8 arrays
``[H, W, 3]`` for severities 1-5, each changing the image more than the last (the mean absolute
difference from the clean image grows with severity; for `jpeg` only on average over images).
`corrupt` is the entry point; it returns an unchanged copy at severity 0. All randomness comes from
``rng``, seeded by `corrupt`, so the same seed always gives the same image. Strengths are tuned on
64 px shapes-world scenes; spatial parameters (blur radius, texture period) scale with the image side.

`CORRUPTIONS` is the registry, keyed by the name that appears in reports.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

MAX_SEVERITY = 5
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

__all__ = ["CORRUPTIONS", "MAX_SEVERITY", "corrupt"]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _level(values: tuple[float, ...], severity: int) -> float:
    """The parameter for `severity` 1..5 (index 0 is never used: severity 0 is the identity)."""
    return values[severity]


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A low-frequency random field in [0, 1]: a coarse grid of uniform values, bicubically upsampled."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32) / 255.0


def fog(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blend toward a patchy light-grey haze; severity sets the haze opacity."""
    h, w, _ = pixels.shape
    haze = 200.0 + 55.0 * _smooth_field(rng, h, w, cells=4)  # uneven, like real fog
    alpha = _level((0, 0.2, 0.35, 0.5, 0.65, 0.8), severity)
    return _to_uint8((1 - alpha) * pixels.astype(np.float32) + alpha * haze[..., None])


def low_light(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Under-exposure: scale brightness down (gamma > 1 darkens mid-tones first) plus faint sensor noise."""
    gain = _level((1, 0.6, 0.4, 0.25, 0.15, 0.08), severity)
    gamma = _level((1, 1.1, 1.2, 1.3, 1.4, 1.5), severity)
    x = 255.0 * (pixels.astype(np.float32) / 255.0) ** gamma * gain
    return _to_uint8(x + rng.normal(0.0, 2.0, size=x.shape))


def color_cast(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gains along a random zero-mean direction (a white-balance error); can shift hues."""
    direction = rng.normal(size=3)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction)
    gains = 1.0 + _level((0, 0.15, 0.3, 0.45, 0.6, 0.8), severity) * direction
    return _to_uint8(pixels.astype(np.float32) * gains)


def blur(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (defocus); radius in pixels of a 64 px image."""
    radius = _level((0, 0.6, 1.0, 1.5, 2.2, 3.0), severity) * pixels.shape[1] / 64
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))


def noise(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, independent per pixel and channel."""
    sigma = _level((0, 10, 20, 32, 48, 64), severity)
    return _to_uint8(pixels.astype(np.float32) + rng.normal(0.0, sigma, size=pixels.shape))


def jpeg(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression artefacts (blocking, colour bleeding) at decreasing quality.

    The change grows with severity on average, but not for every image: quantisation at a lower
    quality can land slightly closer to the original (about 1 scene in 6 at some step).
    """
    quality = int(_level((100, 40, 20, 10, 5, 2), severity))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def edges(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Outline-only stylisation: fade everything but the edges (kept in their own colour) to white."""
    x = pixels.astype(np.float32)
    grad = np.zeros(x.shape[:2], dtype=np.float32)
    for axis in (0, 1):  # strongest central difference over the three channels
        diff = np.abs(np.roll(x, -1, axis) - np.roll(x, 1, axis)).max(axis=2)
        if axis == 0:
            diff[0], diff[-1] = 0, 0
        else:
            diff[:, 0], diff[:, -1] = 0, 0
        grad = np.maximum(grad, diff)
    edge = np.clip(grad / 60.0, 0.0, 1.0)[..., None]  # a 60-level step counts as a full edge
    outline = edge * x + (1 - edge) * 255.0
    alpha = _level((0, 0.2, 0.4, 0.6, 0.8, 1.0), severity)
    return _to_uint8((1 - alpha) * x + alpha * outline)


def texture(pixels: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Texture fill: modulate every surface with a stripe pattern of random orientation and period."""
    h, w, _ = pixels.shape
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 6.0) * w / 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = 2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
    pattern = 0.5 + 0.5 * np.sign(np.sin(phase))  # hard-edged stripes in {0, 1}
    depth = _level((0, 0.15, 0.3, 0.45, 0.6, 0.75), severity)
    return _to_uint8(pixels.astype(np.float32) * (1 - depth * pattern[..., None]))


CORRUPTIONS: dict[str, Corruption] = {
    "fog": fog,
    "low_light": low_light,
    "color_cast": color_cast,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "edges": edges,
    "texture": texture,
}


def corrupt(image: Image.Image | np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (0 = clean copy, up to `MAX_SEVERITY`) to an RGB image.

    Returns a new uint8 array ``[H, W, 3]``. The same (image, name, severity, seed) always gives the
    same result; for a fixed seed, the random parts (noise field, cast direction, stripe angle) are
    shared across severities, so severities differ only in strength.
    """
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, (int, np.integer)) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an int in 0..{MAX_SEVERITY}, got {severity!r}")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {pixels.dtype} {pixels.shape}")
    if severity == 0:
        return pixels.copy()
    # Seed from the name too, so corruptions sharing a seed do not share random draws.
    rng = np.random.default_rng([seed, *name.encode()])
    return CORRUPTIONS[name](pixels, int(severity), rng)
