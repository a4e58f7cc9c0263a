"""Fuzzing the server: hundreds of generated requests, well-formed and not, never get a 5xx, every error
has OpenAI's body, and the server still answers afterwards (in process, then a few over real HTTP)."""

from __future__ import annotations

import base64
import json

import pytest

from .serve_helpers import live_server, png_data_url, save_tiny_vlm
from .test_serve_protocol import bomb_png

pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install 'vlmkit[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests need the [serve] extra: pip install 'vlmkit[serve]'")
hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in the [dev] extra)")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.engine import Engine  # noqa: E402

PNG = base64.b64decode(png_data_url(1).split(",")[1])
IMAGE_URLS = [
    png_data_url(1), png_data_url(2, size=(9, 70)),
    "data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode(),  # truncated
    "data:image/png;base64," + base64.b64encode(bomb_png(9_000, 9_000)).decode(),  # 81 MP from ~100 bytes
    "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
    "data:image/png;base64,%%%%", "data:text/plain;base64,aGVsbG8=", "data:", "", "http://127.0.0.1:9/x.png",
    "file:///etc/passwd", "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 40).decode(),
]

leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=12))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)
urls = st.sampled_from(IMAGE_URLS) | st.text(max_size=20)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40) | leaves}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": urls}) | values}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "input_audio", "file"])}),
    values,
)
contents = st.text(max_size=60) | st.lists(parts, max_size=5) | leaves
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "developer", "tool", "robot"]) | leaves,
     "content": contents}) | values
small_ints = st.integers(-3, 12)
params = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "tiny", "gpt-4o"]) | leaves,
    "max_tokens": small_ints | st.integers(-2**66, 2**66) | leaves,
    "max_completion_tokens": small_ints | leaves,
    "temperature": st.floats(-1, 3) | leaves, "top_p": st.floats(-0.5, 1.5) | leaves,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | leaves,
    "seed": st.integers(-2**70, 2**70) | leaves, "stream": st.booleans() | leaves,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | leaves}) | leaves,
    "n": st.integers(-1, 3) | leaves, "logprobs": st.booleans() | leaves, "tools": values, "user": leaves,
    "frobnicate": leaves,
})
# Requests a client would send (the images may still be bad ones): they reach the model.
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                        "content": st.text(max_size=30)}), max_size=2)
questions = st.builds(lambda images, text: {"role": "user", "content": [
    *({"type": "image_url", "image_url": {"url": url}} for url in images), {"type": "text", "text": text}]},
    st.lists(st.sampled_from(IMAGE_URLS[:2] * 3 + IMAGE_URLS[2:]), max_size=3), st.text(max_size=40))
sampling = st.fixed_dictionaries({"max_tokens": st.integers(1, 6) | st.integers(1, 6) | st.none()}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "stop": st.lists(st.text(min_size=1, max_size=2), max_size=2), "seed": st.integers(0, 2**40),
    "stream": st.booleans(), "model": st.just("tiny")})
plausible = st.builds(lambda t, q, p: {"messages": [*t, q], **p}, turns, questions, sampling)
bodies = st.one_of(
    plausible,
    st.builds(lambda m, p: {"messages": m, **p}, st.lists(messages, max_size=4), params),  # well-shaped
    st.builds(lambda m, p: {"messages": m, **p}, values, params),
    values,
)
payloads = bodies.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=80) | st.text(max_size=40).map(str.encode)


def check(status: int, content_type: str, text: str) -> None:
    assert status < 500, text
    if status == 200:
        if content_type.startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]"), text
            return
        body = json.loads(text)
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert isinstance(body["choices"][0]["message"]["content"], str)
    else:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("fuzz") / "tiny"
    # A short context keeps generation short when a request gives no max_tokens.
    save_tiny_vlm(path, tokenizer, lm={"max_position_embeddings": 64})
    return path


def fuzz(send, examples: int) -> list[int]:
    statuses: list[int] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(payload=payloads)
    def one(payload: bytes) -> None:
        status, content_type, text = send(payload)
        check(status, content_type, text)
        statuses.append(status)

    one()
    return statuses


def test_hundreds_of_generated_requests_never_get_a_5xx(engine_dir):
    engine = Engine.from_dir(engine_dir, device="cpu", precision="fp32", max_batch=4)
    with TestClient(create_app(engine), raise_server_exceptions=True) as client:
        def send(payload: bytes):
            r = client.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
            return r.status_code, r.headers.get("content-type", ""), r.text

        statuses = fuzz(send, 520)
        assert len(statuses) >= 500
        # Both were exercised: answers (the model ran) and refusals.
        assert statuses.count(200) >= 50 and statuses.count(400) >= 200
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["running"] == 0 and health["failed"] == 0
        ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 3})
        assert ok.status_code == 200


def test_generated_requests_against_the_live_server(engine_dir):
    engine = Engine.from_dir(engine_dir, device="cpu", precision="fp32", max_batch=4)
    with live_server(create_app(engine)) as base, httpx.Client(base_url=base, timeout=60) as client:
        def send(payload: bytes):
            r = client.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
            return r.status_code, r.headers.get("content-type", ""), r.text

        assert len(fuzz(send, 40)) >= 40
        assert client.get("/health").json()["status"] == "ok"
        ok = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 3, "stream": True})
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
