"""Each augmentation does what it says, to the input and to the target."""

import numpy as np
import pytest

from emdask.augment import (
    AugmentConfig,
    augment,
    blur,
    flip_transpose,
    intensity,
    misalign,
    missing_section,
    partial_section,
    volume_edge,
)


def _patch(shape=(6, 20, 24), seed=0):
    """Labels in stripes and a raw image that is a function of them (raw = labels/10)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 9, shape).astype(np.uint64)
    return (labels / 10).astype(np.float32), labels


def test_flip_transpose_moves_raw_and_labels_together():
    raw, labels = _patch()
    seen = set()
    for seed in range(20):
        r, lab = flip_transpose(raw, labels, np.random.default_rng(seed))
        np.testing.assert_array_equal(r, (lab / 10).astype(np.float32))
        seen.add(r.shape)
    assert seen == {(6, 20, 24), (6, 24, 20)}  # the x-y transpose happens


def test_intensity_stays_in_range_and_changes_values():
    raw, _ = _patch()
    out = intensity(raw, np.random.default_rng(1), contrast=0.5, brightness=0.3, gamma=0.5)
    assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, raw)


def test_blur_smooths_sections_in_plane_only():
    raw = np.zeros((4, 21, 21), np.float32)
    raw[:, 10, 10] = 1
    out = blur(raw, np.random.default_rng(3), max_sigma=2)
    changed = [z for z in range(4) if not np.array_equal(out[z], raw[z])]
    assert changed and all(out[z, 10, 10] < 1 for z in changed)
    assert all(out[z].sum() == pytest.approx(1, abs=1e-3) for z in range(4))  # in-plane


def test_missing_section_is_black_and_others_untouched():
    raw, _ = _patch()
    out, z = missing_section(raw + 0.05, np.random.default_rng(4))
    assert np.all(out[z] == 0)
    others = [k for k in range(raw.shape[0]) if k != z]
    np.testing.assert_array_equal(out[others], (raw + 0.05)[others])


def test_partial_section_blacks_out_part_of_one_section():
    raw = np.full((5, 30, 30), 0.5, np.float32)
    out = partial_section(raw, np.random.default_rng(5))
    black = (out == 0).reshape(5, -1).mean(1)
    assert (black > 0).sum() == 1 and 0.08 <= black.max() <= 0.52


def test_volume_edge_blacks_a_band_along_one_face_and_empties_its_labels():
    raw, labels = _patch((8, 30, 30))
    faces = set()
    for seed in range(40):
        r, lab = volume_edge(raw, labels, np.random.default_rng(seed))
        black = r == 0
        np.testing.assert_array_equal(black, lab == 0)  # the band, in both
        np.testing.assert_array_equal(r[~black], raw[~black])  # the rest untouched
        # one slab along one face, at most half the patch thick
        full = [np.flatnonzero(black.all(axis=tuple(b for b in range(3) if b != a)))
                for a in range(3)]
        axis = next(a for a in range(3) if full[a].size)
        rows = full[axis]
        assert 1 <= rows.size <= raw.shape[axis] // 2
        assert rows[0] == 0 or rows[-1] == raw.shape[axis] - 1
        assert np.all(np.diff(rows) == 1)
        assert black.sum() == rows.size * raw.size // raw.shape[axis]
        faces.add((axis, int(rows[0] == 0)))
    assert len(faces) == 6
    # off by default, drawing no random number: recipes without it train as before
    plain = augment(raw, labels, np.random.default_rng(3), margin=0)
    off = augment(raw, labels, np.random.default_rng(3), margin=0,
                  config=AugmentConfig(edge=0.0))
    np.testing.assert_array_equal(plain[0], off[0])
    on = augment(raw, labels, np.random.default_rng(3), margin=0, config=AugmentConfig(edge=1.0))
    assert (on[1] == 0).any() and not (plain[1] == 0).any()


@pytest.mark.parametrize("mode", ["slip", "shift"])
def test_misalignment_moves_labels_with_raw(mode):
    raw, labels = _patch((6, 30, 30))
    r, lab, shifts = misalign(raw, labels, np.random.default_rng(6), margin=5, mode=mode)
    assert r.shape == lab.shape == (6, 20, 20)
    np.testing.assert_array_equal(r, (lab / 10).astype(np.float32))  # consistent
    moved = np.flatnonzero(np.any(shifts != 0, axis=1))
    if mode == "slip":
        assert moved.size == 1
    else:  # all sections from a plane on, by the same amount
        assert moved.size >= 1 and moved[-1] == 5 and np.all(np.diff(moved) == 1)
        assert len({tuple(s) for s in shifts[moved]}) == 1
    for z in range(6):
        dy, dx = shifts[z]
        np.testing.assert_array_equal(lab[z], labels[z, 5 + dy:25 + dy, 5 + dx:25 + dx])


def test_augment_is_reproducible_and_crops_margin():
    raw, labels = _patch((8, 40, 40))
    cfg = AugmentConfig(slip=0.5, shift=0.5, missing=0.5, partial=0.5, blur=0.5)
    a = augment(raw, labels, np.random.default_rng(7), margin=8, config=cfg)
    b = augment(raw, labels, np.random.default_rng(7), margin=8, config=cfg)
    assert a[0].shape == (8, 24, 24)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(("margin", "max_shift"), [(0, 8), (5, 0)])
def test_misalignment_without_room_only_crops(margin, max_shift):
    raw, labels = _patch((4, 20, 20))
    r, lab, shifts = misalign(raw, labels, np.random.default_rng(0), margin, "shift", max_shift)
    crop = (slice(None), slice(margin, 20 - margin), slice(margin, 20 - margin))
    np.testing.assert_array_equal(r, raw[crop])
    np.testing.assert_array_equal(lab, labels[crop])
    assert not shifts.any()
