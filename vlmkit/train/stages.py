"""Training stages, and the one registry of them (`STAGES`) that configs, `vlmkit train` and recipes read.

Each stage declares what it trains, what data it reads and which earlier stage's run it may start from,
and implements what model it builds, what it freezes, its datasets, its loss and how it scores itself.
`vlmkit train --list-stages` prints the table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vlmkit.config import ConfigError, from_dict, to_dict
from vlmkit.data.collate import collate, collate_image_text
from vlmkit.data.datasets import ConversationDataset, ImageTextDataset
from vlmkit.data.images import ImageProcessor
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.records import caption_records, read_records
from vlmkit.data.scenes import SceneDataset, collate_scenes, data_spec, read_scenes, scene_attributes, spec_attributes
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.device import batch_to
from vlmkit.hf.hub import load_into
from vlmkit.hf.pretrained import build_vlm, load_vision_weights, tower_weights, vision_config_from_section
from vlmkit.models.clip import ClipConfig, DualEncoder
from vlmkit.models.dense import DenseConfig, DenseTower, dense_metrics
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir
from vlmkit.train.config import RunConfig
from vlmkit.train.features import tower_features

log = logging.getLogger("vlmkit.train")


def freeze(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


class Stage:
    name = ""
    trains = ""  # what trains (and what is frozen), in words
    reads = ""  # the data it reads, in words
    # Run-config keys that may name an earlier stage of a recipe whose model this stage starts from.
    starts_from: tuple[str, ...] = ("init_from",)
    needs_tokenizer = True

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def data_path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else Path(self.cfg.data.root) / path

    # Each stage implements these.
    def build_model(self) -> nn.Module: ...
    def set_trainable(self, model: nn.Module) -> None: ...
    def datasets(self, model: nn.Module) -> tuple: ...
    def collate(self, batch: list) -> dict: ...
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module, val) -> dict: ...

    def start_tower_model(self, model: DualEncoder | DenseTower) -> DualEncoder | DenseTower:
        """A tower-pretraining model starts from a run of its own stage (`init_from`), else its tower
        from the HF checkpoint its config names (`model.vision.pretrained`), else from random weights."""
        if self.cfg.init_from:
            model.load_state_dict(type(model).from_pretrained(self.cfg.init_from).state_dict())
        elif model.config.vision.pretrained:
            load_vision_weights(model.vision, model.config.vision.pretrained)
        return model

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["text_mask"].sum())

    @staticmethod
    def train_mode(model: nn.Module) -> None:
        """Training mode for the parts that train; frozen parts stay in eval mode (a frozen conv stem's
        BatchNorm must keep its running statistics, and cached features were computed in eval mode)."""
        model.train()
        for part in model.children():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()


STAGES: dict[str, type[Stage]] = {}


def register(stage: type[Stage]) -> type[Stage]:
    """Make a stage known by its name to configs, `vlmkit train` and recipes."""
    if stage.name in STAGES:
        raise ValueError(f"a stage named {stage.name!r} is already registered ({STAGES[stage.name].__name__})")
    STAGES[stage.name] = stage
    return stage


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ConfigError(f"stage: {name!r} is not one of {list(STAGES)}")
    return STAGES[name]


@register
class ClipStage(Stage):
    name = "clip"
    trains = "a vision tower + a small text tower, contrastive (symmetric InfoNCE); everything trains"
    reads = "image-caption pairs (JSON Lines)"

    def build_model(self) -> DualEncoder:
        vision = self.cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.image_id or 0).vision
        model_cfg = ClipConfig(vision=vision, text=self.cfg.text_config(self.tokenizer.vocab_size),
                               embed_dim=self.cfg.clip_embed_dim)
        model = DualEncoder(model_cfg)
        return self.start_tower_model(model)

    def set_trainable(self, model: nn.Module) -> None:
        freeze(model, True)

    def datasets(self, model: DualEncoder) -> tuple:
        processor = ImageProcessor.from_vision_config(model.config.vision)
        make = lambda name: ImageTextDataset(  # noqa: E731
            self.data_path(name), self.cfg.data.root, self.tokenizer, processor,
            max_text_length=self.cfg.data.max_length, strict=self.cfg.data.strict)
        return make(self.cfg.data.train), make(self.cfg.data.val) if self.cfg.data.val else None

    def collate(self, batch: list) -> dict:
        return collate_image_text(batch, self.tokenizer.pad_id)

    def loss(self, model: DualEncoder, batch: dict) -> torch.Tensor:
        return model(batch["pixel_values"], batch["text_ids"], batch["text_mask"])

    @torch.no_grad()
    def evaluate(self, model: DualEncoder, val) -> dict:
        return clip_retrieval(model, val, self.tokenizer, self.cfg.eval_samples)


@torch.no_grad()
def clip_retrieval(model: DualEncoder, dataset, tokenizer: Tokenizer, limit: int) -> dict:
    """Zero-shot image->text retrieval on `limit` distinct images: is the image's own caption the best?"""
    model.eval()
    seen: dict[str, int] = {}
    for i in range(len(dataset)):
        seen.setdefault(dataset.image_key(i), i)
        if len(seen) >= limit:
            break
    items = [dataset[i] for i in seen.values()]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_image_text(items, tokenizer.pad_id).items()}
    sims = model.encode_image(batch["pixel_values"]) @ model.encode_text(batch["text_ids"], batch["text_mask"]).t()
    targets = torch.arange(len(items), device=device)
    top5 = sims.topk(min(5, len(items)), dim=1).indices
    return {
        "retrieval_top1": float((sims.argmax(dim=1) == targets).float().mean()),
        "retrieval_top5": float((top5 == targets[:, None]).any(dim=1).float().mean()),
        "retrieval_candidates": len(items),
    }


@register
class DenseStage(Stage):
    """The vision tower (+ throw-away per-cell heads) on object annotations: what is where, per cell."""

    name = "dense"
    trains = "the vision tower + per-cell heads (objectness, attributes, box); everything trains"
    reads = "object annotations (shapes-world scenes.jsonl), or scenes generated on the fly"
    needs_tokenizer = False

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer | None):
        super().__init__(cfg, tokenizer)
        data = cfg.data
        if data.fresh_scenes:
            self.spec, self.synth_seed = data_spec(data.root)
            self.attributes = spec_attributes(self.spec)
        else:
            self.rows = {"train": read_scenes(self.data_path(data.train), "train")}
            if data.val:
                self.rows["val"] = read_scenes(self.data_path(data.val), "val")
            self.attributes = scene_attributes(self.rows["train"])

    def build_model(self) -> DenseTower:
        vision = vision_config_from_section(self.cfg.model.get("vision") or {})
        options = {k: v for k, v in self.cfg.dense.items() if k not in ("vision", "attributes")}
        model = DenseTower(from_dict(DenseConfig, {**options, "vision": to_dict(vision), "attributes": self.attributes},
                                     "dense"))
        return self.start_tower_model(model)

    def set_trainable(self, model: nn.Module) -> None:
        freeze(model, True)

    def datasets(self, model: DenseTower) -> tuple:
        vision = model.config.vision
        processor, grid = ImageProcessor.from_vision_config(vision), (vision.grid_size, vision.grid_size)
        data = self.cfg.data
        if data.fresh_scenes:
            # Seeds apart from the synth seed: these scenes are neither the split's nor each other's.
            seed = self.synth_seed * 7919 + 104729
            train = SceneDataset.generated(self.spec, seed, data.fresh_scenes, processor, grid, data.flip,
                                           data.recolor, data.other_shapes, flip_seed=self.cfg.seed)
            val = SceneDataset.generated(self.spec, seed + 1, self.cfg.eval_samples, processor, grid)
            return train, val
        make = lambda split, flip: SceneDataset.from_rows(  # noqa: E731
            self.rows[split], data.root, processor, self.attributes, grid, flip, flip_seed=self.cfg.seed)
        return make("train", data.flip), make("val", False) if "val" in self.rows else None

    def collate(self, batch: list) -> dict:
        return collate_scenes(batch)

    def loss(self, model: DenseTower, batch: dict) -> torch.Tensor:
        return model(**batch)["loss"]

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int(batch["objectness"].numel())  # patch cells

    @torch.no_grad()
    def evaluate(self, model: DenseTower, val) -> dict:
        model.eval()
        n = min(len(val), self.cfg.eval_samples)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate_scenes([val[i] for i in range(n)]).items()}
        return {**dense_metrics(model.predict(batch["pixel_values"]), batch["objectness"], batch["classes"],
                                batch["boxes"], list(model.config.attributes)), "val_samples": n}


class VLMStage(Stage):
    """Shared by align and instruct: a VisionLanguageModel on conversations.

    A pretrained tokenizer without the `<image>` placeholder gets it added (the LM's vocabulary grows
    by one row to match; see `model_config_from_parts`).
    """

    starts_from = ("init_from", "vision_from")

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        if tokenizer.add_image_token():
            log.info("added %s to the tokenizer as id %d", tokenizer.image_token, tokenizer.image_id)

    def build_model(self) -> VisionLanguageModel:
        if self.cfg.init_from:
            return VisionLanguageModel.from_pretrained(self.cfg.init_from)
        model_cfg = self.cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.image_id)
        if self.cfg.vision_from and model_cfg.vision.pretrained:
            raise ConfigError("set either vision_from (a clip- or dense-stage run) or model.vision.pretrained, "
                              "not both")
        model = build_vlm(model_cfg)
        if self.cfg.vision_from:
            source = resolve_model_dir(self.cfg.vision_from)
            load_into(model.vision, tower_weights(source), f"{source}: vision")
        return model

    def records(self, name: str):
        return read_records(self.data_path(name), strict=self.cfg.data.strict)

    def make_dataset(self, model: VisionLanguageModel, records) -> ConversationDataset:
        # The dataset resizes every image to the configured size, so each <image> gets that size's count.
        processor = VLMProcessor.for_model(model, self.tokenizer)
        records, report = records
        return ConversationDataset.from_records(
            records, report, self.cfg.data.root, processor.chat, processor.image_processor,
            max_length=self.cfg.data.max_length, strict=self.cfg.data.strict)

    def datasets(self, model: VisionLanguageModel) -> tuple:
        train = self.make_dataset(model, self.records(self.cfg.data.train))
        val = self.make_dataset(model, self.records(self.cfg.data.val)) if self.cfg.data.val else None
        if not any(p.requires_grad for p in model.vision.parameters()):
            for dataset in (train, val):
                if dataset is not None:
                    self.attach_features(model, dataset)
        return train, val

    def attach_features(self, model: VisionLanguageModel, dataset: ConversationDataset) -> None:
        """A frozen tower runs once per distinct image (and, with data.feature_cache, once across runs).

        The features stay on the model's device when batches are assembled in the training process;
        DataLoader workers get them in CPU memory (inherited, or shared when workers are spawned),
        and batches travel to the device like pixel batches."""
        if not len(dataset.image_pixels):
            return  # text only
        features = tower_features(model.vision, dataset.processor, dataset.image_pixels,
                                  precision=self.cfg.precision, cache_dir=self.cfg.data.feature_cache)
        dataset.use_features(features.cpu() if self.cfg.data.resolved_num_workers() else features)

    def collate(self, batch: list) -> dict:
        return collate(batch, self.tokenizer.pad_id)

    def loss(self, model: VisionLanguageModel, batch: dict) -> torch.Tensor:
        # Right padding + causal attention: padding never influences real tokens, so no mask is
        # needed and the fast causal kernel is used.
        return model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                     image_counts=batch["image_counts"], logits=False,
                     image_features=batch.get("image_features")).loss

    @torch.no_grad()
    def evaluate(self, model: VisionLanguageModel, val) -> dict:
        model.eval()
        n = min(len(val), self.cfg.eval_samples)
        device = next(model.parameters()).device
        total, batches = 0.0, 0
        for start in range(0, n, 32):
            batch = batch_to(self.collate([val[i] for i in range(start, min(n, start + 32))]), device)
            total += float(self.loss(model, batch))
            batches += 1
        return {"val_loss": total / max(1, batches), "val_samples": n}


@register
class AlignStage(VLMStage):
    name = "align"
    trains = "the connector and the fusion's blocks, if any (vision tower and LM frozen)"
    reads = "image-caption pairs, as \"Describe the image.\" -> caption"

    def set_trainable(self, model: VisionLanguageModel) -> None:
        freeze(model, False)
        freeze(model.connector, True)
        freeze(model.fusion, True)  # a fusion's adapters (none for splice) train with the connector

    def records(self, name: str):
        return caption_records(self.data_path(name), prompt=self.cfg.data.caption_prompt, strict=self.cfg.data.strict)


@register
class InstructStage(VLMStage):
    name = "instruct"
    trains = ("connector + fusion blocks + LM (the LM stays frozen with optim.train_lm: false; "
              "+ the vision tower with optim.train_vision)")
    reads = "conversations (LLaVA JSON), optionally text-only ones mixed in"

    def set_trainable(self, model: VisionLanguageModel) -> None:
        freeze(model.vision, self.cfg.optim.train_vision)
        freeze(model.connector, True)
        freeze(model.fusion, True)
        freeze(model.lm, self.cfg.optim.train_lm)

    def datasets(self, model: VisionLanguageModel) -> tuple:
        train, val = super().datasets(model)
        if self.cfg.data.text_only:
            extra = self.make_dataset(model, self.records(self.cfg.data.text_only))
            train = torch.utils.data.ConcatDataset([train, extra])
        return train, val


def stage_table() -> str:
    """The registered stages as a markdown table (`vlmkit train --list-stages`)."""
    rows = ["| stage | trains | reads | may start from |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.trains} | {s.reads} | {', '.join(f'`{k}`' for k in s.starts_from)} |"
             for s in STAGES.values()]
    return "\n".join(rows)
