"""One model-directory format for every vlmkit model: ``config.json`` (a format tag, the vlmkit version
and the model's config) + ``model.safetensors`` (+ tokenizer files), written atomically.

A model with LoRA adapters (see `vlmkit.models.lora`) writes its base weights to ``model.safetensors``
and its adapters beside them in peft's format (``adapter_config.json``, ``adapter_model.safetensors``);
`from_pretrained` folds such adapters into the weights it loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from vlmkit import __version__
from vlmkit.config import from_dict, to_dict
from vlmkit.io import atomic_directory
from vlmkit.models import lora

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training run directory whose final model lives in `model/`."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    return path


def read_model_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a vlmkit model directory?")
    return json.loads(path.read_text())


class Checkpointable:
    """`save_pretrained` / `write` / `from_pretrained` for an ``nn.Module`` with a dataclass ``config``.

    Subclasses name their `FORMAT` (the tag in config.json) and `CONFIG` (the config dataclass)."""

    FORMAT: ClassVar[str]
    CONFIG: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write config.json + model.safetensors (+ tokenizer files) atomically to `directory`."""
        with atomic_directory(directory) as tmp:
            self.write(tmp, tokenizer)

    def write(self, directory: Path, tokenizer=None) -> None:
        """Write the model files into an existing directory (callers make it atomic)."""
        if getattr(self, "quantization", None):  # set by models.quantize.quantize_model
            raise ValueError(f"this model is quantized ({self.quantization}) for inference and is not saved: save "
                             "the float model and quantize it after loading (quantize_model, --quantize)")
        meta = {"format": self.FORMAT, "vlmkit_version": __version__, "model": to_dict(self.config)}
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if lora.has_lora(self):
            weights = {k: v.detach().contiguous() for k, v in lora.base_state_dict(self).items()}
            save_file(weights, str(Path(directory) / WEIGHTS_FILE), metadata={"format": "pt"})
            lora.save_adapter(self, directory)
        else:
            save_model(self, str(Path(directory) / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save(directory)

    def load_weights(self, directory: str | Path, device: str | torch.device = "cpu") -> None:
        """Load a model directory's weights into this model, strictly; a model with LoRA adapters also
        loads the directory's adapters (training resumes with them)."""
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: is {directory} a vlmkit model directory?")
        if lora.has_lora(self):
            lora.load_base_state_dict(self, load_file(str(weights), device=str(device)), str(weights))
            lora.load_adapter(self, directory)
            return
        missing, unexpected = load_model(self, str(weights), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{weights}: missing weights {sorted(missing)}, unexpected {sorted(unexpected)}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """The model a directory holds; LoRA adapters saved beside its weights are folded into them."""
        directory = resolve_model_dir(directory)
        meta = read_model_meta(directory)
        if meta.get("format") != cls.FORMAT:
            raise ValueError(f"{directory / CONFIG_FILE} holds a {meta.get('format')!r} model, not a {cls.FORMAT!r} "
                             f"one ({cls.__name__})")
        model = cls(from_dict(cls.CONFIG, meta["model"], f"{directory / CONFIG_FILE}: model"))
        model.load_weights(directory, device)
        if lora.has_adapter_files(directory):
            lora.load_adapter(model, directory)
            lora.merge_lora(model)
        return model.to(device)
