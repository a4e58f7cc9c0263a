import pytest
import torch

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.connectors import CONNECTORS, build_connector


@pytest.mark.parametrize("name,grid,expected", [
    ("linear", (4, 4), 16),
    ("mlp2x_gelu", (4, 6), 24),
    ("pixel_shuffle", (4, 6), 6),
])
def test_output_shape_matches_token_count(name, grid, expected):
    conn = build_connector(ConnectorConfig(name=name, downsample=2), vision_dim=12, lm_dim=20)
    feats = torch.randn(3, grid[0] * grid[1], 12)
    out = conn(feats, grid)
    assert conn.num_tokens(grid) == expected
    assert out.shape == (3, expected, 20)


def test_prefix_token_counts_for_per_patch_connectors():
    conn = build_connector(ConnectorConfig(name="linear"), 8, 8, num_prefix_tokens=1)
    assert conn.num_tokens((3, 3)) == 10
    assert conn(torch.randn(2, 10, 8), (3, 3)).shape == (2, 10, 8)


def test_pixel_shuffle_groups_neighbouring_patches():
    # With an identity-like first layer we can read which patches were merged into token 0.
    conn = build_connector(ConnectorConfig(name="pixel_shuffle", downsample=2), vision_dim=1, lm_dim=4)
    grid = (4, 4)
    feats = torch.arange(16.0).view(1, 16, 1)  # patch index as its only feature
    captured = {}
    conn.mlp[0].register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    conn(feats, grid)
    # Token 0 merges patches (0,0),(0,1),(1,0),(1,1) = indices 0,1,4,5; token 1 merges 2,3,6,7.
    assert captured["x"][0, 0].tolist() == [0, 1, 4, 5]
    assert captured["x"][0, 1].tolist() == [2, 3, 6, 7]


def test_pixel_shuffle_errors():
    conn = build_connector(ConnectorConfig(name="pixel_shuffle", downsample=3), 4, 4)
    with pytest.raises(ValueError, match="not divisible by downsample 3"):
        conn.num_tokens((4, 4))
    with pytest.raises(ConfigError, match="keep_cls"):
        build_connector(ConnectorConfig(name="pixel_shuffle"), 4, 4, num_prefix_tokens=1)


def test_unknown_connector_lists_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        build_connector(ConnectorConfig(name="qformerx"), 4, 4)
    assert {"linear", "mlp2x_gelu", "pixel_shuffle", "perceiver", "c_abstractor"} <= set(CONNECTORS)


@pytest.mark.parametrize("name,prefix,grid,rows_cols", [
    ("linear", 1, (3, 4), (3, 4)),
    ("pixel_shuffle", 0, (4, 6), (2, 3)),
    ("c_abstractor", 0, (5, 7), (8, 8)),  # pools any grid to sqrt(num_queries) per side
])
def test_grid_embedding_adds_its_row_and_column_to_each_image_token(name, prefix, grid, rows_cols):
    conn = build_connector(ConnectorConfig(name=name, grid_embedding=True), 6, 5, num_prefix_tokens=prefix)
    plain = build_connector(ConnectorConfig(name=name), 6, 5, num_prefix_tokens=prefix)
    plain.load_state_dict(conn.state_dict(), strict=False)
    feats = torch.randn(2, prefix + grid[0] * grid[1], 6)
    assert torch.equal(conn(feats, grid), plain(feats, grid))  # zero-initialised: a no-op at start
    with torch.no_grad():
        conn.grid_embedding.rows.normal_()
        conn.grid_embedding.cols.normal_()
    delta = conn(feats, grid) - plain(feats, grid)
    assert torch.equal(delta[:, :prefix], torch.zeros_like(delta[:, :prefix]))  # CLS-like tokens untouched
    rows, cols = rows_cols
    for token in range(rows * cols):
        r, c = divmod(token, cols)
        expected = conn.grid_embedding.rows[r] + conn.grid_embedding.cols[c]
        assert torch.allclose(delta[0, prefix + token], expected, atol=1e-6)


def test_grid_embedding_refuses_a_grid_larger_than_its_table():
    conn = build_connector(ConnectorConfig(name="linear", grid_embedding=True), 4, 4)
    with pytest.raises(ValueError, match="exceeds the 64 per side"):
        conn(torch.randn(1, 65 * 2, 4), (65, 2))


def test_qformer_gives_num_queries_tokens_whatever_the_grid():
    conn = build_connector(ConnectorConfig(name="qformer", num_queries=5, num_layers=3, num_heads=2, hidden_size=16),
                           vision_dim=12, lm_dim=20, num_prefix_tokens=1)
    for grid in [(2, 2), (4, 6)]:
        assert conn.num_tokens(grid) == 5
        assert conn(torch.randn(3, 1 + grid[0] * grid[1], 12), grid).shape == (3, 5, 20)
    # Cross-attention on layers 0 and 2 (every `cross_attention_frequency` = 2 layers), as BLIP-2.
    assert [layer.cross_attn is not None for layer in conn.qformer.layers] == [True, False, True]
    assert all(layer.text_ffn is None for layer in conn.qformer.layers)  # a connector has no text path
    assert conn.qformer.hidden_size == 16
    assert build_connector(ConnectorConfig(name="qformer", num_heads=2), 12, 20).qformer.hidden_size == 12


def test_qformer_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="connector.hidden_size 12 .* not divisible by connector.num_heads 5"):
        build_connector(ConnectorConfig(name="qformer", num_heads=5), 12, 8)
    with pytest.raises(ConfigError, match="connector.cross_attention_frequency must be >= 1"):
        build_connector(ConnectorConfig(name="qformer", num_heads=2, cross_attention_frequency=0), 12, 8)
    with pytest.raises(ConfigError, match="connector.grid_embedding: the qformer connector's tokens have no grid"):
        build_connector(ConnectorConfig(name="qformer", num_heads=2, grid_embedding=True), 12, 8)


def test_a_vlm_with_a_qformer_connector_has_k_tokens_per_image(make_config, tokenizer):
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(connector={"name": "qformer", "num_queries": 3, "num_heads": 2})).eval()
    assert model.tokens_per_image == model.image_token_count(48, 64) == 3
    ids = torch.tensor([[5, tokenizer.image_id, tokenizer.image_id, tokenizer.image_id, 7]])
    out = model(ids, torch.randn(1, 3, 32, 32), labels=ids)
    assert out.logits.shape == (1, 5, tokenizer.vocab_size) and torch.isfinite(out.loss)
