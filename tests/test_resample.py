"""Inputs finer than the net's voxels are read at the net's resolution (Resampled), and the
report compares with ground truth at the input's resolution by nearest neighbour."""

import h5py
import numpy as np
import pytest

from emdask import open_volume, run
from emdask.pyramids import downsample_block
from emdask.volumes import Resampled


def test_resampled_reads_means_and_centres():
    data = np.arange(4 * 6 * 10, dtype=np.float32).reshape(4, 6, 10)
    view = Resampled(data, (1, 2, 3), "mean")
    assert view.shape == (4, 3, 3)  # the group cut off at x = 9 is dropped
    np.testing.assert_array_equal(view[:, :, :], downsample_block(data[:, :, :9], (1, 2, 3)))
    np.testing.assert_array_equal(view[1:3, 1:, 2:3], view[:, :, :][1:3, 1:, 2:3])
    np.testing.assert_array_equal(view[2], view[:, :, :][2])  # an index drops its axis
    np.testing.assert_array_equal(view[-1, 0], view[:, :, :][-1, 0])
    labels = Resampled(data.astype(np.uint64), (1, 2, 3), "nearest")
    np.testing.assert_array_equal(labels[:, :, :], data[:, 1::2, 1:9:3])  # group centres
    with pytest.raises(IndexError, match="unit-step"):
        view[:, ::2, :]


def _files(tmp_path, shared_file):
    """A medulla crop stored at 10 x 10 x 10 nm and the same crop at 10 x 5 x 5 nm (every
    voxel repeated 2 x 2 in-plane), with their ground truth."""
    with h5py.File(shared_file("medulla"), "r") as f:
        raw, gt = f["raw"][200:224, :64, :64], f["labels/neuron_ids"][200:224, :64, :64]
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        for name, r, g, vs in (("coarse", raw, gt, 10.0),
                               ("fine", raw.repeat(2, 1).repeat(2, 2),
                                gt.repeat(2, 1).repeat(2, 2), 5.0)):
            for dataset, a in ((f"{name}/raw", r), (f"{name}/gt", g)):
                f[dataset] = a
                f[dataset].attrs["resolution"] = [10.0, vs, vs]
    return str(path)


def test_a_finer_input_runs_at_the_nets_resolution(tmp_path, shared_file, capsys):
    path = _files(tmp_path, shared_file)
    reports = {}
    for name in ("coarse", "fine"):
        cfg = {"input": {"url": path, "dataset": f"{name}/raw"},
               "output": {"path": str(tmp_path / f"{name}.zarr")},
               "predict": {"model": "fibsem"}, "segment": {"thresholds": [0.5]},
               "evaluate": {"url": path, "dataset": f"{name}/gt"},
               "cluster": {"processes": False, "n_workers": 1}}
        reports[name] = run(cfg, stages=["predict", "segment", "report"])
    assert "read at the net's resolution: [10.0, 10.0, 10.0] nm" in capsys.readouterr().err
    coarse, fine = (open_volume(str(tmp_path / f"{n}.zarr"), "segmentation_0.5")
                    for n in ("coarse", "fine"))
    assert fine.shape == coarse.shape == (24, 64, 64)
    assert tuple(fine.attrs["voxel_size"]) == (10.0, 10.0, 10.0)
    assert tuple(fine.attrs["offset"]) == (0.0, 2.5, 2.5)  # the centre of each 2 x 2 group
    np.testing.assert_array_equal(fine.values, coarse.values)  # the same net input
    scores = [r["stages"]["report"]["scores"] for r in (reports["fine"], reports["coarse"])]
    assert scores[0] == scores[1] and scores[0]  # the truth at 5 nm, nearest neighbour


def test_a_cremi_layout_file_runs_in_3d(tmp_path, shared_file):
    """A CREMI-layout file at 40 x 4 x 4 nm runs through the pipeline with the 3-D ssEM
    net and no resolution setting: read at 40 x 8 x 8 nm, segmented with sections linked,
    scored against its 4 nm labels."""
    with h5py.File(shared_file("cremi"), "r") as f:
        raw, gt = f["raw"][:], f["labels/neuron_ids"][:]
    # the crop's 5 sections mirrored to 10: thinner than half the net's context is refused
    raw, gt = np.concatenate([raw, raw[::-1]]), np.concatenate([gt, gt[::-1]])
    path = tmp_path / "sample_B.hdf"
    with h5py.File(path, "w") as f:
        for name, a in (("volumes/raw", raw), ("volumes/labels/neuron_ids", gt)):
            f[name] = a
            f[name].attrs["resolution"] = [40.0, 4.0, 4.0]
    cfg = {"input": {"url": str(path), "dataset": "volumes/raw"},
           "output": {"path": str(tmp_path / "b.zarr")}, "predict": {"model": "sstem3d"},
           "evaluate": {"url": str(path), "dataset": "volumes/labels/neuron_ids"},
           "cluster": {"processes": False, "n_workers": 1}}
    report = run(cfg, stages=["predict", "segment", "report"])
    seg = open_volume(str(tmp_path / "b.zarr"), "segmentation_0.5")  # the card's threshold
    assert tuple(seg.attrs["voxel_size"]) == (40.0, 8.0, 8.0) and seg.shape == (10, 250, 125)
    seg = seg.values
    linked = np.intersect1d(np.unique(seg[0]), np.unique(seg[-1]))
    assert np.isin(seg, linked[linked > 0]).mean() > 0.5  # most voxels: bodies through all
    scores = report["stages"]["report"]["scores"]
    assert scores and all(np.isfinite(list(v.values())).all() for v in scores.values()
                          if isinstance(v, dict))


def test_out_of_bounds_index_and_chunks_of_whole_groups():
    view = Resampled(np.zeros((4, 6, 10), np.uint8), (1, 2, 3))
    with pytest.raises(IndexError, match="out of bounds"):
        view[4]
    with pytest.raises(IndexError, match="out of bounds"):
        view[-5]

    class Chunked(np.ndarray):
        chunks = (2, 4, 5)

    chunked = np.zeros((4, 8, 15), np.uint8).view(Chunked)
    assert Resampled(chunked, (1, 2, 3)).chunks == (2, 2, 5)  # lcm(5, 3) / 3


def test_a_region_of_interest_is_read_on_the_files_grid(tmp_path, shared_file):
    from emdask.pipeline import _input, load_run_config

    path = _files(tmp_path, shared_file)
    for roi, units in (([[0, 0, 0], [24, 128, 127]], "voxel"),  # to the odd edge
                       ([[0, 0, 0], [40, 50, 60]], "nm")):  # from the file's origin
        cfg = load_run_config({"input": {"url": path, "dataset": "fine/raw", "roi": roi,
                                         "roi_units": units},
                               "output": {"path": str(tmp_path / "o.zarr")},
                               "predict": {"model": "fibsem"}})
        full, vol, begin = _input(cfg, (1, 2, 2))
        assert full.shape == (24, 64, 64) and begin == (0, 0, 0)
        assert vol.shape == ((24, 64, 64) if units == "voxel" else (4, 5, 6))
