"""The cross_attention fusion (Flamingo): one marker per image, gated blocks that start as the identity,
each text position reading only the images at or before it, at the prefill and at every cached step."""

import pytest
import torch

from vlmkit.config import ConfigError
from vlmkit.data.processor import VLMProcessor
from vlmkit.eval.generation import left_pad
from vlmkit.hf.llava import ExportError, check_exportable
from vlmkit.models.fusion import CrossAttentionFusion
from vlmkit.models.language import LanguageModel
from vlmkit.models.vlm import ImagePlaceholderError, VisionLanguageModel
from vlmkit.train.recipe import read_recipe, stage_config
from vlmkit.train.stages import freeze, stage_class

# Images anywhere: none, one at the start, two with text before, between and after them.
CONTENTS = ["how many objects are there?", "<image> what color is the square?",
            "a red star <image> above a small blue circle <image> is there a yellow cross?"]
IMAGES_PER_ROW = [0, 1, 2]


def xattn_model(make_config, gate: float = 0.0, **overrides) -> VisionLanguageModel:
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(fusion="cross_attention", **overrides)).eval()
    set_gates(model, gate)
    return model


def set_gates(model: VisionLanguageModel, value: float) -> None:
    """Gates as if trained (nonzero: the blocks change the LM's output)."""
    with torch.no_grad():
        for block in model.fusion.blocks.values():
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def batch(model, tokenizer, answers=("", "", "")):
    processor = VLMProcessor.for_model(model, tokenizer)
    rows = [processor.chat.encode([{"role": "user", "content": c}], add_generation_prompt=True).input_ids
            + tokenizer.encode(a) for c, a in zip(CONTENTS, answers)]
    ids, mask = left_pad(rows, tokenizer.pad_id)
    torch.manual_seed(1)
    return ids, mask, torch.randn(sum(IMAGES_PER_ROW), 3, 32, 32)


def logits(model, ids, mask, pixels):
    with torch.no_grad():
        return model(ids, pixels, attention_mask=mask, image_counts=IMAGES_PER_ROW).logits


def markers(ids, tokenizer):
    """Per row, the positions of its `<image>` markers."""
    return [row.nonzero().flatten().tolist() for row in ids == tokenizer.image_id]


# -- config, placeholders, blocks ---------------------------------------------------------------


def test_one_placeholder_per_image_whatever_the_connector_emits(make_config, tokenizer):
    model = xattn_model(make_config)
    processor = VLMProcessor.for_model(model, tokenizer)
    assert model.connector_token_count(32, 32) == 16 and model.connector_token_count(48, 48) == 36
    assert processor.image_tokens(32, 32) == processor.image_tokens(48, 48) == model.tokens_per_image == 1
    enc = processor.encode([{"role": "user", "content": CONTENTS[2]}], image_sizes=[(32, 32), (48, 48)])
    assert enc.image_tokens == [1, 1] and enc.input_ids.count(tokenizer.image_id) == 2
    ids = torch.tensor([enc.input_ids])
    images = [torch.randn(3, 32, 32), torch.randn(3, 48, 48)]  # sizes may differ: one marker each
    assert model(ids, images).logits.shape[:2] == ids.shape
    with pytest.raises(ImagePlaceholderError, match=r"2 image placeholder tokens but 1 image\(s\) x 1 token per "
                                                    r"image = 1; each <image> must expand to exactly 1 placeholder"):
        model(ids, torch.randn(1, 3, 32, 32))


def test_blocks_sit_before_every_nth_lm_block_beside_the_lm(make_config):
    model = xattn_model(make_config, lm={"num_layers": 4}, cross_attention_every=2)
    assert isinstance(model.fusion, CrossAttentionFusion) and list(model.fusion.blocks) == ["1", "3"]
    assert model.lm.state_dict().keys() == LanguageModel(model.config.lm).state_dict().keys()
    extra = {k for k in model.state_dict() if not k.startswith(("vision.", "connector.", "lm."))}
    assert {k.split(".")[2] for k in extra} == {"1", "3"} and all(k.startswith("fusion.blocks.") for k in extra)
    assert len(list(xattn_model(make_config, lm={"num_layers": 4}).fusion.blocks)) == 4  # default: every block


@pytest.mark.parametrize("overrides,message", [
    ({"cross_attention_every": 0}, r"model.cross_attention_every: expected an integer >= 1, got 0"),
    ({"cross_attention_every": 3}, r"cross_attention_every 3 is more than the LM's 2 layers"),
    ({"cross_attention_media": "first"}, r"model.cross_attention_media: 'first' is not one of \['latest', "),
])
def test_bad_settings_are_config_errors_naming_the_field(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(fusion="cross_attention", **overrides)


def test_llava_export_refuses_cross_attention(make_config):
    with pytest.raises(ExportError, match="fusion 'cross_attention': Llava splices image tokens"):
        check_exportable(xattn_model(make_config))


# -- the gates, the masks --------------------------------------------------------------------


def test_closed_gates_leave_the_lm_exactly_as_it_was(make_config, tokenizer):
    model = xattn_model(make_config)
    ids, mask, pixels = batch(model, tokenizer)
    bare = model.lm(input_ids=ids, attention_mask=mask).logits.detach()  # the markers: the <image> embedding
    assert torch.equal(logits(model, ids, mask, pixels), bare)
    set_gates(model, 1.0)
    opened = logits(model, ids, mask, pixels)
    real = mask.bool()
    assert (opened - bare)[real].abs().max() > 1e-2
    # Text before any image (all of row 0, row 2 up to its first marker) is still the bare LM's.
    first = markers(ids, tokenizer)[2][0]
    assert torch.equal(opened[0], bare[0]) and torch.equal(opened[2, :first], bare[2, :first])


@pytest.mark.parametrize("media", ["latest", "all_previous"])
def test_a_token_depends_on_the_images_before_it_never_on_later_ones(make_config, tokenizer, media):
    model = xattn_model(make_config, gate=1.0, cross_attention_media=media)
    ids, mask, pixels = batch(model, tokenizer)
    base = logits(model, ids, mask, pixels)
    for image, marker in zip((1, 2), markers(ids, tokenizer)[2]):  # row 2's images, at its markers
        changed = pixels.clone()
        changed[image] = torch.randn(3, 32, 32)
        out = logits(model, ids, mask, changed)
        assert torch.equal(out[:2], base[:2])  # other rows
        assert torch.equal(out[2, :marker], base[2, :marker])  # before the image's marker: untouched
        assert (out[2, marker:] - base[2, marker:]).abs().amax(-1).min() > 1e-4  # from the marker on


def test_latest_reads_only_the_last_image_all_previous_reads_every_earlier_one(make_config, tokenizer):
    """One block's own output (the model mixes earlier images in through self-attention anyway)."""
    ids, mask, pixels = batch(xattn_model(make_config), tokenizer)
    first, second = markers(ids, tokenizer)[2]
    changed = pixels.clone()
    changed[1] = torch.randn(3, 32, 32)  # row 2's first image
    for media, after_second_changes in (("latest", False), ("all_previous", True)):
        model = xattn_model(make_config, gate=1.0, cross_attention_media=media)
        with torch.no_grad():
            outs = []
            for images in (pixels, changed):
                fused = model.fuse(ids, images, IMAGES_PER_ROW)
                outs.append(fused.context.apply(0, fused.inputs_embeds)[2])
                assert torch.equal(outs[-1][:first], fused.inputs_embeds[2, :first])  # nothing to read: unchanged
        diff = (outs[0] - outs[1]).abs().amax(-1)
        assert diff[first:second].min() > 1e-4
        assert bool((diff[second:] > 1e-4).all()) == after_second_changes
        assert after_second_changes or torch.equal(outs[0][second:], outs[1][second:])


# -- decoding, checkpoints, training ----------------------------------------------------------


@pytest.mark.parametrize("media", ["latest", "all_previous"])
def test_cached_decoding_matches_the_full_forward_and_uncached_generation(make_config, tokenizer, media):
    model = xattn_model(make_config, gate=1.0, cross_attention_media=media)
    prompt_ids, prompt_mask, pixels = batch(model, tokenizer)
    cached = model.generate(prompt_ids, prompt_mask, pixels, IMAGES_PER_ROW, max_new_tokens=6)
    assert cached == model.generate(prompt_ids, prompt_mask, pixels, IMAGES_PER_ROW, max_new_tokens=6,
                                    use_cache=False)

    # Teacher-forced: the answer tokens, decoded one at a time after the prompt, see the row's last image.
    ids, mask, _ = batch(model, tokenizer, answers=("three", "no three", "three"))
    n, answer = prompt_ids.shape[1], 3
    ids, mask = ids[:, -(n + answer):], mask[:, -(n + answer):]  # each row: its prompt + 3 answer tokens
    assert torch.equal(ids[:, :n], prompt_ids)
    full = logits(model, ids, mask, pixels)
    with torch.no_grad():
        fused = model.fuse(prompt_ids, pixels, IMAGES_PER_ROW)
        cache = model.lm.new_cache(3, n + answer)
        steps = [model.lm(inputs_embeds=fused.inputs_embeds, attention_mask=prompt_mask, cache=cache,
                          context=fused.context).logits]
        for i in range(n, n + answer):
            steps.append(model.lm(input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1], cache=cache).logits)
    real = mask.bool()
    assert (full - torch.cat(steps, dim=1))[real].abs().max() <= 1e-5
    assert (full - model.lm(input_ids=ids, attention_mask=mask).logits)[real].abs().max() > 1e-2  # not vacuous


def test_checkpoints_round_trip(make_config, tokenizer, tmp_path):
    model = xattn_model(make_config, gate=0.7, lm={"num_layers": 4}, cross_attention_every=2,
                        cross_attention_media="all_previous")
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    cfg = loaded.config
    assert (cfg.fusion, cfg.cross_attention_every, cfg.cross_attention_media) == ("cross_attention", 2, "all_previous")
    ids, mask, pixels = batch(model, tokenizer)
    assert torch.equal(logits(loaded, ids, mask, pixels), logits(model, ids, mask, pixels))


def test_a_frozen_lm_learns_through_the_blocks(make_config, tokenizer):
    """Tower and LM frozen, connector and blocks trained on one fixed batch whose prompts are all the same:
    the loss falls, and the answers come from the images (swapping them makes the loss large)."""
    model = xattn_model(make_config).train()
    # Embeddings at the scale of a trained LM's: a random tiny LM's logits are too flat to ever be confident.
    torch.nn.init.normal_(model.lm.embed_tokens.weight, std=0.3)
    freeze(model, False)
    freeze(model.connector, True)
    freeze(model.fusion, True)
    processor = VLMProcessor.for_model(model, tokenizer)
    records = [{"conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                                  {"from": "gpt", "value": answer}]} for answer in ("green", "red", "blue", "no")]
    encoded = [processor.encode(r) for r in records]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_id] * (width - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in encoded])
    torch.manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(ids, pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    with torch.no_grad():
        swapped = model(ids, pixels.roll(1, dims=0), labels=labels).loss.item()
    assert swapped > 5 * losses[-1], (swapped, losses[-1])
    assert all(block.attn_gate.item() != 0 for block in model.fusion.blocks.values())
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())


# -- the flamingo recipe -------------------------------------------------------------------------


def test_flamingo_recipe_trains_only_the_connector_and_the_blocks(make_config, tokenizer, tmp_path):
    recipe = read_recipe("flamingo")
    assert list(recipe["stages"]) == ["align", "instruct"]
    for stage in recipe["stages"]:
        cfg = stage_config(recipe, stage, [f"out={tmp_path / stage}"])
        # The recipe's model settings on a tiny tower and a tiny 30-layer LM (SmolLM2's depth): its own
        # parts are imported checkpoints.
        shared = {k: v for k, v in cfg.model.items() if k not in ("vision", "lm")}
        model = VisionLanguageModel(make_config(lm={"num_layers": 30}, **shared))
        assert model.config.fusion == "cross_attention"
        stage_class(stage)(cfg, tokenizer).set_trainable(model)
        trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"connector", "fusion"}
    with pytest.raises(ConfigError, match="data.text_only: text-only conversations train nothing while the LM"):
        stage_config(recipe, "instruct", ["data.text_only=text_only.json"])


def test_the_attention_diagnostic_is_not_available_without_image_tokens_in_the_sequence(make_config, tokenizer):
    from vlmkit.eval.reliability import _attention

    section = _attention(xattn_model(make_config), tokenizer, [], ".", [])
    assert section["status"] == "not available" and "fusion 'cross_attention'" in section["reason"]
