"""`vlmkit profile`: the latency breakdown's structure, KV-cache sizes from the config, and the options
--quantize / --speculative on chat, eval and profile."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.processor import VLMProcessor
from vlmkit.eval.profile import STAGES, image_costs, kv_bytes_per_token, markdown, profile_latency
from vlmkit.models.vlm import VisionLanguageModel


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_latency_breakdown(tiny_model, tokenizer, image_file):
    processor = VLMProcessor.for_model(tiny_model, tokenizer)
    runs = profile_latency(tiny_model, processor, "what color is the square?", image_file, batch_sizes=(1, 3),
                           repeats=2, max_new_tokens=4, precision="fp32")
    assert [r["batch"] for r in runs] == [1, 3]
    for run in runs:
        stages = run["stages"]
        assert set(stages) == set(STAGES)
        for name in STAGES:
            assert 0 < stages[name]["min_s"] <= stages[name]["median_s"], name
        s = {name: stages[name]["median_s"] for name in STAGES}
        assert s["vision"] + s["connector"] + s["prefill"] + s["image_preprocess"] <= s["time_to_first_token"]
        assert s["time_to_first_token"] + 3 * s["decode_per_token"] <= s["total"] * 1.001
        assert run["decode_tokens_per_s"] == pytest.approx(run["batch"] / s["decode_per_token"])
    text_only = profile_latency(tiny_model, processor, "hello", None, batch_sizes=(2,), repeats=1, max_new_tokens=3)
    assert text_only[0]["stages"]["vision"]["median_s"] == 0.0  # no image, no tower
    with pytest.raises(ValueError, match="max_new_tokens must be at least 2"):
        profile_latency(tiny_model, processor, "hi", max_new_tokens=1)


def test_kv_cache_bytes_follow_the_config(make_config):
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(lm={"num_layers": 3, "num_kv_heads": 2, "head_dim": 12},
                                            connector={"name": "pixel_shuffle", "downsample": 2})).eval()
    lm = model.config.lm
    per_token = 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * 2  # keys and values, bf16
    assert kv_bytes_per_token(model, torch.bfloat16) == per_token == 288
    assert kv_bytes_per_token(model, torch.float32) == 2 * per_token
    rows = image_costs(model, torch.bfloat16, text_tokens=10, new_tokens=5, batch=2)
    assert [r["image_size"] for r in rows] == [16, 32, 64, 128]  # 0.5, 1, 2, 4 x 32 px in whole 8 px patches
    for row in rows:  # (size / 8)^2 patches, 2x2 of them per token
        assert row["connector_tokens"] == row["placeholders"] == (row["image_size"] // 16) ** 2
        assert row["kv_bytes_image"] == row["placeholders"] * per_token
        assert row["kv_bytes_request"] == 2 * (10 + row["placeholders"] + 5) * per_token
    odd = image_costs(model, torch.bfloat16, sizes=[24])  # a 3x3 grid cannot be pixel-shuffled by 2
    assert "error" in odd[0]
    cross = VisionLanguageModel(make_config(fusion="cross_attention"))
    assert image_costs(cross, torch.float32, sizes=[32])[0]["placeholders"] == 1  # tokens stay out of the sequence
    text_only = image_costs(model.lm, torch.float32, text_tokens=10, new_tokens=5)  # a language model alone
    assert text_only == [{"image_size": None, "connector_tokens": 0, "placeholders": 0, "kv_bytes_image": 0,
                          "kv_bytes_request": 15 * 2 * per_token}]
    report = {"latency": [], "image_costs": text_only, "kv_dtype": "float32", "image": None,
              "kv_bytes_per_token": 2 * per_token, "text_tokens": 10, "max_new_tokens": 5}
    assert "a request = 10 text + 5 new tokens" in markdown(report) and "image size" not in markdown(report)


def test_profile_command_and_speed_options(tiny_model, tokenizer, image_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir, tokenizer)
    out = tmp_path / "profile.json"
    assert main(["profile", str(model_dir), "--image", str(image_file), "--prompt", "what color is the star?",
                 "--repeats", "1", "--batch", "1,2", "--max-new-tokens", "3", "--device", "cpu",
                 "--quantize", "int8", "--speculative", "ngram", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("| vision encoder (ms) |", "| time to first token (ms) |", "| decode, per token (ms) |",
                "| image size | connector tokens |"):
        assert row in table
    report = json.loads(out.read_text())
    assert report["quantize"] == "int8" and report["speculative"] == "ngram"
    assert [r["batch"] for r in report["latency"]] == [1, 2]
    assert report["kv_bytes_per_token"] == kv_bytes_per_token(tiny_model, torch.bfloat16)
    assert markdown(report) in table

    question = ["--image", str(image_file), "--device", "cpu", "--max-new-tokens", "4", "what color is the star?"]
    # (The answers equal plain greedy decoding's: tests/test_speculative.py checks that in fp32; chat runs
    # under bf16 autocast, where an exact tie between two logits may go either way.)
    for options in (["--speculative", "early-exit:layers=1"], ["--quantize", "int8", "--speculative", "ngram"]):
        assert main(["chat", str(model_dir), *options, *question]) == 0
    capsys.readouterr()
    assert main(["chat", str(model_dir), "--speculative", "ngram", "--temperature", "0.7", *question]) == 1
    assert "decodes greedily" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat", str(model_dir), "--speculative", "medusa", *question])
    assert "unknown drafter 'medusa'" in capsys.readouterr().err
