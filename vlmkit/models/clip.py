"""CLIP-style dual encoder: a ViT and a small causal text transformer, trained with symmetric InfoNCE."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import LanguageConfig, VisionConfig
from vlmkit.models.checkpoint import Checkpointable
from vlmkit.models.language import LanguageModel
from vlmkit.models.vision import ViT


@dataclass
class ClipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: LanguageConfig = field(default_factory=lambda: LanguageConfig(hidden_size=128, num_layers=2,
                                                                        num_heads=4, num_kv_heads=4,
                                                                        intermediate_size=344))
    embed_dim: int = 128
    init_temperature: float = 0.07


class DualEncoder(Checkpointable, nn.Module):
    """Image and text towers projected into one embedding space.

    The text tower is our decoder LM run causally; like CLIP, a caption is represented by the
    hidden state of its last real token (which has seen the whole caption).
    """

    FORMAT = "vlmkit-clip"
    CONFIG = ClipConfig

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.text = LanguageModel(cfg.text)
        self.text.lm_head = None  # the text tower only needs hidden states
        self.image_proj = nn.Linear(cfg.vision.hidden_size, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.vision.pooled(pixels)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Right-padded input: causal attention means padding never affects real tokens.
        hidden = self.text(input_ids=ids, logits=False).hidden_states
        last = mask.long().sum(dim=1) - 1
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), last]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def similarity(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[N_images, N_texts] cosine similarities (what retrieval ranks by)."""
        return self.encode_image(pixel_values) @ self.encode_text(text_ids, text_mask).t()

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE loss over the batch (the matching pair is the positive)."""
        img, txt = self.encode_image(pixel_values), self.encode_text(text_ids, text_mask)
        return symmetric_info_nce(temperature_scale(self.logit_scale) * img.float() @ txt.float().t())


def temperature_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """1 / temperature from its learned log. Clamped as CLIP does: a temperature below 1/100 makes
    training unstable."""
    return logit_scale.clamp(max=math.log(100.0)).exp()


def symmetric_info_nce(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive loss of [N, N] image-text logits, both directions averaged: image i's positive is
    text i, or, with `positives` ([N, N] bool, symmetric), every text it marks, weighted equally (e.g.
    several captions of one image in a batch, which must not push each other away)."""
    if positives is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    else:
        targets = positives.float() / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
