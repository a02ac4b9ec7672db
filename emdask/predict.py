"""Chunked boundary prediction: the affinity net mapped over a lazy volume.

Every block is predicted from the block plus a halo of the net's field of view (rounded
up to its downsampling factor), and only the block itself is kept.  Because each output
voxel then sees exactly the input it would see in one pass over the whole volume, and the
pooling grid is anchored the same way in both, the chunked result equals a whole-volume
pass up to float rounding (no seams, so no blending of overlaps is needed; the same holds
for the tiles a block is cut into on a GPU).  The volume is padded with zeros (black)
beyond its borders, as in training.

Test-time augmentation (``tta``): the mean of the net's outputs over the first ``tta`` of
the volume's 16 symmetries that training augments with (:func:`symmetries`), each pass's
pooling grid anchored as in the unflipped pass, so the chunked result still equals a
whole-volume pass.  It costs ``tta`` passes.  An affinity is an edge: a flipped pass's
affinity for offset o at voxel v is the edge (v, v - o), which the original stores at
v - o, so affinity nets predict a margin of their longest offset around each block and
each pass's channels are moved back (:func:`_unmap_affinities`).

Speed: the net runs in its inference form (:class:`~emdask.models.ValidUNet`: unpadded
convolutions, BatchNorm folded, channels-last, bfloat16 where the model card allows it and
the hardware has it), over blocks
as large as memory allows (:func:`task_shape`), so that the context computed twice around
blocks is a small part of the work (:func:`halo_overhead`).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr

from emdask.affinities import cut_masked
from emdask.blockwise import Step, apply
from emdask.models import AffinityUNet, ValidUNet, cached_model, card_defaults
from emdask.volumes import as_volume

__all__ = ["data_percentiles", "halo_overhead", "inference_net", "intensity_range",
           "normalize_raw", "predict_affinities", "predict_synapses", "prediction_step",
           "symmetries", "task_shape"]


# Intensity: every input is mapped to the net's input scale, [0, 1] as uint8 EM / 255 in
# training.  A model card's ``intensity`` records the percentiles of its training data on
# that scale; a volume is mapped so that its own percentiles land there (robust to 12-bit
# data in uint16, floats in [0, 255], signed integers...).  The mapping is an intensity
# range ``(lo, hi)``: the data values taken for black (0) and white (1).
PERCENTILES = (1.0, 99.0)


def _sample_blocks(data: da.Array, n_blocks: int, per_block: int = 2**20) -> np.ndarray:
    """Values of up to ``n_blocks`` of a Dask array's blocks spread evenly over it (the
    same blocks for the same chunking, whatever the dtype), each thinned by a stride to
    about ``per_block`` values; pixels without data (NaN, inf) left out."""
    n = int(np.prod(data.numblocks))
    picks = np.unique(np.linspace(0, n - 1, min(n, n_blocks)).round().astype(int))
    blocks = [data.blocks[np.unravel_index(i, data.numblocks)] for i in picks]
    thinned = [b.ravel()[::max(1, b.size // per_block)] for b in blocks]
    values = np.concatenate([np.asarray(v) for v in dask.compute(*thinned)])
    return values[np.isfinite(values)] if values.dtype.kind == "f" else values


def data_percentiles(raw: Any, percentiles=PERCENTILES, n_blocks: int = 16
                     ) -> tuple[float, float]:
    """The ``percentiles`` of a volume's intensities, estimated from ``n_blocks`` of its
    chunks.  Pixels without data are left out: NaN and inf, and zeros where zero is the
    darkest value and fills more than 0.5% of the sample (black borders of a stitched or
    aligned volume, missing sections)."""
    data = raw.data if isinstance(raw, xr.DataArray) else raw
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    where = raw.attrs.get("source", "raw") if isinstance(raw, xr.DataArray) else "raw"
    if data.size == 0:
        raise ValueError(f"{where}: the volume is empty (shape {data.shape})")
    values = _sample_blocks(data, n_blocks)
    if values.size and values.min() == 0 and np.count_nonzero(values == 0) > 0.005 * values.size:
        values = values[values != 0]
    if values.size == 0:
        raise ValueError(f"{where}: the volume holds no intensities (all NaN, inf or 0)")
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi)


def dtype_range(dtype) -> tuple[float, float]:
    """Black and white by dtype alone: integers 0 to their maximum, floats 0 to 1."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return 0.0, float(np.iinfo(dtype).max)
    return 0.0, 1.0


def intensity_range(raw: Any, model: AffinityUNet | None = None,
                    intensity: str | Sequence[float] = "auto",
                    percentiles: tuple[float, float] | None = None) -> tuple[float, float]:
    """The data values a net takes for black (0) and white (1).

    Parameters
    ----------
    raw
        The EM volume (DataArray, Dask or numpy array).
    model
        The net whose model card's ``intensity`` (the percentiles of its training data on
        its input scale) the data are mapped to.
    intensity
        ``"auto"``: map the volume's 1st and 99th percentiles (from a sample of its
        chunks) to the card's (uint8 data by dtype where the card records none);
        ``"dtype"``: integers from 0 to their dtype's maximum, floats from 0 to 1;
        ``(lo, hi)``: these data values are black and white.
    percentiles
        The volume's percentiles at the card's, if already known (as a run records them).

    A warning names the problem when a range asked for by dtype or given by hand leaves
    the data's 1-99% range far outside it or squeezed into a small part of it.
    """
    dtype = raw.dtype
    where = raw.attrs.get("source", "raw") if isinstance(raw, xr.DataArray) else "raw"
    card = (getattr(model, "card", None) or {}).get("intensity") if model else None
    if isinstance(intensity, str):
        if intensity not in ("auto", "dtype"):
            raise ValueError(f"intensity must be 'auto', 'dtype' or [black, white], got "
                             f"{intensity!r}")
        if intensity == "auto" and card:
            p = percentiles or data_percentiles(raw, card["percentiles"])
            a, b = card["values"]
            if p[1] <= p[0]:
                raise ValueError(f"{where}: the volume's intensities are constant ({p[0]:g}) "
                                 "in the sampled chunks: nothing to segment")
            scale = (b - a) / (p[1] - p[0])  # data units -> net input units
            lo = p[0] - a / scale
            return float(lo), float(lo + 1 / scale)
        if intensity == "auto":  # a net without a card's percentiles trained on uint8 / 255
            if np.dtype(dtype) != np.uint8:
                warnings.warn(f"{where}: the model card records no intensity percentiles; "
                              f"{np.dtype(dtype)} data mapped by dtype", stacklevel=2)
            return dtype_range(dtype)
        lo, hi = dtype_range(dtype)
    else:
        values = np.asarray(intensity, dtype=np.float64).ravel()
        if values.size != 2 or not np.all(np.isfinite(values)) or values[1] <= values[0]:
            raise ValueError(f"intensity range must be [black, white] with black < white, "
                             f"got {list(intensity)}")
        lo, hi = float(values[0]), float(values[1])
    p = percentiles or data_percentiles(raw, PERCENTILES)
    span = (p[1] - p[0]) / (hi - lo)
    if p[0] < lo - 0.1 * (hi - lo) or p[1] > hi + 0.1 * (hi - lo) or span < 0.2:
        warnings.warn(
            f"{where}: {np.dtype(dtype)} data with 1-99% of intensities in [{p[0]:g}, "
            f"{p[1]:g}] mapped from [{lo:g}, {hi:g}] ({span:.0%} of the net's input range): "
            "the range looks wrong for these data; use intensity='auto' or give "
            "[black, white]", stacklevel=2)
    return lo, hi


def normalize_raw(raw: np.ndarray, intensity_range: Sequence[float] | None = None
                  ) -> np.ndarray:
    """EM intensities as the net's float32 input in [0, 1]: ``(raw - black) / (white -
    black)``, clipped, with ``intensity_range = (black, white)`` (default: by dtype,
    :func:`dtype_range`).  Pixels without data in a float stack (NaN or inf) become 0,
    black, like the missing sections of training (a NaN would spread over the net's
    field of view)."""
    raw = np.asarray(raw)
    lo, hi = dtype_range(raw.dtype) if intensity_range is None else intensity_range
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:  # a table of every value: one
        values = np.arange(np.iinfo(raw.dtype).min, np.iinfo(raw.dtype).max + 1)  # pass
        table = normalize_raw(values.astype(np.float64), (lo, hi))
        return table[raw.astype(np.intp) - values[0] if values[0] else raw]
    # float64 for the affine map, so that data that differ by an affine map of their own
    # (uint8 and uint16 x 257, int16, floats) give the same float32 input
    x = (raw.astype(np.float64) - lo) * (1.0 / (hi - lo))
    x[~np.isfinite(x)] = 0
    return np.clip(x, 0.0, 1.0, out=x).astype(np.float32)


PRECISIONS = ("auto", "float32", "bfloat16")


def _torch_dtype(precision: str, device: str, card: dict | None = None) -> torch.dtype:
    """The dtype a net computes in: ``"auto"`` is bfloat16 where its model ``card`` says
    bfloat16 keeps its validation scores (``card["precision"]``) and the hardware computes
    it natively (CPUs with avx512_bf16 or AMX, CUDA GPUs that support it), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return getattr(torch, precision)
    if (card or {}).get("precision") != "bfloat16":
        return torch.float32
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPUs with avx512_bf16 or AMX, CUDA
    GPUs that support it); elsewhere torch emulates it, many times slower than float32."""
    if device.startswith("cuda"):
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


_NETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# One pass of the net at a time per process: torch already spreads each pass over the
# process's threads, so Dask threads predicting blocks side by side would only fight
# over the cores (system time) and hold several passes' memory.
_NET_LOCK = threading.Lock()


def inference_net(model: AffinityUNet, device: str = "cpu", precision: str = "auto"
                  ) -> ValidUNet:
    """The fast inference form of ``model`` (:class:`~emdask.models.ValidUNet`) on
    ``device`` at ``precision``, made once per model."""
    dtype = _torch_dtype(precision, device, getattr(model, "card", None))
    nets = _NETS.setdefault(model, {})
    # weights changed in place (a training step, load_state_dict) bump their version
    weights = tuple((t.data_ptr(), t._version) for t in itertools.chain(
        model.parameters(), model.buffers()))
    if nets.get((device, dtype), (None, None))[0] != weights:
        nets[(device, dtype)] = weights, ValidUNet(model, dtype).to(device)
    return nets[(device, dtype)][1]


def _run_net(net: ValidUNet, x: np.ndarray, begin, end, device: str,
             patch=None, batch_size: int = 1, dtype=np.float32) -> np.ndarray:
    """Probabilities (c, z, y, x) for the box ``begin``-``end`` of ``x`` (the net's input,
    float32, whose origin lies on the pooling grid; zeros are taken beyond it), as
    float32 or as uint8 (``round(255 p)``).

    With ``patch``, the box is cut into output tiles of that size predicted in batches;
    each tile reads only the context it needs, and the tiles abut exactly."""
    begin, end = np.asarray(begin), np.asarray(end)
    f = np.array(net.factor)
    size = -(-(end - begin) // f) * f
    if patch is not None:
        size = np.minimum(-(-np.asarray(patch) // f) * f, size)
    # tiles start on the pooling grid; the last one on each axis ends at or past the end
    starts = [sorted({*range(b, max(e - s, b) + 1, s), max(-(-(e - s) // k) * k, b)})
              for b, e, s, k in zip(begin, end, size, f, strict=True)]
    tiles = [np.array(t) for t in itertools.product(*starts)]
    in_begin, in_end = net.input_box(begin, np.max(tiles, axis=0) + size)
    pad = [(int(max(0, -b)), int(max(0, e - n))) for b, e, n in zip(in_begin, in_end, x.shape,
                                                                    strict=True)]
    if any(p != (0, 0) for p in pad):  # beyond the input: black, as in training
        x = np.pad(x, pad)
        shift = np.array([p[0] for p in pad])
        begin, end, in_begin = begin + shift, end + shift, in_begin + shift
        tiles = [t + shift for t in tiles]
    out = None
    lo = np.array(net.context[0])
    for i in range(0, len(tiles), batch_size):
        group = tiles[i:i + batch_size]
        boxes = [net.input_box(t, t + size) for t in group]
        tiles_in = [x[tuple(slice(int(a), int(b)) for a, b in zip(*box, strict=True))]
                    for box in boxes]
        # one tile (a task's whole box): no copy of it
        batch = torch.from_numpy(np.ascontiguousarray(tiles_in[0])[None, None]
                                 if len(group) == 1 else np.stack(tiles_in)[:, None])
        del tiles_in
        if device.startswith("cuda"):  # page-locked: the copy to the GPU runs at full speed
            batch = batch.pin_memory()
        with _NET_LOCK, torch.inference_mode():
            y = net.predict(batch.to(device, non_blocking=True),
                            torch.uint8 if dtype == np.uint8 else torch.float32).cpu().numpy()
        del batch
        for t, (ib, _), pred in zip(group, boxes, y, strict=True):
            keep = np.minimum(t + size, end) - t  # the tile, up to the box's end
            src = tuple(slice(int(a), int(a + k)) for a, k in zip(t - ib - lo, keep,
                                                                   strict=True))
            dst = tuple(slice(int(a), int(a + k)) for a, k in zip(t - begin, keep,
                                                                   strict=True))
            if out is None and len(tiles) == 1 and np.all(keep == end - begin):
                # the box in one tile: a view of the net's fresh output, no second copy
                return pred[(slice(None), *src)]
            if out is None:
                out = np.zeros((net.config.n_predicted, *(end - begin)), y.dtype)
            out[(slice(None), *dst)] = pred[(slice(None), *src)]
    return out


def symmetries(n: int) -> list[tuple[tuple[int, ...], bool]]:
    """The first ``n`` (1, 2, 4, 8 or 16) of the 16 symmetries of an EM volume that
    training augments with (:func:`emdask.augment.flip_transpose`), as (axes flipped,
    x-y transposed): identity, transpose, then flips of y, x and z, so that 2 adds the
    transpose, 8 all in-plane symmetries and 16 the z flips too.  A symmetry maps a
    volume by transposing it first (if at all), then flipping those axes of the result;
    the inverse flips, then transposes."""
    n = operator.index(n)
    if n not in (1, 2, 4, 8, 16):
        raise ValueError(f"tta must be 1, 2, 4, 8 or 16 symmetries, got {n!r}")
    return [(tuple(a for a, bit in zip((1, 2, 0), (2, 4, 8), strict=True) if i & bit),
             bool(i & 1)) for i in range(n)]


def _symmetric_pass(net: ValidUNet, x: np.ndarray, halo: np.ndarray, flips, transpose: bool,
                    device: str, patch, batch_size: int) -> np.ndarray:
    """The net's float32 output for the centre of ``x`` computed on ``x`` transposed (if
    ``transpose``) and flipped on ``flips``, mapped back."""
    xs = x.transpose(0, 2, 1) if transpose else x
    xs = np.flip(xs, flips) if flips else xs
    # _run_net's pooling grid starts at the input's origin, which on a flipped axis is the
    # block's far end.  Zeros in front of it, as many as the block lacks of a multiple of
    # the pooling factor, put the grid where the unflipped pass has it; the outputs in
    # front of the block are dropped.  No kept output reads the zeros: the halo covers
    # the net's context.
    extra = [-(n - 2 * h) % f if a in flips else 0
             for a, (n, h, f) in enumerate(zip(xs.shape, halo, net.factor, strict=True))]
    if any(extra):
        xs = np.pad(xs, [(e, 0) for e in extra])
    y = _run_net(net, xs, halo, np.array(xs.shape) - halo, device, patch, batch_size)
    y = y[(slice(None), *(slice(e, None) for e in extra))]
    y = np.flip(y, [a + 1 for a in flips]) if flips else y
    return y.transpose(0, 1, 3, 2) if transpose else y


def _edge_channels(offsets, flips, transpose: bool) -> list[tuple[int, int]]:
    """For each offset o_k: the channel c of a pass under the symmetry (``flips``,
    ``transpose``) whose output, mapped back, holds the edge (u, u + sign * o_k) at u, and
    that sign.  The pass's offset o_c is, in the original frame, o_c with the flipped axes
    negated, then y and x swapped."""
    back = [tuple(-d if a in flips else d for a, d in enumerate(o)) for o in offsets]
    back = [(d[0], d[2], d[1]) if transpose else d for d in back]
    pairs = []
    for o in map(tuple, offsets):
        for sign in (1, -1):
            hit = tuple(sign * d for d in o)
            if hit in back:
                pairs.append((back.index(hit), sign))
                break
        else:
            raise ValueError(f"test-time augmentation needs the net's offsets to be closed "
                             f"under its symmetries: offset {list(o)} has no counterpart "
                             f"under flips {flips}{' and the x-y transpose' if transpose else ''}")
    return pairs


def tta_margin(model: AffinityUNet, tta: int) -> np.ndarray:
    """Voxels beyond a block an affinity net predicts for ``tta``: along each axis, the
    longest offset some symmetric pass stores at its other end (a flipped pass holds the
    edge (v, v + o) at v + o), in whole pooling steps, so the pooling grid stays where it
    is.  Zero along axes no symmetry flips (z below 16), for one pass and for synapse
    nets."""
    if tta == 1 or model.config.target != "affinities":
        return np.zeros(3, int)
    offsets = np.asarray(model.config.offsets)
    longest = np.zeros(3, int)
    for flips, transpose in symmetries(tta):
        for k, (_, sign) in enumerate(_edge_channels(offsets, flips, transpose)):
            if sign < 0:
                longest = np.maximum(longest, np.abs(offsets[k]))
    factor = np.asarray(model.factor)
    return -(-longest // factor) * factor


def _unmap_affinities(y: np.ndarray, offsets, flips, transpose: bool,
                      margin: np.ndarray) -> np.ndarray:
    """A symmetric pass's affinities (mapped back, ``margin`` beyond the block) as the
    block's own channels: channel k at v is the edge (v, v + o_k), read at v or, where the
    pass holds it the other way round, at v + o_k."""
    core = np.array(y.shape[1:]) - 2 * margin
    out = np.empty((len(offsets), *core), y.dtype)
    for k, (c, sign) in enumerate(_edge_channels(offsets, flips, transpose)):
        at = margin + (np.asarray(offsets[k]) if sign < 0 else 0)
        out[k] = y[(c, *(slice(int(a), int(a + n)) for a, n in zip(at, core, strict=True)))]
    return out


def _predict_block(block: np.ndarray, model: AffinityUNet, device: str, patch,
                   batch_size: int, out_dtype, intensity: Sequence[float] | None = None,
                   inside: tuple[slice, ...] | None = None, precision: str = "auto",
                   tta: int = 1) -> np.ndarray:
    """The net's output for the centre of ``block`` (the block plus the net's halo), the
    mean over ``tta`` symmetries (an affinity net's block carries :func:`tta_margin` more
    context).  ``inside``: the part of the block inside the volume; the rest is made
    black after normalization (raw zeros need not be black once intensities are mapped)."""
    halo = np.array(model.halo)
    x = normalize_raw(block, intensity)
    if inside is not None:  # in place: the block is a task's largest input
        for axis, s in enumerate(inside):
            x[(slice(None),) * axis + (slice(None, s.start),)] = 0
            x[(slice(None),) * axis + (slice(s.stop, None),)] = 0
    net = inference_net(model, device, precision)
    if tta == 1:
        y = _run_net(net, x, halo, np.array(x.shape) - halo, device, patch, batch_size,
                     np.uint8 if out_dtype == np.uint8 else np.float32)
    else:
        y = None  # one accumulator, added to in place: memory for 2 outputs, not tta
        margin = tta_margin(model, tta)
        for flips, transpose in symmetries(tta):
            one = _symmetric_pass(net, x, halo, flips, transpose, device, patch, batch_size)
            if model.config.target == "affinities":
                one = _unmap_affinities(one, model.config.offsets, flips, transpose, margin)
            if y is None:
                y = np.array(one, np.float32)
            else:
                y += one
            del one
        y *= (255 if out_dtype == np.uint8 else 1) / tta
        if out_dtype == np.uint8:  # as the net's own uint8 output: round(255 p)
            np.rint(y, out=y)
    if model.config.planar:  # z offsets never trained: no link across sections
        y[[k for k, (dz, _, _) in enumerate(model.config.offsets) if dz != 0]] = 0
    return y if y.dtype == out_dtype else y.astype(out_dtype)


def _prediction_kernel(raw: np.ndarray, mask: np.ndarray | None = None, *, where, model,
                       device: str, patch, batch_size: int, dtype: str,
                       intensity: Sequence[float] | None, precision: str, tta: int = 1
                       ) -> np.ndarray:
    """A block's prediction from the block plus the net's halo of raw (and of the
    missing-data mask plus 1: edges touching it are cut)."""
    net = cached_model(model, device) if isinstance(model, str) else model
    out = _predict_block(raw, net, device, patch, batch_size, np.dtype(dtype), intensity,
                         where.inside[0], precision, tta)
    if mask is not None:  # in place: the output is a task's largest array
        out = cut_masked(out, mask)
    return out[0] if _single(net) else out


def _single(net: AffinityUNet) -> bool:
    """Whether a net's output is one (z, y, x) volume (synapse probabilities), not
    channels."""
    return net.config.target != "affinities" and net.config.n_predicted == 1


def prediction_step(model: AffinityUNet | str, device: str = "cpu", patch=None,
                    batch_size: int = 1, dtype: str = "float32",
                    intensity: Sequence[float] | None = None, precision: str = "auto",
                    masked: bool = False, tta: int | None = None) -> Step:
    """The blockwise step of :func:`predict_affinities` and :func:`predict_synapses` (and
    of the pipeline's predict and synapses stages): raw (and, if ``masked``, the
    missing-data mask) -> the net's output, (c, z, y, x) affinities or (z, y, x) synapse
    probabilities.  ``model`` is a model or, for tasks on a cluster, the name every
    worker loads once (:func:`emdask.models.cached_model`); ``intensity`` the data values
    taken for black and white (None: the dtype's range); ``tta`` the symmetries averaged
    (None: the model card's ``tta``, else 1)."""
    net = cached_model(model, device) if isinstance(model, str) else model
    tta = _tta(net, tta)
    halo = tuple(int(h) for h in np.add(net.halo, tta_margin(net, tta)))
    return Step(f"predict-{net.config.target}", _prediction_kernel, np.dtype(dtype),
                halo=(halo, (1, 1, 1)) if masked else halo,
                channels=None if _single(net) else net.config.n_predicted,
                params={"model": model, "device": device, "patch": patch,
                        "batch_size": int(batch_size), "dtype": str(np.dtype(dtype)),
                        "intensity": None if intensity is None else tuple(intensity),
                        "precision": precision, "tta": tta})


def _tta(net: AffinityUNet, tta: int | None) -> int:
    """The symmetries to average: ``tta``, or the model card's, checked against the net."""
    card = getattr(net, "card", None) or {}
    source = f"tta={tta}"
    if tta is None:
        tta, source = card.get("tta", 1), f"the model card's tta = {card.get('tta')!r}"
    try:
        tta = len(symmetries(tta))
    except (TypeError, ValueError):
        raise ValueError(f"{source}: tta must be 1, 2, 4, 8 or 16 symmetries") from None
    if tta > 1 and not _single(net) and net.config.target != "affinities":
        raise ValueError(f"{source}: test-time augmentation is for affinity and synapse "
                         f"nets, not {net.config.target!r} nets")
    if tta > 1 and net.config.target == "affinities":
        try:
            for flips, transpose in symmetries(tta):
                _edge_channels(net.config.offsets, flips, transpose)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    if tta > 1 and (net.factor[1] != net.factor[2] or net.halo[1] != net.halo[2]):
        raise ValueError(f"{source}: the x-y transpose needs a net with equal y and x "
                         f"pooling factors and halos, got {tuple(net.factor)} and "
                         f"{tuple(net.halo)}")
    return tta


def task_shape(model: AffinityUNet, shape: Sequence[int], unit: Sequence[int],
               budget: float | None = None, device: str = "cpu", precision: str = "auto",
               workers: int = 1, tta: int = 1) -> tuple[int, int, int]:
    """The block each prediction task computes: the multiple of ``unit`` (storage chunks,
    rounded up to the net's pooling factor) within ``budget`` bytes of memory (default: a
    quarter of this machine's memory) with which ``workers`` (processes predicting side
    by side, one net pass at a time each) finish soonest (:func:`_makespan`).  With
    ``tta`` passes a block also holds the float32 mean and one pass mapped back, over
    the block and its :func:`tta_margin`.

    Large blocks pay little for context: the net reads its field of view around every
    block, and that border is computed twice, once by each block beside it
    (:func:`halo_overhead`).  But a few large blocks of unequal size keep workers idle:
    the busiest worker's FLOPs, tasks dealt out largest first, are what is minimized.
    Every y-x size is tried, each with every number of blocks along z that fits (split
    evenly), and the volume's last, smaller blocks are counted."""
    net = inference_net(model, device, precision)
    factor = np.array(model.factor)
    unit = -(-np.asarray(unit, int) // factor) * factor
    limit = -(-np.asarray(shape[-3:], int) // unit)  # units: one block covers the volume
    if budget is None:
        import psutil

        budget = psutil.virtual_memory().total / 4

    margin = 2 * tta_margin(model, tta)
    per_voxel = 0 if tta == 1 else 8.0 * model.config.n_predicted

    def fits(t):  # the net's input box (the block and its context) in memory
        t = np.asarray(t) + margin
        return net.inference_bytes(_input_shape(net, t)) + per_voxel * np.prod(t) <= budget

    best = None
    for ky in range(1, limit[1] + 1):
        widest = 0
        for kx in range(1, limit[2] + 1):
            lo, hi = 0, int(limit[0])  # the deepest block that fits: binary search
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(unit * (mid, ky, kx)):
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0:  # wider blocks fit even less (memory is monotone)
                break
            widest = kx
            n = int(limit[0])
            for blocks in sorted({-(-n // k) for k in range(1, lo + 1)}):  # along z
                t = unit * (-(-n // blocks), ky, kx)  # the least depth giving that many
                key = (_makespan(net, shape, t, workers), _overhead(net, shape, t),
                       -float(np.prod(t)))
                if best is None or key < best[0]:
                    best = (key, t)
        if widest == 0:  # not even one unit wide fits: taller blocks fit no better
            break
    task = unit if best is None else best[1]
    return tuple(int(n) for n in np.minimum(task, limit * unit))


def _input_shape(net: ValidUNet, shape) -> np.ndarray:
    begin, end = net.input_box(0, shape)
    return end - begin


def halo_overhead(model: AffinityUNet, shape: Sequence[int], task: Sequence[int],
                  device: str = "cpu", precision: str = "auto") -> float:
    """FLOPs of predicting a ``shape`` volume in blocks of ``task`` over those of one pass
    over the whole volume (the context around each block is computed again by every
    block whose field of view it lies in); 1.0 for a volume in one block."""
    return _overhead(inference_net(model, device, precision), shape, task)


def _task_flops(net: ValidUNet, shape: Sequence[int], task: Sequence[int]
                ) -> list[tuple[float, int]]:
    """(FLOPs, how many) of the tasks of a ``shape`` volume in blocks of ``task``: blocks
    are full-size but for the last along each axis, so at most 8 distinct shapes."""

    def flops(box):
        return net.flops(_input_shape(net, box))

    sizes = [[(t, n // t)] + ([(n % t, 1)] if n % t else [])
             for n, t in zip(shape[-3:], task, strict=True)]
    return [(flops([s for s, _ in combo]), int(np.prod([c for _, c in combo])))
            for combo in itertools.product(*sizes)]


def _overhead(net: ValidUNet, shape: Sequence[int], task: Sequence[int]) -> float:
    total = sum(f * n for f, n in _task_flops(net, shape, task))
    return float(total / _task_flops(net, shape, shape[-3:])[0][0])


def _makespan(net: ValidUNet, shape: Sequence[int], task: Sequence[int], workers: int
              ) -> float:
    """The FLOPs of the busiest of ``workers`` when the tasks are dealt out largest first,
    times ``workers``, over those of one pass over the whole volume: the halo overhead
    when every worker is busy to the end, more where some wait.  A model of the run
    (Dask does not hand out tasks largest first); with over 64 tasks per worker the
    total is taken, the spread being even."""
    tasks = sorted(_task_flops(net, shape, task), reverse=True)
    whole = _task_flops(net, shape, shape[-3:])[0][0]
    if workers == 1 or sum(n for _, n in tasks) > 64 * workers:  # evenly spread
        return float(sum(f * n for f, n in tasks) / whole)
    loads = [0.0] * workers
    for f, n in tasks:
        for _ in range(n):
            heapq.heapreplace(loads, loads[0] + f)
    return float(max(loads) * workers / whole)


def check_size(shape: Sequence[int], model: AffinityUNet, where: str = "raw") -> None:
    """Refuse a volume the net cannot predict sensibly: an empty one, or one smaller than
    half the net's field-of-view radius on an axis (every prediction would then be made
    mostly from the zero padding beyond the volume)."""
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) == 0:
        raise ValueError(f"{where}: the volume is empty (shape {shape})")
    need = tuple(-(-int(r) // 2) for r in model.field_of_view)
    if any(n < m for n, m in zip(shape[-3:], need, strict=True)):
        raise ValueError(
            f"{where}: the volume (shape {shape}) is smaller than the net needs: at least "
            f"{need} voxels (z, y, x; half its field-of-view radius {model.field_of_view}), "
            "or its predictions come mostly from the padding beyond the volume")


def _check_voxel_size(voxel_size, model: AffinityUNet, where: str) -> None:
    """The input's voxel size must be within 25% of the model's, on every axis."""
    vs = np.array(voxel_size, float)
    expected = np.array(model.config.voxel_size, float)
    if np.any(np.abs(vs / expected - 1) > 0.25):
        raise ValueError(
            f"{where}: voxel size {tuple(vs.tolist())} nm does not match the model's "
            f"{tuple(expected.tolist())} nm; resample the volume, use a model trained for "
            "this resolution, or pass check_voxel_size=False ([predict] check_voxel_size = "
            "false in a run config)"
        )


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
    intensity: str | Sequence[float] = "auto",
    precision: str = "auto",
    tta: int | None = None,
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
        Blocks (z, y, x) each task predicts; rounded up to multiples of the model's
        downsampling factor.  Default: as large as a quarter of this machine's memory
        allows (:func:`task_shape`), so that little of the net's context is computed
        twice (:func:`halo_overhead`); the result is the same for any blocks.
    dtype
        ``"float32"`` (probabilities) or ``"uint8"`` (probabilities x 255).
    device
        ``"cpu"`` or ``"cuda"``; default CUDA when available (bf16 autocast there).
    patch, batch_size
        Cut each block into output tiles of this size (multiples of the factor) predicted
        in batches: for GPUs, whose memory limits the tile size.
    precision
        ``"float32"``, ``"bfloat16"`` or ``"auto"`` (default): bfloat16 (about twice as
        fast) where the model card found that it keeps the validation scores and the
        hardware computes it natively (CPUs with avx512_bf16 or AMX, recent GPUs), else
        float32.
    mask
        Optional (z, y, x) boolean volume of missing data (the mask of
        :func:`emdask.detect_defects`): nearest-neighbour affinities of edges that touch it
        are set to 0, so segmentation leaves it as background.
    intensity
        How intensities map to the net's input (:func:`intensity_range`): ``"auto"``
        (default) maps the volume's 1st-99th percentiles to those of the model's training
        data, so uint16 (12-bit or full), signed and float data work as their uint8
        equivalent; ``"dtype"``; or ``(black, white)`` data values.
    tta
        Test-time augmentation: the mean over the first 1, 2, 4, 8 or 16 symmetries of
        the volume (:func:`symmetries`: 8 is every in-plane flip and transpose), each
        pass's edges put back where the original stores them, at that many times the
        cost; default the model card's (else 1).  The card's threshold was chosen with its
        ``tta``.

    Returns
    -------
    xarray.DataArray
        Lazy affinities (c, z, y, x), one channel per model offset (the first 3 are the
        nearest neighbours), with the input's coordinates.  A model trained on 2-D labels
        only (``config.planar``) gives 0 for offsets across sections.  Attrs carry the
        ``intensity_range`` used and the model card's ``threshold`` (the default of
        :func:`emdask.segment`).
    """
    model = _as_model(model)
    if model.config.target != "affinities":
        raise ValueError(f"this model predicts {model.config.target}, not affinities; use "
                         f"predict_{model.config.target}")
    return _predict(raw, model, chunks, dtype, device, patch, batch_size, check_voxel_size,
                    intensity, precision, mask, tta)


def predict_synapses(raw: Any, model: AffinityUNet | None = None, tta: int | None = None,
                     **kwargs) -> xr.DataArray:
    """Synapse probabilities (z, y, x) for a (lazy) EM volume, chunk by chunk, with a net
    trained with ``target = "synapses"`` (other arguments as :func:`predict_affinities`).

    ``tta``: test-time augmentation, the mean over the first 1, 2, 4, 8 or 16 symmetries
    of the volume (:func:`symmetries`: 2 adds the x-y transpose), at that many times the
    cost; default the model card's.  The card's threshold and minimum size were chosen
    with its ``tta``: another may want another operating point.

    There is no default model: the shipped detector (ssTEM at 50 x 4.6 x 4.6 nm, trained
    on the larval VNC masks of Gerhard et al. 2013) carries their non-commercial licence,
    CC BY-NC-SA 3.0, so it is taken only on purpose:
    ``pretrained("synapses", accept_licence=True)``.  Or train your own with
    ``emdask train`` (``target = "synapses"``).  The result's attrs carry the model card's
    operating point (``threshold``, ``min_size``, ``radius``, ``max_extent``), the defaults of
    :func:`emdask.find_synapses` and :func:`emdask.assign_partners`."""
    if model is None:
        raise ValueError('give a synapse model: pretrained("synapses", accept_licence=True) '
                         "(CC BY-NC-SA 3.0, non-commercial use only) or one you trained")
    model = _as_model(model)
    if model.config.target != "synapses":
        raise ValueError("this model predicts affinities, not synapses; use "
                         "predict_affinities")
    return _predict(raw, model, tta=tta, **kwargs)[0].rename("synapses")


def _as_model(model: Any) -> AffinityUNet:
    """A model, or the name of a shipped one (:func:`emdask.models.pretrained`, licence
    checked), or the path of a ``.pt`` file."""
    if isinstance(model, AffinityUNet):
        return model
    if isinstance(model, str | os.PathLike):
        from emdask.models import load_model, pretrained

        return load_model(model) if str(model).endswith(".pt") else pretrained(str(model))
    raise TypeError(f"model must be an AffinityUNet, a shipped model's name or a .pt path, "
                    f"got {type(model).__name__}")


def _predict(raw, model, chunks=None, dtype="float32", device=None, patch=None,
             batch_size=1, check_voxel_size=True, intensity="auto", precision="auto",
             mask=None, tta=None) -> xr.DataArray:
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    if not isinstance(raw, xr.DataArray):
        raw = as_volume(raw, voxel_size=model.config.voxel_size, name="raw")
    if raw.ndim != 3:
        raise ValueError(f"raw must be 3-D (z, y, x), got dims {raw.dims}")
    if check_voxel_size:
        _check_voxel_size(raw.attrs["voxel_size"], model, raw.attrs.get("source", "raw"))
    check_size(raw.shape, model, raw.attrs.get("source", "raw"))
    black_white = intensity_range(raw, model, intensity)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model.training or next(model.parameters()).device != torch.device(device):
        model = copy.deepcopy(model).to(device).eval()  # the caller's model stays as it was
    _torch_dtype(precision, device)  # a wrong precision is named before any work
    data = raw.data if isinstance(raw.data, da.Array) else da.from_array(raw.data, chunks=-1)
    inputs = [data]
    if mask is not None:
        mask = mask.data if hasattr(mask, "dims") else mask
        if tuple(mask.shape) != tuple(data.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the raw "
                             f"volume's shape {tuple(data.shape)}")
        inputs.append(da.asarray(mask))
    if chunks is None:  # blocks as large as memory allows: little recomputed context
        chunks = task_shape(model, data.shape, np.minimum(data.chunksize, (64, 256, 256)),
                            device=device, precision=precision, tta=_tta(model, tta))
    # blocks start at multiples of the net's factor: the pooling grid is anchored as in a
    # whole-volume pass
    chunks = tuple(-(-int(c) // int(f)) * int(f) for c, f in zip(chunks, model.factor,
                                                                  strict=True))
    step = prediction_step(model, device, patch, batch_size, dtype, black_white, precision,
                           masked=mask is not None, tta=tta)
    out = apply(step, *inputs, chunks=chunks)
    attrs = {k: v for k, v in raw.attrs.items() if k != "source"}
    attrs["intensity_range"] = list(black_white)
    attrs.update(card_defaults(model))
    if step.params["tta"] > 1:
        attrs["tta"] = step.params["tta"]
    if model.config.target == "affinities":
        attrs["offsets"] = [list(o) for o in model.config.offsets]
    else:  # predict_synapses wants (1, z, y, x) to name it as affinities' first channel
        out = out[None]
    return xr.DataArray(out, dims=("c", "z", "y", "x"),
                        coords={d: raw.coords[d] for d in ("z", "y", "x")},
                        attrs=attrs, name="affinities")
