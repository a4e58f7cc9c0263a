"""AnyRes (LLaVA-NeXT): geometry, tiles and logits equal transformers'; variable token counts through
datasets, batches, training, batched generation and chat."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit import anyres
from vlmkit.cli import main
from vlmkit.config import ConfigError, VideoConfig
from vlmkit.data.collate import collate
from vlmkit.data.datasets import ConversationDataset
from vlmkit.data.images import ImageProcessor, Tiles
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.shapes_world import SceneSpec
from vlmkit.data.video import VideoSampler
from vlmkit.eval.generation import Answerer
from vlmkit.models.vlm import VisionLanguageModel

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's shapes, 32 px tiles
ANYRES = {"anyres": {"grid_pinpoints": PINPOINTS}}
SIZES = [(40, 90), (100, 37), (32, 32), (7, 300), (64, 64), (250, 251)]
ONE_IMAGE = {"conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                               {"from": "gpt", "value": "green"}]}


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def random_sizes(n: int, seed: int = 0, largest: int = 2000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, largest), rng.randint(1, largest)) for _ in range(n)] + [(1, 1), (336, 336), (672, 336)]


# -- geometry and preprocessing against transformers ---------------------------------------------------


@pytest.mark.parametrize("pinpoints,base,patch", [
    ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 14),  # llava-v1.6
    ([[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]], 384, 16),
    (PINPOINTS, 32, 8),
])
def test_geometry_and_token_counts_equal_transformers(pinpoints, base, patch):
    transformers = pytest.importorskip("transformers")
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next import modeling_llava_next as hf
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    # The processor's own count, on a processor holding only what the count reads.
    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints), patch_size=patch,
                           num_additional_image_tokens=0)
    fake._get_unpadded_features = lambda *args: LlavaNextProcessor._get_unpadded_features(fake, *args)
    side = base // patch
    for size in random_sizes(400 if base > 100 else 150, seed=base, largest=4 * base):
        assert anyres.select_best_resolution(size, pinpoints) == tuple(select_best_resolution(size, pinpoints))
        assert anyres.num_tiles(size, pinpoints, base) == hf.image_size_to_num_patches(size, pinpoints, base)
        rows, cols = anyres.tile_grid(size, pinpoints, base)
        assert (rows, cols) == tuple(hf.get_anyres_image_grid_shape(size, pinpoints, base))
        top, bottom, left, right = anyres.unpadded_region(size, (rows * side, cols * side))
        unpadded = hf.unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(size))
        assert tuple(unpadded.shape[1:]) == (bottom - top, right - left)
        count = anyres.anyres_token_count(size, pinpoints, base, (side, side))
        assert count == LlavaNextProcessor._get_number_of_features(fake, *size, base, base), size
    assert transformers.__version__


def test_tiles_equal_the_llava_next_image_processor():
    pytest.importorskip("transformers")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    ref = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=PINPOINTS, image_mean=mean, image_std=std, resample=3)
    ours = ImageProcessor(32, mean, std, PINPOINTS)
    for seed, size in enumerate(SIZES):
        image = picture(seed, size)
        tiles = ours.tiles(image)
        expected = ref(images=image, return_tensors="pt")
        assert tiles.size == size == tuple(expected["image_sizes"][0].tolist())
        assert tiles.pixels.shape == (anyres.num_tiles(size, PINPOINTS, 32), 3, 32, 32)
        assert torch.equal(expected["pixel_values"][0][: len(tiles.pixels)], tiles.pixels)
    # 40 x 90 fits 32 x 96 best (1 x 3 tiles): resized to 32 x 72, with 12 black columns either side.
    uint8, size = ours.tiles_uint8(picture(0, (40, 90)))
    assert size == (40, 90) and uint8.shape == (4, 32, 32, 3)
    assert (uint8[1, :, :12] == 0).all() and (uint8[3, :, -12:] == 0).all() and (uint8[1:, :, 12:-12] != 0).any()
    assert ImageProcessor(32, mean, std).tiles_uint8(picture(0, (40, 90)))[0].shape == (1, 32, 32, 3)


# -- the model ----------------------------------------------------------------------------------------


def llava_next_pair(transformers):
    """A tiny random transformers LlavaNext and our model with its weights (CLIP tower, Llama LM)."""
    from vlmkit.config import ModelConfig, to_dict
    from vlmkit.hf.hub import (
        lm_config_from_hf,
        lm_state_dict_from_hf,
        load_into,
        vision_config_from_hf,
        vision_state_dict_from_hf,
    )

    torch.manual_seed(0)
    hf_cfg = transformers.LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96},
        image_token_index=95, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    ref = transformers.LlavaNextForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # random norms and biases: a mapping mistake cannot hide behind their init values
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    cfg = ModelConfig.from_dict({
        "vision": to_dict(vision_config_from_hf(hf_cfg.vision_config.to_dict())),
        "lm": to_dict(lm_config_from_hf(hf_cfg.text_config.to_dict())),
        "connector": {"name": "mlp2x_gelu"}, "image_token_id": 95, "image": ANYRES})
    ours = VisionLanguageModel(cfg).eval()
    inner = ref.model
    load_into(ours.vision, vision_state_dict_from_hf(inner.vision_tower.state_dict()))
    lm = {**{f"model.{k}": v for k, v in inner.language_model.state_dict().items()},
          "lm_head.weight": ref.lm_head.weight}
    load_into(ours.lm, lm_state_dict_from_hf(lm))
    projector = inner.multi_modal_projector
    load_into(ours.connector, {"mlp.0.weight": projector.linear_1.weight, "mlp.0.bias": projector.linear_1.bias,
                               "mlp.2.weight": projector.linear_2.weight, "mlp.2.bias": projector.linear_2.bias})
    load_into(ours.anyres, {"image_newline": inner.image_newline})
    return ref, ours


def test_logits_equal_transformers_llava_next_for_a_batch_of_two_sizes():
    transformers = pytest.importorskip("transformers")
    ref, ours = llava_next_pair(transformers)
    processor = ImageProcessor.from_model_config(ours.config)
    tiles = [processor.tiles(picture(seed, size)) for seed, size in enumerate([(40, 90), (100, 37)])]
    counts = [ours.image_token_count(*t.size) for t in tiles]
    # 1 x 3 tiles: a 4 x 12 token grid keeps 10 columns; 3 x 1 tiles: a 12 x 4 grid keeps 10 rows.
    assert counts == [16 + 4 * (10 + 1), 16 + 10 * (4 + 1)]
    rows = [[1, 2] + [95] * n + [3, 4, 5] for n in counts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    # transformers takes [images, max tiles, 3, S, S] (zero-padded) and the original sizes.
    padded = torch.zeros(2, max(len(t.pixels) for t in tiles), 3, 32, 32)
    for i, t in enumerate(tiles):
        padded[i, : len(t.pixels)] = t.pixels
    sizes = torch.tensor([t.size for t in tiles])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=padded, image_sizes=sizes).logits
        got = ours(ids, torch.cat([t.pixels for t in tiles]), attention_mask=mask, image_sizes=sizes,
                   image_counts=[1, 1]).logits
    for i, row in enumerate(rows):
        assert (expected[i, : len(row)] - got[i, : len(row)]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("connector,tile_grid", [
    ({"name": "mlp2x_gelu"}, (4, 4)),
    ({"name": "pixel_shuffle", "downsample": 2}, (2, 2)),
    ({"name": "c_abstractor", "num_queries": 4}, (2, 2)),
])
def test_packed_tokens_have_the_counted_length(make_config, tokenizer, connector, tile_grid):
    model = VisionLanguageModel(make_config(connector=connector, image=ANYRES)).eval()
    assert model.tile_token_grid == tile_grid
    processor = VLMProcessor.for_model(model, tokenizer)
    assert processor.tiling and processor.image_processor.size == 32
    tiles = [processor.preprocess(picture(seed, size)) for seed, size in enumerate(SIZES)]
    with torch.no_grad():
        tokens = model.encode_images(torch.cat([t.pixels for t in tiles]), image_sizes=[t.size for t in tiles])
    th, tw = tile_grid
    for t, out in zip(tiles, tokens):
        assert out.shape == (processor.image_tokens(*t.size), 32)
        assert len(out) == anyres.anyres_token_count(t.size, PINPOINTS, 32, tile_grid)
        # The thumbnail's tokens, then every kept row of the joined grid followed by the newline embedding.
        grid_rows, grid_cols = anyres.tile_grid(t.size, PINPOINTS, 32)
        top, bottom, left, right = anyres.unpadded_region(t.size, (grid_rows * th, grid_cols * tw))
        row = [False] * (right - left) + [True]
        expected = torch.tensor([False] * (th * tw) + row * (bottom - top))
        assert torch.equal((out == model.anyres.image_newline).all(dim=1), expected)


def test_configs_anyres_cannot_honour_are_errors(make_config):
    with pytest.raises(ConfigError, match="perceiver connector's tokens have no grid"):
        VisionLanguageModel(make_config(connector={"name": "perceiver", "num_queries": 4}, image=ANYRES))
    with pytest.raises(ConfigError, match="set vision.keep_cls: false"):
        make_config(vision={"keep_cls": True}, image=ANYRES)
    with pytest.raises(ConfigError, match=r"\[48, 64\] must be positive multiples of the tile size base=32"):
        make_config(image={"anyres": {"grid_pinpoints": [[48, 64]]}})
    with pytest.raises(ConfigError, match="anyres.base 36 must be a multiple of vision.patch_size 8"):
        make_config(image={"anyres": {"grid_pinpoints": [[72, 72]], "base": 36}})
    model = VisionLanguageModel(make_config(image=ANYRES))
    with pytest.raises(ValueError, match="give image_sizes, the original"):
        model.encode_images(torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"make 4 tiles of 16 tokens, but \(5, 16\) were given"):
        model.encode_images(torch.zeros(5, 3, 32, 32), image_sizes=[(40, 90)])


def test_another_tile_size_than_the_towers(make_config, tokenizer):
    model = VisionLanguageModel(make_config(image={"anyres": {"grid_pinpoints": [[48, 48], [48, 96]], "base": 48}}))
    processor = VLMProcessor.for_model(model, tokenizer)
    t = processor.preprocess(picture(0, (50, 100)))
    assert t.pixels.shape == (3, 3, 48, 48) and model.tile_token_grid == (6, 6)
    with torch.no_grad():
        (tokens,) = model.encode_images(t.pixels, image_sizes=[t.size])
    assert len(tokens) == processor.image_tokens(50, 100) == 36 + 6 * 13


# -- with token merging and clips ----------------------------------------------------------------------


def test_anyres_refuses_token_merging_and_clip_settings(make_config):
    with pytest.raises(ConfigError, match="vision.token_merging.r 2: model.image.anyres lays each tile's tokens"):
        make_config(vision={"token_merging": {"r": 2}}, image=ANYRES)
    with pytest.raises(ConfigError, match="model.video sets how clips are sampled, but a model with model.image."
                                          "anyres takes no clips"):
        make_config(video={"budget": 64}, image=ANYRES)
    model = VisionLanguageModel(make_config(image=ANYRES))
    with pytest.raises(ConfigError, match="vision.token_merging.r 4: model.image.anyres"):
        model.set_token_merging(4)  # switched on after building, too
    model.set_token_merging(0)
    assert model.config.vision.token_merging.r == 0


def test_an_anyres_model_takes_no_clips(anyres_model, tokenizer, image_dir):
    (image_dir / "clip").mkdir()
    for t in range(3):
        picture(t, (32, 32)).save(image_dir / "clip" / f"frame_{t}.png")
    processor = VLMProcessor.for_model(anyres_model, tokenizer)
    assert processor.video is None
    with pytest.raises(ValueError, match=r"AnyRes tiles \(model.image.anyres\) and takes no clips"):
        processor.clip("clip/", image_dir)
    with pytest.raises(ValueError, match="takes no clips"):
        Answerer(anyres_model, tokenizer).answer_records([{"video": "clip/", "question": "which way?"}], image_dir)
    clip = {"video": "clip/", "conversations": [{"from": "human", "value": "<video>\nwhich way?"},
                                                {"from": "gpt", "value": "right"}]}
    (image_dir / "train.json").write_text(json.dumps([{**ONE_IMAGE, "image": "0.png"}, clip]))
    dataset = ConversationDataset(image_dir / "train.json", image_dir, processor.chat, processor.image_processor,
                                  max_length=400, image_tokens=processor.image_tokens)
    assert len(dataset) == 1 and dict(dataset.report.skipped) == {"bad_video_field": 1}
    sampler = VideoSampler(VideoConfig(), 16, processor.image_processor)  # one built by hand is refused too
    with pytest.raises(ValueError, match="takes no clips"):
        ConversationDataset(image_dir / "train.json", image_dir, processor.chat, processor.image_processor,
                            max_length=400, image_tokens=processor.image_tokens, video=sampler)


def test_frames_given_with_image_sizes_pool_after_packing(anyres_model):
    """The model itself takes both: AnyRes frames (tiles + original sizes) whose packed tokens
    `image_frames` averages, as for any frames of one size."""
    processor = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, PINPOINTS)
    frames = [processor.tiles(picture(seed, (40, 90))) for seed in range(3)]
    tiles, sizes = torch.cat([f.pixels for f in frames]), [f.size for f in frames]
    n = anyres_model.image_token_count(40, 90)
    image = anyres_model.config.image_token_id
    ids = torch.tensor([[5] + [image] * n + [6, 6] + [image] * n])
    with torch.no_grad():
        tokens = anyres_model.encode_images(tiles, image_sizes=sizes)
        expected = anyres_model.embed(ids, image_embeds=[(tokens[0] + tokens[1]) / 2, tokens[2]])
        pooled = anyres_model.embed(ids, tiles, [2], image_sizes=sizes, image_frames=[2, 1])
    assert torch.allclose(pooled, expected, atol=1e-6)


# -- data, training, generation ------------------------------------------------------------------------


@pytest.fixture
def anyres_model(make_config):
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(image=ANYRES)).eval()
    with torch.no_grad():  # weights large enough that greedy answers depend on the image
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.8 / weight.shape[-1] ** 0.5)
    return model


@pytest.fixture
def image_dir(tmp_path):
    for seed, size in enumerate(SIZES):
        picture(seed, size).save(tmp_path / f"{seed}.png")
    return tmp_path


def test_dataset_counts_each_image_by_its_size_and_batches_match_samples_alone(anyres_model, tokenizer,
                                                                               image_dir):
    processor = VLMProcessor.for_model(anyres_model, tokenizer)
    records = [{**ONE_IMAGE, "image": f"{i}.png"} for i in range(len(SIZES))]
    records.append({"image": ["0.png", "3.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]})
    path = image_dir / "train.json"
    path.write_text(json.dumps(records))
    dataset = ConversationDataset(path, image_dir, processor.chat, processor.image_processor, max_length=400,
                                  image_tokens=processor.image_tokens)
    for i, size in enumerate(SIZES):
        sample = dataset[i]
        assert sample["image_sizes"].tolist() == [list(size)]
        assert int((sample["input_ids"] == tokenizer.image_id).sum()) == processor.image_tokens(*size)
        assert sample["pixel_values"].shape == (anyres.num_tiles(size, PINPOINTS, 32), 3, 32, 32)
        # the same ids as the processor gives for that size
        assert sample["input_ids"].tolist() == processor.encode(ONE_IMAGE, image_sizes=[size]).input_ids
    two = dataset[len(SIZES)]
    assert two["image_sizes"].tolist() == [list(SIZES[0]), list(SIZES[3])]
    assert two["input_ids"].tolist() == processor.encode(records[-1], image_sizes=[SIZES[0], SIZES[3]]).input_ids

    samples = [dataset[i] for i in (0, 1, len(SIZES))]
    batch = collate(samples, tokenizer.pad_id)
    assert batch["image_sizes"].tolist() == [list(SIZES[0]), list(SIZES[1]), list(SIZES[0]), list(SIZES[3])]
    with torch.no_grad():
        together = anyres_model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                                image_counts=batch["image_counts"], image_sizes=batch["image_sizes"])
        alone = [anyres_model(s["input_ids"][None], s["pixel_values"], labels=s["labels"][None],
                              image_sizes=s["image_sizes"]) for s in samples]
        for i, (s, out) in enumerate(zip(samples, alone)):
            n = len(s["input_ids"])
            assert torch.allclose(together.logits[i, :n], out.logits[0], atol=1e-5)
        # Packed rows carry each image's size in the order the row's samples sit: the same loss.
        packed = collate(samples, tokenizer.pad_id, pack_length=sum(len(s["input_ids"]) for s in samples))
        assert len(packed["input_ids"]) == 1 and packed["image_counts"].tolist() == [4]
        packed_loss = anyres_model(packed["input_ids"], packed["pixel_values"], labels=packed["labels"],
                                   image_counts=packed["image_counts"], image_sizes=packed["image_sizes"],
                                   segment_ids=packed["segment_ids"]).loss
        assert torch.allclose(packed_loss, together.loss, atol=1e-5)

        # A frozen tower's features per tile give the same loss as the pixels.
        features = anyres_model.vision(processor.image_processor.normalize(dataset.image_pixels))
    assert len(dataset.image_pixels) == sum(anyres.num_tiles(s, PINPOINTS, 32) for s in SIZES)
    dataset.use_features(features)
    featured = collate([dataset[i] for i in (0, 1, len(SIZES))], tokenizer.pad_id)
    assert "pixel_values" not in featured and featured["image_features"].shape[0] == batch["pixel_values"].shape[0]
    with torch.no_grad():
        from_features = anyres_model(featured["input_ids"], labels=featured["labels"],
                                     image_counts=featured["image_counts"], image_sizes=featured["image_sizes"],
                                     image_features=featured["image_features"])
    assert torch.allclose(from_features.loss, together.loss, atol=1e-5)

    # Too long is decided once the images' sizes are known: the 2 x 2 tile images (88 tokens) are dropped.
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    short = ConversationDataset(path, image_dir, processor.chat, processor.image_processor, max_length=100,
                                image_tokens=processor.image_tokens)
    assert short.report.skipped["too_long"] == sum(n > 100 for n in lengths) == 2
    assert sorted(short.lengths.tolist()) == sorted(n for n in lengths if n <= 100)
    with pytest.raises(ValueError, match="needs image_tokens"):
        ConversationDataset(path, image_dir, processor.chat, processor.image_processor, max_length=400)


def test_batched_answers_equal_one_by_one_and_chat_takes_any_size(anyres_model, tokenizer, image_dir, tmp_path,
                                                                  capsys):
    answerer = Answerer(anyres_model, tokenizer, batch_size=8, max_new_tokens=5, precision="fp32")
    images = [answerer.processor.preprocess(image_dir / f"{i}.png") for i in range(len(SIZES))]
    assert all(isinstance(t, Tiles) for t in images)
    questions = ["what color is the square?"] * len(SIZES) + ["how many objects are there?"]
    entries = images + [[images[0], images[3]]]
    together = answerer.answer(questions, entries)
    assert together == [answerer.answer([q], [e])[0] for q, e in zip(questions, entries)]
    assert len(set(together)) >= 2
    with pytest.raises(ValueError, match="give it VLMProcessor.preprocess's Tiles"):
        answerer.answer(["hi"], [torch.zeros(3, 32, 32)])

    anyres_model.save_pretrained(tmp_path / "model", tokenizer)
    assert main(["chat", str(tmp_path / "model"), "--image", str(image_dir / "3.png"), "--device", "cpu",
                 "--max-new-tokens", "5", "what color is the square?"]) == 0
    assert capsys.readouterr().out.strip() == together[3]
    assert main(["info", str(tmp_path / "model")]) == 0
    assert "AnyRes tiling     32px tiles of 16 tokens + a thumbnail, grids 1x2, 2x1, 2x2, 3x1, 1x3: 88 tokens for a " \
           "64x64 image" in capsys.readouterr().out
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert reloaded.config.image.anyres.grid_pinpoints == [tuple(p) for p in PINPOINTS]
    assert torch.equal(reloaded.anyres.image_newline, anyres_model.anyres.image_newline)


# -- the high-resolution task, trained and scored ------------------------------------------------------


def test_synth_hires_draws_the_default_objects_on_a_larger_canvas(tmp_path, capsys):
    assert main(["synth", "--hires", "--out", str(tmp_path / "hires"), "--n", "12", "--seed", "1"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["image_size"] == 256 and meta["sizes"] == {"small": 10, "large": 19}
    assert meta["sizes"] == SceneSpec().to_dict()["sizes_px"]  # the default 64 px scenes' objects
    scenes = [json.loads(line) for line in (tmp_path / "hires" / "scenes.jsonl").read_text().splitlines()]
    assert all(Image.open(tmp_path / "hires" / s["image"]).size == (256, 256) for s in scenes)
    sides = {o["box"][2] - o["box"][0] for s in scenes for o in s["objects"]}
    assert sides and max(sides) <= 19  # at most 19 px of 256: under 5 px once resized to 64


@pytest.mark.parametrize("train_vision", [False, True])  # frozen tower: features per tile; else pixels
def test_instruct_stage_trains_anyres_and_eval_scores_the_hires_task(tmp_path, train_vision, capsys, caplog):
    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.tokenizer import train_tokenizer
    from vlmkit.eval.run_eval import evaluate
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    from .test_train import TINY_RECIPE

    data = tmp_path / "data"  # with clips, which an AnyRes model does not take
    assert main(["synth", "--hires", "--out", str(data), "--n", "12", "--seed", "1", "--video", "10"]) == 0
    capsys.readouterr()
    train_tokenizer(tokenizer_texts(data), vocab_size=300).save(data / "tokenizer")
    cfg = stage_config(TINY_RECIPE, "instruct", [
        f"out={tmp_path / 'run'}", f"tokenizer={data / 'tokenizer'}", f"data.root={data}",
        "model.image.anyres.grid_pinpoints=[[96, 96], [48, 96], [96, 48]]",
        f"optim.train_vision={str(train_vision).lower()}"])
    trainer = Trainer(cfg)
    newline = trainer.model.anyres.image_newline.detach().clone()
    sizes = []
    loss = trainer.stage.loss
    trainer.stage.loss = lambda model, batch: sizes.append(batch["image_sizes"].tolist()) or loss(model, batch)
    results = trainer.fit()
    assert sizes and all(s == [256, 256] for batch in sizes for s in batch)
    assert torch.isfinite(torch.tensor(results["val_loss"]))
    assert not torch.equal(trainer.model.anyres.image_newline.detach(), newline)  # it trains with the connector
    scores = evaluate(tmp_path / "run", data_root=data, limit=6, batch_size=4, out=tmp_path / "eval.json")
    assert scores["n_samples"] == 6 and 0 <= scores["vqa_accuracy"] <= 1
    assert (data / "video_test_qa.jsonl").is_file() and "video_test" not in scores
    assert "video_test not scored: this model takes no clips" in caplog.text


def test_reliability_suite_runs_on_an_anyres_model(anyres_model, tokenizer, tmp_path, capsys):
    from vlmkit.data.shapes_world import write_dataset

    data = tmp_path / "data"
    write_dataset(data, seed=2, n=40, image_size=48)  # 48 px images: 1 x 2 / 2 x 1 / 2 x 2 grids of 32 px tiles
    anyres_model.save_pretrained(tmp_path / "model", tokenizer)
    assert main(["eval", str(tmp_path / "model"), "--suite", "reliability", "--data", str(data), "--limit", "2",
                 "--stress-severities", "0", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    assert report["blind"]["overall"]["n"] == 2 and report["pope"]["n_images"] == 2
    assert report["attention"]["correct"]["n_answers"] + report["attention"]["incorrect"]["n_answers"] > 0
