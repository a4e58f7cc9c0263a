"""`vlmkit serve`: the OpenAI client against a live server, continuous batching seen from outside (same
tokens as alone, disconnects, a full queue), bad input (never a 5xx), remote images, the command."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time

import pytest
import torch

from vlmkit.data.processor import VLMProcessor

from .serve_helpers import live_server, png_data_url, save_tiny_vlm

pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install 'vlmkit[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests need the [serve] extra: pip install 'vlmkit[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.engine import Engine  # noqa: E402
from vlmkit.serve.images import ImageLimits  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_tiny_vlm(path, tokenizer, seed=0)
    return path


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory, tokenizer):
    """The tiny model with a context of 200,000 tokens: a request for 150,000 runs until it is cancelled."""
    path = tmp_path_factory.mktemp("serve") / "endless"
    save_tiny_vlm(path, tokenizer, seed=0, lm={"max_position_embeddings": 200_000})
    return path


ENDLESS = 150_000


def engine_for(model_dir, **kwargs) -> Engine:
    return Engine.from_dir(model_dir, device="cpu", precision="fp32", **kwargs)


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def expected_answer(model_dir, question: str, images: list[str], max_tokens: int) -> str:
    """What the model says alone, through the library (no server): greedy `generate` on the same prompt."""
    from vlmkit.data.images import load_image_bytes
    from vlmkit.hf.pretrained import load_for_inference

    model, tok, _ = load_for_inference(model_dir)
    processor = VLMProcessor.for_model(model, tok)
    pixels = [processor.preprocess(load_image_bytes(base64.b64decode(url.split(",", 1)[1]))) for url in images]
    ids = processor.prompt(question, image_sizes=[tuple(p.shape[-2:]) for p in pixels]).input_ids
    out = model.generate(torch.tensor([ids]), pixel_values=torch.stack(pixels) if pixels else None,
                         image_counts=[len(pixels)], max_new_tokens=max_tokens, eos_token_id=processor.end_of_turn_id)
    return tok.decode(out[0])


def stream_text(base: str, body: dict, chunks: list | None = None) -> str:
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        text = []
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunks is not None:
                    chunks.append(chunk)
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return "".join(text)


def wait_for(predicate, timeout: float = 10.0, what=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met in time {what()}")


def test_the_openai_client_plain_and_streaming_with_an_image(model_dir):
    openai = pytest.importorskip("openai", reason="pip install openai (in the [dev] extra)")
    image = png_data_url(1)
    want = expected_answer(model_dir, "what color is the square?", [image], 12)
    with live_server(create_app(engine_for(model_dir))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        plain = client.chat.completions.create(model="tiny", messages=user("what color is the square?", image),
                                               max_tokens=12, temperature=0)
        assert plain.object == "chat.completion"
        assert plain.choices[0].message.role == "assistant"
        assert plain.choices[0].message.content == want  # the model's own greedy answer, through HTTP
        assert plain.choices[0].finish_reason == "length"  # a random model does not end its turn in 12 tokens
        assert plain.usage.completion_tokens == 12
        assert plain.usage.prompt_tokens > 16  # the image alone is 16 tokens
        chunks = list(client.chat.completions.create(
            model="tiny", messages=user("what color is the square?", image), max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
        assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed piece by piece
        # Two images in one message; a stop sequence cuts the answer before it.
        two = client.chat.completions.create(model="tiny", messages=user("how many objects are there?", image,
                                                                           png_data_url(2)), max_tokens=10,
                                             temperature=0)
        assert two.choices[0].message.content == expected_answer(model_dir, "how many objects are there?",
                                                                 [image, png_data_url(2)], 10)
        stop = want[3:6]
        cut = client.chat.completions.create(model="tiny", messages=user("what color is the square?", image),
                                             max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == want[: want.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="remote image URLs are disabled"):
            client.chat.completions.create(model="tiny", messages=user("hi", "http://127.0.0.1:9/a.png"), max_tokens=2)


def test_simultaneous_streams_give_the_tokens_of_sequential_requests(model_dir):
    requests = [{"messages": user(q, *imgs), "max_tokens": n, "temperature": t, "seed": 7}
                for q, imgs, n, t in [("what color is the square?", [png_data_url(1)], 30, 0),
                                      ("hi", [], 45, 0),
                                      ("how many objects are there?", [png_data_url(2), png_data_url(3)], 25, 0),
                                      ("is there a yellow cross in the image? no", [png_data_url(4)], 40, 0.8),
                                      ("where is the purple triangle?", [png_data_url(5)], 35, 0),
                                      ("a red star", [], 20, 1.3)]]
    engine = engine_for(model_dir, max_batch=4)
    with live_server(create_app(engine)) as base:
        sequential = [stream_text(base, body) for body in requests]
        steps_sequential = engine.scheduler.counts["steps"]
        results: list[str | None] = [None] * len(requests)
        barrier = threading.Barrier(len(requests))

        def client(i: int) -> None:
            barrier.wait()
            results[i] = stream_text(base, requests[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        steps_concurrent = engine.scheduler.counts["steps"] - steps_sequential
    assert results == sequential
    assert all(len(text) > 0 for text in sequential)
    # The requests shared decode steps (4 slots): far fewer steps than one request at a time.
    assert steps_concurrent < 0.8 * steps_sequential


def test_a_client_that_disconnects_frees_its_slot_and_the_others_go_on(endless_model_dir):
    model_dir = endless_model_dir
    engine = engine_for(model_dir, max_batch=2)
    other = {"messages": user("how many objects are there?", png_data_url(2)), "max_tokens": 60, "temperature": 0}
    with live_server(create_app(engine)) as base:
        alone = stream_text(base, other)
        result = {}
        long = {"messages": user("hi"), "max_tokens": ENDLESS, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, timeout=60) as r:
            contents = (line for line in r.iter_lines() if '"content":"' in line and '"content":""' not in line)
            next(contents), next(contents)  # the long answer is streaming: start another client beside it
            thread = threading.Thread(target=lambda: result.update(text=stream_text(base, other)))
            thread.start()
            wait_for(lambda: engine.scheduler.stats()["running"] == 2)
        # The long stream is closed: its slot is freed at the next step.
        wait_for(lambda: engine.scheduler.counts["cancelled"] == 1)
        thread.join(30)
        health = httpx.get(f"{base}/health").json()
    assert result["text"] == alone
    assert health["running"] == 0 and health["cancelled"] == 1 and health["completed"] == 2
    assert health["generated_tokens"] < 2 * 60 + ENDLESS // 10


def test_a_full_queue_answers_429_with_retry_after(endless_model_dir):
    engine = engine_for(endless_model_dir, max_batch=1, max_queue=1)
    body = {"messages": user("hi"), "max_tokens": ENDLESS, "temperature": 0, "stream": True}
    with live_server(create_app(engine)) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)
            wait_for(lambda: engine.scheduler.stats()["running"] == 1, what=engine.scheduler.stats)
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as waiting:
                assert waiting.status_code == 200  # headers come once the request is queued
                wait_for(lambda: engine.scheduler.stats()["waiting"] == 1)
                refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert refused.json()["error"]["code"] == "queue_full"
        # Both streams closed: the server is idle again and takes new requests.
        wait_for(lambda: engine.scheduler.stats()["running"] == 0 and engine.scheduler.stats()["waiting"] == 0)
        ok = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(engine_for(model_dir)), raise_server_exceptions=False) as c:
        yield c


def error_of(response, status: int, param=None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert match in error["message"], error["message"]
    return error


def test_bad_requests_are_4xx_with_openai_error_bodies(client, model_dir):
    post = lambda body, **kw: client.post("/v1/chat/completions", json=body, **kw)  # noqa: E731
    error_of(client.post("/v1/chat/completions", content=b"{not json"), 400, match="not valid JSON")
    error_of(client.post("/v1/chat/completions", content=b"\xff\xfe"), 400, match="not valid JSON")
    error_of(client.post("/v1/chat/completions", content=b"[" * 100_000), 400, match="not valid JSON")
    error_of(post({"model": "tiny"}), 400, "messages", "required")
    error_of(post({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role")
    error = error_of(post({"model": "nope", "messages": user("hi")}), 404, "model", "'nope' does not exist")
    assert error["code"] == "model_not_found"
    error_of(post({"messages": user("hi"), "n": 3}), 400, "n")
    error_of(post({"messages": user("hi"), "max_tokens": -5}), 400, "max_tokens")
    error_of(post({"messages": user("hi"), "max_tokens": 10**9}), 400, "max_tokens")
    error_of(post({"messages": user("look at <image> please")}), 400, "messages[0].content[0]", "reserves")
    image = "messages[0].content[0].image_url.url"
    error_of(post({"messages": user("hi", "data:image/png;base64,!!!")}), 400, image, "not valid base64")
    not_png = "data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode()
    error_of(post({"messages": user("hi", not_png)}), 400, image, "not an image")
    png = base64.b64decode(png_data_url(1).split(",")[1])
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    error_of(post({"messages": user("hi", truncated)}), 400, image, "truncated or corrupt")
    from .test_serve_protocol import bomb_png

    bomb = "data:image/png;base64," + base64.b64encode(bomb_png(8_000, 8_000)).decode()  # 64 MP in ~100 bytes
    error_of(post({"messages": user("hi", bomb)}), 400, image, "64,000,000 pixels is more than the limit of 40,000,000")
    five = user("hi", *[png_data_url(i) for i in range(5)])
    error_of(post({"messages": five}), 400, "messages[0].content[4].image_url.url", "at most 4")
    # The context (2048 tokens): a prompt too long, or a completion that would not fit; both numbers named.
    error = error_of(post({"messages": user("red " * 3000)}), 400, "messages", "maximum context length is 2048 tokens")
    assert int(re.search(r"your messages resulted in (\d+) tokens", error["message"])[1]) > 3000
    error = error_of(post({"messages": user("hi"), "max_tokens": 2040}), 400, "max_tokens")
    found = re.search(r"you requested (\d+) tokens \((\d+) in the messages", error["message"])
    requested, prompt = map(int, found.groups())
    assert requested == prompt + 2040 > 2048 and "2040 in the completion" in error["message"]
    error_of(client.get("/v1/nothing"), 404, None, "no route GET /v1/nothing")
    error_of(client.get("/v1/chat/completions"), 405)
    error_of(client.get("/v1/models/other"), 404, "model")
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"


def test_a_text_only_language_model_is_served(tokenizer):
    from vlmkit.models.language import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(VisionLanguageModelConfig(tokenizer).lm)
    with TestClient(create_app(Engine(lm, tokenizer, model_id="lm", precision="fp32"))) as c:
        ok = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "hi"}],
                                                  "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        error_of(c.post("/v1/chat/completions", json={"messages": user("hi", png_data_url())}), 400,
                 "messages[0].content[0].image_url.url", "without a vision tower")


def VisionLanguageModelConfig(tokenizer):  # noqa: N802  (the tiny model's config, for its LM section)
    from .conftest import tiny_config

    return tiny_config(tokenizer)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path == "/missing.png":
            self.send_error(404)
            return
        body = self.png * (400 if self.path == "/big.png" else 1)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_images_only_when_allowed_and_within_limits(model_dir):
    _ImageHandler.png = base64.b64decode(png_data_url(1).split(",")[1])
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}"
    limits = ImageLimits(allow_remote=True, fetch_timeout=0.5, max_bytes=100 * len(_ImageHandler.png))
    try:
        with TestClient(create_app(engine_for(model_dir), limits)) as c:
            post = lambda image: c.post("/v1/chat/completions", json={  # noqa: E731
                "messages": user("what color is the square?", image), "max_tokens": 6, "temperature": 0})
            ok = post(f"{url}/a.png")
            assert ok.status_code == 200
            assert ok.json()["choices"][0]["message"]["content"] == expected_answer(
                model_dir, "what color is the square?", [png_data_url(1)], 6)
            param = "messages[0].content[0].image_url.url"
            error_of(post(f"{url}/missing.png"), 400, param, "answered HTTP 404")
            error_of(post(f"{url}/big.png"), 413, param, "larger than")
            started = time.monotonic()
            error_of(post(f"{url}/slow.png"), 400, param, "longer than 0.5 s")
            assert time.monotonic() - started < 1.4
            error_of(post("http://127.0.0.1:9/refused.png"), 400, param, "fetching the image failed")
    finally:
        images.shutdown()


def test_the_serve_command_starts_a_server(model_dir, tmp_path):
    import socket
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-batch", "2", "--precision", "fp32"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert f"serving tiny on http://127.0.0.1:{port}/" in proc.stdout.readline()
        health = wait_for(lambda: _get(f"http://127.0.0.1:{port}/health"), timeout=60)
        assert health["status"] == "ok" and health["max_batch"] == 2
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "<title>vlmkit</title>" in page.text
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str):
    try:
        return httpx.get(url, timeout=2).json()
    except httpx.HTTPError:
        return None
