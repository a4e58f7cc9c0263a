"""Batched, KV-cached answering of single-turn questions about no image, one image, several, or a clip."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlmkit.data.images import Tiles, load_image
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.video import VIDEO_TAG
from vlmkit.device import autocast
from vlmkit.models.language import LanguageModel
from vlmkit.models.speculative import Drafter
from vlmkit.models.vlm import VisionLanguageModel

# What one question is about: nothing, one preprocessed image ([3, H, W], or AnyRes `Tiles`), or several
# in reading order.
Image = torch.Tensor | Tiles
QuestionImages = Image | Sequence[Image] | None


def _image_list(entry: QuestionImages) -> list[Image]:
    if entry is None:
        return []
    if isinstance(entry, Tiles):
        return [entry]
    if torch.is_tensor(entry):
        if entry.dim() != 3:
            raise ValueError(f"expected a preprocessed image [3, H, W], got shape {tuple(entry.shape)}; pass several "
                             "images as a list")
        return [entry]
    return list(entry)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


class Answerer:
    """Answers questions with a VisionLanguageModel (or a text-only LanguageModel), in length-sorted batches.

    Prompts follow the tokenizer's chat template; generation stops at the template's end-of-turn token.
    """

    def __init__(self, model: VisionLanguageModel | LanguageModel, tokenizer: Tokenizer, batch_size: int = 64,
                 max_new_tokens: int = 24, precision: str = "bf16", temperature: float = 0.0,
                 top_p: float = 1.0, speculative: Drafter | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.has_vision = isinstance(model, VisionLanguageModel)
        self.processor = VLMProcessor.for_model(model, tokenizer)  # text-only for a LanguageModel
        self.batch_size, self.max_new_tokens, self.precision = batch_size, max_new_tokens, precision
        self.temperature, self.top_p = temperature, top_p
        self.speculative = speculative  # greedy decoding with drafts checked by the model (models/speculative.py)
        self.device = next(model.parameters()).device

    def answer(self, questions: Sequence[str], images: Sequence[QuestionImages],
               image_frames: Sequence[Sequence[int] | None] | None = None) -> list[str]:
        """`images[i]` is what question i is about: None (text only), one preprocessed image (a [3, H, W]
        tensor, or `Tiles` for an AnyRes model: what `processor.preprocess` gives), or a sequence of them
        (several images, e.g. two scenes to compare; sizes may differ). Images come
        before the question, one line each, unless the question holds its own `<image>` tags (one per
        image), which place them (see `ChatFormat.prompt`). Pass the same tensor object for questions
        about one image: it then goes through the vision tower once per call (its image tokens are kept
        until the call returns). `image_frames[i]`, when given and not None, groups question i's images
        as frames averaged into one image each (a pooled clip; the question's tags count the groups)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(images)} image entries; give one per question")
        per_question = [_image_list(entry) for entry in images]
        groups = [list(g) if g is not None else [1] * len(imgs)
                  for g, imgs in zip(image_frames or [None] * len(images), per_question)]
        for i, (g, imgs) in enumerate(zip(groups, per_question)):
            if sum(g) != len(imgs):
                raise ValueError(f"question {i}: image_frames {g} add up to {sum(g)} frames but {len(imgs)} were given")
        # The first frame of each group stands for its size (the frames of a group share one).
        shown = [[imgs[sum(g[:k])] for k in range(len(g))] for g, imgs in zip(groups, per_question)]
        prompts = [self.processor.prompt(q, image_sizes=[self.processor.size_of(img) for img in imgs]).input_ids
                   for q, imgs in zip(questions, shown)]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        encoded: dict[int, torch.Tensor] = {}  # id(image tensor) -> its image tokens, for this call
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids, mask = left_pad([prompts[i] for i in chunk], self.tok.pad_id)
            # The batch contract of every fusion: the images of all rows in reading order, and how many
            # belong to each row.
            pixels = [img for i in chunk for img in per_question[i]]
            extra = {}
            if self.has_vision:
                extra["image_counts"] = [len(groups[i]) for i in chunk]
                frames = [n for i in chunk for n in groups[i]]
                if any(n > 1 for n in frames):
                    extra["image_frames"] = frames
            with autocast(self.device, self.precision):
                if self.has_vision:
                    extra["image_embeds"] = self._image_tokens(pixels, encoded)
                out = self.model.generate(ids.to(self.device), mask.to(self.device), **extra,
                                          max_new_tokens=self.max_new_tokens,
                                          eos_token_id=self.processor.end_of_turn_id,
                                          temperature=self.temperature, top_p=self.top_p,
                                          speculative=self.speculative)
            for i, tokens in zip(chunk, out):
                answers[i] = self.tok.decode(tokens).strip()
        return answers

    def _image_tokens(self, pixels: list[Image], encoded: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
        """Image tokens ([T_i, D] each) for `pixels`, encoding only images not already in `encoded`."""
        if not pixels:
            return None
        new = list({id(p): p for p in pixels if id(p) not in encoded}.values())
        if new:
            if isinstance(new[0], Tiles):  # AnyRes: every image's tiles in one tower pass
                tiles = torch.cat([p.pixels for p in new]).to(self.device)
                tokens = self.model.encode_images(tiles, image_sizes=[p.size for p in new])
            else:  # one size: one stacked batch; several: a list, which the model groups by size
                same_size = len({p.shape for p in new}) == 1
                batch = torch.stack(new).to(self.device) if same_size else [p.to(self.device) for p in new]
                tokens = self.model.encode_images(batch)
            encoded.update((id(p), image_tokens) for p, image_tokens in zip(new, tokens))
        return [encoded[id(p)] for p in pixels]

    def answer_records(self, records: Sequence[dict], image_root: str | Path) -> list[str]:
        """Answer `{"image", "question"}` records (``image``: a path, a list of paths or absent) and
        `{"video", "question"}` ones (a clip, see `vlmkit.data.video`: the model's budget picks its frames,
        shown where the question's ``<video>`` tag is, else before it); each distinct image is decoded once."""
        cache: dict[str, torch.Tensor] = {}

        def pixels(path: str) -> torch.Tensor:
            if path not in cache:
                cache[path] = self.processor.preprocess(load_image(Path(image_root) / path))
            return cache[path]

        images: list[QuestionImages] = []
        questions, groups = [], []
        for rec in records:
            path, question, frames = rec.get("image"), rec["question"], None
            if "video" in rec:
                clip, frames, text = self.processor.clip(rec["video"], image_root)
                images.append(clip)
                question = question.replace(VIDEO_TAG, text) if VIDEO_TAG in question else f"{text}\n{question}"
            elif path is None or isinstance(path, str):
                images.append(None if path is None else pixels(path))
            else:
                images.append([pixels(p) for p in path])
            questions.append(question)
            groups.append(frames)
        return self.answer(questions, images, groups)
