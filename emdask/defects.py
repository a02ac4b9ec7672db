"""Defects of serial sections: missing sections, missing regions, blur and odd contrast.

A pixel is *missing* when it lies in a ``window`` x ``window`` square of its section whose
intensities are all equal (to within ``tolerance``).  Real EM always carries noise, so only
blacked-out, saturated, padded or lost regions are flat over a whole square; the test is
local (a halo of ``window - 1`` pixels), so the mask is computed blockwise
(:func:`missing_step`, whose reading the pipeline's align stage shares) and is the same
for any chunking.

Per section, from sums over blocks: the missing fraction, the contrast (standard deviation
of the intensities that are not missing) and the sharpness (variance of the Laplacian of
Gaussian at 1 pixel over the variance of the intensities, so that it depends neither on
contrast nor much on pixel noise, which varies between sections of one stack).  A section is
*missing* when at least ``missing_fraction`` of it is missing, *blurred* when its sharpness
is below ``blur_ratio`` times the stack's median, and of *unusual contrast* when its
contrast is more than ``contrast_ratio`` times above or below the median.

The mask is what the later stages use: :func:`emdask.affinities.mask_affinities` sets the
affinities of every edge that touches a missing voxel to 0, so the watershed leaves those
voxels as background and nothing is joined across a missing section by accident.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import xarray as xr

from emdask.blockwise import Step, apply
from emdask.volumes import as_volume

__all__ = ["Defects", "as_stack", "detect_defects", "missing_mask"]


class Defects(NamedTuple):
    """What :func:`detect_defects` found."""

    #: One row per section: z, z_nm, missing_fraction, missing, partial, mean (intensity
    #: of the data that is not missing), contrast, sharpness, blurred, unusual_contrast.
    table: pd.DataFrame
    #: Lazy boolean volume, True where data is missing.
    mask: xr.DataArray


def missing_mask(section: np.ndarray, window: int = 15, tolerance: float = 0.0) -> np.ndarray:
    """Pixels of a 2-D section (or of each section of a 3-D stack) in a flat square, or
    not finite (NaN or inf: how float stacks often mark pixels without data).

    Parameters
    ----------
    section
        (y, x) or (z, y, x) intensities.
    window
        Side of the square, in pixels (odd).
    tolerance
        Largest intensity range still counted as flat.

    Examples
    --------
    >>> img = np.random.default_rng(0).integers(1, 255, (40, 40)).astype(np.uint8)
    >>> img[:20, :20] = 0
    >>> int(missing_mask(img, window=5).sum())
    400
    """
    section = np.asarray(section)
    size = (window, window) if section.ndim == 2 else (1, window, window)
    lost = ~np.isfinite(section) if section.dtype.kind == "f" else np.False_
    if lost.any():  # NaN would poison the filters; the filled pixels are masked anyway
        section = np.where(lost, 0, section)
    lo = ndi.minimum_filter(section, size, mode="nearest")
    hi = ndi.maximum_filter(section, size, mode="nearest")
    # hi >= lo, so the range is exact in the data's own dtype for unsigned integers and
    # floats (no float64 copy of the block); signed integers could overflow it
    flat = (hi - lo if section.dtype.kind in "uf" else hi.astype(np.int64) - lo) <= tolerance
    # Grow the flat centres by the window: every pixel of a flat square is missing.
    return ndi.maximum_filter(flat, size, mode="constant", cval=False) | lost


#: Halo of the sharpness filter (Laplacian of Gaussian, sigma 1 pixel).
_LOG_HALO = 5


def _laplacian(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-section Laplacian of Gaussian, NaN near missing pixels (their edges are not
    sharpness)."""
    lap = np.stack([ndi.gaussian_laplace(s.astype(np.float32), 1.0, mode="nearest",
                                         truncate=4.0) for s in image])
    near = ndi.maximum_filter(mask, (1, 2 * _LOG_HALO + 1, 2 * _LOG_HALO + 1),
                              mode="nearest")
    lap[near] = np.nan
    return lap


def _cropped(*data: np.ndarray, where, kernel, **params) -> np.ndarray:
    """``kernel`` on a block and the halo around it that lies inside the volume (filters
    that extend the edge), cropped to the block."""
    return kernel(*data, **params)[where.box.slices(where.origin[0])]


def missing_step(window: int = 15, tolerance: float = 0.0) -> Step:
    """The blockwise step of :func:`missing_mask` over a stack (as :func:`detect_defects`
    makes its mask): a halo of ``window - 1`` pixels in-plane, ``window // 2`` to find the
    flat squares and as much to grow them."""
    return Step("missing", _cropped, np.dtype(bool), halo=(0, window - 1, window - 1),
                clip=True, params={"kernel": missing_mask, "window": window,
                                   "tolerance": tolerance})


def as_stack(stack: Any) -> xr.DataArray:
    """A stack (DataArray, Dask or numpy array) as a DataArray over a Dask array (unit
    voxels where it carries none)."""
    vol = stack if isinstance(stack, xr.DataArray) else as_volume(stack, (1.0, 1.0, 1.0))
    if not isinstance(vol.data, da.Array):  # a DataArray over a numpy array
        vol = vol.copy(data=da.from_array(vol.data, chunks=-1))
    return vol


def _check_stack(stack: Any) -> xr.DataArray:
    vol = as_stack(stack)
    if vol.ndim != 3:
        raise ValueError(f"a stack of sections must be 3-D (z, y, x), got shape {vol.shape}")
    if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating)):
        raise ValueError(f"a stack of sections must hold intensities, got dtype {vol.dtype}")
    return vol


def detect_defects(
    stack: Any,
    *,
    window: int = 15,
    tolerance: float = 0.0,
    missing_fraction: float = 0.95,
    blur_ratio: float = 0.5,
    contrast_ratio: float = 2.0,
) -> Defects:
    """Find missing sections, missing regions, and blurred or odd-contrast sections.

    Parameters
    ----------
    stack
        (z, y, x) intensities: a DataArray, Dask or numpy array.  Its chunks are the
        blocks, split in z where they hold more than about 8 M voxels, and in y and x
        (to 2048) where one section of a chunk holds more.
    window, tolerance
        A pixel is missing when it lies in a flat ``window`` x ``window`` square (range of
        intensities at most ``tolerance``); see :func:`missing_mask`.
    missing_fraction
        A section with at least this fraction missing is a missing section.
    blur_ratio
        A section whose sharpness is below this times the median sharpness is blurred.
    contrast_ratio
        A section whose contrast is this many times above or below the median is flagged.

    Returns
    -------
    Defects
        The per-section table (computed) and the lazy mask volume.
    """
    vol = _check_stack(stack)
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd number of pixels >= 3, got {window}")
    if not 0 < missing_fraction <= 1:
        raise ValueError(f"missing_fraction must be in (0, 1], got {missing_fraction}")
    data = vol.data
    # The statistics take a few float64 copies of a block: blocks of at most about 8 M
    # voxels keep that to a few hundred MB per task.  Chunks are split in z, and in y and
    # x where one section of a chunk is larger (a numpy stack arrives as one block).
    cy, cx = data.chunksize[1:]
    if cy * cx > 2 ** 23:
        cy, cx = min(cy, 2048), min(cx, 2048)
    data = data.rechunk({0: min(data.chunksize[0], max(1, 2 ** 23 // max(cy * cx, 1))),
                         1: cy, 2: cx})
    mask = apply(missing_step(window, tolerance), data)
    lap = apply(Step("sharpness", _cropped, np.float32, halo=(0, _LOG_HALO, _LOG_HALO),
                     clip=True, params={"kernel": _laplacian}), data, mask)
    values = da.where(mask, np.nan, data.astype(np.float64))
    with warnings.catch_warnings():  # a missing section's statistics are NaN: fine
        warnings.simplefilter("ignore", RuntimeWarning)
        sums = dask.compute(
            mask.mean(axis=(1, 2)), da.nanmean(values, axis=(1, 2)),
            da.nanmean(values ** 2, axis=(1, 2)),
            da.nanvar(lap.astype(np.float64), axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):  # missing sections: NaN
        fraction, mean, mean2, lap_var = (np.asarray(s, np.float64) for s in sums)
        variance = np.maximum(mean2 - mean ** 2, 0)
        contrast = np.sqrt(variance)
        sharpness = lap_var / variance
    missing = fraction >= missing_fraction
    good = ~missing & np.isfinite(sharpness) & (contrast > 0)
    med_sharp = np.median(sharpness[good]) if good.any() else np.nan
    med_contrast = np.median(contrast[good]) if good.any() else np.nan
    z_nm = vol.coords["z"].values if "z" in vol.coords else np.arange(vol.shape[0])
    table = pd.DataFrame({
        "z": np.arange(vol.shape[0]),
        "z_nm": np.asarray(z_nm, np.float64),
        "missing_fraction": fraction,
        "missing": missing,
        "partial": ~missing & (fraction > 0),
        "mean": mean,
        "contrast": contrast,
        "sharpness": sharpness,
        "blurred": good & (sharpness < blur_ratio * med_sharp),
        "unusual_contrast": good & ((contrast > contrast_ratio * med_contrast)
                                    | (contrast < med_contrast / contrast_ratio)),
    })
    out = xr.DataArray(mask, dims=vol.dims, coords=vol.coords, name="defects",
                       attrs={k: vol.attrs[k] for k in ("voxel_size", "offset")
                              if k in vol.attrs})
    return Defects(table, out)
