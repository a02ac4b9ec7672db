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

from emdask.blockwise import Step, apply
from emdask.volumes import as_volume, downsample_block

__all__ = ["downsample", "downsample_block", "downsample_step", "pyramid_factors"]


def _downsample_kernel(data: np.ndarray, where, factors, method) -> np.ndarray:
    return downsample_block(data, factors, method)


def downsample_step(factors: Sequence[int], dtype: Any, method: str = "auto",
                    channels: int | None = None) -> Step:
    """The blockwise step of :func:`downsample` (and of the pipeline's pyramid stage): a
    block of the coarser level from the voxels of the finer one it covers (``channels``:
    the length of a leading channel axis, if any)."""
    f = tuple(int(k) for k in factors)
    return Step("downsample", _downsample_kernel, np.dtype(dtype), scale=f, clip=True,
                channels=channels, params={"factors": f, "method": method})


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
    vol = volume if isinstance(volume, xr.DataArray) else as_volume(volume, (1.0, 1.0, 1.0))
    f = [int(k) for k in factors]
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"factors must be 3 positive integers (z, y, x), got {factors}")
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(vol.data)
    if vol.ndim not in (3, 4):
        raise ValueError(f"volume must be (z, y, x) or (c, z, y, x), got dims {vol.dims}")
    lead = vol.ndim - 3
    out = apply(downsample_step(f, data.dtype, method, data.shape[0] if lead else None),
                data)
    vs = np.asarray(vol.attrs.get("voxel_size", (1.0, 1.0, 1.0)), float)
    offset = np.asarray(vol.attrs.get("offset", (0.0, 0.0, 0.0)), float)
    new_vs = vs * f
    new_offset = offset + vs * (np.asarray(f) - 1) / 2
    coords = {d: new_offset[i] + new_vs[i] * np.arange(out.shape[lead + i])
              for i, d in enumerate("zyx")}
    attrs = dict(vol.attrs) | {"voxel_size": tuple(new_vs), "offset": tuple(new_offset)}
    return xr.DataArray(out, dims=vol.dims, coords=coords, attrs=attrs, name=vol.name)
