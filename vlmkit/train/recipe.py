"""Multi-stage recipes: one YAML holding shared settings plus a `stages:` section per stage.

    model: {...}                   # shared by every stage
    stages:                        # run in this order by `vlmkit demo`
      dense:    {optim: {...}, data: {fresh_scenes: 40000}}
      instruct: {vision_from: dense, ...}   # a stage may start from an earlier one by its name

`vlmkit train --config recipe.yaml --stage align` trains one stage; `vlmkit demo` runs them all.
Sections other than run settings (e.g. `synth`, `tokenizer`, `eval`) are read by the demo only.
"""

from __future__ import annotations

from typing import Any

from vlmkit.config import ConfigError
from vlmkit.train.config import RunConfig, apply_overrides, run_config_from_dict

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
    from vlmkit.train.config import STAGES

    stages = list(recipe.get("stages") or {})
    if not stages:
        raise ConfigError(f"{where}: no stages (a `stages:` section with at least one of {list(STAGES)})")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"{where}: unknown stage(s) {unknown} under 'stages'; known stages are {list(STAGES)}")
    return stages


def stage_config(recipe: dict[str, Any], stage: str, overrides: list[str] = (), where: str = "recipe") -> RunConfig:
    return run_config_from_dict(apply_overrides(stage_dict(recipe, stage, where), list(overrides)),
                                f"{where} (stage {stage})")
