"""`vlmkit export --format llava-hf`: transformers loads the result and computes our logits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.chat import ChatFormat
from vlmkit.data.images import ImageProcessor
from vlmkit.hf.llava import ExportError, export_llava_hf
from vlmkit.models.vlm import VisionLanguageModel

transformers = pytest.importorskip("transformers")

TOL = 1e-4
RAW = {"feature_norm": False}  # Llava feeds raw hidden states to its projector
CASES = {
    # CLIP-style tower whose patch bias and layer scale must be folded into CLIP's weights.
    "clip-llama-mlp": dict(vision={**RAW, "pre_layernorm": True, "patch_bias": True, "layerscale": True,
                                   "activation": "quick_gelu", "select_layer": -2},
                           connector={"name": "mlp2x_gelu"}),
    # DINOv2-style tower at a non-native size (positions resampled at export), CLS kept, Qwen2-style LM.
    "dinov2-qwen2-linear": dict(vision={**RAW, "layerscale": True, "native_image_size": 48, "keep_cls": True,
                                        "select_layer": -1},
                                lm={"qkv_bias": True, "tie_word_embeddings": False}, connector={"name": "linear"}),
    # DINOv2-style tower without layer scale (identity scales are written), the demo's tower layout.
    "dinov2-no-layerscale": dict(vision={**RAW, "select_layer": -1}, connector={"name": "mlp2x_gelu"}),
    # SigLIP-style tower: no CLS token, no patch bias, no final norm, tanh GELU.
    "siglip-llama-mlp": dict(vision={**RAW, "use_cls_token": False, "patch_bias": False, "post_layernorm": False,
                                     "activation": "gelu_tanh"},
                             lm={"tie_word_embeddings": False}, connector={"name": "mlp2x_gelu"}),
}


def random_model(config):
    torch.manual_seed(0)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():  # random norms, biases and scales: a folding mistake cannot hide behind init values
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("scale") or "norm" in name:
                p.normal_(1.0 if name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight")) else 0.0,
                          0.3)
    return model


def sample(model, tokenizer):
    chat = ChatFormat(tokenizer, model.tokens_per_image)
    enc = chat.encode([{"role": "user", "content": "<image>\nwhat color is the square?"},
                       {"role": "assistant", "content": "green"}])
    return torch.tensor([enc.input_ids]), torch.randn(1, 3, 32, 32)


def load_llava(path):
    ref, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return ref.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_llava_logits_match_ours(case, make_config, tokenizer, tmp_path):
    model = random_model(make_config(**CASES[case]))
    out = export_llava_hf(model, tokenizer, tmp_path / "llava")
    ref = load_llava(out)
    ids, pixels = sample(model, tokenizer)
    with torch.no_grad():
        expected = model(ids, pixels).logits
        got = ref(input_ids=ids, pixel_values=pixels).logits
    assert (expected - got).abs().max().item() <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == tokenizer.image_id
    assert config["vision_feature_layer"] == model.config.vision.select_layer
    # "default" drops the CLS token; "full" keeps it (keep_cls), or there is none (SigLIP).
    strategy = "default" if case in ("clip-llama-mlp", "dinov2-no-layerscale") else "full"
    assert config["vision_feature_select_strategy"] == strategy
    assert (ref.lm_head.weight is ref.model.language_model.embed_tokens.weight) == model.config.lm.tie_word_embeddings


def test_cli_export_with_processor_and_tokenizer(make_config, tokenizer, tmp_path, capsys):
    model = random_model(make_config(**CASES["clip-llama-mlp"]))
    model.save_pretrained(tmp_path / "model", tokenizer)
    out = tmp_path / "llava"
    assert main(["export", "--format", "llava-hf", str(tmp_path / "model"), str(out)]) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out

    # The processor expands one <image> to the tower's token count and preprocesses as we do.
    processor = transformers.AutoProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    ids, _ = sample(model, tokenizer)
    text = ChatFormat(tokenizer, 1).render([{"role": "user", "content": "<image>\nwhat color is the square?"},
                                            {"role": "assistant", "content": "green"}])
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids[0].tolist()
    ours = ImageProcessor.from_vision_config(model.config.vision)(image)
    assert (inputs["pixel_values"][0] - ours).abs().max().item() < 1e-5

    ref = load_llava(out)
    with torch.no_grad():
        expected = model(ids, inputs["pixel_values"]).logits
        got = ref(**inputs).logits
    assert (expected - got).abs().max().item() <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"] == \
        ChatFormat(tokenizer).encode(messages, add_generation_prompt=True).input_ids


def test_unsupported_parts_are_named(make_config, tokenizer, tmp_path, capsys):
    model = VisionLanguageModel(make_config(connector={"name": "pixel_shuffle"}))  # feature_norm: true by default
    with pytest.raises(ExportError, match=r"connector 'pixel_shuffle'.*; vision.feature_norm: true"):
        export_llava_hf(model, tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model.save_pretrained(tmp_path / "model", tokenizer)
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "cannot export to llava-hf: connector 'pixel_shuffle'" in err and "Traceback" not in err
    conv = VisionLanguageModel(make_config(vision={"stem": "conv", "feature_norm": False}))
    with pytest.raises(ExportError, match=r"vision.stem 'conv': .* one patchify conv"):
        export_llava_hf(conv, tokenizer, tmp_path / "y")


# -- LLaVA-NeXT (AnyRes) -------------------------------------------------------------------------------

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
NEXT_CASES = {  # the Llava cases with AnyRes (a tower's CLS token has no place in the joined tile grids)
    **{case: {**overrides, "vision": {**overrides["vision"], "keep_cls": False},
              "image": {"anyres": {"grid_pinpoints": PINPOINTS}}} for case, overrides in CASES.items()},
    # 48 px tiles for a tower configured at 32 px: the exported tower runs at the tile size.
    "clip-tiles-48": {**CASES["clip-llama-mlp"], "image": {"anyres": {"grid_pinpoints": [[48, 96], [96, 96]],
                                                                        "base": 48}}},
}


def next_batch(model, tokenizer, sizes):
    """Prompts about images of `sizes`, right-padded, with the tiles both models read."""
    from vlmkit.data.processor import VLMProcessor

    processor = VLMProcessor.for_model(model, tokenizer)
    rng = np.random.default_rng(0)
    tiles = [processor.preprocess(Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8))) for s in sizes]
    rows = [processor.prompt("what color is the square?", image_size=t.size).input_ids for t in tiles]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return tiles, rows, ids, mask


@pytest.mark.parametrize("case", sorted(NEXT_CASES))
def test_llava_next_logits_match_ours(case, make_config, tokenizer, tmp_path):
    model = random_model(make_config(**NEXT_CASES[case]))
    out = export_llava_hf(model, tokenizer, tmp_path / "next", "llava-next-hf")
    ref, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref.eval()
    base = model.config.image.anyres.base
    tiles, rows, ids, mask = next_batch(model, tokenizer, [(40, 90), (100, 37), (2 * base, 2 * base)])
    padded = torch.zeros(len(tiles), max(len(t.pixels) for t in tiles), 3, base, base)
    for i, t in enumerate(tiles):
        padded[i, : len(t.pixels)] = t.pixels
    with torch.no_grad():
        expected = model(ids, torch.cat([t.pixels for t in tiles]), attention_mask=mask,
                         image_sizes=[t.size for t in tiles]).logits
        got = ref(input_ids=ids, attention_mask=mask, pixel_values=padded,
                  image_sizes=torch.tensor([t.size for t in tiles])).logits
    for i, row in enumerate(rows):
        assert (expected[i, : len(row)] - got[i, : len(row)]).abs().max().item() <= TOL
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["vision_config"]["image_size"] == base
    assert config["image_grid_pinpoints"] == [list(p) for p in model.config.image.anyres.grid_pinpoints]


def test_cli_exports_llava_next_with_a_processor_that_tiles_as_we_do(make_config, tokenizer, tmp_path, capsys):
    model = random_model(make_config(**NEXT_CASES["siglip-llama-mlp"]))
    model.save_pretrained(tmp_path / "model", tokenizer)
    out = tmp_path / "next"
    assert main(["export", str(tmp_path / "model"), str(out)]) == 0  # the format follows the model
    assert "(llava-next-hf)" in capsys.readouterr().out
    processor = transformers.AutoProcessor.from_pretrained(out)
    tiles, rows, _, _ = next_batch(model, tokenizer, [(100, 37)])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 37, 3), dtype=np.uint8))
    text = ChatFormat(tokenizer, 1).render([{"role": "user", "content": "<image>\nwhat color is the square?"}],
                                           add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == rows[0]  # <image> expanded to our count for this size
    assert torch.equal(inputs["pixel_values"][0], tiles[0].pixels)
    ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(inputs["input_ids"], tiles[0].pixels, image_sizes=[tiles[0].size]).logits
        got = ref(**inputs).logits
    assert (expected - got).abs().max().item() <= TOL


def test_formats_refuse_the_other_kind_of_model(make_config, tokenizer, tmp_path):
    anyres_model = VisionLanguageModel(make_config(**NEXT_CASES["clip-llama-mlp"]))
    with pytest.raises(ExportError, match="cannot export to llava-hf: image.anyres: .* --format llava-next-hf"):
        export_llava_hf(anyres_model, tokenizer, tmp_path / "x")
    plain = VisionLanguageModel(make_config(**CASES["clip-llama-mlp"]))
    with pytest.raises(ExportError, match="cannot export to llava-next-hf: no image.anyres"):
        export_llava_hf(plain, tokenizer, tmp_path / "y", "llava-next-hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
