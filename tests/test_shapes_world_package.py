"""The shapes-world package writes exactly what the single-module generator wrote, and has no import cycles."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmkit.data.shapes_world as shapes_world
from vlmkit.data.shapes_world import VERSION, write_dataset

# sha256 of every JSON/JSONL file written, and one sha256 over the decoded pixels of all images (in file
# order, each with its name and shape). These hashes were recorded from the generator before it was split
# into this package (the single module vlmkit/data/synthetic.py, "shapes-world/1"). A change to any of
# them means the generator's output changed: that is a new dataset VERSION, never a refactoring.
CONFIGS = {
    "mixed": dict(seed=1, n=20, image_size=48, n_variants=3),
    "dialogue": dict(seed=2, n=16, records="dialogue", object_lists=True, dialogue_per_type=2, n_variants=3),
}
PINNED = {
    "mixed": {
        "captions_compositional.jsonl": "93896887b2454ab425bba03b9b9c45be21284359ffefcfd869e3f3ff6100b3a3",
        "captions_test.jsonl": "9bb9c551a50cbaba5eba6569261212574336762255cec66f62d2a6edcc9b19ac",
        "captions_train.jsonl": "db9556b0bf88cc35fa8709f9ef775e733194c2e3486295a713295e364e02ee65",
        "captions_val.jsonl": "80ed133f9cbad4d40c1ab2e56b04cccca896bd69561ca4235b8079c4f5cce5ec",
        "captions_variants.jsonl": "f06d410b31a8ce9da391e99fe7fc8c7d5780f2dc9049d2064129bd1811102525",
        "compositional.json": "f18cba0e01724584996d06e99d6c294ba280fdcbc57f4893fe6a03a73db87784",
        "compositional_qa.jsonl": "2245ca5a7063cbc69e85df8ce72a4fd2396f01ea502475996daed6bd16060014",
        "meta.json": "9bd14a86bc6053ad7a6d20b52e1253f481c189086c62b4f490bbe7686b59d3d5",
        "scenes.jsonl": "71d2b450623f0b51621b2f4e8fabe93791c4f79756f899839ce48e31e8c8bc5d",
        "test.json": "6e26f4448ed1045767a6c866e663ae2c180ec491485beb9cf2a441667f42e18f",
        "test_qa.jsonl": "7d4acee2d911c7823697fd1bc7c867224b22554dc6de94e3867aa8af4c2d0058",
        "train.json": "fabe2cb6416cb7c297fe19b7bd27aeb04bf6b30f81594fa207220d2a2c992d5c",
        "train_qa.jsonl": "b88b82381f4c28cc6fd33fe69bdec7007ebe4f672f7216ae02f793b27e2a9900",
        "val.json": "745046a349bdf228e4e27328166ce249d82b358463fa115c17176a77c0abbb56",
        "val_qa.jsonl": "3fb1845cd7edea75be1329b5dca3792412dd7dcdcdeb85dc81567fe1454564cf",
        "variants.json": "def02136cf1cc87310fce9e63bf232914ee0819e535be2715571b8188fbdd22d",
        "variants_qa.jsonl": "2375691e3e6dfcf877d608fc6d812ee0116e6f00e8dd633d617d0e19f05901bb",
        "images/*.png pixels": "bc149934b5beac47679ce6b363273bb5eb92c62ec7def10dd16a4f051a892aad",
    },
    "dialogue": {
        "captions_compositional.jsonl": "3256da5e6ff4bb10d6627ccb1476c14033d1f76097f418b6172db8b403baac8c",
        "captions_test.jsonl": "f31c5944a8ca6ca50d20f9734becd2642012efd76d33a93f2657be49a0232f60",
        "captions_train.jsonl": "af24202e1d1ae5e796f1b813421b0fb194dc41a6314cd1dccae132c2727165eb",
        "captions_val.jsonl": "0498c939e13d5395e7ded242ecf69601c6ed6b5e9b178a4592fb3dad8f4b0a32",
        "captions_variants.jsonl": "be009b9e732290a6978f7aafbb7270c97a6757a36cd3efee891e0eef418e2a04",
        "compositional.json": "9cd8e0486f3331999ba07446b964841b27419e74131d0c3c55b53ef939d10adf",
        "compositional_qa.jsonl": "d4444270b9ed9b5ece5c54d0f0becda1bfed3f2ed68b0f1e571211289c8b5b39",
        "meta.json": "570f3b036d608c717d4b99f1448187d149621db7bb9c6da081b3c138b0ea3816",
        "scenes.jsonl": "424bf7a8646e601de7a5b51789fa61b3c015730903e5bae8ffb6da3ab4e77b9e",
        "test.json": "e8c7c2bb3131478f64a60ddbe5157923c25cd38c18ba34cca766327c714b9734",
        "test_qa.jsonl": "80062f0958cf2128f6bf2ad05d9fd3de3ccde249d3605bdc57468cfd653a0fa3",
        "train.json": "0d72abf5990292066b30238d615edf32eade0f1c59c499a06e955ddc0434fed5",
        "train_qa.jsonl": "b7d1cfb4b34c2dd34d6fc4ec23f30c0ed7208ac078199b1167ffe22cca09f583",
        "val.json": "39a2f293f969aed7aaa46eda938e7103254e6a5676085e86b97c653ec21e2b77",
        "val_qa.jsonl": "ba2d702bf00146d1e85e95e7d17428fc21104236504a0cd25138842e0b7579b8",
        "variants.json": "c52cc6e92b99b5a06dc96c6f60ddf57098d1b27d7511ecb0ac4d1bf7b7f43c73",
        "variants_qa.jsonl": "826c06b2ef57bd13c3cd6875e0f41388f3970de652099250e7e84cfd3ba00431",
        "images/*.png pixels": "6f253f5d5d5ef85bf3e4f1411a35e23f6bf4156dbd4ca5b970ccb54c6b43fe43",
    },
}


def _digests(out: Path) -> dict[str, str]:
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.json*"))}
    h = hashlib.sha256()
    for p in sorted((out / "images").glob("*.png")):
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"))
        h.update(p.name.encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    got["images/*.png pixels"] = h.hexdigest()
    return got


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_matches_the_generator_before_the_split(tmp_path, name):
    assert VERSION == "shapes-world/1"
    write_dataset(tmp_path, **CONFIGS[name])
    assert _digests(tmp_path) == PINNED[name]


MODULES = ["shapes", "spec", "generate", "render", "language", "records", "multi", "video", "dataset"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    # Each module imports cleanly on its own, whatever was imported before it elsewhere.
    package = shapes_world.__name__
    names = ["vlmkit.data.boxes"] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(shapes_world.__path__)]
    assert sorted(names[1:]) == sorted(f"{package}.{m}" for m in MODULES)
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    for n in names:
        subprocess.run([sys.executable, "-c", code, n], check=True, cwd=Path(__file__).parents[1])


def test_modules_import_only_those_before_them():
    # Within the package a module imports only modules listed before it in MODULES (so none imports one
    # that imports it back); outside it, of vlmkit only vlmkit.data.boxes.
    for i, m in enumerate(MODULES):
        mod = importlib.import_module(f"{shapes_world.__name__}.{m}")
        text = Path(mod.__file__).read_text(encoding="utf-8")
        used = {line.split()[1] for line in text.splitlines() if line.startswith(("from vlmkit", "import vlmkit"))}
        allowed = {f"{shapes_world.__name__}.{x}" for x in MODULES[:i]} | {"vlmkit.data.boxes"}
        assert used <= allowed, (m, used - allowed)
