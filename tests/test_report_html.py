"""report.html renders in a real browser (headless Chromium): sections, tables and plots are in the DOM.

Chromium is the Debian package ``chromium``. When it is missing the test installs it with
``apt-get install -y chromium`` if running as root (the CI path: once per machine, then each run takes
seconds), and otherwise skips, saying how to install it.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from vlmkit.eval.chair import chair, shapes_world_lexicon
from vlmkit.eval.probes import blind_scores, swap_partners, swap_scores
from vlmkit.eval.report_html import render_report_html

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def find_or_install_chromium() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root: run `apt-get install -y chromium`")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0:  # a stale package list: refresh it once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(f"`apt-get install -y chromium` failed:\n{proc.stderr[-2000:]}")
    return path


@pytest.fixture(scope="module")
def chromium():
    return find_or_install_chromium()


def sample_report() -> dict:
    pope = {"n_images": 2, "n_questions": 12, "question": "Is there {a} {object} in the image?",
            "splits": {s: {"accuracy": a, "precision": 0.7, "recall": 0.6, "f1": a - 0.05, "yes_ratio": 0.4, "n": 12,
                           "unparsed": 1, "unparsed_rate": 1 / 12}
                       for s, a in (("random", 0.8), ("popular", 0.7), ("adversarial", 0.6))}}
    captions = ["a red star and a blue circle", "a green cross <b>and</b> a ring"]
    truths = [{"red star", "star", "blue circle", "circle"}, {"yellow square", "square"}]
    ch = {"prompt": "Describe the image.", **chair(captions, truths, shapes_world_lexicon())}
    records = [{"id": f"q{i}", "image": f"{i % 3}.png", "question": q, "answer": a, "type": t}
               for i, (q, a, t) in enumerate([("What color is the star?", "red", "color"),
                                              ("What color is the star?", "blue", "color"),
                                              ("Is there a ring?", "yes", "exists"),
                                              ("Is there a ring?", "no", "exists")])]
    blind = blind_scores(records, records, {"image": ["red", "blue", "yes", "no"], "blank": ["red"] * 4,
                                            "mean": ["blue", "blue", "no", "no"]})
    partners = swap_partners(records, records)
    swap = swap_scores(records, partners, ["red", "blue", "yes", "no"], ["blue", "blue", "no", "no"])
    stress = {"threshold": 0.2, "corruptions": {"fog": {"severity": [0, 1, 2], "accuracy": [0.8, 0.7, 0.4],
                                                        "hallucination_rate": [0.1, 0.2, 0.4],
                                                        "chair_i": [0.1, 0.2, 0.5], "horizon": 2}},
              "scene_shifts": {}}
    return {"meta": {"model": "runs/x", "split": "test"}, "pope": pope, "chair": ch, "blind": blind, "swap": swap,
            "stress": stress, "attention": {"status": "not available", "reason": "not installed"},
            "modality_gap": {"gap": 0.42, "clip_run": "runs/clip"}}


def test_report_renders_in_headless_chromium(chromium, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_report_html(sample_report()))
    dom = subprocess.run([chromium, *FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=60).stdout
    for section in ("pope", "chair", "blind", "swap", "stress", "attention", "modality_gap"):
        assert f'<h2 id="{section}">' in dom, section
    assert dom.count("<table>") >= 8
    assert dom.count('src="data:image/png;base64,') == 4  # POPE, CHAIR, blind, swap (stress has no plot here)
    assert "&lt;b&gt;and&lt;/b&gt;" in dom  # captions are escaped, not markup
    assert "not available: not installed" in dom

    shot = tmp_path / "report.png"
    subprocess.run([chromium, *FLAGS, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=60)
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # not a blank page
