"""The output store as NGFF 0.5 (checked by an independent reader, ome-zarr-models) and its
pyramids: the right shapes, scales and values, labels never blended."""

import numpy as np
import pytest
import zarr

from emdask import open_volume
from emdask.data import sample_path
from emdask.pipeline import run
from emdask.pyramids import downsample, downsample_block, pyramid_factors


def test_downsample_block_by_hand():
    ids = np.array([[[1, 1], [0, 2]], [[2, 0], [2, 0]]], np.uint64)
    assert downsample_block(ids, (2, 2, 2)).item() == 2  # the mode, never a mean
    lone = np.zeros((2, 2, 2), np.uint64)
    lone[1, 1, 1] = 7
    assert downsample_block(lone, (2, 2, 2)).item() == 7  # a thin neurite beats background
    assert downsample_block(np.zeros((2, 2, 2), np.uint64), (2, 2, 2)).item() == 0
    raw = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    assert downsample_block(raw, (2, 2, 2)).item() == 3.5
    assert downsample_block(raw, (1, 2, 2)).ravel().tolist() == [1.5, 5.5]
    odd = np.ones((3, 5, 5), np.uint8)  # edges that fill no whole group
    assert downsample_block(odd, (2, 2, 2)).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="method must be"):
        downsample_block(raw, (2, 2, 2), "max")


def test_anisotropic_stacks_are_downsampled_in_plane_first():
    assert pyramid_factors((100, 1250, 1250), (40, 4, 4)) == [
        (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert pyramid_factors((250, 250, 250), (10, 10, 10)) == [(2, 2, 2), (2, 2, 2)]
    assert pyramid_factors((8, 64, 64), (10, 10, 10)) == []


def test_downsample_is_blockwise_equal_to_whole(tmp_path):
    raw = open_volume(str(sample_path()), "raw")[:20, :90, :90]
    chunked = raw.chunk({"z": 7, "y": 33, "x": 40})
    whole = downsample_block(raw.values, (1, 2, 2))
    np.testing.assert_array_equal(downsample(chunked, (1, 2, 2)).values, whole)
    down = downsample(raw, (2, 2, 2))
    assert down.attrs["voxel_size"] == (20.0, 20.0, 20.0)
    assert np.allclose(down.attrs["offset"], np.add(raw.attrs["offset"], 5.0))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model) -> str:
    out = tmp_path_factory.mktemp("ngff") / "run.zarr"
    run({"input": {"url": str(sample_path()), "dataset": "raw",
                   "roi": [[0, 0, 0], [40, 160, 160]]},
         "output": {"path": str(out), "chunks": [16, 64, 64]},
         "predict": {"model": tiny_model},
         "segment": {"thresholds": [0.3, 0.5]},
         "cluster": {"processes": False, "n_workers": 2}})
    return str(out)


def test_the_store_is_ngff_0_5_with_labels_and_pyramids(store):
    from ome_zarr_models.v05 import BioFormats2Raw, Image, ImageLabel, Labels

    root = zarr.open_group(store, mode="r")
    BioFormats2Raw.from_zarr(root)  # the root lists its images
    assert zarr.open_group(f"{store}/OME", mode="r").attrs["ome"]["series"] == [
        "raw", "affinities"]
    for name in ("raw", "affinities"):
        image = Image.from_zarr(root[name])
        paths = [d.path for d in image.attributes.ome.multiscales[0].datasets]
        assert paths == ["s0", "s1", "s2"]
    labels = Labels.from_zarr(root["raw/labels"]).attributes.ome.labels
    assert labels == ["fragments", "segmentation_0.3", "segmentation_0.5"]
    for name in labels:
        ImageLabel.from_zarr(root[f"raw/labels/{name}"])
    # levels: 40x160x160 at 10 nm -> 20x80x80 at 20 nm -> 10x40x40 at 40 nm
    raw = open_volume(store, "raw")
    for level, (shape, size) in enumerate([((20, 80, 80), 20.0), ((10, 40, 40), 40.0)], 1):
        down = open_volume(store, "raw", level=level)
        assert down.shape == shape and down.attrs["voxel_size"] == (size,) * 3
        assert np.allclose(down.attrs["offset"], np.add(raw.attrs["offset"], (size - 10) / 2))
    np.testing.assert_array_equal(open_volume(store, "raw", level=1).values,
                                  downsample_block(raw.values, (2, 2, 2)))
    seg = open_volume(store, "segmentation_0.5")  # a label image is found by its name
    s1 = open_volume(store, "segmentation_0.5", level=1).values
    np.testing.assert_array_equal(s1, downsample_block(seg.values, (2, 2, 2)))
    assert set(np.unique(s1)) <= set(np.unique(seg.values))  # ids kept, none blended
    affs = open_volume(store, "affinities", level=2)
    assert affs.shape[1:] == (10, 40, 40) and affs.dtype == np.uint8


def test_emdask_view_serves_the_store_with_cors_and_a_viewer(store):
    import urllib.request

    from emdask.view import view

    viewing = view(store)
    try:
        assert viewing.store_url.startswith("http://127.0.0.1:")  # localhost by default
        with urllib.request.urlopen(f"{viewing.store_url}/raw/zarr.json") as reply:
            assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "*"
            assert b'"multiscales"' in reply.read()
        options = urllib.request.Request(f"{viewing.store_url}/raw/zarr.json", method="OPTIONS")
        with urllib.request.urlopen(options) as reply:
            assert reply.status == 204 and "GET" in reply.headers["Access-Control-Allow-Methods"]
        state = viewing.viewer.state
        names = [layer.name for layer in state.layers]
        assert names == ["raw", "affinities", "fragments", "segmentation_0.3",
                         "segmentation_0.5"]
        seg = state.layers["segmentation_0.5"]
        assert seg.type == "segmentation" and seg.visible
        assert seg.layer.source[0].url == (f"zarr://{viewing.store_url}/raw/labels/"
                                           "segmentation_0.5/")
        assert list(state.dimensions.scales) == [1e-8, 1e-8, 1e-8]  # 10 nm, in metres
        assert viewing.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(viewing.url) as reply:  # the neuroglancer client
            assert reply.status == 200 and b"<html" in reply.read().lower()
    finally:
        viewing.close()
