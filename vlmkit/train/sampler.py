"""The training batch order: deterministic, length-grouped, resumable mid-epoch, split across ranks.

`ResumableBatchSampler` is a `torch.utils.data.Sampler` of index lists for a DataLoader's
``batch_sampler``. Global batch k of the stream is a pure function of (seed, k): epoch e shuffles the
samples with a generator seeded by (seed, e), cuts the order into windows of `window` batches, sorts
each window by length (so a batch pads to similar lengths: about 2x fewer wasted tokens on mixed
caption/QA data) and shuffles the batches of the window.

Its state is (epoch, position): one pass (`iter`) yields the rest of epoch `epoch` from batch
`position` on, so a run restarted from a checkpoint continues with exactly the batches an
uninterrupted run would have seen. Iterating does not move the state (a DataLoader asks for batches
ahead of the ones the training loop has taken); whoever consumes the batches sets it (`seek`).

With ``world_size > 1`` every rank gets its share of each global batch, ``batch[rank::world_size]``:
the shares are disjoint and together are the single-process batch, and since the batches are sorted
by length within a window, every rank gets samples of similar lengths. The global order does not
depend on `world_size`, so a run can resume with another number of ranks. Only an epoch's last batch
can be short; when it has fewer samples than there are ranks, the ranks past its end get an empty
list, which a distributed loop must step over (while still joining the gradient all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

STATE_VERSION = 1
# What decides the global batch order: a checkpoint's data position only means the same batches when
# these match.
_IDENTITY = ("seed", "batch_size", "num_samples", "window")


class ResumableBatchSampler(Sampler[list]):
    """Lists of sample indices (this rank's share of each global batch), from state (epoch, position).

    With ``with_epoch=True`` the lists hold ``(index, epoch)`` pairs instead, for datasets whose
    samples vary from epoch to epoch with no global random state (see `SceneDataset`'s flips).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, window: int = 32, rank: int = 0,
                 world_size: int = 1, with_epoch: bool = False):
        if len(lengths) == 0:
            raise ValueError("the training set is empty (every record was skipped? see the load summary)")
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be >= 1, got {batch_size} and {window}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        if world_size > batch_size:
            raise ValueError(f"a global batch of {batch_size} cannot give each of {world_size} ranks a sample")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.window = batch_size, seed, window
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch
        self.per_epoch = -(-len(self.lengths) // batch_size)  # global batches per epoch, the last maybe short
        self.epoch, self.position = 0, 0
        self._cached_epoch, self._cached = -1, []

    # -- state ------------------------------------------------------------------------------------

    @property
    def batches_done(self) -> int:
        """Global batches before the state: the stream index of the next batch."""
        return self.epoch * self.per_epoch + self.position

    def seek(self, batches_done: int) -> None:
        """Set the state to just after `batches_done` global batches of the stream."""
        if batches_done < 0:
            raise ValueError(f"batches_done must be >= 0, got {batches_done}")
        self.epoch, self.position = divmod(batches_done, self.per_epoch)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "num_samples": len(self.lengths), "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; a state for another data set, batch size or seed is refused."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"unknown batch sampler state format (version {found!r}; this vlmkit reads "
                             f"version {STATE_VERSION})")
        mine = self.state_dict()
        changed = [f"{key} {state.get(key)!r} -> {mine[key]!r}" for key in _IDENTITY if state.get(key) != mine[key]]
        if changed:
            raise ValueError("the checkpoint's data position belongs to another batch order (" + ", ".join(changed)
                             + "): resuming would not continue the same batches; train from scratch instead")
        epoch, position = state["epoch"], state["position"]
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0 and 0 <= position < self.per_epoch):
            raise ValueError(f"bad batch sampler state: epoch {epoch!r}, position {position!r} "
                             f"({self.per_epoch} batches per epoch)")
        self.epoch, self.position = epoch, position

    # -- batches ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches one pass yields: the rest of the current epoch."""
        return self.per_epoch - self.position

    def __iter__(self) -> Iterator[list]:
        return self._iterate(self.epoch, self.position)  # the state is read now, not at the first batch

    def _iterate(self, epoch: int, position: int) -> Iterator[list]:
        for batch in self.epoch_batches(epoch)[position:]:
            share = batch[self.rank :: self.world_size]
            yield [(i, epoch) for i in share] if self.with_epoch else share

    def batch(self, k: int) -> list[int]:
        """This rank's indices of global batch `k` of the stream."""
        return self.global_batch(k)[self.rank :: self.world_size]

    def global_batch(self, k: int) -> list[int]:
        """All indices of global batch `k` of the stream (every rank's share)."""
        epoch, index = divmod(k, self.per_epoch)
        return self.epoch_batches(epoch)[index]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, in order (cached: one epoch at a time)."""
        if epoch != self._cached_epoch:
            self._cached_epoch, self._cached = epoch, self._epoch_batches(epoch)
        return self._cached

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        batches = []
        span = self.batch_size * self.window
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            group = [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
            batches += [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
        return batches
