import json
import logging
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.config import VisionConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.chat import ChatFormat
from vlmkit.data.collate import collate, collate_image_text
from vlmkit.data.datasets import ConversationDataset, ImageTextDataset
from vlmkit.data.images import ImageError, ImageProcessor, load_image
from vlmkit.data.records import DataError, LoadReport, caption_records, read_records

SIZE = 16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def chat(tokenizer):
    return ChatFormat(tokenizer, image_tokens=4)


@pytest.fixture
def processor():
    return ImageProcessor(SIZE, CLIP_MEAN, CLIP_STD)


def write_png(path: Path, color=RED, size=(20, 12), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_noisy_png(path: Path, size=32) -> Path:
    """Random pixels, so the compressed data is large and cutting the file truncates the pixel data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Dicts are written as JSON; strings are written verbatim (for malformed lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def record(image=None, question="<image>\nwhat color is the square?", answer="green", **extra) -> dict:
    data = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        data["image"] = image
    return data


def dataset(tmp_path, chat, processor, lines, max_length=64, **kwargs) -> ConversationDataset:
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    return ConversationDataset(path, tmp_path, chat, processor, max_length=max_length, **kwargs)


# -- images -----------------------------------------------------------------------------------


def test_white_image_normalises_to_one_minus_mean_over_std(tmp_path, processor):
    pixels = processor(write_png(tmp_path / "white.png", (255, 255, 255), size=(40, 30)))
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels, expected[:, None, None].expand(3, SIZE, SIZE))
    black = processor(Image.new("RGB", (5, 5)))
    torch.testing.assert_close(black[:, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def test_normalize_uint8_batch_matches_single_images(processor):
    images = [processor.to_uint8(Image.new("RGB", (8, 8), color)) for color in (RED, GREEN)]
    assert images[0].shape == (SIZE, SIZE, 3) and images[0].dtype == np.uint8
    batch = processor.normalize(torch.from_numpy(np.stack(images)))
    assert batch.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(batch[1], processor.normalize(images[1]))
    with pytest.raises(TypeError, match="uint8"):
        processor.normalize(torch.zeros(SIZE, SIZE, 3))


def test_processor_from_vision_config():
    cfg = VisionConfig(image_size=32, patch_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = ImageProcessor.from_vision_config(cfg)
    assert (processor.size, processor.mean, processor.std) == (32, CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("mode, color", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("L", 255), ("P", 0)])
def test_other_modes_become_rgb(tmp_path, mode, color):
    # Fully transparent pixels are composited on white; a palette/grey image is expanded to 3 channels.
    image = load_image(write_png(tmp_path / "x.png", color, mode=mode))
    assert image.mode == "RGB"
    if mode != "P":
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_half_transparent_rgba_is_composited_on_white(tmp_path):
    image = load_image(write_png(tmp_path / "x.png", (0, 0, 0, 128), mode="RGBA"))
    assert image.getpixel((0, 0)) == (127, 127, 127)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)


def test_load_image_errors_name_the_file_and_reason(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: file not found") as err:
        load_image(tmp_path / "nope.png")
    assert err.value.kind == "missing"
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match=r"text\.png: not an image"):
        load_image(tmp_path / "text.png")
    data = write_noisy_png(tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.png: truncated or corrupt") as err:
        load_image(tmp_path / "half.png")
    assert err.value.kind == "unreadable"


# -- reading ----------------------------------------------------------------------------------


def test_json_and_jsonl_give_the_same_dataset(tmp_path, chat, processor):
    write_png(tmp_path / "images/a.png", RED)
    write_png(tmp_path / "images/b.png", GREEN)
    records = [record("images/a.png", id=1), record("images/b.png", answer="red", id=2), record(id=3, question="hi")]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "data.jsonl", records)
    from_json = ConversationDataset(tmp_path / "data.json", tmp_path, chat, processor, max_length=64)
    from_jsonl = ConversationDataset(tmp_path / "data.jsonl", tmp_path, chat, processor, max_length=64)
    assert len(from_json) == len(from_jsonl) == 3
    assert from_json.report.summary().endswith("nothing skipped")
    for a, b in zip(from_json, from_jsonl):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    # Each .json record is named by the line it starts on.
    lines = (tmp_path / "data.json").read_text().splitlines()
    for source in from_json.sources:
        line = int(source.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{" and lines[line].strip().startswith('"conversations"')
    assert from_jsonl.sources == [f"{tmp_path / 'data.jsonl'}:{n}" for n in (1, 2, 3)]


def test_sample_contents(tmp_path, chat, processor, tokenizer):
    write_png(tmp_path / "a.png", BLUE)
    ds = dataset(tmp_path, chat, processor, [record("a.png")])
    sample = ds[0]
    expected = chat.encode(record("a.png"))
    assert sample["input_ids"].tolist() == expected.input_ids and sample["labels"].tolist() == expected.labels
    assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
    assert sample["num_images"] == 1 and sample["pixel_values"].shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(sample["pixel_values"][0], processor(Image.new("RGB", (1, 1), BLUE)))
    assert int((sample["input_ids"] == tokenizer.image_id).sum()) == 4


def test_read_records_skips_malformed_lines_and_non_objects(tmp_path, caplog):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, "", '{"a": ', "   ", "[1, 2]", {"a": 2}])
    with open(path, "ab") as f:
        f.write(b'{"a": "\xff"}\n')
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        records, report = read_records(path)
    assert [(r.source, r.data) for r in records] == [(f"{path}:1", {"a": 1}), (f"{path}:6", {"a": 2})]
    assert (report.total, report.kept) == (5, 2)
    assert report.skipped == {"malformed_json": 2, "not_a_dict": 1}
    assert report.warnings[0] == f"{path}:3: malformed_json: invalid JSON at column 6: Expecting value"
    assert report.warnings[1] == f"{path}:5: not_a_dict: expected a JSON object, got list"
    assert f"{path}:3: malformed_json" in caplog.text
    assert report.warnings[2].startswith(f"{path}:7: malformed_json: not UTF-8 text")
    assert f"loaded 2 of 5 records from {path}" in caplog.text


def test_broken_json_file_is_an_error_with_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 3 column 11"):
        read_records(path)
    path.write_text('{"a": 1}')
    with pytest.raises(DataError, match=r"bad\.json: expected a JSON list of records, got a JSON dict"):
        read_records(path)


def test_json_list_with_non_objects(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, 7,\n {"b": 2}]')
    records, report = read_records(path)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]
    assert report.skipped == {"not_a_dict": 1}


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="expected .json or .jsonl"):
        read_records(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")


# -- bad records ------------------------------------------------------------------------------


def _truncated(tmp_path):
    data = write_noisy_png(tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    return record("half.png")


def _not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("these are notes, not pixels")
    return record("notes.png")


BAD_RECORDS = {
    "missing_image": lambda tmp_path: record("images/nowhere.png"),
    "unreadable_image": _truncated,
    "not_an_image": _not_an_image,
    "malformed_json": lambda tmp_path: '{"image": "a.png", "conversations": [',
    "unknown_role": lambda tmp_path: {"conversations": [{"from": "robot", "value": "beep"},
                                                        {"from": "gpt", "value": "boop"}]},
    "too_long": lambda tmp_path: record("a.png", answer="green " * 100),
    "two_tags_one_image": lambda tmp_path: record("a.png", question="<image> and <image>?"),
    "tag_without_image": lambda tmp_path: record(None),
    "no_answer": lambda tmp_path: {"conversations": [{"from": "human", "value": "hello?"}]},
    "image_in_answer": lambda tmp_path: record("a.png", answer="<image>"),
    "bad_image_field": lambda tmp_path: record(42),
    "not_a_dict": lambda tmp_path: "[1, 2, 3]",
}
REASONS = {
    "not_an_image": "unreadable_image",
    "unknown_role": "bad_conversation",
    "two_tags_one_image": "image_count_mismatch",
    "tag_without_image": "image_count_mismatch",
    "no_answer": "bad_conversation",
    "image_in_answer": "bad_conversation",
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_named(tmp_path, chat, processor, caplog, kind):
    write_png(tmp_path / "a.png")
    reason = REASONS.get(kind, kind)
    lines = [record("a.png"), BAD_RECORDS[kind](tmp_path), record(None, question="hi")]
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        ds = dataset(tmp_path, chat, processor, lines)
    assert len(ds) == 2 and ds.sources[1].endswith(":3")
    assert ds.report.skipped == {reason: 1}
    assert (ds.report.total, ds.report.kept) == (3, 2)
    source = f"{tmp_path / 'data.jsonl'}:2"
    assert len(ds.report.warnings) == 1 and ds.report.warnings[0].startswith(f"{source}: {reason}: ")
    assert f"{source}: {reason}" in caplog.text
    assert f"skipped 1: 1 {reason}" in caplog.text


@pytest.mark.parametrize("kind", ["missing_image", "malformed_json", "unknown_role", "too_long"])
def test_strict_raises_naming_file_line_and_reason(tmp_path, chat, processor, kind):
    write_png(tmp_path / "a.png")
    reason = REASONS.get(kind, kind)
    with pytest.raises(DataError, match=rf"data\.jsonl:2: {reason}: "):
        dataset(tmp_path, chat, processor, [record("a.png"), BAD_RECORDS[kind](tmp_path)], strict=True)


def test_summary_counts_reasons_most_common_first(tmp_path, chat, processor):
    write_png(tmp_path / "a.png")
    lines = [record("a.png"), record("gone1.png"), record("a.png", answer="green " * 100), record("gone2.png"),
             record(None, question="hi")]
    ds = dataset(tmp_path, chat, processor, lines)
    path = tmp_path / "data.jsonl"
    assert ds.report.summary() == f"loaded 2 of 5 records from {path}; skipped 3: 2 missing_image, 1 too_long"


def test_only_the_first_warnings_are_logged_one_by_one(tmp_path, chat, processor, caplog):
    write_png(tmp_path / "a.png")
    lines = [record("a.png")] + [record(f"gone{i}.png") for i in range(25)]
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        ds = dataset(tmp_path, chat, processor, lines)
    assert len(ds.report.warnings) == 25
    individual = [r for r in caplog.records if ": missing_image: " in r.getMessage()]
    assert len(individual) == 20
    assert "5 more skipped records not logged one by one" in caplog.text
    assert "loaded 1 of 26 records" in caplog.text


def test_no_usable_record_is_an_error(tmp_path, chat, processor):
    with pytest.raises(DataError, match="no usable records: loaded 0 of 1 records .* 1 missing_image"):
        dataset(tmp_path, chat, processor, [record("gone.png")])


# -- record conventions -----------------------------------------------------------------------


def test_missing_image_tag_is_prepended_to_the_first_human_turn(tmp_path, chat, processor, tokenizer):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    data = record(["a.png", "b.png"], question="what color is the square?")
    data["conversations"].insert(0, {"from": "system", "value": "be brief"})
    original = json.loads(json.dumps(data))
    ds = dataset(tmp_path, chat, processor, [data])
    tagged = json.loads(json.dumps(data))
    tagged["conversations"][1]["value"] = "<image>\n<image>\nwhat color is the square?"
    assert ds[0]["input_ids"].tolist() == chat.encode(tagged).input_ids
    assert ds[0]["num_images"] == 2
    assert data == original  # the caller's record is not modified


def test_text_only_records(tmp_path, chat, processor, tokenizer):
    explicit_none = {**record(None, question="bye"), "image": None}
    ds = dataset(tmp_path, chat, processor, [record(None, question="hi"), explicit_none])
    sample = ds[1]
    assert sample["num_images"] == 0 and sample["pixel_values"].shape == (0, 3, SIZE, SIZE)
    batch = collate([ds[0], ds[1]], tokenizer.pad_id)
    assert batch["pixel_values"] is None and batch["image_counts"].tolist() == [0, 0]


def test_absolute_image_paths(tmp_path, chat, processor):
    image = write_png(tmp_path / "elsewhere" / "a.png")
    ds = ConversationDataset(write_jsonl(tmp_path / "d.jsonl", [record(str(image))]), tmp_path / "unused", chat,
                             processor, max_length=64)
    assert ds[0]["num_images"] == 1


# -- images at load time and at read time -----------------------------------------------------


def test_each_distinct_image_is_decoded_once(tmp_path, chat, processor, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    write_png(tmp_path / "a.png", RED)
    write_png(tmp_path / "b.png", GREEN)
    lines = [record("a.png"), record("b.png"), record("./a.png", answer="red"), record(["a.png", "b.png"],
             question="<image><image> same?", answer="no")]
    ds = dataset(tmp_path, chat, processor, lines)
    samples = [ds[i] for i in range(len(ds))]
    assert sorted(opened) == ["a.png", "b.png"]
    torch.testing.assert_close(samples[3]["pixel_values"][1], samples[1]["pixel_values"][0])
    # Without the cache, loading still decodes each file once; reads decode again.
    opened.clear()
    uncached = dataset(tmp_path, chat, processor, lines, cache_images=False)
    assert sorted(opened) == ["a.png", "b.png"]
    torch.testing.assert_close(uncached[3]["pixel_values"], samples[3]["pixel_values"])


def test_image_deleted_after_loading_is_skipped_at_read_time(tmp_path, chat, processor, caplog):
    for name in "abcd":
        write_png(tmp_path / f"{name}.png")
    answers = ["red", "green", "blue", "yes"]
    lines = [record(f"{name}.png", answer=answer) for name, answer in zip("abcd", answers)]
    ds = dataset(tmp_path, chat, processor, lines, cache_images=False)
    (tmp_path / "b.png").unlink()
    (tmp_path / "d.png").unlink()
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        samples = list(ds)  # must not raise
    assert len(samples) == 4
    assert torch.equal(samples[1]["input_ids"], ds[2]["input_ids"])  # b -> the next sample, c
    assert torch.equal(samples[3]["input_ids"], ds[0]["input_ids"])  # d -> wraps around to a
    assert ds.runtime_skips == 2
    assert "b.png: file not found" in caplog.text and "d.png: file not found" in caplog.text


def test_cached_images_survive_deletion(tmp_path, chat, processor):
    write_png(tmp_path / "a.png")
    ds = dataset(tmp_path, chat, processor, [record("a.png")])
    (tmp_path / "a.png").unlink()
    assert ds[0]["num_images"] == 1 and ds.runtime_skips == 0


def test_all_images_gone_is_an_error(tmp_path, chat, processor):
    write_png(tmp_path / "a.png")
    ds = dataset(tmp_path, chat, processor, [record("a.png")], cache_images=False)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match="none of the 1 samples could be read"):
        ds[0]


def test_dataloader_workers_share_the_runtime_skip_count(tmp_path, chat, processor, tokenizer):
    for name in "abcd":
        write_png(tmp_path / f"{name}.png")
    ds = dataset(tmp_path, chat, processor, [record(f"{name}.png") for name in "abcd"], cache_images=False)
    (tmp_path / "c.png").unlink()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=partial(collate, pad_id=0))
    assert sum(len(batch["image_counts"]) for batch in loader) == 4
    assert ds.runtime_skips == 1


def test_datasets_pickle_for_spawned_workers(tmp_path, chat, processor):
    """DataLoader workers started by "spawn" or "forkserver" receive the dataset pickled."""
    write_png(tmp_path / "a.png")
    ds = dataset(tmp_path, chat, processor, [record("a.png"), record(question="hello?")])
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(2):
        assert all(torch.equal(copy[i][k], ds[i][k]) if torch.is_tensor(ds[i][k]) else copy[i][k] == ds[i][k]
                   for k in ds[i])
    conversation = record()
    assert copy.chat.encode(conversation).input_ids == chat.encode(conversation).input_ids


# -- caption data -----------------------------------------------------------------------------


def test_caption_records_feed_the_conversation_dataset(tmp_path, chat, processor):
    write_png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "captions.jsonl", [
        {"image": "a.png", "caption": "a red square", "id": "x"}, {"image": "a.png"}, {"image": "gone.png",
                                                                                       "caption": "lost"}])
    records, report = caption_records(path, prompt="What is shown?")
    assert report.skipped == {"bad_caption": 1}
    assert records[0].data == {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a red square"}]}
    ds = ConversationDataset.from_records(records, report, tmp_path, chat, processor, max_length=64)
    assert len(ds) == 1 and ds.report is report
    assert report.summary() == f"loaded 1 of 3 records from {path}; skipped 2: 1 bad_caption, 1 missing_image"
    assert report.warnings[1].startswith(f"{path}:3: missing_image")


def test_image_text_dataset_and_collate(tmp_path, tokenizer, processor):
    write_png(tmp_path / "a.png", RED)
    write_png(tmp_path / "b.png", GREEN)
    path = write_jsonl(tmp_path / "captions.jsonl", [
        {"image": "a.png", "caption": "a red star above a small blue circle"},
        {"image": "b.png", "caption": "green"},
        {"image": "a.png", "caption": "red"},
        {"image": "gone.png", "caption": "lost"},
        {"image": "b.png", "caption": ""},
        '{"image": ',
        {"image": "a.png", "caption": "red"},
    ])
    ds = ImageTextDataset(path, tmp_path, tokenizer, processor, max_text_length=5)
    assert len(ds) == 4
    assert ds.report.skipped == {"missing_image": 1, "bad_caption": 1, "malformed_json": 1}
    assert ds.captions == [["a red star above a small blue circle", "red"], ["green"]] + [
        ["a red star above a small blue circle", "red"]] * 2
    assert [p.name for p in ds.image_paths] == ["a.png", "b.png", "a.png", "a.png"]
    assert ds.image_key(0) == ds.image_key(2) != ds.image_key(1)
    first = ds[0]
    assert first["text_ids"].tolist() == tokenizer.encode("a red star above a small blue circle")[:5]
    assert first["pixel_values"].shape == (3, SIZE, SIZE)
    batch = collate_image_text([ds[0], ds[1]], tokenizer.pad_id)
    green = tokenizer.encode("green")
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["text_ids"].shape == (2, 5)
    assert batch["text_ids"][1].tolist() == green + [tokenizer.pad_id] * (5 - len(green))
    assert batch["text_mask"].tolist() == [[1] * 5, [1] * len(green) + [0] * (5 - len(green))]
    torch.testing.assert_close(batch["pixel_values"][1], processor(Image.new("RGB", (1, 1), GREEN)))


# -- collate ----------------------------------------------------------------------------------


def test_collate_pads_and_keeps_image_order(tmp_path, chat, processor, tokenizer):
    for name, color in (("r", RED), ("g", GREEN), ("b", BLUE)):
        write_png(tmp_path / f"{name}.png", color)
    lines = [
        record("r.png"),
        record(None, question="how many objects are there?", answer="three"),
        record(["g.png", "b.png"], question="<image> and <image>: same color?", answer="no"),
    ]
    ds = dataset(tmp_path, chat, processor, lines)
    samples = [ds[i] for i in range(3)]
    batch = collate(samples, tokenizer.pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][row, :length], sample["input_ids"])
        assert torch.equal(batch["labels"][row, :length], sample["labels"])
        assert (batch["input_ids"][row, length:] == tokenizer.pad_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    assert batch["image_counts"].tolist() == [1, 0, 2]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    for got, color in zip(batch["pixel_values"], (RED, GREEN, BLUE)):
        torch.testing.assert_close(got, processor(Image.new("RGB", (1, 1), color)))


def test_load_report_defaults():
    report = LoadReport("x.jsonl", total=3, kept=3)
    assert report.summary() == "loaded 3 of 3 records from x.jsonl; nothing skipped"


# -- several images per record ----------------------------------------------------------------


def _two_image_dialogue(images=("r.png", "g.png"), first="<image>\nwhat color is this?", later="and <image>?") -> dict:
    return {"image": list(images), "conversations": [
        {"from": "human", "value": first}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": later}, {"from": "gpt", "value": "green"}]}


def test_image_lists_fill_placeholders_in_reading_order_across_turns(tmp_path, chat, processor, tokenizer):
    write_png(tmp_path / "r.png", RED, size=(40, 24))  # files of different sizes: each is resized
    write_png(tmp_path / "g.png", GREEN, size=(9, 30))
    ds = dataset(tmp_path, chat, processor, [_two_image_dialogue()])
    sample = ds[0]
    assert sample["num_images"] == 2 and sample["pixel_values"].shape == (2, 3, SIZE, SIZE)
    for got, color in zip(sample["pixel_values"], (RED, GREEN)):  # the list's order, not the file sizes'
        torch.testing.assert_close(got, processor(Image.new("RGB", (1, 1), color)))
    ids = sample["input_ids"].tolist()
    assert ids == chat.encode(_two_image_dialogue()).input_ids
    assert ids.count(tokenizer.image_id) == 8
    # The second image's placeholders sit in the second human turn, after the first answer.
    first_answer = ids.index(tokenizer.encode("red")[0])
    image_positions = [j for j, token in enumerate(ids) if token == tokenizer.image_id]
    assert image_positions[3] < first_answer < image_positions[4]
    assert all(sample["labels"][j] == IGNORE_INDEX for j in image_positions)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_image_list_count_mismatch_names_file_record_and_counts(tmp_path, chat, processor, caplog, suffix):
    write_png(tmp_path / "r.png", RED)
    write_png(tmp_path / "g.png", GREEN)
    lines = [record("r.png"), _two_image_dialogue(),
             _two_image_dialogue(later="and this?"),  # 1 placeholder, 2 images
             _two_image_dialogue(images=["r.png"])]  # 2 placeholders, 1 image
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(lines, indent=1))
    else:
        write_jsonl(path, lines)
    with caplog.at_level(logging.WARNING, logger="vlmkit.data"):
        ds = ConversationDataset(path, tmp_path, chat, processor, max_length=128)
    assert len(ds) == 2 and ds.report.skipped == {"image_count_mismatch": 2}
    starts = [int(s.rsplit(":", 1)[1]) for s in ds.sources]
    first, second = ds.report.warnings
    assert first.startswith(f"{path}:") and int(first.split(":")[1]) > starts[1]
    assert ("image_count_mismatch: record 2 (counting from 0) has 1 <image> placeholder(s) in its text but "
            "2 image(s) in its 'image' field") in first
    assert "record 3 (counting from 0) has 2 <image> placeholder(s) in its text but 1 image(s)" in second
    assert "record 2 (counting from 0)" in caplog.text
    with pytest.raises(DataError, match=rf"data\{suffix}:\d+: image_count_mismatch: record 2 \(counting from 0\) "
                                        r"has 1 <image> placeholder\(s\) in its text but 2 image\(s\)"):
        ConversationDataset(path, tmp_path, chat, processor, max_length=128, strict=True)


def test_image_in_an_assistant_turn_of_a_list_record_is_skipped(tmp_path, chat, processor):
    write_png(tmp_path / "r.png", RED)
    write_png(tmp_path / "g.png", GREEN)
    bad = _two_image_dialogue()
    bad["conversations"][3]["value"] = "<image>"
    ds = dataset(tmp_path, chat, processor, [record("r.png"), bad], max_length=128)
    assert ds.report.skipped == {"bad_conversation": 1}
    assert "an assistant message cannot contain an image" in ds.report.warnings[0]


def test_collate_mixes_one_and_two_image_samples(tmp_path, chat, processor, tokenizer):
    for name, color in (("r", RED), ("g", GREEN), ("b", BLUE)):
        write_png(tmp_path / f"{name}.png", color)
    lines = [record(["g.png", "b.png"], question="<image> and <image>: same color?", answer="no"),
             record("r.png"),
             record(None, question="how many objects are there?", answer="three"),
             record(["b.png", "r.png"], question="<image>\n<image>\nsame?", answer="no")]
    ds = dataset(tmp_path, chat, processor, lines)
    batch = collate([ds[i] for i in range(4)], tokenizer.pad_id)
    assert batch["image_counts"].tolist() == [2, 1, 0, 2]
    assert batch["image_counts"].sum() == batch["pixel_values"].shape[0] == 5
    per_row = (batch["input_ids"] == tokenizer.image_id).sum(1).tolist()
    assert per_row == [4 * n for n in batch["image_counts"].tolist()]
    for got, color in zip(batch["pixel_values"], (GREEN, BLUE, RED, BLUE, RED)):  # reading order, row by row
        torch.testing.assert_close(got, processor(Image.new("RGB", (1, 1), color)))
    # Frozen-tower features follow the same contract: rows of distinct images, flattened in reading order.
    ds.use_features(torch.arange(3.0)[:, None, None].expand(3, 2, 5).clone())
    featured = collate([ds[i] for i in range(4)], tokenizer.pad_id)
    assert "pixel_values" not in featured and featured["image_counts"].tolist() == [2, 1, 0, 2]
    distinct = {path.name: k for k, path in enumerate(ds._store.paths)}
    order = [distinct[name] for name in ("g.png", "b.png", "r.png", "b.png", "r.png")]
    assert featured["image_features"][:, 0, 0].tolist() == [float(k) for k in order]
