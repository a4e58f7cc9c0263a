"""Pretrained parts from Hugging Face-format directories: vision towers, language models, tokenizers.

A directory holds `config.json` and safetensors weights, either one `model.safetensors` or shards
listed in `model.safetensors.index.json` (pickled `.bin` weights are refused: loading never
unpickles). Supported: CLIP / SigLIP / DINOv2 vision towers (tower-only or dual-encoder
checkpoints, whose text side is ignored) and Llama / Qwen2 language models (SmolLM2 is a Llama).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlmkit.config import ConfigError, LanguageConfig, ModelConfig, VisionConfig, from_dict, to_dict
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.hf.hub import (
    StateDict,
    WeightMappingError,
    lm_config_from_hf,
    lm_state_dict_from_hf,
    load_into,
    vision_config_from_hf,
    vision_family,
    vision_state_dict_from_hf,
)
from vlmkit.models import lora
from vlmkit.models.language import LanguageModel
from vlmkit.models.vision import ViT
from vlmkit.models.vlm import VisionLanguageModel

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a Hugging Face model directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists, or the single file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that are not there: {absent}")
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    pickled = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" ({', '.join(pickled)} are pickled weights, which are never loaded: convert them to safetensors)" \
        if pickled else ""
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {directory}{hint}")


def read_weights(directory: str | Path, keep: Callable[[str], bool] | None = None) -> StateDict:
    """All tensors of a checkpoint (or those whose key passes `keep`), on the CPU."""
    tensors: StateDict = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if keep is None or keep(key):
                    tensors[key] = f.get_tensor(key)
    return tensors


# -- vision ------------------------------------------------------------------------------------


def vision_config_from_dir(directory: str | Path, **overrides: Any) -> VisionConfig:
    """The ViT settings of a checkpoint, with `overrides` (e.g. select_layer=-1, image_size=224) on top.

    Image mean/std come from the directory's preprocessor_config.json when it has one.
    """
    directory = Path(directory)
    cfg = vision_config_from_hf(read_config(directory), str(directory / "config.json"))
    data = to_dict(cfg)
    preprocessor = directory / PREPROCESSOR_FILE
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        for key in ("image_mean", "image_std"):
            if isinstance(pre.get(key), list) and len(pre[key]) == 3:
                data[key] = tuple(pre[key])
    return from_dict(VisionConfig, {**data, "pretrained": str(directory), **overrides}, f"{directory}: vision")


def load_vision_weights(vit: ViT, directory: str | Path) -> None:
    """Load a CLIP / SigLIP / DINOv2 checkpoint's tower into `vit` (built with matching settings)."""
    directory = Path(directory)
    config = read_config(directory)
    family, _ = vision_family(config, str(directory / "config.json"))
    # A dual encoder's tower lives under `vision_model.`; its text side is not even read.
    dual = config.get("model_type") != family.tower_type
    state = read_weights(directory, keep=(lambda k: k.startswith("vision_model.")) if dual else None)
    load_into(vit, vision_state_dict_from_hf(state, str(directory), family), str(directory))


def tower_weights(directory: str | Path) -> StateDict:
    """The vision tower's weights (``vision.*``, prefix removed) of a vlmkit model directory: a
    clip- or dense-stage run's model or a VLM."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a vlmkit model directory?")
    adapted = lora.adapter_summary(directory)["layers"] if lora.has_adapter_files(directory) else []
    if any(name.startswith("vision.") for name in adapted):
        raise ValueError(f"{directory} holds LoRA adapters on its vision tower, which model.safetensors lacks: "
                         f"fold them in with `vlmkit merge {directory} OUT` and start from OUT")
    with safe_open(str(path), framework="pt") as f:
        weights = {key.removeprefix("vision."): f.get_tensor(key) for key in f.keys() if key.startswith("vision.")}
    if not weights:
        raise ValueError(f"{path} holds no vision tower (no vision.* weights)")
    return weights


def load_vision_tower(path: str | Path, **overrides: Any) -> ViT:
    """A vision tower from an HF directory (`clip_vision_model`, `clip`, `siglip_vision_model`,
    `siglip`, `dinov2`), in eval mode. `overrides` change VisionConfig fields such as `select_layer`,
    `keep_cls`, `image_size` (position embeddings are then interpolated)."""
    vit = ViT(vision_config_from_dir(path, **overrides))
    load_vision_weights(vit, path)
    return vit.eval()


# -- language ----------------------------------------------------------------------------------


def lm_config_from_dir(directory: str | Path, **overrides: Any) -> LanguageConfig:
    directory = Path(directory)
    cfg = lm_config_from_hf(read_config(directory), str(directory / "config.json"))
    return from_dict(LanguageConfig, {**to_dict(cfg), "pretrained": str(directory), **overrides},
                     f"{directory}: lm")


def load_lm_weights(lm: LanguageModel, directory: str | Path) -> None:
    """Load a Llama / Qwen2 checkpoint into `lm`.

    `lm` may have a larger vocabulary than the checkpoint (tokens added since, e.g. `<image>`): the
    new rows of the embeddings (and of an untied output layer) start at the mean of the existing
    ones, so new tokens begin as an average token rather than as noise.
    """
    directory = Path(directory)
    state = lm_state_dict_from_hf(read_weights(directory), str(directory))
    vocab = lm.config.vocab_size
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in state:
            state[key] = _grow_rows(state[key], vocab, f"{directory}: {key}")
    load_into(lm, state, str(directory))


def _grow_rows(weight: torch.Tensor, rows: int, source: str) -> torch.Tensor:
    if weight.shape[0] > rows:
        raise WeightMappingError(f"{source} has {weight.shape[0]} rows, more than the vocabulary size {rows}")
    if weight.shape[0] == rows:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def load_language_model(path: str | Path, **overrides: Any) -> LanguageModel:
    """A Llama / Qwen2 language model from an HF directory, in eval mode.

    `overrides` change LanguageConfig fields, e.g. `vocab_size` to make room for added tokens.
    """
    lm = LanguageModel(lm_config_from_dir(path, **overrides))
    load_lm_weights(lm, path)
    return lm.eval()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from `tokenizer.json` + `tokenizer_config.json` (special tokens, chat template)."""
    return Tokenizer.load(path)


def load_for_inference(path: str | Path, device: torch.device | str = "cpu", quantize: str | None = None
                       ) -> tuple[VisionLanguageModel | LanguageModel, Tokenizer, Path]:
    """What `vlmkit chat`, `eval`, `profile` and `serve` answer with: a vlmkit model or training run directory
    (its final model), or a Hugging Face language-model directory (text only). Returns the model in eval
    mode on `device`, its tokenizer and the directory they came from. `quantize` ("int8") quantizes the
    LM's linear layers after loading (see models/quantize.py)."""
    from vlmkit.models.checkpoint import resolve_model_dir
    from vlmkit.models.quantize import quantize_model

    model_dir = resolve_model_dir(path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'} not found: expected a vlmkit model or run directory, "
                                "or a Hugging Face language model directory")
    if read_config(model_dir).get("format") == VisionLanguageModel.FORMAT:
        model = VisionLanguageModel.from_pretrained(model_dir, device=device)
    else:
        model = load_language_model(model_dir).to(device)
    if quantize:
        quantize_model(model, quantize)
    return model.eval(), load_tokenizer(model_dir), model_dir


# -- VLMs from pretrained parts ----------------------------------------------------------------


def vision_config_from_section(section: dict[str, Any], where: str = "model.vision") -> VisionConfig:
    """A VisionConfig from a `model.vision` section: a checkpoint's settings when it names one
    (`pretrained: DIR`), overridden by the section's other keys."""
    section = dict(section)
    if section.get("pretrained"):
        section = {**to_dict(vision_config_from_dir(section["pretrained"])), **section}
    return from_dict(VisionConfig, section, where)


def model_config_from_parts(model: dict[str, Any], vocab_size: int, image_token_id: int,
                            where: str = "model") -> ModelConfig:
    """A ModelConfig from a run config's `model:` section whose `vision` and/or `lm` may name HF
    checkpoint directories (`pretrained: DIR`).

    A pretrained part's settings come from its checkpoint; the section's other keys override them
    (e.g. `select_layer`, `image_size`). The LM's vocabulary grows to `vocab_size` when the tokenizer
    has more tokens than the checkpoint (the added `<image>`); parts without `pretrained` are built
    from the section alone, with the tokenizer's vocabulary.
    """
    data = dict(model)
    data["vision"] = to_dict(vision_config_from_section(data.get("vision") or {}, f"{where}.vision"))
    lm = dict(data.get("lm") or {})
    if lm.get("pretrained"):
        base = to_dict(lm_config_from_dir(lm["pretrained"]))
        lm = {**base, **lm, "vocab_size": max(base["vocab_size"], vocab_size)}
    else:
        lm["vocab_size"] = vocab_size
    return ModelConfig.from_dict({**data, "lm": lm, "image_token_id": image_token_id}, where)


def build_vlm(cfg: ModelConfig) -> VisionLanguageModel:
    """A VisionLanguageModel whose vision tower and LM start from the checkpoints their configs name
    (`pretrained`), and from random weights otherwise; the connector always starts random."""
    model = VisionLanguageModel(cfg)
    if cfg.vision.pretrained:
        load_vision_weights(model.vision, cfg.vision.pretrained)
    if cfg.lm.pretrained:
        load_lm_weights(model.lm, cfg.lm.pretrained)
    return model
