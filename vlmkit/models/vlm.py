"""VisionLanguageModel: ViT -> connector -> image tokens fused into the LM (by default spliced into its input
embeddings, or read by gated cross-attention blocks; see models/fusion.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmkit.config import ModelConfig
from vlmkit.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpointable, resolve_model_dir
from vlmkit.models.connectors import build_connector
from vlmkit.models.fusion import FusionOutput, ImageTokens, build_fusion
from vlmkit.models.language import LanguageModel, LMOutput
from vlmkit.models.vision import ViT

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ImagePlaceholderError", "VisionLanguageModel", "resolve_model_dir"]


# Images of one size as one tensor [N, 3, H, W], or of several sizes as a list of [3, H_i, W_i].
ImageBatch = torch.Tensor | Sequence[torch.Tensor]


class ImagePlaceholderError(ValueError):
    """The number of `<image>` placeholder tokens does not match the images given."""


def _tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


def _describe(placeholders: list[int], uniform: int | None) -> str:
    """'2 image(s) x 16 tokens = 32' (one count for all) or '2 image(s) of 16 + 36 tokens = 52'."""
    if uniform is not None:
        return f"{len(placeholders)} image(s) x {_tokens(uniform)} = {len(placeholders) * uniform}"
    return f"{len(placeholders)} image(s) of {' + '.join(map(str, placeholders)) or 0} tokens = {sum(placeholders)}"


class VisionLanguageModel(Checkpointable, nn.Module):
    FORMAT = "vlmkit"
    CONFIG = ModelConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.connector = build_connector(
            cfg.connector, cfg.vision.hidden_size, cfg.lm.hidden_size, 1 if cfg.vision.keep_cls else 0
        )
        self.lm = LanguageModel(cfg.lm)
        self.fusion = build_fusion(cfg)  # splice has no weights; others keep their per-layer adapters here
        if not 0 <= cfg.image_token_id < cfg.lm.vocab_size:
            raise ValueError(f"image_token_id {cfg.image_token_id} outside the vocabulary (size {cfg.lm.vocab_size})")

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholder tokens each `<image>` of a preprocessed `height` x `width` image expands to (see
        `VLMProcessor`): as the fusion says, the connector's token count (`splice`) or 1 (`cross_attention`,
        whose image tokens reach the layers instead)."""
        return self.fusion.placeholders_per_image(self.connector_token_count(height, width))

    def connector_token_count(self, height: int, width: int) -> int:
        """Image tokens the connector emits for a preprocessed `height` x `width` image."""
        return self.connector.num_tokens(self.vision.grid_for(height, width))

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens of an image at the configured size (`image_token_count`)."""
        size = self.config.vision.image_size
        return self.image_token_count(size, size)

    def encode_images(self, pixel_values: ImageBatch) -> ImageTokens:
        """[N, 3, H, W] -> [N, T, D_lm] image tokens in the LM's embedding space; a list of [3, H_i, W_i]
        (sizes may differ) -> a list of [T_i, D_lm], in the same order."""
        if torch.is_tensor(pixel_values):
            return self._encode_batch(pixel_values)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(pixel_values):
            by_size.setdefault(tuple(image.shape), []).append(i)
        tokens: dict[int, torch.Tensor] = {}
        for indices in by_size.values():  # one tower pass per image size
            tokens.update(zip(indices, self._encode_batch(torch.stack([pixel_values[i] for i in indices]))))
        return [tokens[i] for i in range(len(pixel_values))]

    def _encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.vision.grid_for(pixel_values.shape[-2], pixel_values.shape[-1])
        features = self.vision(pixel_values.to(self.vision.embeddings.proj.weight.dtype))
        return self.connector(features, grid)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [N, P, D_v] (e.g. cached from a frozen tower at the configured image size) ->
        image tokens [N, T, D_lm]."""
        size = self.config.vision.image_size
        grid = self.vision.grid_for(size, size)
        expected = grid[0] * grid[1] + (self.vision.num_prefix_tokens if self.config.vision.keep_cls else 0)
        if features.shape[1] != expected:
            raise ValueError(f"features have {features.shape[1]} positions; a {size} px image gives {expected}")
        dtype = next(self.connector.parameters()).dtype  # cached features may be stored in bf16
        return self.connector(features.to(dtype), grid)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
    ) -> torch.Tensor:
        """The LM's input embeddings (with `splice`: image tokens written over the `<image>` placeholders);
        arguments as `fuse`."""
        return self.fuse(input_ids, pixel_values, image_counts, image_embeds).inputs_embeds

    def fuse(
        self,
        input_ids: torch.Tensor,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
    ) -> FusionOutput:
        """The LM's input embeddings and layer context: the fusion applied to the token embeddings and images.

        Images are consumed in reading order: row by row, left to right; each image fills as many
        placeholders as the fusion says (`splice`: one per image token; images of several sizes:
        `pixel_values` as a list).
        `image_counts[b]` (images of sample b), when given, is checked against each row's placeholders.
        `image_embeds` (``encode_images`` output) may be passed instead of `pixel_values`, e.g. to
        encode an image shared by several rows only once.
        """
        embeds = self.lm.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        rows = is_image.sum(dim=1).tolist()  # placeholders per row
        if image_embeds is None and pixel_values is not None and len(pixel_values) > 0:
            image_embeds = self.encode_images(pixel_values)
        if image_embeds is not None and not torch.is_tensor(image_embeds):
            image_embeds = list(image_embeds)
            if len({e.shape for e in image_embeds}) == 1:
                image_embeds = torch.stack(image_embeds)  # one count for all: the fusion gets [N, T, D]
        num_images = 0 if image_embeds is None else len(image_embeds)
        if num_images == 0:
            if any(rows):
                raise ImagePlaceholderError(
                    f"the batch has {sum(rows)} image placeholder tokens but no images were given"
                )
            return FusionOutput(embeds)
        per_image = self.fusion.placeholders_per_image
        uniform = per_image(image_embeds.shape[1]) if torch.is_tensor(image_embeds) else None
        wanted = [uniform] * num_images if uniform is not None else [per_image(e.shape[0]) for e in image_embeds]
        if image_counts is not None:
            counts = torch.as_tensor(image_counts).tolist()
            if sum(counts) != num_images:
                raise ImagePlaceholderError(f"image_counts add up to {sum(counts)} image(s) but {num_images} "
                                            "were given")
            start = 0
            for b, n in enumerate(counts):
                mine, start = wanted[start : start + n], start + n
                if rows[b] != sum(mine):
                    raise ImagePlaceholderError(f"sample {b} has {rows[b]} image placeholder tokens but "
                                                f"{_describe(mine, uniform)} were expected")
        total = sum(rows)
        if total != sum(wanted):
            expected = (f"{num_images} image(s) x {_tokens(uniform)} per image = {num_images * uniform}; each "
                        f"<image> must expand to exactly {uniform} placeholder(s)" if uniform is not None else
                        f"{_describe(wanted, None)}; each <image> must expand to its own image's token count")
            raise ImagePlaceholderError(f"the batch has {total} image placeholder tokens but {expected}")
        return self.fusion(embeds, image_embeds, is_image)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: ImageBatch | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        logits: bool = True,
        image_features: torch.Tensor | None = None,
    ) -> LMOutput:
        """`image_features` (the tower's output, see `project_features`) may replace `pixel_values`."""
        image_embeds = self.project_features(image_features) if image_features is not None else None
        fused = self.fuse(input_ids, pixel_values, image_counts, image_embeds)
        return self.lm(inputs_embeds=fused.inputs_embeds, attention_mask=attention_mask, labels=labels, logits=logits,
                       context=fused.context)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
        **kwargs,
    ) -> list[list[int]]:
        """Generate from left-padded prompts with images fused in (from `pixel_values`, or `image_embeds`
        already encoded); the fusion's layer context reaches every decode step. `kwargs` as
        `LanguageModel.generate` (max_new_tokens, eos_token_id, temperature, top_p, generator, use_cache,
        speculative)."""
        fused = self.fuse(input_ids, pixel_values, image_counts, image_embeds)
        return self.lm.generate(inputs_embeds=fused.inputs_embeds, attention_mask=attention_mask,
                                context=fused.context, prompt_ids=input_ids, **kwargs)
