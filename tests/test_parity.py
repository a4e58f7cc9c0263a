"""Numerical parity with the transformers reference implementations on tiny random configs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.config import ConfigError  # noqa: E402
from vlmkit.hf.hub import (  # noqa: E402
    WeightMappingError,
    lm_config_from_hf,
    lm_state_dict_from_hf,
    load_into,
    perceiver_config_from_idefics2,
    perceiver_state_dict_from_idefics2,
    rename_keys,
    vision_config_from_hf,
    vision_state_dict_from_hf,
)
from vlmkit.models.connectors import build_connector  # noqa: E402
from vlmkit.models.language import LanguageModel  # noqa: E402
from vlmkit.models.vision import ViT  # noqa: E402

TOL = 1e-5


def _lm_pair(family: str, tie: bool):
    torch.manual_seed(0)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    hf_cfg = cfg_cls(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    ref = model_cls(hf_cfg).eval()
    # Random (non-zero) biases and norms, so a mapping mistake cannot hide behind initial values.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.1)
    ours = LanguageModel(lm_config_from_hf(hf_cfg.to_dict())).eval()
    load_into(ours, lm_state_dict_from_hf(ref.state_dict()))
    return ref, ours


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_lm_logits_match_transformers(family, tie):
    ref, ours = _lm_pair(family, tie)
    assert ours.config.qkv_bias == (family == "qwen2")
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    assert (expected - got).abs().max().item() <= TOL


def test_lm_kv_cache_decode_matches_transformers_full_pass():
    ref, ours = _lm_pair("llama", tie=False)
    ids = torch.randint(0, 101, (2, 12))
    cache = ours.new_cache(2, 12)
    with torch.no_grad():
        expected = ref(ids).logits
        steps = [ours(ids[:, :8], cache=cache).logits] + [ours(ids[:, i : i + 1], cache=cache).logits for i in
                                                          range(8, 12)]
    assert (expected - torch.cat(steps, dim=1)).abs().max().item() <= TOL


def test_vit_penultimate_hidden_states_match_clip():
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    ref = transformers.CLIPVisionModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    ours = ViT(vision_config_from_hf(hf_cfg.to_dict())).eval()
    load_into(ours, vision_state_dict_from_hf(ref.state_dict()))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixels, output_hidden_states=True)
        states = ours.hidden_states(pixels)
        features = ours(pixels)  # select_layer -2, CLS dropped: what LLaVA feeds its connector
        pooled = ours.pooled(pixels)
    assert len(states) == len(out.hidden_states)
    assert (out.hidden_states[-2] - states[-2]).abs().max().item() <= TOL
    assert (out.hidden_states[-2][:, 1:] - features).abs().max().item() <= TOL
    assert (out.pooler_output - pooled).abs().max().item() <= TOL


def test_unsupported_and_mismatched_checkpoints_are_explained():
    with pytest.raises(ValueError, match="unsupported language model_type 'gpt2'; supported: \\['llama', 'qwen2'\\]"):
        lm_config_from_hf({"model_type": "gpt2"})
    with pytest.raises(WeightMappingError, match="unexpected weights model.mystery.weight"):
        rename_keys({"model.mystery.weight": torch.zeros(1)}, [], "ckpt")
    ref, ours = _lm_pair("llama", tie=False)
    sd = lm_state_dict_from_hf(ref.state_dict())
    del sd["layers.0.mlp.up_proj.weight"]
    with pytest.raises(WeightMappingError, match="missing weights layers.0.mlp.up_proj.weight"):
        load_into(ours, sd)


def _idefics2_config(attn_implementation: str = "sdpa"):
    # Attention width 4 x 6 = 24 differs from the LM width 32, and 2 k/v heads serve 4 query heads.
    cfg = transformers.Idefics2Config(
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"model_type": "mistral", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rms_norm_eps": 1e-5},
        perceiver_config={"hidden_size": 32, "resampler_n_latents": 5, "resampler_depth": 2, "resampler_n_heads": 4,
                          "resampler_head_dim": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5})
    cfg.perceiver_config._attn_implementation = attn_implementation
    return cfg


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_perceiver_matches_idefics2_connector(attn_implementation):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    torch.manual_seed(0)
    hf_cfg = _idefics2_config(attn_implementation)
    ref = Idefics2Connector(hf_cfg).eval()
    with torch.no_grad():  # random norms and latents (Idefics2 starts them all at one)
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.3)
    cfg = perceiver_config_from_idefics2(hf_cfg.to_dict())
    assert (cfg.num_queries, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.projection_size,
            cfg.rms_norm_eps) == (5, 2, 4, 2, 24, 40, 1e-5)
    ours = build_connector(cfg, vision_dim=24, lm_dim=32).eval()
    # A whole Idefics2 checkpoint nests the connector under `model.connector.`; the rest is left out.
    checkpoint = {f"model.connector.{k}": v for k, v in ref.state_dict().items()}
    checkpoint["model.text_model.norm.weight"] = torch.ones(32)
    load_into(ours, perceiver_state_dict_from_idefics2(checkpoint))
    features = torch.randn(3, 17, 24)  # a 4x4 patch grid and a CLS-like token: all of it is context
    with torch.no_grad():
        expected = ref(features, attention_mask=torch.ones(3, 17, dtype=torch.long))
        got = ours(features, (4, 4))
    assert got.shape == (3, 5, 32)
    assert (expected - got).abs().max().item() <= TOL


def test_idefics2_configs_our_perceiver_cannot_take_are_explained():
    with pytest.raises(ConfigError, match="expected an Idefics2 config .* got 'llava'"):
        perceiver_config_from_idefics2({"model_type": "llava"})
    data = _idefics2_config().to_dict()
    data["perceiver_config"]["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="perceiver_config.hidden_act 'gelu' is not supported"):
        perceiver_config_from_idefics2(data)


@pytest.mark.parametrize("frequency,text_input", [(2, False), (1, True)])
def test_qformer_connector_matches_blip2_qformer(frequency, text_input):
    """The query path and BLIP-2's language projection, loaded from transformers' weight names (a
    text path in the checkpoint, as InstructBLIP's, is not read)."""
    from vlmkit.config import ConnectorConfig
    from vlmkit.hf.hub import qformer_state_dict_from_hf
    from vlmkit.models.connectors import build_connector

    torch.manual_seed(0)
    hf_cfg = transformers.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=128, encoder_hidden_size=24,
                                             cross_attention_frequency=frequency, use_qformer_text_input=text_input)
    ref = transformers.Blip2QFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layernorm" in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
    query_tokens, projection = torch.randn(1, 6, 32), torch.nn.Linear(32, 20)
    state = {"query_tokens": query_tokens, **{f"qformer.{k}": v for k, v in ref.state_dict().items()},
             **{f"language_projection.{k}": v for k, v in projection.state_dict().items()}}
    cfg = ConnectorConfig(name="qformer", num_queries=6, num_layers=3, num_heads=4, hidden_size=32,
                          cross_attention_frequency=frequency)
    ours = build_connector(cfg, vision_dim=24, lm_dim=20).eval()
    load_into(ours, qformer_state_dict_from_hf(state))
    features = torch.randn(2, 17, 24)
    with torch.no_grad():
        expected = ref(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=features).last_hidden_state
        assert (expected - ours.qformer(features)).abs().max().item() <= TOL
        assert (projection(expected) - ours(features, (4, 4))).abs().max().item() <= TOL
    assert ours.num_tokens((4, 4)) == ours.num_tokens((9, 7)) == 6
