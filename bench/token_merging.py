"""Token merging (ToMe) off the shelf: tokens saved, tower forward speed-up and feature drift, per r.

For each tower (an imported DINOv2-S at 224 px, and the demo's dense-trained 64 px tower) and each r,
in one process: image tokens left, the forward time of the tower (the blocks up to its selected layer)
relative to r = 0 (the r values are timed in turn, `--reps` rounds, medians compared: a shared machine
slows all of them alike) and the cosine between the size-weighted mean of the merged features and the
mean of the unmerged ones (min and mean over the images).

With `--vqa RUN` (an instruct run whose connector takes any number of tokens, e.g. mlp2x_gelu), also
the VQA accuracy of that model on `--limit` test questions of its data at each r (merging switched on
after training, as `vlmkit eval RUN --token-merging R` does).

    python bench/token_merging.py [--dinov2 DIR] [--demo runs/demo/dense] [--vqa RUN] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.config import TokenMergingConfig, VisionConfig
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.hf.importers import models_cache_dir
from vlmkit.hf.pretrained import load_vision_tower, tower_weights
from vlmkit.models.checkpoint import read_model_meta, resolve_model_dir
from vlmkit.models.vision import ViT


def with_r(vit: ViT, r: int) -> ViT:
    cfg = VisionConfig(**{**vit.config.__dict__, "token_merging": TokenMergingConfig(r)})
    merged = ViT(cfg).eval()
    merged.load_state_dict(vit.state_dict())
    return merged


def photo_batch() -> list[Image.Image]:
    """matplotlib's sample photo (Grace Hopper), three crops of it, and the four mirrored."""
    from matplotlib import cbook

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = photo.size
    images = [photo, photo.crop((0, 0, w // 2, h // 2)), photo.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
              photo.crop((w // 2, h // 2, w, h))]
    return images + [i.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for i in images]


def measure_tower(name: str, vit: ViT, images: list, rs: list[int], reps: int) -> list[dict]:
    vit = vit.eval()
    x = torch.stack([ImageProcessor.from_vision_config(vit.config)(image) for image in images])
    grid = vit.grid_for(*x.shape[-2:])
    towers = {r: with_r(vit, r) for r in rs}
    times: dict[int, list[float]] = {r: [] for r in rs}
    rows = []
    with torch.inference_mode():
        reference = towers[0](x).mean(dim=1) if 0 in towers else vit(x).mean(dim=1)
        for r in rs:
            features, sizes = towers[r].features_and_sizes(x)  # also a warm-up
            if sizes is None:
                pooled = features.mean(1)
            else:
                pooled = (features * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
            cosine = F.cosine_similarity(pooled, reference, dim=-1)
            rows.append({"tower": name, "r": r, "tokens": towers[r].num_feature_tokens(grid),
                         "cos_min": cosine.min().item(), "cos_mean": cosine.mean().item()})
        for _ in range(reps):
            for r in rs:
                start = time.perf_counter()
                towers[r](x)
                times[r].append(time.perf_counter() - start)
    base = statistics.median(times[rs[0]])
    full = rows[0]["tokens"]
    for row in rows:
        row["saved"] = 1 - row["tokens"] / full
        row["ms_per_image"] = 1000 * statistics.median(times[row["r"]]) / len(images)
        row["speedup"] = base / statistics.median(times[row["r"]])
    return rows


def vqa(run: Path, rs: list[int], limit: int) -> list[dict]:
    import yaml

    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.eval.generation import Answerer
    from vlmkit.eval.metrics import score
    from vlmkit.io import read_jsonl
    from vlmkit.models.vlm import VisionLanguageModel

    root = Path(yaml.safe_load((run / "run.yaml").read_text())["data"]["root"])
    records = read_jsonl(root / "test_qa.jsonl")[:limit]
    model = VisionLanguageModel.from_pretrained(run)
    answerer = Answerer(model, Tokenizer.load(resolve_model_dir(run)), precision="fp32")
    rows = []
    for r in rs:
        model.set_token_merging(r)
        start = time.perf_counter()
        with torch.inference_mode():
            predictions = answerer.answer_records(records, root)
        result = score(records, predictions)
        rows.append({"r": r, "image_tokens": model.tokens_per_image, "vqa": result["vqa_accuracy"],
                     "by_type": result["vqa_accuracy_by_type"], "seconds": time.perf_counter() - start,
                     "n": len(records)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tower | r | tokens / image | saved | forward speed-up | ms / image | cosine min / mean |",
             "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {x['tower']} | {x['r']} | {x['tokens']} | {x['saved']:.0%} | {x['speedup']:.2f}x | "
              f"{x['ms_per_image']:.1f} | {x['cos_min']:.4f} / {x['cos_mean']:.4f} |" for x in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dinov2", default=str(models_cache_dir() / "dinov2-small"),
                   help="an imported DINOv2-S (default: where `vlmkit import dinov2-small` writes it); skipped "
                        "when absent")
    p.add_argument("--dinov2-r", default="0,4,8,12,16")
    p.add_argument("--demo", help="the demo's dense-stage run (its 64 px tower)")
    p.add_argument("--demo-images", help="a directory of images for the demo tower (default: the photo batch)")
    p.add_argument("--demo-r", default="0,2,4,6,8")
    p.add_argument("--vqa", help="an instruct run with a connector that takes any number of tokens")
    p.add_argument("--vqa-r", default="0,2,4,8")
    p.add_argument("--limit", type=int, default=600, help="test questions for --vqa")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    results: dict = {"towers": []}
    if args.dinov2 and (Path(args.dinov2) / "model.safetensors").is_file():
        vit = load_vision_tower(args.dinov2, image_size=224, select_layer=-1, feature_norm=True)
        results["towers"] += measure_tower("DINOv2-S/14, 224 px", vit, photo_batch(), ints(args.dinov2_r),
                                           args.reps)
    else:
        print(f"no DINOv2-S at {args.dinov2}: vlmkit import dinov2-small --out DIR, then --dinov2 DIR")
    if args.demo:
        directory = resolve_model_dir(args.demo)
        vision = read_model_meta(directory)["model"]["vision"]
        vit = ViT(VisionConfig(**{**vision, "token_merging": TokenMergingConfig()}))
        vit.load_state_dict(tower_weights(directory))
        images = (photo_batch() if not args.demo_images else
                  [load_image(path) for path in sorted(Path(args.demo_images).glob("*.png"))[:32]])
        results["towers"] += measure_tower("demo tower, 64 px", vit, images, ints(args.demo_r), args.reps)
    print(table(results["towers"]))
    if args.vqa:
        results["vqa"] = vqa(Path(args.vqa), ints(args.vqa_r), args.limit)
        print("\n| r | image tokens | VQA accuracy | seconds |\n|---:|---:|---:|---:|")
        for row in results["vqa"]:
            print(f"| {row['r']} | {row['image_tokens']} | {row['vqa']:.3f} | {row['seconds']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
