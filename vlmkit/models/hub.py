"""Mapping between Hugging Face checkpoint formats and vlmkit modules (configs and weight names).

Pure functions on dicts: no `transformers` import. A rule table per family renames HF keys to ours;
keys no rule covers are reported, never silently dropped.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlmkit.config import ConfigError, LanguageConfig, VisionConfig

LM_TYPES = ("llama", "qwen2")
VISION_TYPES = ("clip", "clip_vision_model")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

Rules = list[tuple[str, str]]

LM_RULES: Rules = [
    (r"^model\.embed_tokens\.", "embed_tokens."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "lm_head."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"layers.\1.attn.\2_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"layers.\1.mlp.\2_proj."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.input_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.post_attention_norm."),
]

CLIP_VISION_RULES: Rules = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.proj."),
    (r"^embeddings\.position_embedding\.weight$", "embeddings.position_embedding"),
    (r"^pre_layrnorm\.", "pre_layernorm."),
    (r"^post_layernorm\.", "post_layernorm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.", r"blocks.\1.attn.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
]

# Buffers some HF versions store that carry no learned information.
IGNORED_KEYS = (r"\.position_ids$", r"rotary_emb\.inv_freq$")


class WeightMappingError(ValueError):
    """Checkpoint weights do not fit the module: lists what is missing or unexpected."""


StateDict = dict[str, torch.Tensor]


def rename_keys(state_dict: StateDict, rules: Rules, source: str = "checkpoint") -> StateDict:
    """Apply the first matching rule to every key; keys no rule matches are an error."""
    renamed, unmatched = {}, []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in IGNORED_KEYS):
            continue
        for pattern, replacement in rules:
            new, count = re.subn(pattern, replacement, key)
            if count:
                renamed[new] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise WeightMappingError(f"{source}: unexpected weights {_preview(unmatched)}")
    return renamed


def load_into(module: torch.nn.Module, state_dict: StateDict, source: str = "checkpoint") -> None:
    """Strict load with a readable error listing missing and unexpected weights."""
    expected = set(module.state_dict())
    tied = {"lm_head.weight"} if getattr(getattr(module, "config", None), "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise WeightMappingError(
            f"{source}: missing weights {_preview(missing)}; unexpected weights {_preview(unexpected)}"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(module.state_dict()[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(module.state_dict()[k].shape)
    ]
    if mismatched:
        raise WeightMappingError(f"{source}: shape mismatch: {_preview(mismatched)}")
    module.load_state_dict(state_dict, strict=False)


def _preview(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


def _require(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{source}: config has no {key!r}")
    return cfg[key]


def _rope_theta(cfg: dict[str, Any], source: str) -> float:
    # transformers >= 5 keeps RoPE settings under `rope_parameters`; older versions at top level.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def lm_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> LanguageConfig:
    model_type = cfg.get("model_type")
    if model_type not in LM_TYPES:
        raise ConfigError(f"{source}: unsupported language model_type {model_type!r}; supported: {list(LM_TYPES)}")
    if cfg.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    heads = _require(cfg, "num_attention_heads", source)
    hidden = _require(cfg, "hidden_size", source)
    return LanguageConfig(
        vocab_size=_require(cfg, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_require(cfg, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=_require(cfg, "intermediate_size", source),
        rope_theta=_rope_theta(cfg, source),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
    )


def vision_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> VisionConfig:
    model_type = cfg.get("model_type")
    if model_type == "clip":  # a full CLIP checkpoint: the tower's settings are nested
        cfg = {**cfg.get("vision_config", {}), "model_type": "clip_vision_model"}
        model_type = "clip_vision_model"
    if model_type not in VISION_TYPES:
        raise ConfigError(f"{source}: unsupported vision model_type {model_type!r}; supported: {list(VISION_TYPES)}")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported hidden_act {act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    return VisionConfig(
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 32),
        num_channels=cfg.get("num_channels", 3),
        hidden_size=cfg.get("hidden_size", 768),
        num_layers=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12),
        intermediate_size=cfg.get("intermediate_size", 3072),
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        use_cls_token=True,
        patch_bias=False,
        pre_layernorm=True,
        post_layernorm=True,
        feature_norm=False,
        select_layer=-2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def lm_state_dict_from_hf(state_dict: StateDict, source: str = "checkpoint") -> StateDict:
    return rename_keys(state_dict, LM_RULES, source)


def vision_state_dict_from_hf(state_dict: StateDict, source: str = "checkpoint") -> StateDict:
    # A full CLIP checkpoint (and older CLIPVisionModel saves) nest the tower under `vision_model.`;
    # the text tower and projections beside it are not needed.
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return rename_keys(state_dict, CLIP_VISION_RULES, source)
