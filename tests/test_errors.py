"""Errors of a segmentation: the true ones, split candidates, the split model, correction."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import emdask
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
    assert edits.to_dict("records") == [{"a": 1, "b": 2, "score": 0.9, "kept": 1,
                                         "reason": "model"}]
    assert (correct_splits(seg, candidates, 0.95)[0] == seg).all()  # nothing chosen
    big = np.uint64(2**63 + 5)  # ids of the full uint64 range (hashed or block-offset ids)
    seg[seg == 2] = big
    candidates = pd.DataFrame({"a": np.array([1], np.uint64), "b": np.array([big]),
                               "score": [0.9]})
    out, _ = correct_splits(seg, candidates, 0.5)
    assert out.dtype == np.uint64 and set(np.unique(out)) == {1, 3}
    # and as a speck's join beside int64 candidates: the ids stay exact
    small = pd.DataFrame({"a": np.array([big], np.uint64), "b": np.array([3], np.uint64),
                          "score": [0.7]})
    none = pd.DataFrame({"a": [1], "b": [3], "score": [0.1]})  # int64, not chosen
    out, edits = correct_splits(seg, none, 0.5, small)
    assert set(np.unique(out)) == {1, 3} and edits.a.tolist() == [big]


def _specks():
    """Two neurons (x < 10, x >= 10) as segments 1 and 2, with three specks: 3 (8 voxels,
    inside neuron 1, on the membrane), 4 (4 voxels, whose strongest contact is with 3)
    and 5 (a large
    segment, 2 x 4 x 10 voxels, inside neuron 2).  Affinities are high inside each neuron
    and low across the membrane, so each speck's best neighbour is its own neuron."""
    gt = np.ones((6, 8, 20), np.uint64)
    gt[:, :, 10:] = 2
    seg = gt.copy()
    seg[2:4, 2:4, 7:9] = 3
    seg[2:4, 2:4, 6] = 4
    seg[0:2, 0:4, 10:20] = 5
    affs = np.full((3, *gt.shape), 0.9, np.float32)
    affs[2, :, :, 10] = 0.1  # across the membrane (x edges into x = 10)
    affs[:, 2:4, 2:4, 7:9] = 0.5  # the speck's own edges: weaker, but more than 0.1
    affs[:, 2:4, 2:4, 6] = affs[0, 4, 2:4, 6] = affs[1, 2:4, 4, 6] = 0.2  # 4: weak but to 3
    return seg, gt, affs


def test_small_joins_take_each_speck_to_its_best_neighbour():
    from emdask.errors import small_joins

    seg, gt, affs = _specks()
    joins = small_joins(seg, affs, floor=10, voxel_size=(40.0, 4.0, 4.0))
    assert joins[["a", "b"]].to_numpy().tolist() == [[3, 1], [4, 3]]  # 5 is not small
    assert joins.score.between(0, 1).all() and (joins.gain > 0).all()
    assert joins.x_nm.iloc[0] == pytest.approx(joins.x.iloc[0] * 4.0)
    out, edits = correct_splits(seg, pd.DataFrame(columns=["a", "b", "score"]), 0.5, joins)
    np.testing.assert_array_equal(out, np.where(seg == 5, 5, gt))  # the chain 4 -> 3 -> 1
    assert edits.reason.tolist() == ["size", "size"]
    joins = small_joins(seg, affs, floor=100)
    assert set(joins.a) == {3, 4, 5} and joins.set_index("a").b[5] == 2
    assert len(small_joins(seg, affs, floor=0)) == 0
    # blockwise (Dask) contacts give the same joins
    import dask.array as da

    pd.testing.assert_frame_equal(small_joins(da.from_array(seg, chunks=(3, 4, 7)), affs, 100),
                                  joins)


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


def test_join_gain_is_what_joining_removes_from_voi_split():
    from emdask.errors import join_gain

    truth = np.ones((1, 1, 64), np.uint64)
    for a in (1, 16, 32):
        seg = np.where(np.arange(64) < a, 1, 2).astype(np.uint64).reshape(truth.shape)
        before = emdask.evaluate(seg, truth)["voi_split"]
        assert join_gain(a, 64 - a) / 64 == pytest.approx(before)
    assert join_gain(np.array([32, 1]), np.array([32, 1000])).tolist() == pytest.approx(
        [64.0, 1001 * np.log2(1001) - 1000 * np.log2(1000)])


def test_empty_inputs_give_empty_tables():
    seg = np.ones((4, 5, 6), np.uint64)  # one segment: nothing touches
    assert len(contacts(seg, np.ones((3, 4, 5, 6), np.float32))) == 0
    assert len(error_table(seg, np.zeros_like(seg))) == 0  # no ground truth
    assert split_labels(np.array([[1, 2]]), seg, np.zeros_like(seg)).tolist() == [False]


@pytest.fixture(scope="module")
def tiny_merge_net(tmp_path_factory) -> str:
    """An untrained merge net: the tests that use it check the machinery."""
    import torch

    from emdask.models import AffinityUNet, ModelConfig, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("merges") / "merges.pt"
    save_model(AffinityUNet(ModelConfig(width=4, downsample=[[2, 2, 2]], in_channels=2,
                                        conv3d_from_level=0, target="merges")), path,
               card={"threshold": 0.9})
    return str(path)


def test_merge_candidates_are_branch_points_and_one_point_per_cube():
    from osteoid import Skeleton

    from emdask.errors import merge_candidates

    # a T: a 1 um branch along x, one along y from its middle (vertices x-y-z nm)
    arm = [[x, 500.0, 0.0] for x in range(0, 1001, 50)]
    stem = [[500.0, y, 0.0] for y in range(550, 1001, 50)]
    vertices = np.array(arm + stem, np.float32)
    edges = [[i, i + 1] for i in range(len(arm) - 1)] + [[10, len(arm)]] + [
        [len(arm) + i, len(arm) + i + 1] for i in range(len(stem) - 1)]
    points = merge_candidates(Skeleton(vertices, np.array(edges)), 240.0)
    assert [0.0, 500.0, 500.0] in points.tolist()  # the branch point (z-y-x)
    cells = np.floor(points / 240.0)
    assert len(np.unique(cells, axis=0)) == len(points)  # one per cube...
    assert len(points) == len(np.unique(np.floor(vertices[:, ::-1] / 240.0), axis=0))


def test_merge_training_examples_mark_the_junction_only_in_merged_objects():
    from emdask.training import MERGE_RADIUS_NM, _merge_example, contact_sites

    labels = np.zeros((8, 10, 12), np.uint64)
    labels[:, :, :6], labels[:, :, 6:] = 3, 7
    labels[:, 8:] = 0  # unlabelled
    rows, first = contact_sites(labels, step=1)
    assert len(first) == 1 and (rows[:, 3:] == [3, 7]).all() and len(rows) == 8 * 8
    code = np.where(labels == 3, 1, np.where(labels == 7, 2, 0)).astype(np.uint64)
    x, target = _merge_example(np.zeros(labels.shape, np.float32), code, 3, (10, 10, 10))
    assert (x[1] == (labels > 0)).all()
    near = np.abs(np.arange(12) + 0.5 - 6) <= MERGE_RADIUS_NM / 10  # within 50 nm of x=6
    assert (target[0][:, :8] == near[None, None, :]).all() and not target[0][:, 8:].any()
    for keep in (1, 2):  # one neuron alone: no junction
        x, target = _merge_example(np.zeros(labels.shape, np.float32), code, keep,
                                   (10, 10, 10))
        assert not target.any() and (x[1] == (code == keep)).all()


def test_contacts_are_the_same_blockwise():
    import dask.array as da

    from emdask.errors import _contacts_and_sizes

    rng = np.random.default_rng(0)
    seg = rng.integers(0, 30, (20, 33, 41)).astype(np.uint64)
    affs = rng.random((3, *seg.shape)).astype(np.float32)
    whole, sizes = _contacts_and_sizes(seg, affs)
    assert sizes == dict(zip(*(x.tolist() for x in np.unique(seg, return_counts=True)),
                             strict=True))
    for chunks in [(7, 11, 13), (5, 16, 40)]:
        blocks, blocks_sizes = _contacts_and_sizes(
            da.from_array(seg, chunks=chunks), da.from_array(affs, chunks=(3, *chunks)))
        assert blocks_sizes == sizes
        pd.testing.assert_frame_equal(blocks, whole, rtol=1e-12)


def test_the_errors_stage_equals_the_functions_and_is_shown(neurons, tiny_merge_net,
                                                           tmp_path, capsys):
    import shutil

    from conftest import neurons_config

    from emdask import open_volume
    from emdask.errors import detect_merges, detect_splits, small_joins
    from emdask.pipeline import _stored_skeletons, run
    from emdask.view import view

    folder = tmp_path / "copy"
    shutil.copytree(neurons, folder / "run.zarr")
    # a split model that keeps most touching pairs (ground-truth affinities leave none)
    weights = [1.0 if f == "log_contact" else 0.0 for f in FEATURES]
    SplitModel(weights, 2.0, [0.0] * len(FEATURES), [1.0] * len(FEATURES), 0.99,
               floor=300).save(tmp_path / "splits.json")  # the floor: the config's default
    config = neurons_config(Path(neurons).parent) | {"errors": {
        "merge_model": tiny_merge_net, "split_model": str(tmp_path / "splits.json"),
        "min_size": 2000}}
    config["output"]["path"] = str(folder / "run.zarr")
    run(config, stages=["errors"])
    store = str(folder / "run.zarr")
    table = pd.read_parquet(folder / "run.zarr" / "errors.parquet")
    assert set(table.kind) == {"split", "merge", "small"}
    ranked = table[table.kind != "small"]  # the specks' joins come last, unranked
    assert ranked.priority.is_monotonic_decreasing and (table.index[:len(ranked)] ==
                                                        ranked.index).all()

    seg = open_volume(store, "segmentation_0.5").compute()
    raw = open_volume(store, "raw").values
    affs = open_volume(str(Path(neurons).parent / "affs.zarr"), "affinities").values[
        :3, :40, :160, :160]  # the run's roi
    ids, counts = np.unique(seg.values, return_counts=True)
    big = [int(s) for s, n in zip(ids, counts, strict=True) if s and n >= 2000]
    skeletons = _stored_skeletons(store, "raw/labels/segmentation_0.5",
                                  [s for s in big if (folder / "run.zarr" / "raw" / "labels"
                                                      / "segmentation_0.5" / "skeletons"
                                                      / str(s)).exists()])
    assert len(skeletons) >= 5
    # the stage (contacts blockwise, windows per block) = the functions on whole arrays
    splits = detect_splits(seg.values, affs, tmp_path / "splits.json",
                           voxel_size=seg.attrs["voxel_size"], min_size=2000,
                           skeletons=skeletons)
    splits = splits[splits.score >= 0.5]
    got = table[table.kind == "split"]
    assert len(got) >= 10
    assert sorted(map(tuple, got.segments)) == sorted(zip(splits.a, splits.b))
    np.testing.assert_allclose(np.sort(got.score), np.sort(splits.score))
    assert (got.auto == (got.score >= 0.99)).all()  # the model's threshold
    small = small_joins(seg, affs, 300, seg.attrs["voxel_size"])  # the model's floor
    specks = table[table.kind == "small"]
    assert len(specks) >= 3 and specks.auto.all()
    assert [tuple(x) for x in specks.segments] == list(zip(small.a, small.b, strict=True))
    np.testing.assert_allclose(specks[["score", "z_nm", "y_nm", "x_nm"]],
                               small[["score", "z_nm", "y_nm", "x_nm"]])
    np.testing.assert_allclose(np.sort(got.priority), np.sort(splits.score * splits.gain))
    merges = detect_merges(raw, seg, tiny_merge_net, skeletons=skeletons)
    lazy = detect_merges(raw, seg.chunk(16), tiny_merge_net, skeletons=skeletons)
    pd.testing.assert_frame_equal(lazy, merges)  # sizes counted per chunk
    merges = merges.assign(priority=merges.score * merges.voxels).sort_values(
        "priority", ascending=False, kind="stable")
    assert (merges.voxels == [counts[ids == s][0] for s in merges.segment]).all()
    got = table[table.kind == "merge"]
    assert [s[0] for s in got.segments] == merges.segment.tolist()
    np.testing.assert_allclose(got.score, merges.score, rtol=1e-5)
    np.testing.assert_allclose(got.priority, merges.priority, rtol=1e-5)
    np.testing.assert_allclose(got[["z_nm", "y_nm", "x_nm"]], merges[["z_nm", "y_nm",
                                                                       "x_nm"]])
    assert (got.auto == (got.score >= 0.9)).all()  # the net's card threshold

    capsys.readouterr()
    run(config, stages=["errors"])  # resumes: the merge windows are not scored again
    assert "blocks already done" in capsys.readouterr().err

    viewing = view(store)
    try:
        layers = viewing.viewer.state.layers
        points = layers["merge candidates"].annotations
        assert len(points) == len(merges)
        assert [int(p.segments[0][0]) for p in points] == merges.segment.tolist()
        assert len(layers["split candidates"].annotations) == len(splits)
    finally:
        viewing.close()


def test_the_correct_stage_applies_the_edits_and_redoes_what_changed(neurons, tmp_path,
                                                                     capsys):
    import shutil

    from conftest import neurons_config

    from emdask import open_volume
    from emdask.pipeline import run

    folder = tmp_path / "copy"
    shutil.copytree(neurons, folder / "run.zarr")
    store = folder / "run.zarr"
    config = neurons_config(Path(neurons).parent) | {"errors": {"merge_model": None,
                                                                "auto": True}}
    config["output"]["path"] = str(store)
    seg = open_volume(str(store), "segmentation_0.5").values
    a, b, c, d = (int(x) for x in np.unique(seg)[1:5])
    pd.DataFrame({"kind": ["split", "split", "merge", "small"],
                  "segments": [[a, b], [b, c], [a], [d, c]],
                  "score": [0.99, 0.95, 0.97, 0.6], "z_nm": 0.0, "y_nm": 0.0, "x_nm": 0.0,
                  "auto": [True, False, True, True]}).to_parquet(store / "errors.parquet")
    run(config, stages=["correct"])
    edits = pd.read_parquet(store / "edits.parquet")
    assert edits.kind.tolist() == ["split", "merge", "small"] and edits["apply"].all()
    fixed = open_volume(str(store), "segmentation_0.5_corrected").values
    expected = seg.copy()
    expected[seg == b] = a  # joined: the lower id
    expected[seg == d] = c
    np.testing.assert_array_equal(fixed, expected)

    # a person undoes the join and joins b and c instead: the stage redoes every block
    edits.loc[0, "apply"] = False
    edits = pd.concat([edits, pd.DataFrame({"kind": ["split"], "segments": [[c, b]],
                                            "apply": [True], "by": ["person"]})])
    edits.to_parquet(store / "edits.parquet")
    capsys.readouterr()
    run(config, stages=["correct"])
    assert "already done" not in capsys.readouterr().err
    expected = seg.copy()
    expected[np.isin(seg, [b, c, d])] = min(b, c)
    np.testing.assert_array_equal(open_volume(str(store), "segmentation_0.5_corrected").values,
                                  expected)
    run(config, stages=["correct"])  # nothing changed: nothing redone
    assert "27 of 27 blocks already done" in capsys.readouterr().err


def test_the_correct_stage_cuts_as_the_function_does(neurons, tmp_path, monkeypatch):
    import shutil

    from conftest import neurons_config

    import emdask.pipeline
    from emdask import open_volume
    from emdask.errors import correct_merges
    from emdask.pipeline import run

    oracle = _Oracle()
    # a card that allows no automated cut (these ground-truth affinities are 0 across
    # neurons): the limit is for automated cuts only, a person's cut is made
    oracle.card["max_cut_affinity"] = -1.0
    real = emdask.pipeline._model
    monkeypatch.setattr(emdask.pipeline, "_model",
                        lambda name, device: oracle if name == "oracle" else real(name, device))
    folder = tmp_path / "copy"
    shutil.copytree(neurons, folder / "run.zarr")
    store = folder / "run.zarr"
    config = neurons_config(Path(neurons).parent) | {"errors": {"merge_model": "oracle"}}
    config["output"]["path"] = str(store)
    # make a merge: two touching neurons as one segment, the membrane between them black
    # in the EM (what the oracle sees)
    import zarr

    from emdask.errors import contacts

    root = zarr.open_group(str(store))
    labels = root["raw/labels/segmentation_0.5/s0"][:]
    affs = open_volume(str(Path(neurons).parent / "affs.zarr"), "affinities").values[
        :3, :40, :160, :160]
    ids, counts = np.unique(labels, return_counts=True)
    size = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    touching = contacts(labels, affs)
    touching = touching[[size[a] > 5000 and size[b] > 5000
                         for a, b in zip(touching.a, touching.b, strict=True)]]
    pair = touching.sort_values("contact").iloc[-1]
    a, b = int(pair.a), int(pair.b)
    import scipy.ndimage as ndi

    raw = np.clip(root["raw/s0"][:], 60, 255)
    near_b = ndi.binary_dilation(labels == b) & (labels == a)
    near_a = ndi.binary_dilation(labels == a) & (labels == b)
    raw[near_a | near_b] = 0
    root["raw/s0"][:] = raw
    root["raw/labels/segmentation_0.5/s0"][:] = np.where(labels == b, a, labels)
    seg = open_volume(str(store), "segmentation_0.5")
    at = (np.array([pair.z, pair.y, pair.x]) + 0.5) * 10.0 + seg.attrs["offset"]
    rows = [{"kind": "merge", "segments": [a], "score": 0.9, "z_nm": at[0], "y_nm": at[1],
             "x_nm": at[2], "apply": True, "by": "person"}]
    pd.DataFrame(rows).to_parquet(store / "edits.parquet")
    pd.DataFrame(rows).drop(columns=["apply", "by"]).assign(auto=False).to_parquet(
        store / "errors.parquet")
    result = run(config, stages=["correct"])
    cuts = result["stages"]["correct"]["cuts"]
    expected, edits = correct_merges(
        open_volume(str(store), "raw").values, seg.compute(),
        open_volume(str(store), "fragments").values, affs,
        pd.DataFrame(rows).rename(columns={"segments": "s"}).assign(
            segment=[r["segments"][0] for r in rows]), model=_Oracle())
    assert [c["new_id"] for c in cuts] == edits.new_id.tolist() and cuts[0]["new_id"] > 0
    fixed = open_volume(str(store), "segmentation_0.5_corrected").values
    np.testing.assert_array_equal(fixed, expected)
    # the two neurons are apart again, each whole
    assert len(np.unique(fixed[labels == a])) == 1 and len(np.unique(fixed[labels == b])) == 1
    assert fixed[labels == a][0] != fixed[labels == b][0]
    assert ((fixed == labels) | (labels == a) | (labels == b)).all()  # nothing else moved
    # the same cut as an automated decision is held to the card's limit: not made
    pd.DataFrame(rows).assign(by="auto").to_parquet(store / "edits.parquet")
    cuts = run(config, stages=["correct"])["stages"]["correct"]["cuts"]
    assert [c["new_id"] for c in cuts] == [0] and cuts[0]["cut_affinity"] == 0.0
    np.testing.assert_array_equal(
        open_volume(str(store), "segmentation_0.5_corrected").values, seg.values)


def _merged_pair():
    """Two neurons (x < 30, x >= 30) merged into segment 5; fragments are slabs of 10
    voxels in x; affinities low only across x = 30."""
    shape = (16, 24, 60)
    seg = np.full(shape, 5, np.uint64)
    frag = (np.arange(shape[2]) // 10 + 1).astype(np.uint64)[None, None, :].repeat(
        shape[1], 1).repeat(shape[0], 0)
    affs = np.full((3, *shape), 0.9, np.float32)
    affs[2, :, :, 30] = 0.1
    raw = np.random.default_rng(0).integers(60, 255, shape).astype(np.uint8)
    raw[:, :, 28:32] = 0  # the membrane between the two
    return raw, seg, frag, affs


class _Oracle:
    """Stands in for a merge net that sees the membrane (black) inside the object."""

    def __new__(cls):
        import torch

        from emdask.models import ModelConfig

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.config = ModelConfig(width=4, downsample=[[2, 2, 2]], in_channels=2,
                                          target="merges")
                self.factor = (2, 2, 2)
                self.card = {"threshold": 0.5}
                self.x0 = torch.nn.Parameter(torch.zeros(()))

            def forward(self, x):
                return torch.where(x[:, :1] + self.x0 < 0.05, 10.0, -10.0)

        return Net()


def test_a_merge_is_cut_along_the_fragment_graph():
    import dask.array as da

    from emdask.errors import correct_merges, seeded_cut

    raw, seg, frag, affs = _merged_pair()
    graph = pd.DataFrame({"a": np.arange(1, 6, dtype=np.uint64),
                          "b": np.arange(2, 7, dtype=np.uint64),
                          "mean": [0.9, 0.8, 0.1, 0.8, 0.9]})
    assert seeded_cut(graph, np.array([2], np.uint64), np.array([5], np.uint64)).tolist() \
        == [4, 5, 6]  # the weakest edge (3-4) is the cut
    candidates = pd.DataFrame({"segment": [5], "score": [0.9], "z_nm": [80.0],
                               "y_nm": [120.0], "x_nm": [300.0]})
    xr_seg = __import__("xarray").DataArray(seg, dims=("z", "y", "x"), attrs={
        "voxel_size": [10.0, 10.0, 10.0], "offset": [0.0, 0.0, 0.0]})
    fixed, edits = correct_merges(raw, xr_seg, frag, affs, candidates, model=_Oracle())
    assert edits.drop(columns="cut_affinity").to_dict("records") == [
        {"segment": 5, "new_id": 6, "fragments": 3, "score": 0.9}]
    assert edits.cut_affinity[0] == pytest.approx(0.1, abs=0.01)  # across the membrane
    np.testing.assert_array_equal(fixed, np.where(frag >= 4, 6, 5))
    # a card that lets cuts cross only weaker affinities: this one is not made
    strict = _Oracle()
    strict.card["max_cut_affinity"] = 0.05
    fixed4, edits4 = correct_merges(raw, xr_seg, frag, affs, candidates, model=strict)
    assert edits4.new_id.tolist() == [0] and edits4.fragments.tolist() == [3]
    np.testing.assert_array_equal(fixed4, seg)
    # lazily, in blocks: the same cut
    lazy = xr_seg.copy(data=da.from_array(seg, chunks=(8, 12, 16)))
    fixed2, _ = correct_merges(raw, lazy, da.from_array(frag, chunks=(8, 12, 16)),
                               da.from_array(affs, chunks=(3, 8, 12, 16)), candidates,
                               model=_Oracle())
    np.testing.assert_array_equal(fixed2, fixed)
    # below the threshold: nothing cut
    fixed3, edits3 = correct_merges(raw, xr_seg, frag, affs, candidates.assign(score=0.3),
                                    model=_Oracle())
    assert len(edits3) == 0 and (fixed3 == seg).all()


def test_the_errors_config_takes_the_split_model_and_floor_of_its_score(neurons):
    from conftest import neurons_config

    from emdask.errors import load_split_model
    from emdask.run_config import load_run_config

    base = neurons_config(Path(neurons).parent)  # its affinities' voxel size: 10 nm
    cfg = load_run_config(base | {"errors": {}}).errors
    assert cfg.split_model == "splits" and cfg.auto  # mean agglomeration's model
    assert cfg.floor == load_split_model("splits").floor > 0  # its card's floor
    learned = base | {"segment": {"thresholds": [0.5], "score": "learned",
                                  "classifier": "fibsem"}, "errors": {}}
    cfg = load_run_config(learned).errors
    assert cfg.split_model == "splits_learned"
    assert cfg.floor == load_split_model("splits_learned").floor
    assert load_run_config(base | {"errors": {"split_model": None}}).errors.floor == 0
    assert load_run_config(base | {"errors": {"floor": 50}}).errors.floor == 50
    with pytest.raises(ValueError, match="errors.floor must be >= 0, got -1"):
        load_run_config(base | {"errors": {"floor": -1}})
    with pytest.raises(ValueError, match=r"errors.split_model = 'nope'.*no shipped split"):
        load_run_config(base | {"errors": {"split_model": "nope"}})
    # the merge net too is the one for the boundary net's voxel size; none for a planar
    # 50 x 4 x 4 nm net, so "auto" cannot choose
    assert load_run_config(base | {"errors": {}}).errors.merge_model == "merges"
    planar = {k: v for k, v in base.items() if k != "affinities"} | {
        "predict": {"model": "sstem"}, "errors": {}}
    with pytest.raises(ValueError, match=r"errors.split_model = 'auto': no shipped model for "
                                         r"segmentations at \(50.0, 4.0, 4.0\) nm by mean"):
        load_run_config(planar)
    with pytest.raises(ValueError, match=r"errors.merge_model = 'auto': no shipped model"):
        load_run_config(planar | {"errors": {"split_model": None}})
    lost = base | {"affinities": {"url": "nowhere.zarr", "dataset": "affinities"}}
    with pytest.raises(ValueError, match=r"\[errors\] 'auto' chooses models by the "
                                         r"segmentation's voxel size: .*nowhere.zarr"):
        load_run_config(lost | {"errors": {}})
    assert load_run_config(planar | {"errors": {"merge_model": None, "split_model": None}}
                           ).errors.merge_model is None
    ssem = load_run_config(planar | {"predict": {"model": "sstem3d"}}).errors  # 40x10x10
    assert (ssem.split_model, ssem.merge_model) == ("splits_ssem", "merges_ssem")
    ssem = load_run_config(planar | {"predict": {"model": "sstem3d"}, "segment": {
        "thresholds": [0.5], "score": "learned", "classifier": "sstem3d"}}).errors
    assert (ssem.split_model, ssem.merge_model) == ("splits_ssem_learned", "merges_ssem")


def test_a_split_model_refuses_another_resolution():
    from emdask.errors import load_split_model

    model = load_split_model("splits")
    assert model.card["voxel_size"] == [10.0, 10.0, 10.0]  # calibrated on FIB-SEM
    model.check_voxel_size((11.0, 9.0, 10.0), "run.toml")  # within 25%: fine
    with pytest.raises(ValueError, match=r"run.toml: voxel size \(40.0, 4.0, 4.0\) nm does "
                                         r"not match the split model's \(10.0, 10.0, 10.0\)"):
        model.check_voxel_size((40.0, 4.0, 4.0), "run.toml")


def test_specks_that_choose_each_other_go_on_to_a_neuron():
    from emdask.errors import small_joins

    # two 4-voxel specks (3, 4) in neuron 1, each the other's strongest contact
    seg = np.ones((4, 6, 12), np.uint64)
    seg[:, :, 6:] = 2
    seg[1:3, 2:4, 2] = 3
    seg[1:3, 2:4, 3] = 4
    affs = np.full((3, *seg.shape), 0.9, np.float32)
    affs[2, :, :, 6] = 0.1  # the membrane
    affs[:, 1:4, 1:5, 2:5] = 0.3  # around the specks: weak
    affs[2, 1:3, 2:4, 3] = 0.95  # between them: strong
    big = np.uint64(2**63 + 1)  # and ids of the full uint64 range
    seg[seg == 1] = big
    joins = small_joins(seg, affs, floor=10)
    assert joins["round"].tolist() == [0, 0, 1]
    out, _ = correct_splits(seg, pd.DataFrame(columns=["a", "b", "score"]), 0.5, joins)
    assert set(np.unique(out).tolist()) == {2, 3}  # all of neuron 1 in one segment
    assert (out[seg == big] == out[1, 2, 2]).all()
