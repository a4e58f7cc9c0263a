"""The fusion seam: splice is the default and unchanged; a fusion that does not splice reaches every layer
through its adapters, at the prefill and at every cached decode step, from outside the LM."""

import json
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlmkit.config import ConfigError, ModelConfig
from vlmkit.data.processor import VLMProcessor
from vlmkit.eval.generation import left_pad
from vlmkit.hf.llava import ExportError, check_exportable
from vlmkit.models.fusion import FUSIONS, Fusion, FusionOutput, LayerContext, SpliceFusion
from vlmkit.models.language import LanguageModel
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.config import OptimConfig
from vlmkit.train.optim import param_groups
from vlmkit.train.stages import freeze


class Call(NamedTuple):
    layer: int
    length: int  # positions in this forward: the prompt at the prefill, 1 per cached decode step
    context: object
    start: int  # sequence index of the first of those positions


class GatedCrossAttention(nn.Module):
    """A layer adapter: hidden + tanh(gate) * attention over the row's image tokens. Logs every call."""

    def __init__(self, dim: int, layer_index: int, calls: list[Call]):
        super().__init__()
        self.layer_index, self.calls = layer_index, calls
        self.query = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))  # zero-init: the LM starts unchanged

    def forward(self, hidden: torch.Tensor, context, start: int) -> torch.Tensor:
        self.calls.append(Call(self.layer_index, hidden.shape[1], context, start))
        tokens, has_token = context
        scores = self.query(hidden) @ tokens.transpose(1, 2) / hidden.shape[-1] ** 0.5
        weights = scores.masked_fill(~has_token[:, None], float("-inf")).softmax(-1).nan_to_num()
        return hidden + torch.tanh(self.gate) * (weights @ tokens)


class RecordingCrossAttention(Fusion):
    """Leaves the input embeddings alone (placeholders keep the `<image>` embedding); each row's image
    tokens are the layer context, read by one adapter per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.calls: list[Call] = []
        self.adapters = nn.ModuleList(GatedCrossAttention(cfg.lm.hidden_size, i, self.calls)
                                      for i in range(cfg.lm.num_layers))

    def forward(self, embeds, image_embeds, is_image) -> FusionOutput:
        per_row = (is_image.sum(1) // image_embeds.shape[1]).tolist()
        rows = [images.reshape(-1, images.shape[-1]) for images in image_embeds.split(per_row)]
        tokens = pad_sequence(rows, batch_first=True).to(embeds.dtype)
        has_token = pad_sequence([torch.ones(len(r), dtype=torch.bool, device=embeds.device) for r in rows],
                                 batch_first=True)
        return FusionOutput(embeds, LayerContext(self.adapters, (tokens, has_token)))


@pytest.fixture
def xattn_model(make_config, monkeypatch):
    monkeypatch.setitem(FUSIONS, "xattn", RecordingCrossAttention)
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(fusion="xattn")).eval()
    with torch.no_grad():
        for adapter in model.fusion.adapters:
            adapter.gate.fill_(2.0)  # as if trained: the adapters change the LM's output
    return model


def prompts(model, tokenizer, answers=("", "", "")):
    chat = VLMProcessor.for_model(model, tokenizer)
    questions = ["what color is the square?", "how many?", "is there a yellow cross in the image? answer"]
    rows = [chat.prompt(q).input_ids + tokenizer.encode(a) for q, a in zip(questions, answers)]
    return left_pad(rows, tokenizer.pad_id)


def forwards(calls: list[Call], num_layers: int) -> list[list[Call]]:
    """The calls of each forward pass, checked to visit every layer in order."""
    groups = [calls[i : i + num_layers] for i in range(0, len(calls), num_layers)]
    for group in groups:
        assert [c.layer for c in group] == list(range(num_layers))
        assert len({c.length for c in group}) == 1
    return groups


# -- splice: the default, unchanged ----------------------------------------------------------


def test_splice_is_the_default_and_has_no_weights(tiny_model):
    assert ModelConfig().fusion == "splice" and isinstance(tiny_model.fusion, SpliceFusion)
    assert {k.split(".")[0] for k in tiny_model.state_dict()} == {"vision", "connector", "lm"}


def test_models_saved_without_the_field_load_as_splice(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["model"].pop("fusion") == "splice"
    path.write_text(json.dumps(meta))
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion == "splice"
    ids, mask = prompts(tiny_model, tokenizer)
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.equal(tiny_model(ids, pixels, attention_mask=mask).logits,
                       loaded(ids, pixels, attention_mask=mask).logits)


def test_unknown_fusion_is_a_config_error_naming_the_known_ones(make_config, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"fusion: unknown fusion 'xattn'; choose one of \['cross_attention', "
                                          r"'splice'\]"):
        VisionLanguageModel(make_config(fusion="xattn"))
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(path.read_text().replace('"fusion": "splice"', '"fusion": "xattn"'))
    with pytest.raises(ConfigError, match="unknown fusion 'xattn'"):
        VisionLanguageModel.from_pretrained(tmp_path / "m")


# -- a fusion that does not splice -----------------------------------------------------------


def test_context_reaches_every_layer_at_prefill_and_at_each_cached_step(xattn_model, tokenizer):
    ids, mask = prompts(xattn_model, tokenizer)
    pixels = torch.randn(3, 3, 32, 32)
    calls, num_layers = xattn_model.fusion.calls, xattn_model.config.lm.num_layers
    cached = xattn_model.generate(ids, mask, pixels, max_new_tokens=6)
    prefill, *steps = forwards(calls, num_layers)
    assert prefill[0].length == ids.shape[1] and prefill[0].start == 0
    assert len(steps) >= 5 and all(step[0].length == 1 for step in steps)
    assert [step[0].start for step in steps] == list(range(ids.shape[1], ids.shape[1] + len(steps)))
    context = prefill[0].context
    assert all(call.context is context for call in calls)  # computed once, carried by the cache
    assert context[0].shape == (3, xattn_model.tokens_per_image, xattn_model.config.lm.hidden_size)

    calls.clear()
    uncached = xattn_model.generate(ids, mask, pixels, max_new_tokens=6, use_cache=False)
    assert all(group[0].length > ids.shape[1] and group[0].start == 0 for group in forwards(calls, num_layers)[1:])
    assert cached == uncached


def test_cached_decode_matches_the_full_forward(xattn_model, tokenizer):
    ids, mask = prompts(xattn_model, tokenizer, answers=("it is green", "three", "no"))
    prompt_len = prompts(xattn_model, tokenizer)[0].shape[1]
    ids, mask = ids[:, -(prompt_len + 3):], mask[:, -(prompt_len + 3):]  # each row: prompt + 3 answer tokens
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = xattn_model(ids, pixels, attention_mask=mask).logits
        fused = xattn_model.fuse(ids, pixels)
        lm = xattn_model.lm
        plain = lm(inputs_embeds=fused.inputs_embeds, attention_mask=mask).logits
        cache = lm.new_cache(3, ids.shape[1])
        steps = [lm(inputs_embeds=fused.inputs_embeds[:, :prompt_len], attention_mask=mask[:, :prompt_len],
                    cache=cache, context=fused.context).logits]
        for i in range(prompt_len, ids.shape[1]):  # no context passed: the cache carries it
            steps.append(lm(inputs_embeds=fused.inputs_embeds[:, i : i + 1], attention_mask=mask[:, : i + 1],
                            cache=cache).logits)
    real = mask.bool()
    assert (full - torch.cat(steps, dim=1))[real].abs().max().item() <= 1e-5
    assert (full - plain)[real].abs().max().item() > 1e-2  # the adapters matter, so the match is not vacuous


def test_adapters_live_beside_the_lm(xattn_model, tiny_model, tokenizer, tmp_path):
    lm_keys = LanguageModel(xattn_model.config.lm).state_dict().keys()
    assert xattn_model.lm.state_dict().keys() == lm_keys
    xattn_model.lm.load_state_dict(tiny_model.lm.state_dict(), strict=True)  # an LM checkpoint loads strictly
    adapter_keys = set(xattn_model.state_dict()) - set(tiny_model.state_dict())
    assert adapter_keys and all(k.startswith("fusion.adapters.") for k in adapter_keys)

    freeze(xattn_model.lm, False)
    assert all(p.requires_grad for p in xattn_model.fusion.parameters())
    groups = param_groups(xattn_model, OptimConfig(lr=1e-3, module_lr={"fusion": 1e-2}))
    assert {g["name"]: g["lr"] for g in groups}["fusion.no_decay"] == 1e-2  # the gates
    assert {g["name"]: g["lr"] for g in groups}["fusion"] == 1e-2
    assert not any(g["name"].startswith("lm") for g in groups)

    ids = torch.tensor([VLMProcessor.for_model(xattn_model, tokenizer).prompt("how many?").input_ids])
    xattn_model(ids, torch.randn(1, 3, 32, 32)).logits.sum().backward()
    assert all(a.gate.grad is not None and a.gate.grad.abs() > 0 for a in xattn_model.fusion.adapters)

    xattn_model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert loaded.config.fusion == "xattn"
    assert all(torch.equal(a.gate, b.gate) for a, b in zip(loaded.fusion.adapters, xattn_model.fusion.adapters))


def test_llava_export_refuses_other_fusions(xattn_model):
    with pytest.raises(ExportError, match="fusion 'xattn'"):
        check_exportable(xattn_model)
