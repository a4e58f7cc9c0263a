import pytest

from vlmkit.config import ConfigError, ModelConfig, to_dict


def test_roundtrip_through_dict():
    cfg = ModelConfig.from_dict({"vision": {"hidden_size": 64, "num_heads": 4}, "connector": {"name": "linear"}})
    again = ModelConfig.from_dict(to_dict(cfg))
    assert again == cfg and again.vision.hidden_size == 64 and again.lm.head_dim == 64


def test_unknown_keys_are_rejected_with_their_path():
    with pytest.raises(ConfigError, match="model.lm: unknown key\\(s\\) \\['hiden_size'\\]"):
        ModelConfig.from_dict({"lm": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="model.vision: expected a mapping"):
        ModelConfig.from_dict({"vision": 3})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig.from_dict({"lm": {"num_heads": 4, "num_kv_heads": 3}})
