"""Training on several processes with PyTorch's own engine: torchrun starts one process per device,
`torch.distributed` connects them, and the model is replicated (DDP) or sharded (FSDP2).

    torchrun --nproc_per_node 4 -m vlmkit train --config demo --stage instruct --set strategy=fsdp

`optim.batch_size` stays the global batch: every process reads its own share of each global batch
(`ResumableBatchSampler` with rank and world size), so the data order and the schedule do not depend
on the number of processes. Each share's loss is weighted by what it averages over (`Stage.loss_count`,
e.g. labelled tokens), so the gradient that DDP or FSDP averages over the processes is the whole
batch's, as one process would compute it.

What lives here, so that the training loop stays readable:
- `Distributed.setup`: the process group (gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK), the
  checks (strategy, batch divisible by the processes, a stage that can split its batch);
- `Distributed.wrap`: DDP, or `fully_shard` on each transformer block then on the root (bf16 parameters
  with fp32 gradient reduction when `precision: bf16`);
- gradient sync over micro-batches, the loss weights, sums over processes for the logs;
- checkpoints with `torch.distributed.checkpoint` (sharded under FSDP: each process writes its part)
  that load into any number of processes, one-process runs included, and the final model gathered
  into a plain module for export and evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.config import ConfigError
from vlmkit.device import resolve_device
from vlmkit.io import atomic_directory
from vlmkit.models.language import DecoderLayer
from vlmkit.models.vision import ViT
from vlmkit.train.config import RunConfig

log = logging.getLogger("vlmkit.train")
SHARDED_METADATA = ".metadata"  # written by torch.distributed.checkpoint beside the shards


def launched_world_size() -> int | None:
    """Processes torchrun started (its WORLD_SIZE), or None when this process was not started by it."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def resolve_strategy(cfg: RunConfig, world_size: int | None) -> str:
    """`cfg.strategy` for this launch: none | ddp | fsdp (ConfigError when it does not fit the launch)."""
    launched = world_size is not None
    if cfg.strategy == "auto":
        return "ddp" if launched and world_size > 1 else "none"
    if cfg.strategy == "none" and launched and world_size > 1:
        raise ConfigError(f"strategy: none trains in one process, but torchrun started {world_size}; "
                          "set strategy to ddp, fsdp or auto")
    if cfg.strategy in ("ddp", "fsdp") and not launched:
        raise ConfigError(f"strategy: {cfg.strategy} runs one process per device, started by torchrun: "
                          f"torchrun --nproc_per_node N -m vlmkit train ... (or set strategy: none)")
    return cfg.strategy


def check_split(cfg: RunConfig, stage: type, world_size: int) -> None:
    """Refuse runs whose batches cannot be split across `world_size` processes."""
    if world_size > 1 and not stage.splits_across_ranks:
        raise ConfigError(f"strategy: the {stage.name} stage's loss compares each sample with every other of "
                          "the whole batch, which one process's share does not hold; train it in one process "
                          "(without torchrun)")
    if cfg.optim.batch_size % world_size:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is the global batch, split evenly across "
                          f"the {world_size} processes; make it a multiple of {world_size}")


@dataclass
class Distributed:
    """This process's place in the run; `strategy == "none"` is the one-process run (every method a no-op)."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_class: type | None = None  # the model's own class (FSDP turns the model into a subclass)
    _owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics, the final model and its evaluation; the others stay quiet."""
        return self.rank == 0

    @classmethod
    def setup(cls, cfg: RunConfig, stage: type) -> Distributed:
        """Join the process group torchrun describes (or stay one process), after checking the config."""
        world_size = launched_world_size()
        strategy = resolve_strategy(cfg, world_size)
        if strategy == "none":
            return cls(device=resolve_device(cfg.device))
        check_split(cfg, stage, world_size)
        if strategy == "fsdp" and cfg.optim.lora is not None:
            # The final model and one-process checkpoints are rebuilt from plain weights by name; an adapted
            # model's names (peft's `base_layer`, `lora_A`, ...) are not those.
            raise ConfigError("strategy: fsdp does not train optim.lora adapters; use strategy: ddp (the trained "
                              "adapters are small, so replicating them costs little) or remove optim.lora")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device)
        if device.type == "cuda":  # one device per process: the node's local rank picks it
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        rank = dist.get_rank()
        if rank != 0:
            logging.getLogger("vlmkit").setLevel(logging.ERROR)
        log.info("strategy %s: %d processes (%s), this one on %s", strategy, dist.get_world_size(),
                 dist.get_backend(), device)
        return cls(strategy, rank, dist.get_world_size(), device, _owns_group=owns)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def cuda_rng_states(self) -> list[torch.Tensor]:
        """CUDA RNG states for a checkpoint: every device's in one process; under torchrun this process's
        device's only (reading the others would start a CUDA context on every device)."""
        if not torch.cuda.is_available():
            return []
        if not self.enabled:
            return torch.cuda.get_rng_state_all()
        return [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []

    def set_cuda_rng_states(self, states: list[torch.Tensor]) -> None:
        if not states or not torch.cuda.is_available():
            return
        if not self.enabled:
            torch.cuda.set_rng_state_all(states)
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(states[0], self.device)

    # -- the model ----------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, precision: str, may_skip_weights: bool) -> nn.Module:
        """The module the training step calls: DDP around `model`, or `model` itself sharded in place
        (FSDP), or `model` unchanged in one process. Build the optimizer after this (FSDP replaces the
        parameters by sharded ones)."""
        self.model_class = type(model)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Frozen weights (requires_grad False) are not DDP's business; weights some batches leave
            # without a gradient are, and then DDP must look for them at every step.
            devices = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=devices, find_unused_parameters=may_skip_weights)
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if precision == "bf16" else MixedPrecisionPolicy())
            for block in shard_units(model, may_skip_weights):
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            if may_skip_weights:
                model.set_reduce_scatter_unused_params(True)
            return model
        return model

    @contextlib.contextmanager
    def gradient_sync(self, train_model: nn.Module, enabled: bool) -> Iterator[None]:
        """DDP reduces gradients in this forward/backward only when `enabled` (the last micro-batch of a
        step); the earlier ones accumulate locally. FSDP reduce-scatters after every micro-batch: it then
        keeps only sharded gradients between them (and torch's FSDP2 fails to accumulate unreduced bf16
        gradients for a unit that did not run, such as a frozen tower whose features are cached)."""
        if self.strategy == "ddp" and not enabled:
            with train_model.no_sync():
                yield
            return
        yield

    def share_weight(self, count: float) -> float:
        """The factor on this process's share loss (a mean over `count` items) that makes the average
        over processes of the gradients the gradient of the whole batch's mean: W * count / total."""
        total = self.sum_over_ranks(count)[0]
        return self.world_size * count / total if total > 0 else 0.0

    def sum_over_ranks(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The trained model as a plain module with full weights on the main process (None on the others):
        gathered from the shards under FSDP (a collective: every process calls it)."""
        if self.strategy != "fsdp":
            return model if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        plain = self.model_class(model.config)  # built the ordinary way: tied weights stay tied
        plain.load_state_dict(weights)
        return plain.to(self.device)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, target: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        write_extras: Callable[[Path], None]) -> None:
        """Model and optimizer state with torch.distributed.checkpoint (each process writes its own part),
        plus what `write_extras` writes (main process), into a directory that appears complete or not at all."""
        state = _dcp_state(model, optimizer)
        import torch.distributed.checkpoint as dcp

        if self.is_main:
            with atomic_directory(target) as tmp:
                self._broadcast(str(tmp))
                dcp.save(state, checkpoint_id=tmp)  # returns once every process has written its part
                write_extras(tmp)
        else:
            dcp.save(state, checkpoint_id=self._broadcast(None))
        dist.barrier()

    def load_plain_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                              optimizer_state: dict) -> None:
        """A one-process checkpoint (model.safetensors, optimizer state by parameter position) into a
        sharded model: every process reads the full tensors and keeps its shard."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names: dict[int, list[str]] = {}  # parameter -> its names (tied weights have several)
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        weights = load_file(str(path / "model.safetensors"), device=str(self.device))
        for aliases in names.values():  # the file holds a tied weight once, under one of its names
            present = next((weights[a] for a in aliases if a in weights), None)
            weights.update({a: present for a in aliases if a not in weights and present is not None})
        order = [names[id(p)][0] for group in optimizer.param_groups for p in group["params"]]
        by_name = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                    for g in optimizer_state["param_groups"]]}
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        # strict=False: weights that never had a gradient have no optimizer state, as in one process.
        set_optimizer_state_dict(model, optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True, strict=False))

    def _broadcast(self, value: str | None) -> str:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def shard_units(model: nn.Module, may_skip_weights: bool) -> list[nn.Module]:
    """FSDP units below the root: every LM decoder block and ViT block (one all-gather each, freed after
    use). When batches may skip weights, a trained tower's blocks that run (those up to the selected
    layer) join the root unit instead, so that no process waits for a block another one did not run (a
    share without images); the blocks that never run keep units of their own, which leaves them without
    a gradient, as in one process (the root would reduce zeros for them, and AdamW would decay them)."""
    units = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for tower in (m for m in model.modules() if isinstance(m, ViT)):
        trains = any(p.requires_grad for p in tower.parameters())
        runs = tower.config.num_selected_blocks
        units += list(tower.blocks[runs:] if may_skip_weights and trains else tower.blocks)
    return units


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint written by a multi-process run (torch.distributed.checkpoint), not by one process."""
    return (Path(path) / SHARDED_METADATA).is_file()


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_checkpoint` directory into `model` and `optimizer`, whatever the number of processes
    that wrote it and that read it now (one, without a process group, included): the tensors are
    re-cut to this run's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _dcp_state(model, optimizer)
    # Weights that never had a gradient (a tower's blocks past the selected layer) have no optimizer state
    # in the checkpoint; they keep none here either, as in an uninterrupted run.
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    moments = state["optimizer"]["state"]
    for name in [n for n, entries in moments.items() if any(f"optimizer.state.{n}.{k}" not in saved for k in entries)]:
        del moments[name]
    with warnings.catch_warnings():  # one process reading a multi-process checkpoint is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter name (DDP's `module.` prefix dropped), sharded
    as the model is."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    return {"model": weights, "optimizer": optim}
