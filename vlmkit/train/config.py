"""Run configuration: the settings of one stage's run, `--set key.sub=value` overrides, strict keys.

Reading a YAML file (a single-stage config or a multi-stage recipe) is `vlmkit.train.recipe`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmkit.config import ConfigError, LanguageConfig, ModelConfig, from_dict, to_dict

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DataConfig:
    root: str = "."  # image paths in the data files are relative to this directory
    train: str = "train.json"
    val: str | None = None
    max_length: int = 256  # longer samples are skipped (with a warning), never truncated
    strict: bool = False  # turn bad records into errors instead of skipping them
    caption_prompt: str = "Describe the image."  # align stage: the question a caption answers
    text_only: str | None = None  # instruct stage: text-only conversations mixed in (LLaVA format)
    # dense stage: train on this many shapes-world scenes generated on the fly (the spec and held-out
    # pairs of root/meta.json, another seed) instead of the annotated images of `train`
    fresh_scenes: int = 0
    flip: bool = False  # dense stage: mirror images left-right at random (boxes follow)
    # dense stage, fresh scenes: shares drawn in random non-palette colours / with shapes outside the
    # vocabulary, so that colour and shape are learnt apart (see vlmkit.data.scenes.SceneDataset.generated)
    recolor: float = 0.0
    other_shapes: float = 0.0
    # Frozen vision towers: keep their features on disk here (keyed by image content, tower weights,
    # preprocessing and layer), so each image goes through the tower once across runs. Unset: in memory.
    feature_cache: str | None = None
    # DataLoader worker processes that read and collate batches ahead of the training step. Unset: a
    # default for this machine (`default_num_workers`); 0 reads batches in the training process. The
    # batches are the same for every value (samples depend only on their index), so it never changes
    # a run's numbers, and a run may resume with another value.
    num_workers: int | None = None
    # align / instruct: lay each batch's samples end to end in rows of max_length tokens (first-fit
    # decreasing) instead of padding every row to the longest sample; the batches' samples and the loss
    # stay the same (see vlmkit.data.collate). Needs model.fusion: splice.
    packing: bool = False

    def __post_init__(self) -> None:
        if self.num_workers is not None and (
                isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ConfigError(f"data.num_workers: expected an integer >= 0 (or null for the machine's default), "
                              f"got {self.num_workers!r}")

    def resolved_num_workers(self) -> int:
        return default_num_workers() if self.num_workers is None else self.num_workers


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(cpus: int | None = None) -> int:
    """Workers for `data.num_workers: null`: 0 on 2 CPUs or fewer, else min(4, cpus - 1).

    On 2 cores a worker only takes time from the training step's own threads (the data work is small
    beside the forward and backward passes, and both cores are already busy with them); with more
    cores, a few workers hide the image decoding and collation, and one core stays with the training
    process. More than 4 rarely helps these datasets, whose images are decoded once at load time.
    """
    cpus = available_cpus() if cpus is None else cpus
    return 0 if cpus <= 2 else min(4, cpus - 1)


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    # Per-module learning rates (keys: vision, connector, fusion, lm, text, proj); unset modules use `lr`.
    module_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    train_vision: bool = False  # instruct stage: also fine-tune the vision tower (at module_lr.vision)
    # instruct stage: train the LM too; false keeps it frozen, so only the connector and the fusion's
    # blocks train (Flamingo: a frozen LM with trained cross-attention, model.fusion: cross_attention)
    train_lm: bool = True
    # Recompute each transformer block (LM, ViT, text tower) in the backward pass instead of keeping
    # its activations: less memory, about one more forward pass of compute (see vlmkit.models.memory).
    activation_checkpointing: bool = False
    # Low-rank adapters (peft) instead of full fine-tuning: {r, alpha, dropout, target_modules}, any key
    # may be left out (`{}`: the defaults of LoraSettings); null: off. See vlmkit.models.lora.
    lora: dict[str, Any] | None = None
    # torch.compile the model (inductor; needs a C++ compiler on CPU): faster steps after a start-up
    # compilation of tens of seconds per new batch shape.
    compile: bool = False

    def lora_settings(self) -> LoraSettings | None:
        return None if self.lora is None else from_dict(LoraSettings, self.lora, "optim.lora")


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021): each targeted linear layer W gets W + (alpha / r) * B A, with only A and B
    trained (B starts at 0, so training starts from the model as it was)."""

    r: int = 8  # rank of A [r, in] and B [out, r]
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input
    # Module names or glob patterns over them (`lm`, `connector`, `vision`, `lm.layers.*.attn.q_proj`):
    # every linear layer inside a matched module is adapted. The LM's output layer never is (it is
    # usually tied to the input embeddings).
    target_modules: list[str] = field(default_factory=lambda: ["lm"])

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r: expected an integer >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha: expected a number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            self.target_modules = targets = [targets]
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"target_modules: expected a list of module names, got {targets!r}")


@dataclass
class RunConfig:
    stage: str = "instruct"  # a registered stage (vlmkit.train.stages.STAGES)
    out: str = "runs/run"
    # A ModelConfig; `vision` and `lm` may each name an HF checkpoint (`pretrained: DIR`) to start from.
    model: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)  # clip stage: the text tower's LanguageConfig
    clip_embed_dim: int = 128
    dense: dict[str, Any] = field(default_factory=dict)  # dense stage: head options (box_weight, box_digits)
    qformer: dict[str, Any] = field(default_factory=dict)  # qformer stage: embed_dim, init_temperature, itg
    tokenizer: str | None = None  # directory with tokenizer.json (default: model.lm.pretrained)
    init_from: str | None = None  # a previous stage's run/model dir whose weights start this stage
    vision_from: str | None = None  # a clip-, dense- or qformer-stage run whose vision tower the model starts from
    connector_from: str | None = None  # a qformer-stage run whose Q-Former the VLM's qformer connector starts from
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "bf16"  # bf16 (autocast) | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N (several processes: each takes cuda:LOCAL_RANK)
    # How several processes (started by torchrun) share the training: ddp (replicas, gradients averaged)
    # | fsdp (parameters, gradients and optimizer state sharded) | none (one process) | auto (ddp when
    # torchrun started more than one process, else none). See vlmkit/train/distributed.py.
    strategy: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_samples: int = 256  # val examples used for the end-of-stage evaluation

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision: {self.precision!r} is not one of ['bf16', 'fp32']")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.optim.steps < 1 or self.optim.batch_size < 1 or self.optim.grad_accum < 1:
            raise ConfigError("optim.steps, optim.batch_size and optim.grad_accum must be >= 1")
        self.optim.betas = tuple(self.optim.betas)
        self.optim.lora_settings()  # a bad optim.lora section is an error now, not at the first step
        if not self.optim.train_lm and self.data.text_only:
            raise ConfigError("data.text_only: text-only conversations train nothing while the LM is frozen "
                              "(optim.train_lm: false); remove data.text_only or train the LM")

    def model_config(self, vocab_size: int, image_token_id: int) -> ModelConfig:
        from vlmkit.hf.pretrained import model_config_from_parts

        return model_config_from_parts(self.model, vocab_size, image_token_id)

    @property
    def pretrained_lm(self) -> str | None:
        lm = self.model.get("lm")
        return lm.get("pretrained") if isinstance(lm, dict) else None

    def text_config(self, vocab_size: int) -> LanguageConfig:
        return from_dict(LanguageConfig, {**self.text, "vocab_size": vocab_size}, "text")


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-3, true, null, [1, 2] all mean what they look like."""
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings to a nested dict (copying along the path)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = parse_value(value)
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def run_config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    return from_dict(RunConfig, data, where)


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    out = to_dict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out
