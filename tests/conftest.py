import pytest
import torch

from vlmkit.config import ModelConfig
from vlmkit.data.tokenizer import train_tokenizer
from vlmkit.models.vlm import VisionLanguageModel

CORPUS = [
    "a red star above a small blue circle",
    "what color is the square? it is green",
    "how many objects are there? three",
    "is there a yellow cross in the image? no",
    "where is the purple triangle? <box>120,40,300,210</box>",
] * 20


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on machines without a CUDA device."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=320)


def tiny_config(tokenizer, **overrides) -> ModelConfig:
    data = {
        "image_token_id": tokenizer.image_id,
        "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                   "intermediate_size": 64},
        "lm": {"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
               "num_kv_heads": 2, "intermediate_size": 64},
        "connector": {"name": "mlp2x_gelu"},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return ModelConfig.from_dict(data)


@pytest.fixture
def make_config(tokenizer):
    """Factory: a tiny model config for the session tokenizer, with per-section overrides."""
    return lambda **overrides: tiny_config(tokenizer, **overrides)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_config(tokenizer)).eval()
