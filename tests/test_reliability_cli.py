"""`vlmkit eval RUN --suite reliability` end to end on a tiny random model and a tiny shapes-world set."""

import json

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import LanguageConfig
from vlmkit.data.shapes_world import write_dataset
from vlmkit.eval.corruptions import CORRUPTIONS
from vlmkit.eval.reliability import SECTIONS, run_reliability
from vlmkit.eval.scene_shifts import SCENE_SHIFTS
from vlmkit.models.clip import ClipConfig, DualEncoder
from vlmkit.models.vlm import VisionLanguageModel

from .conftest import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, seed=2, n=40, image_size=48)  # 4 test scenes
    return root


@pytest.fixture
def runs(tmp_path, tokenizer):
    """A random VLM at runs/instruct and, beside it, a random clip-stage model at runs/clip."""
    torch.manual_seed(0)
    cfg = tiny_config(tokenizer)
    VisionLanguageModel(cfg).save_pretrained(tmp_path / "instruct", tokenizer)
    text = LanguageConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                          num_kv_heads=2, intermediate_size=64)
    DualEncoder(ClipConfig(vision=cfg.vision, text=text, embed_dim=16)).save_pretrained(tmp_path / "clip", tokenizer)
    return tmp_path


def test_reliability_suite_cli(runs, data_dir, capsys):
    run = runs / "instruct"
    assert main(["eval", str(run), "--suite", "reliability", "--data", str(data_dir), "--limit", "4",
                 "--stress-severities", "0,5", "--device", "cpu"]) == 0
    summary = capsys.readouterr().out
    assert "| POPE adversarial: F1 / accuracy / yes-ratio / unparsed |" in summary
    assert "| CHAIR-i / CHAIR-s / object recall |" in summary

    report = json.loads((run / "report.json").read_text())
    assert set(SECTIONS) <= set(report)
    pope = report["pope"]
    assert pope["n_images"] == 4 and set(pope["splits"]) == {"random", "popular", "adversarial"}
    for m in pope["splits"].values():
        assert m["n"] > 0 and m["n"] % 2 == 0 and 0 <= m["unparsed_rate"] <= 1
        assert m["unparsed"] == round(m["unparsed_rate"] * m["n"])
    assert report["chair"]["n_captions"] == 4 and len(report["chair"]["details"]) == 4
    assert report["blind"]["overall"]["n"] == 4
    assert set(report["blind"]["overall"]) >= {"image", "blank", "mean", "chance"}
    assert report["swap"]["n_questions"] == 4
    assert report["meta"]["sizes"]["pope_images"] == 4

    # The stress, attention and modality-gap sections, called through their interfaces.
    stress = report["stress"]
    assert set(stress["corruptions"]) == set(CORRUPTIONS) and set(stress["scene_shifts"]) == set(SCENE_SHIFTS)
    for curve in [*stress["corruptions"].values(), *stress["scene_shifts"].values()]:
        assert curve["severity"] == [0, 5] and "horizon" in curve
        assert all(0 <= v <= 1 for v in curve["chair_i"])  # scored with the shapes-world CHAIR lexicon
    assert "| Stress horizon: fog |" in summary
    attention = report["attention"]
    assert attention["correct"]["n_answers"] + attention["incorrect"]["n_answers"] == 4
    gap = report["modality_gap"]
    assert gap["clip_run"] == str(runs / "clip") and gap["n_pairs"] == 4 and gap["gap"] >= 0

    page = (run / "report.html").read_text()
    for name in ("pope", "chair", "blind", "swap", "stress", "attention", "modality_gap"):
        assert f"<h2 id='{name}'>" in page
    assert page.count("data:image/png;base64,") == 6  # POPE, CHAIR, blind, swap, stress, attention
    assert "http://" not in page and "https://" not in page  # self-contained


def test_reliability_on_coco_style_annotations(runs, data_dir, tmp_path):
    # The shapes-world test images, annotated COCO-style with bare shapes as categories.
    scenes = [json.loads(x) for x in (data_dir / "scenes.jsonl").read_text().splitlines()]
    scenes = [s for s in scenes if s["split"] == "test"]
    shapes = sorted({o["shape"] for s in scenes for o in s["objects"]} | {"ring"})
    instances = {"images": [{"id": i, "file_name": s["image"]} for i, s in enumerate(scenes)],
                 "annotations": [{"image_id": i, "category_id": shapes.index(o["shape"])}
                                 for i, s in enumerate(scenes) for o in s["objects"]],
                 "categories": [{"id": k, "name": name} for k, name in enumerate(shapes)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    report = run_reliability(runs / "instruct", instances=path, images=data_dir, limit=3, device="cpu",
                             out_dir=tmp_path / "out", html=False)
    assert report["meta"]["source"] == "coco"
    assert report["pope"]["n_images"] == 3
    assert {r["object"] for r in report["pope"]["wrong_examples"]} <= set(shapes)
    assert report["chair"]["n_captions"] == 3
    assert set(report["blind"]["by_type"]) == {"exists"}  # blind/swap reuse the POPE questions
    assert report["blind"]["by_type"]["exists"]["uniform"] == 0.5
    assert report["stress"]["status"] == "not available"  # stress renders shapes-world scenes
    assert (tmp_path / "out" / "report.json").is_file() and not (tmp_path / "out" / "report.html").exists()


def test_suite_errors_are_one_line(runs, capsys, tmp_path):
    assert main(["eval", str(runs / "instruct"), "--suite", "reliability", "--instances", str(tmp_path / "x.json"),
                 "--device", "cpu"]) == 1
    assert "--instances needs --images DIR" in capsys.readouterr().err
    assert main(["eval", str(runs / "instruct"), "--chair-lexicon", "x.json", "--device", "cpu"]) == 1
    assert "--chair-lexicon only applies with --suite reliability" in capsys.readouterr().err


def test_a_failing_optional_section_keeps_the_rest(runs, data_dir, tmp_path, monkeypatch, capsys):
    import vlmkit.eval.stress

    def broken(*args, **kwargs):
        raise RuntimeError("corruption registry exploded")

    monkeypatch.setattr(vlmkit.eval.stress, "run_stress", broken)
    report = run_reliability(runs / "instruct", data_root=data_dir, limit=2, device="cpu", out_dir=tmp_path)
    assert report["stress"] == {"status": "failed", "reason": "RuntimeError: corruption registry exploded"}
    assert "[reliability] stress failed: RuntimeError: corruption registry exploded" in capsys.readouterr().err
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["pope"]["n_images"] == 2 and saved["attention"]["correct"] is not None
    assert "failed: RuntimeError: corruption registry exploded" in (tmp_path / "report.html").read_text()
