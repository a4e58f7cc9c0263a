"""Features of a frozen vision tower, computed once per image instead of once per training step.

A frozen tower maps an image to the same features at every step, so a stage computes them for every
distinct image of its data before training and the model skips the tower. With a cache directory
they are also kept on disk and reused by later runs: one directory per *tower fingerprint* (a hash
of the tower's configuration, every weight and buffer, and the image preprocessing, so any change to
the tower, its selected layer or the resize/normalisation starts a fresh cache), holding safetensors
shards whose rows are keyed by a hash of the preprocessed image's pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmkit.config import to_dict
from vlmkit.data.images import ImageProcessor
from vlmkit.device import autocast
from vlmkit.io import atomic_file
from vlmkit.models.vision import ViT

log = logging.getLogger("vlmkit.train")


def tower_fingerprint(tower: ViT, processor: ImageProcessor) -> str:
    """Hash of what decides a tower's features: its config, weights and buffers, and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"vision": to_dict(tower.config), "size": processor.size, "mean": processor.mean,
                         "std": processor.std}, sort_keys=True, default=list).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def image_digest(pixels: np.ndarray) -> str:
    """Hash of one preprocessed uint8 image (its shape included)."""
    return hashlib.blake2b(str(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes(),
                           digest_size=16).hexdigest()


class FeatureCache:
    """Features on disk under ``directory / fingerprint``: safetensors shards of rows keyed by image digest."""

    def __init__(self, directory: str | Path, fingerprint: str):
        self.directory = Path(directory) / fingerprint

    def _index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    digests = json.loads(f.metadata()["digests"])
            except Exception as err:  # a damaged shard costs only its rows, which are recomputed
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, err)
                continue
            index.update({d: (shard, row) for row, d in enumerate(digests)})
        return index

    def load(self, digests: list[str]) -> dict[str, torch.Tensor]:
        """The cached features of those `digests` that are on disk."""
        index = self._index()
        found: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for d in digests:
            if d in index:
                by_shard.setdefault(index[d][0], []).append((d, index[d][1]))
        for shard, rows in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                features = f.get_tensor("features")
            found.update({d: features[row] for d, row in rows})
        return found

    def save(self, digests: list[str], features: torch.Tensor) -> Path:
        """Write one shard (atomically; its name is a hash of its digests)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b("".join(digests).encode(), digest_size=12).hexdigest()
        path = self.directory / f"{name}.safetensors"
        with atomic_file(path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp), metadata={"digests": json.dumps(digests)})
        return path


@torch.no_grad()
def tower_features(tower: ViT, processor: ImageProcessor, pixels: np.ndarray, *, precision: str = "bf16",
                   cache_dir: str | Path | None = None, batch_size: int = 256) -> torch.Tensor:
    """Features [N, P, D] of the uint8 images `pixels` [N, H, W, 3] (on the tower's device; bf16 under
    bf16 precision: the connector's first matmul rounds them to bf16 anyway, so nothing is lost).

    With `cache_dir`, features already on disk are read and only the others computed (then saved).
    """
    device = next(tower.parameters()).device
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    was_training = tower.training
    tower.eval()
    cache = FeatureCache(cache_dir, tower_fingerprint(tower, processor)) if cache_dir else None
    digests = [image_digest(p) for p in pixels]
    known = cache.load(sorted(set(digests))) if cache else {}
    todo = sorted({i for i, d in enumerate(digests) if d not in known}, key=lambda i: digests[i])
    todo = list({digests[i]: i for i in todo}.values())  # one computation per distinct image
    computed: dict[str, torch.Tensor] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = processor.normalize(pixels[chunk]).to(device)
        with autocast(device, precision):
            out = tower(batch).to(dtype).cpu()
        computed.update({digests[i]: out[k] for k, i in enumerate(chunk)})
    if cache and computed:
        cache.save(list(computed), torch.stack(list(computed.values())))
    log.info("vision features: %d images, %d from the cache, %d computed", len(digests),
             len(digests) - len(todo), len(todo))
    tower.train(was_training)
    every = {**known, **computed}
    return torch.stack([every[d] for d in digests]).to(device)
