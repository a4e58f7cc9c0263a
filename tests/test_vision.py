import pytest
import torch

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.vision import ViT


def small(**kw) -> VisionConfig:
    return VisionConfig(**{"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_layers": 3, "num_heads": 2,
                           "intermediate_size": 32, **kw})


def test_select_layer_runs_only_needed_blocks_and_matches_hidden_states():
    torch.manual_seed(0)
    vit = ViT(small(select_layer=-2)).eval()
    calls = []
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.randn(2, 3, 32, 32)
    feats = vit(x)
    assert calls == [0, 1]  # the last block is skipped
    assert torch.equal(feats, vit.post_layernorm(vit.hidden_states(x)[-2])[:, 1:])
    assert feats.shape == (2, 16, 16)
    raw = ViT(small(select_layer=-2, feature_norm=False))
    raw.load_state_dict(vit.state_dict())
    assert torch.equal(raw(x), vit.hidden_states(x)[-2][:, 1:])


def test_keep_cls_and_no_cls_variants():
    x = torch.randn(1, 3, 32, 32)
    assert ViT(small(keep_cls=True))(x).shape == (1, 17, 16)
    assert ViT(small(use_cls_token=False))(x).shape == (1, 16, 16)
    with pytest.raises(ConfigError, match="feature_norm needs"):
        small(post_layernorm=False)
    with pytest.raises(ConfigError, match="keep_cls"):
        small(use_cls_token=False, keep_cls=True)


def test_position_embeddings_interpolate_to_other_sizes():
    vit = ViT(small()).eval()
    out = vit(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 6 * 8, 16)
    # At the native size interpolation is the identity.
    assert torch.equal(vit.embeddings.positions_for((4, 4)), vit.embeddings.position_embedding)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        vit(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu", "gelu_tanh"])
def test_layerscale_and_activations_build_and_differ(activation):
    torch.manual_seed(0)
    vit = ViT(small(layerscale=True, layerscale_init=0.0, activation=activation)).eval()
    x = torch.randn(1, 3, 32, 32)
    # With zero layer-scale every block is the identity: output equals the embeddings.
    states = vit.hidden_states(x)
    assert torch.equal(states[0], states[-1])


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="vision.activation: 'relu' is not one of"):
        small(activation="relu")
    with pytest.raises(ConfigError, match="select_layer 7 out of range"):
        small(select_layer=7)
