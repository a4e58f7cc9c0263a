"""Dense supervision of the vision tower: conv stem, per-cell targets, the dense stage, frozen-tower features."""

import json
import multiprocessing
import pickle

import numpy as np
import pytest
import torch
import yaml

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.data.images import ImageProcessor
from vlmkit.data.scenes import SceneDataset, cell_targets, collate_scenes, data_spec, read_scenes
from vlmkit.data.shapes_world import generate_scene, write_dataset
from vlmkit.hf.pretrained import tower_weights
from vlmkit.models.dense import DenseConfig, DenseTower, box_bin_targets
from vlmkit.models.vision import ViT
from vlmkit.train.features import tower_features
from vlmkit.train.recipe import recipe_stages, stage_config
from vlmkit.train.sampler import ResumableBatchSampler
from vlmkit.train.trainer import Trainer

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
          "intermediate_size": 64}
ATTRIBUTES = {"color": ["red", "blue"], "shape": ["star", "circle"]}


def test_conv_stem_keeps_the_token_grid_and_checks_the_patch_size():
    torch.manual_seed(0)
    conv = ViT(VisionConfig(**VISION, stem="conv")).eval()
    plain = ViT(VisionConfig(**VISION))
    x = torch.randn(2, 3, 32, 32)
    assert conv(x).shape == plain(x).shape == (2, 16, 32)
    widths = [m.out_channels for m in conv.embeddings.stem if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32]  # three stride-2 convs for 8 px patches, doubling up to hidden_size
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in conv.modules())
    with pytest.raises(ConfigError, match="stem conv needs a power-of-two patch_size"):
        VisionConfig(**{**VISION, "patch_size": 14, "image_size": 28}, stem="conv")
    with pytest.raises(ConfigError, match="vision.stem: 'cnn' is not one of"):
        VisionConfig(**VISION, stem="cnn")


def test_cell_targets_put_each_object_in_its_centre_cell():
    objects = [{"box": [0, 0, 10, 10], "color": "red", "shape": "star"},  # centre (5, 5) -> cell 0
               {"box": [20, 4, 32, 16], "color": "blue", "shape": "circle"}]  # centre (26, 10) -> row 1, col 3
    t = cell_targets(objects, (32, 32), (4, 4), ATTRIBUTES)
    assert t.objectness.nonzero().flatten().tolist() == [0, 7]
    assert t.classes[:, 0].tolist() == [0, 0] and t.classes[:, 7].tolist() == [1, 1]
    assert (t.classes[:, [1, 2, 3]] == -100).all()
    assert torch.allclose(t.boxes[7], torch.tensor([20, 4, 32, 16]) / 32)
    # Two centres in one cell: the larger object wins, whatever the order.
    small = {"box": [1, 1, 5, 5], "color": "blue", "shape": "circle"}
    for order in ([objects[0], small], [small, objects[0]]):
        assert cell_targets(order, (32, 32), (4, 4), ATTRIBUTES).classes[0, 0] == 0
    with pytest.raises(ValueError, match="color='green' is not one of"):
        cell_targets([{"box": [0, 0, 4, 4], "color": "green", "shape": "star"}], (32, 32), (4, 4), ATTRIBUTES)


def test_box_bins_are_evenly_spaced_classes():
    # 65 bins over [0, 1]: one class per pixel edge of a 64 px image.
    boxes = torch.tensor([[0.0, 10 / 64, 1.0, 33 / 64]])
    assert box_bin_targets(boxes, 65).tolist() == [[0, 10, 64, 33]]
    assert box_bin_targets(torch.tensor([[-0.1, 0.5, 1.2, 0.26]]), 5).tolist() == [[0, 2, 4, 1]]
    with pytest.raises(ConfigError, match="box_bins must be 0"):
        DenseConfig(box_bins=1)


def test_dense_tower_learns_cells_of_generated_scenes():
    torch.manual_seed(0)
    spec = data_spec_for_tests()
    processor = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    data = SceneDataset.generated(spec, seed=1, count=64, processor=processor, grid=(4, 4), flip=True)
    model = DenseTower(DenseConfig(vision=VisionConfig(**VISION, stem="conv"), attributes=data.attributes,
                                   box_bins=33))
    batch = collate_scenes([data[i] for i in range(64)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        losses = model(**batch)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert set(losses) == {"objectness", "color", "shape", "size", "box", "box_bins", "loss"}
    for key in ("objectness", "color", "shape", "box"):
        assert float(losses[key].detach()) < 0.7 * first[key], key
    assert float(losses["box_bins"].detach()) < 0.9 * first["box_bins"]  # exact pixel classes take far longer


def data_spec_for_tests():
    from vlmkit.data.shapes_world import SceneSpec

    return SceneSpec(image_size=32, max_objects=3, sizes={"small": 0.25, "large": 0.4})


def test_flip_mirrors_image_and_boxes():
    spec = data_spec_for_tests()
    processor = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    plain = SceneDataset.generated(spec, seed=2, count=4, processor=processor, grid=(4, 4))
    flipped = SceneDataset.generated(spec, seed=2, count=4, processor=processor, grid=(4, 4), flip=True)
    assert flipped.epoch_keyed and not plain.epoch_keyed
    draws = {(i, epoch): flipped.flipped(i, epoch) for i in range(4) for epoch in range(8)}
    assert 8 <= sum(draws.values()) <= 24  # about half of the 32 draws
    assert all(len({draws[i, epoch] for epoch in range(8)}) == 2 for i in range(4))  # each epoch draws anew
    i, epoch = next(key for key, mirrored in draws.items() if mirrored)
    sample = flipped[i, epoch]
    assert torch.equal(sample["pixel_values"], plain[i]["pixel_values"].flip(-1))
    boxes = sample["boxes"][sample["objectness"] > 0]
    expected = plain[i]["boxes"][plain[i]["objectness"] > 0]
    mirrored_boxes = torch.stack([1 - expected[:, 2], expected[:, 1], 1 - expected[:, 0], expected[:, 3]], 1)
    assert torch.allclose(boxes.sort(0).values, mirrored_boxes.sort(0).values)
    j, other = next(key for key, mirrored in draws.items() if not mirrored)
    assert torch.equal(flipped[j, other]["pixel_values"], plain[j]["pixel_values"])
    # No global random state: the same key gives the same sample, whatever the generators hold.
    torch.manual_seed(123)
    assert torch.equal(flipped[i, epoch]["pixel_values"], sample["pixel_values"])
    assert torch.equal(flipped[i]["pixel_values"], flipped[i, 0]["pixel_values"])
    reseeded = SceneDataset.generated(spec, seed=2, count=4, processor=processor, grid=(4, 4), flip=True, flip_seed=1)
    assert [reseeded.flipped(*key) for key in draws] != list(draws.values())


def test_fresh_scenes_are_the_same_in_dataloader_workers():
    """Generated (recoloured, flipped) scenes read by 2 worker processes equal those of the training process."""
    spec = data_spec_for_tests()
    processor = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    make = lambda: SceneDataset.generated(spec, seed=5, count=20, processor=processor, grid=(4, 4),  # noqa: E731
                                          flip=True, recolor=0.3, flip_seed=1)
    sampler = ResumableBatchSampler([1] * 20, 8, seed=0, with_epoch=True)
    main, torch_state = make(), torch.random.get_rng_state()
    torch.manual_seed(99)  # global state must not matter
    expected = [collate_scenes([main[i, epoch] for i in batch]) for epoch in range(2)
                for batch in sampler.epoch_batches(epoch)]
    torch.random.set_rng_state(torch_state)
    loader = torch.utils.data.DataLoader(make(), batch_sampler=sampler, collate_fn=collate_scenes, num_workers=2,
                                         persistent_workers=True)
    got = []
    for epoch in range(2):
        sampler.seek(epoch * sampler.per_epoch)
        got += list(loader)
    del loader
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Workers started by "spawn" or "forkserver" receive the dataset pickled.
    copy = pickle.loads(pickle.dumps(make()))
    assert all(torch.equal(copy[7, 1][k], main[7, 1][k]) for k in main[7, 1])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-shapes")
    write_dataset(root, seed=4, n=30, image_size=48)
    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.tokenizer import train_tokenizer

    train_tokenizer(tokenizer_texts(root), vocab_size=300).save(root / "tokenizer")
    return root


RECIPE = {
    "precision": "fp32", "device": "cpu", "log_every": 1, "save_every": 100, "eval_samples": 8,
    "model": {"vision": {**VISION, "image_size": 48, "stem": "conv"},
              "lm": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
              "connector": {"name": "mlp2x_gelu"}},
    "stages": {
        "dense": {"data": {"train": "scenes.jsonl", "val": "scenes.jsonl", "flip": True},
                  "dense": {"box_bins": 49}, "optim": {"steps": 2, "batch_size": 8, "warmup_steps": 1}},
        "instruct": {"vision_from": "dense", "data": {"train": "train.json", "val": "val.json", "max_length": 320},
                     "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1}},
    },
}


def test_dense_stage_reads_scenes_and_hands_its_tower_to_the_vlm(shapes_dir, tmp_path):
    base = [f"tokenizer={shapes_dir / 'tokenizer'}", f"data.root={shapes_dir}"]
    dense = Trainer(stage_config(RECIPE, "dense", [f"out={tmp_path / 'dense'}", *base]))
    assert dense.tokenizer is None  # the dense stage reads no text
    assert len(dense.train_set) == len(read_scenes(shapes_dir / "scenes.jsonl", "train"))
    results = dense.fit()
    assert {"objectness_f1", "color_accuracy", "box_iou", "box_bin_within1"} <= set(results)
    assert json.loads((tmp_path / "dense" / "model" / "config.json").read_text())["format"] == "vlmkit-dense"

    vlm = Trainer(stage_config(RECIPE, "instruct", [f"out={tmp_path / 'vlm'}", f"vision_from={tmp_path / 'dense'}",
                                                    *base]))
    tower = tower_weights(tmp_path / "dense" / "model")
    assert all(torch.equal(vlm.model.vision.state_dict()[k], v) for k, v in tower.items())
    # The frozen tower's features are computed once, up front: batches carry features, not pixels.
    batch = vlm.stage.collate([vlm.train_set[i] for i in range(2)])
    assert "image_features" in batch and "pixel_values" not in batch
    running = vlm.model.vision.embeddings.stem[1].running_mean.clone()
    vlm.fit()
    # A frozen tower stays in eval mode: its BatchNorm statistics never move.
    assert torch.equal(vlm.model.vision.embeddings.stem[1].running_mean, running)


def test_dense_stage_on_fresh_scenes_trains_the_same_with_workers(shapes_dir, tmp_path):
    base = [f"data.root={shapes_dir}", "data.fresh_scenes=24", "data.recolor=0.2", "optim.steps=4",
            "data.val=null", "save_every=2"]
    runs = {}
    for workers in (0, 2):
        trainer = Trainer(stage_config(RECIPE, "dense", [f"out={tmp_path / str(workers)}", *base,
                                                          f"data.num_workers={workers}"]))
        assert trainer.sampler.with_epoch  # flips are drawn per (index, epoch)
        trainer.fit(stop_after=3)  # 3 batches of 8 out of 24: the fourth starts epoch 1
        assert not multiprocessing.active_children()
        trainer.fit()
        runs[workers] = trainer.model.state_dict()
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_fresh_scenes_follow_the_data_spec_without_held_out_pairs(shapes_dir):
    spec, seed = data_spec(shapes_dir)
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert seed == meta["seed"] and spec.image_size == 48
    held_out = {tuple(p) for p in meta["holdout_pairs"]}
    assert held_out and held_out <= spec.exclude_pairs
    for i in range(50):
        assert not {o.pair for o in generate_scene(i, 99, spec).objects} & held_out


def test_tower_features_match_the_tower_and_are_cached_on_disk(tmp_path, caplog):
    torch.manual_seed(0)
    tower = ViT(VisionConfig(**VISION, stem="conv"))
    processor = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pixels[3] = pixels[1]  # a repeated image is computed once
    direct = tower.eval()(processor.normalize(pixels))
    tower.train()
    first = tower_features(tower, processor, pixels, precision="fp32", cache_dir=tmp_path)
    assert tower.training  # the caller's mode is restored
    assert torch.allclose(first, direct, atol=1e-6)
    shards = list(tmp_path.rglob("*.safetensors"))
    assert len(shards) == 1
    caplog.set_level("INFO", logger="vlmkit.train")
    again = tower_features(tower, processor, pixels, precision="fp32", cache_dir=tmp_path)
    assert torch.equal(again, first) and "5 images, 5 from the cache, 0 computed" in caplog.text
    with torch.no_grad():
        tower.blocks[0].mlp.fc1.weight.add_(1.0)  # another tower: another fingerprint, a fresh cache
    tower_features(tower, processor, pixels, precision="fp32", cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    shards[0].write_bytes(b"damaged")  # a damaged shard is recomputed, not fatal
    with torch.no_grad():
        tower.blocks[0].mlp.fc1.weight.sub_(1.0)
    assert torch.allclose(tower_features(tower, processor, pixels, precision="fp32", cache_dir=tmp_path), direct,
                          atol=1e-6)


def test_recipe_stages_run_in_recipe_order_and_must_be_known():
    assert recipe_stages(RECIPE) == ["dense", "instruct"]
    with pytest.raises(ConfigError, match="unknown stage\\(s\\) \\['pretrain'\\]"):
        recipe_stages({"stages": {"pretrain": {}}})
    with pytest.raises(ConfigError, match="no stages"):
        recipe_stages({})


def test_demo_runs_the_recipe_stages_in_order(shapes_dir, tmp_path, monkeypatch, capsys):
    from argparse import Namespace

    from vlmkit.commands import demo

    recipe = {**RECIPE, "synth": {"seed": 4, "n": 30, "image_size": 48}, "tokenizer_training": {"vocab_size": 300},
              "eval": {"split": "test", "limit": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert demo.run(Namespace(recipe=str(path), out=str(tmp_path / "demo"), overrides=[], skip_synth=False)) == 0
    out = capsys.readouterr().out
    assert out.index("stage dense") < out.index("stage instruct")
    run = yaml.safe_load((tmp_path / "demo" / "instruct" / "run.yaml").read_text())
    assert run["vision_from"] == str(tmp_path / "demo" / "dense")
    assert (tmp_path / "demo" / "eval.json").is_file()


def test_decorrelating_scenes_hide_unnamed_attributes_and_never_draw_held_out_pairs(shapes_dir):
    spec, _ = data_spec(shapes_dir)
    processor = ImageProcessor(48, (0.5,) * 3, (0.5,) * 3)
    data = SceneDataset.generated(spec, seed=3, count=60, processor=processor, grid=(6, 6), recolor=0.3,
                                  other_shapes=0.3)
    kinds = {"recolored": 0, "other_shapes": 0, "plain": 0}
    for i in range(60):
        sample = data[i]
        objects = data._objects[i]
        assert not {(o["color"], o["shape"]) for o in objects} & spec.exclude_pairs
        colors, shapes = sample["classes"][:, sample["objectness"] > 0][:2]
        if all(o["color"] is None for o in objects):
            kinds["recolored"] += 1
            assert (colors == -100).all() and (shapes >= 0).all()
        elif all(o["shape"] is None for o in objects):
            kinds["other_shapes"] += 1
            assert (shapes == -100).all() and (colors >= 0).all()
        else:
            kinds["plain"] += 1
    assert all(count >= 8 for count in kinds.values()), kinds
    with pytest.raises(ValueError, match="other_shapes needs shapes outside"):
        from dataclasses import replace

        from vlmkit.data.shapes_world import ALL_SHAPES
        SceneDataset.generated(replace(spec, shapes=ALL_SHAPES, exclude_pairs=frozenset()), 0, 4, processor, (6, 6),
                               other_shapes=0.5)
