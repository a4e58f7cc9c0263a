"""Shared by the server tests: tiny models saved to disk, images as data URLs, a live server in a thread."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmkit.data.processor import VLMProcessor
from vlmkit.models.vlm import VisionLanguageModel

from .conftest import tiny_config

BOX_ANSWER = "<box>120,40,300,210</box>"
BOX_QUESTION = "where is the purple triangle?"


def png_data_url(seed: int = 0, size: tuple[int, int] = (40, 30)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def save_tiny_vlm(directory: Path, tokenizer, seed: int = 0, **overrides) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel(tiny_config(tokenizer, **overrides)).eval()
    model.save_pretrained(directory, tokenizer)
    return model


def train_box_model(directory: Path, tokenizer, steps: int = 80) -> VisionLanguageModel:
    """A tiny VLM taught (in a few seconds) to answer BOX_QUESTION about any image with BOX_ANSWER: a real
    model whose answer holds a box, for the web page's overlay."""
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(tokenizer))
    processor = VLMProcessor.for_model(model, tokenizer)
    record = {"conversations": [{"from": "human", "value": f"<image>\n{BOX_QUESTION}"},
                                {"from": "gpt", "value": BOX_ANSWER}]}
    enc = processor.encode(record)
    ids, labels = torch.tensor([enc.input_ids] * 8), torch.tensor([enc.labels] * 8)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        pixels = torch.randn(8, 3, 32, 32)  # any image: the answer must not depend on it
        loss = model(ids, pixels, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval().save_pretrained(directory, tokenizer)
    return model


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
