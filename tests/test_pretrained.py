"""Pretrained parts from HF-format directories: parity with transformers on tiny random checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.config import ConfigError
from vlmkit.hf.hub import DINOV2, WeightMappingError, vision_state_dict_from_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)


def randomize(model):
    """Random norms, biases and layer scales, so a mapping mistake cannot hide behind initial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def check_hidden_states(ref_outputs, vit, pixels, normed_last=True):
    """Every layer's hidden states match; so does the last one after the final norm (where HF applies it)."""
    with torch.no_grad():
        ours = vit.hidden_states(pixels)
    assert len(ours) == len(ref_outputs.hidden_states)
    for expected, got in zip(ref_outputs.hidden_states, ours):
        assert max_diff(expected, got) <= TOL
    last = vit.post_layernorm(ours[-1]) if normed_last else ours[-1]
    assert max_diff(ref_outputs.last_hidden_state, last) <= TOL


def reference_tower(family: str, full: bool):
    """A random transformers `{family}Model` (both towers) or `{family}VisionModel`, and its vision tower."""
    torch.manual_seed(0)
    if full:
        config = getattr(transformers, f"{family}Config")(vision_config=VISION, text_config=TEXT)
        ref = getattr(transformers, f"{family}Model")(config)
        tower = ref.vision_model
    else:
        config = getattr(transformers, f"{family}VisionConfig")(**VISION)
        ref = tower = getattr(transformers, f"{family}VisionModel")(config)
    randomize(ref)
    return ref, tower


@pytest.mark.parametrize("full", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_clip_tower_matches_transformers(tmp_path, full):
    ref, tower = reference_tower("CLIP", full)
    vit = vlmkit.load_vision_tower(save(ref, tmp_path / "clip"))
    assert vit.config.use_cls_token and vit.config.pre_layernorm and vit.config.activation == "quick_gelu"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
        features = vit(pixels)  # LLaVA's: penultimate layer, CLS dropped, no final norm
        pooled = vit.pooled(pixels)
    check_hidden_states(out, vit, pixels, normed_last=False)  # CLIP normalises only the pooled CLS
    assert max_diff(out.hidden_states[-2][:, 1:], features) <= TOL
    assert max_diff(out.pooler_output, pooled) <= TOL


@pytest.mark.parametrize("full", [False, True], ids=["SiglipVisionModel", "SiglipModel"])
def test_siglip_tower_matches_transformers(tmp_path, full):
    ref, tower = reference_tower("Siglip", full)
    vit = vlmkit.load_vision_tower(save(ref, tmp_path / "siglip"), select_layer=-1)
    cfg = vit.config
    assert not cfg.use_cls_token and cfg.patch_bias and cfg.activation == "gelu_tanh"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
        features = vit(pixels)
    check_hidden_states(out, vit, pixels)
    assert features.shape == (2, 16, 32) and max_diff(out.hidden_states[-1], features) <= TOL


@pytest.mark.parametrize("size", [(42, 42), (28, 56), (70, 42)], ids=["native", "wide", "tall"])
def test_dinov2_matches_transformers_including_interpolation(tmp_path, size):
    torch.manual_seed(0)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=42, patch_size=14,
        layerscale_value=0.5, mlp_ratio=2))
    randomize(ref)
    vit = vlmkit.load_vision_tower(save(ref, tmp_path / "dino"))
    assert vit.config.layerscale and vit.config.intermediate_size == 64 and vit.config.native_image_size == 42
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
    check_hidden_states(out, vit, pixels)
    # transformers 5 names some modules differently in memory than on disk: both map.
    in_memory = vision_state_dict_from_hf(ref.state_dict(), family=DINOV2)
    assert in_memory.keys() == vit.state_dict().keys()
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in in_memory.items())


def test_dinov2_at_another_configured_size_interpolates_like_transformers(tmp_path):
    torch.manual_seed(0)
    ref = randomize(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=70, patch_size=14)))
    path = save(ref, tmp_path / "dino")
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                               "image_std": [0.4, 0.5, 0.6]}))
    vit = vlmkit.load_vision_tower(path, image_size=28, select_layer=-1)
    assert vit.config.grid_size == 2 and vit.embeddings.position_embedding.shape == (26, 32)
    assert vit.config.image_mean == (0.1, 0.2, 0.3) and vit.config.image_std == (0.4, 0.5, 0.6)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        assert max_diff(expected, vit(pixels)) <= TOL


def lm_pair(tmp_path, family, tie, **save_kwargs):
    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    ref = randomize(model_cls(cfg_cls(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                                      tie_word_embeddings=tie)))
    path = save(ref, tmp_path / family, **save_kwargs)
    return ref, vlmkit.load_language_model(path), path


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_language_model_logits_match_transformers(tmp_path, family, tie):
    ref, lm, _ = lm_pair(tmp_path, family, tie)
    assert lm.config.tie_word_embeddings == tie and lm.config.qkv_bias == (family == "qwen2")
    assert (lm.lm_head.weight is lm.embed_tokens.weight) == tie
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        assert max_diff(ref(ids).logits, lm(ids).logits) <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    ref, lm, path = lm_pair(tmp_path, "qwen2", tie=False, max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert max_diff(ref(ids).logits, lm(ids).logits) <= TOL


def test_vocabulary_can_grow_for_added_tokens(tmp_path):
    ref, _, path = lm_pair(tmp_path, "llama", tie=True)
    lm = vlmkit.load_language_model(path, vocab_size=103)
    assert lm.embed_tokens.weight.shape == (103, 64) and lm.lm_head.weight is lm.embed_tokens.weight
    old = ref.model.embed_tokens.weight
    assert torch.equal(lm.embed_tokens.weight[:101], old)
    assert torch.allclose(lm.embed_tokens.weight[101:], old.mean(0).expand(2, -1))


def test_unsupported_types_and_bad_weights_are_explained(tmp_path):
    _, _, path = lm_pair(tmp_path, "llama", tie=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"unsupported language model_type 'gpt2'; supported: \['llama', 'qwen2'\]"):
        vlmkit.load_language_model(path)
    with pytest.raises(ConfigError, match=r"unsupported vision model_type 'gpt2'; supported: \['clip_vision_model', "
                                          r"'clip', 'siglip_vision_model', 'siglip', 'dinov2'\]"):
        vlmkit.load_vision_tower(path)
    (path / "config.json").write_text(json.dumps(config))

    weights = load_file(path / "model.safetensors")
    removed = sorted(k for k in weights if ".mlp." in k)  # 9 keys: the message shows 8 and the count
    broken = {k: v for k, v in weights.items() if k not in removed}
    broken["model.layers.0.mystery.weight"] = torch.zeros(1)
    save_file(broken, path / "model.safetensors")
    with pytest.raises(WeightMappingError, match="unexpected weights model.layers.0.mystery.weight"):
        vlmkit.load_language_model(path)
    del broken["model.layers.0.mystery.weight"]
    save_file(broken, path / "model.safetensors")
    with pytest.raises(WeightMappingError, match=r"missing weights layers.0.mlp.down_proj.weight, .* and 1 more "
                                                 r"\(9 in all\)"):
        vlmkit.load_language_model(path)

    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickled weights, which are never loaded"):
        vlmkit.load_language_model(path)


def test_tokenizer_from_transformers_directory(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello there, how are you today?"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                               chat_template=template)
    ref.save_pretrained(tmp_path)
    tok = vlmkit.load_tokenizer(tmp_path)
    assert tok.chat_template == template
    assert (tok.bos_token, tok.eos_token, tok.eos_id) == ("<s>", "</s>", ref.eos_token_id)
    assert tok.pad_id == tok.eos_id  # no pad token: padding uses the end-of-sequence token
    text = "hello <s>there</s>, how are you?"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    size = tok.vocab_size
    assert tok.image_id is None and tok.add_image_token() and tok.image_id == size == tok.vocab_size - 1
    assert tok.encode("a<image>b")[1] == size and not tok.add_image_token()
