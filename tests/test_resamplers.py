"""The resampling connectors, `perceiver` and `c_abstractor`: a fixed token count per image whatever its size.

Parity of `perceiver` with Idefics2's resampler is in test_parity.py.
"""

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.data.processor import VLMProcessor
from vlmkit.models.connectors import build_connector
from vlmkit.models.vlm import VisionLanguageModel

RESAMPLERS = ["perceiver", "c_abstractor"]


@pytest.mark.parametrize("name", RESAMPLERS)
@pytest.mark.parametrize("grid", [(4, 4), (6, 3)])
def test_fixed_token_count_whatever_the_grid(name, grid):
    conn = build_connector(ConnectorConfig(name=name, num_queries=9, num_heads=2), vision_dim=12, lm_dim=20)
    out = conn(torch.randn(2, grid[0] * grid[1], 12), grid)
    assert conn.num_tokens(grid) == 9
    assert out.shape == (2, 9, 20)


def test_perceiver_reads_prefix_tokens_as_context():
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(name="perceiver", num_queries=4, num_heads=2), 8, 8, num_prefix_tokens=1)
    assert conn.num_tokens((3, 3)) == 4
    feats = torch.randn(2, 10, 8)
    changed = feats.clone()
    changed[:, 0] += 1.0  # only the CLS token differs
    assert not torch.allclose(conn(feats, (3, 3)), conn(changed, (3, 3)))


def test_c_abstractor_keeps_locality():
    # A change to the top-left 2x2 patches of an 8x8 grid moves the top-left token most, and leaves
    # the far corner's token alone (3x3 convolutions reach one cell per block on each side).
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(name="c_abstractor", num_queries=16, num_layers=1), 8, 8).eval()
    assert conn.token_grid((8, 8)) == (4, 4)
    feats = torch.randn(1, 64, 8)
    changed = feats.view(1, 8, 8, 8).clone()
    changed[:, :2, :2] += 3.0
    with torch.no_grad():
        delta = (conn(changed.view(1, 64, 8), (8, 8)) - conn(feats, (8, 8))).norm(dim=-1)[0]
    assert delta.argmax().item() == 0 and delta[0] > 0
    assert delta[15].item() == 0


def test_c_abstractor_grid_embedding_marks_the_pooled_grid():
    conn = build_connector(ConnectorConfig(name="c_abstractor", num_queries=4, grid_embedding=True), 6, 5)
    with torch.no_grad():
        conn.grid_embedding.rows.normal_()
    feats = torch.randn(1, 20, 6)
    tokens = conn(feats, (4, 5))
    plain = conn.project(feats, (4, 5))
    assert torch.allclose(tokens[0, 3] - plain[0, 3], conn.grid_embedding.rows[1] + conn.grid_embedding.cols[1])


@pytest.mark.parametrize("name", RESAMPLERS)
def test_bf16_autocast_stays_close_to_fp32(name):
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(name=name, num_queries=4, num_heads=2), 16, 32).eval()
    feats = torch.randn(2, 16, 16)
    with torch.no_grad():
        full = conn(feats, (4, 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = conn(feats, (4, 4)).float()
        bf16 = conn.to(torch.bfloat16)(feats.bfloat16(), (4, 4)).float()
    for out in (half, bf16):
        assert torch.isfinite(out).all()
        assert (out - full).norm() / full.norm() < 0.05


@pytest.mark.parametrize("settings,match", [
    ({"name": "c_abstractor", "num_queries": 50}, "connector.num_queries must be a perfect square.*got 50; e.g. 49"),
    ({"name": "c_abstractor", "num_layers": -1}, "connector.num_layers must be >= 0"),
    ({"name": "perceiver", "grid_embedding": True}, "connector.grid_embedding: .*no grid layout"),
    ({"name": "perceiver", "num_queries": 0}, "connector.num_queries must be >= 1"),
    ({"name": "perceiver", "hidden_size": 30, "num_heads": 4}, "hidden_size 30 .* not divisible by .*num_heads 4"),
    ({"name": "perceiver", "num_heads": 4, "num_kv_heads": 3}, "num_heads 4 is not a multiple of .*num_kv_heads 3"),
])
def test_bad_settings_name_the_field(settings, match):
    with pytest.raises(ConfigError, match=match):
        build_connector(ConnectorConfig(**settings), 16, 32)


def test_c_abstractor_refuses_prefix_tokens_and_perceiver_has_no_token_grid():
    with pytest.raises(ConfigError, match="c_abstractor works on the patch grid only: set vision.keep_cls: false"):
        build_connector(ConnectorConfig(name="c_abstractor", num_queries=4), 8, 8, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="no rows x columns layout"):
        build_connector(ConnectorConfig(name="perceiver"), 8, 8).token_grid((4, 4))


@pytest.mark.parametrize("name", RESAMPLERS)
def test_tiny_vlm_trains_round_trips_and_reports_its_tokens(name, make_config, tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = VisionLanguageModel(make_config(connector={"name": name, "num_queries": 4, "num_heads": 2,
                                                       "num_layers": 1}))
    assert model.tokens_per_image == 4 and model.image_token_count(48, 40) == 4
    assert [t.shape for t in model.encode_images([torch.randn(3, 32, 32), torch.randn(3, 48, 40)])] == [(4, 32)] * 2

    # A fixed batch whose answers differ by image only; every connector weight gets a gradient.
    processor = VLMProcessor.for_model(model, tokenizer)
    encoded = [processor.encode({"conversations": [{"from": "human", "value": "<image>\nwhat color?"},
                                                   {"from": "gpt", "value": color}]}) for color in ("red", "blue")]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_id] * (width - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in encoded])
    pixels = torch.randn(2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.any() for p in model.connector.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses

    model.eval().save_pretrained(tmp_path / "m", tokenizer)
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.connector == model.config.connector
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, loaded(ids, pixels).logits)
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"connector         {name}: " in out and "M params, 4 tokens per image" in out
