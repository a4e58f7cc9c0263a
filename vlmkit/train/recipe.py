"""Recipes: one YAML holding shared settings plus a `stages:` section per stage, and config files.

    model: {...}                   # shared by every stage
    stages:                        # run in this order by `vlmkit demo`
      dense:    {optim: {...}, data: {fresh_scenes: 40000}}
      instruct: {vision_from: dense, ...}   # a stage may start from an earlier one by its name

`vlmkit train --config recipe.yaml --stage align` trains one stage; `vlmkit demo` runs them all.
Sections other than run settings (e.g. `synth`, `tokenizer`, `eval`) are read by the demo only.
A single-stage config (no `stages:`) is read by `load_run_config` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.config import ConfigError
from vlmkit.train.config import RunConfig, apply_overrides, read_yaml, run_config_from_dict
from vlmkit.train.stages import STAGES, stage_class

RECIPE_ONLY_KEYS = ("stages", "synth", "tokenizer_training", "eval", "examples")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_dict(recipe: dict[str, Any], stage: str, where: str = "recipe") -> dict[str, Any]:
    """The flat run-config dict for one stage: shared keys deep-merged with `stages.<stage>`."""
    stages = recipe.get("stages") or {}
    if stage not in stages:
        raise ConfigError(f"{where}: no stage {stage!r} under 'stages' (has {sorted(stages)})")
    shared = {k: v for k, v in recipe.items() if k not in RECIPE_ONLY_KEYS}
    return _merge(shared, {**(stages[stage] or {}), "stage": stage})


def recipe_stages(recipe: dict[str, Any], where: str = "recipe") -> list[str]:
    """The recipe's stages in the order they run (the order of `stages:`), each checked to be a known stage."""
    stages = list(recipe.get("stages") or {})
    if not stages:
        raise ConfigError(f"{where}: no stages (a `stages:` section with at least one of {list(STAGES)})")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"{where}: unknown stage(s) {unknown} under 'stages'; known stages are {list(STAGES)}")
    return stages


def stage_config(recipe: dict[str, Any], stage: str, overrides: list[str] = (), where: str = "recipe") -> RunConfig:
    return checked(run_config_from_dict(apply_overrides(stage_dict(recipe, stage, where), list(overrides)),
                                        f"{where} (stage {stage})"))


def checked(cfg: RunConfig) -> RunConfig:
    """A registered stage (or a ConfigError listing them) that can start from what the config names."""
    stage = stage_class(cfg.stage)
    for key in ("init_from", "vision_from", "connector_from"):
        if getattr(cfg, key) and key not in stage.starts_from:
            raise ConfigError(f"{key}: the {cfg.stage} stage does not start from another run this way "
                              f"(it takes {', '.join(stage.starts_from)})")
    return cfg


BUILT_IN = Path(__file__).resolve().parent.parent / "recipes"  # shipped in the wheel as package data


def built_in_recipes() -> list[str]:
    return sorted(p.stem for p in BUILT_IN.glob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A config file's path, or a built-in recipe's by name (`demo`, `smol-dino`); paths win over names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    built_in = BUILT_IN / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and built_in.is_file():
        return built_in
    raise FileNotFoundError(f"{name_or_path}: no such config file, and no built-in recipe of that name "
                            f"(built-in: {', '.join(built_in_recipes())})")


def read_recipe(name_or_path: str | Path) -> dict[str, Any]:
    return read_yaml(resolve_recipe(name_or_path))


def load_run_config(path: str | Path, overrides: list[str] = (), stage: str | None = None) -> RunConfig:
    """A run config from a single-stage YAML, or from a recipe (with `stages:`) and a stage name.

    `path` may also name a built-in recipe (`vlmkit train --config demo --stage dense`).
    """
    data = read_recipe(path)
    if "stages" in data:
        if stage is None:
            raise ConfigError(f"{path} is a multi-stage recipe: choose a stage with --stage {sorted(data['stages'])}")
        return stage_config(data, stage, overrides, str(path))
    if stage is not None:
        data["stage"] = stage
    return checked(run_config_from_dict(apply_overrides(data, list(overrides)), str(path)))


def stage_paths(recipe: dict[str, Any], stage: str, run_dir: str | Path, data_dir: str | Path) -> list[str]:
    """Overrides that place one stage of a recipe run: its run directory ``run_dir/<stage>``, the data
    and tokenizer of ``data_dir``, and each earlier stage it starts from by name (``vision_from: dense``,
    keys from the stage's `starts_from`) resolved to that stage's run directory."""
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    paths = {"out": run_dir / stage, "tokenizer": data_dir / "tokenizer", "data.root": data_dir}
    section = recipe["stages"][stage] or {}
    paths.update({key: run_dir / section[key] for key in stage_class(stage).starts_from
                  if section.get(key) in recipe["stages"]})
    return [f"{key}={value}" for key, value in paths.items()]
