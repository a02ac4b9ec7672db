"""Bundled sample data, so the demo and notebooks run without ``../shared``.

The sample is a crop of the FlyEM Drosophila medulla FIB-SEM cube (NeuroProof examples,
training_sample2; CC BY, credit HHMI Janelia FlyEM): sections z 200-249 of the 250^3 cube,
y and x 0-191, 10 nm isotropic, with its dense ground-truth neuron ids.  It lies inside the
region that emdask's boundary nets never train on.  ``make_sample.py`` beside this file
rebuilds it from the original.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

__all__ = ["sample", "sample_path"]

_SAMPLE = Path(__file__).with_name("medulla_sample.zarr")


def sample_path() -> str:
    """Path of the bundled OME-Zarr store (datasets ``raw`` and ``neuron_ids``)."""
    return str(_SAMPLE)


def sample() -> xr.Dataset:
    """The bundled sample as an :class:`xarray.Dataset` of lazy volumes.

    Returns
    -------
    xarray.Dataset
        ``raw`` (uint8 EM) and ``neuron_ids`` (uint64 ground truth), dims z, y, x with nm
        coordinates; ``attrs`` carry the voxel size and offset.

    Examples
    --------
    >>> ds = sample()
    >>> ds.raw.shape
    (50, 192, 192)
    """
    from emdask.volumes import open_volume

    raw = open_volume(_SAMPLE, "raw")
    gt = open_volume(_SAMPLE, "neuron_ids")
    ds = xr.Dataset({"raw": raw, "neuron_ids": gt})
    ds.attrs.update(voxel_size=raw.attrs["voxel_size"], offset=raw.attrs["offset"],
                    licence="CC BY (HHMI Janelia FlyEM)")
    return ds
