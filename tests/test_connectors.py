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
    assert {"linear", "mlp2x_gelu", "pixel_shuffle"} <= set(CONNECTORS)
