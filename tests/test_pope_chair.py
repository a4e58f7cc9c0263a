"""POPE probe construction and scoring; CHAIR mention matching and arithmetic."""

import json
from collections import Counter
from pathlib import Path

import pytest

from vlmkit.data.shapes_world import ALL_COLORS, ALL_SHAPES
from vlmkit.eval.annotations import AnnotatedImage, ObjectDataset, coco_dataset, shapes_world_dataset
from vlmkit.eval.chair import Lexicon, chair, shapes_world_chair_i, shapes_world_lexicon
from vlmkit.eval.pope import build_pope, pope_question, pope_scores


def dataset(*objects: set[str]) -> ObjectDataset:
    images = [AnnotatedImage(f"{i}.png", frozenset(o)) for i, o in enumerate(objects)]
    vocabulary = tuple(sorted(set().union(*objects)))
    return ObjectDataset(images, Path("."), vocabulary, "test")


# Frequencies: dog 4, cat 3, car 2, bus 2, cup 1, kite 1, fork 1.
# "car" co-occurs with "bus" twice and with "cup" once; "dog" is the most frequent but never with "car".
ANIMALS = dataset({"dog", "cat"}, {"dog", "cat"}, {"dog", "cat", "kite"}, {"dog", "fork"},
                  {"car", "bus"}, {"car", "bus", "cup"})


def by_image(records, image, sampling):
    rows = [r for r in records if r["image"] == image and r["sampling"] == sampling]
    return [r["object"] for r in rows if r["answer"] == "yes"], [r["object"] for r in rows if r["answer"] == "no"]


def test_pope_is_balanced_per_image_and_negatives_are_absent():
    records = build_pope(ANIMALS, n_images=None, n_per_image=3, seed=0)
    for im in ANIMALS.images:
        for sampling in ("random", "popular", "adversarial"):
            yes, no = by_image(records, im.image, sampling)
            assert len(yes) == len(no) == min(3, len(im.objects)), (im, sampling)
            assert set(yes) <= im.objects and not set(no) & im.objects
            assert len(set(no)) == len(no)
    # The "yes" questions are the same in every sampling.
    assert by_image(records, "4.png", "random")[0] == by_image(records, "4.png", "adversarial")[0]


def test_popular_and_adversarial_rankings():
    records = build_pope(ANIMALS, n_images=None, n_per_image=3, seed=0)
    # Image 4 holds {car, bus}: the most frequent absent objects are dog (4) and cat (3).
    assert by_image(records, "4.png", "popular")[1] == ["dog", "cat"]
    # Adversarial: cup co-occurs with car and bus (1 + 1), every other absent object with neither;
    # the tie between the rest is broken by frequency (dog).
    assert by_image(records, "4.png", "adversarial")[1] == ["cup", "dog"]
    # Image 3 holds {dog, fork}: dog co-occurs with cat 3 times, kite once.
    assert by_image(records, "3.png", "adversarial")[1] == ["cat", "kite"]


def test_pope_is_deterministic_and_seeded():
    a = build_pope(ANIMALS, n_images=4, seed=3)
    assert a == build_pope(ANIMALS, n_images=4, seed=3)
    assert len({r["image"] for r in a}) == 4
    others = [build_pope(ANIMALS, n_images=4, seed=s) for s in range(4, 10)]
    assert any(o != a for o in others)


def test_pope_question_uses_the_right_article():
    assert pope_question("orange star") == "Is there an orange star in the image?"
    assert pope_question("dog") == "Is there a dog in the image?"


def test_pope_scores_count_unparsed_answers_as_wrong_not_as_no():
    records = [{"answer": a, "sampling": s} for s in ("random", "popular") for a in ("yes", "yes", "no", "no")]
    predictions = ["Yes, there is.", "maybe", "no", "yes",  # random: TP, unparsed (FN), TN, FP
                   "yes", "yes", "No.", "I think no"]  # popular: TP, TP, TN, TN
    scores = pope_scores(records, predictions)
    r, p = scores["random"], scores["popular"]
    assert r["accuracy"] == 0.5 and r["unparsed"] == 1 and r["unparsed_rate"] == 0.25
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["yes_ratio"] == 0.5
    assert p["accuracy"] == 1.0 and p["f1"] == 1.0 and p["unparsed"] == 0 and p["yes_ratio"] == 0.5


def test_coco_dataset(tmp_path):
    path = tmp_path / "instances.json"
    data = {"images": [{"id": i, "file_name": name} for i, name in ((1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg"))],
            "annotations": [{"image_id": 1, "category_id": 7}, {"image_id": 1, "category_id": 7},
                            {"image_id": 2, "category_id": 9}],
            "categories": [{"id": 7, "name": "Dog"}, {"id": 9, "name": "teddy bear"}, {"id": 11, "name": "kite"}]}
    path.write_text(json.dumps(data))
    ds = coco_dataset(path, tmp_path)
    assert [(im.image, set(im.objects)) for im in ds.images] == [("a.jpg", {"dog"}), ("b.jpg", {"teddy bear"})]
    assert ds.vocabulary == ("dog", "teddy bear", "kite")
    records = build_pope(ds, n_images=None)
    assert {r["question"] for r in records if r["image"] == "a.jpg" and r["answer"] == "yes"} == \
        {"Is there a dog in the image?"}
    data["annotations"].append({"image_id": 2, "category_id": 5})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances.json: annotations\[3\].category_id=5"):
        coco_dataset(path, tmp_path)
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match=r"images\[0\] has no 'file_name'"):
        coco_dataset(path, tmp_path)


def test_shapes_world_dataset(tmp_path):
    from vlmkit.data.shapes_world import write_dataset

    write_dataset(tmp_path, seed=0, n=20, image_size=48)
    ds = shapes_world_dataset(tmp_path, "test")
    scenes = [json.loads(x) for x in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    test = [s for s in scenes if s["split"] == "test"]
    assert [im.image for im in ds.images] == [s["image"] for s in test]
    assert ds.images[0].objects == {f"{o['color']} {o['shape']}" for o in test[0]["objects"]}
    with pytest.raises(ValueError, match="no scenes of split 'nope'"):
        shapes_world_dataset(tmp_path, "nope")


# --------------------------------------------------------------------------------------------------
# CHAIR


def truth(*names: str) -> set[str]:
    """A shapes-world image's CHAIR truth: the colour-shape names and their bare shapes."""
    return set(names) | {n.split()[-1] for n in names}


@pytest.mark.parametrize("caption, mentions", [
    ("Two objects: a large red star and a small blue circle.", ["red star", "blue circle"]),
    ("a red star above a star", ["red star", "star"]),  # longest match first, then the bare shape
    ("Three red stars and two crosses", ["red star", "cross"]),  # plurals
    ("A Red-Star!", ["red star"]),
    ("a starfish and a redstar", []),  # whole words only
    ("red and blue stars", ["blue star"]),  # documented limitation: coordinated colours
    ("", []),
])
def test_shapes_world_mentions(caption, mentions):
    assert shapes_world_lexicon().mentions(caption) == mentions


def test_chair_counts_hallucinations():
    captions = ["a red star and a blue circle",  # image: red star, blue circle -> fine
                "a red star and a star",  # image: blue star -> "red star" is wrong, bare "star" is right
                "a green cross, a green cross and a ring"]  # image: yellow square -> 3 wrong mentions
    truths = [truth("red star", "blue circle"), truth("blue star"), truth("yellow square")]
    objects = [{"red star", "blue circle"}, {"blue star"}, {"yellow square"}]
    result = chair(captions, truths, shapes_world_lexicon(), objects)
    assert result["mentions"] == 7 and result["hallucinated"] == 4
    assert result["chair_i"] == pytest.approx(4 / 7)
    assert result["chair_s"] == pytest.approx(2 / 3)
    # recall over the colour-shape objects: 2 of 2 | 0 of 1 ("red star" is not the blue star) | 0 of 1
    assert result["recall"] == pytest.approx(2 / 4)
    assert result["top_hallucinated"][0] == ("green cross", 2)
    assert result["details"][1]["hallucinated"] == ["red star"]


def test_chair_of_silent_captions_is_zero():
    result = chair(["nothing here", ""], [truth("red star"), truth("blue circle")], shapes_world_lexicon())
    assert result["chair_i"] == 0.0 and result["chair_s"] == 0.0 and result["recall"] == 0.0
    assert result["no_mention"] == 2


def test_lexicon_longest_match_synonyms_and_errors(tmp_path):
    lex = Lexicon({"hot dog": ["hot dogs"], "dog": ["dogs", "puppy"], "person": ["man", "people"]})
    assert lex.mentions("A man eats a hot dog next to two dogs and a puppy") == \
        ["person", "hot dog", "dog", "dog"]
    with pytest.raises(ValueError, match="'dog' mentions both 'dog' and 'cat'"):
        Lexicon({"dog": ["dog"], "cat": ["dog"]})
    bad = tmp_path / "lex.json"
    bad.write_text('{"dog": "dogs"}')
    with pytest.raises(ValueError, match="lex.json: the value of 'dog' must be a list"):
        Lexicon.load(bad)
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="lex.json: not valid JSON"):
        Lexicon.load(bad)
    with pytest.raises(ValueError, match=r"no entry for \['kite'\]"):
        lex.check_covers({"dog", "kite"}, "test")


def test_default_lexicon_from_category_names():
    lex = Lexicon.from_names(["bus", "teddy bear", "Dog", "butterfly"])
    assert lex.mentions("two buses, teddy bears, dogs and butterflies") == ["bus", "teddy bear", "dog", "butterfly"]


def test_builtin_lexicon_covers_every_shapes_world_object():
    lex = shapes_world_lexicon()
    expected = {f"{c} {s}" for c in ALL_COLORS for s in ALL_SHAPES} | set(ALL_SHAPES)
    assert lex.objects == expected
    for c in ALL_COLORS:
        for s in ALL_SHAPES:
            plural = {"cross": "crosses"}.get(s, s + "s")
            assert lex.mentions(f"{c} {plural}") == [f"{c} {s}"]


def test_shapes_world_caption_scorer_reads_scene_rows():
    scene = {"objects": [{"shape": "star", "color": "red", "size": "small", "box": [0, 0, 5, 5]}]}
    assert shapes_world_chair_i(["a red star", "a blue star"], [scene, scene]) == 0.5
    counts = Counter(shapes_world_lexicon().mentions("a red star, a red star"))
    assert counts == {"red star": 2}
