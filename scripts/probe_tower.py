"""What each layer of a vision tower knows about the objects of a scene: linear probes per layer.

    python scripts/probe_tower.py TOWER --data DATA [--image-size 112] [--train 1500] [--test 500]

TOWER is an HF-format directory (e.g. `vlmkit import dinov2-small`) or a vlmkit model / run directory
(a `dense`, `clip` or VLM run: its vision tower). DATA is a shapes-world directory (`vlmkit synth`).
For every layer (0: the patch embeddings), the features of the patch cell holding each object's centre
are collected on `--train` training scenes and a logistic-regression probe per attribute (colour,
shape, size) is fitted and scored on `--test` test scenes. A tower trained with colour jitter (DINOv2)
may keep colour only in its early layers: this says which layer to feed the connector
(`model.vision.select_layer`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.config import VisionConfig, from_dict
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.images import ImageProcessor
from vlmkit.data.scenes import SceneDataset, collate_scenes, read_scenes, scene_attributes
from vlmkit.hf.pretrained import load_vision_tower, tower_weights
from vlmkit.models.checkpoint import read_model_meta, resolve_model_dir
from vlmkit.models.vision import ViT


def load_tower(path: str, image_size: int | None) -> ViT:
    directory = resolve_model_dir(path)
    meta = read_model_meta(directory)
    if "format" not in meta or not str(meta["format"]).startswith("vlmkit"):
        return load_vision_tower(directory, **({"image_size": image_size} if image_size else {}))
    vision = dict(meta["model"]["vision"])
    if image_size:
        vision["image_size"] = image_size
    vit = ViT(from_dict(VisionConfig, vision, "vision"))
    vit.load_state_dict(tower_weights(directory))
    return vit.eval()


@torch.no_grad()
def object_features(vit: ViT, dataset: SceneDataset, batch_size: int = 64) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer [objects, D] features at object cells, and [objects, A] attribute classes."""
    per_layer: list[list[torch.Tensor]] = []
    labels = []
    prefix = vit.num_prefix_tokens
    for start in range(0, len(dataset), batch_size):
        batch = collate_scenes([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        on = batch["objectness"] > 0  # [B, P]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = vit.hidden_states(batch["pixel_values"])
        for layer, state in enumerate(states):
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(state[:, prefix:][on].float())
        labels.append(batch["classes"].permute(0, 2, 1)[on])  # [objects, A]
    return [torch.cat(chunks) for chunks in per_layer], torch.cat(labels)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   classes: int, steps: int = 300) -> float:
    keep, keep_test = y_train != IGNORE_INDEX, y_test != IGNORE_INDEX
    x_train, y_train, x_test, y_test = x_train[keep], y_train[keep], x_test[keep_test], y_test[keep_test]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe((x_train - mean) / std), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe((x_test - mean) / std).argmax(-1) == y_test).float().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tower")
    p.add_argument("--data", required=True, help="a shapes-world directory (vlmkit synth)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this (default: the tower's)")
    p.add_argument("--train", type=int, default=1500, help="training scenes for the probes")
    p.add_argument("--test", type=int, default=500, help="test scenes")
    args = p.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    vit = load_tower(args.tower, args.image_size)
    processor = ImageProcessor.from_vision_config(vit.config)
    grid = vit.grid_for(processor.size, processor.size)
    scenes = Path(args.data) / "scenes.jsonl"
    train_rows, test_rows = read_scenes(scenes, "train")[: args.train], read_scenes(scenes, "test")[: args.test]
    attributes = scene_attributes(train_rows + test_rows)
    make = lambda rows: SceneDataset.from_rows(rows, args.data, processor, attributes, grid)  # noqa: E731
    x_train, y_train = object_features(vit, make(train_rows))
    x_test, y_test = object_features(vit, make(test_rows))
    names = list(attributes)
    print(f"{args.tower}: {processor.size} px, {grid[0]}x{grid[1]} grid; {len(y_train)} / {len(y_test)} objects "
          f"(train / test)\n")
    print("| layer | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for layer in range(len(x_train)):
        accuracies = [probe_accuracy(x_train[layer], y_train[:, a], x_test[layer], y_test[:, a], len(attributes[n]))
                      for a, n in enumerate(names)]
        print(f"| {layer} | " + " | ".join(f"{acc:.3f}" for acc in accuracies) + " |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
