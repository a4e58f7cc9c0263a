"""Attention recording (parity with transformers' eager attention), image share / entropy, modality gap."""

import json
import math

import pytest
import torch

from vlmkit.data.chat import ChatFormat
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.data.shapes_world import write_dataset
from vlmkit.eval.attention import (
    attention_diagnostics,
    gap_statistics,
    modality_gap,
    plot_attention,
    token_statistics,
)
from vlmkit.hf.hub import lm_state_dict_from_hf, load_into
from vlmkit.models.clip import ClipConfig, DualEncoder
from vlmkit.models.language import positions_from_mask, recording_attention
from vlmkit.models.vlm import VisionLanguageModel

from .conftest import tiny_config


def _record_all(lm, call):
    probs = []
    with recording_attention(lm, lambda layer, p: probs.append((layer, p))):
        call()
    return probs


def test_recorded_probabilities_match_transformers_eager_attention():
    transformers = pytest.importorskip("transformers")
    from .test_parity import _lm_pair

    ref, ours = _lm_pair("llama", tie=False)
    # Larger q/k weights than the default init make the attention peaked rather than near uniform,
    # so that a wrong scale or a wrong mask shows up well above the tolerance.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 0.3)
    load_into(ours, lm_state_dict_from_hf(ref.state_dict()))
    ref.set_attn_implementation("eager")
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions_from_mask(mask), output_attentions=True)
        baseline = ours(ids, attention_mask=mask).logits
        recorded = _record_all(ours, lambda: ours(ids, attention_mask=mask))
        logits = ours(ids, attention_mask=mask).logits
    assert isinstance(expected, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert [layer for layer, _ in recorded] == [0, 1, 2]
    for (_, got), want in zip(recorded, expected.attentions):
        assert got.shape == want.shape == (2, 4, 9, 9)
        real = mask.bool()  # padded query rows differ by convention (they never affect real tokens)
        for b in range(2):
            assert (got[b][:, real[b]] - want[b][:, real[b]]).abs().max().item() <= 1e-5
        assert torch.allclose(got.sum(-1), torch.ones(2, 4, 9), atol=1e-6)
        assert got[0, :, 3:, :3].abs().max().item() == 0.0  # padding keys get no mass
    # Recording is opt-in: it leaves no hook behind and does not change the outputs.
    assert all(layer.attn.record is None for layer in ours.layers)
    assert (logits - baseline).abs().max().item() <= 1e-5


def test_token_statistics_on_a_hand_made_case():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]])  # [B=1, H=2, K=4]
    image_keys = torch.tensor([[False, True, True, False]])
    share, entropy = token_statistics(probs, image_keys)
    assert share.tolist() == pytest.approx([(0.5 + 0.2) / 2])
    h = [-sum(p * math.log(p) for p in row) for row in probs[0].tolist()]
    assert entropy.tolist() == pytest.approx([sum(h) / 2])
    zero = torch.tensor([[[0.5, 0.5, 0.0]]])  # a masked key (p = 0) adds nothing to the entropy
    assert token_statistics(zero, torch.tensor([[True, False, False]]))[1].item() == pytest.approx(math.log(2))


def _records(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, n=20, seed=0)
    rows = [json.loads(line) for line in (root / "test_qa.jsonl").read_text().splitlines()]
    return root, [r for r in rows if r["type"] != "grounding"][:6]


def test_uniform_attention_puts_the_image_token_share_on_the_image(tokenizer, tmp_path_factory):
    """With q = 0 every visible key gets the same weight, so the image share of each generated token
    must be (image tokens) / (visible keys) and its entropy log(visible keys): this fails if image
    positions or padding are misread."""
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(tokenizer)).eval()
    with torch.no_grad():
        for layer in model.lm.layers:
            layer.attn.q_proj.weight.zero_()
    root, records = _records(tmp_path_factory)
    correct = [i % 2 == 0 for i in range(len(records))]
    out = attention_diagnostics(model, tokenizer, records, root, correct, max_new_tokens=3, precision="fp32")

    # Independent expectation: per record, generate alone and average over its tokens.
    chat = ChatFormat(tokenizer, model.tokens_per_image)
    processor = ImageProcessor.from_vision_config(model.config.vision)
    expected = {True: [], False: []}
    for rec, ok in zip(records, correct):
        ids = chat.prompt(rec["question"]).input_ids
        pixels = processor(load_image(root / rec["image"]))[None]
        tokens = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=3,
                                eos_token_id=tokenizer.eos_id)[0]
        n = min(len(tokens) + 1, 3)
        visible = [len(ids) + t for t in range(n)]
        expected[ok].append((sum(model.tokens_per_image / v for v in visible) / n,
                             sum(math.log(v) for v in visible) / n, n))
    assert {len(rec["question"]) for rec in records} != 1  # prompts of different lengths: padding is exercised
    for name, ok in (("correct", True), ("incorrect", False)):
        group = out[name]
        share = sum(e[0] for e in expected[ok]) / len(expected[ok])
        entropy = sum(e[1] for e in expected[ok]) / len(expected[ok])
        assert group["n_answers"] == len(expected[ok])
        assert group["n_tokens"] == sum(e[2] for e in expected[ok])
        assert group["image_share"]["per_layer"] == pytest.approx([share] * 2, abs=1e-5)
        assert group["uniform_image_share"] == pytest.approx(share, abs=1e-5)
        assert group["entropy"]["per_layer"] == pytest.approx([entropy] * 2, abs=1e-4)
    assert plot_attention(out).startswith(b"\x89PNG")


def test_diagnostics_match_a_full_pass_over_each_answer(tokenizer, tmp_path_factory):
    """Batched, padded, cached diagnostics equal an independent per-record computation: one uncached
    forward over prompt + answer, reading the rows that chose each token and the image positions."""
    torch.manual_seed(1)
    model = VisionLanguageModel(tiny_config(tokenizer)).eval()
    with torch.no_grad():  # peaked attention, so image positions matter
        for layer in model.lm.layers:
            layer.attn.q_proj.weight.normal_(0.0, 0.5)
            layer.attn.k_proj.weight.normal_(0.0, 0.5)
    root, records = _records(tmp_path_factory)
    out = attention_diagnostics(model, tokenizer, records, root, [True] * len(records), max_new_tokens=4,
                                precision="fp32")
    chat = ChatFormat(tokenizer, model.tokens_per_image)
    processor = ImageProcessor.from_vision_config(model.config.vision)
    shares, entropies = [], []
    for rec in records:
        ids = chat.prompt(rec["question"]).input_ids
        pixels = processor(load_image(root / rec["image"]))[None]
        tokens = model.generate(torch.tensor([ids]), pixel_values=pixels, max_new_tokens=4,
                                eos_token_id=tokenizer.eos_id)[0]
        n = min(len(tokens) + 1, 4)
        full = torch.tensor([ids + (tokens + [tokenizer.eos_id])[: n - 1]])
        with torch.no_grad():
            probs = [p for _, p in _record_all(model.lm, lambda full=full, pixels=pixels: model(full, pixels))]
        image = (full[0] == tokenizer.image_id).nonzero().flatten()
        rows = [len(ids) - 1 + t for t in range(n)]
        shares.append([sum(p[0, :, r, image].sum(-1).mean().item() for r in rows) / n for p in probs])
        entropies.append([sum((-(p[0, :, r, : r + 1] * p[0, :, r, : r + 1].log()).sum(-1)).mean().item()
                              for r in rows) / n for p in probs])
    layers = len(model.lm.layers)
    expected_share = [sum(s[i] for s in shares) / len(shares) for i in range(layers)]
    expected_entropy = [sum(e[i] for e in entropies) / len(entropies) for i in range(layers)]
    assert out["correct"]["image_share"]["per_layer"] == pytest.approx(expected_share, abs=1e-5)
    assert out["correct"]["entropy"]["per_layer"] == pytest.approx(expected_entropy, abs=1e-4)
    assert max(expected_share) - min(expected_share) > 0.01  # layers differ: the check is not trivial
    assert out["incorrect"]["n_answers"] == 0 and out["incorrect"]["image_share"]["mean"] is None


def test_diagnostics_need_one_flag_per_record(tiny_model, tokenizer, tmp_path_factory):
    root, records = _records(tmp_path_factory)
    with pytest.raises(ValueError, match="6 records but 5 correctness flags"):
        attention_diagnostics(tiny_model, tokenizer, records, root, [True] * 5)


def test_gap_statistics_on_known_geometry():
    e = torch.eye(3)
    same = gap_statistics(e[:2], e[:2])
    assert same["gap"] == pytest.approx(0.0) and same["mean_cosine_matched"] == pytest.approx(1.0)
    # Images at e1, e2 and captions at e1, -e2: centroids (.5, .5) and (.5, -.5), one apart.
    known = gap_statistics(torch.stack([e[0], e[1]]), torch.stack([e[0], -e[1]]))
    assert known["gap"] == pytest.approx(1.0)
    assert known["mean_cosine_matched"] == pytest.approx(0.0)
    assert known["mean_cosine_unmatched"] == pytest.approx(0.0)
    # All images on one axis, all captions on another (scaled: embeddings are normalised first).
    shifted = gap_statistics(3 * e[[0, 0, 0]], 0.5 * e[[1, 1, 1]])
    assert shifted["gap"] == pytest.approx(math.sqrt(2)) and shifted["n_pairs"] == 3
    with pytest.raises(ValueError, match="same shape"):
        gap_statistics(e[:2], e[:3])


def test_modality_gap_of_a_saved_dual_encoder(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    write_dataset(root, n=30, seed=1)
    cfg = ClipConfig(vision=tiny_config(tokenizer).vision,
                     text=tiny_config(tokenizer).lm, embed_dim=16)
    torch.manual_seed(0)
    model = DualEncoder(cfg).eval()
    model_dir = root / "clip"
    model.save_pretrained(model_dir, tokenizer)
    out = modality_gap(model_dir, root, split="val", limit=5)
    # Reference, encoded one by one: the first caption of each of the 3 val images, then two second captions.
    rows = [json.loads(line) for line in (root / "captions_val.jsonl").read_text().splitlines()]
    images = list(dict.fromkeys(r["image"] for r in rows))
    assert len(images) == 3
    by_image = [[r for r in rows if r["image"] == image] for image in images]
    pairs = [by_image[0][0], by_image[1][0], by_image[2][0], by_image[0][1], by_image[1][1]]
    processor = ImageProcessor.from_vision_config(cfg.vision)
    with torch.no_grad():
        img = torch.cat([model.encode_image(processor(load_image(root / p["image"]))[None]) for p in pairs])
        txt = torch.cat([model.encode_text(torch.tensor([tokenizer.encode(p["caption"])]),
                                           torch.ones(1, len(tokenizer.encode(p["caption"])))) for p in pairs])
    expected = gap_statistics(img, txt)
    assert out["n_pairs"] == 5 and out["split"] == "val"
    for key in ("gap", "mean_cosine_matched", "mean_cosine_unmatched"):
        assert out[key] == pytest.approx(expected[key], abs=1e-5)
    assert 0 < out["gap"] < 2
    with pytest.raises(FileNotFoundError, match="captions_nope.jsonl not found"):
        modality_gap(model_dir, root, split="nope")
