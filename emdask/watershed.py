"""Affinity watershed into supervoxels (Zlateski and Seung 2015), as a union-find problem.

Affinities are 3 channels (z, y, x); ``affinities[d][v]`` is the affinity of the edge
between voxel ``v`` and its neighbour at ``v - e_d`` (the convention of waterz and
gunpowder).  Float affinities in [0, 1] are quantized to 16 bits (``round(w * 65535)``;
uint8 affinities are scaled by 1/255 exactly, ``w * 257``) so that every later sum is
exact integer arithmetic and therefore the same in any order, on any chunking.

The watershed, in the manner of Zlateski and Seung:

1. Edges below ``low`` are cut; a voxel with no edge at or above ``low`` is background (0).
2. Edges at or above ``high`` join their voxels unconditionally (and count as ``high``).
3. Every other voxel follows its steepest ascent: it points to the neighbour along its
   strongest edge.  Ties are resolved by a key that makes pointers strictly increase, so
   they never form cycles: a voxel ``v`` with strongest edge ``m(v)`` points to the
   neighbour ``u`` on such an edge with the largest ``(m(u), -index(u))``, provided that
   key exceeds its own ``(m(v), -index(v))``; otherwise ``v`` is a basin root.  ``index``
   is the voxel's linear index in the *whole* volume, so the result is a function of the
   affinities alone.
4. Basins are the connected components of the pointer and high edges.  Each is local
   information (a voxel's pointer needs affinities within 2 voxels), which is what makes the
   blockwise computation exact: a block labels its own basins, and the few pointers that
   cross a block face are joined afterwards (see :mod:`emdask.segmentation`).

Small basins are then merged along their strongest edge (size-dependent single linkage),
on the region graph: see :func:`emdask.agglomerate.merge_small_regions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["Q", "WatershedParams", "basins", "quantize_affinities"]

#: Quantization scale: an affinity of 1.0 is Q.
Q = 65535
#: Plateaus are divided by distance to their nearest exit up to this many steps; beyond
#: it, by global voxel index.
PLATEAU_DEPTH = 2
#: Halo (voxels) a block needs around it to compute its basins exactly.
HALO = PLATEAU_DEPTH + 3


@dataclass(frozen=True)
class WatershedParams:
    """Thresholds of the watershed, as affinities in [0, 1].

    Attributes
    ----------
    low
        Edges below this are cut; voxels with no edge at or above it are background (0).
    high
        Edges at or above this join their voxels unconditionally.
    size_threshold
        Basins smaller than this (voxels) merge into their neighbour along their strongest
        edge, if that edge is at least ``merge_threshold`` (0 disables).
    merge_threshold
        Minimum affinity of an edge along which small basins merge.
    dust_size
        Regions still smaller than this after merging become background (0 disables).
    """

    low: float = 0.0001
    high: float = 0.9999
    size_threshold: int = 25
    merge_threshold: float = 0.5
    dust_size: int = 0

    def __post_init__(self):
        if not 0 <= self.low <= self.high <= 1:
            raise ValueError(
                f"watershed thresholds must satisfy 0 <= low <= high <= 1, got low={self.low}, "
                f"high={self.high}"
            )
        if not 0 <= self.merge_threshold <= 1:
            raise ValueError(f"merge_threshold must lie in [0, 1], got {self.merge_threshold}")
        if self.size_threshold < 0 or self.dust_size < 0:
            raise ValueError("size_threshold and dust_size must be >= 0")

    def quantized(self) -> tuple[int, int]:
        """(low, high) on the 16-bit scale; low is rounded up so that 'below' stays below."""
        return int(np.ceil(self.low * Q - 1e-9)), int(np.ceil(self.high * Q - 1e-9))


@njit(cache=True, nogil=True)
def _quantize_float(a, out):
    """One pass: out = round(clip(a, 0, 1) * Q), NaN -> 0; returns (#NaN, min, max)."""
    n_nan, lo, hi = 0, np.inf, -np.inf
    for i in range(a.size):
        v = a[i]
        if np.isnan(v):
            n_nan += 1
            out[i] = 0
            continue
        lo, hi = min(lo, v), max(hi, v)
        out[i] = np.uint16(np.rint(min(max(v, 0.0), 1.0) * Q))
    return n_nan, lo, hi


def quantize_affinities(affinities: np.ndarray, where: str = "affinities",
                        check: bool = True) -> np.ndarray:
    """Check affinities and quantize them to uint16 (1.0 -> 65535).

    Raises ``ValueError`` for NaN or values outside [0, 1], naming ``where``.  With
    ``check=False`` such values are clipped (NaN -> 0) instead: for halos, whose owner
    block reports them.
    """
    a = np.asarray(affinities)
    if a.dtype == np.uint8:
        return a.astype(np.uint16) * np.uint16(257)
    if a.dtype == np.uint16:
        return a
    if a.dtype == bool:
        return a.astype(np.uint16) * np.uint16(Q)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(
            f"{where}: affinities must be float in [0, 1] or uint8 (scaled by 1/255), "
            f"got dtype {a.dtype}"
        )
    out = np.empty(a.shape, np.uint16)
    n_nan, lo, hi = _quantize_float(np.ascontiguousarray(a).reshape(-1), out.reshape(-1))
    if check and n_nan:
        raise ValueError(f"{where}: affinities contain NaN ({n_nan} values)")
    if check and a.size and (lo < 0 or hi > 1):
        raise ValueError(f"{where}: affinities must lie in [0, 1], found [{lo:g}, {hi:g}]")
    return out


# Neighbour directions: 0..2 = -z, -y, -x; 3..5 = +z, +y, +x.
_DZ = np.array([-1, 0, 0, 1, 0, 0])
_DY = np.array([0, -1, 0, 0, 1, 0])
_DX = np.array([0, 0, -1, 0, 0, 1])


def _usable_weights(aq: np.ndarray, origin, shape, halo: int, low: int, high: int
                    ) -> np.ndarray:
    """Edge weights clamped at ``high``, or -1 where an edge is cut (< low) or does not
    exist (either voxel outside the volume).  ``w[d][p]`` is the edge from ``p`` to
    ``p - e_d``."""
    w = np.minimum(aq.astype(np.int32), high)
    w[aq < low] = -1
    inside = []
    for d in range(3):
        g = origin[d] - halo + np.arange(aq.shape[d + 1])
        inside.append((g >= 0) & (g < shape[d]))
    in_volume = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    for d in range(3):
        g = origin[d] - halo + np.arange(aq.shape[d + 1])
        first = np.expand_dims(g >= 1, tuple(a for a in range(3) if a != d))
        w[d][~(in_volume & first)] = -1
    return w


@njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def _union(parent, a, b):
    a, b = _find(parent, a), _find(parent, b)
    if a != b:
        parent[max(a, b)] = min(a, b)


@njit(cache=True, nogil=True)
def _union_all(n, a, b):
    """Each of ``n`` elements' root after joining every pair (a[i], b[i]); roots are the
    lowest index of their set."""
    parent = np.arange(n)
    for i in range(a.size):
        _union(parent, a[i], b[i])
    for i in range(n):
        parent[i] = _find(parent, i)
    return parent


@njit(cache=True, nogil=True)
def _basins_kernel(w, origin, shape, halo, high, depth):
    """Basins of one block from its usable edge weights ``w`` (block plus ``halo``).

    Returns labels (1..n in scan order, 0 = background), the pointer direction of every
    block voxel (-1 = none/root, 0..5 as in _DZ/_DY/_DX), and each label's first voxel's
    global linear index (its minimum, since block scan order follows global order).
    """
    _, ez, ey, ex = w.shape
    nz, ny, nx = ez - 2 * halo, ey - 2 * halo, ex - 2 * halo
    sy, sx = shape[1], shape[2]
    sxy = sy * sx
    # m(p): strongest usable edge of p (valid wherever p + 1 is inside the array)
    m = np.full((ez, ey, ex), -1, np.int32)
    for z in range(ez - 1):
        for y in range(ey - 1):
            for x in range(ex - 1):
                m[z, y, x] = max(w[0, z, y, x], w[1, z, y, x], w[2, z, y, x],
                                 w[0, z + 1, y, x], w[1, z, y + 1, x], w[2, z, y, x + 1])
    # level(p): steps over the plateau to the nearest voxel with a strictly steeper
    # neighbour ("exit"), capped at depth + 1; computed Jacobi-style (no in-place
    # propagation), so it is the same whatever the block boundaries
    level = np.full((ez, ey, ex), depth + 1, np.int8)
    plateau = np.empty(ez * ey * ex, np.int64)  # voxels without an exit: usually few
    n_plateau = 0
    for z in range(1, ez - 2):
        for y in range(1, ey - 2):
            for x in range(1, ex - 2):
                mp = m[z, y, x]
                if mp < 0:
                    continue
                if mp >= high:  # joined by its high edges anyway: no plateau to divide
                    level[z, y, x] = 0
                    continue
                for k in range(6):
                    wk = w[k, z, y, x] if k < 3 else w[k - 3, z + _DZ[k], y + _DY[k],
                                                       x + _DX[k]]
                    if wk == mp and m[z + _DZ[k], y + _DY[k], x + _DX[k]] > mp:
                        level[z, y, x] = 0
                        break
                if level[z, y, x] != 0:
                    plateau[n_plateau] = (z * ey + y) * ex + x
                    n_plateau += 1
    update = np.empty(n_plateau, np.int8)
    for r in range(1, depth + 1):
        for c in range(n_plateau):
            p = plateau[c]
            z, y, x = p // (ey * ex), (p // ex) % ey, p % ex
            update[c] = level[z, y, x]
            if not (1 + r <= z < ez - 2 - r and 1 + r <= y < ey - 2 - r
                    and 1 + r <= x < ex - 2 - r):
                continue
            mp = m[z, y, x]
            for k in range(6):
                wk = w[k, z, y, x] if k < 3 else w[k - 3, z + _DZ[k], y + _DY[k], x + _DX[k]]
                q = level[z + _DZ[k], y + _DY[k], x + _DX[k]]
                if wk == mp and m[z + _DZ[k], y + _DY[k], x + _DX[k]] == mp \
                        and q + 1 < update[c]:
                    update[c] = q + 1
        for c in range(n_plateau):  # apply after the sweep (Jacobi)
            p = plateau[c]
            level[p // (ey * ex), (p // ex) % ey, p % ex] = update[c]
    parent = np.arange(nz * ny * nx)
    direction = np.full((nz, ny, nx), -1, np.int8)
    for i in range(nz):
        for j in range(ny):
            for l in range(nx):
                z, y, x = halo + i, halo + j, halo + l
                mv = m[z, y, x]
                if mv < 0:
                    continue
                # key (m, -level, -global index) strictly increases along pointers
                gv = (origin[0] + i) * sxy + (origin[1] + j) * sx + (origin[2] + l)
                best_k, best_m, best_l, best_g = -1, mv, level[z, y, x], gv
                for k in range(6):
                    wk = w[k, z, y, x] if k < 3 else w[k - 3, z + _DZ[k], y + _DY[k],
                                                       x + _DX[k]]
                    if wk != mv:
                        continue
                    qz, qy, qx = z + _DZ[k], y + _DY[k], x + _DX[k]
                    mu, lu = m[qz, qy, qx], level[qz, qy, qx]
                    gu = gv + _DZ[k] * sxy + _DY[k] * sx + _DX[k]
                    if mu > best_m or (mu == best_m and (lu < best_l or (
                            lu == best_l and gu < best_g))):
                        best_k, best_m, best_l, best_g = k, mu, lu, gu
                v = (i * ny + j) * nx + l
                if best_k >= 0:
                    direction[i, j, l] = best_k
                    ui, uj, ul = i + _DZ[best_k], j + _DY[best_k], l + _DX[best_k]
                    if 0 <= ui < nz and 0 <= uj < ny and 0 <= ul < nx:
                        _union(parent, v, (ui * ny + uj) * nx + ul)
                # edges at or above high join unconditionally (each one once, from its +side)
                if i > 0 and w[0, z, y, x] >= high:
                    _union(parent, v, v - ny * nx)
                if j > 0 and w[1, z, y, x] >= high:
                    _union(parent, v, v - nx)
                if l > 0 and w[2, z, y, x] >= high:
                    _union(parent, v, v - 1)
    labels = np.zeros((nz, ny, nx), np.int64)
    root_label = np.zeros(nz * ny * nx, np.int64)
    first = np.empty(nz * ny * nx, np.int64)
    n = 0
    for i in range(nz):
        for j in range(ny):
            for l in range(nx):
                if m[halo + i, halo + j, halo + l] < 0:
                    continue
                r = _find(parent, (i * ny + j) * nx + l)
                if root_label[r] == 0:
                    n += 1
                    root_label[r] = n
                    first[n - 1] = (origin[0] + i) * sxy + (origin[1] + j) * sx + (origin[2] + l)
                labels[i, j, l] = root_label[r]
    return labels, direction, first[:n].copy()


def basins(
    quantized: np.ndarray,
    origin: tuple[int, int, int],
    shape: tuple[int, int, int],
    params: WatershedParams,
    halo: int = HALO,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steepest-ascent basins of one block (in-memory kernel).

    Parameters
    ----------
    quantized
        Affinities (3, z, y, x) of the block plus ``halo`` voxels on each side (any
        values where the halo lies outside the volume: those edges are ignored): float in
        [0, 1] or uint8 (x 255), quantized here by :func:`quantize_affinities`, or uint16
        already quantized (65535 = 1).
    origin
        Global voxel index of the block's first voxel.
    shape
        Shape of the whole volume (voxels), for global indices and volume borders.

    Returns
    -------
    labels : int64 (z, y, x)
        Block-local basin labels 1..n in scan order, 0 = background.
    direction : int8 (z, y, x)
        Each voxel's pointer (0..5 = -z, -y, -x, +z, +y, +x; -1 = basin root/background).
    first_index : int64 (n,)
        Global linear index of each basin's first (lowest-index) voxel in the block.
    """
    low, high = params.quantized()
    quantized = np.asarray(quantized)
    if quantized.dtype != np.uint16:
        quantized = quantize_affinities(quantized, "basins")
    if quantized.ndim != 4 or quantized.shape[0] != 3:
        raise ValueError(f"basins: affinities must be (3, z, y, x), got shape "
                         f"{quantized.shape}")
    w = _usable_weights(quantized, origin, shape, halo, low, high)
    return _basins_kernel(w, np.asarray(origin, np.int64), np.asarray(shape, np.int64),
                          int(halo), high, int(halo) - 3)
