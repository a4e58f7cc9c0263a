"""Fusions: how the connector's image tokens reach the language model.

A fusion gets the LM's token embeddings, the image tokens and where the `<image>` placeholders are,
and returns (a) the LM's input embeddings and (b) optionally a `LayerContext`: a value (e.g. the image
tokens) and per-layer adapters that each decoder layer calls with ``(hidden, value)`` before its
self-attention, at the prefill and at every KV-cached decode step (the cache keeps the context).

Adapters are the fusion's own submodules (``VisionLanguageModel.fusion``, weights under ``fusion.*``),
never the LM's: freezing the LM, loading an LM checkpoint strictly and per-module learning rates
(``optim.module_lr.fusion``) work as they do without them.

`splice` (LLaVA) is the only fusion shipped: image tokens overwrite the placeholders' embeddings, no
context. A cross-attention fusion (Flamingo-style) would keep the embeddings, return the image tokens
as the context value and hold one gated cross-attention adapter per layer; it plugs in as a `Fusion`
subclass named in `FUSIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.config import ConfigError, ModelConfig
from vlmkit.models.language import LayerContext

__all__ = ["FUSIONS", "Fusion", "FusionOutput", "ImageTokens", "LayerContext", "SpliceFusion", "build_fusion"]

# Image tokens: [N, T, D] when every image has T tokens, else a list of N [T_i, D].
ImageTokens = torch.Tensor | list[torch.Tensor]


@dataclass
class FusionOutput:
    inputs_embeds: torch.Tensor  # [B, L, D] what the LM's first layer receives
    context: LayerContext | None = None  # what every layer receives (None: the plain LM)


class Fusion(nn.Module):
    """Base class. Called only for batches with images (without, the LM runs on the token embeddings)."""

    def forward(self, embeds: torch.Tensor, image_embeds: ImageTokens, is_image: torch.Tensor) -> FusionOutput:
        """`embeds` [B, L, D]: token embeddings; `image_embeds`: connector outputs, images in reading
        order (row by row, left to right), as [N, T, D] when every image has T tokens, else as a list
        of N [T_i, D]; `is_image` [B, L]: the placeholder positions, already checked to number the
        images' tokens in all (and per row, when the caller gave per-sample image counts)."""
        raise NotImplementedError


class SpliceFusion(Fusion):
    """LLaVA: the image tokens are written over the placeholder embeddings, in reading order."""

    def forward(self, embeds: torch.Tensor, image_embeds: ImageTokens, is_image: torch.Tensor) -> FusionOutput:
        # masked_scatter fills the placeholders in order from the source's elements, so the images'
        # tokens one after the other (any per-image counts) land on their own image's placeholders.
        tokens = image_embeds if torch.is_tensor(image_embeds) else torch.cat(image_embeds)
        return FusionOutput(embeds.masked_scatter(is_image[..., None], tokens.to(embeds.dtype)))


FUSIONS: dict[str, Callable[[ModelConfig], Fusion]] = {
    "splice": lambda cfg: SpliceFusion(),
}


def build_fusion(cfg: ModelConfig) -> Fusion:
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"fusion: unknown fusion {cfg.fusion!r}; choose one of {sorted(FUSIONS)}")
    return FUSIONS[cfg.fusion](cfg)
