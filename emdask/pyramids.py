"""Multiscale pyramids: each level a downsampled copy of the one before, for viewers.

A viewer showing a whole volume reads a coarse level instead of every voxel.  Each level
halves the axes that are not already much coarser than the finest one, so an anisotropic
ssEM stack (40 x 4 x 4 nm) is downsampled in-plane only until x-y catch up with z.
Intensities and affinities are averaged; label volumes take the most frequent non-zero id
of each group of voxels (the mode), so ids are never blended and thin neurites survive.
The levels are written as OME-Zarr (NGFF 0.5) datasets ``s1``, ``s2``, ... beside ``s0``
with their scale and translation, by the pipeline's ``pyramid`` stage block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["downsample", "downsample_block", "pyramid_factors"]


def pyramid_factors(shape: Sequence[int], voxel_size: Sequence[float],
                    min_extent: int = 64) -> list[tuple[int, int, int]]:
    """Downsampling factors (z, y, x) of each level relative to the one before.

    An axis is halved while its voxel size is below twice the finest voxel size of that
    level (so anisotropic axes wait for the others) and it has more than one voxel; levels
    are added until no axis exceeds ``min_extent`` voxels.
    """
    shape = [int(n) for n in shape[-3:]]
    vs = [float(v) for v in voxel_size]
    levels = []
    while max(shape) > min_extent:
        finest = min(v for v, n in zip(vs, shape, strict=True) if n > 1)
        f = tuple(2 if (n > 1 and v < 2 * finest) else 1 for v, n in zip(vs, shape,
                                                                          strict=True))
        levels.append(f)
        shape = [-(-n // k) for n, k in zip(shape, f, strict=True)]
        vs = [v * k for v, k in zip(vs, f, strict=True)]
    return levels


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


def downsample(volume: Any, factors: Sequence[int] = (1, 2, 2), method: str = "auto"
               ) -> xr.DataArray:
    """Downsample a volume lazily, blockwise, by integer ``factors`` (z, y, x).

    Parameters
    ----------
    volume
        (z, y, x) or (c, z, y, x) DataArray (from :func:`emdask.open_volume`), Dask or
        numpy array.
    factors
        Integer factor per spatial axis.
    method
        ``"mean"`` (intensities, affinities), ``"mode"`` (label ids: the most frequent
        non-zero id of each group) or ``"auto"`` (mode for uint32/uint64 ids, else mean).

    Returns
    -------
    xarray.DataArray
        The downsampled volume, its ``voxel_size`` multiplied by the factors and its
        ``offset`` moved to the centre of each group of voxels.
    """
    from emdask.volumes import as_volume

    vol = volume if isinstance(volume, xr.DataArray) else as_volume(volume, (1.0, 1.0, 1.0))
    f = [int(k) for k in factors]
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"factors must be 3 positive integers (z, y, x), got {factors}")
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(vol.data)
    lead = vol.ndim - 3
    # chunks in whole groups, so that every block downsamples on its own
    chunks = [data.chunks[i] for i in range(lead)] + [
        max(k, (c[0] // k) * k) for c, k in zip(data.chunks[lead:], f, strict=True)]
    data = data.rechunk(chunks)
    out_chunks = tuple(data.chunks[:lead]) + tuple(
        tuple(-(-c // k) for c in cs) for cs, k in zip(data.chunks[lead:], f, strict=True))
    out = data.map_blocks(downsample_block, f, method, chunks=out_chunks, dtype=data.dtype)
    vs = np.asarray(vol.attrs.get("voxel_size", (1.0, 1.0, 1.0)), float)
    offset = np.asarray(vol.attrs.get("offset", (0.0, 0.0, 0.0)), float)
    new_vs = vs * f
    new_offset = offset + vs * (np.asarray(f) - 1) / 2
    coords = {d: new_offset[i] + new_vs[i] * np.arange(out.shape[lead + i])
              for i, d in enumerate("zyx")}
    attrs = dict(vol.attrs) | {"voxel_size": tuple(new_vs), "offset": tuple(new_offset)}
    return xr.DataArray(out, dims=vol.dims, coords=coords, attrs=attrs, name=vol.name)
