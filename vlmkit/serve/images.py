"""Images of a request: ``data:`` URLs (base64), or with `allow_remote` ``http(s)://`` URLs fetched with
size and time limits. Every failure is a 400 naming the request field; nothing is decoded past the
pixel limit (see `vlmkit.data.images.load_image_bytes`).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from PIL import Image

from vlmkit.data.images import WEB_FORMATS, ImageError, load_image_bytes
from vlmkit.serve.errors import APIError, invalid
from vlmkit.serve.protocol import ImageRef


@dataclass
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding or as downloaded
    max_pixels: int = 40_000_000  # width x height, checked before decoding
    fetch_timeout: float = 10.0  # seconds for a whole remote download
    allow_remote: bool = False


def _decode_data_url(ref: ImageRef, limits: ImageLimits) -> bytes:
    header, comma, payload = ref.url.partition(",")
    media = header[len("data:"):].split(";")
    if not comma or not media[0].startswith("image/") or "base64" not in media[1:]:
        raise invalid(f"'{ref.param}' must be a base64 data URL such as 'data:image/png;base64,...' (got "
                      f"'{header[:40]}')", ref.param, "invalid_image_url")
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise APIError(413, f"'{ref.param}' holds more than {limits.max_bytes:,} bytes of image data", param=ref.param,
                       code="image_too_large")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"'{ref.param}' is not valid base64 ({err})", ref.param, "invalid_base64") from None


async def _fetch(ref: ImageRef, limits: ImageLimits) -> bytes:
    import anyio
    import httpx

    data = bytearray()
    try:
        with anyio.fail_after(limits.fetch_timeout):
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=3,
                                         timeout=limits.fetch_timeout) as client:
                async with client.stream("GET", ref.url) as response:
                    if response.status_code != 200:
                        raise invalid(f"'{ref.param}': fetching the image answered HTTP {response.status_code}",
                                      ref.param, "image_fetch_failed")
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limits.max_bytes:
                            raise APIError(413, f"'{ref.param}': the image is larger than {limits.max_bytes:,} bytes",
                                           param=ref.param, code="image_too_large")
    except TimeoutError:
        raise invalid(f"'{ref.param}': fetching the image took longer than {limits.fetch_timeout:g} s", ref.param,
                      "image_fetch_failed") from None
    except httpx.HTTPError as err:
        raise invalid(f"'{ref.param}': fetching the image failed ({type(err).__name__}: {err})", ref.param,
                      "image_fetch_failed") from None
    return bytes(data)


async def image_bytes(ref: ImageRef, limits: ImageLimits) -> bytes:
    """The encoded image a reference points at."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        data = _decode_data_url(ref, limits)
    elif scheme in ("http", "https"):
        if not limits.allow_remote:
            raise invalid(f"'{ref.param}': remote image URLs are disabled on this server; send the image inline as "
                          "a data URL ('data:image/png;base64,...'), or start the server with --allow-remote-images",
                          ref.param, "remote_images_disabled")
        data = await _fetch(ref, limits)
    else:
        raise invalid(f"'{ref.param}' must be a 'data:image/...;base64,' URL"
                      f"{' or an http(s) URL' if limits.allow_remote else ''}", ref.param, "invalid_image_url")
    if len(data) > limits.max_bytes:
        raise APIError(413, f"'{ref.param}' holds more than {limits.max_bytes:,} bytes of image data", param=ref.param,
                       code="image_too_large")
    return data


def decode_image(data: bytes, ref: ImageRef, limits: ImageLimits) -> Image.Image:
    """Bytes -> an RGB image, or a 400 naming the field (not an image, truncated, too many pixels)."""
    try:
        return load_image_bytes(data, max_pixels=limits.max_pixels, formats=WEB_FORMATS, name=f"'{ref.param}'")
    except ImageError as err:
        raise invalid(str(err), ref.param, "invalid_image" if err.kind != "too_large" else "image_too_large") from None
