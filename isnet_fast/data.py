"""A biased toy dataset for trying ISNet without downloads: digits with a class-coloured marker.

scikit-learn's bundled 8x8 digits are upscaled and pasted at a random spot on a black canvas.
Beside each digit, in the background, sits a small square marker whose *colour* names the
class in the training set: a classifier can score perfectly from the marker alone. Test sets
hold the same test digits three ways: with the training pairing ("biased"), with no marker
("no_marker"), and with the marker of another class ("shuffled"). The masks (1 = foreground)
cover each digit's square, never the marker.

The marker codes the class by colour rather than position because the DenseNet ends in global
average pooling: a colour is found anywhere at once, so the shortcut is easy to learn.

Everything is deterministic given the seed (numpy's PCG64 generator, no global state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BiasedDigits", "MARKER_COLOURS", "MARKER_COLOUR_NAMES", "TEST_VARIANTS", "load_sklearn_digits",
           "make_biased_digits"]

# One saturated colour per class, none of them grey, so no marker looks like a digit stroke.
MARKER_COLOURS: Tuple[Tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.0, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
    (1.0, 0.5, 0.0),  # orange
    (0.5, 0.0, 1.0),  # violet
    (0.5, 1.0, 0.0),  # lime
    (0.0, 0.5, 1.0),  # azure
)
MARKER_COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "violet", "lime", "azure")
NO_MARKER = -1
TEST_VARIANTS = ("biased", "no_marker", "shuffled")
_DIGITS_SIDE = 8
_DIGITS_MAX = 16.0  # sklearn's digits are integers 0..16


@dataclass(eq=False)  # tensors do not compare to one bool
class BiasedDigits(torch.utils.data.Dataset):
    """Images ``N x 3 x S x S`` in [0, 1], labels ``N`` (int64), masks ``N x 3 x S x S`` (1 = digit).

    ``marker_classes[i]`` is the class whose colour image ``i``'s marker has (-1: no marker).
    Indexing gives ``(image, label, mask)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    marker_classes: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index], self.masks[index]


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images ``1797 x 8 x 8`` in [0, 1] (float32) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the biased-digits dataset needs scikit-learn (its bundled 8x8 digits); "
                          "install it with: pip install isnet-fast[demo]") from error
    digits = load_digits()
    return (digits.images / _DIGITS_MAX).astype(np.float32), digits.target.astype(np.int64)


def make_biased_digits(seed: int = 0, canvas_size: int = 64, digit_scale: int = 4, marker_size: int = 8,
                       test_fraction: float = 0.3, n_classes: int = 10,
                       limit: Optional[int] = None) -> Dict[str, BiasedDigits]:
    """Builds the train set and the three test sets from scikit-learn's digits.

    Args:
        seed: fixes the train/test split, the digit and marker positions and the shuffled pairing.
        canvas_size: side ``S`` of the square images.
        digit_scale: the 8x8 digits are upscaled (bilinear) to ``8 * digit_scale`` pixels.
        marker_size: side of the square marker.
        test_fraction: share of the digits held out for the test sets (split per class).
        n_classes: keep the digits 0 .. n_classes-1 only (at most 10).
        limit: keep at most this many digits before splitting (for quick runs).

    Returns:
        ``{"train", "biased", "no_marker", "shuffled"}`` -> :class:`BiasedDigits`. The three
        test sets hold the same digits at the same places; only the marker differs. In
        "shuffled" each marker has the colour of a class other than the digit's, drawn uniformly.
    """
    digit_side = _DIGITS_SIDE * digit_scale
    if not 2 <= n_classes <= len(MARKER_COLOURS):
        raise ValueError(f"n_classes must be between 2 and {len(MARKER_COLOURS)}, got {n_classes}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    # The marker must fit beside the digit (with a pixel's gap) on each side.
    if canvas_size < digit_side + 2 * (marker_size + 1):
        raise ValueError(f"a {canvas_size}-pixel canvas is too small for a {digit_side}-pixel digit with "
                         f"{marker_size}-pixel markers on both sides; use canvas_size >= "
                         f"{digit_side + 2 * (marker_size + 1)} or a smaller digit_scale/marker_size")

    digits, labels = load_sklearn_digits()
    keep = labels < n_classes
    digits, labels = digits[keep], labels[keep]
    rng = np.random.default_rng(seed)
    if limit is not None:
        chosen = np.sort(rng.permutation(len(labels))[:limit])
        digits, labels = digits[chosen], labels[chosen]
    train_index, test_index = _stratified_split(labels, test_fraction, rng)

    splits = {"train": _render(digits[train_index], labels[train_index], labels[train_index], canvas_size,
                               digit_scale, marker_size, rng)}
    # The test digits and their places are drawn once and shared by the three variants.
    test_labels = labels[test_index]
    other_class = (test_labels + rng.integers(1, n_classes, size=len(test_labels))) % n_classes
    placement_seed = int(rng.integers(2**63))
    for variant, markers in (("biased", test_labels), ("no_marker", np.full_like(test_labels, NO_MARKER)),
                             ("shuffled", other_class)):
        splits[variant] = _render(digits[test_index], test_labels, markers, canvas_size, digit_scale,
                                  marker_size, np.random.default_rng(placement_seed))
    return splits


def _stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Train and test indices (sorted), ``test_fraction`` of each class held out."""
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _render(digits: np.ndarray, labels: np.ndarray, marker_classes: np.ndarray, canvas_size: int,
            digit_scale: int, marker_size: int, rng: np.random.Generator) -> BiasedDigits:
    n = len(labels)
    digit_side = _DIGITS_SIDE * digit_scale
    big = F.interpolate(torch.from_numpy(digits)[:, None], size=(digit_side, digit_side), mode="bilinear",
                        align_corners=False).clamp_(0, 1)[:, 0]
    images = torch.zeros(n, 3, canvas_size, canvas_size)
    masks = torch.zeros(n, 3, canvas_size, canvas_size)
    colours = torch.tensor(MARKER_COLOURS)
    # Draw every position first so the placements depend on the generator alone, not on the markers:
    # the three test variants then put the same digit and marker at the same places.
    room = marker_size + 1  # a marker fits on either side of the digit, wherever it lands
    digit_corners = rng.integers(room, canvas_size - digit_side - room, size=(n, 2), endpoint=True)
    marker_corners = [_marker_corner(top, left, digit_side, marker_size, canvas_size, rng)
                      for top, left in digit_corners]
    for i in range(n):
        top, left = digit_corners[i]
        images[i, :, top:top + digit_side, left:left + digit_side] = big[i]
        masks[i, :, top:top + digit_side, left:left + digit_side] = 1
        if marker_classes[i] != NO_MARKER:
            m_top, m_left = marker_corners[i]
            images[i, :, m_top:m_top + marker_size, m_left:m_left + marker_size] = \
                colours[marker_classes[i]][:, None, None]
    return BiasedDigits(images, torch.from_numpy(labels.copy()), masks, torch.from_numpy(marker_classes.copy()))


def _marker_corner(top: int, left: int, digit_side: int, marker_size: int, canvas_size: int,
                   rng: np.random.Generator) -> Tuple[int, int]:
    """A random top-left corner for the marker, on the canvas and at least a pixel clear of the digit."""
    while True:
        m_top, m_left = rng.integers(0, canvas_size - marker_size, size=2, endpoint=True)
        clear_vertically = m_top + marker_size < top or m_top > top + digit_side
        clear_horizontally = m_left + marker_size < left or m_left > left + digit_side
        if clear_vertically or clear_horizontally:
            return int(m_top), int(m_left)
