"""The server's request checks, streaming detokenization and image decoding (no HTTP involved)."""

import base64
import io
import zlib

import pytest
from PIL import Image

from vlmkit.data.images import ImageError, load_image_bytes
from vlmkit.serve.errors import APIError
from vlmkit.serve.protocol import ImageRef, parse_chat_request
from vlmkit.serve.text import TextStream

USER = [{"role": "user", "content": "hi"}]


def png_bytes(size=(8, 6), color=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def bad(body, param, status=400, match=""):
    with pytest.raises(APIError) as info:
        parse_chat_request(body, max_tokens_limit=512)
    assert info.value.status == status
    assert info.value.param == param, info.value.message
    assert match in info.value.message
    return info.value


def test_a_full_request_is_parsed():
    req = parse_chat_request({
        "model": "m", "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n", "x"], "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}, "n": 1, "user": "me",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                         {"type": "text", "text": "what?"},
                         {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}, 512)
    assert [m.role for m in req.messages] == ["system", "user", "assistant"]
    assert [r.param for r in req.images] == ["messages[1].content[0].image_url.url",
                                             "messages[1].content[2].image_url.url"]
    assert req.messages[1].parts[1] == "what?"
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (5, 0.5, 0.9, ["\n", "x"], 3)
    assert req.stream and req.include_usage
    defaults = parse_chat_request({"messages": USER, "stop": "END", "max_tokens": 7}, 512)
    assert (defaults.temperature, defaults.top_p, defaults.stop, defaults.max_tokens) == (1.0, 1.0, ["END"], 7)
    assert not defaults.stream and defaults.seed is None


def test_every_malformed_field_is_a_400_naming_it():
    bad([], None, match="must be a JSON object")
    bad({}, "messages", match="required")
    bad({"messages": "hi"}, "messages", match="must be an array")
    bad({"messages": []}, "messages", match="at least one")
    bad({"messages": [3]}, "messages[0]")
    bad({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", match="'wizard' is not supported")
    bad({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", match="tool calls")
    bad({"messages": [{"role": "user"}]}, "messages[0].content")
    bad({"messages": [{"role": "user", "content": 5}]}, "messages[0].content")
    bad({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content")
    bad({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type")
    bad({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text")
    bad({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
        "messages[0].content[0].image_url")
    bad({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]},
        "messages[0].content[0]", match="only user messages")
    bad({"messages": USER, "max_tokens": -1}, "max_tokens", match="between 1 and 512")
    bad({"messages": USER, "max_tokens": 10**12}, "max_tokens", match="between 1 and 512")
    bad({"messages": USER, "max_tokens": "5"}, "max_tokens", match="must be an integer")
    bad({"messages": USER, "max_tokens": True}, "max_tokens")
    bad({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens")
    bad({"messages": USER, "temperature": 2.5}, "temperature")
    bad({"messages": USER, "temperature": float("nan")}, "temperature")
    bad({"messages": USER, "top_p": 0}, "top_p", match="greater than 0")
    bad({"messages": USER, "stop": ["a", ""]}, "stop")
    bad({"messages": USER, "stop": ["a"] * 5}, "stop", match="at most 4")
    bad({"messages": USER, "stop": 3}, "stop")
    bad({"messages": USER, "seed": 1.5}, "seed")
    bad({"messages": USER, "stream": "yes"}, "stream")
    bad({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", match="only allowed")
    bad({"messages": USER, "n": 2}, "n", match="one choice per request")
    bad({"messages": USER, "n": 0}, "n")
    bad({"messages": USER, "logprobs": True}, "logprobs", match="not supported")
    bad({"messages": USER, "tools": [{"type": "function"}]}, "tools")
    bad({"messages": USER, "model": 7}, "model")
    err = bad({"messages": USER, "frobnicate": 1}, "frobnicate", match="unrecognized")
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": "frobnicate",
                                    "code": "unknown_parameter"}}


def test_text_stream_holds_back_partial_stop_sequences_and_characters():
    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\xe2", 6: "\x82\xac", 7: "!"}  # 5+6: "€" split in bytes

    def decode(tokens):
        return b"".join(pieces[t].encode("latin-1") for t in tokens).decode("utf-8", errors="replace")

    stream = TextStream(decode, stop=["world"])
    assert [stream.push(t) for t in (1, 2, 3)] == ["Hel", "lo", " "]  # "wo" may begin "world": it waits
    assert stream.push(4) == "" and stream.stopped and stream.sent == "Hello "
    assert stream.finish() == ""

    stream = TextStream(decode, stop=["xyz"])
    assert [stream.push(t) for t in (1, 5)] == ["Hel", ""]  # half a character waits
    assert stream.push(6) == "€"
    assert stream.push(7) == "!" and not stream.stopped
    stream = TextStream(decode, stop=["lo!"])
    assert [stream.push(t) for t in (1, 2)] == ["He", "l"]  # "l", then "lo", may begin "lo!"
    assert stream.finish() == "lo"  # generation ended: the held-back tail is sent


def test_image_bytes_decode_with_limits():
    image = load_image_bytes(png_bytes((8, 6)), max_pixels=48)
    assert image.size == (8, 6) and image.mode == "RGB"
    with pytest.raises(ImageError, match="8 x 6 = 48 pixels is more than the limit of 47") as info:
        load_image_bytes(png_bytes((8, 6)), max_pixels=47)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageError, match="not an image") as info:
        load_image_bytes(b"hello world")
    assert info.value.kind == "not_an_image"
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image_bytes(png_bytes((64, 64))[:-30])
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    with pytest.raises(ImageError, match="accepted: PNG"):
        load_image_bytes(tiff.getvalue())  # a format outside the web formats


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header of `width` x `height` (grey) with a tiny compressed body: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header():
    data = bomb_png(100_000, 100_000)  # 10 gigapixels in ~100 bytes
    assert len(data) < 200
    with pytest.raises(ImageError) as info:
        load_image_bytes(data, max_pixels=40_000_000)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,@@@@", "invalid_base64"),
    ("data:text/plain;base64,aGk=", "invalid_image_url"),
    ("data:image/png,abc", "invalid_image_url"),
    ("ftp://x/y.png", "invalid_image_url"),
    ("http://127.0.0.1:9/x.png", "remote_images_disabled"),
])
def test_image_urls_that_are_refused(url, code):
    import asyncio

    from vlmkit.serve.images import ImageLimits, image_bytes

    with pytest.raises(APIError) as info:
        asyncio.run(image_bytes(ImageRef(url, "messages[0].content[0].image_url.url"), ImageLimits()))
    assert info.value.status == 400 and info.value.code == code
    assert info.value.param == "messages[0].content[0].image_url.url"


def test_a_data_url_decodes():
    import asyncio

    from vlmkit.serve.images import ImageLimits, decode_image, image_bytes

    ref = ImageRef("data:image/png;base64," + base64.b64encode(png_bytes()).decode(), "p")
    data = asyncio.run(image_bytes(ref, ImageLimits()))
    assert decode_image(data, ref, ImageLimits()).size == (8, 6)
    with pytest.raises(APIError, match="pixels is more than the limit") as info:
        decode_image(data, ref, ImageLimits(max_pixels=10))
    assert info.value.status == 400 and info.value.code == "image_too_large"
