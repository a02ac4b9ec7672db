"""Defect detection: missing sections and regions, blur, contrast; masked affinities."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from emdask import segment
from emdask.affinities import mask_affinities
from emdask.defects import detect_defects, missing_mask
from emdask.volumes import open_volume

FLAGS = ["missing", "partial", "blurred", "unusual_contrast"]


def test_missing_mask_by_hand():
    img = np.random.default_rng(0).integers(1, 255, (60, 60)).astype(np.uint8)
    img[10:30, 5:45] = 0  # a black region
    img[50:53, 50:53] = 7  # flat, but smaller than the window: tissue
    mask = missing_mask(img, window=7)
    assert mask[10:30, 5:45].all()
    assert mask.sum() == 20 * 40
    assert not missing_mask(img[30:], window=7).any()
    # float stacks often mark pixels without data NaN (or inf): missing, however few
    flt = img[30:].astype(np.float32)
    flt[5:8, 5:9], flt[20, 20] = np.nan, np.inf
    mask = missing_mask(flt, window=7)
    assert mask[5:8, 5:9].all() and mask[20, 20] and mask.sum() == 13
    stack = np.stack([flt, np.full_like(flt, np.nan), flt])
    table = detect_defects(stack).table
    assert table["missing"].tolist() == [False, True, False]
    assert table["partial"].tolist() == [True, False, True]


@pytest.mark.parametrize("name,dataset", [("isbi", "raw"), ("cremi", "raw"), ("vnc", "raw")])
def test_no_false_alarms_on_real_stacks(shared_file, name, dataset):
    vol = open_volume(shared_file(name), dataset)[:12]
    table = detect_defects(vol).table
    assert not table[FLAGS].to_numpy().any(), table[table[FLAGS].any(axis=1)]


def test_defects_found_on_a_damaged_real_stack(shared_file):
    raw = open_volume(shared_file("isbi"), "raw")[:12].values.copy()
    raw[3] = 0  # lost section
    raw[5, 100:300, 50:200] = 0  # a black region (e.g. a fold or dirt)
    raw[7] = ndi.gaussian_filter(raw[7], 1.2)  # out of focus
    raw[9] = (raw[9] * 0.3).astype(np.uint8)  # faint
    defects = detect_defects(da.from_array(raw, chunks=(5, 100, 130)))
    table = defects.table.set_index("z")
    flagged = {flag: table.index[table[flag]].tolist() for flag in FLAGS}
    assert flagged == {"missing": [3], "partial": [5], "blurred": [7],
                       "unusual_contrast": [9]}
    assert table.loc[5, "missing_fraction"] == pytest.approx(200 * 150 / 512 ** 2)
    mask = defects.mask.values
    assert mask[3].all() and mask[5, 100:300, 50:200].all()
    assert mask[5].sum() == 200 * 150 and not mask[[0, 1, 2, 4, 6, 7, 8, 9]].any()
    # blockwise with a halo: the mask is the whole-stack mask for any chunking
    np.testing.assert_array_equal(mask, missing_mask(raw))
    other = detect_defects(da.from_array(raw, chunks=(12, 512, 512))).mask.values
    np.testing.assert_array_equal(mask, other)


def test_a_numpy_stack_is_worked_on_in_bounded_blocks():
    # One block of float64 copies of a whole stack took 4.6 GB for 105 MB of data: a numpy
    # stack is split into blocks of at most 8 M voxels (here 4 sections), same answer.
    stack = np.random.default_rng(0).integers(1, 255, (5, 2048, 1024), dtype=np.uint8)
    stack[3] = 0
    stack[1, :100, :100] = 7
    defects = detect_defects(stack)
    assert defects.mask.data.chunks[0] == (4, 1)
    assert defects.table["missing"].tolist() == [False, False, False, True, False]
    assert int(defects.mask[1].sum()) == 100 * 100
    single = detect_defects(da.from_array(stack, chunks=(1, 2048, 1024))).table
    pd.testing.assert_frame_equal(single, defects.table)
    # sections larger than a block are split in y and x too (the flat square across the
    # split, at 2040-2059, is found whole)
    big = np.random.default_rng(1).integers(1, 255, (2, 4096, 2560), dtype=np.uint8)
    big[0, 2040:2060, 500:520] = 9
    tiled = detect_defects(big)
    assert max(tiled.mask.data.chunks[1]) == 2048 and max(tiled.mask.data.chunks[2]) == 2048
    assert int(tiled.mask[0].sum()) == 20 * 20 and int(tiled.mask[1].sum()) == 0


def test_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        detect_defects(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="odd"):
        detect_defects(np.zeros((2, 10, 10), np.uint8), window=4)


def test_mask_affinities_matches_brute_force_for_any_chunking():
    rng = np.random.default_rng(0)
    affs = rng.random((3, 12, 14, 16)).astype(np.float32)
    mask = rng.random((12, 14, 16)) < 0.05
    expected = affs.copy()
    for v in zip(*np.nonzero(mask), strict=True):
        for d in range(3):
            expected[d][v] = 0  # edge to v - e_d
            w = list(v)
            w[d] += 1
            if w[d] < mask.shape[d]:
                expected[d][tuple(w)] = 0  # edge from v + e_d to v
    np.testing.assert_array_equal(mask_affinities(affs, mask), expected)
    lazy = mask_affinities(da.from_array(affs, chunks=(3, 5, 6, 7)),
                           da.from_array(mask, chunks=(4, 7, 3)))
    np.testing.assert_array_equal(lazy.compute(), expected)
    per_channel = mask_affinities(da.from_array(affs, chunks=(1, 5, 6, 7)), mask)
    np.testing.assert_array_equal(per_channel.compute(), expected)
    with pytest.raises(ValueError, match="mask shape"):
        mask_affinities(affs, mask[1:])


def test_nothing_joined_across_a_missing_section():
    affs = np.ones((3, 6, 8, 8), np.float32)  # one object everywhere
    mask = np.zeros((6, 8, 8), bool)
    mask[3] = True
    [seg] = segment(da.from_array(affs, chunks=(3, 4, 8, 5)), [0.5], size_threshold=0,
                    mask=mask)
    seg = seg.compute()
    assert (seg[3] == 0).all()
    below, above = np.unique(seg[:3]), np.unique(seg[4:])
    assert len(below) == 1 and len(above) == 1 and below[0] != above[0] != 0
