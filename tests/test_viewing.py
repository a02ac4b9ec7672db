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
        assert list(state.dimensions.names) == ["x", "y", "z"]
        assert np.allclose(state.dimensions.scales, 1e-8)  # 10 nm, in metres
        assert viewing.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(viewing.url) as reply:  # the neuroglancer client
            assert reply.status == 200 and b"<html" in reply.read().lower()
    finally:
        viewing.close()


def _fragment(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A neuroglancer legacy precomputed mesh fragment, read with numpy alone."""
    n = int(np.frombuffer(data[:4], np.uint32)[0])
    vertices = np.frombuffer(data[4:4 + 12 * n], np.float32).reshape(n, 3)
    return vertices, np.frombuffer(data[4 + 12 * n:], np.uint32).reshape(-1, 3)


def test_meshes_are_written_per_segment_and_lie_on_their_segments(store):
    import json
    from pathlib import Path

    seg = open_volume(store, "segmentation_0.5")
    labels = seg.values
    folder = Path(store, "raw", "labels", "segmentation_0.5", "meshes")
    assert json.loads((folder / "info").read_text()) == {"@type": "neuroglancer_legacy_mesh"}
    # meshed: every segment with at least mesh_dust (100) voxels in a block (the store's
    # 16 x 64 x 64 blocks, each with one voxel more on its high sides), and only those
    chunks, expected = (16, 64, 64), set()
    for idx in np.ndindex(*[-(-n // c) for n, c in zip(labels.shape, chunks, strict=True)]):
        box = tuple(slice(i * c, min((i + 1) * c + 1, n))
                    for i, c, n in zip(idx, chunks, labels.shape, strict=True))
        ids, counts = np.unique(labels[box], return_counts=True)
        expected |= {int(i) for i, k in zip(ids, counts, strict=True) if i and k >= 100}
    meshed = {int(p.name[:-2]) for p in folder.glob("*:0") if p.name.count(":") == 1}
    assert meshed == expected and len(expected) < len(np.unique(labels)) - 1
    vs, offset = np.asarray(seg.attrs["voxel_size"]), np.asarray(seg.attrs["offset"])
    for segment in sorted(meshed):
        fragments = json.loads((folder / f"{segment}:0").read_text())["fragments"]
        assert fragments
        vertices = np.concatenate([_fragment((folder / f).read_bytes())[0] for f in fragments])
        assert len(vertices)
        # each vertex (x, y, z nm) lies within half a voxel of a voxel of its segment
        zyx = (vertices[:, ::-1] - offset) / vs - 0.5
        near = np.zeros(len(zyx), bool)
        for corner in np.ndindex(2, 2, 2):
            idx = np.clip(np.floor(zyx).astype(int) + corner, 0, np.array(labels.shape) - 1)
            near |= labels[tuple(idx.T)] == segment
        assert near.all(), segment


def test_meshes_do_not_depend_on_the_blocks():
    from emdask.meshes import meshes

    seg = open_volume(str(sample_path()), "neuron_ids")[:20, :64, :64]
    whole = meshes(seg, chunks=(64, 256, 256), max_error=0)
    blocks = meshes(seg, chunks=(7, 20, 33), max_error=0)
    assert sorted(whole) == sorted(blocks) == [int(i) for i in np.unique(seg.values) if i]
    for segment, mesh in whole.items():  # the same surface, cut differently
        a = {tuple(v) for v in np.round(mesh.vertices, 3)}
        b = {tuple(v) for v in np.round(blocks[segment].vertices, 3)}
        assert a == b, segment


def _browser() -> bool:
    import importlib.util
    import shutil

    return bool(shutil.which("chromium") and shutil.which("chromedriver")
                and importlib.util.find_spec("selenium"))


@pytest.mark.skipif(not _browser(), reason="needs chromium, chromium-driver and selenium")
def test_a_headless_browser_shows_segments_and_meshes(neurons, tmp_path):
    from PIL import Image

    from emdask.view import screenshot, view

    viewing = view(neurons)
    try:
        path = screenshot(viewing, tmp_path / "view.png", size=(800, 400), settle=3.0)
    finally:
        viewing.close()
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    section = image[:, :400]  # the x-y panel (the 3-D panel is on the right)
    coloured = image.max(axis=-1) - image.min(axis=-1) > 30  # segment colours, not grey EM
    assert coloured[:, :400].mean() > 0.5  # the section is tinted by the segmentation...
    assert section.mean(axis=-1).std() > 10  # ...over the EM's texture
    assert coloured[:, 400:].mean() > 0.1, "no meshes in the 3-D view"


def _skeleton(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A neuroglancer precomputed skeleton, read with numpy alone."""
    n, m = (int(x) for x in np.frombuffer(data[:8], np.uint32))
    vertices = np.frombuffer(data[8:8 + 12 * n], np.float32).reshape(n, 3)
    return vertices, np.frombuffer(data[8 + 12 * n:8 + 12 * n + 8 * m], np.uint32).reshape(m, 2)


def _components(n: int, edges: np.ndarray) -> int:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[0]


def test_skeletons_are_joined_across_blocks_into_one_piece(neurons):
    import json
    from pathlib import Path

    import pandas as pd
    import scipy.ndimage as ndi

    seg = open_volume(neurons, "segmentation_0.5")
    labels = seg.values
    folder = Path(neurons, "raw", "labels", "segmentation_0.5", "skeletons")
    assert json.loads((folder / "info").read_text())["@type"] == "neuroglancer_skeletons"
    table = pd.read_parquet(Path(neurons, "skeletons.parquet"))
    # segments that are one piece of voxels and cross block faces (16x64x64 blocks)
    checked = 0
    for segment in table["id"]:
        mask = labels == segment
        zs, ys, xs = np.nonzero(mask)
        crosses = any(len(np.unique(c // b)) > 1 for c, b in ((zs, 16), (ys, 64), (xs, 64)))
        if not crosses or ndi.label(mask)[1] != 1 or mask.sum() < 2000:
            continue
        vertices, edges = _skeleton((folder / str(segment)).read_bytes())
        assert _components(len(vertices), edges) == 1, segment
        row = table[table["id"] == segment].iloc[0]
        assert row["components"] == 1 and row["vertices"] == len(vertices)
        lengths = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1)
        assert row["cable_nm"] == pytest.approx(lengths.sum(), rel=1e-4)
        # vertices lie inside their segment
        zyx = np.rint((vertices[:, ::-1] - np.asarray(seg.attrs["offset"]))
                      / np.asarray(seg.attrs["voxel_size"]) - 0.5).astype(int)
        zyx = np.clip(zyx, 0, np.array(labels.shape) - 1)
        assert (labels[tuple(zyx.T)] == segment).mean() > 0.95, segment
        checked += 1
    assert checked >= 5


def test_synapses_are_shown_as_points_with_their_partners(neurons, tmp_path):
    import shutil

    import pandas as pd

    from emdask.view import view

    copy = tmp_path / "with_synapses.zarr"
    shutil.copytree(neurons, copy)
    pd.DataFrame({"id": [1, 2], "z_nm": [2100.0, 2200.0], "y_nm": [300.0, 400.0],
                  "x_nm": [500.0, 600.0], "partner_1": [11, 0], "partner_2": [12, 0]}
                 ).to_parquet(copy / "synapses.parquet")
    viewing = view(copy)
    try:
        points = viewing.viewer.state.layers["synapses"].annotations
        assert [list(p.point) for p in points] == [[2100, 300, 500], [2200, 400, 600]]
        assert [list(p.segments[0]) if p.segments else [] for p in points] == [[11, 12], []]
    finally:
        viewing.close()
