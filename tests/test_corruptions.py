"""Image corruptions: deterministic, identity at severity 0, monotone in severity, shape/dtype preserved."""

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.shapes_world import SceneSpec, generate_scene, render_scene
from vlmkit.eval.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt


@pytest.fixture(scope="module")
def scenes():
    spec = SceneSpec()
    return [np.asarray(render_scene(generate_scene(i, 0, spec), spec)) for i in range(8)]


def _increasing(values) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_and_keeps_shape(name, scenes):
    image = scenes[0]
    for severity in range(MAX_SEVERITY + 1):
        a, b = corrupt(image, name, severity, seed=3), corrupt(image, name, severity, seed=3)
        assert a.shape == image.shape and a.dtype == np.uint8
        assert np.array_equal(a, b)
    # A PIL image gives the same result as its array.
    assert np.array_equal(corrupt(Image.fromarray(image), name, 4, seed=3), corrupt(image, name, 4, seed=3))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_severity_zero_is_identity_and_change_grows_with_severity(name, scenes):
    changes = []
    for image in scenes:
        clean = corrupt(image, name, 0)
        assert np.array_equal(clean, image) and clean is not image
        changes.append([np.abs(corrupt(image, name, s).astype(float) - image).mean() for s in range(MAX_SEVERITY + 1)])
        if name != "jpeg":  # JPEG is monotone only on average (see its docstring)
            assert _increasing(changes[-1]), changes[-1]
    assert _increasing(np.mean(changes, axis=0).tolist())


def test_random_corruptions_depend_on_the_seed(scenes):
    for name in ("noise", "fog", "color_cast", "texture"):
        assert not np.array_equal(corrupt(scenes[0], name, 3, seed=0), corrupt(scenes[0], name, 3, seed=1))


def test_bad_arguments_are_explained(scenes):
    with pytest.raises(KeyError, match="unknown corruption 'snow'"):
        corrupt(scenes[0], "snow", 1)
    with pytest.raises(ValueError, match="severity must be an int in 0..5"):
        corrupt(scenes[0], "fog", 6)
    with pytest.raises(ValueError, match="RGB uint8"):
        corrupt(scenes[0].astype(np.float32), "fog", 1)
