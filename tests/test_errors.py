"""Errors of a segmentation: the true ones, split candidates, the split model, correction."""

import numpy as np
import pandas as pd
import pytest

from emdask.errors import (
    FEATURES,
    SplitModel,
    contacts,
    correct_splits,
    error_table,
    split_labels,
    train_split_model,
)


def _volumes():
    """Ground truth: two neurons side by side (x < 6, x >= 6).  Segmentation: neuron 1 split
    at z = 4 into segments 1 and 2; neuron 2 merged with a strip of neuron 1 (x = 5) into
    segment 3."""
    gt = np.ones((8, 8, 12), np.uint64)
    gt[:, :, 6:] = 2
    seg = np.ones_like(gt)
    seg[4:] = 2
    seg[:, :, 5:] = 3
    return seg, gt


def test_error_table_finds_the_split_and_the_merge():
    seg, gt = _volumes()
    table = error_table(seg, gt, min_voxels=10)
    kinds = dict(zip(table.kind, zip(table.segments, table.true_ids)))
    assert set(kinds) == {"split", "merge"}
    assert kinds["split"] == ((1, 2, 3), (1,))  # neuron 1 is in segments 1, 2 and 3
    assert kinds["merge"] == ((3,), (1, 2))
    assert (table.voi > 0).all()
    # a perfect segmentation has no errors
    assert len(error_table(gt, gt, min_voxels=10)) == 0


def test_contacts_and_labels():
    seg, gt = _volumes()
    affs = np.full((3, *seg.shape), 0.9, np.float32)
    affs[0, 4] = 0.2  # the split's contact (z edges into z = 4)
    table = contacts(seg, affs).set_index(["a", "b"])
    assert set(table.index) == {(1, 2), (1, 3), (2, 3)}
    assert table.loc[(1, 2), "contact"] == 8 * 5  # the z = 4 face, x < 5
    assert table.loc[(1, 2), "mean"] == pytest.approx(0.2)
    assert table.loc[(1, 2), "z"] == pytest.approx(3.5)  # between z = 3 and 4
    labels = split_labels(np.array([[1, 2], [1, 3], [2, 3]]), seg, gt, min_voxels=10)
    assert labels.tolist() == [True, False, False]  # segment 3 is mostly neuron 2


def test_correct_splits_merges_the_chosen_pairs_and_records_them():
    seg, _ = _volumes()
    candidates = pd.DataFrame({"a": [1, 2], "b": [2, 3], "score": [0.9, 0.3]})
    out, edits = correct_splits(seg, candidates, 0.5)
    assert set(np.unique(out)) == {1, 3} and (out[seg == 2] == 1).all()
    assert edits.to_dict("records") == [{"a": 1, "b": 2, "score": 0.9, "kept": 1}]
    assert (correct_splits(seg, candidates, 0.95)[0] == seg).all()  # nothing chosen
    big = np.uint64(2**63 + 5)  # ids of the full uint64 range (hashed or block-offset ids)
    seg[seg == 2] = big
    candidates = pd.DataFrame({"a": np.array([1], np.uint64), "b": np.array([big]),
                               "score": [0.9]})
    out, _ = correct_splits(seg, candidates, 0.5)
    assert out.dtype == np.uint64 and set(np.unique(out)) == {1, 3}


def test_split_model_learns_a_separable_rule_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    feats = pd.DataFrame(rng.normal(size=(400, len(FEATURES))), columns=list(FEATURES))
    labels = feats["mean"].to_numpy() + 0.3 * feats["facing"].to_numpy() > 0.5
    model = train_split_model(feats, labels)
    p = model.predict(feats)
    assert ((p > 0.5) == labels).mean() > 0.9
    model.save(tmp_path / "m.json")
    np.testing.assert_allclose(SplitModel.load(tmp_path / "m.json").predict(feats), p)
    with pytest.raises(ValueError, match="both"):
        train_split_model(feats, np.zeros(400, bool))


def test_detect_splits_with_the_shipped_model():
    from emdask import detect_splits

    seg, _ = _volumes()
    affs = np.full((3, *seg.shape), 0.9, np.float32)
    affs[0, 4] = 0.2
    found = detect_splits(seg, affs, voxel_size=(40.0, 10.0, 10.0), min_size=10)
    assert set(zip(found.a, found.b)) == {(1, 2), (1, 3), (2, 3)}
    assert found.score.between(0, 1).all() and found.score.is_monotonic_decreasing
    row = found.set_index(["a", "b"]).loc[(1, 2)]
    assert row.z_nm == pytest.approx(3.5 * 40.0)
    with pytest.raises(ValueError, match="voxel_size"):
        detect_splits(seg, affs)


def test_empty_inputs_give_empty_tables():
    seg = np.ones((4, 5, 6), np.uint64)  # one segment: nothing touches
    assert len(contacts(seg, np.ones((3, 4, 5, 6), np.float32))) == 0
    assert len(error_table(seg, np.zeros_like(seg))) == 0  # no ground truth
    assert split_labels(np.array([[1, 2]]), seg, np.zeros_like(seg)).tolist() == [False]
