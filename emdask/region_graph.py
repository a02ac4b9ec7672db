"""Region adjacency graph: affinity statistics on the boundary of every pair of regions.

For every pair of touching regions the graph holds the count, the sum and the maximum of the
(16-bit quantized) affinities of the voxel edges between them, where the maximum first
occurs (the lowest global index of a voxel edge attaining it: a tie-break between edges of
equal maximum that does not depend on how regions are numbered), optionally a histogram
of those affinities so that quantile scores (median, 75th percentile) can be used, and
optionally the sum of raw EM over the boundary (for learned scores).  Every statistic is
additive (counts, sums and histograms add, maxima take the maximum), so
graphs of blocks combine exactly into the graph of the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from emdask.watershed import Q, quantize_affinities

__all__ = ["B_OFFSET", "RegionGraph", "edge_index", "face_links", "region_graph"]


@dataclass
class RegionGraph:
    """Edges ``u < v`` (sorted, unique) with their boundary statistics.

    ``total`` is the sum of quantized affinities (1.0 = 65535); ``hist`` has shape
    (n_edges, bins) with bins of equal width over [0, 1] (bins may be 0); ``raw`` has shape
    (n_edges, 1), the sum over the boundary's voxel edges of the raw values of both voxels,
    or (n_edges, 0) without raw.  ``at`` is the lowest global index (:func:`edge_index`) of
    a voxel edge whose affinity is ``max`` (0 where no positions were given).
    """

    u: np.ndarray
    v: np.ndarray
    count: np.ndarray
    total: np.ndarray
    max: np.ndarray
    hist: np.ndarray
    raw: np.ndarray | None = None
    at: np.ndarray | None = None

    def __post_init__(self):
        if self.raw is None:
            self.raw = np.zeros((self.u.size, 0), np.int64)
        if self.at is None:
            self.at = np.zeros(self.u.size, np.int64)

    def __len__(self) -> int:
        return int(self.u.size)

    def select(self, keep: np.ndarray) -> RegionGraph:
        """The edges where ``keep`` (a mask or indices)."""
        return RegionGraph(*(getattr(self, f)[keep] for f in FIELDS))

    def shifted(self, du: int, dv: int) -> RegionGraph:
        """The same edges with region ids moved by ``du`` (u) and ``dv`` (v)."""
        return self.relabeled(self.u + du, self.v + dv)

    def relabeled(self, u: np.ndarray, v: np.ndarray) -> RegionGraph:
        """The same edges' statistics between regions ``u`` and ``v`` (not re-summed)."""
        return RegionGraph(u, v, self.count, self.total, self.max, self.hist, self.raw,
                           self.at)

    def order(self) -> np.ndarray:
        """The edges from the strongest maximum down, ties by where the maximum first
        occurs: an order that is the same for any chunking and any region numbering."""
        return np.lexsort((self.at, -self.max))

    @property
    def mean(self) -> np.ndarray:
        """Mean affinity of each edge, in [0, 1]."""
        return self.total / (self.count * float(Q))

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    @classmethod
    def empty(cls, bins: int = 0, raw: bool = False) -> RegionGraph:
        z = np.zeros(0, np.int64)
        return cls(z, z.copy(), z.copy(), z.copy(), z.copy(), np.zeros((0, bins), np.int64),
                   np.zeros((0, int(raw)), np.int64), z.copy())


#: The arrays of a :class:`RegionGraph`, in order.
FIELDS = ("u", "v", "count", "total", "max", "hist", "raw", "at")

#: Bits of a voxel edge's index in :func:`_max_key` (3 edges a voxel: 2**47 / 3, about
#: 4.7e13 voxels, bounds a volume).
_AT_BITS = 47


def _max_key(w: np.ndarray, at: np.ndarray) -> np.ndarray:
    """One int64 whose maximum is the highest ``w`` and, among equal ones, the lowest
    ``at``: so a single ``maximum`` reduction keeps a maximum and where it first occurs."""
    return (np.asarray(w, np.int64) << _AT_BITS) | ((1 << _AT_BITS) - 1 - np.asarray(at, np.int64))


def _from_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return key >> _AT_BITS, (1 << _AT_BITS) - 1 - (key & ((1 << _AT_BITS) - 1))


def _sort_pairs(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order sorting pairs by (lo, hi), and where each run of equal pairs starts.

    Pairs of non-negative ids below 2**31 are packed into one int64 key, whose stable sort
    (a radix sort in numpy) is several times faster than a two-key lexsort.
    """
    if lo.size and lo.min() >= 0 and max(lo.max(), hi.max()) < 2**31:
        key = (lo << 31) | hi
        order = np.argsort(key, kind="stable")
        key = key[order]
        return order, np.r_[True, key[1:] != key[:-1]]
    order = np.lexsort((hi, lo))
    lo, hi = lo[order], hi[order]
    return order, np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]


def _columns(a: np.ndarray, order: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per-edge sums of the rows of a (n, k) statistic (k may be 0)."""
    return np.add.reduceat(a[order], start, axis=0) if a.shape[1] else a[:start.size]


def _reduce(cat: list) -> RegionGraph:
    """Sum statistics of duplicate (u, v) pairs; drop self-edges; orient u < v.

    ``cat`` holds the :data:`FIELDS` arrays and is consumed: each array is let go once
    used, so that the peak stays near twice the edges' size (this sums the global graph
    of a whole volume in one task)."""
    u, v = cat[0], cat[1]
    cat[0] = cat[1] = None
    keep = u != v
    every = bool(keep.all())
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    del u, v
    if not every:
        lo, hi = lo[keep], hi[keep]
    if lo.size == 0:
        return RegionGraph.empty(cat[5].shape[1], cat[6].shape[1] > 0)
    order, is_start = _sort_pairs(lo, hi)
    start = np.flatnonzero(is_start)
    del is_start
    lo, hi = lo[order][start], hi[order][start]
    sums = []
    cat[4] = _max_key(cat[4], cat.pop(7))  # the maximum and where it first occurs
    for i, op in ((2, np.add), (3, np.add), (4, np.maximum)):
        a = cat[i] if every else cat[i][keep]
        cat[i] = None
        sums.append(op.reduceat(a[order], start))
        del a
    top, at = _from_key(sums.pop())
    columns = []
    for i in (5, 6):
        a = cat[i] if every else cat[i][keep]
        cat[i] = None
        columns.append(_columns(a, order, start))
    return RegionGraph(lo, hi, *sums, top, *columns, at)


def from_observations(u: np.ndarray, v: np.ndarray, w: np.ndarray, bins: int = 0,
                      raw: np.ndarray | None = None, at: np.ndarray | None = None
                      ) -> RegionGraph:
    """Graph of single voxel-edge observations: region ``u[i]`` meets ``v[i]`` with weight
    ``w[i]`` (quantized), and optionally raw values ``raw[i]`` (of both voxels, summed)
    and the voxel edge's global index ``at[i]`` (:func:`edge_index`)."""
    u, v, w = (np.asarray(a, np.int64).ravel() for a in (u, v, w))
    r = np.zeros((u.size, 0), np.int64) if raw is None else np.asarray(
        raw, np.int64).reshape(-1, 1)
    at = np.zeros(u.size, np.int64) if at is None else np.asarray(at, np.int64).ravel()
    keep = u != v
    lo, hi, w, r = np.minimum(u, v)[keep], np.maximum(u, v)[keep], w[keep], r[keep]
    at = at[keep]
    if lo.size == 0:
        return RegionGraph.empty(bins, raw is not None)
    order, is_start = _sort_pairs(lo, hi)
    lo, hi, w, at = lo[order], hi[order], w[order], at[order]
    start = np.flatnonzero(is_start)
    n = start.size
    edge = np.cumsum(is_start) - 1
    hist = np.zeros((n, 0), np.int64)
    if bins:
        hist = np.bincount(edge * bins + w * bins // (Q + 1), minlength=n * bins)
        hist = hist.reshape(n, bins).astype(np.int64)
    top, first = _from_key(np.maximum.reduceat(_max_key(w, at), start))
    return RegionGraph(lo[start], hi[start], np.bincount(edge, minlength=n).astype(np.int64),
                       np.add.reduceat(w, start), top, hist, _columns(r, order, start), first)


def combine(graphs: list[RegionGraph], relabel: np.ndarray | None = None,
            offsets: list[tuple[int, int]] | None = None) -> RegionGraph:
    """Sum graphs; with ``offsets``, graph ``k``'s ids ``u`` and ``v`` are first moved by
    ``offsets[k]``; with ``relabel``, region ``i`` then becomes ``relabel[i]`` (edges that
    fall inside one region disappear, parallel edges add up)."""
    if not graphs:
        return RegionGraph.empty()
    cat = []
    for i, f in enumerate(FIELDS):
        parts = [getattr(g, f) for g in graphs]
        if offsets is not None and i < 2:
            parts = [p + o[i] for p, o in zip(parts, offsets, strict=True)]
        # (one graph's arrays are read, not copied: _reduce builds new ones)
        cat.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        del parts
        if relabel is not None and i < 2:
            cat[i] = relabel[cat[i]]
    return _reduce(cat)


def edge_index(d: int, begin, end, shape) -> np.ndarray:
    """Global indices of the voxel edges along axis ``d`` at the voxels ``begin:end`` of a
    volume of ``shape`` (each voxel's edge to the voxel before it on that axis):
    ``3 * (C-order voxel index) + d``, unique for every voxel edge of the volume."""
    if 3 * math.prod(shape) >= 1 << _AT_BITS:
        raise ValueError(f"a volume of {tuple(shape)} voxels has too many voxel edges to "
                         f"index (at most {(1 << _AT_BITS) // 3} voxels)")
    grids = np.meshgrid(*(np.arange(b, e, dtype=np.int64) for b, e in zip(begin, end,
                                                                          strict=True)),
                        indexing="ij", sparse=True)
    # clipped: a block padded beyond a thin volume has voxels outside it (background,
    # whose edges are never kept)
    return 3 * np.ravel_multi_index(grids, tuple(shape), mode="clip") + d


def observations(labels: np.ndarray, quantized: np.ndarray, positions: bool = False,
                 origin=None, shape=None) -> tuple[np.ndarray, ...]:
    """Voxel edges inside ``labels`` that join two different non-background regions.

    ``quantized`` holds the block's uint16 affinities (3, z, y, x) aligned with ``labels``.
    With ``positions``, also where each edge lies: the centre of the face between its two
    voxels (z, y, x, in voxels).  With ``origin`` (of ``labels`` in a volume of ``shape``),
    also each edge's global index (:func:`edge_index`).
    """
    us, vs, ws, at, where = [], [], [], [], []
    for d in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[d], lo[d] = slice(1, None), slice(None, -1)
        a, b = labels[tuple(hi)], labels[tuple(lo)]
        mask = (a != b) & (a != 0) & (b != 0)
        us.append(a[mask])
        vs.append(b[mask])
        ws.append(quantized[d][tuple(hi)][mask])
        if positions:
            face = np.stack(np.nonzero(mask), axis=1).astype(np.float64)
            face[:, d] += 0.5
            at.append(face)
        if origin is not None:
            begin = np.add(origin, [int(i == d) for i in range(3)])
            index = edge_index(d, begin, np.add(origin, labels.shape), shape)
            where.append(np.broadcast_to(index, mask.shape)[mask])
    out = np.concatenate(us), np.concatenate(vs), np.concatenate(ws).astype(np.int64)
    if positions:
        out = (*out, np.concatenate(at))
    return (*out, np.concatenate(where)) if origin is not None else out


def raw_pairs(raw: np.ndarray) -> np.ndarray:
    """(3, z, y, x) uint16, for uint8 ``raw``: at channel ``d`` and voxel ``v``, ``raw[v] + raw[v - e_d]``, the raw
    values of the two voxels of the voxel edge that affinity channel ``d`` describes there
    (0 where ``v - e_d`` lies outside)."""
    raw = np.asarray(raw, np.uint16)  # uint8 values: a sum of two fits
    out = np.zeros((3, *raw.shape), np.uint16)
    for d in range(3):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[d], lo[d] = slice(1, None), slice(None, -1)
        out[d][tuple(hi)] = raw[tuple(hi)] + raw[tuple(lo)]
    return out


def region_graph(labels: np.ndarray, affinities: np.ndarray, bins: int = 0,
                 raw: np.ndarray | None = None) -> RegionGraph:
    """Region adjacency graph of a labelled volume (in-memory kernel).

    Parameters
    ----------
    labels
        Integer regions (z, y, x); 0 is background and has no edges.
    affinities
        Nearest-neighbour affinities (3, z, y, x), float in [0, 1] or uint8 (or already
        quantized uint16).
    bins
        Histogram bins per edge (0: none; 16-64 for quantile scores).
    raw
        Optional (z, y, x) raw EM (uint8): the graph then holds its sums on the boundaries.

    Returns
    -------
    RegionGraph
        Edges between region ids as they appear in ``labels``.

    Examples
    --------
    >>> labels = np.array([[[1, 1, 2, 2]]])
    >>> affs = np.zeros((3, 1, 1, 4)); affs[2] = [0, 1.0, 0.5, 1.0]
    >>> g = region_graph(labels, affs)
    >>> g.u, g.v, g.count, g.mean
    (array([1]), array([2]), array([1]), array([0.5]))
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or np.shape(affinities) != (3, *labels.shape):
        raise ValueError(
            f"labels {labels.shape} and affinities {np.shape(affinities)} must be (z, y, x) "
            f"and (3, z, y, x)"
        )
    labels = labels.astype(np.int64)
    u, v, w, at = observations(labels, quantize_affinities(affinities), origin=(0, 0, 0),
                               shape=labels.shape)
    r = None if raw is None else observations(labels, raw_pairs(raw))[2]
    return from_observations(u, v, w, bins, r, at)


#: Face graphs (:func:`face_links`) keep the upper block's ids above this.
B_OFFSET = np.int64(1) << 40


def face_links(lower_faces, upper_faces, d: int, high_q: int, bins: int):
    """Joins and region-graph edges across the face between block A (below) and B.

    ``lower_faces`` and ``upper_faces`` are the faces of B and A (as
    :func:`emdask.segmentation._block_basins` gives them); basins join where a watershed
    pointer crosses the face or its edge is at least ``high_q``.  Returns (2, n) joined
    block-local basin ids (A's, B's) and the graph of the edges across, with B's ids moved
    up by :data:`B_OFFSET`."""
    la, up = upper_faces[("upper", d)]
    lb, down, w, at, *raw = lower_faces[("lower", d)]  # raw: the voxel edges' raw sums
    both = (la > 0) & (lb > 0)
    join = both & (up | down | (w.astype(np.int64) >= high_q))
    pairs = np.unique(np.stack([la[join] - 1, lb[join] - 1]), axis=1)
    graph = from_observations(la[both] - 1, lb[both] - 1 + B_OFFSET, w[both], bins,
                              raw[0][both] if raw else None, at[both])
    return pairs, graph
