"""What decoding keeps between steps: the layer context of a fusion, the KV cache of one batch of
sequences (`KVCache`), and the per-slot cache of continuous batching (`SlotCache`, stepped through
`SlotStep`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.config import LanguageConfig


@dataclass
class LayerContext:
    """What a fusion (see models/fusion.py) hands to the decoder layers for one sequence batch.

    Layer i starts with ``hidden = adapters[i](hidden, value, start)`` (an entry may be None: that layer
    is left alone). `start` is the sequence index of `hidden`'s first position: 0 at a prefill or an
    uncached forward, the cache's length at a KV-cached step, so an adapter whose effect depends on
    where a token sits (e.g. which image precedes it) knows which positions it is given. The adapters
    are modules owned by the fusion, outside the LM, so the LM's parameters and state-dict keys never
    depend on the fusion.
    """

    adapters: Sequence[Callable[[torch.Tensor, Any, int], torch.Tensor] | None]
    value: Any

    def apply(self, layer_index: int, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        adapter = self.adapters[layer_index]
        return hidden if adapter is None else adapter(hidden, self.value, start)

    # Continuous batching (`SlotCache`) keeps one context per sequence and stacks those of the sequences
    # in a decode step. The value says how: ``value.rows()`` -> one value per batch row, as seen by decode
    # steps (positions after the prefilled sequence); ``type(value).stack(values)`` -> one batch value, a
    # row per entry (None: that row has no context, and the adapters must leave it unchanged).

    def rows(self) -> list[LayerContext]:
        """One context per batch row, for the decode steps after a prefill."""
        if not hasattr(self.value, "rows"):
            raise TypeError(f"{type(self.value).__name__} cannot be split per row (no rows()): this layer context "
                            "does not support continuous batching")
        return [LayerContext(self.adapters, value) for value in self.value.rows()]

    @staticmethod
    def stack(contexts: Sequence[LayerContext | None]) -> LayerContext | None:
        """The contexts of several rows (from `rows`) as one batch context; None when no row has one."""
        present = next((c for c in contexts if c is not None), None)
        if present is None:
            return None
        values = [None if c is None else c.value for c in contexts]
        return LayerContext(present.adapters, type(present.value).stack(values))


class KVCache:
    """Keys/values for every layer, preallocated to `max_length` so decoding never reallocates.

    It also keeps the layer context given with its prefill, so every cached decode step sees it too.
    """

    def __init__(self, cfg: LanguageConfig, batch_size: int, max_length: int, device, dtype: torch.dtype):
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0  # positions filled so far (advanced once per forward, after the last layer)
        self.max_length = max_length
        self.context: LayerContext | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions > max_length {self.max_length}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length


class SlotCache:
    """A KV cache whose rows ("slots") hold independent sequences, each of its own length: the state of
    continuous batching, where sequences join and leave a running decode batch between steps.

    `LanguageModel.prefill_slots` writes prompts into free slots; `LanguageModel.decode_slots` advances
    any set of slots by one token each (every slot at its own position); `release` frees a slot for the
    next sequence. Storage grows on demand (doubling, up to `max_length` positions), so memory follows
    the longest live sequence rather than the model's context. Each slot also keeps the layer context
    of its prefill (see `LayerContext.rows`), which its decode steps see.
    """

    def __init__(self, cfg: LanguageConfig, num_slots: int, max_length: int, device, dtype: torch.dtype,
                 initial_length: int = 64):
        if num_slots < 1 or max_length < 1:
            raise ValueError(f"a slot cache needs num_slots >= 1 and max_length >= 1, got {num_slots}, {max_length}")
        self.num_slots, self.max_length = num_slots, max_length
        shape = (num_slots, cfg.num_kv_heads, min(initial_length, max_length), cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.lengths = [0] * num_slots  # positions filled in each slot
        self.contexts: list[LayerContext | None] = [None] * num_slots

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (an error past `max_length`)."""
        if length > self.max_length:
            raise ValueError(f"KV cache overflow: {length} positions > max_length {self.max_length}")
        if length <= self.capacity:
            return
        grown = min(self.max_length, max(length, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], grown, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def release(self, slot: int) -> None:
        """Free `slot` for another sequence (its stale keys are never read: lengths bound every read)."""
        self.lengths[slot] = 0
        self.contexts[slot] = None


class SlotStep:
    """One decode step's view of a `SlotCache` (what `Attention` calls as its cache): each given slot
    gets its new key/value at its own position and reads its own filled positions."""

    def __init__(self, cache: SlotCache, slots: list[int]):
        self.cache = cache
        device = cache.keys[0].device
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.positions = torch.tensor([cache.lengths[s] for s in slots], dtype=torch.long, device=device)
        self.length = max(cache.lengths[s] for s in slots) + 1  # keys read per row (rows mask their own)
        cache.reserve(self.length)
        # None when every row is at the same position: the plain kernel, exactly as a single sequence runs.
        if len(set(self.positions.tolist())) == 1:
            self.mask = None
        else:
            self.mask = (torch.arange(self.length, device=device)[None] <= self.positions[:, None])[:, None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.slots, :, self.positions] = k[:, :, 0].to(keys.dtype)
        values[self.slots, :, self.positions] = v[:, :, 0].to(values.dtype)
        return keys[self.slots, :, : self.length], values[self.slots, :, : self.length]
