"""VisionLanguageModel: ViT -> connector -> image tokens fused into the LM (by default spliced into its input
embeddings; see models/fusion.py)."""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ModelConfig
from vlmkit.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpointable, resolve_model_dir
from vlmkit.models.connectors import build_connector
from vlmkit.models.fusion import FusionOutput, build_fusion
from vlmkit.models.language import LanguageModel, LMOutput
from vlmkit.models.vision import ViT

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ImagePlaceholderError", "VisionLanguageModel", "resolve_model_dir"]


class ImagePlaceholderError(ValueError):
    """The number of `<image>` placeholder tokens does not match the images given."""


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

    @property
    def tokens_per_image(self) -> int:
        size = self.config.vision.image_size
        return self.connector.num_tokens(self.vision.grid_for(size, size))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, T, D_lm] image tokens in the LM's embedding space."""
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
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM's input embeddings (with `splice`: image tokens written over the `<image>` placeholders);
        arguments as `fuse`."""
        return self.fuse(input_ids, pixel_values, image_counts, image_embeds).inputs_embeds

    def fuse(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> FusionOutput:
        """The LM's input embeddings and layer context: the fusion applied to the token embeddings and images.

        Images are consumed in reading order: row by row, left to right. `image_counts[b]` (images
        of sample b), when given, is checked against each row's placeholders. `image_embeds`
        (``encode_images`` output) may be passed instead of `pixel_values`, e.g. to encode an image
        shared by several rows only once.
        """
        embeds = self.lm.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        per_row = is_image.sum(dim=1)
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)
        num_images = 0 if image_embeds is None else image_embeds.shape[0]
        if num_images == 0:
            if bool(per_row.any()):
                raise ImagePlaceholderError(
                    f"the batch has {int(per_row.sum())} image placeholder tokens but no images were given"
                )
            return FusionOutput(embeds)
        t = image_embeds.shape[1]
        if image_counts is not None:
            counts = torch.as_tensor(image_counts, device=per_row.device)
            bad = (per_row != counts * t).nonzero().flatten().tolist()
            if bad:
                b = bad[0]
                raise ImagePlaceholderError(
                    f"sample {b} has {int(per_row[b])} image placeholder tokens but {int(counts[b])} image(s) "
                    f"x {t} tokens = {int(counts[b]) * t} were expected"
                )
        total = int(per_row.sum())
        if total != num_images * t:
            raise ImagePlaceholderError(
                f"the batch has {total} image placeholder tokens but {num_images} image(s) x {t} tokens per image "
                f"= {num_images * t}; each <image> must expand to exactly {t} placeholders"
            )
        return self.fusion(embeds, image_embeds, is_image)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
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
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> list[list[int]]:
        """Generate from left-padded prompts with images fused in (from `pixel_values`, or `image_embeds`
        already encoded); the fusion's layer context reaches every decode step. `kwargs` as
        `LanguageModel.generate` (max_new_tokens, eos_token_id, temperature, top_p, generator, use_cache)."""
        fused = self.fuse(input_ids, pixel_values, image_counts, image_embeds)
        return self.lm.generate(inputs_embeds=fused.inputs_embeds, attention_mask=attention_mask,
                                context=fused.context, **kwargs)
