"""`vlmkit tokens` and vlmkit.budget: the token arithmetic of the papers, and of our own models."""

import json

import pytest

from vlmkit.budget import TokenSpec, attention_cost, format_bytes, kv_cache_bytes, max_frames
from vlmkit.cli import main
from vlmkit.models.vlm import VisionLanguageModel

LLAVA_NEXT = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_the_numbers_of_the_papers():
    clip = TokenSpec(patch_size=14)
    assert clip.image_tokens(336, 336) == 576  # LLaVA-1.5: 24 x 24 patches
    assert clip.image_tokens(672, 672) == 2304
    assert attention_cost(2304) / attention_cost(576) == 16  # 4x the tokens, 16x the attention
    assert TokenSpec(patch_size=14, connector="pixel_shuffle", downsample=2).image_tokens(336, 336) == 144
    assert TokenSpec(patch_size=14, connector="perceiver", queries=64).image_tokens(672, 672) == 64
    assert TokenSpec(patch_size=14, prefix_tokens=1).image_tokens(336, 336) == 577

    next_ = TokenSpec(patch_size=14, grid_pinpoints=LLAVA_NEXT, base=336)
    bound = next_.anyres_bound((672, 672))  # N tiles of P_t tokens plus a P_0 thumbnail
    assert (bound["tiles"], bound["tile_tokens"], bound["thumbnail_tokens"]) == (4, 576, 576)
    assert bound["tiles_and_thumbnail"] == 4 * 576 + 576 and bound["max_tokens"] == 2880 + 48
    assert next_.image_tokens(672, 672) == 2928  # a square fits exactly: nothing to unpad
    assert next_.image_tokens(600, 800) < next_.anyres_bound(next_.chosen_pinpoint(600, 800))["max_tokens"]

    assert max_frames(4096, 576) == 7 == 4096 // 576  # f_max = B / P
    assert max_frames(575, 576) == 0
    # SmolLM2-135M's cache (30 layers, 3 kv heads of 64) for one 576-token image in bf16.
    assert kv_cache_bytes(576, 30, 3, 64) == 2 * 30 * 3 * 64 * 576 * 2 == 13_271_040
    assert format_bytes(13_271_040) == "12.7 MiB" and format_bytes(512) == "512 B"


def test_specs_it_cannot_count_are_errors():
    with pytest.raises(ValueError, match="unknown connector 'mlp3x'"):
        TokenSpec(patch_size=14, connector="mlp3x")
    with pytest.raises(ValueError, match="K=10 is not a square"):
        TokenSpec(patch_size=14, connector="c_abstractor", queries=10)
    with pytest.raises(ValueError, match="needs a grid connector"):
        TokenSpec(patch_size=14, connector="perceiver", grid_pinpoints=LLAVA_NEXT, base=336)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        TokenSpec(patch_size=14).image_tokens(330, 336)
    with pytest.raises(ValueError, match="token merging leaves no patch grid"):
        TokenSpec(patch_size=14, connector="pixel_shuffle", token_merging=4, merging_blocks=12)


MODELS = {  # model config overrides -> what decides their counts
    "mlp2x_gelu": {},
    "keep_cls": {"vision": {"keep_cls": True}},
    "pixel_shuffle": {"connector": {"name": "pixel_shuffle", "downsample": 2}},
    "c_abstractor": {"connector": {"name": "c_abstractor", "num_queries": 9}},
    "perceiver": {"connector": {"name": "perceiver", "num_queries": 5}},
    "qformer": {"connector": {"name": "qformer", "num_queries": 6, "num_layers": 1}},
    "cross_attention": {"fusion": "cross_attention"},
    "anyres": {"image": {"anyres": {"grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]}}},
    "anyres_shuffle": {"connector": {"name": "pixel_shuffle", "downsample": 2},
                       "image": {"anyres": {"grid_pinpoints": [[48, 48], [48, 96], [96, 48]], "base": 48}}},
    "token_merging": {"vision": {"token_merging": {"r": 3}}},
    "token_merging_cls": {"vision": {"token_merging": {"r": 5}, "use_cls_token": True, "keep_cls": True,
                                     "num_layers": 3, "select_layer": -2}},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_counts_equal_real_models(make_config, name):
    model = VisionLanguageModel(make_config(**MODELS[name]))
    spec = TokenSpec.from_model_config(model.config)
    sizes = [(32, 32), (48, 48), (64, 32), (16, 80)]
    if spec.anyres:
        sizes += [(40, 90), (100, 37), (7, 300), (250, 251), (1, 1), (513, 77)]
    for h, w in sizes:
        assert spec.placeholders(h, w) == model.image_token_count(h, w), (h, w)
        assert spec.image_tokens(h, w) == model.connector_token_count(h, w), (h, w)


def test_cli_prints_the_table(capsys):
    assert main(["tokens", "--image-size", "336", "672", "--patch-size", "14"]) == 0
    out = capsys.readouterr().out
    assert "| 336x336 | 24x24 | 576 | 576 | 576 | 1.0x |" in out
    assert "| 672x672 | 48x48 | 2304 | 2304 | 2304 | 16.0x |" in out

    assert main(["tokens", "--image-size", "336", "--patch-size", "14", "--anyres",
                 ",".join(f"{h}x{w}" for h, w in LLAVA_NEXT), "--original-size", "672x672", "600x800",
                 "--budget", "8192"]) == 0
    out = capsys.readouterr().out
    assert "| 672x672 | 4 | 4 x 576 + 576 = 2880 | 2928 |" in out
    spec = TokenSpec(patch_size=14, grid_pinpoints=LLAVA_NEXT, base=336)
    assert f"| 600x800 | 2x2 tiles | {spec.image_tokens(600, 800)} |" in out
    assert "f_max = B / P = 8192 / 2928 = 2 " in out

    assert main(["tokens", "--image-size", "336", "--patch-size", "15"]) == 1
    assert "not a multiple of the patch size 15" in capsys.readouterr().err


def test_cli_reads_a_model_and_an_lm(make_config, tokenizer, tmp_path, capsys):
    model = VisionLanguageModel(make_config(**MODELS["anyres"]))
    model.save_pretrained(tmp_path / "model", tokenizer)
    assert main(["tokens", "--model", str(tmp_path / "model"), "--original-size", "40x90", "--frames", "3",
                 "--text-tokens", "10"]) == 0
    out = capsys.readouterr().out
    n, lm = model.image_token_count(40, 90), model.config.lm
    kv = format_bytes(kv_cache_bytes(3 * n + 10, lm.num_layers, lm.num_kv_heads, lm.head_dim))
    assert f"| 40x90 | 1x3 tiles | {n} | {3 * n} | {3 * n + 10} | 1.0x | {kv} |" in out
    budget = lm.max_position_embeddings - 10
    assert f"f_max = B / P = {budget} / {n} = {budget // n} " in out
    assert main(["tokens", "--model", str(tmp_path / "model"), "--connector", "linear"]) == 1
    assert "--connector: these come from --model" in capsys.readouterr().err

    hf = tmp_path / "smollm2"  # a Hugging Face LM directory: only its config is read
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": True}))
    assert main(["tokens", "--image-size", "336", "--patch-size", "14", "--lm", str(hf)]) == 0
    out = capsys.readouterr().out
    assert "| 336x336 | 24x24 | 576 | 576 | 576 | 1.0x | 12.7 MiB |" in out
    assert "f_max = B / P = 8192 / 576 = 14 " in out
