"""Blind and swap probes on hand-made records; finding the clip-stage run of a model."""

import pytest
import torch
import yaml
from PIL import Image

from vlmkit.data.images import ImageProcessor
from vlmkit.eval.probes import (
    blank_image,
    blind_scores,
    chance_levels,
    is_correct,
    mean_image,
    swap_partners,
    swap_scores,
)
from vlmkit.eval.reliability import SuiteSizes, find_clip_run, optional_function


def rec(i, image, question, answer, qtype):
    return {"id": f"q{i}", "image": image, "question": question, "answer": answer, "type": qtype}


SPLIT = [
    rec(0, "a.png", "What color is the star?", "red", "color"),
    rec(1, "b.png", "What color is the star?", "red", "color"),
    rec(2, "c.png", "What color is the star?", "blue", "color"),
    rec(3, "a.png", "Is there a red star in the image?", "yes", "exists"),
    rec(4, "b.png", "Is there a red star in the image?", "yes", "exists"),
    rec(5, "c.png", "Is there a red star in the image?", "no", "exists"),
    rec(6, "a.png", "Is the red star left or right of the blue circle?", "left", "spatial"),
]


def test_is_correct_parses_yes_no_and_normalises_the_rest():
    assert is_correct("Yes, there is.", "yes") and not is_correct("maybe", "no")
    assert is_correct("The Red.", "red") and not is_correct("red star", "red")


def test_chance_levels():
    chance = chance_levels(SPLIT, SPLIT)
    assert chance["color"]["majority_answer"] == "red"
    assert chance["color"]["majority"] == pytest.approx(2 / 3) and chance["color"]["uniform"] == 0.5
    assert chance["color"]["chance"] == pytest.approx(2 / 3)
    # exists and spatial questions name their two options: uniform chance is 1/2 whatever the data.
    assert chance["exists"]["uniform"] == 0.5 and chance["exists"]["majority"] == pytest.approx(2 / 3)
    assert chance["spatial"]["uniform"] == 0.5 and chance["spatial"]["chance"] == 1.0
    # Majority accuracy is measured on the asked questions, with the split's majority answer.
    assert chance_levels([SPLIT[2]], SPLIT)["color"]["majority"] == 0.0


def test_blind_scores():
    asked = SPLIT[:6]
    predictions = {"image": ["red", "red", "blue", "yes", "Yes.", "no"],
                   "blank": ["red", "red", "red", "yes", "yes", "yes"],
                   "mean": ["green", "", "blue", "maybe", "no", "no"]}
    scores = blind_scores(asked, SPLIT, predictions)
    assert scores["by_type"]["color"]["image"] == 1.0
    assert scores["by_type"]["color"]["blank"] == pytest.approx(2 / 3)
    assert scores["by_type"]["exists"]["mean"] == pytest.approx(1 / 3)
    assert scores["overall"]["image"] == 1.0 and scores["overall"]["n"] == 6
    assert scores["overall"]["blank"] == pytest.approx(4 / 6)
    assert scores["overall"]["chance"] == pytest.approx(2 / 3)


def test_swap_partners_need_the_same_question_and_another_answer():
    partners = swap_partners(SPLIT, SPLIT, seed=0)
    assert partners[0]["id"] == "q2" and partners[1]["id"] == "q2"  # the only "blue" star
    assert {partners[2]["id"]} <= {"q0", "q1"}
    assert partners[5]["id"] in ("q3", "q4")
    assert partners[6] is None  # no other image has this question
    assert swap_partners(SPLIT, SPLIT, seed=0) == partners
    seeds = {swap_partners(SPLIT, SPLIT, seed=s)[2]["id"] for s in range(20)}
    assert seeds == {"q0", "q1"}  # the choice depends on the seed, among valid partners only


def test_swap_scores():
    asked = [SPLIT[0], SPLIT[3], SPLIT[6]]
    partners = swap_partners(asked, SPLIT, seed=0)  # q2 (blue), q5 (no), None
    original = ["red", "yes", "left"]
    swapped = ["blue", "yes"]  # follows the image once, keeps "yes" once
    s = swap_scores(asked, partners, original, swapped)
    assert s["coverage"] == pytest.approx(2 / 3) and s["n"] == 2
    assert s["grounding_rate"] == 0.5 and s["changed_rate"] == 0.5
    assert s["grounding_rate_when_correct"] == 0.5 and s["n_correct"] == 2
    assert s["by_type"]["spatial"]["coverage"] == 0.0 and s["by_type"]["color"]["grounding_rate"] == 1.0
    with pytest.raises(ValueError, match="1 swapped answers for 2 paired"):
        swap_scores(asked, partners, original, swapped[:1])


def test_blank_and_mean_images(tmp_path):
    proc = ImageProcessor(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "black.png")
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "white.png")
    mean = mean_image(proc, [tmp_path / "black.png", tmp_path / "white.png"])
    assert torch.allclose(mean, torch.zeros(3, 8, 8), atol=1e-6)  # (-1 + 1) / 2
    blank = blank_image(proc)
    assert torch.allclose(blank, torch.full((3, 8, 8), 128 / 255 * 2 - 1), atol=1e-6)


def test_find_clip_run_follows_run_yaml_then_a_sibling(tmp_path):
    clip, align, instruct = tmp_path / "clip", tmp_path / "align", tmp_path / "instruct"
    for d in (clip, align, instruct):
        d.mkdir()
    (align / "run.yaml").write_text(yaml.safe_dump({"stage": "align", "vision_from": str(clip), "init_from": None}))
    (instruct / "run.yaml").write_text(yaml.safe_dump({"stage": "instruct", "init_from": str(align)}))
    (clip / "config.json").write_text('{"format": "vlmkit-clip"}')
    assert find_clip_run(instruct) == clip
    (clip / "config.json").write_text('{"format": "vlmkit-dense"}')  # a dense-stage tower has no text side
    assert find_clip_run(instruct) is None
    other = tmp_path / "elsewhere" / "instruct"
    other.mkdir(parents=True)
    assert find_clip_run(other) is None
    (tmp_path / "elsewhere" / "clip" / "model").mkdir(parents=True)
    (tmp_path / "elsewhere" / "clip" / "model" / "config.json").write_text('{"format": "vlmkit-clip"}')
    assert find_clip_run(other) == tmp_path / "elsewhere" / "clip"


def test_limit_replaces_every_size():
    assert set(vars(SuiteSizes.with_limit(7)).values()) == {7}
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        SuiteSizes.with_limit(0)


def test_missing_optional_sections_are_named():
    fn, why = optional_function("no_such_module", "run")
    assert fn is None and "vlmkit.eval.no_such_module cannot be imported" in why
    fn, why = optional_function("stress", "no_such_function")
    assert fn is None and why == "vlmkit.eval.stress has no no_such_function()"
    fn, why = optional_function("stress", "run_stress")
    assert callable(fn) and why == ""
