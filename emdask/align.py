"""Serial-section alignment: block matching, a regularized global solve, and rendering.

A section's deformation field ``u`` (pixels, components y and x) is kept at the nodes of a
regular grid (node ``(i, j)`` at pixel ``(i * spacing, j * spacing)``) and interpolated
bilinearly between them; the aligned section is ``aligned(p) = section(p + u(p))``.

The method is that of the corresponding-points aligners (AlignTK, TrakEM2, EM aligner),
coarse to fine over a few :class:`Level` s, after a rough translation of sections that lie
well beyond the first level's search (whole sections shrunk to about 256 pixels and
matched consecutively; offsets up to a quarter of a section), or just beyond it where the
first level cannot tie consecutive sections together (it then starts again from their
rough step, and keeps it if the stack holds together better):

1. Render every section with its current field, at the level's downsampling, in tiles of
   the node grid (at most 2048 pixels a side, with the margin that the tile's blocks and
   search windows need): a task reads and holds a window of a section, never a
   whole one, and the result does not depend on the tiling.
2. Block matching: at every node, the block of a section around the node is located in
   each of its ``neighbours`` previous sections by normalized cross-correlation (FFT-based,
   the blocks of a tile in batches, sub-pixel peak by a parabola).  Pixels without data
   (off the section, or in a defect) are left out of the correlation (masked NCC), so a
   block partly off the section or partly lost matches on the rest.  A match is rejected
   when its peak is low, at the edge of the search window, or when less than half the
   block has data on both sides.
3. A global solve, one sparse linear least-squares problem for all sections: the
   correction ``d`` of each node should satisfy every match,
   ``d[z] - d[z - k] = shift``, weighted by the match's correlation, while the second
   differences of ``d`` across the grid (which vanish for affine fields) are penalized with
   weight ``stiffness``, and every section's whole field is pulled weakly towards 0
   (weight ``prior``).  Matches left with a residual above ``max(max_residual, 4 MADs)``
   are dropped and the problem solved again.  Drift is bounded in two ways: each section
   is tied to several earlier ones inside one global solve, so a bad match is outvoted
   instead of being handed down the stack; and the pull towards 0 (sections are cut and
   warped independently, so no section should need a large field) removes the slow drift
   that chained matching accumulates where neurites run obliquely through the sections.
   A stack of more than ``window`` valid sections is solved in overlapping windows of that
   many, swept with a coarse step until they agree with the one-piece solve to 0.001 px
   (:func:`_windowed_solve`); matches are judged on the whole stack's solution.  The
   solve then holds one window's matches and vectors at a time; the whole stack's fields,
   corrections and current fields (48 bytes per node and section: 7.9 GB for 10,000
   sections of 128 x 128 nodes, 4096 pixels at spacing 32) and the matches of every pair
   (about 50 bytes per node and section) stay in memory throughout.
4. The correction is composed with the field.  The first level keeps only an affine field
   per section (rigid/affine first), the later ones the full regularized field.  A section,
   or a run of sections, that a level's matches do not tie to the rest of the stack (no
   pair with three accepted matches, the fewest that fix an affine; at a fine level,
   across a lost section) moves only with the stack as a whole: the prior alone would
   pull it back to 0 on its own.  So does a section that the level matches too little of
   (by the bar of ``unreliable`` below, among the level's coverages): a handful of
   matches, the likeliest to be noise, would otherwise decide its whole affine.

Defects: missing sections (:func:`emdask.detect_defects`) are never matched; they get the
field interpolated linearly in z from their valid neighbours.  So does a section flagged
``unreliable`` (in the table, with a warning): one whose coverage, the largest fraction of
accepted matches with any section it is matched with (its ``neighbours`` on either side) at
its best level, is below ``min_matches`` and below half the stack's median coverage; or one
that the first level, even from the rough steps, leaves apart from the largest part of the
stack (no pair ties it to that part by the same bar, a share of the pair's nodes): the
later levels search a few pixels only.  Pixels in the defect mask never count in a match,
and nodes whose data a defect has lost do not count in the coverage.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import xarray as xr
from scipy.sparse import csgraph

from emdask.blockwise import Step, apply
from emdask.defects import as_stack, detect_defects, missing_mask, missing_step
from emdask.geometry import Box

__all__ = ["Alignment", "Level", "align", "block_match", "displacement_error", "distort",
           "invert_fields", "render", "source_box", "warp_section"]


@dataclass(frozen=True)
class Level:
    """One level of the coarse-to-fine alignment.

    Attributes
    ----------
    factor
        Downsampling of the sections at this level.
    block
        Side of the matched blocks, in pixels of this level.
    search
        Largest shift searched, in pixels of this level.
    affine
        Keep only an affine field per section (the first, coarse level).
    """

    factor: int
    block: int
    search: int
    affine: bool = False


#: Default levels: affine at 1/4 resolution (shifts up to 32 pixels), then elastic at 1/2
#: and full resolution.
LEVELS = (Level(4, 32, 8, affine=True), Level(2, 32, 6), Level(1, 48, 4), Level(1, 48, 3))


class Alignment(NamedTuple):
    """What :func:`align` returns."""

    #: The aligned stack, lazy, with the input's coordinates.
    aligned: xr.DataArray
    #: Fields (z, 2, gy, gx) in pixels (y, x) at the grid nodes; ``attrs["spacing"]``.
    fields: xr.DataArray
    #: One row per section: z, missing, matches (nodes not lost to a defect, last level),
    #: accepted (used in the last level's solve: none where that level matched too little
    #: of the section or of its partner), residual (rms pixels of the accepted matches
    #: after the last solve),
    #: coverage (see ``min_matches``; unlike matches and accepted, which count a section's
    #: matches against earlier sections, it counts later ones too), unreliable, interpolated.
    table: pd.DataFrame


# ------------------------------------------------------------------------ fields, warping
def _grid_shape(shape: Sequence[int], spacing: int) -> tuple[int, int]:
    return tuple(int(np.ceil((n - 1) / spacing)) + 1 for n in shape)


def _dense(field: np.ndarray, spacing: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Field (2, gy, gx) interpolated at pixel coordinates ``ys``, ``xs`` (same shapes)."""
    coords = np.stack([ys / spacing, xs / spacing])
    return np.stack([ndi.map_coordinates(f, coords, order=1, mode="nearest") for f in field])


def _weights(positions: np.ndarray, spacing: float, n_nodes: int) -> np.ndarray:
    """Linear-interpolation matrix (len(positions), n_nodes) from grid nodes to positions
    (clamped at the ends, like ``mode="nearest"``)."""
    g = np.clip(positions / spacing, 0, n_nodes - 1)
    i0 = np.minimum(np.floor(g).astype(int), max(n_nodes - 2, 0))
    frac = g - i0
    w = np.zeros((len(positions), n_nodes))
    rows = np.arange(len(positions))
    w[rows, i0] = 1 - frac
    if n_nodes > 1:
        w[rows, i0 + 1] += frac
    return w


def _dense_grid(field: np.ndarray, spacing: float, ys: np.ndarray, xs: np.ndarray
                ) -> np.ndarray:
    """Field (2, gy, gx) at the pixels of the regular grid ``ys`` x ``xs`` (1-D): bilinear
    interpolation is separable, so two small matrix products do it."""
    wy = _weights(ys, spacing, field.shape[1])
    wx = _weights(xs, spacing, field.shape[2])
    return np.stack([wy @ f @ wx.T for f in field])


def warp_section(section: np.ndarray, field: np.ndarray, spacing: int,
                 origin: Sequence[int] = (0, 0), shape: Sequence[int] | None = None,
                 factor: int = 1, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Render ``section(p + u(p))`` for the output pixels ``p = origin + factor * q``.

    Parameters
    ----------
    section
        (y, x) image.
    field
        (2, gy, gx) displacement in pixels at the grid nodes.
    spacing
        Grid spacing in pixels.
    origin, shape, factor
        The output grid (default: the whole section at full resolution).
    order
        Interpolation order (1: bilinear; 0: nearest, for masks and labels).  The result
        has the section's dtype.
    cval
        Value outside the section.
    """
    shape = tuple(section.shape) if shape is None else tuple(shape)
    y = origin[0] + factor * np.arange(shape[0], dtype=np.float64)
    x = origin[1] + factor * np.arange(shape[1], dtype=np.float64)
    field = np.asarray(field, np.float64)
    out = np.empty(shape, section.dtype)
    # In strips of rows: the dense field and coordinates (32 bytes a pixel) of a whole
    # large section would take GBs.  Exact: pixels are interpolated independently (no
    # spline prefilter at orders 0 and 1).
    step = max(1, 2 ** 20 // max(shape[1], 1))
    for r in range(0, shape[0], step):
        u = _dense_grid(field, spacing, y[r:r + step], x)
        coords = [y[r:r + step, None] + u[0], x[None, :] + u[1]]
        if order == 0:  # gathered, not through scipy's float64: uint64 ids above 2^53 survive
            out[r:r + step] = _nearest(section, coords, cval)
        else:
            ndi.map_coordinates(section, coords, order=order, mode="constant", cval=cval,
                                output=out[r:r + step])
    return out


def _nearest(section: np.ndarray, coords: list, cval: float) -> np.ndarray:
    """``map_coordinates(order=0, mode="constant")`` by integer gathering: the nearest
    pixel (halves round up), ``cval`` where a coordinate lies outside [0, n - 1]."""
    inside = np.ones(coords[0].shape, bool)
    index = []
    for c, n in zip(coords, section.shape, strict=True):
        inside &= (c >= 0) & (c <= n - 1)
        index.append(np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp))
    return np.where(inside, section[tuple(index)], np.asarray(cval).astype(section.dtype))


def _compose(field: np.ndarray, delta: np.ndarray, spacing: int) -> np.ndarray:
    """Field of ``p -> p + d(p) + u(p + d(p))``: first the correction, then the old field."""
    gy, gx = field.shape[1:]
    ys, xs = np.meshgrid(np.arange(gy) * spacing, np.arange(gx) * spacing, indexing="ij")
    return delta + _dense(field, spacing, ys + delta[0], xs + delta[1])


def invert_fields(fields: Any, iterations: int = 20) -> Any:
    """Fields of the inverse mappings: ``v(q) = -u(q + v(q))``, by fixed-point iteration.

    Rendering an aligned stack with the inverse fields gives back the original sections
    (up to interpolation), and maps annotations made on aligned data back to the raw data.
    """
    arr = np.asarray(fields.values if isinstance(fields, xr.DataArray) else fields, np.float64)
    spacing = fields.attrs["spacing"] if isinstance(fields, xr.DataArray) else None
    if spacing is None:
        raise ValueError("invert_fields needs the fields DataArray of align (its spacing)")
    gy, gx = arr.shape[2:]
    ys, xs = np.meshgrid(np.arange(gy) * spacing, np.arange(gx) * spacing, indexing="ij")
    inv = -arr
    for z in range(arr.shape[0]):
        for _ in range(iterations):
            inv[z] = -_dense(arr[z], spacing, ys + inv[z][0], xs + inv[z][1])
    return fields.copy(data=inv)


# ------------------------------------------------------------------------ block matching
def _box_sums(images: np.ndarray, size: int) -> np.ndarray:
    """Sums over every ``size`` x ``size`` box of each image (integral images)."""
    c = np.pad(images, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    return c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]


def block_match(templates: np.ndarray, windows: np.ndarray, invalid: np.ndarray | None = None,
                template_invalid: np.ndarray | None = None, min_overlap: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """Locate each template in its search window by normalized cross-correlation.

    Where a template or its window has pixels without data (off the section, or lost in a
    defect), the correlation at each shift is taken over the pixels with data on both
    sides only (masked NCC, Padfield 2012), so a block that is partly off the section or
    partly missing still matches on the rest, and the filled-in pixels add no false
    edges.  Templates and windows with data everywhere take the plain, faster path.

    Parameters
    ----------
    templates
        (n, b, b) blocks.
    windows
        (n, b + 2s, b + 2s) search windows centred on the templates' positions.
    invalid, template_invalid
        Optional boolean masks of the window and template pixels without data (shapes as
        ``windows`` and ``templates``).
    min_overlap
        A shift counts only where at least this fraction of the block has data in both
        the template and the window.

    Returns
    -------
    offsets : (n, 2) float
        Sub-pixel position of each template in its window, relative to the centre: the
        template's content lies at ``offset`` from where it was cut.  NaN when the peak is
        on the edge of the window.
    scores : (n,) float
        The correlation at the peak (-1..1; 0 for a flat template, -1 where no shift has
        enough data).
    """
    n, b = templates.shape[0], templates.shape[1]
    w = windows.shape[1]
    s = (w - b) // 2
    masks = [np.zeros(x.shape, bool) if m is None else np.asarray(m, bool)
             for x, m in ((windows, invalid), (templates, template_invalid))]
    partial = masks[0].any(axis=(1, 2)) | masks[1].any(axis=(1, 2))
    ncc = np.empty((n, 2 * s + 1, 2 * s + 1))
    t, win = templates.astype(np.float64), windows.astype(np.float64)
    if (~partial).any():
        ncc[~partial] = _ncc(t[~partial], win[~partial])
    if partial.any():
        ncc[partial] = _masked_ncc(t[partial], win[partial], ~masks[1][partial],
                                   ~masks[0][partial], min_overlap)
    # A template that is constant where it has data matches nothing (score 0).
    tvalid = ~masks[1]
    flat = (np.where(tvalid, templates, -np.inf).max(axis=(1, 2))
            == np.where(tvalid, templates, np.inf).min(axis=(1, 2)))
    ncc[flat] = np.nan
    counted = np.isfinite(ncc)  # shifts with enough data on both sides, and variance
    ncc[~counted] = -1
    peak = ncc.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(peak, ncc.shape[1:])
    scores = ncc[np.arange(n), iy, ix]
    scores[flat] = 0
    offsets = np.stack([_subpixel(ncc, counted, iy, ix, axis) for axis in (0, 1)], axis=1) - s
    return offsets, scores


def _correlate(f: np.ndarray, g: np.ndarray, shape: tuple[int, int], s: int) -> np.ndarray:
    """Sums of template x window at every shift 0..2s, from the spectra ``f`` of the
    windows and ``g`` of the templates (no wrap-around: every shifted template lies inside
    its window)."""
    return np.fft.irfft2(f * np.conj(g), s=shape)[:, : 2 * s + 1, : 2 * s + 1]


def _ncc(t, win):
    """NCC at every shift of templates and windows with data everywhere (NaN where the
    window is flat)."""
    b, s, shape = t.shape[1], (win.shape[1] - t.shape[1]) // 2, win.shape[1:]
    t = t - t.mean(axis=(1, 2), keepdims=True)
    tnorm = np.sqrt((t ** 2).sum(axis=(1, 2)))
    s1, s2 = _box_sums(win, b), _box_sums(win ** 2, b)
    var = np.maximum(s2 - s1 ** 2 / (b * b), 0)
    cross = _correlate(np.fft.rfft2(win, s=shape), np.fft.rfft2(t, s=shape), shape, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / (tnorm[:, None, None] * np.sqrt(var))


def _masked_ncc(t, win, tvalid, wvalid, min_overlap):
    """NCC at every shift over the pixels with data in both template and window; NaN where
    they overlap in less than ``min_overlap`` of the block.  Every sum over the overlap is
    a correlation of the masked images, so six FFT correlations give them all."""
    b, s, shape = t.shape[1], (win.shape[1] - t.shape[1]) // 2, win.shape[1:]
    # centred on the means of their data, against cancellation in the sums of squares
    t = np.where(tvalid, t - _mean(t, tvalid), 0)
    win = np.where(wvalid, win - _mean(win, wvalid), 0)
    fwm, ftm, fw, ft, fww, ftt = (np.fft.rfft2(x, s=shape) for x in (
        wvalid.astype(np.float64), tvalid.astype(np.float64), win, t, win * win, t * t))

    def corr(f: np.ndarray, g: np.ndarray) -> np.ndarray:
        return _correlate(f, g, shape, s)

    count = np.rint(corr(fwm, ftm))
    sum_t, sum_tt, sum_w, sum_ww = corr(fwm, ft), corr(fwm, ftt), corr(fw, ftm), corr(fww, ftm)
    cross = corr(fw, ft)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_t = sum_tt - sum_t ** 2 / count
        var_w = sum_ww - sum_w ** 2 / count
        ncc = (cross - sum_t * sum_w / count) / np.sqrt(np.maximum(var_t * var_w, 0))
    # FFT round-off leaves a flat overlap a tiny variance, not 0: such shifts do not count
    ncc[(count < min_overlap * b * b) | (var_t <= 1e-9 * count * _mean(t * t, tvalid))
        | (var_w <= 1e-9 * count * _mean(win * win, wvalid))] = np.nan
    return ncc


def _mean(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return ((x * valid).sum(axis=(1, 2)) / np.maximum(valid.sum(axis=(1, 2)), 1))[:, None, None]


def _subpixel(ncc: np.ndarray, counted: np.ndarray, iy: np.ndarray, ix: np.ndarray,
              axis: int) -> np.ndarray:
    """Peak position along one axis, refined by a parabola through the peak and its two
    neighbours; NaN on the edge of the window or next to a shift that does not count (the
    true peak may lie beyond it, and the parabola would be pulled off)."""
    i = (iy, ix)[axis]
    m = ncc.shape[1 + axis] - 1
    rows = np.arange(len(i))
    at = (lambda a, k: a[rows, k, ix]) if axis == 0 else (lambda a, k: a[rows, iy, k])
    inside = (i > 0) & (i < m)
    lo = np.where(inside, i - 1, i)
    hi = np.where(inside, i + 1, i)
    inside &= at(counted, lo) & at(counted, hi)
    c0, c1, c2 = at(ncc, lo), at(ncc, i), at(ncc, hi)
    denom = c0 - 2 * c1 + c2
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(denom < 0, 0.5 * (c0 - c2) / denom, 0.0)
    return np.where(inside, i + np.clip(frac, -0.5, 0.5), np.nan)


def _pad(level: Level) -> int:
    """Level pixels around a tile's nodes, so every node's search window fits."""
    return level.block // 2 + level.search + 1


#: Largest side of a matching tile, in full-resolution pixels (what a task reads of a
#: section is this plus the margin its blocks and search windows need).
_TILE = 2048


class _Tile(NamedTuple):
    """A rectangle of grid nodes matched in one task, and the window of level pixels its
    blocks and search windows need (``origin`` in full-resolution pixels)."""

    nodes: tuple[slice, slice]
    origin: tuple[int, int]
    shape: tuple[int, int]
    centres: tuple[np.ndarray, np.ndarray]  # node positions in the window, level pixels


def _tiles(grid: tuple[int, int], spacing: int, level: Level) -> list[_Tile]:
    """The node grid cut into tiles of at most about ``_TILE`` pixels a side."""
    f, pad = level.factor, _pad(level)
    per = max(1, _TILE // spacing)  # nodes per tile side
    out = []
    for y0 in range(0, grid[0], per):
        for x0 in range(0, grid[1], per):
            idx = (np.arange(y0, min(y0 + per, grid[0])), np.arange(x0, min(x0 + per, grid[1])))
            pos = [np.rint(i * spacing / f).astype(int) for i in idx]
            lo = [int(q[0]) - pad for q in pos]
            shape = tuple(int(q[-1]) + pad + 1 - a for q, a in zip(pos, lo, strict=True))
            out.append(_Tile((slice(y0, y0 + len(idx[0])), slice(x0, x0 + len(idx[1]))),
                             (lo[0] * f, lo[1] * f), shape,
                             tuple(q - a for q, a in zip(pos, lo, strict=True))))
    return out


def _source(field: np.ndarray, spacing: int, tile: _Tile, level: Level,
            shape: Sequence[int]) -> tuple[tuple[slice, slice], tuple[int, int]]:
    """The part of a section that rendering ``tile`` reads: the window grown by the
    field's largest displacement around it and by the smoothing's reach, within the
    section (a single pixel if the window maps entirely outside it)."""
    (oy, ox), (h, w), f = tile.origin, tile.shape, level.factor
    box = source_box(field[None], spacing, (0, oy, ox), (1, oy + h * f, ox + w * f),
                     (1, *shape))
    if box is None:
        return (slice(0, 1), slice(0, 1)), (0, 0)
    reach = int(2 * f + 1) if f > 1 else 0  # gaussian_filter's radius at sigma f / 2
    lo = [max(0, v - reach) for v in box[0][1:]]
    hi = [min(n, v + reach) for v, n in zip(box[1][1:], shape, strict=True)]
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1])), (lo[0], lo[1])


def _level_image(piece: np.ndarray, mask: np.ndarray, field: np.ndarray, spacing: int,
                 factor: int, tile: _Tile, start: tuple[int, int], fill: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tile's window of a section rendered at a level (smoothed against aliasing) from
    the ``piece`` of the section (and of its defect ``mask``) that starts at pixel
    ``start``; with the mask of pixels without data (outside the section, or missing)
    and that of the missing ones only.  Pixels without data get the value ``fill`` (the
    section's mean): flat, so they add no false edges, and the same in every tile, so the
    matches do not depend on the tiling."""
    # pixels without data take the fill before smoothing, so that they do not bleed into
    # their neighbours (NaN would spread)
    img = np.where(mask, np.float32(fill), piece).astype(np.float32)
    if factor > 1:
        img = ndi.gaussian_filter(img, 0.5 * factor)
    field = field - np.asarray(start, np.float64)[:, None, None]  # in the piece's pixels
    out = warp_section(img, field, spacing, tile.origin, tile.shape, factor, cval=np.nan)
    bad = ~np.isfinite(out)
    lost = warp_section(mask.astype(np.uint8), field, spacing, tile.origin, tile.shape,
                        factor, order=0, cval=0).astype(bool)
    bad |= lost
    out[bad] = fill
    return out, bad, lost


_NODES_PER_BATCH = 256
#: Fraction of a block that must have data in both sections for a match.
_MIN_OVERLAP = 0.5


def _match_pair(moving, fixed, tile: _Tile, level: Level):
    """Shifts (ty, tx, 2) in full-resolution pixels that bring the ``moving`` section onto
    the ``fixed`` one at every node of the tile, and their scores (NaN where a defect
    leaves nothing to match); both sections as rendered by :func:`_level_image`."""
    (a, bad_a, lost_a), (r, bad_r, lost_r) = moving, fixed
    f, b, s = level.factor, level.block, level.search
    cy, cx = np.meshgrid(*tile.centres, indexing="ij")
    ty, tx = cy.shape
    cy, cx = cy.ravel(), cx.ravel()
    h = b // 2
    offsets = np.empty((ty * tx, 2))
    scores = np.empty(ty * tx)
    # Nodes in batches: block matching takes about 130 kB per node (blocks of 48), so a
    # match task needs little beyond the two rendered windows.
    for nodes in np.array_split(np.arange(ty * tx), -(-ty * tx // _NODES_PER_BATCH)):
        iy = cy[nodes, None] + np.arange(-h, b - h)[None]
        ix = cx[nodes, None] + np.arange(-h, b - h)[None]
        wy = cy[nodes, None] + np.arange(-h - s, b - h + s)[None]
        wx = cx[nodes, None] + np.arange(-h - s, b - h + s)[None]
        block, window = (iy[:, :, None], ix[:, None, :]), (wy[:, :, None], wx[:, None, :])
        # Blocks partly off the section or partly lost match on the rest (masked NCC).
        offsets[nodes], scores[nodes] = block_match(a[block], r[window], bad_r[window],
                                                    bad_a[block], _MIN_OVERLAP)
        # Too much data lost in a defect, in the block or where it lies in the other
        # section: NaN, so that such nodes count neither as matches nor as failed ones
        # when a section's coverage is judged.  Nodes off the section still count as
        # failed, as for every section.
        lost = (lost_a[block] | lost_r[block]).mean(axis=(1, 2))
        scores[nodes[lost > 1 - _MIN_OVERLAP]] = np.nan
    # The moving block's content sits at +offset in the fixed section: moving(p) =
    # fixed(p + offset), so moving(p - offset) = fixed(p) and the correction is -offset.
    return (-f * offsets).reshape(ty, tx, 2), scores.reshape(ty, tx)


# ------------------------------------------------------------------------ rough offsets
#: Side, in pixels, to which whole sections are shrunk to find their rough offsets.
_ROUGH_SIDE = 256
#: Scale in z (sections) of the slow trend left out of the rough offsets' anchor.
_DRIFT_SECTIONS = 5.0


def _rough_steps(data: da.Array, valid: list[int], min_score: float) -> np.ndarray:
    """Translation (len(valid) - 1, 2), in full-resolution pixels, from each valid section
    to the next, found on whole sections shrunk to about ``_ROUGH_SIDE`` pixels a side:
    the middle half of one is located in the other (masked NCC), so offsets up to a
    quarter of the section are found, far beyond the first level's search.  0 where a
    pair does not match.  ``data``: the stack, NaN where it has no data."""
    ny, nx = data.shape[1:]
    f = max(1, -(-max(ny, nx) // _ROUGH_SIDE))
    with warnings.catch_warnings():  # blocks without data: NaN, as they should be
        warnings.simplefilter("ignore", RuntimeWarning)
        small = da.coarsen(np.nanmean, data[valid], {1: f, 2: f}, trim_excess=True).compute()
    h, w = small.shape[1:]
    side = min(h, w)
    b, s = side // 2, side // 4
    y0, x0 = (h - (b + 2 * s)) // 2, (w - (b + 2 * s)) // 2
    window = small[:, y0:y0 + b + 2 * s, x0:x0 + b + 2 * s]
    template = window[:, s:s + b, s:s + b]
    offsets, scores = block_match(np.nan_to_num(template[1:]), np.nan_to_num(window[:-1]),
                                  np.isnan(window[:-1]), np.isnan(template[1:]))
    return np.where(((scores >= min_score) & np.isfinite(offsets).all(axis=1))[:, None],
                    -f * offsets, 0.0)


def _rough_start(steps: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sections' translations (n, 2) chained from the ``used`` rough ``steps``, and
    the anchor of the prior: those translations less their slow trend in z (the drift
    along the chain, which the prior is there to remove)."""
    rough = np.concatenate([np.zeros((1, 2)), np.cumsum(steps * used[:, None], axis=0)])
    return rough, rough - ndi.gaussian_filter1d(rough, _DRIFT_SECTIONS, axis=0,
                                                mode="nearest")


# ------------------------------------------------------------------------ global solve
def _smoothness(gy: int, gx: int) -> sp.csr_matrix:
    """Second differences of a (gy, gx) grid (along y, along x, and mixed): zero exactly
    for affine fields, so only bending is penalized."""
    idx = np.arange(gy * gx).reshape(gy, gx)
    rows, cols, vals = [], [], []
    r = 0
    stencils = [((0, 0), (1, 0), (2, 0), (1, -2, 1)), ((0, 0), (0, 1), (0, 2), (1, -2, 1))]
    for offs in stencils:
        (a0, a1), (b0, b1), (c0, c1), w = offs
        ny, nx = gy - max(a0, b0, c0), gx - max(a1, b1, c1)
        if ny <= 0 or nx <= 0:
            continue
        for (dy, dx), wv in zip(((a0, a1), (b0, b1), (c0, c1)), w, strict=True):
            cols.append(idx[dy:dy + ny, dx:dx + nx].ravel())
            rows.append(r + np.arange(ny * nx))
            vals.append(np.full(ny * nx, float(wv)))
        r += ny * nx
    if gy > 1 and gx > 1:  # mixed: d(i+1,j+1) - d(i+1,j) - d(i,j+1) + d(i,j), weight 2
        n = (gy - 1) * (gx - 1)
        for (dy, dx), wv in (((1, 1), 1), ((1, 0), -1), ((0, 1), -1), ((0, 0), 1)):
            cols.append(idx[dy:dy + gy - 1, dx:dx + gx - 1].ravel())
            rows.append(r + np.arange(n))
            vals.append(np.full(n, np.sqrt(2) * wv))
        r += n
    if not rows:
        return sp.csr_matrix((0, gy * gx))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(r, gy * gx))


def _solve(pairs: list, shifts: list, weights: list, sections: list[int],
           current: np.ndarray, grid: tuple[int, int], stiffness: float, prior: float,
           held: dict[int, np.ndarray] | None = None, start: np.ndarray | None = None,
           mass: np.ndarray | None = None, reduction: float = 0.0) -> np.ndarray:
    """Corrections (len(sections), 2, gy, gx) from weighted pairwise node shifts, given
    the sections' ``current`` fields at the nodes (same shape).

    The normal equations are never formed: their product with a vector is the bending
    penalty (one sparse matrix of a single grid, shared by every section), the matches
    (each pair's weights, one value per node) and the prior, so the solve holds a few
    vectors of the size of ``sections`` besides their matches (a sparse matrix of the
    whole stack took about 20 non-zeros per unknown, several times that at its peak).

    ``held`` gives the corrections (2, gy, gx) of sections outside ``sections`` that some
    pairs name: those stay as they are (a window of the stack solved between its
    neighbours, :func:`_windowed_solve`).  ``start``: the conjugate gradients' first
    guess (default 0); they stop at the one-piece tolerance, or once they have cut the
    residual of ``start`` to ``reduction`` of itself.  ``mass``: how many sections each
    unknown stands for (sections that move together, in the coarse problem of
    :func:`_coarse_correction`), which scales its bending and prior terms (default 1).
    """
    nodes, ns = grid[0] * grid[1], len(sections)
    pos = {z: i for i, z in enumerate(sections)}
    held = {} if held is None else held
    mass = np.ones(ns) if mass is None else np.asarray(mass, np.float64)
    # incidence of the pairs: row p is +1 at its moving section and -1 at its fixed one
    # (among the unknowns only: a held section's correction goes into the pair's shift)
    entries = [(p, pos[z], v) for p, pair in enumerate(pairs)
               for z, v in zip(pair, (1.0, -1.0), strict=True) if z in pos]
    rows, cols, vals = zip(*entries, strict=True) if entries else ((), (), ())
    incidence = sp.csr_matrix((vals, (rows, cols)), shape=(len(pairs), ns))
    w = np.stack([x.ravel() for x in weights]) if pairs else np.zeros((0, nodes))
    smooth = _smoothness(*grid)
    bend = (stiffness * (smooth.T @ smooth)).tocsr()

    def normal(x: np.ndarray) -> np.ndarray:
        """The normal matrix times x, x of shape (ns, nodes)."""
        return (mass[:, None] * (bend @ x.T).T + incidence.T @ (w * (incidence @ x))
                + prior * mass[:, None] * x)

    # the prior pulls each section's whole field (current + correction) gently to 0
    rhs = [-prior * mass[:, None] * current[:, c].reshape(ns, nodes) for c in range(2)]
    for c in range(2 if pairs else 0):
        # d[zm] - d[zf] = shift, with a held d[zf] (or d[zm]) moved to the right-hand side
        target = np.stack([s.reshape(-1, 2)[:, c] for s in shifts])
        for p, (zm, zf) in enumerate(pairs):
            if zf in held:
                target[p] += held[zf][c].ravel()
            if zm in held:
                target[p] -= held[zm][c].ravel()
        rhs[c] += incidence.T @ (w * target)
    # Conjugate gradients, preconditioned by one factorization shared by every section: the
    # bending penalty of the grid plus the mean of what the matches and the prior add to
    # the diagonal.  A direct factorization of the whole stack fills in like a 3-D problem
    # (30 sections of 32 x 32 nodes: 46 M entries, 24 s), and one factor per section costs
    # memory in proportion to the stack (27 MB a section at 128 x 128 nodes); the shared
    # 2-D factor leaves out only the matches' coupling of sections and their variation
    # from node to node, mild next to the bending penalty: 60-100 iterations on the
    # benchmark stacks, growing slowly with the number of sections (the pull towards 0
    # bounds how far that coupling reaches in z).
    added = float((abs(incidence).T @ w).mean()) / mass.mean() + prior
    lu = spla.splu((bend + added * sp.identity(nodes)).tocsc(), permc_spec="MMD_AT_PLUS_A")
    shape = (ns * nodes, ns * nodes)
    a = spla.LinearOperator(shape, lambda v: normal(v.reshape(ns, nodes)).ravel())
    # one section at a time: SuperLU is slower on many right-hand sides at once
    m = spla.LinearOperator(shape, lambda v: np.concatenate(
        [lu.solve(part) / k for part, k in zip(v.reshape(ns, nodes), mass, strict=True)]))
    out = np.empty((ns, 2, nodes))
    for c in range(2):
        x0 = None if start is None else start[:, c].reshape(-1)
        atol = 0.0 if x0 is None else reduction * np.linalg.norm(rhs[c].ravel() - a @ x0)
        sol, info = spla.cg(a, rhs[c].ravel(), x0, rtol=1e-8, atol=atol, maxiter=2000, M=m)
        if info:
            warnings.warn(f"the alignment solve did not converge (scipy cg info {info}); "
                          "the fields may be off", RuntimeWarning, stacklevel=4)
        out[:, c] = sol.reshape(ns, nodes)
    return out.reshape(ns, 2, *grid)


#: The windowed solve (:func:`_windowed_solve`) stops when a cycle moves no node by more
#: than this (pixels), or after ``_CYCLES`` cycles.
_CYCLE_TOL = 1e-3
_CYCLES = 20
#: A window's conjugate gradients stop once they have cut its residual tenfold: it is
#: solved again in the next cycle, between neighbours that have moved meanwhile, so solving
#: it to the one-piece tolerance each time is wasted (250 sections in windows of 64: the
#: solve took 3.9 times the one-piece one's time that way, 1.5 times this way, with about
#: as many cycles and the same result to 2e-4 px).  Each such step still lowers the
#: objective (conjugate gradients do from any start), so the cycles still converge.
_REDUCTION = 0.1


def _windows(n: int, window: int, span: int) -> list[tuple[int, int]]:
    """Overlapping windows ``[a, a + window)`` of ``n > window`` sections, spread evenly:
    consecutive ones overlap by ``window // 4`` sections or more, and by at least ``span``
    (the farthest pair), so that every pair lies wholly inside one of them."""
    overlap = max(window // 4, span)
    k = -(-(n - overlap) // (window - overlap))
    return [(int(a), int(a) + window) for a in np.rint(np.linspace(0, n - window, k))]


def _coarse_correction(pairs: list, shifts: list, weights: list, current: np.ndarray,
                       grid: tuple[int, int], stiffness: float, prior: float, window: int,
                       delta: np.ndarray, mass: np.ndarray, bounds: np.ndarray) -> float:
    """Add to ``delta`` (in place) the correction common to the sections of each group
    (``delta[bounds[g]:bounds[g + 1]]``) that lowers the whole stack's objective most: the
    coarse step of :func:`_windowed_solve`.  ``pairs`` name positions (rows of ``delta``).
    Returns the largest change of a node.

    Exact (Galerkin): moving a group by ``c`` changes its sections' bending and prior terms
    as it would those of one section of their summed ``mass``, with their mean correction
    and mean ``current``; the pairs inside the group not at all; and a pair across groups
    as it would a pair of the groups, whose shift is the pair's less what ``delta`` gives
    it beyond the groups' means.  So the coarse problem is one of :func:`_solve`'s own, on
    the groups; longer than a window, it gets one cycle of :func:`_windowed_solve` (its
    own coarse step, and one sweep): every step of which lowers the objective, so an
    inexact coarse step still does, and the cycles around it still converge.
    """
    groups = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    parts = [slice(a, b) for a, b in pairwise(bounds)]
    total = np.array([mass[g].sum() for g in parts])

    def mean(x: np.ndarray) -> np.ndarray:  # group by group: no temporary of the stack
        return np.stack([np.tensordot(mass[g], x[g], 1) / t
                         for g, t in zip(parts, total, strict=True)])

    centre = mean(delta)
    across = [p for p, (zm, zf) in enumerate(pairs) if groups[zm] != groups[zf]]
    coarse_shifts = [shifts[p] - (delta[zm] - centre[groups[zm]]).transpose(1, 2, 0)
                     + (delta[zf] - centre[groups[zf]]).transpose(1, 2, 0)
                     for p, (zm, zf) in ((p, pairs[p]) for p in across)]
    moved = _windowed_solve(
        [(int(groups[pairs[p][0]]), int(groups[pairs[p][1]])) for p in across],
        coarse_shifts, [weights[p] for p in across], list(range(len(parts))), mean(current),
        grid, stiffness, prior, window, centre.copy(), total, cycles=1) - centre
    for g, d in zip(parts, moved, strict=True):
        delta[g] += d
    return float(np.abs(moved).max())


def _windowed_solve(pairs: list, shifts: list, weights: list, sections: list[int],
                    current: np.ndarray, grid: tuple[int, int], stiffness: float,
                    prior: float, window: int, start: np.ndarray | None = None,
                    mass: np.ndarray | None = None, cycles: int = _CYCLES) -> np.ndarray:
    """:func:`_solve` of the whole stack, holding at most ``window`` sections at a time.

    Up to ``window`` sections it is :func:`_solve` itself.  Beyond, it is a two-level
    Schwarz method.  Overlapping windows (:func:`_windows`) are solved in turn, each with
    the matches of its own sections only and with the sections just outside it that its
    pairs name held at their current corrections, in sweeps alternately up and down the
    stack; before each sweep, a coarse step (:func:`_coarse_correction`) moves groups of
    sections as long as the overlap as wholes.  Cycles go on until one moves no node by
    more than ``_CYCLE_TOL`` pixels.  Each step lowers the whole stack's objective (convex,
    quadratic) by moving some of its unknowns (a window's sections, or groups as wholes),
    so the cycles go to the one-piece solution.  The sweeps alone pass on a correction smooth in z slowly, the more so the
    shorter the window next to the reach of the pull towards 0 (about sqrt(match weight
    / prior) sections, 15-30 at the default prior): windows of 16 sections were still
    0.02-0.09 px off after 20 sweeps, and are within 0.001 px after 6-10 cycles with the
    coarse step.  (Groups as long as a window's stride left 0.45 of the error per cycle,
    these 0.3; groups whose corrections are interpolated linearly in z, 0.1, but their
    coarse problem is not one of :func:`_solve`.)  Independent windows blended across
    their overlaps would leave each window's frame to its own prior, at both ends.

    ``start``: corrections to start from, overwritten with the result (beyond one window;
    the one-piece solve starts from 0).  ``mass``: as in :func:`_solve`.  ``cycles``: at
    most this many (one for a coarse problem longer than a window).

    What a window boundary does to the prior and to :func:`_hold_parts`: nothing.  The
    prior is a term of each section on its own, the same in any window; and pairs across
    a boundary are kept, with the section outside held, so a window is tied to the rest of
    the stack as its sections are in the one-piece problem, and a boundary is no break in
    it.  The parts of the stack that no match ties together are found afterwards from the
    whole stack's pairs, on the whole stack's corrections, as before.  (Coarse groups end
    where the matches tie the stack least, so that a part's end is rarely inside one; where
    it is, the group moves two parts together in its step, the windows undo that, and the
    cycles still end where the one-piece solve does, only later.)

    Held for the whole stack all along: ``current`` and the corrections, (len(sections), 2,
    gy, gx) float64 each (with the fields of :func:`align`, 48 bytes per node and section:
    7.9 GB for 10,000 sections of 128 x 128 nodes), and the matches (given: 2 pairs of
    about 25 bytes a node each per section).  The conjugate gradients work on one window at
    a time, or on the coarse problem, of 4 groups per window's length of the stack (itself
    solved in windows when longer than a window: beyond window ** 2 / 4 sections).
    """
    ns = len(sections)
    if ns <= window:  # from 0 (not ``start``), as it always was: the same to the last bit
        return _solve(pairs, shifts, weights, sections, current, grid, stiffness, prior,
                      mass=mass)
    mass = np.ones(ns) if mass is None else mass
    pos = {z: i for i, z in enumerate(sections)}
    ends = np.array([(pos[zm], pos[zf]) for zm, zf in pairs], int).reshape(-1, 2)
    span = int(np.abs(ends[:, 0] - ends[:, 1]).max(initial=0))
    windows = _windows(ns, window, span)
    size = max(window // 4, span, 2)  # at least 2: the coarse problem must be shorter
    bounds = np.rint(np.linspace(0, ns, -(-ns // size) + 1)).astype(int)
    # Each boundary between groups moved to where the matches tie the stack least, within
    # half a group: a group across a lost section (no matches, or next to none) would tie
    # the stack's two sides together in the coarse step, which then cannot move one side
    # as a whole (the softest motion, that only the prior holds): 0.65 of the error left
    # per cycle with one such group, 0.3 without.
    tie = np.zeros(ns + 1)  # tie[i]: the weight of the matches across sections i - 1 | i
    for (m, f), w in zip(ends, weights, strict=True):
        tie[min(m, f) + 1:max(m, f) + 1] += w.sum()
    for j in range(1, len(bounds) - 1):
        lo = max(bounds[j] - size // 2, bounds[j - 1] + 1)
        hi = min(bounds[j] + size // 2, bounds[j + 1] - 1)
        bounds[j] = lo + int(np.argmin(tie[lo:hi + 1]))
    delta = np.zeros((ns, 2, *grid)) if start is None else start
    for cycle in range(cycles):
        change = _coarse_correction([tuple(e) for e in ends], shifts, weights, current, grid,
                                    stiffness, prior, window, delta, mass, bounds)
        for a, b in windows if cycle % 2 == 0 else windows[::-1]:
            inside = (ends >= a) & (ends < b)
            mine = np.flatnonzero(inside.any(axis=1))
            held = {sections[i]: delta[i] for i in np.unique(ends[mine][~inside[mine]])}
            new = _solve([pairs[p] for p in mine], [shifts[p] for p in mine],
                         [weights[p] for p in mine], sections[a:b], current[a:b], grid,
                         stiffness, prior, held, delta[a:b], mass[a:b], _REDUCTION)
            change = max(change, float(np.abs(new - delta[a:b]).max()))
            delta[a:b] = new
        if change < _CYCLE_TOL:
            break
    else:
        if cycles > 1:
            warnings.warn(f"the windowed alignment solve did not converge in {cycles} "
                          f"cycles (last change {change:.2g} px); the fields may be off",
                          RuntimeWarning, stacklevel=4)
    return delta


#: Accepted matches that tie a pair's sections together in :func:`_hold_parts` (three
#: nodes fix an affine).
_MIN_TIE = 3


def _parts(pairs: list, weights: list, valid: list[int], least: np.ndarray | None = None
           ) -> np.ndarray:
    """Label (len(valid),) of the part of each valid section: pairs with at least
    ``least`` accepted matches (``weights`` > 0; one value per pair, by default
    ``_MIN_TIE``, as fewer do not fix even an affine between the two) join their sections
    into parts."""
    pos = {z: i for i, z in enumerate(valid)}
    least = np.full(len(pairs), _MIN_TIE) if least is None else least
    edges = np.array([(pos[zm], pos[zf]) for (zm, zf), w, n in zip(
        pairs, weights, least, strict=True) if (w > 0).sum() >= n], int).reshape(-1, 2)
    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                          shape=(len(valid), len(valid)))
    return csgraph.connected_components(graph, directed=False)[1]


def _strong_parts(pairs: list, weights: list, matchable: list, valid: list[int],
                  weak: np.ndarray, min_matches: float) -> np.ndarray:
    """Parts of the stack (:func:`_parts`) by a stricter tie, to tell sections that lie
    beyond the first level's search from the stray matches that tie them: a pair ties if
    it accepts at least the share of its nodes (not counting those a defect lost) below
    which a section is weak (:func:`_weak`: ``min_matches``, or half the typical share of
    consecutive pairs).  A pair with a ``weak`` section (indexed by z), or with too few
    nodes to tell, ties: it says nothing of where the sections lie."""
    pos = {z: i for i, z in enumerate(valid)}
    nodes = np.array([m.sum() for m in matchable], float)
    share = np.array([(w > 0).sum() for w in weights]) / np.maximum(nodes, 1)
    judged = np.array([not (weak[zm] or weak[zf]) for zm, zf in pairs])
    chain = judged & np.array([pos[zm] - pos[zf] == 1 for zm, zf in pairs])
    typical = float(np.median(share[chain])) if chain.any() else 0.0
    least = min(min_matches, 0.5 * typical) * nodes
    return _parts(pairs, weights, valid, np.where(judged & (least >= 1), least, 0))


def _hold_parts(delta: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``delta`` with what no match decides taken from the whole stack.

    Sections fall into parts (:func:`_parts`, ``part`` labels them).  Inside a part
    they fix the sections' corrections relative to each other, but not the correction
    common to all of the part's sections (node by node): matches see only differences.
    Where the matches tie the whole stack together, the prior decides that common
    correction, as it should; but a part that no match ties to the rest (a section whose
    matches all failed, or the sections on one side of a lost section at a fine level,
    which matches next to nothing across the gap) the prior would pull back to 0 on its own,
    against the rest of the stack (on the medulla cut into 40 nm sections, the two halves
    of the stack came apart by 16 px at a lost section).  Every part's common correction
    is therefore replaced by that of the whole stack.
    """
    if part.max(initial=0) == 0:
        return delta
    common = delta.mean(axis=0)
    out = delta.copy()
    for p in np.unique(part):
        out[part == p] += common - delta[part == p].mean(axis=0)
    return out


def _affine(delta: np.ndarray, spacing: int) -> np.ndarray:
    """The affine field closest (least squares over the nodes) to each section's field."""
    gy, gx = delta.shape[2:]
    ys, xs = np.meshgrid(np.arange(gy) * spacing, np.arange(gx) * spacing, indexing="ij")
    design = np.stack([np.ones(gy * gx), ys.ravel(), xs.ravel()], axis=1)
    out = np.empty_like(delta)
    for z in range(delta.shape[0]):
        coef, *_ = np.linalg.lstsq(design, delta[z].reshape(2, -1).T, rcond=None)
        out[z] = (design @ coef).T.reshape(2, gy, gx)
    return out


def _detrend(fields: np.ndarray) -> np.ndarray:
    """Fields minus, at every node, their least-squares line in z (the stack's mean
    position and linear shear)."""
    if len(fields) < 2:
        return fields
    z = np.arange(len(fields)) - (len(fields) - 1) / 2
    design = np.stack([np.ones(len(fields)), z], axis=1)
    coef, *_ = np.linalg.lstsq(design, fields.reshape(len(fields), -1), rcond=None)
    return fields - (design @ coef).reshape(fields.shape)


def _interpolate_z(fields: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Fields of the sections that are not ``good``, linear in z between good ones."""
    zs = np.flatnonzero(good)
    out = fields.copy()
    for z in np.flatnonzero(~good):
        below, above = zs[zs < z], zs[zs > z]
        if len(below) and len(above):
            t = (z - below[-1]) / (above[0] - below[-1])
            out[z] = (1 - t) * fields[below[-1]] + t * fields[above[0]]
        else:
            out[z] = fields[below[-1] if len(below) else above[0]]
    return out


# ------------------------------------------------------------------------ public API
def align(
    stack: Any,
    *,
    spacing: int = 32,
    levels: Sequence[Level] = LEVELS,
    neighbours: int = 2,
    stiffness: float = 50.0,
    min_score: float = 0.2,
    max_residual: float = 3.0,
    min_matches: float = 0.25,
    prior: float = 0.01,
    defects: Any = None,
    window: int = 256,
) -> Alignment:
    """Align a stack of serial sections.

    Parameters
    ----------
    stack
        (z, y, x) intensities: a DataArray or a Dask/numpy array.  Each match task reads
        the window of a section that one tile of the grid needs (about 2048 x 2048 pixels
        at full resolution), so any chunking works.
    spacing
        Grid spacing of the deformation fields, in pixels.
    levels
        The coarse-to-fine schedule (:class:`Level`).
    neighbours
        Each section is matched against this many previous valid sections.
    stiffness
        Weight of the smoothness (bending) penalty relative to a match of score 1.
    min_score
        Matches with a lower correlation peak are rejected.
    max_residual
        Matches whose residual after the solve exceeds this (full-resolution pixels at full
        resolution; times the downsampling at coarser levels) or 4 median absolute
        deviations, whichever is larger, are dropped and the solve redone.
    min_matches
        A section whose coverage (the largest fraction of its nodes matched with any
        section it is matched with, on either side, at its best level, not counting nodes
        whose data a defect has lost, so a partly missing section is judged by the rest) is
        below this and below half the stack's median coverage is flagged ``unreliable``
        and gets the interpolated field of its neighbours instead of being warped by its
        own matches (as does a run of sections that the first level leaves apart from the
        rest by this bar: see the module's docstring).  The second
        bar is for stacks whose sections all match poorly (small 40-50 nm sections accept
        about a third even where intact): an intact section among them is not an outlier.
    prior
        Weight (relative to a match of score 1) pulling every section's field towards 0
        (towards its rough offset, less the offsets' slow trend, where sections lie far
        apart: see the module's docstring).
        Block matching cannot tell misalignment from neurites that run obliquely through
        many sections (medulla columns do): each section follows such anatomy a little,
        and along a chain of sections the errors add up into a drift.  Sections are cut
        and distorted independently, so the field of every section should be small; this
        weak pull leaves the section-to-section differences to the matches and removes
        the slow drift that the matches cannot see.
    defects
        The :class:`~emdask.defects.Defects` of the stack (computed if not given).
    window
        The global solve holds at most this many valid sections at a time.  Up to this
        many, one solve of the whole stack; a longer stack is solved in overlapping windows
        of this many sections (overlap a quarter), in sweeps with a coarse step, until a
        sweep moves no node by more than 0.001 px: the one-piece solution to about that
        (a match judged by the residuals may still tip the other way, and change its
        neighbourhood's field at the later levels by a tenth of a pixel).  The solve's
        working set grows with the window (about 200 bytes per node and section); it takes
        longer (250 sections in windows of 64: 1.5 times the one-piece solve's time; 64 in
        windows of 16: 2.9 times); the fields, the corrections and the matches are still
        held for the whole stack (see the module's docstring).  At least
        ``2 * neighbours``.

    Returns
    -------
    Alignment
        The lazy aligned stack, the fields and the per-section table.
    """
    vol = as_stack(stack)
    if vol.ndim != 3:
        raise ValueError(f"a stack of sections must be 3-D (z, y, x), got shape {vol.shape}")
    if spacing < 4:
        raise ValueError(f"spacing must be at least 4 pixels, got {spacing}")
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or (
            window < 2 * neighbours):
        raise ValueError(f"window must be a whole number of sections, at least 2 * neighbours "
                         f"= {2 * neighbours} (consecutive windows overlap by every pair of "
                         f"a section), got {window!r}")
    if not 0 < min_score <= 1:
        raise ValueError(f"min_score must be in (0, 1] (a match's weight is its score), "
                         f"got {min_score}")
    nz, ny, nx = vol.shape
    if not levels:
        raise ValueError("levels must hold at least one Level (the first finds the sections' "
                         "affine fields)")
    for lv in levels:
        if lv.block > min(ny, nx) // lv.factor:
            raise ValueError(f"{lv}: the block exceeds the section "
                             f"({ny} x {nx} pixels at 1/{lv.factor})")
    defects = detect_defects(vol) if defects is None else defects
    missing = defects.table["missing"].to_numpy(bool)
    valid = [int(z) for z in np.flatnonzero(~missing)]
    if not valid:
        raise ValueError("every section of the stack is missing (black or constant)")
    if prior <= 0:
        raise ValueError(f"prior must be positive (it fixes the stack's frame), got {prior}")
    grid = _grid_shape((ny, nx), spacing)
    fields = np.zeros((nz, 2, *grid))
    # Pairs: each valid section with its `neighbours` previous valid ones.
    pairs = [(z, valid[i - k]) for i, z in enumerate(valid)
             for k in range(1, neighbours + 1) if i - k >= 0]
    # The mask is computed from the raw once (it costs more than reading the raw) and kept
    # in (cluster) memory, 1 byte per voxel, for the levels.
    mask = defects.mask.data.persist()
    # lazy, and cast block by block: a stack given as one numpy array is a single chunk,
    # and casting it whole would hold a float copy of the stack (10 MB a section at
    # 2048 x 1280 pixels)
    nodata = da.where(mask, np.nan, vol.data.rechunk(mask.chunks).astype(np.float32))
    if "mean" in defects.table:
        fill = defects.table["mean"].to_numpy(np.float64)
    else:  # a table from elsewhere: the mean of each section's data, from the raw
        with warnings.catch_warnings():  # a missing section's mean is NaN: fine
            warnings.simplefilter("ignore", RuntimeWarning)
            fill = da.nanmean(nodata, axis=(1, 2)).compute().astype(np.float64)
    # Rough steps between consecutive sections, used where sections lie well beyond the
    # first level's search (1.5 times it: sections placed anywhere on their grids), so
    # that they start close; smaller offsets are left to the levels, which measure them
    # better, unless the first level finds nothing to tie two sections together (below).
    # The prior then pulls each section's field towards its own offset instead of 0, less
    # the offsets' slow trend in z.
    reach = levels[0].search * levels[0].factor
    steps = _rough_steps(nodata, valid, min_score) if pairs else np.zeros((0, 2))
    used = np.abs(steps).max(axis=1) > 1.5 * reach
    rough, anchor = _rough_start(steps, used)
    fields[valid] += rough[:, :, None, None]
    anchor = anchor[:, :, None, None]
    coverage = np.full(nz, np.nan)  # best accepted fraction with any partner, any level
    shifts, weights, matchable, delta = [], [], [], np.zeros((len(valid), 2, *grid))
    li, attempt, tried, first_parts = 0, 0, np.zeros_like(used), 0
    apart = np.zeros(nz, bool)  # valid sections that the first level leaves apart
    while li < len(levels) and pairs:  # a single usable section stays as it is
        level = levels[li]
        # Matching is cut into tiles of the node grid, so that a task holds a window of a
        # section, never a whole one; each section's window is rendered once per level and
        # tile, from the piece of the section it reads, and shared by the pairs it is in.
        tiles = _tiles(grid, spacing, level)
        tasks = []
        for tile in tiles:
            rendered = {}
            for z in valid:
                cut, start = _source(fields[z], spacing, tile, level, (ny, nx))
                rendered[z] = dask.delayed(_level_image, pure=True)(
                    vol.data[z][cut], mask[z][cut], fields[z], spacing, level.factor, tile,
                    start, fill[z])
            tasks += [dask.delayed(_match_pair, pure=True)(rendered[zm], rendered[zf], tile,
                                                           level) for zm, zf in pairs]
        done = dask.compute(*tasks)
        results = [(np.empty((*grid, 2)), np.empty(grid)) for _ in pairs]
        for t, tile in enumerate(tiles):
            for (shift, score), (tshift, tscore) in zip(
                    results, done[t * len(pairs):(t + 1) * len(pairs)], strict=True):
                shift[tile.nodes], score[tile.nodes] = tshift, tscore
        shifts = [r[0] for r in results]
        weights = [np.where((r[1] >= min_score) & np.isfinite(r[0]).all(axis=2), r[1], 0)
                   for r in results]
        shifts = [np.nan_to_num(s) for s in shifts]
        matchable = [np.isfinite(r[1]) for r in results]
        level_coverage = np.full(nz, np.nan)
        for (zm, zf), w, m in zip(pairs, weights, matchable, strict=True):
            # Evidence for both sections of the pair: a section is reliable if it matches
            # one of its neighbours on either side well (so a good section next to a bad
            # one, even at the end of the stack, is not blamed for it).  Nodes lost to a
            # defect do not count.
            frac = float((w > 0).sum() / max(m.sum(), 1))
            level_coverage[[zm, zf]] = np.fmax(level_coverage[[zm, zf]], frac)
        coverage_before = coverage.copy()
        coverage = np.fmax(coverage, level_coverage)
        # A level that matches too little of a section (by the bar that flags a section
        # unreliable, among this level's coverages) does not move it: its few accepted
        # matches, the likeliest to be noise, would decide its whole affine.
        weak = _weak(level_coverage, min_matches)
        weights = [np.zeros_like(w) if weak[zm] or weak[zf] else w
                   for (zm, zf), w in zip(pairs, weights, strict=True)]
        delta, weights = _robust_solve(pairs, shifts, weights, valid, fields[valid] - anchor,
                                       grid, stiffness, prior, max_residual * level.factor,
                                       window)
        part = _parts(pairs, weights, valid)
        if li == 0:
            # Consecutive sections that lie beyond the first level's search, but not
            # beyond the rough steps' bar, match next to nothing across them (a few stray
            # matches at most).  The first level starts again with those pairs' rough
            # steps, where the step is large enough to explain it, and keeps them only if
            # the stack then holds together better.  (The rough steps' bar stays high
            # otherwise: on small 40-50 nm sections a rough step can be wrong by 25 px.)
            strong = _strong_parts(pairs, weights, matchable, valid, weak, min_matches)
            n_parts = strong.max() + 1
            if attempt == 0:
                cut = (strong[1:] != strong[:-1]) & (np.abs(steps).max(axis=1) > reach / 2)
                retry = tried = cut & ~used
                first_parts = n_parts
            elif attempt == 1 and n_parts >= first_parts:
                retry = tried  # no better after the retry: back to the first start
            else:
                retry = np.zeros_like(used)
            if retry.any():
                used = used ^ retry
                fields[valid] -= rough[:, :, None, None]
                rough, anchor = _rough_start(steps, used)
                fields[valid] += rough[:, :, None, None]
                anchor = anchor[:, :, None, None]
                coverage = coverage_before  # the attempt's coverage does not count
                attempt += 1
                continue
            # What still lies apart from the stack's largest part is flagged below: the
            # later levels search a few pixels only, and cannot bring it back.  (Not a
            # section that this level matched too little of, and so left alone: a partly
            # lost one, say; the later levels judge it.)
            apart[valid] = (strong != np.argmax(np.bincount(strong))) & ~weak[valid]
        # A section, or a run of sections, that this level's matches do not tie to the
        # rest (no pair with three accepted matches) is held by the prior alone, which
        # would pull it back to 0 on its own: it moves with the stack instead.  (Parts
        # come from the whole stack's pairs, whether the solve ran in windows or not: a
        # window's boundary is no break in the stack.)
        delta = _hold_parts(delta, part)
        if level.affine:
            delta = _affine(delta, spacing)
        for i, z in enumerate(valid):
            fields[z] = _compose(fields[z], delta[i], spacing)
        li += 1
    table = _table(nz, pairs, weights, shifts, delta, valid, missing, matchable)
    # Fine levels of 40-50 nm ssTEM accept few matches (sections differ in detail), so a
    # section is unreliable only if no level matched enough of it; and small sections of
    # such stacks accept few even where intact, so the typical section sets a bar as well.
    table["coverage"] = coverage
    typical = _typical(coverage)
    if typical < min_matches:
        warnings.warn(f"the typical section accepts only {typical:.0%} of its matches (median "
                      f"coverage, below min_matches={min_matches}): the alignment rests on "
                      "few matches, and a poor section cannot be told from the rest; check "
                      "the stack (missing or noisy sections, contrast) and the levels",
                      stacklevel=2)
    table["unreliable"] = ~missing & (_weak(coverage, min_matches) | apart)
    if apart.any():
        warnings.warn(f"sections {np.flatnonzero(apart).tolist()} lie apart from the rest of "
                      "the stack: the first level ties them to it by too few matches (offsets "
                      f"beyond its search, {reach} px, that the rough steps did not find?)",
                      stacklevel=2)
    good = ~(table["missing"] | table["unreliable"]).to_numpy(bool)
    if (~good & ~missing).any():
        warnings.warn("sections with unreliable matches, given their neighbours' fields: "
                      f"{np.flatnonzero(~good & ~missing).tolist()}", stacklevel=2)
    fields = _interpolate_z(fields, good)
    table["interpolated"] = ~good
    vs = vol.attrs.get("voxel_size", (1.0, 1.0, 1.0))
    fda = xr.DataArray(
        fields.astype(np.float32), dims=("z", "c", "gy", "gx"),
        coords={"z": vol.coords["z"].values if "z" in vol.coords else np.arange(nz),
                "c": ["y", "x"]},
        attrs={"spacing": spacing, "units": "pixels", "voxel_size": tuple(vs)},
        name="fields")
    return Alignment(render(vol, fda), fda, table)


def _typical(coverage: np.ndarray) -> float:
    return float(np.nanmedian(coverage)) if np.isfinite(coverage).any() else 1.0


def _weak(coverage: np.ndarray, min_matches: float) -> np.ndarray:
    """Sections whose coverage is below ``min_matches`` and below half the typical
    (median) coverage; not those without any (NaN)."""
    return coverage < min(min_matches, 0.5 * _typical(coverage))


def _residual(delta: np.ndarray, pos: dict, pair: tuple[int, int], shift: np.ndarray
              ) -> np.ndarray:
    """What the corrections ``delta`` (rows: ``pos`` of a section) leave of a pair's
    match at every node, (gy, gx, 2) pixels."""
    zm, zf = pair
    return delta[pos[zm]].transpose(1, 2, 0) - delta[pos[zf]].transpose(1, 2, 0) - shift


def _norms(delta: np.ndarray, pos: dict, pairs: list, shifts: list):
    """The residuals' lengths (gy, gx) of every pair, one pair at a time."""
    return (np.linalg.norm(_residual(delta, pos, pair, s), axis=2)
            for pair, s in zip(pairs, shifts, strict=True))


def _robust_solve(pairs, shifts, weights, valid, current, grid, stiffness, prior,
                  max_residual, window):
    """:func:`_windowed_solve`, then matches with large residuals dropped and the solve
    redone (twice at most).  Every match is judged once, on the whole stack's corrections
    and by the whole stack's median and spread (not window by window, where matches in an
    overlap would be judged twice, by different bars); the residuals are computed pair by
    pair, and only those of accepted matches kept for the median."""
    pos = {z: i for i, z in enumerate(valid)}
    delta = None
    for _ in range(3):
        delta = _windowed_solve(pairs, shifts, weights, valid, current, grid, stiffness,
                                prior, window, delta)
        used = np.concatenate([r[w > 0] for r, w in zip(
            _norms(delta, pos, pairs, shifts), weights, strict=True)])
        if not len(used):
            break
        mad = np.median(np.abs(used - np.median(used))) * 1.4826
        limit = max(max_residual, np.median(used) + 4 * mad)
        dropped = [(r > limit) & (w > 0) for r, w in zip(
            _norms(delta, pos, pairs, shifts), weights, strict=True)]
        if not any(d.any() for d in dropped):
            break
        weights = [np.where(d, 0, w) for d, w in zip(dropped, weights, strict=True)]
    return delta, weights


def _table(nz, pairs, weights, shifts, delta, valid, missing, matchable) -> pd.DataFrame:
    """Matches (nodes not lost to a defect), accepted matches and their rms residual
    (pixels) per section, last level."""
    pos = {z: i for i, z in enumerate(valid)}
    matches = np.zeros(nz, int)
    accepted = np.zeros(nz, int)
    sq = np.zeros(nz)
    for (zm, zf), w, s, m in zip(pairs, weights, shifts, matchable, strict=True):
        ok = w > 0
        matches[zm] += int(m.sum())
        accepted[zm] += int(ok.sum())
        r = _residual(delta, pos, (zm, zf), s)
        sq[zm] += float((r[ok] ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.sqrt(sq / accepted)
    return pd.DataFrame({"z": np.arange(nz), "missing": missing, "matches": matches,
                         "accepted": accepted, "residual": residual})


def source_box(fields: np.ndarray, spacing: int, begin: Sequence[int], end: Sequence[int],
               shape: Sequence[int]) -> tuple[list, list] | None:
    """The part ``[lo, hi)`` of the input that the output block ``[begin, end)`` reads,
    from the largest displacement of the grid nodes around the block; None if it reads
    nothing inside the input.  ``fields`` are those of the block's sections only
    (``fields[begin[0]:end[0]]``)."""
    (z0, y0, x0), (z1, y1, x1) = begin, end
    gy0, gy1 = max(y0 // spacing, 0), min((y1 - 1) // spacing + 2, fields.shape[2])
    gx0, gx1 = max(x0 // spacing, 0), min((x1 - 1) // spacing + 2, fields.shape[3])
    sub = fields[:, :, gy0:gy1, gx0:gx1]
    lo = np.floor(sub.min(axis=(0, 2, 3))) - 2
    hi = np.ceil(sub.max(axis=(0, 2, 3))) + 2
    ny, nx = shape[1:]
    sy0, sx0 = int(np.clip(y0 + lo[0], 0, ny)), int(np.clip(x0 + lo[1], 0, nx))
    sy1, sx1 = int(np.clip(y1 + hi[0], sy0, ny)), int(np.clip(x1 + hi[1], sx0, nx))
    if sy1 == sy0 or sx1 == sx0:
        return None
    return [z0, sy0, sx0], [z1, sy1, sx1]


def _render_block(source: np.ndarray, field: np.ndarray, spacing: int, origin, shape,
                  src_origin, fill, order: int) -> np.ndarray:
    out = np.empty((source.shape[0], *shape), source.dtype)
    for i in range(source.shape[0]):
        # Output pixel p reads source(p + u(p)); the source piece starts at src_origin.
        sub = field[i] - np.asarray(src_origin, np.float64)[:, None, None]
        img = warp_section(source[i], sub, spacing, origin, shape, order=order, cval=fill)
        if order and np.issubdtype(out.dtype, np.integer):
            info = np.iinfo(out.dtype)
            img = np.clip(np.rint(img), info.min, info.max)
        out[i] = img
    return out


@dataclass(frozen=True)
class StackFields:
    """Deformation fields (z, 2, grid y, grid x) of a stack, read a few sections at a time
    (an in-memory array for the library, the store's zarr array in a pipeline task; or
    only the sections from ``first`` on, read once for a task's steps)."""

    source: Any
    spacing: int
    first: int = 0  # the stack's section that source[0] is

    def sections(self, z0: int, z1: int) -> np.ndarray:
        return np.asarray(self.source[z0 - self.first:z1 - self.first], np.float64)


def _render_reads(box: Box, shape: tuple, fields: StackFields, **_) -> Box:
    got = source_box(fields.sections(box.begin[0], box.end[0]), fields.spacing, box.begin,
                     box.end, shape)
    return Box(*got) if got is not None else Box(box.begin, box.begin)


def _render_kernel(raw: np.ndarray, *, where, fields: StackFields, fill: float, order: int,
                   window: int | None) -> np.ndarray:
    box, read = where.box, where.read[0]
    dtype = np.uint8 if window else raw.dtype
    if read.empty:  # nothing of the input maps here
        return np.full(box.shape, fill, dtype)
    if window:  # the input's missing-data mask (a local test: halo), rendered
        raw = missing_mask(raw, window)[read.slices(where.origin[0])].astype(np.uint8)
    return _render_block(raw, fields.sections(box.begin[0], box.end[0]), fields.spacing,
                         box.begin[1:], box.shape[1:], read.begin[1:], fill, order)


def render_step(fields: StackFields, dtype: Any, fill: float = 0, order: int = 1,
                window: int | None = None) -> Step:
    """The blockwise step of :func:`render` (and of the pipeline's align stage): each
    output block reads the part of the input its pixels map to.  With ``window``, what is
    rendered is the input's missing-data mask (:func:`emdask.defects.missing_mask`, uint8;
    give ``fill=1, order=0``)."""
    # the mask read as detect_defects reads it (missing_step's halo, edge not padded)
    missing = missing_step(window) if window else None
    return Step("render", _render_kernel, np.dtype(np.uint8 if window else dtype),
                halo=missing.halo if missing else (0, 0, 0),
                clip=missing.clip if missing else False, reads=_render_reads,
                params={"fields": fields, "fill": fill, "order": int(order),
                        "window": window})


def render(stack: Any, fields: xr.DataArray, chunks: Sequence[int] | None = None,
           fill: float = 0, order: int = 1) -> xr.DataArray:
    """Apply deformation fields to a stack, lazily and blockwise.

    Each output block reads only the part of the input its pixels map to (its box grown by
    the largest displacement over the block), so the rendering scales to large sections.

    Parameters
    ----------
    stack
        (z, y, x) DataArray or array, the shape the fields were computed for.
    fields
        The fields of :func:`align` (or of :func:`invert_fields`).
    chunks
        Output chunks (default: the input's).
    fill
        Value of pixels that map outside the input.
    order
        1: bilinear interpolation (intensities); 0: nearest (labels, masks).
    """
    vol = as_stack(stack)
    if fields.shape[0] != vol.shape[0]:
        raise ValueError(f"fields for {fields.shape[0]} sections, stack has {vol.shape[0]}")
    spacing = int(fields.attrs["spacing"])
    if tuple(fields.shape[2:]) != _grid_shape(vol.shape[1:], spacing):
        raise ValueError(f"fields grid {tuple(fields.shape[2:])} does not fit sections of "
                         f"{tuple(vol.shape[1:])} pixels at spacing {spacing}")
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(vol.data)
    step = render_step(StackFields(np.asarray(fields.values, np.float64), spacing),
                       vol.dtype, fill, order)
    out = apply(step, data, chunks=data.chunks if chunks is None else
                da.core.normalize_chunks(chunks, vol.shape))
    return xr.DataArray(out, dims=vol.dims, coords=vol.coords, attrs=dict(vol.attrs),
                        name=vol.name)


# ------------------------------------------------------------------------ evaluation
def distort(stack: np.ndarray, seed: int = 0, translation: float = 12.0,
            rotation: float = 1.5, elastic: float = 6.0, smoothness: float = 64.0,
            max_displacement: float = 20.0, reference: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Misalign an aligned stack with known random distortions, to measure an aligner.

    Every section but ``reference`` gets a random translation (up to ``translation``
    pixels per axis), a rotation about its centre (up to ``rotation`` degrees) and a smooth
    elastic field (Gaussian-smoothed noise of scale ``smoothness`` pixels, amplitude up to
    ``elastic`` pixels), scaled down where needed so that no pixel moves more than
    ``max_displacement``.

    Returns
    -------
    distorted : array like ``stack``
        ``distorted[z](p) = stack[z](p + t[z](p))``; pixels mapped from outside are 0.
    truth : float32 (z, 2, y, x)
        The true displacement ``t`` in pixels.
    """
    rng = np.random.default_rng(seed)
    stack = np.asarray(stack)
    nz, ny, nx = stack.shape
    ys, xs = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64),
                         indexing="ij")
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    truth = np.zeros((nz, 2, ny, nx), np.float32)
    out = stack.copy()
    for z in range(nz):
        if z == reference:
            continue
        theta = np.deg2rad(rng.uniform(-rotation, rotation))
        t = rng.uniform(-translation, translation, 2)
        ry = np.cos(theta) * (ys - cy) - np.sin(theta) * (xs - cx) + cy - ys
        rx = np.sin(theta) * (ys - cy) + np.cos(theta) * (xs - cx) + cx - xs
        el = np.stack([ndi.gaussian_filter(rng.standard_normal((ny, nx)), smoothness)
                       for _ in range(2)])
        el *= rng.uniform(0, elastic) / max(np.abs(el).max(), 1e-12)
        d = np.stack([ry + t[0], rx + t[1]]) + el
        d *= min(1.0, max_displacement / np.linalg.norm(d, axis=0).max())
        truth[z] = d
        img = ndi.map_coordinates(stack[z].astype(np.float32), [ys + d[0], xs + d[1]],
                                  order=1, mode="constant", cval=0)
        out[z] = np.clip(np.rint(img), 0, 255) if stack.dtype == np.uint8 else img
    return out, truth


def displacement_error(fields: xr.DataArray, truth: np.ndarray, step: int = 4,
                       detrend: bool = True, reference: xr.DataArray | None = None,
                       vectors: bool = False) -> np.ndarray:
    """Residual displacement (pixels) of an alignment against the known truth of
    :func:`distort`, at every ``step``-th pixel: ``|e(p)|`` with ``e(p) = u(p) + t(p + u(p))``,
    zero for a perfect alignment.  Shape (z, y // step, x // step).

    With ``detrend``, the linear trend in z of ``e`` at each pixel is removed first: no
    aligner can know the absolute position or the shear of the stack from its images (see
    :func:`align`), only the relative position of its sections.  With ``reference`` (the
    fields of aligning the undistorted stack), ``e`` is measured against that alignment
    instead of the stack as given: how well the distortions alone are undone.  With
    ``vectors``, ``e`` itself, shape (z, 2, y // step, x // step).
    """
    spacing = int(fields.attrs["spacing"])
    nz, _, ny, nx = truth.shape
    ys, xs = np.meshgrid(np.arange(0, ny, step, dtype=np.float64),
                         np.arange(0, nx, step, dtype=np.float64), indexing="ij")
    vec = np.empty((nz, 2, *ys.shape))
    for z in range(nz):
        u = _dense(np.asarray(fields.values[z], np.float64), spacing, ys, xs)
        t = np.stack([ndi.map_coordinates(truth[z, c], [ys + u[0], xs + u[1]], order=1,
                                          mode="nearest") for c in range(2)])
        vec[z] = u + t
        if reference is not None:
            vec[z] -= _dense(np.asarray(reference.values[z], np.float64), spacing, ys, xs)
    if detrend:
        vec = _detrend(vec)
    return vec if vectors else np.linalg.norm(vec, axis=1)
