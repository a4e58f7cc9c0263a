"""Batching: right-padded token ids, labels and masks; images stacked, or listed when sizes differ.

With packing, a batch's samples are laid end to end in rows of at most `pack_length` tokens (first-fit
decreasing: longest first, each into the first row with room), so short samples stop paying for the
padding up to the longest one. The batch keeps its samples, only their rows change; ``segment_ids``
tell the model where each sample sits (its own positions from 0, attention within the sample only).
"""

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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` tokens, first-fit decreasing.

    Deterministic: ties in length keep the batch's order, and each row lists its samples in the order
    they were placed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a packed row of {capacity}")
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate(batch: Sequence[dict[str, Any]], pad_id: int,
            pack_length: int | None = None) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
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

    With `pack_length`, rows are packed (see `pack_rows`): B is the number of rows, ``segment_ids``
    [B, L] holds 1 + the batch index of the sample at each position (0: padding), images (and their
    ``image_sizes`` / ``image_frames``) go row by row in the order the row's samples sit, ``image_counts``
    counts each row's images, and the first label of every sample is IGNORE_INDEX (nothing before it in
    the row may predict it).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if pack_length is not None:
        return _collate_packed(batch, pad_id, pack_length)
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
    return out | _image_extras(batch)


def _image_extras(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``image_sizes`` (AnyRes) and ``image_frames`` (clips) of `samples`' images, in the samples' order."""
    out = {}
    if any("image_sizes" in sample for sample in samples):
        out["image_sizes"] = torch.cat([sample["image_sizes"] for sample in samples if "image_sizes" in sample])
    if any("image_frames" in sample for sample in samples):
        out["image_frames"] = torch.tensor([n for sample in samples
                                            for n in sample.get("image_frames", [1] * sample["num_images"])])
    return out


def _collate_packed(batch: Sequence[dict[str, Any]], pad_id: int, pack_length: int) -> dict[str, Any]:
    rows = pack_rows([len(sample["input_ids"]) for sample in batch], pack_length)
    ids, labels, segments = [], [], []
    for row in rows:
        ids.append(torch.cat([batch[i]["input_ids"] for i in row]))
        row_labels = [batch[i]["labels"].clone() for i in row]
        for sample_labels in row_labels:
            sample_labels[0] = IGNORE_INDEX
        labels.append(torch.cat(row_labels))
        segments.append(torch.cat([torch.full((len(batch[i]["input_ids"]),), i + 1, dtype=torch.long) for i in row]))
    key = "image_features" if any("image_features" in sample for sample in batch) else "pixel_values"
    in_rows = [batch[i] for row in rows for i in row]  # the samples in the order their images go
    images = [sample[key] for sample in in_rows if sample["num_images"]]
    segment_ids = _pad(segments, 0)
    return {
        "input_ids": _pad(ids, pad_id),
        "labels": _pad(labels, IGNORE_INDEX),
        "attention_mask": (segment_ids > 0).long(),
        "segment_ids": segment_ids,
        key: _join_images(images),
        "image_counts": torch.tensor([sum(batch[i]["num_images"] for i in row) for row in rows], dtype=torch.long),
    } | _image_extras(in_rows)


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
