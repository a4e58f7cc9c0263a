"""VLMProcessor: what turns conversations and images into a model's inputs, in one object.

It owns the tokenizer, the chat template (a `ChatFormat`), the image preprocessing (an
`ImageProcessor`) and the answer to "how many tokens does this image become?". The model gives that
answer as a function of the preprocessed image's height and width (`image_token_count`), so every
`<image>` expands to its own image's count and images of different sizes can share a batch.

A model with AnyRes tiling (``model.image.anyres``) is different: `preprocess` gives `Tiles`
(the thumbnail and the grid's tiles, with the original size), and the size that decides an image's
token count is its *original* (height, width), before tiling (`size_of` gives the right one for
either kind).

It also owns the model's `VideoSampler` (`video`): which frames of a clip the model's token budget
keeps and the text that shows them (see `vlmkit.data.video`). AnyRes models have none: clip frames are
resized squares, not tiles.

Nothing in vlmkit.data imports vlmkit.models: `for_model` reads the model by duck typing
(``model.config.vision``, ``model.config.video``, ``model.image_token_count`` and
``model.connector_token_count``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlmkit.data.chat import ChatFormat, Encoded
from vlmkit.data.images import ImageInput, ImageProcessor, Tiles
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.video import NO_CLIPS_ANYRES, VideoSampler

__all__ = ["VLMProcessor"]


class VLMProcessor:
    """Tokenizer + chat template + image preprocessing + image token counts, for one model.

    `token_count(height, width)` is the number of image tokens a preprocessed image of that size
    becomes (for a tiling `image_processor`: an image of that original size); `image_processor` and
    `token_count` are both None for a text-only model, whose conversations may not contain images.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor | None = None,
                 token_count: Callable[[int, int], int] | None = None, system_prompt: str | None = None,
                 video: VideoSampler | None = None):
        if (image_processor is None) != (token_count is None):
            raise ValueError("give both image_processor and token_count (a vision model), or neither (text-only)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._token_count = token_count
        self.video = video  # None: clips are refused
        # The template's default count is the configured size's, so the fixed-size path is unchanged.
        size = None if image_processor is None else image_processor.size
        self.chat = ChatFormat(tokenizer, None if size is None else token_count(size, size), system_prompt)

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer, system_prompt: str | None = None) -> VLMProcessor:
        """The processor of `model`: a VisionLanguageModel (``config.vision`` and ``image_token_count``),
        or text-only for a model without ``config.vision`` (e.g. a LanguageModel)."""
        vision = getattr(model.config, "vision", None)
        if vision is None:
            return cls.text_only(tokenizer, system_prompt)
        images = ImageProcessor.from_model_config(model.config)
        video = None
        if getattr(model.config, "video", None) is not None and not images.tiling:
            # The budget counts the image tokens the LM reads (one placeholder each with cross-attention).
            count = getattr(model, "connector_token_count", model.image_token_count)
            video = VideoSampler(model.config.video, count(images.size, images.size), images, tokenizer.image_token)
        return cls(tokenizer, images, model.image_token_count, system_prompt, video)

    @classmethod
    def text_only(cls, tokenizer: Tokenizer, system_prompt: str | None = None) -> VLMProcessor:
        return cls(tokenizer, system_prompt=system_prompt)

    def __repr__(self) -> str:
        if self.image_processor is None:
            return "VLMProcessor(text-only)"
        return f"VLMProcessor({self.image_processor!r}, {self.chat.image_tokens} tokens at that size)"

    @property
    def has_vision(self) -> bool:
        return self.image_processor is not None

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn (generation stops there)."""
        return self.chat.end_of_turn_id

    @property
    def tiling(self) -> bool:
        """Whether images become AnyRes `Tiles` (counted by their original size)."""
        return self.image_processor is not None and self.image_processor.tiling

    def image_tokens(self, height: int, width: int) -> int:
        """How many tokens a preprocessed `height` x `width` image becomes (tiling: an original one)."""
        self._need_vision()
        return self._token_count(height, width)

    def preprocess(self, image: ImageInput, size: int | None = None) -> torch.Tensor | Tiles:
        """An image or image path -> float32 [3, size, size] (`size`: default the configured size); with
        AnyRes tiling, its `Tiles` (`size` must then be left unset: the tiles have the model's size)."""
        self._need_vision()
        if self.tiling:
            if size is not None:
                raise ValueError(f"this model cuts images into {self.image_processor.size} px AnyRes tiles: "
                                 "preprocess takes no size")
            return self.image_processor.tiles(image)
        return self.image_processor(image, size)

    def size_of(self, image: torch.Tensor | Tiles) -> tuple[int, int]:
        """The (height, width) that decides a `preprocess` output's token count: a tensor's own size, or
        the original size of `Tiles`."""
        if isinstance(image, Tiles) != self.tiling:
            if self.tiling:
                raise ValueError("this model cuts images into AnyRes tiles: give it VLMProcessor.preprocess's Tiles, "
                                 f"not a tensor of shape {tuple(image.shape)}")
            raise ValueError("this model takes one resized image per <image>, not AnyRes Tiles")
        return image.size if isinstance(image, Tiles) else tuple(image.shape[-2:])

    def encode(self, conversation: Any, add_generation_prompt: bool = False, *,
               image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """Token ids, labels and per-image token counts of a conversation (shapes as `ChatFormat.encode`).

        `image_sizes` are the preprocessed (height, width) of its images in reading order (tiling:
        the original sizes; see `size_of`); default: every image at the configured size.
        """
        counts = None if image_sizes is None else [self.image_tokens(h, w) for h, w in image_sizes]
        return self.chat.encode(conversation, add_generation_prompt, image_tokens=counts)

    def prompt(self, question: str, with_image: bool = True, image_size: tuple[int, int] | None = None, *,
               image_sizes: Sequence[tuple[int, int]] | None = None) -> Encoded:
        """A single-turn prompt ending with the assistant header, as `ChatFormat.prompt`; `image_size`:
        the image's preprocessed (height, width) (tiling: original), default the configured size. For a question about
        several images (or none), `image_sizes` gives each one's (height, width) in order instead of
        `with_image` / `image_size`."""
        if image_sizes is not None:
            counts = [self.image_tokens(h, w) for h, w in image_sizes]
            return self.chat.prompt(question, image_tokens=counts, num_images=len(counts))
        count = None if image_size is None or not with_image else self.image_tokens(*image_size)
        return self.chat.prompt(question, with_image, image_tokens=count)

    def clip(self, video: Any, root: str | Path = ".") -> tuple[list[torch.Tensor], list[int], str]:
        """A clip (a ``"video"`` value: frame directory, list of frames or video file; relative to `root`)
        -> its kept frames preprocessed ([3, size, size] each), the frames each shown image averages, and
        the text that shows them (``"Frame 1: <image>\nFrame 2: <image>"``: put it where the clip goes)."""
        self._need_vision()
        if self.video is None:
            raise ValueError(NO_CLIPS_ANYRES if self.tiling else
                             "this processor has no video sampler (see VLMProcessor.for_model): it takes no clips")
        clip = self.video.clip(video, root)
        frames = [self.image_processor.normalize(self.video.pixels(frame)) for frame in clip.frames]
        return frames, clip.groups, clip.text

    def _need_vision(self) -> None:
        if self.image_processor is None:
            raise ValueError("this model has no vision tower: it takes no images")
