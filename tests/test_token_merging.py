"""Token merging (ToMe) in the vision tower: exactness at r = 0, conservation, predicted lengths,
proportional attention, the connectors that can and cannot take merged tokens, and a real DINOv2."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.token_merging import bipartite_merge, merged_token_count
from vlmkit.models.vision import ViT
from vlmkit.models.vlm import VisionLanguageModel


def small(**kw) -> VisionConfig:
    return VisionConfig(**{"image_size": 32, "patch_size": 4, "hidden_size": 16, "num_layers": 3, "num_heads": 2,
                           "intermediate_size": 32, **kw})


def twin(cfg: VisionConfig, r: int, **tome) -> ViT:
    """A tower built like `cfg` but with token merging r, sharing the weights of ViT(cfg) made under seed 0."""
    torch.manual_seed(0)
    plain = ViT(cfg).eval()
    merged = ViT(VisionConfig(**{**cfg.__dict__, "token_merging": {"r": r, **tome}})).eval()
    merged.load_state_dict(plain.state_dict())
    return plain, merged


def plain_forward(vit: ViT, x: torch.Tensor) -> torch.Tensor:
    """The ViT written out without any token merging code: the reference for r = 0."""
    h = vit.embeddings(x)
    for block in vit.blocks[: vit.config.num_selected_blocks]:
        y = block.norm1(h)
        b, n, d = y.shape
        q, k, v = (p(y).view(b, n, vit.config.num_heads, -1).transpose(1, 2)
                   for p in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + block.attn.out_proj(a)
        h = h + block.mlp(block.norm2(h))
    return vit.post_layernorm(h)[:, vit.num_prefix_tokens:]


def test_r_zero_is_the_plain_vit_exactly():
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    plain, merged = twin(small(), r=0)
    with torch.no_grad():
        features, sizes = merged.features_and_sizes(x)
        assert sizes is None
        assert torch.equal(features, plain(x))
        assert torch.equal(features, plain_forward(plain, x))
        assert merged.num_feature_tokens((8, 8)) == 64


@pytest.mark.parametrize("cls", [True, False])
def test_merging_conserves_total_size_and_the_size_weighted_sum(cls):
    torch.manual_seed(0)
    x, metric = torch.randn(2, 21, 8), torch.randn(2, 21, 5)
    sizes = torch.randint(1, 4, (2, 21)).float()
    prefix = 1 if cls else 0
    out, new_sizes = bipartite_merge(x, sizes, metric, r=6, num_prefix=prefix)
    assert out.shape == (2, 15, 8) and new_sizes.shape == (2, 15)
    assert torch.allclose(new_sizes.sum(1), sizes.sum(1))
    assert torch.allclose((out * new_sizes[..., None]).sum(1), (x * sizes[..., None]).sum(1), atol=1e-5)
    if cls:  # the prefix token is never merged: first, unchanged, size 1 kept
        assert torch.allclose(out[:, 0], x[:, 0]) and torch.equal(new_sizes[:, 0], sizes[:, 0])


def test_the_most_similar_pair_is_the_one_merged():
    # Tokens 0 (A) and 3 (B) share a direction; every other pair is orthogonal.
    metric = torch.eye(6)[None].clone()
    metric[0, 3] = metric[0, 0]
    x = torch.arange(6.0)[None, :, None].repeat(1, 1, 2)
    sizes = torch.tensor([[1.0, 1, 1, 3, 1, 1]])
    out, new_sizes = bipartite_merge(x, sizes, metric, r=1)
    # A = tokens 0, 2, 4; B = 1, 3, 5: token 0 (size 1) goes into token 3 (size 3): (0 + 3 * 3) / 4.
    assert out[0, :, 0].tolist() == [2.0, 4.0, 1.0, 2.25, 5.0]
    assert new_sizes.tolist() == [[1.0, 1.0, 1.0, 4.0, 1.0]]


@pytest.mark.parametrize("cfg, r, grid, expected", [
    (dict(), 4, (8, 8), 64 - 4 * 3),  # 65 -> 61 -> 57 -> 53 tokens (CLS included)
    (dict(use_cls_token=False), 20, (8, 8), 12),  # 64 -> 44 -> 24 -> 12 (the last merge clipped to 24 // 2)
    (dict(select_layer=-2), 10, (8, 8), 44),  # two blocks run: 65 -> 55 -> 45
    (dict(keep_cls=True), 100, (8, 8), 1 + 8),  # 65 -> 33 -> 17 -> 9 (each clipped to half the patches)
    (dict(), 3, (6, 10), 60 - 9),  # another image size: the count follows its grid
])
def test_merged_length_is_as_predicted(cfg, r, grid, expected):
    vit = twin(small(**cfg), r)[1]
    x = torch.randn(2, 3, grid[0] * 4, grid[1] * 4)
    with torch.no_grad():
        features, sizes = vit.features_and_sizes(x)
    assert features.shape[1] == vit.num_feature_tokens(grid)
    prefix = 1 if vit.config.use_cls_token else 0
    keep = prefix if vit.config.keep_cls else 0
    blocks = vit.config.num_selected_blocks
    predicted = merged_token_count(grid[0] * grid[1] + prefix, r, blocks, prefix) - prefix + keep
    assert vit.num_feature_tokens(grid) == predicted
    # The totals: every patch is in exactly one output token.
    assert torch.equal(sizes.sum(1), torch.full((2,), float(grid[0] * grid[1] + keep)))
    assert features.shape[1] == expected


def test_merged_token_count_clips_as_tome():
    # ViT-B/16, r = 16: 197 - 16 * 10 = 37 tokens after 10 blocks; then at most half the 36 patches, then of
    # the 20 left: 37 -> 21 -> 11 (not 197 - 16 * 12 = 5).
    assert merged_token_count(197, 16, 12, 1) == 11
    assert merged_token_count(197, 16, 10, 1) == 197 - 16 * 10
    assert (merged_token_count(10, 10, 1, 1), merged_token_count(10, 10, 1, 0)) == (6, 5)  # CLS is not matched
    assert merged_token_count(64, 0, 12) == 64


def test_proportional_attention_makes_a_merged_duplicate_count_twice():
    # Two identical tokens attended to as one token of size 2 (log 2 on its logit) give the same output.
    torch.manual_seed(0)
    vit = ViT(small(num_heads=2)).eval()
    attn = vit.blocks[0].attn
    x = torch.randn(1, 5, 16)
    doubled = torch.cat([x, x[:, -1:]], dim=1)
    with torch.no_grad():
        reference = attn(doubled)[0][:, :5]
        sizes = torch.tensor([[1.0, 1, 1, 1, 2]])
        proportional = attn(x, sizes.log()[:, None, None, :])[0]
        plain = attn(x)[0]
    assert torch.allclose(proportional, reference, atol=1e-6)
    assert not torch.allclose(plain, reference, atol=1e-3)


def test_proportional_attention_can_be_switched_off():
    x = torch.randn(1, 3, 32, 32)
    _, on = twin(small(), r=8)
    _, off = twin(small(), r=8, proportional_attention=False)
    with torch.no_grad():
        a, b = on(x), off(x)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_pooled_is_size_weighted_without_cls():
    plain, merged = twin(small(use_cls_token=False), r=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(merged.pooled(x), plain.pooled(x), atol=0.2)  # close, not equal: tokens were merged
        assert merged.pooled(x).shape == (2, 16)


def test_config_rejects_a_bad_r():
    with pytest.raises(ConfigError, match="vision.token_merging.r: expected an integer >= 0"):
        small(token_merging={"r": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        small(token_merging={"ratio": 2})


# -- in a VLM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("connector", [{"name": "linear"}, {"name": "mlp2x_gelu"},
                                       {"name": "perceiver", "num_queries": 4, "num_layers": 1},
                                       {"name": "qformer", "num_queries": 4, "num_layers": 1, "num_heads": 2}])
def test_per_patch_connectors_and_resamplers_take_the_merged_sequence(make_config, connector):
    cfg = make_config(vision={"token_merging": {"r": 5}}, connector=connector)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    per_patch = connector["name"] in ("linear", "mlp2x_gelu")
    expected = 16 - 5 - 5 if per_patch else 4  # 4x4 patches + CLS: 17 -> 12 -> 7 tokens (2 blocks), CLS dropped
    assert model.image_token_count(32, 32) == expected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.encode_images(x)
        assert tokens.shape[:2] == (2, expected)
        # The frozen-tower path (features computed once, then projected) gives the same tokens.
        assert torch.allclose(model.project_features(model.vision(x)), tokens, atol=1e-6)
        if per_patch:  # another image size: the count follows it
            assert model.encode_images(torch.randn(1, 3, 48, 32)).shape[1] == model.image_token_count(48, 32)


@pytest.mark.parametrize("connector, message", [
    ({"name": "pixel_shuffle"}, "the pixel_shuffle connector needs the patch grid"),
    ({"name": "c_abstractor", "num_queries": 4}, "the c_abstractor connector needs the patch grid"),
    ({"name": "mlp2x_gelu", "grid_embedding": True}, "a grid embedding needs the patch grid"),
])
def test_grid_connectors_refuse_token_merging(make_config, connector, message):
    cfg = make_config(vision={"token_merging": {"r": 2}}, connector=connector)
    with pytest.raises(ConfigError, match=f"vision.token_merging.r 2: {message}"):
        VisionLanguageModel(cfg)


# -- a real DINOv2 ---------------------------------------------------------------------------------


def _dinov2_dir() -> Path | None:
    """$VLMKIT_DINOV2, else where `vlmkit import dinov2-small` writes it."""
    from vlmkit.hf.importers import models_cache_dir

    candidates = [os.environ.get("VLMKIT_DINOV2"), models_cache_dir() / "dinov2-small"]
    return next((Path(c) for c in candidates if c and (Path(c) / "model.safetensors").is_file()), None)


# Measured (grace_hopper.jpg and three crops, 224 px, last layer + final LayerNorm, size-weighted mean):
# the lowest cosine of the four images was 0.9998 / 0.9988 / 0.9935 at r = 4 / 8 / 16 (without
# proportional attention 0.9918 / 0.9780 / 0.9330).
COSINE_FLOORS = {4: 0.999, 8: 0.995, 16: 0.98}


def test_dinov2_small_mean_features_stay_close_under_merging():
    directory = _dinov2_dir()
    if directory is None:
        pytest.skip("no DINOv2-S: run `vlmkit import dinov2-small` (or set VLMKIT_DINOV2=DIR)")
    cbook = pytest.importorskip("matplotlib.cbook", reason="needs matplotlib's sample photo: "
                                                           "pip install 'vlmkit[report]'")
    from PIL import Image

    from vlmkit.data.images import ImageProcessor
    from vlmkit.hf.pretrained import load_vision_tower

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = photo.size
    images = [photo, photo.crop((0, 0, w // 2, h // 2)), photo.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
              photo.crop((w // 2, h // 2, w, h))]
    settings = dict(image_size=224, select_layer=-1, feature_norm=True)
    plain = load_vision_tower(directory, **settings)
    x = torch.stack([ImageProcessor.from_vision_config(plain.config)(image) for image in images])
    with torch.no_grad():
        reference = plain(x).mean(dim=1)
        for r, floor in COSINE_FLOORS.items():
            merged = load_vision_tower(directory, **settings, token_merging={"r": r})
            features, sizes = merged.features_and_sizes(x)
            assert features.shape[1] == 256 - 12 * r
            pooled = (features * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
            cosine = F.cosine_similarity(pooled, reference, dim=-1)
            assert cosine.min() >= floor, f"r={r}: cosines {cosine.tolist()}"


# -- where merging is refused or switched on ----------------------------------------------------------


def test_the_dense_stage_refuses_token_merging():
    from vlmkit.models.dense import DenseConfig

    with pytest.raises(ConfigError, match="vision.token_merging: the dense stage's heads predict per patch-grid cell"):
        DenseConfig(vision=small(token_merging={"r": 2}))


def test_llava_export_refuses_token_merging(make_config):
    from vlmkit.hf.llava import ExportError, check_exportable

    model = VisionLanguageModel(make_config(vision={"token_merging": {"r": 2}, "feature_norm": False},
                                            connector={"name": "linear"}))
    with pytest.raises(ExportError, match="vision.token_merging.r 2: Llava's vision towers do not merge"):
        check_exportable(model)


def test_token_merging_switched_on_at_evaluation(make_config, tokenizer, tmp_path):
    from vlmkit.data.shapes_world import write_dataset
    from vlmkit.eval.run_eval import evaluate

    torch.manual_seed(0)
    model = VisionLanguageModel(make_config())
    model.save_pretrained(tmp_path / "model", tokenizer)
    write_dataset(tmp_path / "data", seed=0, n=10)  # 64 px pictures, resized to the model's 32
    plain = evaluate(tmp_path / "model", data_root=tmp_path / "data", limit=4, out=tmp_path / "a.json")
    merged = evaluate(tmp_path / "model", data_root=tmp_path / "data", limit=4, out=tmp_path / "b.json",
                      token_merging=3)
    assert "token_merging_r" not in plain and merged["token_merging_r"] == 3
    model.set_token_merging(3)
    assert model.tokens_per_image == 16 - 3 - 3
    model.set_token_merging(0)
    assert model.tokens_per_image == 16
    shuffled = VisionLanguageModel(make_config(connector={"name": "pixel_shuffle"}))
    with pytest.raises(ConfigError, match="the pixel_shuffle connector needs the patch grid"):
        shuffled.set_token_merging(1)


def test_activation_checkpointing_replays_the_same_merges():
    """Checkpointed blocks run again in the backward pass: with the merge state each block first saw, so the
    gradients equal the plain run's (fp32), with proportional attention's float bias through `attention`."""
    from vlmkit.models.memory import set_activation_checkpointing

    _, vit = twin(small(), 4, proportional_attention=True)
    vit.train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def grads():
        vit.zero_grad()
        features, sizes = vit.features_and_sizes(pixels)
        (features * sizes[..., None]).square().mean().backward()
        return features.shape, {n: p.grad.clone() for n, p in vit.named_parameters()}

    shape, plain = grads()
    assert shape[1] == vit.num_feature_tokens((8, 8)) < 64
    set_activation_checkpointing(vit)
    shape_again, checkpointed = grads()
    assert shape_again == shape
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-6), name
