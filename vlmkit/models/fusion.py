"""Fusions: how the connector's image tokens reach the language model.

A fusion gets the LM's token embeddings, the image tokens and where the `<image>` placeholders are,
and returns (a) the LM's input embeddings and (b) optionally a `LayerContext`: a value (e.g. the image
tokens) and per-layer adapters that each decoder layer calls with ``(hidden, value, start)`` before its
self-attention, at the prefill and at every KV-cached decode step (the cache keeps the context).
A fusion also says how many placeholders an image takes in the text (`placeholders_per_image`), which
is what the model tells the processor each `<image>` expands to.

Adapters are the fusion's own submodules (``VisionLanguageModel.fusion``, weights under ``fusion.*``),
never the LM's: freezing the LM, loading an LM checkpoint strictly and per-module learning rates
(``optim.module_lr.fusion``) work as they do without them.

Shipped fusions (`model.fusion`):
- `splice` (LLaVA, the default): one placeholder per image token; the image tokens overwrite the
  placeholders' embeddings; no context.
- `cross_attention` (Flamingo): one placeholder per image, a marker whose embedding stays the LM's
  embedding of the `<image>` token; the image tokens are the context value, read by gated
  cross-attention blocks before every `model.cross_attention_every`-th LM block (models/cross_attention.py).

A new fusion is a `Fusion` subclass named in `FUSIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.config import ConfigError, ModelConfig
from vlmkit.models.cross_attention import GatedCrossAttentionBlock, ImageContext
from vlmkit.models.language import LayerContext

__all__ = ["FUSIONS", "CrossAttentionFusion", "Fusion", "FusionOutput", "ImageTokens", "LayerContext",
           "SpliceFusion", "build_fusion"]

# Image tokens: [N, T, D] when every image has T tokens, else a list of N [T_i, D].
ImageTokens = torch.Tensor | list[torch.Tensor]


@dataclass
class FusionOutput:
    inputs_embeds: torch.Tensor  # [B, L, D] what the LM's first layer receives
    context: LayerContext | None = None  # what every layer receives (None: the plain LM)


class Fusion(nn.Module):
    """Base class. Called only for batches with images (without, the LM runs on the token embeddings)."""

    def placeholders_per_image(self, tokens: int) -> int:
        """`<image>` placeholder tokens an image of `tokens` connector tokens takes in the text (default:
        one per token, where the tokens themselves go in the LM's input)."""
        return tokens

    def forward(self, embeds: torch.Tensor, image_embeds: ImageTokens, is_image: torch.Tensor) -> FusionOutput:
        """`embeds` [B, L, D]: token embeddings; `image_embeds`: connector outputs, images in reading
        order (row by row, left to right), as [N, T, D] when every image has T tokens, else as a list
        of N [T_i, D]; `is_image` [B, L]: the placeholder positions, already checked to number the
        images' `placeholders_per_image` in all (and per row, when the caller gave per-sample image
        counts)."""
        raise NotImplementedError


class SpliceFusion(Fusion):
    """LLaVA: the image tokens are written over the placeholder embeddings, in reading order."""

    def forward(self, embeds: torch.Tensor, image_embeds: ImageTokens, is_image: torch.Tensor) -> FusionOutput:
        # masked_scatter fills the placeholders in order from the source's elements, so the images'
        # tokens one after the other (any per-image counts) land on their own image's placeholders.
        tokens = image_embeds if torch.is_tensor(image_embeds) else torch.cat(image_embeds)
        return FusionOutput(embeds.masked_scatter(is_image[..., None], tokens.to(embeds.dtype)))


class CrossAttentionFusion(Fusion):
    """Flamingo: each image is one `<image>` marker in the text and its tokens are read by gated
    cross-attention blocks, one before every `cross_attention_every`-th LM block.

    The marker keeps the LM's embedding of the `<image>` token (the embeddings are left as they are).
    Flamingo learns that embedding; here it trains only when the LM's embeddings do, so with a frozen
    LM it stays what the LM started with (for a pretrained LM that gained the token, the mean of its
    embeddings: see `vlmkit.hf.pretrained.load_lm_weights`), and the blocks carry all image information.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_layers = cfg.lm.num_layers
        self.all_previous = cfg.cross_attention_media == "all_previous"
        every = cfg.cross_attention_every
        # Keyed by the index of the LM layer a block runs before (weights: fusion.blocks.<layer>.*).
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttentionBlock(cfg.lm) for i in range(self.num_layers)
                                     if (i + 1) % every == 0})

    def placeholders_per_image(self, tokens: int) -> int:
        return 1

    def forward(self, embeds: torch.Tensor, image_embeds: ImageTokens, is_image: torch.Tensor) -> FusionOutput:
        # One marker per image: the k-th marker in reading order is the k-th image.
        images = [tokens.to(embeds.dtype) for tokens in image_embeds]
        context = ImageContext.build(images, is_image, self.all_previous)
        adapters = [self.blocks[str(i)] if str(i) in self.blocks else None for i in range(self.num_layers)]
        return FusionOutput(embeds, LayerContext(adapters, context))


FUSIONS: dict[str, Callable[[ModelConfig], Fusion]] = {
    "splice": lambda cfg: SpliceFusion(),
    "cross_attention": CrossAttentionFusion,
}


def build_fusion(cfg: ModelConfig) -> Fusion:
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"fusion: unknown fusion {cfg.fusion!r}; choose one of {sorted(FUSIONS)}")
    return FUSIONS[cfg.fusion](cfg)
