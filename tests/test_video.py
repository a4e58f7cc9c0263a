"""Clips: frame sources, frame choice under a token budget, markers, datasets and batches of clips,
temporal pooling in the model, answering questions about clips, and the moving-shapes task."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.config import ConfigError, ModelConfig, VideoConfig
from vlmkit.data.collate import collate
from vlmkit.data.datasets import ConversationDataset
from vlmkit.data.images import ImageProcessor
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.records import DataError, Record
from vlmkit.data.shapes_world import SceneSpec, moving_clip, render_clip, write_dataset
from vlmkit.data.shapes_world.spec import DEFAULT_HOLDOUT, PALETTE
from vlmkit.data.video import (
    VideoDecoderMissing,
    VideoSampler,
    change_indices,
    frame_groups,
    frame_markers,
    insert_clip,
    read_video,
    uniform_indices,
)
from vlmkit.eval.generation import Answerer
from vlmkit.models.vlm import VisionLanguageModel, pool_frames


def write_frames(directory, n, size=32, names=None):
    """n frames: a red bar moving right over grey, frame t's bar at x = 3t (a different picture each frame)."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = []
    for t in range(n):
        pixels = np.full((size, size, 3), 200, dtype=np.uint8)
        pixels[:, 3 * t : 3 * t + 3] = (220, 30, 30)
        frames.append(pixels)
        Image.fromarray(pixels).save(directory / (names[t] if names else f"frame_{t}.png"))
    return frames


def sampler(tokens=16, size=32, **video):
    return VideoSampler(VideoConfig(**video), tokens, ImageProcessor(size, (0.5,) * 3, (0.5,) * 3))


# -- choosing frames ------------------------------------------------------------------------------


def test_uniform_indices_span_the_clip():
    assert uniform_indices(16, 4) == [0, 5, 10, 15]
    assert uniform_indices(16, 2) == [0, 15]
    assert uniform_indices(5, 1) == [2]
    assert uniform_indices(3, 8) == [0, 1, 2]


def test_change_sampling_keeps_the_frames_where_the_picture_changes():
    # 10 frames: the picture changes at frame 3 (a lot) and at frame 7 (less); otherwise it is still.
    frames = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    frames[3:] = 200
    frames[7:, :4] = 100
    assert change_indices(frames, 3) == [0, 3, 7]
    assert change_indices(frames, 2) == [0, 3]
    assert uniform_indices(10, 3) == [0, 4, 9]  # uniform sampling misses both changes


def test_change_sampling_compares_with_the_kept_frame_before():
    # A slow drift (frames 1..5 each 10 greys from the previous) then a jump at 6: after keeping 6, the
    # drift's end (5, far from 0) beats frame 1 (near 0).
    frames = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 10, 20, 30, 40, 50, 250, 250)])
    assert change_indices(frames, 2) == [0, 6]
    assert change_indices(frames, 3) == [0, 5, 6]


def test_the_budget_sets_how_many_frames_are_kept():
    assert sampler(16, budget=40).max_frames == 2
    assert sampler(16, budget=40, temporal_pool=2).max_frames == 4  # a pooled pair costs one frame's tokens
    assert sampler(16).max_frames is None  # no budget: every frame
    with pytest.raises(ConfigError, match="model.video.budget 8 is less than one frame's 16 image tokens"):
        sampler(16, budget=8)


def test_video_config_names_the_field():
    with pytest.raises(ConfigError, match="model.video.sampling: 'random' is not one of"):
        VideoConfig(sampling="random")
    with pytest.raises(ConfigError, match="model.video.temporal_pool"):
        VideoConfig(temporal_pool=0)
    with pytest.raises(ConfigError, match="model.video.budget"):
        VideoConfig(budget=0)
    with pytest.raises(ConfigError, match="model.video.temporal_pool 2 averages"):
        ModelConfig.from_dict({"vision": {"token_merging": {"r": 2}}, "video": {"temporal_pool": 2}})


def test_markers_and_groups():
    assert frame_groups(5, 2) == [2, 2, 1]
    assert frame_markers([1, 1, 1]) == "Frame 1: <image>\nFrame 2: <image>\nFrame 3: <image>"
    assert frame_markers([2, 2, 1]) == "Frames 1-2: <image>\nFrames 3-4: <image>\nFrame 5: <image>"


def test_insert_clip_replaces_the_tag_or_puts_the_clip_first():
    record = {"conversations": [{"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": "left"}]}
    assert insert_clip(record, "F")["conversations"][0]["value"] == "F\nWhere?"
    assert record["conversations"][0]["value"] == "<video>\nWhere?"  # the caller's record is left alone
    bare = {"conversations": [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "left"}]}
    assert insert_clip(bare, "F")["conversations"][0]["value"] == "F\nWhere?"
    with pytest.raises(ValueError, match="2 <video> tags"):
        insert_clip({"conversations": [{"from": "human", "value": "<video><video>"}]}, "F")
    with pytest.raises(ValueError, match="assistant"):
        insert_clip({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<video>"}]}, "F")


# -- where frames come from -----------------------------------------------------------------------


def test_a_frame_directory_is_read_in_natural_order(tmp_path):
    names = ["f_10.png", "f_2.png", "f_1.png"]
    write_frames(tmp_path / "clip", 3, names=names)
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    frames = sampler().frames("clip/", tmp_path)
    assert [f.name for f in frames] == ["f_1.png", "f_2.png", "f_10.png"]
    assert [f.name for f in sampler().frames(["clip/f_2.png", "clip/f_1.png"], tmp_path)] == ["f_2.png", "f_1.png"]


def test_an_animated_gif_is_a_video_file(tmp_path):
    frames = write_frames(tmp_path / "src", 5)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "clip.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    decoded = read_video(tmp_path / "clip.gif", 32)
    assert decoded.shape == (5, 32, 32, 3)
    assert np.abs(decoded.astype(int) - np.stack(frames)).max() <= 8  # the GIF palette rounds colours


def test_a_video_file_decodes_with_pyav(tmp_path):
    av = pytest.importorskip("av", reason="decoding video files needs PyAV: pip install 'vlmkit[video]'")
    frames = write_frames(tmp_path / "src", 6)
    with av.open(str(tmp_path / "clip.mkv"), "w") as container:  # FFV1 in Matroska: lossless
        stream = container.add_stream("ffv1", rate=5)
        stream.width = stream.height = 32
        stream.pix_fmt = "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = read_video(tmp_path / "clip.mkv", 32)
    assert np.array_equal(decoded, np.stack(frames))
    assert read_video(tmp_path / "clip.mkv", 16).shape == (6, 16, 16, 3)  # resized to the model's size


def test_a_video_file_without_pyav_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(VideoDecoderMissing, match=r"pip install 'vlmkit\[video\]'"):
        read_video(tmp_path / "clip.mp4", 32)


# -- datasets, batches, the model -------------------------------------------------------------------


@pytest.fixture
def clip_model(make_config):
    def build(**video):
        torch.manual_seed(0)
        return VisionLanguageModel(make_config(video=video)).eval()  # 32 px, 16 tokens per frame
    return build


def records(*items):
    return [Record(f"mem:{i}", data, i) for i, data in enumerate(items)]


def clip_record(video, question="<video>\nWhich way?", answer="right"):
    return {"video": video, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def dataset(model, tokenizer, tmp_path, items):
    processor = VLMProcessor.for_model(model, tokenizer)
    return ConversationDataset.from_records(records(*items), None, tmp_path, processor.chat, processor.image_processor,
                                            max_length=400, video=processor.video)


def test_a_clip_record_becomes_marked_frames_within_the_budget(clip_model, tokenizer, tmp_path):
    write_frames(tmp_path / "clip", 8)
    model = clip_model(budget=48)  # 3 frames of 16 tokens
    ds = dataset(model, tokenizer, tmp_path, [clip_record("clip/")])
    sample = ds[0]
    assert sample["pixel_values"].shape == (3, 3, 32, 32) and sample["num_images"] == 3
    assert "image_frames" not in sample
    text = tokenizer.decode(sample["input_ids"].tolist())
    assert "Frame 1: " in text and "Frame 3: " in text and "Frame 4" not in text
    assert (sample["input_ids"] == tokenizer.image_id).sum() == 3 * 16
    # The kept frames are 0, 4 and 7 (uniform): frame t's bar (low green) starts at x = 3t.
    assert [int(f[1].mean(0).argmin()) // 3 for f in sample["pixel_values"]] == [0, 4, 7]


def test_temporal_pooling_groups_frames_and_the_batch_says_how(clip_model, tokenizer, tmp_path):
    write_frames(tmp_path / "clip", 8)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "still.png")
    model = clip_model(budget=32, temporal_pool=2)  # 2 pooled images = 4 frames
    still = {"image": "still.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "white"}]}
    ds = dataset(model, tokenizer, tmp_path, [still, clip_record("clip/")])
    clip = ds[1]
    assert clip["pixel_values"].shape[0] == 4 and clip["num_images"] == 2 and clip["image_frames"] == [2, 2]
    assert "Frames 1-2: " in tokenizer.decode(clip["input_ids"].tolist())
    batch = collate([ds[0], ds[1]], tokenizer.pad_id)
    assert batch["image_frames"].tolist() == [1, 2, 2]
    assert batch["image_counts"].tolist() == [1, 2] and batch["pixel_values"].shape[0] == 5
    with torch.no_grad():
        loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                     image_counts=batch["image_counts"], image_frames=batch["image_frames"]).loss
        # The pooled image is the average of its frames' image tokens.
        tokens = model.encode_images(batch["pixel_values"])
        embeds = torch.stack([tokens[0], tokens[1:3].mean(0), tokens[3:5].mean(0)])
        # Packed (the longer clip first in its row): the frame groups follow the samples, the loss is the same.
        both = len(ds[0]["input_ids"]) + len(ds[1]["input_ids"])
        packed = collate([ds[0], ds[1]], tokenizer.pad_id, pack_length=both)
        assert packed["image_frames"].tolist() == [2, 2, 1] and packed["image_counts"].tolist() == [3]
        packed_loss = model(packed["input_ids"], packed["pixel_values"], labels=packed["labels"],
                            image_counts=packed["image_counts"], image_frames=packed["image_frames"],
                            segment_ids=packed["segment_ids"]).loss
    assert torch.allclose(packed_loss, loss, atol=1e-5)
    assert torch.isfinite(loss)
    assert torch.allclose(model.embed(batch["input_ids"], image_embeds=embeds, image_counts=batch["image_counts"]),
                          model.embed(batch["input_ids"], batch["pixel_values"], batch["image_counts"],
                                      image_frames=batch["image_frames"]), atol=1e-6)


def test_pool_frames_checks_the_groups():
    tokens = torch.arange(24.0).reshape(4, 3, 2)
    assert torch.equal(pool_frames(tokens, [2, 2]), torch.stack([tokens[:2].mean(0), tokens[2:].mean(0)]))
    assert torch.equal(pool_frames(list(tokens), [1, 3])[1], tokens[1:].mean(0))
    with pytest.raises(ValueError, match="do not split the 4 frame"):
        pool_frames(tokens, [2, 1])


def test_bad_clip_records_are_skipped_with_a_reason(clip_model, tokenizer, tmp_path):
    write_frames(tmp_path / "clip", 4)
    model = clip_model(budget=32)
    items = [clip_record("clip/"), clip_record("nowhere/"), clip_record("clip/", "<video><video>\nWhich way?"),
             {**clip_record("clip/"), "image": "x.png"}, clip_record(7)]
    ds = dataset(model, tokenizer, tmp_path, items)
    assert len(ds) == 1
    assert dict(ds.report.skipped) == {"missing_video": 1, "video_count_mismatch": 1, "bad_video_field": 2}
    with pytest.raises(DataError, match="missing_video"):
        processor = VLMProcessor.for_model(model, tokenizer)
        ConversationDataset.from_records(records(clip_record("nowhere/")), None, tmp_path, processor.chat,
                                         processor.image_processor, max_length=400, strict=True,
                                         video=processor.video)


def test_answering_questions_about_clips(clip_model, tokenizer, tmp_path):
    write_frames(tmp_path / "clip", 8)
    model = clip_model(budget=32, temporal_pool=2)
    answerer = Answerer(model, tokenizer, max_new_tokens=4, precision="fp32")
    got = answerer.answer_records([{"video": "clip/", "question": "Which way?"},
                                   {"video": "clip/", "question": "Is it <video> moving?"}], tmp_path)
    # The same questions put together by hand: the clip's frames, its groups and its text.
    frames, groups, text = answerer.processor.clip("clip/", tmp_path)
    assert groups == [2, 2] and len(frames) == 4
    manual = answerer.answer([f"{text}\nWhich way?", f"Is it {text} moving?"], [frames, frames], [groups, groups])
    assert got == manual


def test_a_run_started_from_a_model_takes_its_video_settings(tmp_path, clip_model, tokenizer):
    from vlmkit.train.config import RunConfig
    from vlmkit.train.stages import InstructStage

    clip_model(budget=32).save_pretrained(tmp_path / "model", tokenizer)
    cfg = RunConfig(init_from=str(tmp_path / "model"), model={"video": {"budget": 64, "sampling": "change"}})
    model = InstructStage(cfg, tokenizer).build_model()
    assert (model.config.video.budget, model.config.video.sampling) == (64, "change")
    unset = InstructStage(RunConfig(init_from=str(tmp_path / "model")), tokenizer).build_model()
    assert unset.config.video.budget == 32


# -- the moving-shapes task -------------------------------------------------------------------------


def _colour_masks(frame: Image.Image) -> dict[str, np.ndarray]:
    pixels = np.asarray(frame)
    return {name: (pixels == rgb).all(-1) for name, rgb in PALETTE.items()}


def answers_from_pixels(frames: list[Image.Image]) -> dict[str, object]:
    """What the frames show, found from the pixels alone (each object has its own colour)."""
    masks = [_colour_masks(f) for f in frames]
    colours = [c for c in PALETTE if any(m[c].any() for m in masks)]
    first = {c: next(t for t, m in enumerate(masks) if m[c].any()) for c in colours}
    gone = [c for c in colours if not masks[-1][c].any()]

    def centre(t, c):
        ys, xs = np.nonzero(masks[t][c])
        return xs.mean(), ys.mean()

    motion = {}
    for c in colours:
        seen = [t for t, m in enumerate(masks) if m[c].any()]
        (x0, y0), (x1, y1) = centre(seen[0], c), centre(seen[1], c)
        motion[c] = None if (x0, y0) == (x1, y1) else (
            ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up"))
    return {"last": max(colours, key=first.get), "leave": len(gone), "motion": motion, "first": first}


@pytest.mark.parametrize("position", range(12))
def test_clip_answers_follow_from_the_rendered_frames(position):
    spec = SceneSpec(exclude_pairs=DEFAULT_HOLDOUT)
    clip = moving_clip(position + 100, 3, spec, position)
    frames = render_clip(clip, spec)
    seen = answers_from_pixels(frames)
    direction, last, leave = clip.questions
    subject_colour = direction.targets[0].split()[0]
    assert direction.answer == seen["motion"][subject_colour] == ("left", "right", "up", "down")[position % 4]
    assert last.answer.split()[0] == seen["last"]
    assert leave.answer == str(seen["leave"]) == str(position % 3)
    assert sorted(seen["first"].values())[0] == 0  # something is there from the start
    assert not {(m.color, m.shape) for m in clip.movers} & set(DEFAULT_HOLDOUT)
    assert len({m.color for m in clip.movers}) == len(clip.movers)
    # The trajectories agree with the pixels at every frame.
    for t, frame in enumerate(frames):
        masks = _colour_masks(frame)
        for m, visible in zip(clip.movers, clip.visible(t)):
            assert masks[m.color].any() == visible


def test_moving_shapes_data_is_deterministic_by_seed(tmp_path):
    a = write_dataset(tmp_path / "a", seed=1, n=4, video=6)
    b = write_dataset(tmp_path / "b", seed=1, n=4, video=6)
    c = write_dataset(tmp_path / "c", seed=2, n=4, video=6)
    read = lambda d, name: (d / name).read_bytes()  # noqa: E731
    for name in ("video_train.json", "video_test_qa.jsonl", "video_clips.jsonl",
                 "videos/clip_000003/frame_007.png"):
        assert read(tmp_path / "a", name) == read(tmp_path / "b", name)
    assert read(tmp_path / "a", "video_clips.jsonl") != read(tmp_path / "c", "video_clips.jsonl")
    assert a["video_counts"] == b["video_counts"] and c["video"] == 6 and a["video_frames"] == 16
    assert len(list((tmp_path / "a" / "videos" / "clip_000000").glob("*.png"))) == 16
    record = json.loads((tmp_path / "a" / "video_train.json").read_text())[0]
    assert record["video"] == "videos/clip_000000/" and record["conversations"][0]["value"].startswith("<video>\n")
    # Without clips nothing of them is written, and the rest of the dataset is the same.
    plain = write_dataset(tmp_path / "d", seed=1, n=4)
    assert "video" not in plain and not (tmp_path / "d" / "videos").exists()
    assert read(tmp_path / "a", "train.json") == read(tmp_path / "d", "train.json")


def test_moving_shapes_trains_end_to_end_through_the_dataset(tmp_path, clip_model, tokenizer):
    write_dataset(tmp_path, seed=0, n=2, video=4, video_frames=8, image_size=40)
    model = clip_model(budget=64)
    processor = VLMProcessor.for_model(model, tokenizer)
    ds = ConversationDataset(tmp_path / "video_train.json", tmp_path, processor.chat, processor.image_processor,
                             max_length=400, video=processor.video)
    assert len(ds) == 3 * 4 and ds[0]["num_images"] == 4
    batch = collate([ds[i] for i in range(len(ds))], tokenizer.pad_id)
    loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                 image_counts=batch["image_counts"]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_chat_and_eval_take_clips(tmp_path, clip_model, tokenizer, capsys):
    from vlmkit.cli import main

    write_dataset(tmp_path / "data", seed=0, n=10, video=10, video_frames=8)
    model_dir = tmp_path / "model"
    clip_model(budget=32).save_pretrained(model_dir, tokenizer)
    capsys.readouterr()
    clip = tmp_path / "data" / "videos" / "clip_000000"
    assert main(["chat", str(model_dir), "--video", str(clip), "--max-new-tokens", "3", "Which way?"]) == 0
    assert main(["chat", str(model_dir), "--video", str(clip), "--image", str(clip / "frame_000.png"), "q"]) == 1
    assert "give --image or --video, not both" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "data"), "--split", "video_test",
                 "--device", "cpu"]) == 0
    results = json.loads((model_dir / "eval.json").read_text())
    assert results["split"] == "video_test" and results["n_samples"] == 3  # one test clip, three questions
    assert set(results["vqa_accuracy_by_type"]) == {"video_direction", "video_last", "video_leave"}
