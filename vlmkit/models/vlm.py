"""VisionLanguageModel: ViT -> connector -> image tokens spliced into the LM's input embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from vlmkit import __version__
from vlmkit.config import ModelConfig, to_dict
from vlmkit.io import atomic_directory
from vlmkit.models.connectors import build_connector
from vlmkit.models.language import LanguageModel, LMOutput
from vlmkit.models.vision import ViT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ImagePlaceholderError(ValueError):
    """The number of `<image>` placeholder tokens does not match the images given."""


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.connector = build_connector(
            cfg.connector, cfg.vision.hidden_size, cfg.lm.hidden_size, 1 if cfg.vision.keep_cls else 0
        )
        self.lm = LanguageModel(cfg.lm)
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

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image tokens written over the `<image>` placeholder positions.

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
            return embeds
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
        return embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        logits: bool = True,
    ) -> LMOutput:
        embeds = self.embed(input_ids, pixel_values, image_counts)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, logits=logits)

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
        """Generate from left-padded prompts with images spliced in (from `pixel_values`, or `image_embeds`
        already encoded); `kwargs` as `LanguageModel.generate` (max_new_tokens, eos_token_id, temperature,
        top_p, generator, use_cache)."""
        embeds = self.embed(input_ids, pixel_values, image_counts, image_embeds)
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write config.json + model.safetensors (+ tokenizer files) atomically to `directory`."""
        with atomic_directory(directory) as tmp:
            self.write(tmp, tokenizer)

    def write(self, directory: Path, tokenizer=None) -> None:
        """Write the model files into an existing directory (callers make it atomic)."""
        meta = {"format": "vlmkit", "vlmkit_version": __version__, "model": to_dict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        save_model(self, str(directory / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VisionLanguageModel:
        directory = resolve_model_dir(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: is {directory} a vlmkit model directory?")
        meta = json.loads(config_path.read_text())
        if meta.get("format") != "vlmkit":
            raise ValueError(f"{config_path} is not a vlmkit model config (format={meta.get('format')!r})")
        model = cls(ModelConfig.from_dict(meta["model"], where=f"{config_path}: model"))
        missing, unexpected = load_model(model, str(weights_path), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing weights {sorted(missing)}, unexpected {sorted(unexpected)}")
        return model.to(device)


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training run directory whose final model lives in `model/`."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    return path
