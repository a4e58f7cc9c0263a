"""Real images with names, from two Debian packages: Noto Color Emoji glyphs and Tux Paint stamps.

An `Item` is one picture and what it shows: an emoji rendered from the font (named by its Unicode
name, "grinning face with smiling eyes") or a Tux Paint stamp (its English description, "A frog.").
From items come caption pairs for the align stage and LLaVA-format questions for the instruct stage.
Splits are a pure function of the caption, so equal captions never straddle train and test.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.images import to_rgb

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT_SIZE = 109  # the only size the font's colour bitmaps come in
# Single code points that are emoji in the font. Modifiers, regional-indicator letters and
# combining marks render as colour swatches or letters, not as pictures of their name.
EMOJI_RANGES = ((0x00A9, 0x00AE), (0x203C, 0x3299), (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA), (0x1F400, 0x1FAFF))
NOT_PICTURES = ("COMBINING", "FITZPATRICK", "REGIONAL INDICATOR", "CJK", "IDEOGRAPH", "KATAKANA", "VARIATION")
# In Unicode names "black"/"white" often mean a filled/outlined glyph, not the colour the colour font
# draws (HEAVY BLACK HEART is red). They are kept only where the picture has that colour.
TRUE_COLOUR_WORDS = ("square", "circle", "flag", "chess", "hair")
COLOUR_NAMES = {0x2764: "red heart", 0x2B50: "yellow star", 0x1F5A4: "black heart", 0x1F90D: "white heart"}
TYPOGRAPHIC = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u00a0": " "}

WHAT_QUESTIONS = ("What is shown in this picture?", "What is this?", "Describe the picture briefly.")
ABSENT = "no"


@dataclass(frozen=True)
class Item:
    key: str  # unique and stable: "emoji/1f600" or "stamps/animals/amphibians/frog-1"
    caption: str  # a short sentence: "A frog."
    source: str  # "emoji" | "stamps"
    origin: str  # the code point or file it comes from

    @property
    def label(self) -> str:
        """The caption as a noun phrase for questions: "A frog." -> "a frog"."""
        text = self.caption.rstrip(".!")
        first_word = text.split(" ", 1)[0]
        acronym = len(first_word) > 1 and first_word.isupper()  # "US 1 cent piece" stays as it is
        return text if acronym else text[:1].lower() + text[1:]


def clean_caption(text: str) -> str:
    """One line, plain ASCII quotes and dashes, single spaces, a capital first letter and end punctuation."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    for fancy, plain in TYPOGRAPHIC.items():
        text = text.replace(fancy, plain)
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def with_article(noun_phrase: str) -> str:
    """ "grinning face" -> "A grinning face"; "egg" -> "An egg"; "european castle" -> "A european castle"."""
    lower = noun_phrase.lower()
    vowel_sound = lower[:1] in "aeiou" and not lower.startswith(("eu", "uni", "one", "use"))
    return f"{'An' if vowel_sound else 'A'} {noun_phrase}"


def emoji_name(char: str) -> str | None:
    """The readable name of a single-code-point emoji, or None if it is not a picture of its name.

    "GRINNING FACE" -> "grinning face"; typographic "black"/"white" are dropped ("BLACK SCISSORS" ->
    "scissors") except on shapes, flags and the like that are drawn in that colour.
    """
    name = unicodedata.name(char, "")
    if not name or any(word in name for word in NOT_PICTURES):
        return None
    if ord(char) in COLOUR_NAMES:
        return COLOUR_NAMES[ord(char)]
    name = name.lower().removeprefix("emoji component ")
    if not any(word in name for word in TRUE_COLOUR_WORDS):
        name = re.sub(r"\b(black|white) ", "", name)
    return name


def split_of(caption: str, test_fraction: float = 0.1) -> str:
    """'train' or 'test', from a hash of the normalised caption: stable across runs and machines."""
    digest = hashlib.sha256(caption.lower().encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


# --- sources -----------------------------------------------------------------------------------------


def emoji_items(font_path: Path = EMOJI_FONT) -> Iterator[tuple[Item, Image.Image]]:
    """Every single-code-point emoji the font draws, rendered in colour on white."""
    font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    for first, last in EMOJI_RANGES:
        for code in range(first, last + 1):
            name = emoji_name(chr(code))
            if name is None:
                continue
            image = render_emoji(chr(code), font)
            if image is None:
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
            yield Item(f"emoji/{code:x}-{slug}", clean_caption(with_article(name)), "emoji", f"U+{code:04X}"), image


def render_emoji(char: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """The glyph on a white square canvas, cropped to its drawn pixels; None if the font lacks it."""
    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE * 2, EMOJI_FONT_SIZE * 2), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    return square_on_white(canvas.crop(box))


def stamp_items(stamps_dir: Path = STAMPS_DIR) -> Iterator[tuple[Item, Path]]:
    """Tux Paint stamps that have a PNG and an English description (the .txt file's first line).

    Mirrored variants (`*_mirror.png`) and SVG-only stamps are left out.
    """
    for txt in sorted(stamps_dir.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if not png.is_file():
            continue
        caption = clean_caption(txt.read_text(encoding="utf-8", errors="replace"))
        if caption:
            key = "stamps/" + txt.relative_to(stamps_dir).with_suffix("").as_posix()
            yield Item(key, caption, "stamps", str(png)), png


def square_on_white(image: Image.Image, margin: float = 0.08) -> Image.Image:
    """Transparency -> white, then centred on a white square with a small margin (aspect kept)."""
    rgb = to_rgb(image)
    side = round(max(rgb.size) * (1 + 2 * margin))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return canvas


# --- records -----------------------------------------------------------------------------------------


def caption_record(item: Item, image_path: str) -> dict:
    """A caption pair as the align/clip stages read them (shapes-world's captions_{split}.jsonl)."""
    return {"image": image_path, "caption": item.caption, "source": item.source}


def question_records(item: Item, image_path: str, distractors: Sequence[Item], rng: random.Random) -> list[dict]:
    """LLaVA-format records: "what is this?" -> the caption, and one yes/no question whose subject is
    present (yes) or another item's (no) with equal probability."""
    what = {"id": f"{item.key}/what", "image": image_path, "conversations": [
        {"from": "human", "value": f"<image>\n{rng.choice(WHAT_QUESTIONS)}"},
        {"from": "gpt", "value": item.caption}]}
    present = rng.random() < 0.5
    other = item if present else _different(item, distractors, rng)
    yes_no = {"id": f"{item.key}/is-{'yes' if present else 'no'}", "image": image_path, "conversations": [
        {"from": "human", "value": f"<image>\nIs this a picture of {other.label}? Answer yes or no."},
        {"from": "gpt", "value": "yes" if present else ABSENT}]}
    return [what, yes_no]


def _different(item: Item, candidates: Sequence[Item], rng: random.Random) -> Item:
    for _ in range(100):
        other = rng.choice(candidates)
        if other.label.lower() != item.label.lower():
            return other
    raise ValueError(f"no item with a caption other than {item.caption!r} to ask about")
