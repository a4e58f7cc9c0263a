"""Prepare real-image training data: emoji glyphs and Tux Paint stamps, plus a text-only chat set.

    python scripts/prepare_real_data.py --out data/real [--image-size 224] [--chat-prompts 256]

Sources (Debian packages, installed here with apt-get when missing and running as root):
- `fonts-noto-color-emoji`: every single-code-point emoji the font draws, named by `unicodedata`
  ("A grinning face with smiling eyes.");
- `tuxpaint-stamps-default` (GPL-2): stamps with a PNG and an English description ("A frog.").
The images are rendered or read at run time into OUT; nothing from the packages belongs in the repo.

Writes, atomically, into OUT:
- `images/emoji/*.png`, `images/stamps/**.png`: on white, square, IMAGE_SIZE px;
- `captions_{train,test}.jsonl`: `{"image", "caption", "source"}` pairs (the align stage's format);
- `instruct_{train,test}.json`: LLaVA records, per picture "What is shown in this picture?" -> caption
  and "Is this a picture of X?" -> yes/no (X absent half of the time);
- `text_only.json`: LLaVA records without images, for mixing into the instruct stage against
  forgetting: simple prompts answered greedily by the imported SmolLM2-135M-Instruct itself
  (self-distillation: the answers are the model's own, not checked facts); answers that hit the
  token limit are dropped;
- with `--mix-shapes SHAPES_DIR` (a `vlmkit synth` output), `instruct_mix_train.json`: the real-image
  train questions plus shapes-world's train conversations (image paths relative to OUT), shuffled;
- `summary.json`: counts and sources.
The test part (TEST_FRACTION of captions, chosen by a hash of the caption) is held out of train.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlmkit.data.real_images import (
    EMOJI_FONT,
    STAMPS_DIR,
    Item,
    caption_record,
    emoji_items,
    question_records,
    split_of,
    square_on_white,
    stamp_items,
)
from vlmkit.io import atomic_directory

DEBIAN_PACKAGES = {"fonts-noto-color-emoji": EMOJI_FONT, "tuxpaint-stamps-default": STAMPS_DIR}
SPLITS = ("train", "test")

# Prompts for the text-only set: everyday questions a small assistant should keep answering.
ANIMALS = ["cat", "dog", "horse", "cow", "frog", "penguin", "elephant", "owl", "bee", "dolphin", "rabbit", "snail",
           "lion", "turtle", "parrot", "butterfly", "shark", "camel", "fox", "squirrel"]
THINGS = ["banana", "the sky", "grass", "snow", "a fire truck", "an orange", "a strawberry", "the sun", "coal",
          "a lemon", "milk", "a tomato", "chocolate", "the ocean", "a pumpkin"]
TOPICS = ["rain", "the moon", "trees", "bicycles", "music", "the sea", "bread", "clocks", "volcanoes", "friendship",
          "winter", "computers", "birds", "mountains", "books", "electricity", "the heart", "gravity", "plants",
          "money"]
ACTIVITIES = ["sleeping well", "learning a language", "saving money", "staying healthy", "studying for a test",
              "making friends", "cooking rice", "keeping a plant alive", "writing an email", "running"]
WORDS = ["happy", "quickly", "bright", "garden", "journey", "gentle", "window", "brave", "river", "curious"]
TOOLS = ["a hammer", "an umbrella", "a spoon", "a ladder", "a broom", "a pencil", "a key", "a clock", "a map",
         "a towel", "a bucket", "a needle", "a magnet", "a compass", "a flashlight"]
HOW_TO = ["boil an egg", "tie a shoelace", "plant a seed", "wash my hands properly", "make a cup of tea",
          "fold a shirt", "read a map", "write a thank-you note", "wake up earlier", "clean a window",
          "start a conversation", "take care of a cat", "pack for a trip", "remember a phone number", "stay calm"]
COLOURS = ["red", "yellow", "green", "orange", "purple", "blue", "brown", "white"]
SUMS = [f"{a} plus {b}" for a, b in zip(range(2, 32), range(7, 97, 3))]
TEMPLATES = [
    ("Tell me one fact about the {}.", ANIMALS),
    ("What does a {} eat?", ANIMALS),
    ("What color is {}?", THINGS),
    ("Explain {} to a child in two sentences.", TOPICS),
    ("Write one short sentence about {}.", TOPICS),
    ("Give me one tip for {}.", ACTIVITIES),
    ("Write a sentence that uses the word '{}'.", WORDS),
    ("What is the opposite of '{}'?", WORDS),
    ("Where does a {} live?", ANIMALS),
    ("What sound does a {} make?", ANIMALS),
    ("What is interesting about {}?", TOPICS),
    ("Give me a synonym for '{}'.", WORDS),
    ("What is {} used for?", TOOLS),
    ("How do I {}?", HOW_TO),
    ("Name a fruit that is {}.", COLOURS),
    ("What is {}?", SUMS),
]


def ensure_debian_packages(install: bool) -> None:
    missing = [pkg for pkg, path in DEBIAN_PACKAGES.items() if not path.exists()]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"missing Debian package(s) {missing}; install them as root with: {' '.join(command)}")
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env).returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(command, env=env, check=True)


def collect_images(out: Path, size: int) -> list[tuple[Item, str]]:
    """Render/read every picture into OUT/images; returns (item, image path relative to OUT)."""
    from PIL import Image

    from vlmkit.data.images import load_image

    def save(image: Image.Image, relative: str) -> str:
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize((size, size), Image.LANCZOS).save(path, format="PNG")
        return relative

    items = [(item, save(image, f"images/{item.key}.png")) for item, image in emoji_items()]
    items += [(item, save(square_on_white(load_image(png)), f"images/{item.key}.png")) for item, png in stamp_items()]
    return items


def write_image_records(out: Path, items: list[tuple[Item, str]], test_fraction: float, seed: int) -> dict:
    counts = {}
    for split in SPLITS:
        part = [(item, path) for item, path in items if split_of(item.caption, test_fraction) == split]
        # Distractors for "no" questions come from the same split and source, so test questions never
        # name a training picture's subject and emoji are not asked about as stamps.
        by_source = {s: [item for item, _ in part if item.source == s] for s in ("emoji", "stamps")}
        rng = random.Random(f"{seed}-{split}")
        records = [r for item, path in part for r in question_records(item, path, by_source[item.source], rng)]
        with open(out / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
            for item, path in part:
                f.write(json.dumps(caption_record(item, path), ensure_ascii=False) + "\n")
        (out / f"instruct_{split}.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
        counts[split] = {"pictures": len(part), **{s: len(v) for s, v in by_source.items()},
                         "instruct_records": len(records)}
    return counts


def write_shapes_mix(out: Path, final_out: Path, shapes_dir: Path, limit: int | None, seed: int) -> dict:
    """Real-image train questions + shapes-world train conversations in one LLaVA file rooted at OUT."""
    shapes = json.loads((shapes_dir / "train.json").read_text())
    rng = random.Random(f"{seed}-mix")
    if limit is not None and len(shapes) > limit:
        shapes = rng.sample(shapes, limit)
    relative = Path(os.path.relpath(shapes_dir.resolve(), final_out.resolve()))
    for record in shapes:  # paths are written relative to the final OUT, not the temporary directory
        record["image"] = (relative / record["image"]).as_posix()
    real = json.loads((out / "instruct_train.json").read_text())
    mixed = real + shapes
    rng.shuffle(mixed)
    (out / "instruct_mix_train.json").write_text(json.dumps(mixed, indent=1, ensure_ascii=False))
    return {"real": len(real), "shapes": len(shapes), "shapes_dir": str(shapes_dir)}


def chat_prompts(n: int, seed: int) -> list[str]:
    every = [template.format(word) for template, words in TEMPLATES for word in words]
    rng = random.Random(seed)
    rng.shuffle(every)
    return every[:n]


def write_text_only(out: Path, lm_dir: Path, n: int, seed: int, max_new_tokens: int) -> dict:
    """Greedy answers of the LM in `lm_dir` to `n` prompts, as LLaVA records without images."""
    import vlmkit
    from vlmkit.eval.generation import Answerer

    tokenizer = vlmkit.load_tokenizer(lm_dir)
    answerer = Answerer(vlmkit.load_language_model(lm_dir), tokenizer, batch_size=16, max_new_tokens=max_new_tokens)
    prompts = chat_prompts(n, seed)
    started = time.perf_counter()
    answers = answerer.answer(prompts, [None] * len(prompts))
    seconds = time.perf_counter() - started
    # An answer as long as the budget was cut off mid-way: training on it would teach stopping mid-sentence.
    complete = [(p, a) for p, a in zip(prompts, answers) if a and len(tokenizer.encode(a)) < max_new_tokens - 1]
    records = [{"id": f"chat/{i:04d}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
               for i, (p, a) in enumerate(complete)]
    (out / "text_only.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return {"prompts": len(prompts), "kept": len(records), "dropped_truncated_or_empty": len(prompts) - len(records),
            "generation_seconds": round(seconds, 1), "model": str(lm_dir)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-prompts", type=int, default=256, help="text-only prompts (0: no text-only set)")
    p.add_argument("--chat-max-new-tokens", type=int, default=96)
    p.add_argument("--lm", help="the SmolLM2 directory answering the chat prompts (default: `vlmkit import smollm2`)")
    p.add_argument("--mix-shapes", metavar="SHAPES_DIR", help="also write instruct_mix_train.json with this "
                   "shapes-world dataset's train conversations")
    p.add_argument("--mix-shapes-max", type=int, help="at most this many shapes-world conversations in the mix")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing missing packages")
    args = p.parse_args()

    ensure_debian_packages(install=not args.no_install)
    summary: dict = {"image_size": args.image_size, "test_fraction": args.test_fraction, "seed": args.seed,
                     "sources": {"emoji": f"{EMOJI_FONT} (Noto Color Emoji, OFL-1.1)",
                                 "stamps": f"{STAMPS_DIR} (Tux Paint stamps, GPL-2)"}}
    with atomic_directory(args.out) as tmp:
        started = time.perf_counter()
        items = collect_images(tmp, args.image_size)
        summary["counts"] = write_image_records(tmp, items, args.test_fraction, args.seed)
        summary["image_seconds"] = round(time.perf_counter() - started, 1)
        if args.mix_shapes:
            summary["mix"] = write_shapes_mix(tmp, Path(args.out), Path(args.mix_shapes), args.mix_shapes_max,
                                              args.seed)
        if args.chat_prompts > 0:
            from vlmkit.hf.importers import import_model

            lm_dir = Path(args.lm) if args.lm else import_model("smollm2", log=lambda m: print(m, file=sys.stderr))[0]
            summary["text_only"] = write_text_only(tmp, lm_dir, args.chat_prompts, args.seed, args.chat_max_new_tokens)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
