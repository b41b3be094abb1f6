import numpy as np
from PIL import Image

from dinokit.data.labelled import read_labelled
from dinokit.data.synthetic import (
    BACKGROUND_DEPTH,
    FAR,
    NEAR,
    SHAPES,
    render_scene,
    write_classification_set,
    write_dense_set,
)


def test_scene_ground_truth_is_consistent():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = render_scene(rng, 48, num_shapes=3)
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        shapes = s.mask > 0
        assert np.all((s.depth[shapes] >= NEAR) & (s.depth[shapes] <= FAR))
        assert np.all(s.depth[~shapes] >= BACKGROUND_DEPTH[0] - 1e-4)
        assert np.isclose(s.depth[-1, 0], BACKGROUND_DEPTH[0]) or shapes[-1, 0]
        counts = np.bincount(s.mask.ravel(), minlength=len(SHAPES) + 1)[1:]
        assert counts[s.label] == counts.max() > 0
    a = render_scene(np.random.default_rng(5), 32)
    b = render_scene(np.random.default_rng(5), 32)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)


def test_single_shape_scenes_are_labelled_with_their_shape():
    rng = np.random.default_rng(1)
    for index, kind in enumerate(SHAPES):
        assert render_scene(rng, 40, shapes=(kind,)).label == index


def test_written_sets(tmp_path):
    write_classification_set(tmp_path, per_class=2, size=24, split="test")
    paths, labels, names = read_labelled(tmp_path / "test")
    assert names == sorted(SHAPES) and len(paths) == 2 * len(SHAPES) and labels.count(0) == 2
    root = write_dense_set(tmp_path / "dense", count=3, size=24)
    depth = np.asarray(Image.open(root / "depth" / "00001.png"))
    mask = np.asarray(Image.open(root / "masks" / "00001.png"))
    assert depth.dtype == np.uint16 and depth.min() >= NEAR * 1000 and depth.max() <= BACKGROUND_DEPTH[1] * 1000
    assert mask.shape == (24, 24) and mask.max() <= len(SHAPES)
