"""Chunked boundary prediction: the affinity net mapped over a lazy volume.

Every Dask block is predicted from the block plus a halo of the net's field of view
(rounded up to its downsampling factor), and only the block itself is kept.  Because each
output voxel then sees exactly the input it would see in one pass over the whole volume,
and the pooling grid is anchored the same way in both, the chunked result equals a
whole-volume pass up to float rounding (no seams, so no blending of overlaps is needed;
the same holds for the tiles a block is cut into on a GPU).  The volume is padded with
zeros (black) beyond its borders, as in training.
"""

from __future__ import annotations

import copy
from typing import Any

import dask.array as da
import numpy as np
import torch
import xarray as xr

from emdask.affinities import mask_affinities
from emdask.models import AffinityUNet
from emdask.volumes import as_volume

__all__ = ["normalize_raw", "predict_affinities", "predict_synapses"]


def normalize_raw(raw: np.ndarray) -> np.ndarray:
    """EM intensities as float32 in [0, 1] (integers scaled by their dtype's maximum);
    pixels without data in a float stack (NaN or inf) become 0, black, like the missing
    sections of training (a NaN would spread over the net's whole field of view)."""
    raw = np.asarray(raw)
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    x = raw.astype(np.float32)
    x[~np.isfinite(x)] = 0
    return x


def _run_net(model: AffinityUNet, x: np.ndarray, device: str, patch, batch_size: int
             ) -> np.ndarray:
    """Net output for a padded block ``x`` whose sizes are multiples of the model factor.

    With ``patch``, the block is cut into tiles of that size overlapping by twice the halo,
    and each tile contributes its centre (exact, like the blocks themselves)."""
    halo = np.array(model.halo)
    shape = np.array(x.shape)
    n_out = model.config.n_outputs
    if patch is None:
        tiles = [(np.zeros(3, int), shape)]
    else:
        factor = np.array(model.factor)
        patch = np.minimum(-(-np.asarray(patch) // factor) * factor, shape)
        step = patch - 2 * halo
        if np.any(step <= 0):
            raise ValueError(f"patch {patch.tolist()} must exceed twice the halo "
                             f"{halo.tolist()}")
        starts = [sorted({*range(0, max(n - p, 0) + 1, s), max(n - p, 0)})
                  for n, p, s in zip(shape, patch, step, strict=True)]
        tiles = [(np.array([starts[d][i[d]] for d in range(3)]), patch)
                 for i in np.ndindex(*[len(t) for t in starts])]
    out = np.zeros((n_out, *shape), np.float32)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                if device.startswith("cuda") else torch.autocast("cpu", enabled=False))
    for i in range(0, len(tiles), batch_size):
        group = tiles[i:i + batch_size]
        batch = np.stack([x[tuple(slice(s, s + p) for s, p in zip(st, sz, strict=True))]
                          for st, sz in group])[:, None]
        with torch.inference_mode(), autocast:
            y = torch.sigmoid(model(torch.from_numpy(batch).to(device)).float()).cpu().numpy()
        for (st, sz), pred in zip(group, y, strict=True):
            # keep the tile's centre; at the block's own border keep up to the border
            lo = np.where(st == 0, 0, halo)
            hi = np.where(st + sz == shape, sz, sz - halo)
            src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            dst = tuple(slice(s + a, s + b) for s, a, b in zip(st, lo, hi, strict=True))
            out[(slice(None), *dst)] = pred[(slice(None), *src)]
    return out


def _predict_block(block: np.ndarray, model: AffinityUNet, device: str, patch,
                   batch_size: int, out_dtype) -> np.ndarray:
    halo = np.array(model.halo)
    factor = np.array(model.factor)
    x = normalize_raw(block)
    inner = np.array(x.shape) - 2 * halo
    # pad the end to a multiple of the factor (beyond the volume: black, as in training)
    extra = (-np.array(x.shape)) % factor
    x = np.pad(x, [(0, int(e)) for e in extra])
    y = _run_net(model, x, device, patch, batch_size)
    y = y[(slice(None), *(slice(int(h), int(h + n)) for h, n in zip(halo, inner, strict=True)))]
    if model.config.planar:  # z offsets never trained: no link across sections
        y[[k for k, (dz, _, _) in enumerate(model.config.offsets) if dz != 0]] = 0
    if out_dtype == np.uint8:
        return np.rint(y * 255).astype(np.uint8)
    return y


def _check_voxel_size(voxel_size, model: AffinityUNet, where: str) -> None:
    """The input's voxel size must be within 25% of the model's, on every axis."""
    vs = np.array(voxel_size, float)
    expected = np.array(model.config.voxel_size, float)
    if np.any(np.abs(vs / expected - 1) > 0.25):
        raise ValueError(
            f"{where}: voxel size {tuple(vs.tolist())} nm does not match the model's "
            f"{tuple(expected.tolist())} nm; resample the volume, use a model trained for "
            "this resolution, or pass check_voxel_size=False"
        )


def _aligned_chunks(n: int, chunk: int, factor: int, halo: int) -> tuple[int, ...]:
    """Chunks of an axis of length ``n`` that all start at multiples of the net's factor
    (so the pooling grid is anchored as in a whole-volume pass) and are at least the halo
    long (Dask's overlap would otherwise re-chunk them unaligned)."""
    chunk = max(-(-chunk // factor) * factor, -(-halo // factor) * factor)
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    if len(sizes) > 1 and sizes[-1] < halo:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return tuple(sizes)


def predict_affinities(
    raw: Any,
    model: AffinityUNet,
    chunks: tuple[int, int, int] | None = None,
    dtype: str = "float32",
    device: str | None = None,
    patch: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    check_voxel_size: bool = True,
    mask: Any = None,
) -> xr.DataArray:
    """Predict affinities for a (lazy) EM volume, chunk by chunk.

    Parameters
    ----------
    raw
        EM volume (z, y, x): a DataArray from :func:`emdask.open_volume` (its voxel size is
        checked against the model's), or a numpy/Dask array.
    model
        An :class:`~emdask.models.AffinityUNet`, e.g. :func:`emdask.models.pretrained`.
    chunks
        Blocks (z, y, x); rounded up to multiples of the model's downsampling factor.
        Default: the input's chunks, rounded up.
    dtype
        ``"float32"`` (probabilities) or ``"uint8"`` (probabilities x 255).
    device
        ``"cpu"`` or ``"cuda"``; default CUDA when available (bf16 autocast there).
    patch, batch_size
        Cut each block into tiles of this size (multiples of the factor) predicted in
        batches: for GPUs, whose memory limits the tile size.
    mask
        Optional (z, y, x) boolean volume of missing data (the mask of
        :func:`emdask.detect_defects`): nearest-neighbour affinities of edges that touch it
        are set to 0, so segmentation leaves it as background.

    Returns
    -------
    xarray.DataArray
        Lazy affinities (c, z, y, x), one channel per model offset (the first 3 are the
        nearest neighbours), with the input's coordinates.  A model trained on 2-D labels
        only (``config.planar``) gives 0 for offsets across sections.
    """
    if model.config.target != "affinities":
        raise ValueError(f"this model predicts {model.config.target}, not affinities; use "
                         f"predict_{model.config.target}")
    affs = _predict(raw, model, chunks, dtype, device, patch, batch_size, check_voxel_size)
    if mask is None:
        return affs
    nearest = mask_affinities(affs.data[:3], mask)
    return affs.copy(data=da.concatenate([nearest, affs.data[3:]], axis=0))


def predict_synapses(raw: Any, model: AffinityUNet | None = None, **kwargs) -> xr.DataArray:
    """Synapse probabilities (z, y, x) for a (lazy) EM volume, chunk by chunk, with a net
    trained with ``target = "synapses"`` (arguments as :func:`predict_affinities`).

    By default the shipped ``"synapses"`` model (ssTEM at 50 x 4.6 x 4.6 nm, trained on the
    larval VNC masks of Gerhard et al. 2013: its weights are for non-commercial use only,
    CC BY-NC-SA 3.0).  Train your own with ``emdask train`` (``target = "synapses"``)."""
    if model is None:
        from emdask.models import available_models, pretrained

        if "synapses" not in available_models():
            raise ValueError("no shipped synapse model yet: train one (emdask train with "
                             '[model] target = "synapses") and pass it as model=')
        model = pretrained("synapses")
    if model.config.target != "synapses":
        raise ValueError("this model predicts affinities, not synapses; use "
                         "predict_affinities")
    return _predict(raw, model, **kwargs)[0].rename("synapses")


def _predict(raw, model, chunks=None, dtype="float32", device=None, patch=None,
             batch_size=1, check_voxel_size=True) -> xr.DataArray:
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    out_dtype = np.dtype(dtype)
    if not isinstance(raw, xr.DataArray):
        raw = as_volume(raw, voxel_size=model.config.voxel_size, name="raw")
    if raw.ndim != 3:
        raise ValueError(f"raw must be 3-D (z, y, x), got dims {raw.dims}")
    if check_voxel_size:
        _check_voxel_size(raw.attrs["voxel_size"], model, raw.attrs.get("source", "raw"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model.training or next(model.parameters()).device != torch.device(device):
        model = copy.deepcopy(model).to(device).eval()  # the caller's model stays as it was
    factor, halo = np.array(model.factor), np.array(model.halo)
    data = raw.data
    shape = data.shape
    if chunks is None:
        chunks = data.chunksize
    thin = [max(0, int(h) - n) for h, n in zip(halo, shape, strict=True)]
    if any(thin):  # Dask's overlap needs the volume at least as large as the halo
        data = da.pad(data, [(0, t) for t in thin])
    data = data.rechunk(tuple(_aligned_chunks(n, c, int(f), int(h)) for n, c, f, h in
                              zip(data.shape, chunks, factor, halo, strict=True)))
    padded = da.overlap.overlap(data, depth=dict(enumerate(halo.tolist())),
                                boundary=0)
    n_out = model.config.n_outputs
    affs = padded.map_blocks(
        _predict_block, model, device, patch, batch_size, out_dtype,
        new_axis=0, dtype=out_dtype,
        # Dask merges chunks smaller than the halo, so take the grid from the padded array
        chunks=((n_out,), *(tuple(c - 2 * int(h) for c in cs)
                            for cs, h in zip(padded.chunks, halo, strict=True))),
        meta=np.empty((0, 0, 0, 0), out_dtype),
    )
    affs = affs[(slice(None), *(slice(0, n) for n in shape))]
    attrs = {k: v for k, v in raw.attrs.items() if k != "source"}
    if model.config.target == "affinities":
        attrs["offsets"] = [list(o) for o in model.config.offsets]
    return xr.DataArray(affs, dims=("c", "z", "y", "x"),
                        coords={d: raw.coords[d] for d in ("z", "y", "x")},
                        attrs=attrs, name="affinities")
