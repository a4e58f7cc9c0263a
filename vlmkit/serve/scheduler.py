"""Continuous batching: one thread owns the model and runs a decode batch that requests join and leave.

Each loop iteration (a *step boundary*):
1. drops cancelled requests (a client went away): their slots are freed at once;
2. admits waiting requests into free slots of the `SlotCache`, all in one left-padded prefill (images
   through the vision tower, the fusion, the LM), each getting its first token from it;
3. runs one decode step for every active slot, each at its own position, and hands each request its
   token; a request that ends (end of turn, a stop sequence, its token budget) leaves, freeing its slot.

So a new request waits for at most one step (plus the prefill), not for the whole batch to finish; and
each request's tokens equal those it would get alone (greedy: exactly; sampling: from its own
generator, seeded by the request's `seed`). Requests beyond the free slots wait in a FIFO queue of at
most `max_queue`; past that `submit` raises `QueueFull` (the server answers 429).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmkit.device import autocast
from vlmkit.eval.generation import left_pad
from vlmkit.models.language import LanguageModel, LayerContext, sample_next
from vlmkit.serve.text import TextStream

log = logging.getLogger("vlmkit.serve")

# (left-padded ids [n, L], mask [n, L], images of all rows in reading order, images per row) ->
# (input embeddings [n, L, D], layer context or None): the model's fusion, or the bare LM's embedding.
Embedder = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], list[int]],
                    tuple[torch.Tensor, LayerContext | None]]


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


@dataclass
class Event:
    """What a request's consumer receives: text as it comes, then one `done` (or `error`)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop" (end of turn or a stop sequence) | "length"
    completion_tokens: int = 0
    status: int = 500  # error: the HTTP status to answer


class Job:
    """One request inside the scheduler: its prompt, images, sampling settings and how to report back.

    `notify` is called from the scheduler thread with each `Event` (it must be thread-safe and quick).
    """

    def __init__(self, prompt: Sequence[int], images: Sequence[torch.Tensor], max_tokens: int,
                 decode: Callable[[list[int]], str], notify: Callable[[Event], None], *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.prompt, self.images, self.max_tokens = list(prompt), list(images), max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.seed = random.getrandbits(63) if seed is None else seed % 2**63
        self.notify = notify
        self.stream = TextStream(decode, stop)
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.generator: torch.Generator | None = None  # made on the model's device at admission
        self.submitted = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (e.g. its client disconnected); its slot frees at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """Owns `lm` (and what `embed` uses) from its own thread; see the module doc."""

    def __init__(self, lm: LanguageModel, embed: Embedder, *, eos_id: int, pad_id: int, max_batch: int = 8,
                 max_queue: int = 64, max_length: int | None = None, precision: str = "fp32"):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.lm, self.embed = lm.eval(), embed
        self.eos_id, self.pad_id = eos_id, pad_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_length = max_length or lm.config.max_position_embeddings
        self.precision = precision
        self.device = lm.embed_tokens.weight.device
        self.cache = lm.new_slot_cache(max_batch, self.max_length)
        self._waiting: deque[Job] = deque()
        self._active: dict[int, Job] = {}  # slot -> job; touched by the scheduler thread only
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "steps": 0}

    # -- other threads -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vlmkit-scheduler", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still waiting or running get an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            # Requests that the next step admits into free slots do not count against the queue.
            free = self.max_batch - len(self._active)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} waiting already "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        return {"running": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, **self.counts}

    # -- the scheduler thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._closing):
                    self._cond.wait()
                if self._closing:
                    break
            self._drop_cancelled()
            admitted = self._take(self.max_batch - len(self._active))
            if admitted:
                self._prefill(admitted)
            if self._active:
                self._decode()
        self._fail(list(self._active.values()) + list(self._waiting), 503, "the server is shutting down")

    def _take(self, free: int) -> list[Job]:
        taken: list[Job] = []
        with self._cond:
            while self._waiting and len(taken) < free:
                job = self._waiting.popleft()
                if job.cancelled:
                    self.counts["cancelled"] += 1
                else:
                    taken.append(job)
        return taken

    def _drop_cancelled(self) -> None:
        for slot, job in list(self._active.items()):
            if job.cancelled:
                self._retire(slot)
                self.counts["cancelled"] += 1

    def _retire(self, slot: int) -> None:
        del self._active[slot]
        self.cache.release(slot)

    def _prefill(self, jobs: list[Job]) -> None:
        slots = [s for s in range(self.max_batch) if s not in self._active][: len(jobs)]
        try:
            ids, mask = left_pad([job.prompt for job in jobs], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            images = [image.to(self.device) for job in jobs for image in job.images]
            with torch.no_grad(), autocast(self.device, self.precision):
                embeds, context = self.embed(ids, mask, images, [len(job.images) for job in jobs])
                hidden = self.lm.prefill_slots(self.cache, slots, embeds, mask, context)
                logits = self.lm.lm_head(hidden).float()
        except Exception as err:  # never let one batch take the server down
            log.exception("prefill failed")
            for slot in slots:
                self.cache.release(slot)
            self._fail(jobs, 500, f"internal error while reading the prompt: {type(err).__name__}: {err}")
            return
        for job in jobs:
            job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
        self._accept(list(zip(slots, jobs)), logits)

    def _decode(self) -> None:
        slots = sorted(self._active)
        jobs = [self._active[s] for s in slots]
        try:
            tokens = torch.tensor([job.last_token for job in jobs], device=self.device)
            with torch.no_grad(), autocast(self.device, self.precision):
                hidden = self.lm.decode_slots(self.cache, slots, tokens)
                logits = self.lm.lm_head(hidden).float()
        except Exception as err:
            log.exception("decode step failed")
            for slot in slots:
                self._retire(slot)
            self._fail(jobs, 500, f"internal error while generating: {type(err).__name__}: {err}")
            return
        self.counts["steps"] += 1
        self._accept(list(zip(slots, jobs)), logits)

    def _accept(self, pairs: list[tuple[int, Job]], logits: torch.Tensor) -> None:
        """Give each (slot, job) its next token from `logits` [n, V]; keep it running or retire it."""
        greedy = logits.argmax(dim=-1).tolist()
        for row, (slot, job) in enumerate(pairs):
            if job.temperature > 0:
                token = int(sample_next(logits[row : row + 1], job.temperature, job.top_p, job.generator)[0])
            else:
                token = greedy[row]
            self._active[slot] = job
            if job.cancelled:
                self._retire(slot)
                self.counts["cancelled"] += 1
                continue
            reason = self._advance(job, token, room=self.max_length - self.cache.lengths[slot])
            if reason is not None:
                self._retire(slot)
                self.counts["completed"] += 1
                self._send(job, Event("done", job.stream.finish(), reason, job.completion_tokens))

    def _advance(self, job: Job, token: int, room: int) -> str | None:
        """Record `token` for `job`; the finish reason if the request ends here."""
        if token == self.eos_id:
            return "stop"
        job.completion_tokens += 1
        self.counts["generated_tokens"] += 1
        job.last_token = token
        text = job.stream.push(token)
        if text:
            self._send(job, Event("text", text))
        if job.stream.stopped:
            return "stop"
        if job.completion_tokens >= job.max_tokens or room < 1:
            return "length"
        return None

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.notify(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop working for it
            job.cancel()

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            self.counts["failed"] += 1
            self._send(job, Event("error", message, status=status))
