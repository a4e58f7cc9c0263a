"""BLIP-2 stage 1: a Q-Former learns to pull out of a frozen tower's features what captions say.

Three losses on image-caption pairs share the Q-Former's layers (Li et al. 2023, BLIP-2):

- ITC, image-text contrastive: each caption's [CLS] output against the image's best-matching query
  output, symmetric InfoNCE with a learned temperature (queries and text in separate passes);
- ITM, image-text matching: queries and caption in one pass, attending to each other; a binary head
  on the query outputs tells true pairs from hard negatives drawn from the ITC similarities within the
  batch (the captions an image is most easily confused with, and the other way round);
- ITG, image-grounded generation: the text path writes the caption token by token; it sees the
  queries, which never see the text, so the queries must carry what the caption needs.

Pretrained this way, the queries and layers are what a VLM's `qformer` connector starts from (the
training stages' `connector_from`); the text path and heads stay behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig, VisionConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.checkpoint import Checkpointable
from vlmkit.models.clip import symmetric_info_nce, temperature_scale
from vlmkit.models.connectors.qformer import QFormer
from vlmkit.models.vision import ViT


@dataclass
class QFormerPretrainingConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=lambda: ConnectorConfig(name="qformer"))
    vocab_size: int = 2048  # the caption tokenizer's; [CLS] and [DEC] are two more rows after it
    max_text_length: int = 257  # text positions, the leading [CLS] / [DEC] included
    embed_dim: int = 128  # width of the ITC space (BLIP-2: 256)
    init_temperature: float = 0.07
    itg: bool = True  # image-grounded generation, the third loss (false: ITC + ITM only)

    def __post_init__(self) -> None:
        if self.connector.name != "qformer":
            raise ConfigError(f"model.connector.name: the qformer stage pretrains a qformer connector, "
                              f"got {self.connector.name!r}")


class QFormerPretrainer(Checkpointable, nn.Module):
    """A frozen-able ViT, a Q-Former with its text path, and BLIP-2's ITC / ITM / ITG heads."""

    FORMAT = "vlmkit-qformer"
    CONFIG = QFormerPretrainingConfig

    def __init__(self, cfg: QFormerPretrainingConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        self.qformer = QFormer(cfg.connector, cfg.vision.hidden_size, text=True)
        dim = self.qformer.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size + 2, dim)  # + [CLS], [DEC]
        self.position_embeddings = nn.Embedding(cfg.max_text_length, dim)
        for table in (self.word_embeddings, self.position_embeddings):
            nn.init.normal_(table.weight, std=0.02)  # BERT's; also keeps the tied ITG logits small at first
        self.vision_proj = nn.Linear(dim, cfg.embed_dim)
        self.text_proj = nn.Linear(dim, cfg.embed_dim)
        self.itm_head = nn.Linear(dim, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    # -- passes -------------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor, start: Literal["cls", "dec"]) -> torch.Tensor:
        """[B, T] caption ids -> [B, 1 + T, H]: "cls" (understanding) or "dec" (generation) first."""
        vocab = self.config.vocab_size
        first = torch.full_like(ids[:, :1], vocab if start == "cls" else vocab + 1)
        ids = torch.cat([first, ids], dim=1)
        if ids.shape[1] > self.config.max_text_length:
            raise ValueError(f"{ids.shape[1] - 1} caption tokens exceed the Q-Former's "
                             f"{self.config.max_text_length - 1} text positions")
        return self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [B, P, Dv] -> one unit vector per query [B, K, E]."""
        return F.normalize(self.vision_proj(self.qformer(features)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Captions [B, T] (right-padded, `mask` 1 on real tokens) -> the [CLS] output as a unit vector [B, E]."""
        hidden = self.qformer(None, self.embed_text(ids, "cls"), _key_mask(mask)[:, None, None, :])
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @staticmethod
    def _match(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """[N_images, N_texts]: each image's best query against each caption (BLIP-2's ITC similarity)."""
        return torch.einsum("ike,je->ijk", images.float(), texts.float()).amax(dim=-1)

    def similarity(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[N_images, N_texts] ITC similarities (what retrieval ranks by)."""
        return self._match(self.encode_image(self.vision(pixel_values)), self.encode_text(text_ids, text_mask))

    def match_logits(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (0: not a pair, 1: a pair) of images (as tower features) and captions, row by row."""
        keys = _with_queries(self.qformer.num_queries, _key_mask(mask))
        hidden = self.qformer(features, self.embed_text(ids, "cls"), keys[:, None, None, :])
        return self.itm_head(hidden[:, : self.qformer.num_queries]).mean(dim=1)

    def generation_loss(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITG: next-token cross-entropy of the captions, written after [DEC] with the queries in view."""
        k = self.qformer.num_queries
        hidden = self.qformer(features, self.embed_text(ids, "dec"), generation_mask(k, _key_mask(mask)))
        # Position j (the [DEC] token, then caption token j) predicts caption token j + 1.
        logits = F.linear(hidden[:, k:-1], self.word_embeddings.weight[: self.config.vocab_size])
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    # -- training -----------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """BLIP-2's stage-1 losses on a batch of pairs: ``itc``, ``itm``, ``itg`` (when enabled) and
        their sum ``loss``; also ``itm_accuracy`` (not differentiable).

        `image_ids` ([B], equal for the same image) keeps several captions of one image in a batch from
        counting as each other's negatives; identical captions never do either."""
        features = self.vision(pixel_values)
        sims = self._match(self.encode_image(features), self.encode_text(text_ids, text_mask))
        positives = _positives(text_ids, text_mask, image_ids)
        logits = temperature_scale(self.logit_scale) * sims
        out = {"itc": symmetric_info_nce(logits, positives)}

        images, texts = _hard_negatives(logits.detach(), positives)
        labels = torch.cat([torch.ones(len(sims), dtype=torch.long, device=sims.device),
                            torch.zeros(len(images) - len(sims), dtype=torch.long, device=sims.device)])
        itm = self.match_logits(features[images], text_ids[texts], text_mask[texts]).float()
        out["itm"] = F.cross_entropy(itm, labels)
        out["itm_accuracy"] = (itm.argmax(dim=1) == labels).float().mean().detach()
        if self.config.itg:
            out["itg"] = self.generation_loss(features, text_ids, text_mask)
        out["loss"] = out["itc"] + out["itm"] + out.get("itg", 0.0)
        return out


def generation_mask(num_queries: int, keys: torch.Tensor) -> torch.Tensor:
    """BLIP-2's multimodal causal mask [B, 1, K + T, K + T] for text keys `keys` [B, T] (True: a real
    token): everything sees the queries, the queries see nothing else, text sees earlier text."""
    k, n = num_queries, keys.shape[1]
    allowed = torch.zeros(k + n, k + n, dtype=torch.bool, device=keys.device)
    allowed[:, :k] = True
    allowed[k:, k:] = torch.ones(n, n, dtype=torch.bool, device=keys.device).tril()
    return allowed & _with_queries(k, keys)[:, None, None, :]


def _key_mask(mask: torch.Tensor) -> torch.Tensor:
    """A caption's key mask with its leading [CLS] / [DEC] position: [B, T] -> [B, 1 + T] bool."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).bool()


def _with_queries(num_queries: int, keys: torch.Tensor) -> torch.Tensor:
    """Text keys [B, T] (bool) preceded by the queries' (always there): [B, K + T]."""
    return torch.cat([torch.ones_like(keys[:, :1]).expand(-1, num_queries), keys], dim=1)


def _positives(ids: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, B] bool: pairs (i, j) where image i and caption j belong together: the same image, or the same caption."""
    tokens = ids.masked_fill(mask == 0, -1)
    same = (tokens[:, None] == tokens[None]).all(dim=-1)
    if image_ids is not None:
        same |= image_ids[:, None] == image_ids[None]
    return same


@torch.no_grad()
def _hard_negatives(logits: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption indices of the ITM pairs: the B true pairs, then for each caption an image and
    for each image a caption drawn with probability softmax(ITC logits) among its negatives (BLIP-2).
    A caption (image) without any negative in the batch contributes none."""
    rows = torch.arange(len(logits), device=logits.device)
    has = (~positives).any(dim=1)  # `positives` is symmetric: the same rows for images and captions

    def draw(scores: torch.Tensor) -> torch.Tensor:
        # The small floor keeps negatives that a sharp softmax underflows to 0 drawable.
        weights = (torch.softmax(scores[has].float(), dim=1) + 1e-6).masked_fill(positives[has], 0.0)
        return torch.multinomial(weights, 1).squeeze(1)

    images = torch.cat([rows, draw(logits.t()), rows[has]])
    texts = torch.cat([rows, rows[has], draw(logits)])
    return images, texts
