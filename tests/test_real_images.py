"""The pure parts of the real-image data preparation (no Debian packages needed)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.data.real_images import (
    Item,
    caption_record,
    clean_caption,
    emoji_name,
    question_records,
    split_of,
    square_on_white,
    stamp_items,
    with_article,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_real_data.py"


def _script():
    spec = importlib.util.spec_from_file_location("prepare_real_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clean_caption():
    assert clean_caption("A “Sierra Beauty” apple.\nde.utf8=Ein Apfel.") == 'A "Sierra Beauty" apple.'
    assert clean_caption("  grandma’s   old rag doll ") == "Grandma's old rag doll."
    assert clean_caption("A balloon!") == "A balloon!"
    assert clean_caption("   \n") == ""


def test_articles():
    assert with_article("egg") == "An egg"
    assert with_article("grinning face") == "A grinning face"
    assert with_article("european castle") == "A european castle"


def test_emoji_names_are_readable_and_honest_about_colour():
    assert emoji_name("\U0001F600") == "grinning face"
    assert emoji_name("\u2702") == "scissors"  # BLACK SCISSORS: drawn in colour
    assert emoji_name("\u2764") == "red heart"  # HEAVY BLACK HEART is red in the font
    assert emoji_name("\u2B1B") == "black large square"  # and this one really is black
    assert emoji_name("\u20E3") is None  # COMBINING ENCLOSING KEYCAP
    assert emoji_name("\U0001F1E6") is None  # REGIONAL INDICATOR SYMBOL LETTER A
    assert emoji_name("\U0001F3FB") is None  # skin-tone modifier: a colour swatch


def test_split_is_deterministic_case_blind_and_near_the_fraction():
    captions = [f"A thing number {i}." for i in range(4000)]
    splits = [split_of(c, 0.1) for c in captions]
    assert splits == [split_of(c, 0.1) for c in captions]
    assert 0.08 < splits.count("test") / len(splits) < 0.12
    assert all(split_of(c.upper(), 0.1) == s for c, s in zip(captions, splits))
    assert {split_of(c, 0.0) for c in captions} == {"train"}


def _png(path: Path, mode: str = "RGBA") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (30, 20), (10, 20, 30, 0) if mode == "RGBA" else 128).save(path)


def test_stamps_need_a_png_and_a_description(tmp_path):
    _png(tmp_path / "animals" / "frog.png")
    (tmp_path / "animals" / "frog.txt").write_text("A frog.\nde.utf8=Ein Frosch.\n", encoding="utf-8")
    _png(tmp_path / "animals" / "frog_mirror.png")  # no description: left out
    (tmp_path / "vehicles" / "only-svg.txt").parent.mkdir()
    (tmp_path / "vehicles" / "only-svg.txt").write_text("A car.")  # no PNG: left out
    _png(tmp_path / "vehicles" / "empty.png")
    (tmp_path / "vehicles" / "empty.txt").write_text("\n")  # no caption: left out
    found = list(stamp_items(tmp_path))
    assert [(item.key, item.caption, png.name) for item, png in found] == [
        ("stamps/animals/frog", "A frog.", "frog.png")]


def test_square_on_white_keeps_aspect_and_whitens_transparency():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 10, 20))
    square = square_on_white(image)
    assert square.mode == "RGB" and square.width == square.height > 40
    assert square.getpixel((0, 0)) == (255, 255, 255)
    assert square.getpixel((square.width // 2, square.height // 2)) == (255, 255, 255)  # was transparent
    assert (255, 0, 0) in [c for _, c in square.getcolors()]


def _items(n: int, source: str = "stamps") -> list[Item]:
    return [Item(f"{source}/{i}", f"A thing {i}.", source, f"{i}.png") for i in range(n)]


def test_questions_answer_with_the_caption_and_balance_yes_no():
    items = _items(400)
    rng = random.Random(0)
    records = [r for item in items for r in question_records(item, f"images/{item.key}.png", items, rng)]
    what = [r for r in records if r["id"].endswith("/what")]
    yes_no = [r for r in records if "/is-" in r["id"]]
    assert len(what) == len(yes_no) == 400
    assert all(r["conversations"][1]["value"] == f"A thing {r['id'].split('/')[1]}." for r in what)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    answers = [r["conversations"][1]["value"] for r in yes_no]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    for r in yes_no:  # "no" names another picture's subject, "yes" its own
        own = f"a thing {r['id'].split('/')[1]}?"
        assert (own in r["conversations"][0]["value"]) == (r["conversations"][1]["value"] == "yes")
    rng = random.Random(0)
    again = [r for item in items for r in question_records(item, f"images/{item.key}.png", items, rng)]
    assert again == records


def test_no_question_needs_another_caption():
    only = _items(1)
    with pytest.raises(ValueError, match="no item"):
        for seed in range(20):  # a "no" question comes up within a few draws
            question_records(only[0], "x.png", only, random.Random(seed))


def test_written_splits_are_disjoint_and_self_contained(tmp_path):
    script = _script()
    items = [(item, f"images/{item.key}.png") for item in _items(300) + _items(300, "emoji")]
    counts = script.write_image_records(tmp_path, items, test_fraction=0.2, seed=0)
    captions = {s: [json.loads(line) for line in (tmp_path / f"captions_{s}.jsonl").read_text().splitlines()]
                for s in ("train", "test")}
    assert counts["train"]["pictures"] + counts["test"]["pictures"] == 600
    assert not {c["caption"] for c in captions["train"]} & {c["caption"] for c in captions["test"]}
    first_train = next(item_path for item_path in items if split_of(item_path[0].caption, 0.2) == "train")
    assert captions["train"][0] == caption_record(*first_train)
    test_records = json.loads((tmp_path / "instruct_test.json").read_text())
    test_labels = {c["caption"].rstrip(".").lower() for c in captions["test"]}
    for r in test_records:  # questions on test pictures only name test pictures' subjects
        if "/is-" in r["id"]:
            asked = r["conversations"][0]["value"].split("picture of ")[1].split("?")[0]
            assert asked in test_labels


def test_chat_prompts_are_deterministic_and_distinct():
    script = _script()
    prompts = script.chat_prompts(100, seed=3)
    assert prompts == script.chat_prompts(100, seed=3) and len(set(prompts)) == 100
    assert prompts != script.chat_prompts(100, seed=4)


def test_shapes_mix_points_at_the_shapes_images_from_the_final_directory(tmp_path):
    script = _script()
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    records = [{"image": f"images/{i:06d}.png", "conversations": []} for i in range(10)]
    (shapes / "train.json").write_text(json.dumps(records))
    staging, final = tmp_path / ".real.tmp", tmp_path / "real"
    staging.mkdir()
    (staging / "instruct_train.json").write_text(json.dumps([{"image": "images/emoji/x.png", "conversations": []}]))
    counts = script.write_shapes_mix(staging, final, shapes, limit=4, seed=0)
    assert (counts["real"], counts["shapes"]) == (1, 4)
    mixed = json.loads((staging / "instruct_mix_train.json").read_text())
    assert len(mixed) == 5
    shape_paths = [r["image"] for r in mixed if "emoji" not in r["image"]]
    assert all((final / p).resolve().parent == (shapes / "images").resolve() for p in shape_paths)
