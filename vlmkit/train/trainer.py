"""The training loop, readable top to bottom, with exact resume.

Batches come from a DataLoader (`data.num_workers` worker processes) in the order of a
`ResumableBatchSampler`: a pure function of (seed, batch index), so a resumed run sees exactly the
batches an uninterrupted one would, whatever the number of workers.

Run directory layout:
    run.yaml           the resolved config (what `--resume` restarts from)
    metrics.jsonl      one JSON line per log step
    checkpoints/step-N model + optimizer + scheduler + RNG + data position (atomic, last K kept)
    model/             the final model (config.json, model.safetensors, tokenizer.json)
    stage_eval.json    the stage's own end-of-run evaluation
    loss_curve.png     training loss against step (when matplotlib is installed)

Under torchrun (`strategy: ddp | fsdp`, see `vlmkit.train.distributed`) every process trains on its
share of each batch; the main process writes the run directory, and a checkpoint holds the model and
optimizer state in torch.distributed.checkpoint's format instead of model.safetensors + the optimizer.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.device import autocast, batch_to, resolve_device
from vlmkit.io import atomic_directory, write_json_atomic
from vlmkit.models.vlm import resolve_model_dir
from vlmkit.train.config import RunConfig, run_config_to_dict
from vlmkit.train.distributed import Distributed, is_sharded_checkpoint, load_sharded_checkpoint
from vlmkit.train.efficiency import compile_model, prepare_model
from vlmkit.train.optim import build_optimizer, build_scheduler
from vlmkit.train.recipe import load_run_config
from vlmkit.train.sampler import ResumableBatchSampler
from vlmkit.train.stages import Stage, stage_class

log = logging.getLogger("vlmkit.train")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    batches_seen: int = 0  # position in the batch stream (global micro-batches)
    samples_seen: int = 0


def dataset_lengths(dataset) -> list[int]:
    """Per-sample token lengths (for length grouping); datasets without them count as equal."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [n for part in dataset.datasets for n in dataset_lengths(part)]
    lengths = getattr(dataset, "lengths", None)
    return list(lengths) if lengths is not None else [1] * len(dataset)


class StepClock:
    """Wall time per phase of the training step, summed until read (CUDA is synchronised at each lap)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self.sync()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
        self._last = now

    def read(self, steps: int) -> dict[str, float]:
        out = {phase: round(1000 * total / max(1, steps), 1) for phase, total in self.totals.items()}
        self.totals = {}
        return out


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.out)
        stage_type = stage_class(cfg.stage)
        self.dist = Distributed.setup(cfg, stage_type)  # one process unless torchrun started several
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.tokenizer = self._load_tokenizer() if stage_type.needs_tokenizer else None
        self.stage: Stage = stage_type(cfg, self.tokenizer)
        self.model = self.stage.build_model()
        self.stage.set_trainable(self.model)
        prepare_model(self.model, cfg.optim)  # LoRA adapters, activation checkpointing
        self.model.to(self.device)
        self.train_set, self.val_set = self.stage.datasets(self.model)
        compile_model(self.model, cfg.optim)  # after the datasets: a frozen tower's features are computed eagerly
        self.num_workers = cfg.data.resolved_num_workers()
        self.sampler = ResumableBatchSampler(dataset_lengths(self.train_set), cfg.optim.batch_size, cfg.seed,
                                             rank=self.dist.rank, world_size=self.dist.world_size,
                                             with_epoch=bool(getattr(self.train_set, "epoch_keyed", False)))
        self._loader: DataLoader | None = None
        self._batches: Iterator[dict] | None = None
        # What the training step calls: the model, or DDP around it, or (FSDP) the model sharded in place.
        self.train_model = self.dist.wrap(self.model, cfg.precision,
                                          self.dist.enabled and self.stage.may_skip_weights(self.model, self.train_set))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.state = TrainState()
        self.clock = StepClock(self.device)

    def _load_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        source = cfg.tokenizer or cfg.init_from or cfg.pretrained_lm or cfg.vision_from or cfg.connector_from
        if source is None:
            raise ValueError("no tokenizer: set `tokenizer:` to a directory with tokenizer.json")
        return Tokenizer.load(resolve_model_dir(source))

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to `optim.steps` (or stop once `stop_after` steps are done, for tests)."""
        cfg, opt = self.cfg, self.cfg.optim
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "run.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
        self.stage.train_mode(self.model)
        last = opt.steps if stop_after is None else min(opt.steps, stop_after)
        bar = tqdm(total=opt.steps, initial=self.state.step, desc=cfg.stage, dynamic_ncols=True,
                   mininterval=2.0, disable=None if self.dist.is_main else True)
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "start": time.perf_counter()}
        try:
            while self.state.step < last:
                loss, tokens, samples = self.train_step()
                self.state.step += 1
                window["loss"] += loss
                window["steps"] += 1
                window["tokens"] += tokens
                window["samples"] += samples
                bar.update(1)
                if self.state.step % cfg.log_every == 0 or self.state.step == last:
                    record = self._log(window)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "start": time.perf_counter()}
                if self.state.step % cfg.save_every == 0 and self.state.step < opt.steps:
                    self.save_checkpoint()
        finally:
            self.close_data()  # the workers' memory is free for the evaluation (or whatever comes next)
        bar.close()
        if self.state.step < opt.steps:
            self.save_checkpoint()
            return {}
        return self.finish()

    def train_step(self) -> tuple[float, int, int]:
        opt, clock = self.cfg.optim, self.clock
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, tokens, samples = 0.0, 0, 0
        for micro in range(opt.grad_accum):
            clock.start()
            batch, size = self.next_batch()
            batch = self._to_device(batch)
            clock.lap("data")
            with self.dist.gradient_sync(self.train_model, enabled=micro == opt.grad_accum - 1):
                with autocast(self.device, self.cfg.precision):
                    loss = self.stage.loss(self.train_model, batch) / opt.grad_accum
                if self.dist.enabled:
                    loss = loss * self._share_weight(batch, size)
                clock.lap("forward")
                loss.backward()
            total_loss += float(loss.detach())
            clock.lap("backward")
            tokens += self.stage.count_tokens(batch) if size else 0
            samples += size
        if self.dist.enabled:  # the whole batch's numbers, for the log
            total_loss, tokens, samples = self.dist.sum_over_ranks(total_loss / self.dist.world_size, tokens, samples)
            tokens, samples = int(tokens), int(samples)
        clock.start()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           opt.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        clock.lap("optimizer")
        return total_loss, tokens, samples

    def _share_weight(self, batch: dict, size: int) -> float:
        """This process's share of a batch split across processes: the factor on its loss (see
        `Distributed.share_weight`); a stand-in for an empty share weighs nothing."""
        count = self.stage.loss_count(batch) if size else 0
        return self.dist.share_weight(size if count is None else count)

    # -- data -------------------------------------------------------------------------------

    def data_loader(self) -> DataLoader:
        """The training batches: `self.sampler`'s order, read and collated by `data.num_workers` workers."""
        workers = self.num_workers
        collate = self.stage.collate if self.dist.world_size == 1 else partial(_collate_share, self.stage.collate)
        return DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            persistent_workers=workers > 0,  # kept across epochs: no restart (and no re-copied dataset) per epoch
            # Pinned batches copy to the GPU asynchronously. Without workers the pinning copy would sit in
            # the training loop itself, and frozen-tower features already live on the GPU there.
            pin_memory=self.device.type == "cuda" and workers > 0,
            # Its own generator: starting an iteration draws a worker seed, which must not come from
            # (and so shift) the global generator that the training step's randomness uses.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def next_batch(self) -> tuple[dict, int]:
        """Take batch number `state.batches_seen` of the stream: (the collated batch, its sample count).

        The batch is on the CPU when workers made it; the data position moves on by one batch. With
        several processes it is this process's share, and the count is the share's."""
        k = self.state.batches_seen
        size = len(self.sampler.batch(k))
        while True:
            if self._batches is None:
                if self._loader is None:
                    self._loader = self.data_loader()
                self.sampler.seek(self.state.batches_seen)  # a pass starts at the first batch not yet taken
                self._batches = iter(self._loader)
            try:
                batch = next(self._batches)
                break
            except StopIteration:  # end of the epoch: the next pass starts the next one
                self._batches = None
        if batch is None:  # an empty share of an epoch's short last batch
            batch = self._stand_in(k)
        self.state.batches_seen += 1
        self.state.samples_seen += len(self.sampler.global_batch(k))
        return batch, size

    def _stand_in(self, k: int) -> dict:
        """What a process whose share of batch `k` is empty trains on: the batch's first sample, weighted 0
        (the step must still run, since its gradient reduction is one the other processes wait for)."""
        first = self.sampler.global_batch(k)[0]
        return self.stage.collate([self.train_set[(first, k // self.sampler.per_epoch) if self.sampler.with_epoch
                                                  else first]])

    def close_data(self) -> None:
        """Stop the data workers (a later batch starts them again, at `state.batches_seen`)."""
        loader, self._loader, self._batches = self._loader, None, None
        workers = getattr(loader, "_iterator", None)  # persistent workers live in the loader's iterator
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()

    def _to_device(self, batch: dict) -> dict:
        return batch_to(batch, self.device, non_blocking=True)

    def _log(self, window: dict) -> dict:
        elapsed = max(1e-9, time.perf_counter() - window["start"])
        record = {
            "step": self.state.step,
            "loss": window["loss"] / max(1, window["steps"]),
            **self.stage.loss_terms(),  # its parts, for stages with several (qformer: itc, itm, itg)
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": window["tokens"] / elapsed,
            "samples_per_s": window["samples"] / elapsed,
            "samples_seen": self.state.samples_seen,
            # where a step's time went (ms per step: getting the batch to the device, forward + loss, backward,
            # optimizer)
            "ms_per_step": self.clock.read(window["steps"]),
            "time": time.time(),
        }
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def finish(self) -> dict:
        """Write the final model and evaluate it (the main process; the others return {})."""
        model = self.dist.full_model(self.model)  # gathered from the shards under FSDP
        if model is None:
            return {}
        with atomic_directory(self.run_dir / "model") as tmp:
            model.write(tmp, self.tokenizer)
        results = self.stage.evaluate(model, self.val_set) if self.val_set is not None else {}
        results.update(stage=self.cfg.stage, steps=self.state.step)
        write_json_atomic(self.run_dir / "stage_eval.json", results)
        plot_loss_curve(self.run_dir)
        return results

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        target = self.run_dir / "checkpoints" / f"step-{self.state.step:06d}"
        if self.dist.enabled:  # model + optimizer sharded by torch.distributed.checkpoint, the rest as below
            self.dist.save_checkpoint(target, self.model, self.optimizer, self._write_training_state)
        else:
            with atomic_directory(target) as tmp:
                self.model.write(tmp, self.tokenizer)
                self._write_training_state(tmp, optimizer=self.optimizer.state_dict())
        if self.dist.is_main:
            self._prune_checkpoints()
        return target

    def _write_training_state(self, directory: Path, **state) -> None:
        """Scheduler, RNG states and data position (+ `state`) into a checkpoint directory."""
        torch.save({
            **state,
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": self.dist.cuda_rng_states(),
            "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        }, directory / "training_state.pt")
        (directory / "trainer_state.json").write_text(json.dumps({
            **asdict(self.state), "python_rng": _jsonable(random.getstate()),
            "numpy_rng_pos": int(np.random.get_state()[2]),
            "sampler": self._sampler_state(),
        }))

    def _prune_checkpoints(self) -> None:
        ckpts = list_checkpoints(self.run_dir)
        for old in ckpts[: max(0, len(ckpts) - self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a checkpoint, written by this number of processes or another."""
        blob = torch.load(path / "training_state.pt", weights_only=True, map_location=self.device)
        if is_sharded_checkpoint(path):
            load_sharded_checkpoint(path, self.model, self.optimizer)
        elif self.dist.strategy == "fsdp":
            self.dist.load_plain_checkpoint(path, self.model, self.optimizer, blob["optimizer"])
        else:
            self.model.load_weights(path, self.device)  # with its LoRA adapters, if any
            self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        self.dist.set_cuda_rng_states([s.cpu() for s in blob["cuda_rng"]])
        meta = json.loads((path / "trainer_state.json").read_text())
        np.random.set_state(("MT19937", blob["numpy_rng"].cpu().numpy().astype(np.uint32), meta["numpy_rng_pos"]))
        random.setstate(_tupled(meta["python_rng"]))
        self.state = TrainState(step=meta["step"], batches_seen=meta["batches_seen"], samples_seen=meta["samples_seen"])
        self._load_sampler_state(meta, path)
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)

    def _sampler_state(self) -> dict:
        """The sampler's (epoch, position) at the next batch the model has not trained on (the loader
        may have fetched further ahead)."""
        self.sampler.seek(self.state.batches_seen)
        return self.sampler.state_dict()

    def _load_sampler_state(self, meta: dict, path: Path) -> None:
        self.close_data()  # batches fetched ahead belong to the old position
        if "sampler" not in meta:
            # Checkpoints written before the sampler state: the order is the same function of
            # (seed, batch index) and the batch count is the position.
            self.sampler.seek(self.state.batches_seen)
            return
        try:
            self.sampler.load_state_dict(meta["sampler"])
        except ValueError as err:
            raise ValueError(f"{path}: cannot resume the data order: {err}") from None
        if self.sampler.batches_done != self.state.batches_seen:
            raise ValueError(f"{path}: the sampler state (epoch {self.sampler.epoch}, batch {self.sampler.position}) "
                             f"disagrees with batches_seen {self.state.batches_seen}: the checkpoint is damaged")


def _collate_share(collate, samples: list):
    """Collate one process's share of a batch; an empty share (see `Trainer._stand_in`) is None."""
    return collate(samples) if samples else None


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def resume(run_dir: str | Path, overrides: list[str] = ()) -> Trainer:
    """A trainer restored from the newest checkpoint of `run_dir` (its run.yaml is the config)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "run.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {run_dir} is not a training run directory")
    cfg = load_run_config(config_path, overrides)
    trainer = Trainer(cfg, run_dir)
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        trainer.load_checkpoint(ckpts[-1])
        log.info("resuming %s from %s", run_dir, ckpts[-1].name)
    else:
        log.warning("no checkpoint in %s: starting from step 0", run_dir)
    return trainer


def plot_loss_curve(run_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curve (pip install 'vlmkit[report]')")
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
