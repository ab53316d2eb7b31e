"""The biased digits: deterministic, the marker names the class only where it should, masks cover the digits."""

import sys

import pytest
import torch

pytest.importorskip("sklearn")

from isnet_fast.data import MARKER_COLOURS, TEST_VARIANTS, make_biased_digits  # noqa: E402

SMALL = dict(canvas_size=40, digit_scale=2, marker_size=5, limit=200)


@pytest.fixture(scope="module")
def splits():
    return make_biased_digits(seed=3, **SMALL)


def marker_pixels(images):
    """Pixels whose channels differ: the digits are grey, every marker colour is saturated."""
    return (images.max(1).values - images.min(1).values) > 0.5


def marker_class_from_colour(image):
    """The class whose colour the marker pixels of one image have, or None without a marker."""
    where = marker_pixels(image[None])[0]
    if not where.any():
        return None
    colours = image[:, where].T.unique(dim=0)
    assert len(colours) == 1, "a marker has one colour"
    return MARKER_COLOURS.index(tuple(colours[0].tolist()))


def test_same_seed_same_data_other_seed_other_data(splits):
    again = make_biased_digits(seed=3, **SMALL)
    other = make_biased_digits(seed=4, **SMALL)
    for name in ("train", *TEST_VARIANTS):
        for field in ("images", "labels", "masks", "marker_classes"):
            assert torch.equal(getattr(splits[name], field), getattr(again[name], field)), (name, field)
    assert not torch.equal(splits["train"].images, other["train"].images)


def test_shapes_ranges_and_a_stratified_split(splits):
    train, test = splits["train"], splits["biased"]
    assert len(train) + len(test) == SMALL["limit"]
    assert train.images.shape == (len(train), 3, 40, 40) and train.masks.shape == train.images.shape
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert 0 <= train.images.min() and train.images.max() <= 1
    assert set(train.masks.unique().tolist()) <= {0.0, 1.0}
    assert set(test.labels.tolist()) == set(train.labels.tolist()) == set(range(10))
    image, label, mask = train[0]
    assert image.shape == (3, 40, 40) and label.dim() == 0 and mask.shape == (3, 40, 40)


def test_training_and_biased_markers_name_the_class(splits):
    for name in ("train", "biased"):
        data = splits[name]
        assert torch.equal(data.marker_classes, data.labels)
        for i in range(0, len(data), 7):
            assert marker_class_from_colour(data.images[i]) == int(data.labels[i])


def test_no_marker_set_has_no_marker_and_shuffled_markers_name_another_class(splits):
    assert not marker_pixels(splits["no_marker"].images).any()
    shuffled = splits["shuffled"]
    assert (shuffled.marker_classes != shuffled.labels).all()
    assert len(shuffled.marker_classes.unique()) > 5  # spread over the classes, not a fixed offset
    for i in range(0, len(shuffled), 5):
        assert marker_class_from_colour(shuffled.images[i]) == int(shuffled.marker_classes[i])


def test_test_variants_differ_only_in_the_marker(splits):
    biased, no_marker, shuffled = (splits[name] for name in TEST_VARIANTS)
    assert torch.equal(biased.labels, no_marker.labels) and torch.equal(biased.labels, shuffled.labels)
    assert torch.equal(biased.masks, no_marker.masks) and torch.equal(biased.masks, shuffled.masks)
    marker_free = ~marker_pixels(biased.images)[:, None] & ~marker_pixels(shuffled.images)[:, None]
    assert torch.equal(biased.images * marker_free, no_marker.images * marker_free)
    assert torch.equal(marker_pixels(biased.images), marker_pixels(shuffled.images))  # same places


def test_masks_cover_the_digit_and_not_the_marker(splits):
    for name in ("train", "shuffled"):
        data = splits[name]
        markers = marker_pixels(data.images)
        digit = (data.images.amax(1) > 0) & ~markers
        inside = data.masks[:, 0] > 0
        assert digit.any() and not (digit & ~inside).any(), "every digit pixel is in the mask"
        assert not (markers & inside).any(), "no marker pixel is in the mask"
        assert (inside.sum((1, 2)) == (8 * SMALL["digit_scale"]) ** 2).all(), "the mask is the digit's square"
        assert torch.equal(data.masks[:, 0], data.masks[:, 2])


def test_too_small_canvas_is_refused():
    with pytest.raises(ValueError, match="canvas_size >= "):
        make_biased_digits(canvas_size=32, digit_scale=4, marker_size=8, limit=20)


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install isnet-fast\[demo\]"):
        make_biased_digits(limit=20)
