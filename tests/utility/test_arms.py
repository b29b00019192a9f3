"""The arms' drawing helpers: one minority oversampling for the oversampled arm and the two-sample test."""

from __future__ import annotations

import numpy as np

from brainddpm.utility.arms import oversample_minority


def test_oversampling_repeats_the_smaller_classes_up_to_the_largest():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    pick = oversample_minority(labels, np.random.default_rng(0))
    assert pick.dtype == np.int64 and list(pick[:8]) == list(range(8))  # every volume once, first
    assert np.bincount(labels[pick]).tolist() == [5, 5, 5]
    assert set(pick[8:]) <= {5, 6, 7}  # only minority volumes repeat
    assert np.array_equal(pick, oversample_minority(labels, np.random.default_rng(0)))  # seeded


def test_two_classes_draw_what_the_two_sample_test_drew_before():
    """The two-sample test's own copy (bincount over classes 0 and 1, then rng.choice per class) drew exactly
    these indices: merging the two functions changes no two-sample result."""
    labels = np.array([0] * 7 + [1] * 3)
    rng = np.random.default_rng(3)
    sizes = np.bincount(labels, minlength=2)
    before = np.concatenate([np.arange(10), *[rng.choice(np.flatnonzero(labels == c), size=sizes.max() - sizes[c])
                                              for c in (0, 1)]])
    assert np.array_equal(oversample_minority(labels, np.random.default_rng(3)), before)
