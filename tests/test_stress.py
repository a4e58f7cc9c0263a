"""OOD stress: scene shifts keep exact ground truth, horizon logic, run_stress end to end."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vlmkit.data.shapes_world import (
    DEFAULT_HOLDOUT,
    EXTRA_COLORS,
    PALETTE,
    Scene,
    SceneObject,
    SceneSpec,
    write_dataset,
)
from vlmkit.eval.corruptions import CORRUPTIONS
from vlmkit.eval.generation import Answerer
from vlmkit.eval.metrics import normalize_answer
from vlmkit.eval.scene_shifts import (
    MAX_LEVEL,
    OCCLUDER_RGB,
    SCENE_SHIFTS,
    shifted_scene,
    visible_fractions,
)
from vlmkit.eval.stress import hallucination_horizon, plot_stress, run_stress

BASE = SceneSpec(exclude_pairs=DEFAULT_HOLDOUT)


def test_horizon_is_the_first_severity_above_the_threshold():
    assert hallucination_horizon([0, 1, 2, 3], [0.05, 0.1, 0.25, 0.15], 0.2) == 2
    assert hallucination_horizon([0, 1, 2], [0.1, 0.2, 0.2], 0.2) is None  # equal is not above
    assert hallucination_horizon([0, 1], [0.5, 0.1], 0.2) == 0
    assert hallucination_horizon([1, 3, 5], [0.0, None, 0.3], 0.2) == 5  # severities, not positions
    assert hallucination_horizon([], [], 0.2) is None


@pytest.mark.parametrize("name", sorted(SCENE_SHIFTS))
def test_scene_shifts_keep_exact_ground_truth(name):
    for index in range(10_000, 10_006):
        plain = shifted_scene("occlusion", 0, index, 0, BASE)
        for level in range(MAX_LEVEL + 1):
            shifted = shifted_scene(name, level, index, 0, BASE)
            scene, pixels = shifted.scene, np.asarray(shifted.image)
            assert pixels.shape == (scene.height, scene.width, 3)
            if level == 0:  # every shift shares the plain scene and its questions at level 0
                assert np.array_equal(pixels, np.asarray(plain.image))
                assert shifted.questions(BASE.allowed_pairs(), "random") == plain.questions(BASE.allowed_pairs(),
                                                                                            "random")
            assert len({o.pair for o in scene.objects}) == len(scene.objects)
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
                assert obj.pair not in DEFAULT_HOLDOUT
                # The object is drawn in its exact palette colour, inside its box.
                rgb = shifted.spec.palette[obj.color]
                assert (pixels[y1:y2, x1:x2] == rgb).all(-1).any(), (name, level, obj)
            # Questions are answerable from the ground truth.
            qas = shifted.questions(BASE.allowed_pairs(), "random")
            present = {o.name for o in scene.objects}
            for qa in qas:
                if qa.type == "exists":
                    assert (qa.answer == "yes") == (qa.targets[0] in present)
                if qa.question.startswith("How many objects"):
                    assert qa.answer == str(len(scene.objects))
                if qa.type == "color":
                    assert qa.answer == next(o.color for o in scene.objects if o.name == qa.targets[0])
            assert any(qa.type == "exists" and qa.answer == "no" for qa in qas)


def test_scene_shift_levels_move_away_from_the_training_distribution():
    def objects(name, level):
        return [o for i in range(20) for o in shifted_scene(name, level, 20_000 + i, 0, BASE).scene.objects]

    assert all(o.color in PALETTE for o in objects("unseen_colors", 0))
    assert all(o.color in EXTRA_COLORS for o in objects("unseen_colors", 5))
    unseen = [sum(o.color in EXTRA_COLORS for o in objects("unseen_colors", k)) for k in range(6)]
    assert unseen == sorted(unseen) and unseen[0] == 0

    side = lambda o: o.box[2] - o.box[0]  # noqa: E731
    assert max(map(side, objects("tiny_objects", 5))) < min(map(side, objects("tiny_objects", 0)))
    assert min(map(side, objects("huge_objects", 5))) > max(map(side, objects("huge_objects", 0)))

    for i in range(20):  # crowded: every object inside one corner square of 45% of the side (+ rounding)
        scene = shifted_scene("crowded", 5, 20_000 + i, 0, BASE).scene
        xs = [v for o in scene.objects for v in (o.box[0], o.box[2])]
        ys = [v for o in scene.objects for v in (o.box[1], o.box[3])]
        assert max(xs) - min(xs) <= 0.45 * 64 + 1 and max(ys) - min(ys) <= 0.45 * 64 + 1
        assert min(visible_fractions(scene, BASE)) >= 0.3

    grey = [(np.asarray(shifted_scene("occlusion", k, 20_000, 0, BASE).image) == OCCLUDER_RGB).all(-1).sum()
            for k in range(6)]
    assert grey[0] == 0 and all(b > a for a, b in zip(grey, grey[1:]))


def test_visible_fractions_on_a_hand_made_overlap():
    big = SceneObject("square", "red", "large", (0, 0, 19, 19))  # 19 x 19 px
    small = SceneObject("square", "blue", "small", (9, 0, 19, 10))  # 10 x 10 px, drawn on top of it
    scene = Scene(0, 0, 64, 64, (big, small), {"kind": "plain", "rgb": [238, 238, 238]})
    assert visible_fractions(scene, BASE) == pytest.approx([1 - 100 / 361, 1.0])
    assert visible_fractions(replace(scene, objects=(small, big)), BASE) == pytest.approx([0.0, 1.0])


def test_unknown_shift_and_bad_level_are_explained():
    with pytest.raises(KeyError, match="unknown scene shift 'rain'"):
        shifted_scene("rain", 1, 0)
    with pytest.raises(ValueError, match="level must be an int in 0..5"):
        shifted_scene("occlusion", 6, 0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, n=30, seed=0)
    return root


class FixedAnswerer(Answerer):
    """Answers every question with the same text (checks the bookkeeping, not a model)."""

    def __init__(self, model, tokenizer, reply: str):
        super().__init__(model, tokenizer)
        self.reply = reply

    def answer(self, questions, images):
        assert all(img is not None and img.shape == (3, 32, 32) for img in images)
        return [self.reply] * len(questions)


def test_run_stress_bookkeeping_with_fixed_answers(tiny_model, tokenizer, shapes):
    yes = run_stress(FixedAnswerer(tiny_model, tokenizer, "Yes."), shapes, limit=2, severities=(0, 4))
    no = run_stress(FixedAnswerer(tiny_model, tokenizer, "no"), shapes, limit=2, severities=(0, 4))
    assert set(yes["corruptions"]) == set(CORRUPTIONS) and set(yes["scene_shifts"]) == set(SCENE_SHIFTS)
    # Expected accuracy at severity 0: the share of the first two test images' questions answered "yes".
    scenes = [json.loads(line) for line in (shapes / "scenes.jsonl").read_text().splitlines()]
    images = [s["image"] for s in scenes if s["split"] == "test"][:2]
    qa = [json.loads(line) for line in (shapes / "test_qa.jsonl").read_text().splitlines()]
    asked = [q for q in qa if q["image"] in images and q["type"] != "grounding"]
    share_yes = sum(normalize_answer(q["answer"]) == "yes" for q in asked) / len(asked)
    for family in ("corruptions", "scene_shifts"):
        for curves in yes[family].values():
            assert curves["severity"] == [0, 4]
            assert curves["hallucination_rate"] == [1.0, 1.0] and curves["horizon"] == 0
            assert curves["chair_i"] == [None, None]
        for curves in no[family].values():
            assert curves["hallucination_rate"] == [0.0, 0.0] and curves["horizon"] is None
    for curves in yes["corruptions"].values():
        assert curves["accuracy"][0] == pytest.approx(share_yes)
        assert curves["n_questions"] == [len(asked)] * 2


def test_run_stress_end_to_end_on_a_tiny_model(tiny_model, tokenizer, shapes):
    calls = []

    def chair(captions, scenes):
        calls.append((captions, scenes))
        assert len(captions) == len(scenes) == 2 and all("objects" in s for s in scenes)
        return 0.25

    answerer = Answerer(tiny_model, tokenizer, max_new_tokens=3)
    out = run_stress(answerer, shapes, limit=2, severities=(0, 5), threshold=0.5, caption_scorer=chair)
    again = run_stress(answerer, shapes, limit=2, severities=(0, 5), threshold=0.5)
    assert out["threshold"] == 0.5 and out["n_images"] == 2
    # Severity 0 is answered once per family: 1 + 8 corruptions and 1 + 5 shifts.
    assert len(calls) == 1 + len(CORRUPTIONS) + 1 + len(SCENE_SHIFTS)
    for family in ("corruptions", "scene_shifts"):
        for name, curves in out[family].items():
            assert curves["chair_i"] == [0.25, 0.25]
            for key in ("accuracy", "hallucination_rate"):
                assert all(0.0 <= v <= 1.0 for v in curves[key])
                assert curves[key] == again[family][name][key]  # deterministic
            assert curves["horizon"] == hallucination_horizon([0, 5], curves["hallucination_rate"], 0.5)
    png = plot_stress(out)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_run_stress_explains_bad_input(tiny_model, tokenizer, tmp_path, shapes):
    answerer = Answerer(tiny_model, tokenizer)
    with pytest.raises(FileNotFoundError, match="scenes.jsonl not found"):
        run_stress(answerer, tmp_path)
    with pytest.raises(ValueError, match="no scenes of split 'nope'"):
        run_stress(answerer, shapes, split="nope")
    with pytest.raises(ValueError, match="severities must be"):
        run_stress(answerer, shapes, severities=(0, 7))
