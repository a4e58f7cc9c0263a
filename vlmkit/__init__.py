"""vlmkit: build, train, evaluate and stress-test vision-language models."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Loaders of pretrained parts, imported on first use so `import vlmkit` (and the CLI) stays light.
_LAZY = {
    "load_vision_tower": "vlmkit.hf.pretrained",
    "load_language_model": "vlmkit.hf.pretrained",
    "load_tokenizer": "vlmkit.hf.pretrained",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
