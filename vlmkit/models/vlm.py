"""VisionLanguageModel: ViT -> connector -> image tokens fused into the LM (by default spliced into its input
embeddings, or read by gated cross-attention blocks; see models/fusion.py).

With `model.image.anyres`, an image reaches the tower as AnyRes tiles (its thumbnail, then a grid of
tiles; see vlmkit/anyres.py) and its tiles' tokens are packed into one sequence (models/anyres.py). Images
are then given as all their tiles, concatenated in image order, with `image_sizes`: each image's
original (height, width), which decides its grid (as transformers' LlavaNext).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmkit.config import ConfigError, ModelConfig, TokenMergingConfig
from vlmkit.models.anyres import AnyResPacking
from vlmkit.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpointable, resolve_model_dir
from vlmkit.models.connectors import build_connector
from vlmkit.models.fusion import FusionOutput, ImageTokens, build_fusion
from vlmkit.models.language import LanguageModel, LMOutput
from vlmkit.models.vision import ViT

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ImagePlaceholderError", "VisionLanguageModel", "resolve_model_dir"]


# Images of one size as one tensor [N, 3, H, W], or of several sizes as a list of [3, H_i, W_i]; with
# AnyRes, every image's tiles [n_tiles, 3, S, S] concatenated (one tensor, or a list of per-image tiles).
ImageBatch = torch.Tensor | Sequence[torch.Tensor]
# The original (height, width) of each image, in order: [N, 2] or a list of pairs (AnyRes only).
ImageSizes = torch.Tensor | Sequence[Sequence[int]]


class ImagePlaceholderError(ValueError):
    """The number of `<image>` placeholder tokens does not match the images given."""


def pool_frames(tokens: ImageTokens, image_frames: Sequence[int] | torch.Tensor) -> ImageTokens:
    """Temporal pooling: the image tokens of consecutive frames averaged, `image_frames[i]` frames into
    image i ([N_frames, T, D] -> [N_images, T, D], or lists alike). Frames of one image must have one size."""
    counts = torch.as_tensor(image_frames).tolist()
    if sum(counts) != len(tokens) or min(counts, default=1) < 1:
        raise ImagePlaceholderError(f"image_frames {counts} do not split the {len(tokens)} frame(s) given into "
                                    "groups of one or more")
    if all(n == 1 for n in counts):
        return tokens
    if torch.is_tensor(tokens) and len(set(counts)) == 1:
        return tokens.unflatten(0, (len(counts), counts[0])).mean(dim=1)
    out, start = [], 0
    for n in counts:
        out.append(torch.stack(list(tokens[start : start + n])).mean(dim=0))
        start += n
    return torch.stack(out) if torch.is_tensor(tokens) else out


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
        self._check_token_merging(cfg.vision.token_merging.r)
        self.lm = LanguageModel(cfg.lm)
        self.fusion = build_fusion(cfg)  # splice has no weights; others keep their per-layer adapters here
        self.anyres = None if cfg.image.anyres is None else AnyResPacking(cfg.image.anyres, cfg.lm.hidden_size)
        if self.anyres is not None and not self.connector.has_token_grid:
            raise ConfigError(f"model.image.anyres unpads and ends the rows of the tiles' token grids, but the "
                              f"{cfg.connector.name} connector's tokens have no grid; use a per-patch connector "
                              "(linear, mlp2x_gelu, pixel_shuffle, c_abstractor) or remove image.anyres")
        if not 0 <= cfg.image_token_id < cfg.lm.vocab_size:
            raise ValueError(f"image_token_id {cfg.image_token_id} outside the vocabulary (size {cfg.lm.vocab_size})")

    def _check_token_merging(self, r: int) -> None:
        self.config.check_token_merging(r)
        if r and (self.connector.grid_only or self.connector.grid_embedding is not None):
            what = ("a grid embedding" if self.connector.grid_embedding is not None
                    else f"the {self.config.connector.name} connector")
            raise ConfigError(f"vision.token_merging.r {r}: {what} needs the patch grid, which token merging "
                              "removes; use a connector that takes any number of tokens (linear, mlp2x_gelu, "
                              "perceiver, qformer) without grid_embedding, or set vision.token_merging.r: 0")

    def set_token_merging(self, r: int) -> None:
        """Switch token merging (ToMe) to `r` tokens per block (0: off) in a built model, e.g. on a model
        trained without it (ToMe works off the shelf); the weights are unchanged, image token counts follow."""
        self._check_token_merging(r)
        tome = self.config.vision.token_merging
        self.config.vision.token_merging = TokenMergingConfig(r, tome.proportional_attention)

    def image_token_count(self, height: int, width: int) -> int:
        """Placeholder tokens each `<image>` of a preprocessed `height` x `width` image expands to (see
        `VLMProcessor`): as the fusion says, the connector's token count (`splice`) or 1 (`cross_attention`,
        whose image tokens reach the layers instead). With AnyRes, `height` x `width` is the original
        image's size (it decides the tiles)."""
        return self.fusion.placeholders_per_image(self.connector_token_count(height, width))

    def connector_token_count(self, height: int, width: int) -> int:
        """Image tokens the connector emits for a preprocessed `height` x `width` image (AnyRes: for an
        original `height` x `width` image, its tiles packed, newlines included)."""
        if self.anyres is not None:
            return self.anyres.token_count((height, width), self.tile_token_grid)
        return self.connector.num_tokens(self._connector_grid(self.vision.grid_for(height, width)))

    def _connector_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The layout the connector is told: the patch grid, or, with token merging, one row of the
        merged tokens (they keep no grid; the connectors that accept them read only the count)."""
        return (1, self.vision.merged_patch_count(grid)) if self.config.vision.merges_tokens else grid

    @property
    def tile_token_grid(self) -> tuple[int, int]:
        """AnyRes: the (rows, cols) of tokens one tile becomes."""
        base = self.anyres.base
        return self.connector.token_grid(self.vision.grid_for(base, base))

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens of an image at the configured size (`image_token_count`)."""
        size = self.config.vision.image_size
        return self.image_token_count(size, size)

    def encode_images(self, pixel_values: ImageBatch, image_sizes: ImageSizes | None = None) -> ImageTokens:
        """[N, 3, H, W] -> [N, T, D_lm] image tokens in the LM's embedding space; a list of [3, H_i, W_i]
        (sizes may differ) -> a list of [T_i, D_lm], in the same order. AnyRes: every image's tiles
        (concatenated, or a list of per-image tile tensors) and `image_sizes` -> a list of [T_i, D_lm]."""
        if self.anyres is not None:
            tiles = pixel_values if torch.is_tensor(pixel_values) else torch.cat(list(pixel_values))
            return self.anyres(self._encode_batch(tiles), self._sizes(image_sizes), self.tile_token_grid)
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
        return self.connector(features, self._connector_grid(grid))

    def project_features(self, features: torch.Tensor, image_sizes: ImageSizes | None = None) -> ImageTokens:
        """Tower features [N, P, D_v] (e.g. cached from a frozen tower at the configured image size) ->
        image tokens [N, T, D_lm]. AnyRes: the features of every image's tiles and `image_sizes` -> a list
        of [T_i, D_lm]."""
        size = self.config.vision.image_size if self.anyres is None else self.anyres.base
        grid = self.vision.grid_for(size, size)
        expected = self.vision.num_feature_tokens(grid)
        if features.shape[1] != expected:
            raise ValueError(f"features have {features.shape[1]} positions; a {size} px image gives {expected}")
        dtype = next(self.connector.parameters()).dtype  # cached features may be stored in bf16
        tokens = self.connector(features.to(dtype), self._connector_grid(grid))
        if self.anyres is None:
            return tokens
        return self.anyres(tokens, self._sizes(image_sizes), self.tile_token_grid)

    def _sizes(self, image_sizes: ImageSizes | None) -> list[tuple[int, int]]:
        if image_sizes is None:
            raise ValueError("this model cuts images into AnyRes tiles (model.image.anyres): give image_sizes, the "
                             "original (height, width) of each image, with its tiles")
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes
        return [(int(h), int(w)) for h, w in sizes]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
        image_sizes: ImageSizes | None = None,
        image_frames: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM's input embeddings (with `splice`: image tokens written over the `<image>` placeholders);
        arguments as `fuse`."""
        return self.fuse(input_ids, pixel_values, image_counts, image_embeds, image_sizes, image_frames).inputs_embeds

    def fuse(
        self,
        input_ids: torch.Tensor,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
        image_sizes: ImageSizes | None = None,
        image_frames: Sequence[int] | torch.Tensor | None = None,
    ) -> FusionOutput:
        """The LM's input embeddings and layer context: the fusion applied to the token embeddings and images.

        Images are consumed in reading order: row by row, left to right; each image fills as many
        placeholders as the fusion says (`splice`: one per image token; images of several sizes:
        `pixel_values` as a list).
        `image_counts[b]` (images of sample b), when given, is checked against each row's placeholders.
        `image_embeds` (``encode_images`` output) may be passed instead of `pixel_values`, e.g. to
        encode an image shared by several rows only once. `image_sizes`: AnyRes only (see `encode_images`);
        images then count as images, not tiles.
        `image_frames[i]` (default: all 1), when given, is how many consecutive frames of `pixel_values` /
        `image_embeds` make image i: their image tokens are averaged (`pool_frames`; a clip's temporal
        pooling); `image_counts` and the placeholders count the pooled images.
        """
        embeds = self.lm.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        rows = is_image.sum(dim=1).tolist()  # placeholders per row
        if image_embeds is None and pixel_values is not None and len(pixel_values) > 0:
            image_embeds = self.encode_images(pixel_values, image_sizes)
        if image_embeds is not None and image_frames is not None:
            image_embeds = pool_frames(image_embeds, image_frames)  # after AnyRes packing: frames count as images
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
        image_sizes: ImageSizes | None = None,
        image_frames: Sequence[int] | torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """`image_features` (the tower's output, see `project_features`) may replace `pixel_values`;
        `image_sizes`: AnyRes only, each image's original (height, width); `image_frames` as in `fuse`.
        `segment_ids` [B, L]: rows packed with several samples (see `LanguageModel.forward`); each row's
        images (and their sizes and frames) are its samples' images in reading order, as for unpacked rows."""
        image_embeds = self.project_features(image_features, image_sizes) if image_features is not None else None
        fused = self.fuse(input_ids, pixel_values, image_counts, image_embeds, image_sizes, image_frames)
        if segment_ids is not None and fused.context is not None:
            raise ValueError(f"packed rows (segment_ids) need a fusion that passes no layer context; "
                             f"{self.config.fusion!r} would let one sample's text read another sample's image")
        return self.lm(inputs_embeds=fused.inputs_embeds, attention_mask=attention_mask, labels=labels, logits=logits,
                       context=fused.context, segment_ids=segment_ids)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: ImageBatch | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: ImageTokens | None = None,
        image_sizes: ImageSizes | None = None,
        image_frames: Sequence[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> list[list[int]]:
        """Generate from left-padded prompts with images fused in (from `pixel_values` (+ `image_sizes` for
        AnyRes), or `image_embeds` already encoded; `image_frames` as in `fuse`); the fusion's layer context
        reaches every decode step. `kwargs` as `LanguageModel.generate` (max_new_tokens, eos_token_id,
        temperature, top_p, generator, use_cache, speculative)."""
        fused = self.fuse(input_ids, pixel_values, image_counts, image_embeds, image_sizes, image_frames)
        return self.lm.generate(inputs_embeds=fused.inputs_embeds, attention_mask=attention_mask,
                                context=fused.context, prompt_ids=input_ids, **kwargs)
