"""Export a VisionLanguageModel to the format of transformers' `LlavaForConditionalGeneration`, or, for a
model that cuts images into AnyRes tiles (`model.image.anyres`), `LlavaNextForConditionalGeneration`.

Written directly as config dicts and tensors (transformers is not needed to export). The vision
tower becomes the transformers family its options match: CLIP (CLS token + pre-norm), DINOv2 (CLS
token, no pre-norm) or SigLIP (neither). What those models lack is folded into equivalent weights:
position embeddings are resampled once for the model's image size, a CLIP tower's patch bias moves
into its position embeddings, layer scale moves into the projections before it, missing norms and
biases become identities and zeros. A `linear` connector becomes Llava's two-layer projector with
an identity activation and an identity second layer. Keys follow the layout transformers 4.x saves
(and 5.x reads), e.g. `language_model.model.layers.0...`, `vision_tower.vision_model...`.

What Llava cannot express is an `ExportError` naming the part: connectors other than `linear` /
`mlp2x_gelu`, and `vision.feature_norm: true` (Llava feeds raw hidden states to its projector).

LLaVA-NeXT adds the AnyRes grid pinpoints, the learned `image_newline` and an image processor that
tiles as vlmkit does; its tower runs at the tile size (`image.anyres.base`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlmkit.config import LanguageConfig, VisionConfig
from vlmkit.data.processor import VLMProcessor
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.hf.hub import CLIP, DINOV2, LM_RULES, SIGLIP, StateDict, VisionFamily, rename_keys
from vlmkit.io import atomic_directory
from vlmkit.models.vision import ViT
from vlmkit.models.vlm import VisionLanguageModel

SUPPORTED_CONNECTORS = ("linear", "mlp2x_gelu")
FORMATS = {"llava-hf": "LlavaForConditionalGeneration", "llava-next-hf": "LlavaNextForConditionalGeneration"}
HF_ACTIVATION_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


class ExportError(ValueError):
    """The model has a part the target format cannot express; the message names it."""


def check_exportable(model: VisionLanguageModel, fmt: str = "llava-hf") -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {sorted(FORMATS)}")
    cfg = model.config
    problems = []
    if fmt == "llava-hf" and cfg.image.anyres is not None:
        problems.append("image.anyres: Llava resizes every image to one square; export an AnyRes model with "
                        "--format llava-next-hf")
    if fmt == "llava-next-hf" and cfg.image.anyres is None:
        problems.append("no image.anyres: LLaVA-NeXT cuts every image into tiles; export this model with "
                        "--format llava-hf")
    if cfg.connector.name not in SUPPORTED_CONNECTORS:
        problems.append(f"connector {cfg.connector.name!r}: Llava's projector is a linear or 2-layer MLP "
                        f"(supported: {list(SUPPORTED_CONNECTORS)})")
    if cfg.fusion != "splice":
        problems.append(f"fusion {cfg.fusion!r}: Llava splices image tokens into the LM's input (fusion: splice)")
    if cfg.vision.feature_norm:
        problems.append("vision.feature_norm: true: Llava feeds the selected layer's raw hidden states to its "
                        "projector, without the final norm (train with feature_norm: false)")
    if cfg.vision.stem != "patchify":
        problems.append(f"vision.stem {cfg.vision.stem!r}: the vision towers Llava can use (CLIP, SigLIP, DINOv2) "
                        "make patch tokens with one patchify conv")
    if cfg.vision.pre_layernorm and not cfg.vision.use_cls_token:
        problems.append("vision: a pre-norm tower without a CLS token matches no vision model Llava can use "
                        "(CLIP has both, SigLIP neither)")
    if cfg.vision.merges_tokens:
        problems.append(f"vision.token_merging.r {cfg.vision.token_merging.r}: Llava's vision towers do not merge "
                        "tokens (export with token_merging.r: 0; the weights are the same)")
    if problems:
        raise ExportError(f"cannot export to {fmt}: " + "; ".join(problems))


def vision_family_for(cfg: VisionConfig) -> VisionFamily:
    if cfg.use_cls_token:
        return CLIP if cfg.pre_layernorm else DINOV2
    return SIGLIP


# -- vision ------------------------------------------------------------------------------------


def vision_config_to_hf(cfg: VisionConfig, family: VisionFamily, image_size: int | None = None) -> dict[str, Any]:
    """`image_size`: the size the HF tower runs at (default: the configured one)."""
    common = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_channels": cfg.num_channels,
              "image_size": image_size or cfg.image_size,
              "patch_size": cfg.patch_size, "hidden_act": HF_ACTIVATION_NAMES[cfg.activation],
              "layer_norm_eps": cfg.layer_norm_eps}
    if family is DINOV2:
        ratio, rest = divmod(cfg.intermediate_size, cfg.hidden_size)
        if rest:
            raise ExportError(f"vision.intermediate_size {cfg.intermediate_size} must be a multiple of hidden_size "
                              f"{cfg.hidden_size} for a DINOv2 config (it stores mlp_ratio)")
        return {"model_type": "dinov2", **common, "mlp_ratio": ratio, "qkv_bias": True, "layerscale_value": 1.0,
                "use_swiglu_ffn": False, "use_mask_token": True}
    common["intermediate_size"] = cfg.intermediate_size
    if family is SIGLIP:
        return {"model_type": "siglip_vision_model", **common, "vision_use_head": False}
    return {"model_type": "clip_vision_model", **common, "projection_dim": cfg.hidden_size}


def vision_state_dict_to_hf(vit: ViT, family: VisionFamily, image_size: int | None = None) -> StateDict:
    """The tower's weights under the family's HF names, with what the family lacks folded in;
    `image_size` as `vision_config_to_hf`."""
    cfg = vit.config
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    d = cfg.hidden_size
    # HF towers read stored position embeddings at their configured size: store them for ours.
    grid = (image_size or cfg.image_size) // cfg.patch_size
    positions = vit.embeddings.positions_for((grid, grid)).detach().clone()
    if family is CLIP and cfg.patch_bias:  # CLIP's patch conv has no bias; it adds to every patch position
        positions[1:] += state.pop("embeddings.proj.bias")
    if family is not CLIP and not cfg.patch_bias:
        state["embeddings.proj.bias"] = torch.zeros(d)
    state["embeddings.position_embedding"] = positions
    for i in range(cfg.num_layers):
        prefix = f"blocks.{i}."
        if family is not DINOV2 and cfg.layerscale:  # scale * (W x + b) = (scale * W) x + scale * b
            for ls, proj in (("ls1", "attn.out_proj"), ("ls2", "mlp.fc2")):
                scale = state.pop(f"{prefix}{ls}.scale")
                state[f"{prefix}{proj}.weight"] *= scale[:, None]
                state[f"{prefix}{proj}.bias"] *= scale
        if family is DINOV2 and not cfg.layerscale:
            state[f"{prefix}ls1.scale"], state[f"{prefix}ls2.scale"] = torch.ones(d), torch.ones(d)  # not shared
    if not cfg.post_layernorm:  # unused by Llava, but every HF family has one
        state["post_layernorm.weight"], state["post_layernorm.bias"] = torch.ones(d), torch.zeros(d)
    for key, dims in family.batched:
        state[key] = state[key].reshape((1,) * dims + tuple(state[key].shape))
    hf = rename_keys(state, family.rules, "vision tower", to_hf=True)
    if family is DINOV2:
        hf["embeddings.mask_token"] = torch.zeros(1, d)
    return hf


# -- language model and projector ------------------------------------------------------------


def lm_config_to_hf(cfg: LanguageConfig, tokenizer: Tokenizer, end_of_turn_id: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        # transformers >= 5 reads rope_parameters, earlier versions rope_theta.
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "use_sliding_window": False, "bos_token_id": _token_id(tokenizer, tokenizer.bos_token),
        "eos_token_id": end_of_turn_id, "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32",
    }


def _token_id(tokenizer: Tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.backend.token_to_id(token)


def lm_state_dict_to_hf(model: VisionLanguageModel) -> StateDict:
    state = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    if model.config.lm.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: transformers rebuilds it from the embeddings
    return rename_keys(state, LM_RULES, "language model", to_hf=True)


def projector_to_hf(model: VisionLanguageModel) -> tuple[StateDict, str]:
    """Llava's `linear_1 -> act -> linear_2` weights and activation name for our connector."""
    connector = model.connector
    if model.config.connector.name == "mlp2x_gelu":
        first, second, act = connector.mlp[0], connector.mlp[2], "gelu"
        w2, b2 = second.weight.detach().clone(), second.bias.detach().clone()
    else:  # linear: an identity activation and an identity second layer
        first, act = connector.proj, "linear"
        w2, b2 = torch.eye(first.out_features), torch.zeros(first.out_features)
    return {"linear_1.weight": first.weight.detach().clone(), "linear_1.bias": first.bias.detach().clone(),
            "linear_2.weight": w2, "linear_2.bias": b2}, act


# -- the whole model ---------------------------------------------------------------------------


def export_llava_hf(model: VisionLanguageModel, tokenizer: Tokenizer, out: str | Path,
                    fmt: str = "llava-hf") -> Path:
    """Write `out` (atomically): config.json, model.safetensors, generation_config.json, the tokenizer
    (with its chat template) and an image-processor / processor config for `LlavaProcessor` (`fmt`
    ``llava-hf``) or `LlavaNextProcessor` (``llava-next-hf``, for AnyRes models)."""
    check_exportable(model, fmt)
    cfg = model.config
    anyres = cfg.image.anyres
    family = vision_family_for(cfg.vision)
    size = cfg.vision.image_size if anyres is None else anyres.base  # what the tower sees
    end_of_turn = VLMProcessor.for_model(model, tokenizer).end_of_turn_id
    projector, act = projector_to_hf(model)
    weights = {
        **{f"vision_tower.{'' if family is DINOV2 else 'vision_model.'}{k}": v
           for k, v in vision_state_dict_to_hf(model.vision, family, size).items()},
        **{f"multi_modal_projector.{k}": v for k, v in projector.items()},
        **{f"language_model.{k}": v for k, v in lm_state_dict_to_hf(model).items()},
    }
    keep_cls = cfg.vision.use_cls_token and cfg.vision.keep_cls
    strategy = "default" if cfg.vision.use_cls_token and not keep_cls else "full"
    config = {
        "architectures": [FORMATS[fmt]], "model_type": "llava" if anyres is None else "llava_next",
        "vision_config": vision_config_to_hf(cfg.vision, family, size),
        "text_config": lm_config_to_hf(cfg.lm, tokenizer, end_of_turn),
        # tokens of one square image at the tower's size (AnyRes: of its thumbnail)
        "image_token_index": cfg.image_token_id,
        "image_seq_length": model.connector.num_tokens(model.vision.grid_for(size, size)),
        "vision_feature_layer": cfg.vision.select_layer, "vision_feature_select_strategy": strategy,
        "projector_hidden_act": act, "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings, "torch_dtype": "float32",
    }
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(cfg.vision.image_mean), "image_std": list(cfg.vision.image_std),
              "do_convert_rgb": True}
    square = {"height": size, "width": size}
    processor = {"image_token": tokenizer.image_token, "patch_size": cfg.vision.patch_size,
                 "vision_feature_select_strategy": strategy,
                 "num_additional_image_tokens": 1 if cfg.vision.use_cls_token else 0}
    if anyres is None:
        # ours: a square bicubic resize (no crop), scale to [0, 1], normalise
        image_processor = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                           **common, "size": square, "do_center_crop": False, "crop_size": square}
        processor["processor_class"] = "LlavaProcessor"
    else:
        # tiles as vlmkit.data.images: a square thumbnail, the best pinpoint's tiles on black padding
        grid_pinpoints = [list(p) for p in anyres.grid_pinpoints]
        weights["image_newline"] = model.anyres.image_newline.detach().clone()
        config["image_grid_pinpoints"] = grid_pinpoints
        image_processor = {"image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
                           **common, "size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": square,
                           "do_pad": True, "image_grid_pinpoints": grid_pinpoints}
        processor["processor_class"] = "LlavaNextProcessor"
    generation = {"bos_token_id": config["text_config"]["bos_token_id"], "eos_token_id": end_of_turn,
                  "pad_token_id": tokenizer.pad_id}
    with atomic_directory(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", generation),
                           ("preprocessor_config.json", image_processor), ("processor_config.json", processor)):
            (tmp / name).write_text(json.dumps(data, indent=2))
        tokenizer.save(tmp)
    return Path(out)
