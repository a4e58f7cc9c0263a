"""Dense supervision of a vision tower from object annotations (boxes + categorical attributes).

Each object is assigned to the patch cell holding its box centre (as CenterNet does). A linear head
per cell predicts, from the very features a VLM's connector will read:

- objectness: does an object's centre fall in this cell (binary cross-entropy on every cell);
- one class per attribute (e.g. colour, shape, size; cross-entropy on the object cells);
- the object's box, ``(x1, y1, x2, y2)`` as fractions of the image side (L1 on the object cells);
- with ``box_bins``, also each coordinate as one of ``box_bins`` evenly spaced classes over ``[0, 1]``
  (cross-entropy; quantised coordinates as in Pix2Seq). With one class per pixel edge (image size + 1)
  the features hold positions as the same ordered classes that whole-number box tokens are, which a
  language model reads and writes through linear maps.

This gives the tower a signal for *what* and *where* at every cell, which contrastive pretraining on
pooled features (and the few answer tokens of instruction tuning) do not: on 2 CPU cores it is the
difference between a tower that can tell a red star from a red square at a given place and one that
cannot. The heads are thrown away; the VLM keeps the tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.checkpoint import Checkpointable
from vlmkit.models.vision import ViT


@dataclass
class DenseConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    # attribute name -> its class names, in a fixed order (e.g. {"color": ["red", ...], "shape": [...]})
    attributes: dict[str, list[str]] = field(default_factory=dict)
    box_weight: float = 5.0  # L1 on [0, 1] coordinates is small beside cross-entropies
    box_bins: int = 0  # > 1: also classify each coordinate into this many bins (0: off)

    def __post_init__(self) -> None:
        if self.box_bins == 1 or self.box_bins < 0:
            raise ConfigError(f"dense.box_bins must be 0 (off) or >= 2, got {self.box_bins}")
        if self.vision.merges_tokens:
            raise ConfigError("vision.token_merging: the dense stage's heads predict per patch-grid cell, and merged "
                              "tokens keep no grid; train the tower with token_merging.r: 0 (merging can be "
                              "switched on in the VLM that uses it)")


def box_bin_targets(boxes: torch.Tensor, bins: int) -> torch.Tensor:
    """[..., 4] boxes in [0, 1] -> [..., 4] class of each coordinate among `bins` evenly spaced values."""
    return torch.round(boxes.clamp(0, 1) * (bins - 1)).long()


class DenseTower(Checkpointable, nn.Module):
    """A ViT with linear per-cell heads for objectness, each attribute and the box."""

    FORMAT = "vlmkit-dense"
    CONFIG = DenseConfig

    def __init__(self, cfg: DenseConfig):
        super().__init__()
        self.config = cfg
        self.vision = ViT(cfg.vision)
        dim = cfg.vision.hidden_size
        self.objectness = nn.Linear(dim, 1)
        self.classifiers = nn.ModuleDict({name: nn.Linear(dim, len(names)) for name, names in cfg.attributes.items()})
        self.box = nn.Linear(dim, 4)
        self.box_classes = nn.Linear(dim, 4 * cfg.box_bins) if cfg.box_bins else None

    def cell_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, P, D]: the tower's VLM features (selected layer, normed, patch cells only)."""
        features = self.vision(pixels)
        return features[:, self.vision.num_prefix_tokens:] if self.config.vision.keep_cls else features

    def predict(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.cell_features(pixels)
        out = {"objectness": self.objectness(h).squeeze(-1), "boxes": self.box(h),
               **{name: head(h) for name, head in self.classifiers.items()}}
        if self.box_classes is not None:
            out["box_bins"] = self.box_classes(h).unflatten(-1, (4, self.config.box_bins))  # [B, P, 4, bins]
        return out

    def forward(self, pixel_values: torch.Tensor, objectness: torch.Tensor, classes: torch.Tensor,
                boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses for a batch of per-cell targets (`vlmkit.data.scenes.cell_targets`, stacked on dim 0):
        objectness [B, P], classes [B, A, P], boxes [B, P, 4]; ``loss`` is their weighted sum."""
        pred = self.predict(pixel_values)
        losses = {"objectness": F.binary_cross_entropy_with_logits(pred["objectness"].float(), objectness)}
        on = objectness > 0
        for a, name in enumerate(self.classifiers):
            losses[name] = F.cross_entropy(pred[name][on].float(), classes[:, a][on])
        losses["box"] = F.l1_loss(pred["boxes"][on].float(), boxes[on])
        if self.box_classes is not None:
            losses["box_bins"] = F.cross_entropy(pred["box_bins"][on].flatten(0, 1).float(),
                                                 box_bin_targets(boxes[on], self.config.box_bins).flatten())
        losses["loss"] = sum(losses.values()) + (self.config.box_weight - 1.0) * losses["box"]
        return losses


@torch.no_grad()
def dense_metrics(pred: dict[str, torch.Tensor], objectness: torch.Tensor, classes: torch.Tensor,
                  boxes: torch.Tensor, attributes: list[str]) -> dict[str, float]:
    """How well the heads read the cells: objectness F1 (logit > 0), per-attribute accuracy and box IoU
    (mean, and the share >= 0.5) on the object cells."""
    on, said = objectness > 0, pred["objectness"] > 0
    out = {"objectness_f1": float(2 * (said & on).sum() / max(1, int(said.sum() + on.sum())))}
    for a, name in enumerate(attributes):
        out[f"{name}_accuracy"] = float((pred[name][on].argmax(-1) == classes[:, a][on]).float().mean())
    p, t = pred["boxes"][on].float(), boxes[on]
    inter = ((torch.minimum(p[:, 2], t[:, 2]) - torch.maximum(p[:, 0], t[:, 0])).clamp(min=0)
             * (torch.minimum(p[:, 3], t[:, 3]) - torch.maximum(p[:, 1], t[:, 1])).clamp(min=0))
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    iou = inter / (area(p) + area(t) - inter).clamp(min=1e-9)
    out.update(box_iou=float(iou.mean()), box_acc50=float((iou >= 0.5).float().mean()))
    if "box_bins" in pred:
        bins = pred["box_bins"].shape[-1]
        off = (pred["box_bins"][on].argmax(-1) - box_bin_targets(boxes[on], bins)).abs()
        out.update(box_bin_accuracy=float((off == 0).float().mean()), box_bin_within1=float((off <= 1).float().mean()))
    return out
