"""The web page at `/`, driven in headless Chromium through the DevTools protocol (over a pipe, no extra
package): choose an image file, ask, wait for the streamed answer; the model's box is drawn on the image."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from .serve_helpers import BOX_ANSWER, BOX_QUESTION, live_server, train_box_model
from .test_report_html import FLAGS, find_or_install_chromium

pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install 'vlmkit[serve]'")

from vlmkit.serve.app import create_app  # noqa: E402
from vlmkit.serve.engine import Engine  # noqa: E402


class Browser:
    """Headless Chromium with `--remote-debugging-pipe`: DevTools commands as NUL-terminated JSON on fd 3,
    answers and events on fd 4."""

    def __init__(self, chromium: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child: the pipe ends become fds 3 and 4 (via fds above both first)
            read_end, write_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w,
                                                                                            fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen([chromium, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      "--no-first-run", "about:blank"], preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def chromium():
    return find_or_install_chromium()


def test_the_page_streams_an_answer_and_draws_its_box(chromium, tmp_path, tokenizer):
    train_box_model(tmp_path / "boxes", tokenizer)
    picture = tmp_path / "scene.png"
    image = Image.new("RGB", (320, 240), (235, 235, 235))
    ImageDraw.Draw(image).polygon([(60, 60), (100, 10), (140, 60)], fill=(140, 40, 200))
    image.save(picture)
    engine = Engine.from_dir(tmp_path / "boxes", device="cpu", precision="fp32")
    with live_server(create_app(engine)) as base:
        browser = Browser(chromium, tmp_path / "profile")
        try:
            browser.send("Emulation.setDeviceMetricsOverride", width=1100, height=700, deviceScaleFactor=1,
                         mobile=False)
            browser.send("Page.navigate", url=f"{base}/")
            browser.wait("document.readyState === 'complete' && document.getElementById('model').textContent")
            assert browser.eval("document.getElementById('model').textContent") == "boxes"
            document = browser.send("DOM.getDocument")["root"]["nodeId"]
            file_input = browser.send("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
            browser.send("DOM.setFileInputFiles", files=[str(picture)], nodeId=file_input)
            browser.wait("!document.getElementById('stage').hidden && document.getElementById('preview').naturalWidth")
            browser.eval(f"document.getElementById('question').value = {json.dumps(BOX_QUESTION)};"
                         "document.getElementById('ask').click()")
            state = browser.wait("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state")
            status = browser.eval("document.getElementById('status').textContent")
            assert state == "done", status
            assert browser.eval("document.getElementById('answer').textContent") == BOX_ANSWER.replace(
                "<box>", "").replace("</box>", "")  # the box is shown as a tag, its coordinates as text
            assert "tokens" in status
            boxes = browser.eval("""[...document.querySelectorAll('#stage .box')].map((b) => {
                const r = b.getBoundingClientRect(), s = document.getElementById('preview').getBoundingClientRect();
                return {box: b.dataset.box, left: (r.left - s.left) / s.width, top: (r.top - s.top) / s.height,
                        right: (r.right - s.left) / s.width, bottom: (r.bottom - s.top) / s.height};
            })""")
            assert len(boxes) == 1 and boxes[0]["box"] == "120,40,300,210"
            # Drawn where [0, 1000] coordinates put it on the shown image (to a pixel or two).
            for key, want in (("left", 0.12), ("top", 0.04), ("right", 0.30), ("bottom", 0.21)):
                assert abs(boxes[0][key] - want) < 0.01, (key, boxes[0])
            shot = browser.send("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.close()
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    assert Image.open(tmp_path / "page.png").size == (1100, 700)
    print(f"screenshot: {tmp_path / 'page.png'}")
