"""A wheel is the whole product: built, installed outside the source tree, it runs a recipe on its own."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY_RECIPE = {  # the built-in demo's shape, a few steps of each stage
    "synth": {"seed": 0, "n": 40, "image_size": 48, "records": "questions", "object_lists": True},
    "tokenizer_training": {"vocab_size": 300},
    "eval": {"split": "test", "limit": 8},
    "precision": "fp32",
    "log_every": 1,
    "model": {
        "vision": {"image_size": 32, "patch_size": 8, "stem": "conv", "hidden_size": 32, "num_layers": 1,
                   "num_heads": 2, "intermediate_size": 64},
        "lm": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
        "connector": {"name": "mlp2x_gelu"},
    },
    "stages": {
        "dense": {"data": {"fresh_scenes": 64}, "optim": {"steps": 2, "batch_size": 8, "warmup_steps": 1}},
        "instruct": {"vision_from": "dense", "data": {"train": "train.json", "max_length": 400},
                     "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 1}},
    },
}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_installed_wheel_runs_built_in_and_own_recipes(tmp_path):
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools_major = 0
    if setuptools_major < 77:
        pytest.skip("building the wheel here needs setuptools>=77: pip install 'setuptools>=77' (in the [dev] extra)")
    # Built from a copy of the sources: a build writes build/ and *.egg-info next to what it builds.
    source = tmp_path / "source"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "vlmkit"):
        if part == "vlmkit":
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / part, source / part)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("vlmkit-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    # The dependencies (torch, ...) come from this environment's site-packages as a plain path entry: its
    # .pth files (among them the source tree's editable-install hook) are not processed.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Without PYTHONPATH: a source tree on it (with its build's egg-info) would pass for an installed vlmkit.
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    where = run([str(python), "-c", "import vlmkit; print(vlmkit.__file__)"], tmp_path, env).strip()
    assert where.startswith(str(site)), f"vlmkit imported from {where}, not from the installed wheel"
    stages = run([str(venv / "bin" / "vlmkit"), "train", "--list-stages"], tmp_path, env)
    assert "| `dense` |" in stages and "| `instruct` |" in stages
    built_in = run([str(python), "-c", "from vlmkit.train.recipe import read_recipe\n"
                    "print(sorted(read_recipe('demo')['stages']), sorted(read_recipe('smol-dino')['stages']))"],
                   tmp_path, env)
    assert "'instruct'" in built_in
    page = run([str(python), "-c", "from importlib import resources\n"
                "print(resources.files('vlmkit.serve').joinpath('static/index.html').read_text())"], tmp_path, env)
    assert "<title>vlmkit</title>" in page  # the server's web page ships in the wheel

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_RECIPE, sort_keys=False))
    out = run([str(venv / "bin" / "vlmkit"), "demo", "--recipe", "tiny.yaml", "--out", "demo"], tmp_path, env)
    assert "stage instruct" in out
    assert (tmp_path / "demo" / "instruct" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "eval.json").is_file()
