"""Batching: right-padded token ids, labels and masks; images stacked, or listed when sizes differ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from vlmkit.constants import IGNORE_INDEX


def _pad(sequences: list[torch.Tensor], value: int) -> torch.Tensor:
    return pad_sequence(sequences, batch_first=True, padding_value=value)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _join_images(images: list[torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor | list[torch.Tensor] | None:
    """Per-sample images ([n, ...] tensors or lists of single images) in sample order: one tensor when
    they all have one shape, else a list of single images (the model groups them by size)."""
    if not images:
        return None
    if all(torch.is_tensor(x) for x in images) and len({x.shape[1:] for x in images}) == 1:
        return torch.cat(images)
    flat = [image for sample in images for image in sample]
    return torch.stack(flat) if len({image.shape for image in flat}) == 1 else flat


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
    """Right-pad `ConversationDataset` samples; images are concatenated in sample order.

    Returns ``input_ids`` / ``labels`` (padded with IGNORE_INDEX) / ``attention_mask`` [B, L],
    ``pixel_values`` [N_total, 3, H, W] (or, when image sizes differ, a list of N_total [3, H_i, W_i])
    or None when the batch has no image, ``image_counts`` [B]. Samples that carry ``image_features``
    (see `ConversationDataset.use_features`) give ``image_features`` [N_total, P, D] in place of
    ``pixel_values``. AnyRes samples (with ``image_sizes``) give every image's tiles in place of its
    image, and ``image_sizes`` [N_total, 2]: each image's original (height, width). When a sample averages
    frames into an image (a clip with temporal pooling), the batch also has ``image_frames`` [images in
    all rows]: how many consecutive frames make each image (then ``image_counts`` counts images and
    N_total frames).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    input_ids = _pad([sample["input_ids"] for sample in batch], pad_id)
    key = "image_features" if any("image_features" in sample for sample in batch) else "pixel_values"
    images = [sample[key] for sample in batch if sample["num_images"]]
    out = {
        "input_ids": input_ids,
        "labels": _pad([sample["labels"] for sample in batch], IGNORE_INDEX),
        "attention_mask": _mask([len(sample["input_ids"]) for sample in batch], input_ids.shape[1]),
        key: _join_images(images),
        "image_counts": torch.tensor([sample["num_images"] for sample in batch], dtype=torch.long),
    }
    if any("image_sizes" in sample for sample in batch):
        out["image_sizes"] = torch.cat([sample["image_sizes"] for sample in batch if "image_sizes" in sample])
    if any("image_frames" in sample for sample in batch):
        out["image_frames"] = torch.tensor([n for sample in batch
                                            for n in sample.get("image_frames", [1] * sample["num_images"])])
    return out


def collate_image_text(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack `ImageTextDataset` samples: ``pixel_values`` [B, 3, H, W], ``text_ids`` / ``text_mask`` [B, T],
    and ``image_ids`` [B] when the samples have them (equal ids: the same image)."""
    if not batch:
        raise ValueError("collate_image_text got an empty batch")
    text_ids = _pad([sample["text_ids"] for sample in batch], pad_id)
    out = {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "text_ids": text_ids,
        "text_mask": _mask([len(sample["text_ids"]) for sample in batch], text_ids.shape[1]),
    }
    if all("image_id" in sample for sample in batch):
        out["image_ids"] = torch.tensor([sample["image_id"] for sample in batch])
    return out
