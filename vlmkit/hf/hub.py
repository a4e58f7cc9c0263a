"""Mapping between Hugging Face checkpoint formats and vlmkit modules (configs and weight names).

Pure functions on dicts: no `transformers` import (reading directories is `vlmkit/hf/pretrained.py`).
A rule table per family pairs an HF key template with ours: `{i}` stands for a layer index and
`{a|b}` for one of the listed names, matched in the same order on both sides, and a template ending
in "." covers every key below it. The same table renames in both directions (loading, and export to
HF formats). Keys no rule covers are reported, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from vlmkit.config import ConfigError, ConnectorConfig, LanguageConfig, VisionConfig

LM_TYPES = ("llama", "qwen2")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

Rules = list[tuple[str, str]]  # (HF key template, vlmkit key template)
StateDict = dict[str, torch.Tensor]

LM_RULES: Rules = [
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    ("lm_head.", "lm_head."),
    ("model.layers.{i}.self_attn.{q|k|v|o}_proj.", "layers.{i}.attn.{q|k|v|o}_proj."),
    ("model.layers.{i}.mlp.{gate|up|down}_proj.", "layers.{i}.mlp.{gate|up|down}_proj."),
    ("model.layers.{i}.input_layernorm.", "layers.{i}.input_norm."),
    ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.post_attention_norm."),
]

# CLIP and SigLIP towers share their layout (SigLIP lacks the CLS token and the pre-norm).
CLIP_VISION_RULES: Rules = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.proj."),
    ("embeddings.position_embedding.weight", "embeddings.position_embedding"),
    ("pre_layrnorm.", "pre_layernorm."),
    ("post_layernorm.", "post_layernorm."),
    ("encoder.layers.{i}.self_attn.{q|k|v|out}_proj.", "blocks.{i}.attn.{q|k|v|out}_proj."),
    ("encoder.layers.{i}.layer_norm{1|2}.", "blocks.{i}.norm{1|2}."),
    ("encoder.layers.{i}.mlp.{fc1|fc2}.", "blocks.{i}.mlp.{fc1|fc2}."),
]

DINOV2_RULES: Rules = [
    ("embeddings.cls_token", "embeddings.cls_token"),  # stored [1, 1, D], ours [D]
    ("embeddings.position_embeddings", "embeddings.position_embedding"),  # stored [1, N, D], ours [N, D]
    ("embeddings.patch_embeddings.projection.", "embeddings.proj."),
    ("encoder.layer.{i}.norm{1|2}.", "blocks.{i}.norm{1|2}."),
    ("encoder.layer.{i}.attention.attention.query.", "blocks.{i}.attn.q_proj."),
    ("encoder.layer.{i}.attention.attention.key.", "blocks.{i}.attn.k_proj."),
    ("encoder.layer.{i}.attention.attention.value.", "blocks.{i}.attn.v_proj."),
    ("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.out_proj."),
    ("encoder.layer.{i}.layer_scale{1|2}.lambda1", "blocks.{i}.ls{1|2}.scale"),
    ("encoder.layer.{i}.mlp.{fc1|fc2}.", "blocks.{i}.mlp.{fc1|fc2}."),
    ("layernorm.", "post_layernorm."),
    # transformers >= 5 names these modules so in memory (checkpoints on disk keep the names above).
    ("encoder.layer.{i}.attention.{q|k|v}_proj.", "blocks.{i}.attn.{q|k|v}_proj."),
    ("encoder.layer.{i}.attention.o_proj.", "blocks.{i}.attn.out_proj."),
]

# Idefics2's connector: a SwiGLU "modality projection", then the Perceiver Resampler (our `perceiver`).
IDEFICS2_CONNECTOR_RULES: Rules = [
    ("modality_projection.{gate|up|down}_proj.", "projection.{gate|up|down}_proj."),
    ("perceiver_resampler.latents", "latents"),
    ("perceiver_resampler.layers.{i}.input_{latents|context}_norm.", "layers.{i}.{latents|context}_norm."),
    ("perceiver_resampler.layers.{i}.self_attn.{q|k|v|o}_proj.", "layers.{i}.attn.{q|k|v|o}_proj."),
    ("perceiver_resampler.layers.{i}.post_attention_layernorm.", "layers.{i}.post_attention_norm."),
    ("perceiver_resampler.layers.{i}.mlp.{gate|up|down}_proj.", "layers.{i}.mlp.{gate|up|down}_proj."),
    ("perceiver_resampler.norm.", "norm."),
]


# BLIP-2's Q-Former (`Blip2Model`, `Blip2ForConditionalGeneration`) -> the `qformer` connector: its query
# path and `language_projection`. Each layer's two attentions share one layout under different names.
_QFORMER_ATTENTION = [("attention.query.", "q_proj."), ("attention.key.", "k_proj."),
                      ("attention.value.", "v_proj."), ("output.dense.", "out_proj."), ("output.LayerNorm.", "norm.")]
QFORMER_RULES: Rules = [
    ("query_tokens", "qformer.queries"),  # stored [1, K, H], ours [K, H]
    ("qformer.layernorm.", "qformer.norm."),
    *[(f"qformer.encoder.layer.{{i}}.{hf}.{a}", f"qformer.layers.{{i}}.{ours}.{b}")
      for hf, ours in (("attention", "self_attn"), ("crossattention", "cross_attn")) for a, b in _QFORMER_ATTENTION],
    ("qformer.encoder.layer.{i}.intermediate_query.dense.", "qformer.layers.{i}.query_ffn.fc1."),
    ("qformer.encoder.layer.{i}.output_query.dense.", "qformer.layers.{i}.query_ffn.fc2."),
    ("qformer.encoder.layer.{i}.output_query.LayerNorm.", "qformer.layers.{i}.query_ffn.norm."),
    ("language_projection.", "projection."),
]
# The rest of a BLIP-2 checkpoint: the towers, and the Q-Former's text path (text embeddings and
# feed-forward layers, retrieval heads), which a connector has no use for.
QFORMER_IGNORED = (r"^(vision_model|language_model|embeddings|qformer\.embeddings|vision_projection|text_projection"
                   r"|itm_head)\.", r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")

# Buffers some HF versions store that carry no learned information.
IGNORED_KEYS = (r"\.position_ids$", r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class VisionFamily:
    """How one HF vision family's checkpoints map onto our ViT."""

    name: str
    tower_type: str  # model_type of a vision-tower-only checkpoint
    full_type: str  # model_type of a dual-encoder checkpoint: its tower is `vision_config` + `vision_model.*`
    rules: Rules
    ignored: tuple[str, ...] = ()  # checkpoint keys with nothing to load into (regexes)
    # Our keys the checkpoint stores with extra leading singleton dimensions: key -> how many.
    batched: tuple[tuple[str, int], ...] = ()


CLIP = VisionFamily("clip", "clip_vision_model", "clip", CLIP_VISION_RULES)
# SigLIP's attention-pooling head gives one vector per image; a VLM reads the patch features instead.
SIGLIP = VisionFamily("siglip", "siglip_vision_model", "siglip", CLIP_VISION_RULES, ignored=(r"^head\.",))
DINOV2 = VisionFamily("dinov2", "dinov2", "dinov2", DINOV2_RULES, ignored=(r"^embeddings\.mask_token$",),
                      batched=(("embeddings.cls_token", 2), ("embeddings.position_embedding", 1)))
VISION_FAMILIES = {t: f for f in (CLIP, SIGLIP, DINOV2) for t in (f.tower_type, f.full_type)}
VISION_TYPES = tuple(VISION_FAMILIES)


class WeightMappingError(ValueError):
    """Checkpoint weights do not fit the module: lists what is missing or unexpected."""


# -- key renaming ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@cache
def _template_regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        body = m.group(1)
        parts.append(r"(\d+)" if body == "i" else "(" + "|".join(map(re.escape, body.split("|"))) + ")")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    # "a.b." covers a whole subtree; anything else names exactly one key.
    return re.compile("".join(parts) + ("(.*)" if template.endswith(".") else "()") + "$")


def _fill(template: str, values: tuple[str, ...]) -> str:
    it = iter(values)
    return _PLACEHOLDER.sub(lambda _: next(it), template)


def rename_keys(state_dict: StateDict, rules: Rules, source: str = "checkpoint", *, to_hf: bool = False,
                ignored: tuple[str, ...] = ()) -> StateDict:
    """Rename every key by the first rule that matches it (HF -> ours, or ours -> HF with `to_hf`).

    Keys matching `ignored` (or the always-ignored buffers) are dropped; keys no rule matches are an
    error naming them.
    """
    renamed, unmatched = {}, []
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in IGNORED_KEYS + tuple(ignored)):
            continue
        for hf, ours in rules:
            src, dst = (ours, hf) if to_hf else (hf, ours)
            m = _template_regex(src).match(key)
            if m:
                *values, rest = m.groups()
                renamed[_fill(dst, tuple(values)) + rest] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise WeightMappingError(f"{source}: unexpected weights {_preview(unmatched)}")
    return renamed


def load_into(module: torch.nn.Module, state_dict: StateDict, source: str = "checkpoint") -> None:
    """Strict load with a readable error listing missing and unexpected weights."""
    expected = module.state_dict()
    tied = {"lm_head.weight"} if getattr(getattr(module, "config", None), "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise WeightMappingError(
            f"{source}: missing weights {_preview(missing)}; unexpected weights {_preview(unexpected)}"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise WeightMappingError(f"{source}: shape mismatch: {_preview(mismatched)}")
    module.load_state_dict(state_dict, strict=False)


def _preview(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more ({len(items)} in all)" if len(items) > limit else ""
    return (", ".join(items[:limit]) or "none") + more


# -- configs -----------------------------------------------------------------------------------


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
    if model_type == "llama" and cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported (it also puts a bias on o_proj)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
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
        qkv_bias=model_type == "qwen2",
    )


def vision_family(cfg: dict[str, Any], source: str = "config.json") -> tuple[VisionFamily, dict[str, Any]]:
    """The family of an HF vision config and the tower's own settings (nested ones for dual encoders)."""
    model_type = cfg.get("model_type")
    family = VISION_FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{source}: unsupported vision model_type {model_type!r}; supported: {list(VISION_TYPES)}")
    if model_type != family.tower_type:
        cfg = {**(cfg.get("vision_config") or {}), "model_type": family.tower_type}
    return family, cfg


def _activation(cfg: dict[str, Any], default: str, source: str) -> str:
    act = cfg.get("hidden_act", default)
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported hidden_act {act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def vision_config_from_hf(cfg: dict[str, Any], source: str = "config.json") -> VisionConfig:
    """Our ViT settings for an HF CLIP / SigLIP / DINOv2 config (tower-only or dual-encoder).

    Features are LLaVA's: the raw penultimate layer (`select_layer: -2`, no final norm), without CLS.
    """
    family, cfg = vision_family(cfg, source)
    size = cfg.get("image_size", 224)
    common = dict(image_size=size, native_image_size=size, num_channels=cfg.get("num_channels", 3),
                  hidden_size=cfg.get("hidden_size", 768), num_layers=cfg.get("num_hidden_layers", 12),
                  num_heads=cfg.get("num_attention_heads", 12), feature_norm=False, select_layer=-2,
                  post_layernorm=True)
    if family is CLIP:
        return VisionConfig(**common, patch_size=cfg.get("patch_size", 32),
                            intermediate_size=cfg.get("intermediate_size", 3072),
                            activation=_activation(cfg, "quick_gelu", source),
                            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), use_cls_token=True, patch_bias=False,
                            pre_layernorm=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    if family is SIGLIP:
        return VisionConfig(**common, patch_size=cfg.get("patch_size", 16),
                            intermediate_size=cfg.get("intermediate_size", 3072),
                            activation=_activation(cfg, "gelu_pytorch_tanh", source),
                            layer_norm_eps=cfg.get("layer_norm_eps", 1e-6), use_cls_token=False, patch_bias=True,
                            pre_layernorm=False, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    for key, supported in (("use_swiglu_ffn", False), ("qkv_bias", True)):
        if cfg.get(key, supported) != supported:
            raise ConfigError(f"{source}: DINOv2 with {key}={cfg[key]} is not supported")
    return VisionConfig(**common, patch_size=cfg.get("patch_size", 14),
                        intermediate_size=int(common["hidden_size"] * cfg.get("mlp_ratio", 4)),
                        activation=_activation(cfg, "gelu", source), layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
                        use_cls_token=True, patch_bias=True, pre_layernorm=False, layerscale=True,
                        layerscale_init=cfg.get("layerscale_value", 1.0), image_mean=IMAGENET_MEAN,
                        image_std=IMAGENET_STD)


def perceiver_config_from_idefics2(cfg: dict[str, Any], source: str = "config.json") -> ConnectorConfig:
    """Our `perceiver` connector settings for an Idefics2 config (its `perceiver_config` + `text_config`).

    Defaults are Idefics2's own, for keys a saved config leaves out. The vision width needs no setting:
    the connector takes it from the tower.
    """
    if cfg.get("model_type") != "idefics2":
        raise ConfigError(f"{source}: expected an Idefics2 config (model_type 'idefics2'), "
                          f"got {cfg.get('model_type')!r}")
    perceiver, text = cfg.get("perceiver_config") or {}, _require(cfg, "text_config", source)
    for where, act in (("perceiver_config", perceiver.get("hidden_act", "silu")),
                       ("text_config", text.get("hidden_act", "silu"))):
        if act != "silu":
            raise ConfigError(f"{source}: {where}.hidden_act {act!r} is not supported (only silu)")
    heads = perceiver.get("resampler_n_heads", 16)
    # Idefics2 runs the resampler at the LM's width, and then takes the LM's epsilon if the widths differed.
    same_width = perceiver.get("hidden_size", 4096) == _require(text, "hidden_size", f"{source}: text_config")
    return ConnectorConfig(
        name="perceiver",
        num_queries=perceiver.get("resampler_n_latents", 64),
        num_layers=perceiver.get("resampler_depth", 3),
        num_heads=heads,
        num_kv_heads=perceiver.get("num_key_value_heads", 4),
        hidden_size=heads * perceiver.get("resampler_head_dim", 96),
        projection_size=_require(text, "intermediate_size", f"{source}: text_config"),
        rms_norm_eps=perceiver.get("rms_norm_eps", 1e-6) if same_width else text.get("rms_norm_eps", 1e-6),
    )


# -- weights -----------------------------------------------------------------------------------


def lm_state_dict_from_hf(state_dict: StateDict, source: str = "checkpoint") -> StateDict:
    return rename_keys(state_dict, LM_RULES, source)


def vision_state_dict_from_hf(state_dict: StateDict, source: str = "checkpoint",
                              family: VisionFamily = CLIP) -> StateDict:
    # Dual-encoder checkpoints (and CLIP/SigLIP tower saves before transformers 5) nest the tower
    # under `vision_model.`; the text tower and projections beside it are not needed.
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    renamed = rename_keys(state_dict, family.rules, source, ignored=family.ignored)
    for key, dims in family.batched:
        if key in renamed and renamed[key].shape[:dims] == (1,) * dims:
            renamed[key] = renamed[key].reshape(renamed[key].shape[dims:])
    return renamed


def perceiver_state_dict_from_idefics2(state_dict: StateDict, source: str = "checkpoint") -> StateDict:
    """Our `perceiver` connector's weights from Idefics2's connector (or a whole Idefics2 checkpoint,
    which nests it under `model.connector.`; the rest of such a checkpoint is left out)."""
    for prefix in ("model.connector.", "connector."):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return rename_keys(state_dict, IDEFICS2_CONNECTOR_RULES, source)


def qformer_state_dict_from_hf(state_dict: StateDict, source: str = "checkpoint") -> StateDict:
    """The `qformer` connector's weights (keys of `QFormerConnector`) from a BLIP-2 state dict."""
    renamed = rename_keys(state_dict, QFORMER_RULES, source, ignored=QFORMER_IGNORED)
    if "qformer.queries" in renamed and renamed["qformer.queries"].ndim == 3:
        renamed["qformer.queries"] = renamed["qformer.queries"][0]
    return renamed
