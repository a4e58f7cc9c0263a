"""Low-rank adapters (LoRA, Hu et al. 2021) on any vlmkit model, through `peft`, saved in peft's format.

`add_lora` puts peft's LoRA layers in place of the selected linear layers (the model stays the same
object, with the same methods; a LoRA layer keeps its original layer as ``base_layer``). A model
directory of an adapted model (`Checkpointable.write`) holds the *base* weights under their plain
names in ``model.safetensors`` and the adapters beside them as peft writes them:
``adapter_config.json`` (a `peft.LoraConfig`) and ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(model, directory)``
reads them too. Loading such a directory with `from_pretrained` folds the adapters into the weights
(`merge_lora`): the result is a plain model that computes what the adapted one did.

peft is optional (``pip install 'vlmkit[lora]'``) and imported only when adapters are used.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # peft's name for a model's only adapter
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts before module names in adapter files
INSTALL = "pip install 'vlmkit[lora]'"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA adapters need the peft package: {INSTALL}") from None
    return peft


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def has_adapter_files(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def lora_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers `patterns` select: every `nn.Linear` inside (or equal to) a module
    whose name matches a pattern (glob: ``lm``, ``connector``, ``lm.layers.*.attn.q_proj``).

    Layers whose weight is shared with another module (an output layer tied to the input embeddings)
    are left out: adapting one of two tied uses cannot be folded back into the one shared weight."""
    modules = dict(model.named_modules())
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    selected: set[str] = set()
    for pattern in patterns:
        matched = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            parts = sorted(name for name, _ in model.named_children())
            raise ValueError(f"optim.lora.target_modules: {pattern!r} matches no module of the "
                             f"{type(model).__name__} (its parts: {parts}; patterns are globs over module names "
                             "such as lm.layers.0.attn.q_proj)")
        for name in matched:
            selected |= {sub for sub, module in modules[name].named_modules(prefix=name)
                         if isinstance(module, nn.Linear) and owners[id(module.weight)] == 1}
    if not selected:
        raise ValueError(f"optim.lora.target_modules: {patterns} select no linear layer that can be adapted")
    return [name for name in modules if name in selected]  # the model's order


def add_lora(model: nn.Module, target_modules: list[str], r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> list[str]:
    """Adapt the linear layers `target_modules` select (see `lora_targets`) in place; returns their names.

    A part of the model (a direct child: `vision`, `connector`, `lm`, ...) that holds adapters trains only
    them: its own weights are frozen. The other parts keep their `requires_grad` (peft would freeze
    everything but the adapters), so e.g. an instruct stage with adapters on the LM still trains the
    connector in full."""
    peft = _peft()
    if has_lora(model):
        raise ValueError(f"the {type(model).__name__} already has LoRA adapters")
    targets = lora_targets(model, target_modules)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    _inject(model, config)
    return targets


def _inject(model: nn.Module, config) -> None:
    peft = _peft()
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    peft.tuners.lora.LoraModel(model, config, ADAPTER)  # replaces the layers in `model` itself
    adapted = {name.split(".")[0] for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or (trainable.get(id(param), False)
                                                  and name.split(".")[0] not in adapted))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts (shared weights counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- state dicts -----------------------------------------------------------------------------------


def _adapter_key(name: str) -> str | None:
    """``x.lora_A.default.weight`` -> ``x.lora_A.weight`` (peft's file names drop the adapter's name)."""
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            head, tail = name.split(part, 1)
            if tail.startswith(ADAPTER + "."):
                return head + part + tail[len(ADAPTER) + 1 :]
    return None


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights without the adapters, under the names the plain model has (tied weights once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        if tensor.numel():  # one copy of tied weights, as safetensors' save_model keeps
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen:
                continue
            seen.add(key)
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's file names (``base_model.model.<module>.lora_A.weight``)."""
    return {PEFT_PREFIX + key: tensor for name, tensor in model.state_dict().items()
            if (key := _adapter_key(name)) is not None}


def load_base_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load plain-named base weights into an adapted model (its adapters are left as they are)."""
    names = {name.replace(".base_layer.", "."): name for name in model.state_dict() if ".lora_" not in name}
    unexpected = sorted(set(state_dict) - set(names))
    if unexpected:
        raise ValueError(f"{source}: unexpected weights {unexpected}")
    missing = model.load_state_dict({names[k]: v for k, v in state_dict.items()}, strict=False).missing_keys
    tied = _tied_names(model)
    missing = [k for k in missing if ".lora_" not in k and k not in tied]
    if missing:
        raise ValueError(f"{source}: missing weights {sorted(missing)}")


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (a tied copy loads with its twin)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name for names in by_tensor.values() if len(names) > 1 for name in names}


# -- files -----------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format) into `directory`."""
    directory = Path(directory)
    model.peft_config[ADAPTER].save_pretrained(str(directory))
    save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()},
              str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Give `model` the adapters saved in `directory` (adding the LoRA layers when it has none yet)."""
    peft = _peft()
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (the adapters of {config_path})")
    if not has_lora(model):
        config = peft.LoraConfig.from_pretrained(str(directory))
        if config.peft_type != peft.PeftType.LORA:
            raise ValueError(f"{config_path}: a {config.peft_type} adapter; vlmkit reads LoRA adapters")
        _inject(model, config)
    ours = {_adapter_key(name): name for name in model.state_dict() if _adapter_key(name) is not None}
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights_path)).items()}
    if saved.keys() != ours.keys():
        missing, extra = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
        raise ValueError(f"{weights_path}: adapters do not match the model's LoRA layers "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    model.load_state_dict({ours[k]: v for k, v in saved.items()}, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (W + alpha/r * B A) and put the plain layer back."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if has_lora(model):
        del model.peft_config
    return model


def adapter_summary(directory: str | Path) -> dict:
    """r, alpha and the adapted layers (full module names, from the weights file) of a directory's
    adapters, read without peft (adapter_config.json may list the layers by shortened suffixes)."""
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
        layers = {key.removeprefix(PEFT_PREFIX).split(".lora_")[0] for key in f.keys()}
    return {"r": config.get("r"), "alpha": config.get("lora_alpha"), "layers": sorted(layers)}
