"""int8 weight-only quantization: int8 storage, logits close to the float model's, both matmul paths."""

import pytest
import torch
from torch import nn

from vlmkit.config import LanguageConfig
from vlmkit.models.language import LanguageModel
from vlmkit.models.quantize import Int8Linear, quantize_model, quantized_bytes
from vlmkit.models.vlm import VisionLanguageModel


def tiny_lm(hidden: int, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(LanguageConfig(vocab_size=96, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=2 * hidden)).eval()


# hidden 64: every input width is a multiple of 16 (torch's int8 kernel); 40: the dequantizing path.
@pytest.mark.parametrize("hidden", [64, 40])
def test_logits_stay_close_to_the_float_model(hidden):
    float_lm, lm = tiny_lm(hidden), quantize_model(tiny_lm(hidden), "int8")
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = float_lm(ids).logits, lm(ids).logits
    # Tolerance: 1.5% of the logits' spread (max - min). Per-channel int8 errs by at most half a step
    # (max|w| / 254) per weight; measured here 0.3-0.4%.
    assert (got - ref).abs().max() <= 0.015 * (ref.max() - ref.min())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_weights_are_stored_as_int8_with_per_channel_scales():
    float_lm, lm = tiny_lm(64), quantize_model(tiny_lm(64))
    linears = [m for m in lm.modules() if isinstance(m, nn.Linear)]
    int8 = [m for m in lm.modules() if isinstance(m, Int8Linear)]
    assert not linears and len(int8) == 2 * 7 + 1  # q k v o gate up down per layer, and the output head
    for layer in int8:
        assert layer.weight_int8.dtype == torch.int8 and layer.scales.shape == (layer.out_features,)
    original = float_lm.layers[0].mlp.up_proj.weight
    layer = lm.layers[0].mlp.up_proj
    assert torch.all((layer.dequantized() - original).abs() <= layer.scales[:, None] / 2 + 1e-7)
    assert layer.weight_int8.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range
    assert lm.embed_tokens.weight.dtype == torch.float32  # the tied head got its own int8 copy
    linear_floats = sum(m.weight.numel() for m in float_lm.modules() if isinstance(m, nn.Linear)
                        and m is not float_lm.lm_head) * 4
    assert quantized_bytes(float_lm) - quantized_bytes(lm) > 0.7 * linear_floats  # ~3/4 of those bytes gone


def test_kernel_and_dequantizing_paths_agree():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(48, 24))
    for rows in (5, 40):  # CPU, width 48: torch's _weight_int8pack_mm / dequantized weights (more rows), bf16
        x = torch.randn(rows, 48)
        got = layer(x)
        assert got.dtype == torch.float32
        assert torch.allclose(got, nn.functional.linear(x, layer.dequantized(), layer.bias), rtol=0.02, atol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # as a float Linear under autocast


def test_vlm_quantizes_its_lm_and_optionally_the_tower(make_config):
    torch.manual_seed(0)
    model = quantize_model(VisionLanguageModel(make_config()).eval())
    assert model.quantization == "int8"
    assert isinstance(model.lm.layers[0].attn.q_proj, Int8Linear)
    assert isinstance(next(m for m in model.vision.modules() if isinstance(m, (nn.Linear, Int8Linear))), nn.Linear)
    both = quantize_model(VisionLanguageModel(make_config()).eval(), vision=True)
    assert not any(isinstance(m, nn.Linear) for m in [*both.vision.modules(), *both.connector.modules()])
    ids = torch.tensor([[5] + [make_config().image_token_id] * model.tokens_per_image + [6, 7]])
    assert len(both.generate(ids, pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=3)[0]) == 3


def test_errors(make_config, tmp_path):
    model = quantize_model(VisionLanguageModel(make_config()))
    with pytest.raises(ValueError, match="is not saved: save the float model"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_model(tiny_lm(64), "int4")
    with pytest.raises(ValueError, match="needs a VisionLanguageModel"):
        quantize_model(tiny_lm(64), vision=True)
