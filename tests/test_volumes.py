"""Readers, writer, cutouts and input errors of emdask.volumes."""

import json
import socket

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile
import zarr
import zarr.storage

from emdask import VolumeError, cutout, open_volume, save_volume
from emdask.volumes import as_volume


def _ramp(shape=(6, 10, 12), dtype="uint8"):
    return (np.arange(np.prod(shape)) % 251).reshape(shape).astype(dtype)


# ---------------------------------------------------------------- real data
@pytest.mark.parametrize(
    "name, dataset, voxel_size, shape",
    [
        ("cremi", "raw", (40, 4, 4), (5, 500, 250)),
        ("cremi", "labels/neuron_ids", (40, 4, 4), (5, 500, 250)),
        ("isbi", "raw", (50, 4, 4), (30, 512, 512)),
        ("medulla", "raw", (10, 10, 10), (250, 250, 250)),
        ("medulla", "labels/neuron_ids", (10, 10, 10), (250, 250, 250)),
        ("gala", "raw", (10, 10, 10), (50, 100, 200)),
        ("snemi", "labels/neuron_ids", (30, 6, 6), (32, 160, 160)),
        ("vnc", "labels/clefts", (50, 4.6, 4.6), (20, 1024, 640)),
    ],
)
def test_shared_volumes_open_with_voxel_size(shared_file, name, dataset, voxel_size, shape):
    vol = open_volume(shared_file(name), dataset)
    assert vol.dims == ("z", "y", "x")
    assert vol.shape == shape
    assert vol.attrs["voxel_size"] == pytest.approx(voxel_size)
    assert vol.attrs["offset"] == (0.0, 0.0, 0.0)
    assert float(vol.x[1] - vol.x[0]) == pytest.approx(voxel_size[2])
    assert isinstance(vol.data, da.Array)
    with h5py.File(shared_file(name)) as f:  # chunks follow the storage chunks
        assert vol.data.chunksize == f[dataset].chunks
        np.testing.assert_array_equal(vol[:, :7, :9].values, f[dataset][:, :7, :9])


def test_hdf5_default_dataset_is_raw(shared_file):
    vol = open_volume(shared_file("cremi"))
    assert vol.name == "raw" and vol.dtype == np.uint8


def test_cremi_layout(tmp_path):
    raw, ids = _ramp(), _ramp(dtype="uint64") + 1
    path = tmp_path / "sample_A.hdf"
    with h5py.File(path, "w") as f:
        f.create_dataset("volumes/raw", data=raw, chunks=(2, 5, 6))
        f["volumes/raw"].attrs["resolution"] = (40.0, 4.0, 4.0)
        ds = f.create_dataset("volumes/labels/neuron_ids", data=ids)
        ds.attrs["resolution"] = (40.0, 4.0, 4.0)
        ds.attrs["offset"] = (1520.0, 3644.0, 3644.0)
        f.create_dataset("volumes/labels/clefts", data=ids * 0)
        f["volumes/labels/clefts"].attrs["resolution"] = (40.0, 4.0, 4.0)
    vol = open_volume(path)
    assert vol.name == "raw" and vol.data.chunksize == (2, 5, 6)
    np.testing.assert_array_equal(vol.values, raw)
    lab = open_volume(path, "volumes/labels/neuron_ids")
    assert lab.attrs["offset"] == (1520.0, 3644.0, 3644.0)
    assert float(lab.z[0]) == 1520.0 and float(lab.y[1]) == 3648.0
    assert open_volume(path, "volumes/labels/clefts").dtype == np.uint64


def test_hdf5_volume_pickles_for_distributed_workers(tmp_path):
    import pickle

    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = _ramp()
        f["raw"].attrs["resolution"] = (1, 1, 1)
    vol = pickle.loads(pickle.dumps(open_volume(path)))
    np.testing.assert_array_equal(vol.values, _ramp())


# ---------------------------------------------------------------- zarr
def test_zarr_v2_array_with_resolution_attrs(tmp_path):
    arr = zarr.create_array(tmp_path / "v2.zarr", shape=(6, 10, 12), chunks=(3, 5, 4),
                            dtype="uint16", zarr_format=2)
    arr[:] = _ramp(dtype="uint16")
    arr.attrs.update(resolution=[40, 4, 4], offset=[80, 8, 0])
    vol = open_volume(tmp_path / "v2.zarr")
    assert vol.attrs["voxel_size"] == (40.0, 4.0, 4.0)
    assert vol.attrs["offset"] == (80.0, 8.0, 0.0)
    assert vol.data.chunksize == (3, 5, 4)
    np.testing.assert_array_equal(vol.values, _ramp(dtype="uint16"))


def test_ome_zarr_v04_multiscale_levels(tmp_path):
    """NGFF 0.4 (zarr v2) image with two levels, micrometre units and a channel axis."""
    root = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=2)
    full = np.stack([_ramp(), _ramp() // 2])
    root.create_array("0", data=full, chunks=(2, 3, 5, 6))
    root.create_array("1", data=full[:, :, ::2, ::2], chunks=(2, 3, 5, 6))
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes,
        "datasets": [
            {"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1, 0.04, 0.004, 0.004]},
                {"type": "translation", "translation": [0, 0.4, 0.0, 0.008]}]},
            {"path": "1", "coordinateTransformations": [
                {"type": "scale", "scale": [1, 0.04, 0.008, 0.008]},
                {"type": "translation", "translation": [0, 0.4, 0.002, 0.010]}]},
        ],
    }]
    vol = open_volume(tmp_path / "ome.zarr")
    assert vol.dims == ("c", "z", "y", "x") and vol.shape == (2, 6, 10, 12)
    assert vol.attrs["voxel_size"] == pytest.approx((40, 4, 4))
    assert vol.attrs["offset"] == pytest.approx((400, 0, 8))
    low = open_volume(tmp_path / "ome.zarr", level="1")
    assert low.shape == (2, 6, 5, 6)
    assert low.attrs["voxel_size"] == pytest.approx((40, 8, 8))
    assert open_volume(tmp_path / "ome.zarr", level=1).shape == low.shape
    with pytest.raises(VolumeError, match=r"no multiscale level '7'.*levels: \['0', '1'\]"):
        open_volume(tmp_path / "ome.zarr", level="7")
    # a multiscale-wide scale applies after the level's translation, so scales it too
    ms = root.attrs["multiscales"]
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [1, 2, 2, 2]}]
    root.attrs["multiscales"] = ms
    vol = open_volume(tmp_path / "ome.zarr")
    assert vol.attrs["voxel_size"] == pytest.approx((80, 8, 8))
    assert vol.attrs["offset"] == pytest.approx((800, 0, 16))


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "uint32", "uint64", "int32", "int64", "float32", "float64",
              "bool"]
)
def test_save_roundtrip_exact(tmp_path, dtype):
    data = _ramp(dtype=dtype) if dtype != "bool" else _ramp() % 2 == 0
    vs, off = (33.3, 4.1, 4.1), (-12.5, 1e6 + 0.25, 3.0)
    saved = save_volume(da.from_array(data, chunks=(4, 7, 5)), tmp_path / "o.zarr", "vol",
                        chunks=(3, 4, 5), voxel_size=vs, offset=off)
    back = open_volume(tmp_path / "o.zarr", "vol")
    assert back.dtype == data.dtype
    assert back.attrs["voxel_size"] == vs and back.attrs["offset"] == off
    assert back.data.chunksize == (3, 4, 5)
    np.testing.assert_array_equal(back.values, data)
    np.testing.assert_array_equal(saved.z.values, off[0] + vs[0] * np.arange(6))


def test_save_writes_ome_zarr_v3_metadata(tmp_path):
    save_volume(as_volume(_ramp(), (40, 4, 4), (0, 8, 8)), tmp_path / "o.zarr", "raw")
    meta = json.loads((tmp_path / "o.zarr" / "raw" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    ms = meta["attributes"]["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "nanometer" for a in ms["axes"])
    tr = ms["datasets"][0]["coordinateTransformations"]
    assert tr == [{"type": "scale", "scale": [40.0, 4.0, 4.0]},
                  {"type": "translation", "translation": [0.0, 8.0, 8.0]}]
    arr = json.loads((tmp_path / "o.zarr" / "raw" / "s0" / "zarr.json").read_text())
    assert arr["dimension_names"] == ["z", "y", "x"]


def test_save_multichannel(tmp_path):
    affs = np.random.default_rng(0).random((3, 6, 10, 12), dtype=np.float32)
    save_volume(affs, tmp_path / "o.zarr", "affinities", voxel_size=(40, 4, 4),
                chunks=(2, 4, 4))
    back = open_volume(tmp_path / "o.zarr", "affinities")
    assert back.dims == ("c", "z", "y", "x")
    assert back.data.chunksize == (3, 2, 4, 4)
    np.testing.assert_array_equal(back.values, affs)


def test_save_refuses_to_overwrite(tmp_path):
    save_volume(_ramp(), tmp_path / "o.zarr", "raw", voxel_size=(1, 1, 1))
    with pytest.raises(VolumeError, match="'raw' already exists; pass overwrite=True"):
        save_volume(_ramp() * 0, tmp_path / "o.zarr", "raw", voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(open_volume(tmp_path / "o.zarr", "raw").values, _ramp())
    save_volume(_ramp() * 0, tmp_path / "o.zarr", "raw", voxel_size=(1, 1, 1), overwrite=True)
    assert open_volume(tmp_path / "o.zarr", "raw").values.max() == 0


def test_save_is_chunk_aligned_and_parallel(tmp_path, monkeypatch):
    """Every chunk is written by exactly one task, as one whole write."""
    writes: list[str] = []
    original = zarr.storage.LocalStore.set

    async def counting_set(self, key, value):
        if "/c/" in key:
            writes.append(key)
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    data = da.from_array(_ramp((20, 21, 22)), chunks=(7, 9, 11))  # misaligned on purpose
    save_volume(data, tmp_path / "o.zarr", "raw", chunks=(5, 5, 5), voxel_size=(1, 1, 1))
    assert sorted(writes) == sorted(set(writes))  # no chunk written twice
    assert len(writes) == 4 * 5 * 5
    np.testing.assert_array_equal(open_volume(tmp_path / "o.zarr", "raw").values, data)


def test_urls_file_and_memory(tmp_path):
    data = _ramp()
    save_volume(data, f"file://{tmp_path}/o.zarr", "raw", voxel_size=(40, 4, 4))
    np.testing.assert_array_equal(open_volume(f"file://{tmp_path}/o.zarr", "raw").values, data)
    save_volume(data, "memory://emdask-test/o.zarr", "raw", voxel_size=(40, 4, 4))
    vol = open_volume("memory://emdask-test/o.zarr", "raw")
    assert vol.attrs["voxel_size"] == (40.0, 4.0, 4.0)
    np.testing.assert_array_equal(vol.values, data)


@pytest.fixture
def s3_server():
    """A moto S3 server on loopback, started and stopped by the test."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test"
                 ).create_bucket(Bucket="emdask-test")
    yield {"endpoint_url": endpoint, "key": "test", "secret": "test",
           "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


def test_s3_roundtrip(s3_server):
    data = _ramp((8, 16, 16), "uint16")
    save_volume(data, "s3://emdask-test/vol.zarr", "raw", voxel_size=(40, 4, 4), chunks=(4, 8, 8),
                storage_options=s3_server)
    vol = open_volume("s3://emdask-test/vol.zarr", "raw", storage_options=s3_server)
    assert vol.attrs["voxel_size"] == (40.0, 4.0, 4.0) and vol.data.chunksize == (4, 8, 8)
    np.testing.assert_array_equal(vol.values, data)
    np.testing.assert_array_equal(cutout(vol, (4, 8, 8), (6, 9, 16), units="voxel").values,
                                  data[4:6, 8:9, 8:16])


# ---------------------------------------------------------------- TIFF
def test_tiff_multipage_and_folder(tmp_path):
    data = _ramp((5, 10, 12), "uint16")
    tifffile.imwrite(tmp_path / "stack.tif", data)
    vol = open_volume(tmp_path / "stack.tif", voxel_size=(50, 4, 4))
    assert vol.data.chunksize == (1, 10, 12)
    np.testing.assert_array_equal(vol.values, data)
    np.testing.assert_array_equal(vol[1:4:2, 2:5].values, data[1:4:2, 2:5])
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, section in enumerate(data):
        tifffile.imwrite(folder / f"sec_{z:03d}.tiff", section)
    vol = open_volume(folder, voxel_size=(50, 4, 4), offset=(100, 0, 0))
    assert vol.shape == data.shape and float(vol.z[0]) == 100.0
    np.testing.assert_array_equal(vol.values, data)


# ---------------------------------------------------------------- cutouts
def test_cutout_reads_only_intersecting_chunks(tmp_path, monkeypatch):
    save_volume(_ramp((40, 40, 40)), tmp_path / "big.zarr", "raw", chunks=(10, 10, 10),
                voxel_size=(40, 4, 4), offset=(1000, 0, 0))
    vol = open_volume(tmp_path / "big.zarr", "raw")
    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if "/c/" in key:
            reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    # by nm: z 1400-1800 nm = voxels 10-19 (one chunk row), y 30-50 nm = voxels 7-12 (two)
    part = cutout(vol, (1400, 30, 0), (1800, 50, 8), units="nm")
    assert part.shape == (10, 6, 2) and part.attrs["offset"] == (1400.0, 28.0, 0.0)
    np.testing.assert_array_equal(part.values, _ramp((40, 40, 40))[10:20, 7:13, 0:2])
    assert sorted(set(reads)) == ["raw/s0/c/1/0/0", "raw/s0/c/1/1/0"]
    reads.clear()
    _ = vol.isel(z=slice(35, 38), y=slice(0, 3), x=slice(39, 40)).values  # plain xarray too
    assert reads == ["raw/s0/c/3/0/3"]


def test_cutout_outside_volume_is_an_error(tmp_path):
    vol = as_volume(_ramp(), (40, 4, 4))
    with pytest.raises(ValueError, match="outside the volume of shape"):
        cutout(vol, (0, 0, 0), (7, 5, 5), units="voxel")


# ---------------------------------------------------------------- bad input
def test_error_missing_path(tmp_path):
    with pytest.raises(VolumeError, match=r"nope\.zarr: no such file or directory"):
        open_volume(tmp_path / "nope.zarr")


def test_error_missing_dataset_lists_existing(shared_file, tmp_path):
    with pytest.raises(VolumeError, match=r"no dataset 'labels/clefts'.*labels/neuron_ids"):
        open_volume(shared_file("cremi"), "labels/clefts")
    save_volume(_ramp(), tmp_path / "o.zarr", "raw", voxel_size=(1, 1, 1))
    with pytest.raises(VolumeError, match=r"no dataset 'affs'; arrays in the store: raw/s0"):
        open_volume(tmp_path / "o.zarr", "affs")


def test_error_wrong_ndim(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["img"] = np.zeros((10, 12), np.uint8)
        f["img"].attrs["resolution"] = (4, 4)
    with pytest.raises(VolumeError, match=r"v\.h5:img: expected a 3-D .* got 2-D"):
        open_volume(tmp_path / "v.h5", "img")
    with pytest.raises(VolumeError, match="got 5-D"):
        save_volume(np.zeros((1, 2, 3, 4, 5)), tmp_path / "o.zarr", "x", voxel_size=(1, 1, 1))


def test_error_unsupported_dtype(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 4), np.complex64)
        f["raw"].attrs["resolution"] = (40, 4, 4)
    with pytest.raises(VolumeError, match=r"v\.h5:raw: unsupported dtype complex64"):
        open_volume(tmp_path / "v.h5")


def test_error_voxel_size_missing(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(VolumeError, match=r"v\.h5:raw: voxel size is missing .*voxel_size="):
        open_volume(tmp_path / "v.h5")
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(VolumeError, match="voxel size is missing"):
        open_volume(tmp_path / "s.tif")


@pytest.mark.parametrize("bad", [(40, 0, 4), (40, -4, 4)])
def test_error_voxel_size_zero_or_negative(tmp_path, bad):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 4), np.uint8)
        f["raw"].attrs["resolution"] = bad
    with pytest.raises(VolumeError, match=r"voxel size must be positive and finite"):
        open_volume(tmp_path / "v.h5")
    with pytest.raises(VolumeError, match=r"voxel size must be positive"):
        save_volume(np.zeros((2, 3, 4)), tmp_path / "o.zarr", "raw", voxel_size=bad)


def test_read_box_pads_with_zeros_beyond_the_array():
    from emdask.volumes import read_box

    a = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6) + 1
    box = read_box(a, (0, 1, 4), (2, 3, 6), halo=(1, 1, 1))
    assert box.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(box[:, 1:, :, :3], a[:, 0:3, 0:4, 3:6])
    assert (box[:, 0] == 0).all() and (box[..., 3] == 0).all()
    np.testing.assert_array_equal(read_box(a[0], (1, 1, 1), (3, 4, 5)), a[0, 1:3, 1:4, 1:5])


def test_stored_source_only_for_unchanged_data(tmp_path):
    from emdask.volumes import stored_source

    vol = save_volume(np.ones((4, 4, 4), np.uint8), tmp_path / "s.zarr", "v", voxel_size=(1, 1, 1))
    assert stored_source(vol) is not None
    assert stored_source(vol[::-1]) is None
    assert stored_source(vol + 1) is None


def test_overwrite_refuses_to_replace_the_data_being_read(tmp_path):
    vol = save_volume(np.ones((4, 4, 4), np.uint8), tmp_path / "s.zarr", "v", voxel_size=(1, 1, 1))
    with pytest.raises(VolumeError, match="cannot overwrite dataset 'v' with data read from it"):
        save_volume(vol + 1, tmp_path / "s.zarr", "v", overwrite=True)
    for spelling in (f"{tmp_path}/./s.zarr", f"file://{tmp_path}/s.zarr"):
        with pytest.raises(VolumeError, match="cannot overwrite"):
            save_volume(vol, spelling, "v", overwrite=True)
    assert int(open_volume(tmp_path / "s.zarr", "v").sum()) == 64  # untouched


@pytest.mark.parametrize("budget", [512 * 2**20, 3000])  # everything cached / evicting
def test_read_box_with_chunk_cache_equals_direct_read(tmp_path, monkeypatch, budget):
    from emdask import volumes

    monkeypatch.setattr(volumes, "CHUNK_CACHE_BYTES", budget)
    volumes._chunk_cache.clear()
    volumes._chunk_cache_size[0] = 0
    a = np.random.default_rng(0).random((2, 13, 17, 11)).astype(np.float32)
    arr = save_volume(a, tmp_path / "c.zarr", "v", voxel_size=(1, 1, 1), chunks=(4, 5, 3))
    source = arr.encoding["source"]
    rng = np.random.default_rng(1)
    for _ in range(30):
        begin = rng.integers(0, [13, 17, 11])
        end = begin + rng.integers(1, 6, 3)
        halo = rng.integers(0, 4, 3)
        np.testing.assert_array_equal(volumes.read_box(source, begin, end, halo, cache=budget),
                                      volumes.read_box(source, begin, end, halo))
    assert volumes._chunk_cache_size[0] <= budget
