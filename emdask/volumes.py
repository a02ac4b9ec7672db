"""Open and save EM volumes as lazy, physically annotated arrays.

Every volume in emdask is an :class:`xarray.DataArray` over a lazy Dask array whose chunks
follow the storage chunks.  Dimensions are ``("z", "y", "x")`` (with a leading ``"c"`` for
multi-channel data such as affinities), the coordinate of voxel ``i`` is
``offset + i * voxel_size`` in nanometres (the convention of CREMI, daisy and the OME-Zarr
``translation``), and ``attrs["voxel_size"]`` / ``attrs["offset"]`` hold the
same information as plain tuples in z-y-x order.

Readers
    * zarr v2 and v3 arrays and groups, OME-Zarr (NGFF 0.4 and 0.5) multiscale images, and
      the ``resolution``/``offset`` attributes used by daisy/funlib; any fsspec URL
      (local path, ``file://``, ``memory://``, ``s3://``...).
    * HDF5: the CREMI layout (``volumes/raw``, ``volumes/labels/neuron_ids``...) and any
      dataset with ``resolution`` / ``offset`` attributes.
    * TIFF: one multi-page file, or a folder of one image per section.

HDF5 and TIFF sources are wrapped in small picklable readers that open the file for each
chunk read, so the arrays can be shipped to distributed workers.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["SUPPORTED_DTYPES", "VolumeError", "create_volume", "cutout", "downsample_block",
           "open_volume", "read_box", "save_volume", "stored_source"]

#: dtypes a volume may have (EM intensities, labels, affinities, masks).
SUPPORTED_DTYPES = tuple(
    np.dtype(t)
    for t in ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
              "int64", "float16", "float32", "float64")
)

_HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".hdf4", ".cremi")
_TIFF_SUFFIXES = (".tif", ".tiff")
# Datasets tried, in order, when an HDF5 file is opened without naming one.
_HDF5_DEFAULT_DATASETS = ("volumes/raw", "raw")


class VolumeError(ValueError):
    """A volume could not be opened or saved; the message names the path and the problem."""


# --------------------------------------------------------------------------------------
# validation shared by readers and writers
# --------------------------------------------------------------------------------------
def _spatial_dims(ndim: int, where: str) -> tuple[str, ...]:
    if ndim == 3:
        return ("z", "y", "x")
    if ndim == 4:
        return ("c", "z", "y", "x")
    raise VolumeError(
        f"{where}: expected a 3-D (z, y, x) or 4-D (c, z, y, x) array, got {ndim}-D"
    )


def _check_dtype(dtype: Any, where: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise VolumeError(f"{where}: unsupported dtype {dtype}; supported: {names}")
    return dtype


def _check_voxel_size(voxel_size: Any, where: str) -> tuple[float, float, float]:
    if voxel_size is None:
        raise VolumeError(
            f"{where}: voxel size is missing (no 'resolution', 'voxel_size' or OME-Zarr "
            "scale metadata); pass voxel_size=(z, y, x) in nm"
        )
    vs = tuple(float(v) for v in np.ravel(voxel_size))
    if len(vs) != 3:
        raise VolumeError(f"{where}: voxel size must have 3 values (z, y, x) in nm, got {vs}")
    if not all(np.isfinite(v) and v > 0 for v in vs):
        raise VolumeError(f"{where}: voxel size must be positive and finite, got {vs} nm")
    return vs


def _check_offset(offset: Any, where: str) -> tuple[float, float, float]:
    off = (0.0, 0.0, 0.0) if offset is None else tuple(float(v) for v in np.ravel(offset))
    if len(off) != 3 or not all(np.isfinite(v) for v in off):
        raise VolumeError(f"{where}: offset must be 3 finite values (z, y, x) in nm, got {off}")
    return off


def as_volume(
    data: Any,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    name: str | None = None,
    where: str = "array",
) -> xr.DataArray:
    """Wrap a numpy/Dask array (or re-check a DataArray) as an emdask volume.

    Metadata given here overrides what ``data`` carries.
    """
    attrs: dict[str, Any] = {}
    if isinstance(data, xr.DataArray):
        attrs = dict(data.attrs)
        name = name or data.name
        data = data.data
    voxel_size = voxel_size if voxel_size is not None else attrs.get("voxel_size")
    offset = offset if offset is not None else attrs.get("offset")
    dims = _spatial_dims(np.ndim(data), where)
    _check_dtype(data.dtype, where)
    vs = _check_voxel_size(voxel_size, where)
    off = _check_offset(offset, where)
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    coords = {
        d: off[i] + vs[i] * np.arange(n)
        for i, (d, n) in enumerate(zip(dims[-3:], data.shape[-3:], strict=True))
    }
    attrs.update(voxel_size=vs, offset=off)
    return xr.DataArray(data, dims=dims, coords=coords, attrs=attrs, name=name)


# --------------------------------------------------------------------------------------
# lazy, picklable readers for HDF5 and TIFF (zarr arrays are natively lazy)
# --------------------------------------------------------------------------------------
class _HDF5Source:
    """Array-like view of one HDF5 dataset; opens the file per read so it pickles."""

    def __init__(self, path: str, dataset: str):
        import h5py

        self.path, self.dataset = path, dataset
        with h5py.File(path, "r") as f:
            ds = f[dataset]
            self.shape, self.dtype, self.chunks = ds.shape, ds.dtype, ds.chunks
            self.attrs = {k: _plain(v) for k, v in ds.attrs.items()}
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[self.dataset][key]


class _TiffSource:
    """Array-like (z, y, x) view of a multi-page TIFF or a folder of per-section images."""

    def __init__(self, files: list[str], page_mode: bool):
        import tifffile

        self.files, self.page_mode = files, page_mode
        if page_mode:
            with tifffile.TiffFile(files[0]) as tif:
                pages = tif.pages
                first = pages[0]
                self.shape = (len(pages), *first.shape)
                self.dtype = first.dtype
        else:
            first = tifffile.imread(files[0])
            self.shape = (len(files), *first.shape)
            self.dtype = first.dtype
        if len(self.shape) != 3:
            raise VolumeError(
                f"{files[0]}: TIFF sections must be 2-D greyscale images, got section shape "
                f"{self.shape[1:]}"
            )
        self.ndim = 3

    def _section(self, z: int) -> np.ndarray:
        import tifffile

        if self.page_mode:
            img = tifffile.imread(self.files[0], key=z)
        else:
            img = tifffile.imread(self.files[z])
        if img.shape != self.shape[1:]:
            where = self.files[0] if self.page_mode else self.files[z]
            raise VolumeError(
                f"{where}: section {z} has shape {img.shape}, expected {self.shape[1:]}"
            )
        return img

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        zs, rest = key[0], key[1:]
        if isinstance(zs, int | np.integer):  # one section: its axis is dropped, as numpy does
            return self._section(int(zs) % self.shape[0])[rest]
        idx = range(*zs.indices(self.shape[0]))
        if len(idx):
            return np.stack([self._section(z)[rest] for z in idx])
        return np.zeros((0, *np.empty(self.shape[1:], bool)[rest].shape), self.dtype)


def _plain(value: Any) -> Any:
    """HDF5/zarr attribute value as plain Python (lists, not numpy arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


# --------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------
def open_volume(
    url: str | os.PathLike,
    dataset: str | None = None,
    level: str | int | None = None,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    storage_options: dict | None = None,
) -> xr.DataArray:
    """Open an EM volume lazily with its physical coordinates.

    Parameters
    ----------
    url
        Path or fsspec URL of a zarr store, an HDF5 file, a TIFF file or a folder of TIFFs.
    dataset
        Array or group inside the container (``"raw"``, ``"volumes/labels/neuron_ids"``).
        For HDF5 the default is ``volumes/raw`` (CREMI) or ``raw``.  For a zarr store
        the default is the store's root.
    level
        Multiscale level of an OME-Zarr image, by path (``"s1"``, ``"1"``) or index.
        Level 0 (full resolution) by default.
    voxel_size, offset
        Override or supply the voxel size and offset in nm, z-y-x order.  Needed for TIFF,
        which carries none.
    storage_options
        Passed to fsspec for remote zarr stores (credentials, ``endpoint_url``...).

    Returns
    -------
    xarray.DataArray
        Dims ``("z", "y", "x")`` or ``("c", "z", "y", "x")``; nm coordinates; attrs
        ``voxel_size``, ``offset`` and ``source``.

    Examples
    --------
    >>> from emdask.data import sample_path
    >>> raw = open_volume(sample_path(), "raw")
    >>> raw.attrs["voxel_size"]
    (10.0, 10.0, 10.0)
    """
    url = os.fspath(url)
    kind = _container_kind(url)
    if kind == "hdf5":
        source, meta = _open_hdf5(url, dataset)
        data = da.from_array(source, chunks=source.chunks or "auto", name=False,
                             asarray=False)
        where = f"{url}:{source.dataset}"
    elif kind == "tiff":
        if dataset is not None:
            raise VolumeError(f"{url}: TIFF stacks have no datasets (got dataset={dataset!r})")
        source, meta = _open_tiff(url), {}
        data = da.from_array(source, chunks=(1, *source.shape[1:]), name=False,
                             asarray=False)
        where = url
    else:
        array, meta, path = _open_zarr(url, dataset, level, storage_options)
        source = array
        data = da.from_zarr(array)
        where = f"{url}:{path}" if path else url
    _spatial_dims(data.ndim, where)
    _check_dtype(data.dtype, where)
    vol = as_volume(
        data,
        voxel_size=voxel_size if voxel_size is not None else meta.get("voxel_size"),
        offset=offset if offset is not None else meta.get("offset"),
        name=_volume_name(where),
        where=where,
    )
    vol.attrs["source"] = where
    # a small picklable array-like that lets a blockwise stage read block plus halo straight
    # from the file (read_box), valid while the data are unchanged: isel, roll... give the
    # Dask array a new name
    vol.encoding["source"] = source
    vol.encoding["dask_name"] = data.name
    return vol


def _is_labels(dtype, method: str) -> bool:
    if method not in ("auto", "mean", "mode"):
        raise ValueError(f"method must be 'auto', 'mean' or 'mode', got {method!r}")
    if method == "auto":  # ids are unsigned 32/64-bit integers; intensities are not
        return np.dtype(dtype) in (np.uint32, np.uint64, np.int64)
    return method == "mode"


def downsample_block(data: np.ndarray, factors: Sequence[int], method: str = "auto"
                     ) -> np.ndarray:
    """Downsample the last three axes of an in-memory block by integer ``factors``.

    ``"mean"`` averages each group of voxels (rounded for integer dtypes); ``"mode"``
    takes the most frequent non-zero value of each group (0 only where all are 0; ties go
    to the first in C order); ``"auto"``: the mode for uint32/uint64/int64 (label ids),
    else the mean.  Edges that do not fill a whole group repeat their last voxel.
    """
    f = [int(k) for k in factors]
    lead = data.shape[:-3]
    pad = [(0, 0)] * len(lead) + [(0, -n % k) for n, k in zip(data.shape[-3:], f,
                                                                strict=True)]
    if any(p != (0, 0) for p in pad):
        data = np.pad(data, pad, mode="edge")
    out_shape = [n // k for n, k in zip(data.shape[-3:], f, strict=True)]
    # (lead..., z, fz, y, fy, x, fx) -> (lead..., z, y, x, fz * fy * fx)
    groups = data.reshape(*lead, out_shape[0], f[0], out_shape[1], f[1], out_shape[2], f[2])
    n = len(lead)
    groups = groups.transpose(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5).reshape(
        *lead, *out_shape, -1)
    if not _is_labels(data.dtype, method):
        mean = groups.mean(axis=-1, dtype=np.float64)
        return (np.rint(mean) if np.issubdtype(data.dtype, np.integer) else mean).astype(
            data.dtype)
    # how often each voxel's value occurs in its group; zeros count only where all are 0
    counts = (groups[..., :, None] == groups[..., None, :]).sum(axis=-1)
    counts = np.where(groups == 0, 0, counts)
    pick = np.argmax(counts, axis=-1)
    return np.take_along_axis(groups, pick[..., None], axis=-1)[..., 0]


class Resampled:
    """A picklable array-like view of ``source`` (..., z, y, x) with voxels ``factors``
    times larger: each the mean of its group of voxels (``"mean"``, for EM; integers
    rounded) or the group's centre voxel (``"nearest"``, for label ids).  A group cut off
    at the volume's end is dropped.  Reads decode only the region asked for."""

    def __init__(self, source: Any, factors: Sequence[int], method: str = "mean"):
        if method not in ("mean", "nearest"):
            raise ValueError(f"method must be 'mean' or 'nearest', got {method!r}")
        self.source, self.method = source, method
        self.factors = tuple(int(f) for f in factors)
        lead = tuple(source.shape[:-3])
        self.shape = lead + tuple(n // f for n, f in zip(source.shape[-3:], self.factors,
                                                         strict=True))
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)
        chunks = getattr(source, "chunks", None)
        # chunks of whole groups over whole storage chunks (read_box's chunk cache)
        self.chunks = (lead + tuple(math.lcm(int(c), f) // f for c, f in zip(
            chunks[-3:], self.factors, strict=True)) if chunks is not None else None)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, box = key[:-3], list(key[-3:])
        squeeze = []
        for i, (k, n) in enumerate(zip(box, self.shape[-3:], strict=True)):
            if isinstance(k, int | np.integer):  # an index: a one-voxel slice, dropped
                if not -n <= k < n:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
                k = int(k) + n if k < 0 else int(k)
                box[i], squeeze = slice(k, k + 1), squeeze + [i]
            elif not isinstance(k, slice) or k.step not in (None, 1):
                raise IndexError("Resampled volumes are read by indices and unit-step "
                                 f"slices, got {key}")
        spans = [k.indices(n)[:2] for k, n in zip(box, self.shape[-3:], strict=True)]
        fine = tuple(slice(a * f, b * f) for (a, b), f in zip(spans, self.factors,
                                                                strict=True))
        data = np.asarray(self.source[(*lead, *fine)])
        if self.method == "nearest":
            out = data[(..., *(slice(f // 2, None, f) for f in self.factors))]
        else:
            out = downsample_block(data, self.factors, "mean")
        return out.squeeze(axis=tuple(out.ndim - 3 + i for i in squeeze)) if squeeze else out


def resampled(volume: xr.DataArray, factors: Sequence[int], method: str = "mean"
              ) -> xr.DataArray:
    """A volume (opened by :func:`open_volume`) with ``factors`` times larger voxels,
    lazily: blockwise stages read it like the file (:class:`Resampled`).  The offset moves
    to the centre of each group of voxels, as in :func:`emdask.downsample`."""
    factors = tuple(int(f) for f in factors)
    source = stored_source(volume)
    if source is None:
        raise ValueError(f"{volume.attrs.get('source', 'volume')}: resampled needs a volume "
                         "as opened from its file (not sliced or computed)")
    view = Resampled(source, factors, method)
    data = da.from_array(view, chunks=view.chunks or "auto", name=False, asarray=False)
    vs = np.asarray(volume.attrs["voxel_size"], float)
    offset = np.asarray(volume.attrs.get("offset", (0.0, 0.0, 0.0)), float)
    out = as_volume(data, voxel_size=tuple(vs * factors),
                    offset=tuple(offset + vs * (np.asarray(factors) - 1) / 2),
                    name=volume.name, where=volume.attrs.get("source"))
    out.attrs["source"] = volume.attrs.get("source")
    out.attrs["resampled"] = {"factors": list(factors), "method": method,
                              "voxel_size": vs.tolist()}
    out.encoding["source"] = view
    out.encoding["dask_name"] = data.name
    return out


def stored_source(volume: xr.DataArray) -> Any | None:
    """The array-like a volume was opened from, if its data are still exactly that
    (not a slice, a roll, or a computed array); else None."""
    source = volume.encoding.get("source")
    unchanged = (isinstance(volume.data, da.Array)
                 and volume.encoding.get("dask_name") == volume.data.name)
    return source if unchanged else None


def box_inside(shape: Sequence[int], begin: Sequence[int], end: Sequence[int],
               halo: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...]:
    """The part of the box ``[begin - halo, end + halo)`` that lies inside an array of
    ``shape`` (z, y, x), as slices of the box (what :func:`read_box` reads; the rest it
    pads)."""
    out = []
    for b, e, h, n in zip(begin, end, halo, shape, strict=True):
        lo, hi = int(b) - int(h), int(e) + int(h)
        first = min(max(lo, 0), n)
        out.append(slice(first - lo, max(min(hi, n), first) - lo))
    return tuple(out)


def read_box(source: Any, begin: Sequence[int], end: Sequence[int],
             halo: Sequence[int] = (0, 0, 0), cache: Hashable | None = None) -> np.ndarray:
    """Voxels ``[begin - halo, end + halo)`` of the last three axes of an array-like (zarr
    array, HDF5 dataset, numpy array), with zeros where the box leaves the array.  Leading
    (channel) axes are read whole.

    A halo reaches into up to 26 neighbouring storage chunks, each decoded whole for a
    thin slab.  With ``cache`` (a token naming one unchanging input, e.g. one run), the
    decoded chunks of a chunked source are kept in a per-process LRU cache
    (:data:`CHUNK_CACHE_BYTES`), so neighbouring blocks on one worker decode each chunk
    about once."""
    shape = source.shape[-3:]
    want_lo = [int(b) - int(h) for b, h in zip(begin, halo, strict=True)]
    want_hi = [int(e) + int(h) for e, h in zip(end, halo, strict=True)]
    lo = [min(max(a, 0), n) for a, n in zip(want_lo, shape, strict=True)]
    hi = [max(min(b, n), a) for a, b, n in zip(lo, want_hi, shape, strict=True)]
    lead = (slice(None),) * (len(source.shape) - 3)
    chunks = getattr(source, "chunks", None)
    if cache is not None and chunks is not None and CHUNK_CACHE_BYTES > 0:
        data = _read_cached(source, cache, lo, hi, tuple(chunks[-3:]), lead)
    else:
        data = np.asarray(source[(*lead, *(slice(a, b) for a, b in zip(lo, hi, strict=True)))])
    pad = [(0, 0)] * len(lead) + [(a - wa, wb - b) for a, wa, b, wb in
                                   zip(lo, want_lo, hi, want_hi, strict=True)]
    return np.pad(data, pad) if any(p != (0, 0) for p in pad) else data


#: Bytes of decoded chunks :func:`read_box` keeps per process (0 disables the cache).
CHUNK_CACHE_BYTES = 512 * 2**20
_chunk_cache: OrderedDict = OrderedDict()
_chunk_cache_lock = threading.Lock()
_chunk_cache_size = [0]


def clear_chunk_cache() -> None:
    """Drop the decoded chunks :func:`read_box` keeps in this process (``emdask run`` does
    so on every worker after each stage: its cached chunks are of no use to the next
    stage's tasks, which would otherwise run beside up to :data:`CHUNK_CACHE_BYTES` of
    them)."""
    with _chunk_cache_lock:
        _chunk_cache.clear()
        _chunk_cache_size[0] = 0


def _read_cached(source, token, lo, hi, chunks, lead) -> np.ndarray:
    first = [a // c for a, c in zip(lo, chunks, strict=True)]
    last = [max(b - 1, a) // c for a, b, c in zip(lo, hi, chunks, strict=True)]
    out = np.empty(source.shape[:-3] + tuple(b - a for a, b in zip(lo, hi, strict=True)),
                   source.dtype)
    if out.size == 0:
        return out
    for idx in np.ndindex(*[b - a + 1 for a, b in zip(first, last, strict=True)]):
        cidx = tuple(f + i for f, i in zip(first, idx, strict=True))
        c_lo = [i * c for i, c in zip(cidx, chunks, strict=True)]
        key = (token, cidx)
        with _chunk_cache_lock:
            block = _chunk_cache.get(key)
            if block is not None:
                _chunk_cache.move_to_end(key)
        if block is None:
            block = np.asarray(source[(*lead, *(slice(a, min(a + c, n)) for a, c, n in
                                                zip(c_lo, chunks, source.shape[-3:],
                                                    strict=True)))])
            with _chunk_cache_lock:
                if key not in _chunk_cache:
                    _chunk_cache[key] = block
                    _chunk_cache_size[0] += block.nbytes
                while _chunk_cache_size[0] > CHUNK_CACHE_BYTES and _chunk_cache:
                    _chunk_cache_size[0] -= _chunk_cache.popitem(last=False)[1].nbytes
        src = tuple(slice(max(a, c) - c, min(b, c + n) - c) for a, b, c, n in
                    zip(lo, hi, c_lo, block.shape[-3:], strict=True))
        dst = tuple(slice(max(a, c) - a, min(b, c + n) - a) for a, b, c, n in
                    zip(lo, hi, c_lo, block.shape[-3:], strict=True))
        out[(*lead, *dst)] = block[(*lead, *src)]
    return out


def _volume_name(where: str) -> str:
    """'raw' for 'file.h5:volumes/raw' or 'out.zarr:raw/s0'; the file name for a bare file."""
    path = where.rsplit(":", 1)[-1] if ":" in where.split("://")[-1] else ""
    parts = [p for p in path.split("/") if p]
    if len(parts) > 1 and parts[-1][:1] == "s" and parts[-1][1:].isdigit():
        parts = parts[:-1]  # an OME-Zarr level: name the image, not the level
    return parts[-1] if parts else Path(where.rstrip("/")).name


def _container_kind(url: str) -> str:
    lower = url.lower().rstrip("/")
    if "://" in url and not url.startswith("file://"):
        return "zarr"  # remote stores are zarr (HDF5/TIFF are read from local disk)
    local = url.removeprefix("file://")
    if lower.endswith(_HDF5_SUFFIXES):
        kind = "hdf5"
    elif lower.endswith(_TIFF_SUFFIXES) or os.path.isdir(local) and _is_tiff_folder(local):
        kind = "tiff"
    else:
        kind = "zarr"
    if not os.path.exists(local):
        raise VolumeError(f"{url}: no such file or directory")
    return kind


def _is_tiff_folder(path: str) -> bool:
    names = os.listdir(path)
    has_zarr = any(n in (".zarray", ".zgroup", "zarr.json") for n in names)
    return not has_zarr and any(n.lower().endswith(_TIFF_SUFFIXES) for n in names)


def _open_hdf5(url: str, dataset: str | None) -> tuple[_HDF5Source, dict]:
    import h5py

    path = url.removeprefix("file://")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise VolumeError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is None:
            dataset = next((d for d in _HDF5_DEFAULT_DATASETS if d in f), None)
            if dataset is None:
                raise VolumeError(
                    f"{path}: no dataset given and none of {_HDF5_DEFAULT_DATASETS} exists; "
                    f"datasets in the file: {', '.join(names) or '(none)'}"
                )
        dataset = dataset.strip("/")
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise VolumeError(
                f"{path}: no dataset {dataset!r}; datasets in the file: "
                f"{', '.join(names) or '(none)'}"
            )
    source = _HDF5Source(path, dataset)
    attrs = source.attrs
    return source, {
        "voxel_size": attrs.get("resolution", attrs.get("voxel_size")),
        "offset": attrs.get("offset"),
    }


def _open_tiff(url: str) -> _TiffSource:
    path = url.removeprefix("file://")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(_TIFF_SUFFIXES)
        )
        return _TiffSource(files, page_mode=False)
    return _TiffSource([path], page_mode=True)


def _zarr_store(url: str, mode: str, storage_options: dict | None):
    """A zarr v3 store for a local path or any fsspec URL."""
    import zarr.storage

    if "://" in url and not url.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=storage_options, read_only=(mode == "r")
        )
    path = url.removeprefix("file://")
    return zarr.storage.LocalStore(path, read_only=(mode == "r"))


def _open_zarr(url: str, dataset: str | None, level, storage_options):
    import zarr

    store = _zarr_store(url, "r", storage_options)
    try:
        root = zarr.open(store=store, mode="r")
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise VolumeError(f"{url}: not a zarr array or group ({err})") from None
    node, path = root, ""
    if dataset:
        path = dataset.strip("/")
        if isinstance(root, zarr.Group) and path not in root:
            path = _label_path(root, path) or path
        if not isinstance(root, zarr.Group) or path not in root:
            raise VolumeError(
                f"{url}: no dataset {path!r}; arrays in the store: "
                f"{', '.join(_zarr_arrays(root)) or '(none)'}"
            )
        node = root[path]
    parent_ms = None
    if isinstance(node, zarr.Array) and "/" in path:
        # an OME-Zarr level opened directly ("raw/s1"): its metadata lives on the parent
        parent_path, leaf = path.rsplit("/", 1)
        ms = _multiscales(root[parent_path].attrs)
        if ms is not None and leaf in [d["path"] for d in ms["datasets"]]:
            parent_ms, level = ms, leaf
    if isinstance(node, zarr.Group):
        ms = _multiscales(node.attrs)
        if ms is None:
            raise VolumeError(
                f"{url}:{path or '/'} is a group, not an array, and has no OME-Zarr multiscales; "
                f"arrays in it: {', '.join(_zarr_arrays(node)) or '(none)'}"
            )
        array_path, meta = _select_level(ms, level, f"{url}:{path or '/'}")
        path = f"{path}/{array_path}".strip("/")
        return node[array_path], meta, path
    if parent_ms is not None:
        _, meta = _select_level(parent_ms, level, f"{url}:{path}")
        return node, meta, path
    if level is not None:
        raise VolumeError(f"{url}:{path}: level={level!r} given but the array is not multiscale")
    attrs = dict(node.attrs)
    return node, {
        "voxel_size": attrs.get("voxel_size", attrs.get("resolution")),
        "offset": attrs.get("offset"),
    }, path


def _label_path(root, name: str) -> str | None:
    """The path of the NGFF label image ``name`` of one of the store's images
    (``<image>/labels/<name>``), so that a label image is found by its name alone."""
    import warnings

    import zarr

    with warnings.catch_warnings():  # tables and other files beside the images
        warnings.filterwarnings("ignore", message=r"Object at \S+ is not recognized")
        groups = list(root.groups())
    for image, member in groups:
        labels = member.get("labels") if isinstance(member, zarr.Group) else None
        if isinstance(labels, zarr.Group) and name in labels and name in dict(
                labels.attrs).get("ome", {}).get("labels", []):
            return f"{image}/labels/{name}"
    return None


def _zarr_arrays(group) -> list[str]:
    import zarr

    if not isinstance(group, zarr.Group):
        return []
    out = []
    for name, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            out.append(name)
    return sorted(out)


def _multiscales(attrs) -> dict | None:
    """The first OME-Zarr multiscales entry (NGFF 0.5 nests it under "ome")."""
    attrs = dict(attrs)
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    return ms[0] if ms else None


def _select_level(ms: dict, level, where: str) -> tuple[str, dict]:
    datasets = ms["datasets"]
    paths = [d["path"] for d in datasets]
    if level is None:
        idx = 0
    elif isinstance(level, int) and not isinstance(level, bool):
        if not -len(paths) <= level < len(paths):  # (-1: the coarsest)
            raise VolumeError(f"{where}: no level {level}; levels: {paths}")
        idx = level % len(paths)
    elif str(level) in paths:
        idx = paths.index(str(level))
    else:
        raise VolumeError(f"{where}: no multiscale level {level!r}; levels: {paths}")
    axes = ms.get("axes")
    names = [a["name"] if isinstance(a, dict) else a for a in axes] if axes else None
    scale, translation = None, None
    # transformations apply in order: the multiscale-wide ones after the per-level ones
    for t in list(datasets[idx].get("coordinateTransformations", [])) + list(
        ms.get("coordinateTransformations", [])
    ):
        if t.get("type") == "scale":
            factor = np.asarray(t["scale"], float)
            scale = factor * (1 if scale is None else scale)
            if translation is not None:  # x -> (x * s1 + t1) * s2: t1 is scaled too
                translation = translation * factor
        elif t.get("type") == "translation":
            tr = np.asarray(t["translation"], float)
            translation = tr if translation is None else translation + tr
    meta: dict[str, Any] = {}
    unit_factor = _nm_factor(axes)
    if scale is not None:
        meta["voxel_size"] = _spatial(scale * unit_factor, names)
    if translation is not None:
        meta["offset"] = _spatial(translation * unit_factor, names)
    return paths[idx], meta


def _spatial(values: np.ndarray, names: list[str] | None) -> list[float]:
    """The z, y, x entries of a per-axis list (channel/time axes dropped)."""
    if names is not None and all(a in names for a in "zyx"):
        return [float(values[names.index(a)]) for a in "zyx"]
    return [float(v) for v in values[-3:]]


_UNIT_TO_NM = {"nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "angstrom": 0.1,
               "picometer": 1e-3, "meter": 1e9, None: 1.0}


def _nm_factor(axes) -> np.ndarray:
    """Per-axis factor turning OME-Zarr space units into nm (non-space axes get 1)."""
    if not axes:
        return np.asarray(1.0)
    out = []
    for a in axes:
        unit = a.get("unit") if isinstance(a, dict) else None
        out.append(_UNIT_TO_NM.get(unit, 1.0) if (not isinstance(a, dict)
                                                  or a.get("type", "space") == "space") else 1.0)
    return np.asarray(out)


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------
def save_volume(
    data: xr.DataArray | da.Array | np.ndarray,
    url: str | os.PathLike,
    dataset: str,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    voxel_size: Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    storage_options: dict | None = None,
    compute: bool = True,
    attrs: dict | None = None,
):
    """Write a volume to a zarr v3 store as an OME-Zarr (NGFF 0.5) image.

    The image is a group ``dataset`` holding the full-resolution array ``s0``; the group's
    ``ome.multiscales`` metadata carries axes (with nm units), scale (voxel size) and
    translation (offset), so neuroglancer, napari and :func:`open_volume` read it back with
    the same physical coordinates.  Data are written chunk-aligned: the Dask array is
    rechunked to the storage chunks first, so every task writes whole chunks and tasks
    never share a chunk (no locks, safe in parallel on any Dask scheduler).

    Parameters
    ----------
    data
        A volume (DataArray with ``voxel_size``/``offset`` attrs), or a numpy/Dask array
        together with ``voxel_size``.
    url, dataset
        Store (path or fsspec URL) and group path inside it, e.g. ``("out.zarr", "seg")``.
    chunks
        Storage chunks (z, y, x) (channels are stored one chunk).  By default the Dask
        chunks of ``data`` when they are regular, else 64 per axis.
    overwrite
        Replace an existing dataset of that name.  Without it, an existing dataset is an
        error and nothing is written.
    compute
        If False, return the Dask graph (a delayed) that performs the write.
    attrs
        Extra attributes stored on the image group.

    Returns
    -------
    xarray.DataArray or dask.delayed.Delayed
        The written volume, reopened lazily from the store (or the pending write).
    """
    url = os.fspath(url)
    vol = as_volume(data, voxel_size, offset, where=f"{url}:{dataset}")
    dataset = dataset.strip("/")
    src_url, _, src_path = str(vol.attrs.get("source", "")).rpartition(":")
    src_parts = src_path.strip("/").split("/")
    if len(src_parts) > 1 and re.fullmatch(r"s?\d+", src_parts[-1]):
        src_parts = src_parts[:-1]  # an OME-Zarr level of the image
    if overwrite and _same_store(src_url, url) and "/".join(src_parts) == dataset:
        # replacing it would delete the very chunks the write is about to read
        raise VolumeError(f"{url}: cannot overwrite dataset {dataset!r} with data read from "
                          "it; write to a new dataset name")
    storage_chunks = _storage_chunks(vol, chunks, f"{url}:{dataset}")

    array = create_volume(url, dataset, vol.shape, vol.dtype, storage_chunks,
                          vol.attrs["voxel_size"], vol.attrs["offset"], overwrite=overwrite,
                          storage_options=storage_options, attrs=attrs, name=vol.name)
    darr = vol.data.rechunk(storage_chunks)
    write = da.store(darr, array, lock=False, compute=False, return_stored=False)
    if not compute:
        return write
    write.compute()
    return open_volume(url, dataset, storage_options=storage_options)


def _same_store(a: str, b: str) -> bool:
    """Whether two store URLs name the same place (local paths resolved)."""
    def norm(u: str) -> str:
        u = u.removeprefix("file://")
        return os.path.realpath(u) if "://" not in u else u.rstrip("/")

    return bool(a) and norm(a) == norm(b)


def create_volume(
    url: str | os.PathLike,
    dataset: str,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    overwrite: bool = False,
    storage_options: dict | None = None,
    attrs: dict | None = None,
    name: str | None = None,
):
    """Create an empty OME-Zarr image ``dataset/s0`` (z, y, x) or (c, z, y, x), filled with
    zeros, for blockwise writers; returns the zarr array.  Chunks cover all channels."""
    import zarr

    url = os.fspath(url)
    dataset = dataset.strip("/")
    where = f"{url}:{dataset}"
    if not dataset:
        raise VolumeError(f"{url}: a dataset name is required (e.g. 'raw', 'segmentation')")
    shape = tuple(int(n) for n in shape)
    _spatial_dims(len(shape), where)
    dtype = _check_dtype(dtype, where)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) == 3 and len(shape) == 4:
        chunks = (shape[0], *chunks)
    if len(chunks) != len(shape) or any(c <= 0 for c in chunks):
        raise VolumeError(f"{where}: chunks {chunks} do not fit shape {shape}")
    store = _zarr_store(url, "w", storage_options)
    root = zarr.open_group(store=store, mode="a", zarr_format=3)
    if dataset in root:
        if not overwrite:
            raise VolumeError(
                f"{url}: dataset {dataset!r} already exists; pass overwrite=True to replace it"
            )
        # an image's label images belong to it but are not replaced with it
        if "labels" in list(root[dataset].group_keys()):
            for level in list(root[dataset].array_keys()):
                del root[dataset][level]
        else:
            del root[dataset]
    dims = ("c", "z", "y", "x") if len(shape) == 4 else ("z", "y", "x")
    group = root.require_group(dataset)
    group.attrs.update(_ome_metadata(len(shape), name or _volume_name(where),
                                     _check_voxel_size(voxel_size, where),
                                     _check_offset(offset, where), attrs))
    if dataset.rsplit("/", 2)[-2:-1] == ["labels"]:  # "<image>/labels/<name>": a label image
        _register_label(root, dataset)
    return group.create_array("s0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              dimension_names=list(dims))


def _storage_chunks(vol: xr.DataArray, chunks, where: str) -> tuple[int, ...]:
    spatial = vol.shape[-3:]
    if chunks is None:
        dchunks = vol.data.chunks[-3:]
        regular = all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in dchunks)
        chunks = [c[0] for c in dchunks] if regular else [64, 64, 64]
    chunks = tuple(int(c) for c in chunks)[-3:]
    if len(chunks) != 3 or any(c <= 0 for c in chunks):
        raise VolumeError(f"{where}: chunks must be 3 positive sizes (z, y, x), got {chunks}")
    chunks = tuple(min(c, max(s, 1)) for c, s in zip(chunks, spatial, strict=True))
    return (vol.shape[0], *chunks) if vol.ndim == 4 else chunks


def add_levels(url: str | os.PathLike, dataset: str, factors: Sequence[Sequence[int]],
               overwrite: bool = False) -> list:
    """Create the empty levels ``s1``, ``s2``, ... of an OME-Zarr image beside its ``s0``,
    each downsampled by ``factors[i]`` from the one before, and list them (with their
    scale and translation: the centre of each group of voxels) in its multiscales
    metadata; returns the new zarr arrays.  Existing levels of the right shape are kept
    (a resumed pyramid) unless ``overwrite``."""
    import zarr

    url = os.fspath(url)
    root = zarr.open_group(store=_zarr_store(url, "w", None), mode="a", zarr_format=3)
    group = root[dataset]
    meta = dict(group.attrs)
    ms = meta["ome"]["multiscales"][0]
    base = group["s0"]
    s0 = ms["datasets"][0]
    scale = np.asarray(next(t["scale"] for t in s0["coordinateTransformations"]
                            if t["type"] == "scale"), float)
    translation = np.asarray(next((t["translation"] for t in s0["coordinateTransformations"]
                                   if t["type"] == "translation"), [0.0] * base.ndim), float)
    lead = base.ndim - 3
    shape, total = list(base.shape), np.ones(3, int)
    datasets, arrays = [s0], []
    for i, f in enumerate(factors, start=1):
        f = np.asarray(f, int)
        total = total * f
        shape = shape[:lead] + [-(-n // k) for n, k in zip(shape[lead:], f, strict=True)]
        chunks = tuple(base.chunks[:lead]) + tuple(
            min(c, n) for c, n in zip(base.chunks[lead:], shape[lead:], strict=True))
        name = f"s{i}"
        if name in group and not overwrite and tuple(group[name].shape) == tuple(shape):
            arrays.append(group[name])
        else:
            arrays.append(group.create_array(name, shape=tuple(shape), chunks=chunks,
                                              dtype=base.dtype, fill_value=0, overwrite=True,
                                              dimension_names=base.metadata.dimension_names))
        level_scale = scale.copy()
        level_scale[lead:] *= total
        level_translation = translation.copy()
        level_translation[lead:] += scale[lead:] * (total - 1) / 2
        datasets.append({"path": name, "coordinateTransformations": [
            {"type": "scale", "scale": level_scale.tolist()},
            {"type": "translation", "translation": level_translation.tolist()}]})
    meta["ome"] = {**meta["ome"], "multiscales": [{**ms, "datasets": datasets}]}
    group.attrs.update(meta)
    return arrays


def _register_label(root, dataset: str) -> None:
    """Make ``<image>/labels/<name>`` an NGFF 0.5 label image listed by its image's
    ``labels`` group (so that napari and other readers colour it as a segmentation)."""
    parent, name = dataset.rsplit("/", 1)
    group = root[dataset]
    meta = dict(group.attrs)
    meta["ome"] = {**meta["ome"], "image-label": {"version": "0.5",
                                                 "source": {"image": "../../"}}}
    group.attrs.update(meta)
    labels = root.require_group(parent)
    listed = dict(labels.attrs).get("ome", {}).get("labels", [])
    labels.attrs["ome"] = {"version": "0.5", "labels": sorted({*listed, name})}


def _ome_metadata(ndim: int, name: str, voxel_size, offset, extra: dict | None) -> dict:
    axes = [{"name": d, "type": "space", "unit": "nanometer"} for d in ("z", "y", "x")]
    scale = list(voxel_size)
    translation = list(offset)
    if ndim == 4:
        axes.insert(0, {"name": "c", "type": "channel"})
        scale.insert(0, 1.0)
        translation.insert(0, 0.0)
    multiscale = {
        "name": str(name or "image"),
        "axes": axes,
        "datasets": [{
            "path": "s0",
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translation},
            ],
        }],
    }
    out = {"ome": {"version": "0.5", "multiscales": [multiscale]}}
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------------------
# cutouts
# --------------------------------------------------------------------------------------
def cutout(
    volume: xr.DataArray,
    begin: Sequence[float],
    end: Sequence[float],
    units: str = "nm",
) -> xr.DataArray:
    """Select the box ``[begin, end)`` (z, y, x) of a volume, lazily.

    Only the storage chunks that intersect the box are ever read.  With ``units="nm"`` the
    box is snapped outwards to whole voxels; the result keeps its physical coordinates and
    its ``offset`` attribute is updated.
    """
    if units not in ("nm", "voxel"):
        raise ValueError(f"units must be 'nm' or 'voxel', got {units!r}")
    begin, end = np.asarray(begin, float), np.asarray(end, float)
    if begin.shape != (3,) or end.shape != (3,):
        raise ValueError(f"begin and end must be (z, y, x) triples, got {begin}, {end}")
    if units == "nm":
        vs = np.asarray(volume.attrs["voxel_size"])
        off = np.asarray(volume.attrs["offset"])
        begin = np.floor((begin - off) / vs + 1e-9)
        end = np.ceil((end - off) / vs - 1e-9)
    shape = np.asarray(volume.shape[-3:])
    lo, hi = begin.astype(int), end.astype(int)
    if np.any(lo < 0) or np.any(hi > shape) or np.any(hi <= lo):
        raise ValueError(
            f"cutout [{lo.tolist()}, {hi.tolist()}) voxels is empty or outside the volume "
            f"of shape {shape.tolist()} ({volume.attrs.get('source', volume.name)})"
        )
    out = volume.isel(z=slice(lo[0], hi[0]), y=slice(lo[1], hi[1]), x=slice(lo[2], hi[2]))
    vs = np.asarray(volume.attrs["voxel_size"])
    out.attrs["offset"] = tuple(float(v) for v in np.asarray(volume.attrs["offset"]) + lo * vs)
    return out
