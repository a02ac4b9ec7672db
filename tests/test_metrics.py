"""VOI, adapted Rand error and CREMI score: hand-computed cases, invariances, out of core."""

import dask.array as da
import numpy as np
import pytest

from emdask import adapted_rand, contingency_table, evaluate, open_volume, voi


def test_identical_segmentations_score_zero():
    gt = np.random.default_rng(0).integers(1, 20, (4, 8, 8)).astype(np.uint64)
    m = evaluate(gt, gt)
    assert m["voi_split"] == m["voi_merge"] == m["arand"] == m["cremi_score"] == 0.0


def test_hand_computed_split_and_merge():
    # gt: two bodies of 4 voxels.  seg splits body 1 in halves and merges nothing.
    gt = np.array([[[1, 1, 1, 1, 2, 2, 2, 2]]])
    seg = np.array([[[5, 5, 6, 6, 7, 7, 7, 7]]])
    split, merge = voi(seg, gt)
    # H(seg|gt) = p(gt=1) * H(1/2, 1/2) = 0.5 * 1 bit
    assert split == pytest.approx(0.5) and merge == 0.0
    # Rand: sum n_ij^2 = 4+4+16 = 24, sum a_i^2 = 32, sum b_j^2 = 24
    # precision 1, recall 24/32 = 0.75, F = 2*.75/1.75
    assert adapted_rand(seg, gt) == pytest.approx(1 - 1.5 / 1.75)
    # the reverse is a pure merge of the same size
    split, merge = voi(np.ones_like(gt), gt)
    assert split == 0.0 and merge == pytest.approx(1.0)  # H(gt | one segment) = 1 bit
    assert adapted_rand(np.ones_like(gt), gt) == pytest.approx(1 - 2 * 0.5 / 1.5)


def test_ground_truth_background_is_ignored():
    gt = np.array([[[0, 0, 1, 1, 2, 2]]])
    seg = np.array([[[9, 8, 3, 3, 4, 4]]])
    m = evaluate(seg, gt)
    assert m["voi"] == 0 and m["arand"] == 0 and m["n_voxels"] == 4


def test_segmentation_background_is_singletons_for_rand():
    gt = np.array([[[1, 1, 1, 1]]])
    seg = np.array([[[0, 0, 3, 3]]])
    # sum n_ij^2 = 4 (segment 3) + 2 singletons; sum a^2 = 16; sum b^2 = 4 + 2
    precision, recall = 6 / 6, 6 / 16
    assert adapted_rand(seg, gt) == pytest.approx(1 - 2 * precision * recall
                                                  / (precision + recall))


def test_relabeling_changes_nothing():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 6, (6, 9, 9)).astype(np.uint64)
    seg = rng.integers(1, 9, (6, 9, 9)).astype(np.uint32)
    perm = rng.permutation(1000)[:9] + 17
    relabeled = perm[seg].astype(np.uint64)
    assert evaluate(relabeled, gt) == pytest.approx(evaluate(seg, gt))


def test_pure_split_raises_only_split_term():
    rng = np.random.default_rng(2)
    gt = rng.integers(1, 5, (8, 16, 16)).astype(np.uint64)
    split_seg = gt * 2 + (np.arange(16) < 8)[None, None, :]  # cut each body in x
    m = evaluate(split_seg, gt)
    assert m["voi_split"] > 0.5 and m["voi_merge"] == 0.0
    assert m["rand_precision"] == 1.0 and m["rand_recall"] < 1.0


def test_dask_path_equals_in_memory_path():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 30, (20, 33, 41)).astype(np.uint64)
    seg = (gt * 3 + rng.integers(0, 3, gt.shape)).astype(np.uint64) % 50
    ref = evaluate(seg, gt)
    lazy = evaluate(da.from_array(seg, chunks=(7, 11, 13)), da.from_array(gt, chunks=(5, 5, 5)))
    assert lazy == pytest.approx(ref, rel=1e-12, abs=1e-12)
    table = contingency_table(seg, gt)
    lazy_table = contingency_table(da.from_array(seg, chunks=4), gt)
    for a, b in zip(table, lazy_table, strict=True):
        np.testing.assert_array_equal(a, b)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"shape \(1, 1, 3\) differs .* \(1, 1, 4\)"):
        evaluate(np.zeros((1, 1, 3), int), np.zeros((1, 1, 4), int))
    with pytest.raises(ValueError, match="integer ids, got dtype float32"):
        evaluate(np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), int))
    with pytest.raises(ValueError, match="negative ids"):
        evaluate(-np.ones((1, 1, 3), int), np.ones((1, 1, 3), int))


def _perturb(gt: np.ndarray) -> np.ndarray:
    """Merge random pairs of bodies and split each body along a plane."""
    rng = np.random.default_rng(4)
    ids = np.unique(gt)
    merged = dict(zip(ids.tolist(), (rng.integers(0, len(ids) // 2, len(ids)) + 1).tolist()))
    seg = np.vectorize(merged.get, otypes=[np.uint64])(gt)
    return seg * 2 + (np.arange(gt.shape[2]) < gt.shape[2] // 3)[None, None, :]


def test_real_volume_against_waterz(shared_file):
    """waterz's C++ evaluation is an independent implementation of VOI and Rand."""
    waterz = pytest.importorskip("waterz", reason="waterz (the 'bench' extra) not installed")
    gt = open_volume(shared_file("medulla"), "labels/neuron_ids")[:60, :120, :120].values
    seg = _perturb(gt)
    ours = evaluate(da.from_array(seg, chunks=(25, 50, 70)), gt)
    ref = waterz.evaluate(seg, gt)
    assert ours["voi_split"] == pytest.approx(ref["voi_split"], rel=1e-9)
    assert ours["voi_merge"] == pytest.approx(ref["voi_merge"], rel=1e-9)
    assert ours["rand_recall"] == pytest.approx(ref["rand_split"], rel=1e-9)
    assert ours["rand_precision"] == pytest.approx(ref["rand_merge"], rel=1e-9)
    assert ours["voi_split"] > 0.1 and ours["voi_merge"] > 0.1


def test_real_volume_perturbation_figures(shared_file):
    """Known numbers for a fixed perturbation of real ground truth (guards regressions)."""
    gt = open_volume(shared_file("medulla"), "labels/neuron_ids")[:60, :120, :120].values
    m = evaluate(_perturb(gt), gt)
    assert m["n_voxels"] == int((gt != 0).sum())
    assert 0 < m["cremi_score"] == pytest.approx(np.sqrt(m["voi"] * m["arand"]))
