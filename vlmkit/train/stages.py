"""Training stages, and the one registry of them (`STAGES`) that configs, `vlmkit train` and recipes read.

Each stage declares what it trains, what data it reads and which earlier stage's run it may start from,
and implements what model it builds, what it freezes, its datasets, its loss and how it scores itself.
`vlmkit train --list-stages` prints the table.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from vlmkit.config import ConfigError, VideoConfig, VisionConfig, from_dict, to_dict
from vlmkit.constants import IGNORE_INDEX
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
from vlmkit.models.qformer_pretraining import QFormerPretrainer, QFormerPretrainingConfig
from vlmkit.models.vision import ViT
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir
from vlmkit.train.config import RunConfig
from vlmkit.train.features import tower_features

log = logging.getLogger("vlmkit.train")
TowerModel = TypeVar("TowerModel", DualEncoder, DenseTower, QFormerPretrainer)  # models trained around a tower


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
    # Whether a batch may be split across processes (strategy ddp / fsdp): each computes the loss on its
    # share and the shares are weighted by `loss_count`. Not for losses that compare the samples of a
    # batch with each other (contrastive): a share alone does not give them.
    splits_across_ranks = True
    packs = False  # whether its collate can pack samples into rows (`data.packing`)

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        if cfg.data.packing and not self.packs:
            packing = [name for name, stage in STAGES.items() if stage.packs]
            raise ConfigError(f"data.packing: the {self.name} stage does not pack samples (stages that do: "
                              f"{', '.join(packing)}); remove data.packing")

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

    def check_tower_source(self, vision: VisionConfig) -> None:
        if self.cfg.vision_from and vision.pretrained:
            raise ConfigError("set either vision_from (a clip-, dense- or qformer-stage run) or "
                              "model.vision.pretrained, not both")

    def loss_terms(self) -> dict[str, float]:
        """Parts of the loss logged beside it: their means over the micro-batches since the last call."""
        return {}

    def loss_count(self, batch: dict) -> int | None:
        """What the loss is a mean over in `batch`, when that is not its samples (the VLM stages: labelled
        tokens). A batch split across processes weighs each share's loss by it, so that the gradient is
        the whole batch's."""
        return None

    def may_skip_weights(self, model: nn.Module, train_set) -> bool:
        """Whether a batch's loss may leave trainable weights without a gradient (e.g. a text-only batch
        skips the connector, a trained tower its blocks past the selected layer). DDP then looks for
        unused weights at every step, and FSDP reduces zeros for them, so that processes whose shares
        use different weights stay in step."""
        return any(tower_skips_weights(m) for m in model.modules() if isinstance(m, ViT))

    def start_tower_model(self, model: TowerModel) -> TowerModel:
        """A tower-pretraining model starts from a run of its own stage (`init_from`), else its tower
        from an earlier run (`vision_from`, for stages that take it) or from the HF checkpoint its
        config names (`model.vision.pretrained`), else from random weights."""
        if self.cfg.init_from:
            model.load_state_dict(type(model).from_pretrained(self.cfg.init_from).state_dict())
        elif self.cfg.vision_from:
            self.check_tower_source(model.config.vision)
            load_tower_from_run(model.vision, self.cfg.vision_from)
        elif model.config.vision.pretrained:
            load_vision_weights(model.vision, model.config.vision.pretrained)
        return model

    @staticmethod
    def count_tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["text_mask"].sum())

    @staticmethod
    def train_mode(model: nn.Module) -> None:
        """Training mode for what trains; frozen modules stay in eval mode (a frozen conv stem's BatchNorm
        must keep its running statistics, also under a tower that trains LoRA adapters, and cached
        features were computed in eval mode). Modules without weights (dropout) follow their parent."""
        model.train()
        for module in model.modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


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


def tower_skips_weights(tower: ViT) -> bool:
    """Whether a trained tower has weights its features never reach: blocks past the selected layer, or
    a final norm the features skip."""
    cfg = tower.config
    unused = cfg.num_selected_blocks < cfg.num_layers or (tower.post_layernorm is not None and not cfg.feature_norm)
    return unused and any(p.requires_grad for p in tower.parameters())


def load_tower_from_run(vision: ViT, run: str | Path) -> None:
    """Load the vision tower of an earlier run (any vlmkit model directory holding one) into `vision`."""
    source = resolve_model_dir(run)
    load_into(vision, tower_weights(source), f"{source}: vision")


@register
class ClipStage(Stage):
    name = "clip"
    trains = "a vision tower + a small text tower, contrastive (symmetric InfoNCE); everything trains"
    reads = "image-caption pairs (JSON Lines)"
    splits_across_ranks = False  # each image against every caption of the whole batch

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
        return caption_retrieval(model, retrieval_batch(model, val, self.tokenizer, self.cfg.eval_samples))


def retrieval_batch(model: nn.Module, dataset, tokenizer: Tokenizer, limit: int) -> dict:
    """One caption (the first) of each of `limit` distinct images of a caption dataset, collated on the
    model's device."""
    seen: dict[str, int] = {}
    for i in range(len(dataset)):
        seen.setdefault(dataset.image_key(i), i)
        if len(seen) >= limit:
            break
    device = next(model.parameters()).device
    return batch_to(collate_image_text([dataset[i] for i in seen.values()], tokenizer.pad_id), device)


@torch.no_grad()
def caption_retrieval(model: DualEncoder | QFormerPretrainer, batch: dict) -> dict:
    """Zero-shot image->text retrieval among a `retrieval_batch`: is the image's own caption the best?"""
    model.eval()
    sims = model.similarity(batch["pixel_values"], batch["text_ids"], batch["text_mask"])
    targets = torch.arange(len(sims), device=sims.device)
    top5 = sims.topk(min(5, len(sims)), dim=1).indices
    return {
        "retrieval_top1": float((sims.argmax(dim=1) == targets).float().mean()),
        "retrieval_top5": float((top5 == targets[:, None]).any(dim=1).float().mean()),
        "retrieval_candidates": len(sims),
    }


@register
class DenseStage(Stage):
    """The vision tower (+ throw-away per-cell heads) on object annotations: what is where, per cell."""

    name = "dense"
    trains = "the vision tower + per-cell heads (objectness, attributes, box); everything trains"
    reads = "object annotations (shapes-world scenes.jsonl), or scenes generated on the fly"
    needs_tokenizer = False
    # Split across processes, each share's loss is weighted by its samples: exactly the whole batch's
    # for the objectness term (a mean over all cells), close for the attribute and box terms (means over
    # each share's own object cells).

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


@register
class QFormerStage(ClipStage):
    """BLIP-2 stage 1: the Q-Former learns from captions what to read from a frozen tower, before any LM."""

    name = "qformer"
    trains = "the Q-Former (queries, layers, text path) + ITC / ITM / ITG heads, against a frozen vision tower"
    reads = "image-caption pairs (JSON Lines), as the clip stage"
    starts_from = ("init_from", "vision_from")
    SET_BY_STAGE = ("vision", "connector", "vocab_size", "max_text_length")

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        self._terms: dict[str, list[float]] = {}

    def build_model(self) -> QFormerPretrainer:
        taken = sorted(set(self.cfg.qformer) & set(self.SET_BY_STAGE))
        if taken:
            raise ConfigError(f"qformer: {taken} come from model.vision, model.connector, the tokenizer and "
                              "data.max_length; remove them from the qformer section")
        model_cfg = self.cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.image_id or 0)
        cfg = from_dict(QFormerPretrainingConfig, {
            **self.cfg.qformer, "vision": to_dict(model_cfg.vision), "connector": to_dict(model_cfg.connector),
            "vocab_size": self.tokenizer.vocab_size, "max_text_length": self.cfg.data.max_length + 1}, "qformer")
        return self.start_tower_model(QFormerPretrainer(cfg))

    def set_trainable(self, model: QFormerPretrainer) -> None:
        freeze(model, True)
        freeze(model.vision, False)

    def loss(self, model: QFormerPretrainer, batch: dict) -> torch.Tensor:
        out = model(batch["pixel_values"], batch["text_ids"], batch["text_mask"], batch.get("image_ids"))
        for key in ("itc", "itm", "itg", "itm_accuracy"):
            if key in out:
                self._terms.setdefault(key, []).append(float(out[key].detach()))
        return out["loss"]

    def loss_terms(self) -> dict[str, float]:
        terms = {key: sum(values) / len(values) for key, values in self._terms.items()}
        self._terms = {}
        return terms

    @torch.no_grad()
    def evaluate(self, model: QFormerPretrainer, val) -> dict:
        batch = retrieval_batch(model, val, self.tokenizer, self.cfg.eval_samples)
        results = caption_retrieval(model, batch)
        results.update({f"val_{key}": float(value) for key, value in model(**batch).items()})
        return results


def load_pretrained_qformer(model: VisionLanguageModel, run: str | Path) -> None:
    """Start a VLM's `qformer` connector from a qformer-stage run: its queries and layers (the projection to
    the LM starts anew). That Q-Former learnt to read one tower's features, so the VLM's tower must be
    that tower (`vision_from` the same run, or the tower that run started from)."""
    source = resolve_model_dir(run)
    pretrained = QFormerPretrainer.from_pretrained(source)
    ours, theirs = model.config.connector, pretrained.config.connector
    if ours.name != "qformer":
        raise ConfigError(f"connector_from: {source} holds a Q-Former, but model.connector.name is {ours.name!r}; "
                          "set it to qformer")
    differ = [f"{key} {getattr(theirs, key)} vs {getattr(ours, key)}"
              for key in ("num_queries", "num_layers", "num_heads", "cross_attention_frequency")
              if getattr(theirs, key) != getattr(ours, key)]
    if pretrained.qformer.hidden_size != model.connector.qformer.hidden_size:
        differ.append(f"hidden_size {pretrained.qformer.hidden_size} vs {model.connector.qformer.hidden_size}")
    if differ:
        raise ConfigError(f"connector_from: the Q-Former of {source} differs from model.connector "
                          f"(the run's vs this model's): {', '.join(differ)}")
    tower, trained_on = model.vision.state_dict(), pretrained.vision.state_dict()
    features = ("select_layer", "keep_cls", "feature_norm")
    same_tower = tower.keys() == trained_on.keys() and all(
        tower[k].shape == v.shape and torch.equal(tower[k], v.to(tower[k].device)) for k, v in trained_on.items())
    if not same_tower or any(getattr(model.config.vision, f) != getattr(pretrained.config.vision, f) for f in features):
        raise ConfigError(f"connector_from: the Q-Former of {source} learnt to read another vision tower's features "
                          f"than this model's ({', '.join(features)} and weights must match); start the tower from "
                          f"the same run (vision_from: {run}) or from the one that run started from")
    load_into(model.connector.qformer, pretrained.qformer.query_state_dict(), f"{source}: qformer")


class VLMStage(Stage):
    """Shared by align and instruct: a VisionLanguageModel on conversations.

    A pretrained tokenizer without the `<image>` placeholder gets it added (the LM's vocabulary grows
    by one row to match; see `model_config_from_parts`).
    """

    starts_from = ("init_from", "vision_from", "connector_from")
    packs = True

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        if cfg.init_from and cfg.connector_from:
            raise ConfigError("connector_from: a run started with init_from already has its connector; set one of them")
        if tokenizer.add_image_token():
            log.info("added %s to the tokenizer as id %d", tokenizer.image_token, tokenizer.image_id)

    def build_model(self) -> VisionLanguageModel:
        model = self.start_model()
        if self.cfg.data.packing and model.config.fusion != "splice":
            raise ConfigError(f"data.packing needs model.fusion: splice; with {model.config.fusion!r} a packed "
                              "sample's text would read the images of the samples before it in its row")
        return model

    def start_model(self) -> VisionLanguageModel:
        if self.cfg.init_from:
            model = VisionLanguageModel.from_pretrained(self.cfg.init_from)
            if "video" in self.cfg.model:  # how clips are sampled is no part of the weights: the run's setting wins
                video = from_dict(VideoConfig, self.cfg.model["video"] or {}, "model.video")
                model.config = dataclasses.replace(model.config, video=video)  # validated again
            return model
        model_cfg = self.cfg.model_config(self.tokenizer.vocab_size, self.tokenizer.image_id)
        self.check_tower_source(model_cfg.vision)
        model = build_vlm(model_cfg)
        if self.cfg.vision_from:
            load_tower_from_run(model.vision, self.cfg.vision_from)
        if self.cfg.connector_from:
            load_pretrained_qformer(model, self.cfg.connector_from)
        return model

    def records(self, name: str):
        return read_records(self.data_path(name), strict=self.cfg.data.strict)

    def make_dataset(self, model: VisionLanguageModel, records) -> ConversationDataset:
        # The dataset resizes every image to the configured size, so each <image> gets that size's count;
        # AnyRes tiles instead, and counts each image by its own size.
        processor = VLMProcessor.for_model(model, self.tokenizer)
        records, report = records
        return ConversationDataset.from_records(
            records, report, self.cfg.data.root, processor.chat, processor.image_processor,
            max_length=self.cfg.data.max_length, strict=self.cfg.data.strict,
            image_tokens=processor.image_tokens if processor.tiling else None, video=processor.video)

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
        return collate(batch, self.tokenizer.pad_id, self.cfg.data.max_length if self.cfg.data.packing else None)

    def loss_count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the next-token targets the loss averages

    def may_skip_weights(self, model: VisionLanguageModel, train_set) -> bool:
        # A sample without an image skips the tower and the connector.
        return super().may_skip_weights(model, train_set) or not every_sample_has_an_image(train_set)

    def loss(self, model: VisionLanguageModel, batch: dict) -> torch.Tensor:
        # Right padding + causal attention: padding never influences real tokens, so no mask is
        # needed and the fast causal kernel is used. Packed rows bring their segments: the LM then runs
        # on their real tokens only, attending within each sample (see vlmkit.models.language.Varlen).
        return model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                     image_counts=batch["image_counts"], logits=False,
                     image_features=batch.get("image_features"), image_sizes=batch.get("image_sizes"),
                     image_frames=batch.get("image_frames"), segment_ids=batch.get("segment_ids")).loss

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


def every_sample_has_an_image(dataset) -> bool:
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return all(every_sample_has_an_image(part) for part in dataset.datasets)
    return len(dataset) > 0 and int(dataset.images_per_sample.min()) > 0


@register
class AlignStage(VLMStage):
    name = "align"
    trains = "the connector and the fusion's blocks, if any, + AnyRes' newline (vision tower and LM frozen)"
    reads = "image-caption pairs, as \"Describe the image.\" -> caption"

    def set_trainable(self, model: VisionLanguageModel) -> None:
        freeze(model, False)
        freeze(model.connector, True)
        freeze(model.fusion, True)  # a fusion's adapters (none for splice) train with the connector
        if model.anyres is not None:
            freeze(model.anyres, True)  # AnyRes' newline embedding, too (as LLaVA-NeXT)

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
        if model.anyres is not None:
            freeze(model.anyres, True)
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
