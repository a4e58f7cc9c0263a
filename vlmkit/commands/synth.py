"""`vlmkit synth --out DIR --seed S --n N`: generate the shapes-world dataset (`--hires`: large canvases with
small objects, a task where the input resolution matters)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=2000, help="number of train+val+test scenes")
    p.add_argument("--image-size", type=int, default=None, help="canvas side in px (default: 64; with --hires 256)")
    p.add_argument("--no-backgrounds", action="store_true", help="plain backgrounds only")
    p.add_argument("--hires", action="store_true",
                   help="the default scenes' objects (10 and 19 px) on a larger canvas: a 64 px resize leaves "
                        "them 2-5 px wide, so reading them takes the full resolution (e.g. AnyRes tiles)")
    p.add_argument("--multi-image", type=int, default=0, metavar="N",
                   help="also write N pairs of images with questions about both (multi_{train,val,test}.json, "
                        "multi_{split}_qa.jsonl, multi_scenes.jsonl); default 0: none")
    p.add_argument("--video", type=int, default=0, metavar="N",
                   help="also write N moving-shapes clips with questions about motion, order and exits "
                        "(videos/clip_*/, video_{train,val,test}.json, video_{split}_qa.jsonl, video_clips.jsonl); "
                        "default 0: none")
    p.add_argument("--video-frames", type=int, default=16, metavar="F", help="frames per clip (default 16)")


def run(args: argparse.Namespace) -> int:
    from vlmkit.data.shapes_world import HIRES_IMAGE_SIZE, hires_spec, write_dataset

    extra = {"multi_image": args.multi_image, "video": args.video, "video_frames": args.video_frames}
    if args.hires:
        spec = hires_spec(args.image_size or HIRES_IMAGE_SIZE, backgrounds=not args.no_backgrounds)
        summary = write_dataset(args.out, seed=args.seed, n=args.n, spec=spec, **extra)
    else:
        summary = write_dataset(args.out, seed=args.seed, n=args.n, image_size=args.image_size or 64,
                                backgrounds=not args.no_backgrounds, **extra)
    print(json.dumps(summary, indent=2))
    return 0
