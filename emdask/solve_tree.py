"""The global step of blockwise segmentation, solved in a tree of boxes of blocks.

The single global solve (:func:`emdask.segmentation._solve`) holds the region graph of the
whole volume.  Here, as in ABISS (Lu, Zlateski and Seung 2021), boxes of blocks are merged
pairwise up a tree; each box decides what it can from what lies inside it and passes up
only what touches its open faces, so a task holds the carried part of its children, not
the volume.  Every decision is one the global solve makes too, so the result is identical
to it for any chunking and any tree, ids included:

* **Supervoxels.**  Basins joined across a face are one supervoxel.  A supervoxel is
  *open* while it has a basin on an open face of the box (one not on the volume's edge):
  its size and edges are not all known.
* **Small-region merging** (size-dependent single linkage, strongest edge first, ties by
  where an edge's maximum occurs, which does not depend on ids) visits the box's edges in
  the global order.  An edge is decided where one of its regions is *certainly* small (its
  size and history exact) or both are already large (sizes only grow); otherwise, or if
  its statistics are partial (only between two open supervoxels), it is left for the
  level above and its regions are *uncertain*, as is any region holding an open
  supervoxel.  A large region's decisions never depend on what is unknown, so
  uncertainty spreads only through small regions.  Merges are applied in advance as
  *groups*, except those into a region whose size the level above needs at an earlier
  time (a left edge reached it while it was small): those are passed up to be replayed in
  order.  A region that ends certain is a final fragment.
* **Agglomeration** runs the ordinary kernel with uncertain regions *frozen*.  An edge
  that is the cheapest of both its regions merges in every order of such merges (costs are
  means or maxima of exact integer statistics, which a merge elsewhere can only raise at
  these regions; ties go to the pair of the regions' highest voxel indices, which only
  grow and do not depend on the chunking), so merging it early is safe; an edge that
  would merge next but touches a frozen region blocks both its regions.  Regions neither
  blocked nor frozen have every edge at or above the threshold and are finished; blocked
  ones travel up with their edges.

What travels up: the basins on the box's open faces, one row per group of an uncertain
region (and per final fragment that its edges reach), the left and replayed edges between
the rows, their other edges summed between rows, and per threshold the blocked regions and
their edges: all of it near the open faces.  On the medulla's affinities with noise
(basins of 4 voxels, median) in 512 blocks of 32^3, the largest box held 6.7 MB and a
leaf 0.7 MB; it scales with a box's faces, not its volume.  What comes down
(:func:`resolve`): each box's renames and decisions, which the relabel of a block applies
from its own box up to the root.  Output ids number fragments and segments by their lowest
voxel index, so the last step gathers the finished keys (8 bytes per segment) into one
sorted list per output.

Scores ``mean`` and ``max`` only: quantiles interpolated in histogram bins and learned
scores (whose cost depends on region sizes) lack the monotonicity the argument needs and
use the single global solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emdask.agglomerate import _merge_small, _run
from emdask.region_graph import B_OFFSET, FIELDS, RegionGraph, combine, face_links
from emdask.watershed import _union_all

__all__ = ["Box", "Carried", "Resolution", "merge_boxes", "solve", "tree"]

_NONE = np.int64(-1)


@dataclass
class Carried:
    """What a box passes up (all ids are global basin keys: lowest voxel index)."""

    face_key: np.ndarray  # basins on the box's open faces
    face_side: np.ndarray  # their sides (bit 2 * axis + upper)
    face_sv: np.ndarray  # their supervoxel
    sv_key: np.ndarray  # supervoxels in play, sorted
    sv_size: np.ndarray
    sv_rank: np.ndarray  # highest voxel index (breaks ties in agglomeration)
    sv_comp: np.ndarray  # the row's own key (a group of an uncertain region), or -1: in a
    # final fragment (carried for the agglomeration only)
    sv_region: np.ndarray  # (thresholds, n): a final one's region, -1 where finished
    undecided: RegionGraph  # edges left for small-region merging, and merges to replay
    decided: RegionGraph  # their other edges (complete)
    region_key: list = field(default_factory=list)  # per threshold: blocked regions
    region_rank: list = field(default_factory=list)
    region_graph: list = field(default_factory=list)  # per threshold: edges between them

    @property
    def nbytes(self) -> int:
        arrays = [self.face_key, self.face_side, self.face_sv, self.sv_key, self.sv_size,
                  self.sv_rank, self.sv_comp, self.sv_region, *self.region_key,
                  *self.region_rank]
        return (sum(a.nbytes for a in arrays) + self.undecided.nbytes + self.decided.nbytes
                + sum(g.nbytes for g in self.region_graph))


@dataclass
class Resolution:
    """What a box decided, for the relabel of its blocks (key arrays sorted)."""

    sv_from: np.ndarray  # supervoxels joined or collapsed into a row here: old -> new key
    sv_to: np.ndarray
    frag_sv: np.ndarray  # supervoxels whose fragment was decided here -> fragment (-1 dust)
    frag_key: np.ndarray
    reg_from: list  # per threshold: regions merged here, old key -> new key
    reg_to: list
    done: list  # per threshold: keys of segments finished here
    n_basins: int = 0  # basins of the block (a block's own box)
    n_joined: int = 0  # supervoxels joined into others here (across the faces)
    n_edges: int = 0  # edges that end here (decided, not passed up; parallel edges between
    # carried rows count once, so the sum is close to, not exactly, the global graph's)
    nbytes: int = 0  # the state this box held: what its children passed up, and its own

    @property
    def n_fragments(self) -> int:
        return int(np.unique(self.frag_key[self.frag_key >= 0]).size
                   + np.count_nonzero(self.frag_key < 0))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray,
            default: np.ndarray | int | None = None) -> np.ndarray:
    """``values`` at ``query`` in sorted ``keys``; ``default`` (the query itself if None)
    where absent."""
    at = np.searchsorted(keys, query)
    at = np.minimum(at, max(keys.size - 1, 0))
    hit = (keys[at] == query) if keys.size else np.zeros(query.shape, bool)
    out = np.array(query if default is None else np.broadcast_to(default, query.shape),
                   dtype=values.dtype, copy=True)
    out[hit] = values[at[hit]]
    return out


def _in(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    return _lookup(keys, np.ones(keys.size, bool), query, False)


def _renamed(graph: RegionGraph, old: np.ndarray, new: np.ndarray) -> RegionGraph:
    """The graph with ids ``old`` (sorted) renamed ``new`` (not re-summed: its statistics
    are shared, not copied)."""
    return graph.relabeled(_lookup(old, new, graph.u), _lookup(old, new, graph.v))


def _relabel(graph: RegionGraph, old: np.ndarray, new: np.ndarray) -> RegionGraph:
    """The graph with ids ``old`` (sorted) renamed ``new``, parallel edges summed."""
    if not len(graph):
        return graph
    return combine([_renamed(graph, old, new)])


def _keyed(graph: RegionGraph, keys: np.ndarray) -> RegionGraph:
    """The graph between indices into ``keys`` as a graph between the keys."""
    return graph.relabeled(keys[graph.u], keys[graph.v])


def _concat(graphs: list[RegionGraph]) -> RegionGraph:
    """The edges of ``graphs`` one after the other (no summing)."""
    return RegionGraph(*(np.concatenate([getattr(g, f) for g in graphs]) for f in FIELDS))


def _cat(graphs: list[RegionGraph]) -> RegionGraph:
    graphs = [g for g in graphs if len(g)]
    return combine(graphs) if graphs else RegionGraph.empty()


def leaf(first: np.ndarray, sizes: np.ndarray, last: np.ndarray, graph: RegionGraph,
         faces: dict, n_thresholds: int) -> Carried:
    """A block's summary as the child of its own box: every basin is a supervoxel that may
    be open, every edge undecided.  ``faces[("lower"|"upper", axis)][0]`` are the labels on
    the block's faces (block-local ids from 1, as :func:`emdask.segmentation._block_basins`
    gives them)."""
    keys, sides = [], []
    for (side, d), parts in faces.items():
        labels = np.unique(parts[0])
        labels = labels[labels > 0]
        keys.append(first[labels - 1])
        sides.append(np.full(labels.size, 1 << (2 * d + (side == "upper")), np.uint8))
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    side = np.concatenate(sides) if sides else np.zeros(0, np.uint8)
    order = np.argsort(key, kind="stable")
    key, side = key[order], side[order]
    if key.size:  # a basin on several faces: one row, its sides or-ed
        start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        key, side = key[start], np.bitwise_or.reduceat(side, start)
    first = np.asarray(first, np.int64)
    order = np.argsort(first)
    n, bins = first.size, graph.hist.shape[1]
    edges = graph.relabeled(first[graph.u], first[graph.v])
    empty = [RegionGraph.empty(bins)] * n_thresholds
    return Carried(key, side.astype(np.uint8), key.copy(), first[order],
                   np.asarray(sizes, np.int64)[order], np.asarray(last, np.int64)[order],
                   first[order],
                   np.full((n_thresholds, n), _NONE),
                   combine([edges]) if len(edges) else RegionGraph.empty(bins),
                   RegionGraph.empty(bins), [np.zeros(0, np.int64)] * n_thresholds,
                   [np.zeros(0, np.int64)] * n_thresholds, empty)


def merge_boxes(parts: list[Carried], keep_sides: list[int], joins: np.ndarray,
                cross: RegionGraph, params, thresholds, score: str = "mean"
                ) -> tuple[Carried, Resolution]:
    """Merge the boxes ``parts`` into their parent box.

    Parameters
    ----------
    parts
        The children (for a block: :func:`leaf` of it, alone).  The list is emptied once
        they are merged, so that their arrays go then where the caller keeps no other
        reference to them.
    keep_sides
        Per child, the side bits of its faces that are open faces of the parent.
    joins
        (2, n) basin keys joined across the faces between the children.
    cross
        Region-graph edges across those faces, between basin keys.
    params
        :class:`emdask.watershed.WatershedParams` (size, merge and dust thresholds).
    thresholds, score
        As for :func:`emdask.agglomerate.agglomerate` (``mean`` or ``max``).
    """
    n_thr = len(thresholds)
    bins = cross.hist.shape[1]
    held = sum(p.nbytes for p in parts) + cross.nbytes
    # -- supervoxels: union across the faces; a face row stays if its side is still open
    face_key = np.concatenate([p.face_key for p in parts])
    face_sv = np.concatenate([p.face_sv for p in parts])
    face_side = np.concatenate([p.face_side & np.uint8(m) for p, m in zip(parts, keep_sides,
                                                                         strict=True)])
    order = np.argsort(face_key)
    face_key, face_sv, face_side = face_key[order], face_sv[order], face_side[order]
    sv_key = np.concatenate([p.sv_key for p in parts])
    order = np.argsort(sv_key)
    sv_key = sv_key[order]
    sv_size, sv_rank, sv_comp = (np.concatenate([getattr(p, f) for p in parts])[order]
                                 for f in ("sv_size", "sv_rank", "sv_comp"))
    sv_region = np.concatenate([p.sv_region for p in parts], axis=1)[:, order]
    n = sv_key.size
    parent = np.arange(n)
    if joins.size:
        a = np.searchsorted(sv_key, _lookup(face_key, face_sv, joins[0]))
        b = np.searchsorted(sv_key, _lookup(face_key, face_sv, joins[1]))
        parent = _union_all(n, a, b)  # roots: lowest index, i.e. lowest key
    renamed = parent != np.arange(n)
    n_joined = int(np.count_nonzero(renamed))
    sv_from, sv_to = sv_key[renamed], sv_key[parent[renamed]]
    roots = np.flatnonzero(~renamed)
    sv_size = np.bincount(parent, sv_size, n).astype(np.int64)[roots]
    rank = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(rank, parent, sv_rank)
    # every row is a group of its own (rows in play: sv_comp >= 0); a joined supervoxel was
    # open, so in play, with no final region
    in_comp = np.zeros(n, bool)
    in_comp[parent[sv_comp != _NONE]] = True
    in_comp = in_comp[roots]
    sv_rank, sv_region = rank[roots], sv_region[:, roots]
    sv_key = sv_key[roots]
    del parent, renamed, roots, rank  # (the children's numbering: held no longer)
    n = sv_key.size
    comp = np.arange(n)
    face_sv = _lookup(sv_from, sv_to, face_sv)
    open_sv = _in(np.unique(face_sv[face_side > 0]), sv_key)

    # -- the supervoxel graph (renamed, then summed once: sums do not depend on grouping)
    undecided = _cat([_renamed(p.undecided, sv_from, sv_to) for p in parts]
                     + [_renamed(cross, face_key, face_sv)])
    decided = _cat([_renamed(p.decided, sv_from, sv_to) for p in parts])
    # the children's blocked regions, per threshold; the rest of them is merged by now
    child_regions = [[(p.region_key[t], p.region_rank[t], p.region_graph[t]) for p in parts]
                     for t in range(n_thr)]
    parts.clear()
    if not len(undecided):
        undecided = RegionGraph.empty(bins)
    if not len(decided):
        decided = RegionGraph.empty(bins)
    ui, vi = np.searchsorted(sv_key, undecided.u), np.searchsorted(sv_key, undecided.v)
    # an edge gains statistics above only between two open supervoxels: the voxels of a
    # supervoxel beyond the box touch only open ones (its order, by the maximum and where
    # it occurs, does not depend on ids)
    partial = open_sv[ui] & open_sv[vi]

    # -- small-region merging over the uncertain regions of the children
    # (a partial edge, which may fall anywhere in the order, joins two open supervoxels:
    # uncertain from the start)
    uncertain = open_sv.copy()
    root, uncertain, left, replay, contracted = _merge_small(
        undecided.relabeled(ui, vi), comp, sv_size, params.size_threshold,
        params.merge_threshold, uncertain, partial)
    final = in_comp & ~uncertain
    frag_size = np.bincount(root, sv_size, n).astype(np.int64)
    dust = final & (frag_size[root] < params.dust_size)
    frag_rank = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(frag_rank, root, sv_rank)
    frag_sv = sv_key[final]
    frag_key = np.where(dust, _NONE, sv_key[root])[final]
    del comp, open_sv, frag_size

    # -- agglomeration, one run per threshold (the children's states differ per threshold)
    # every supervoxel edge as an edge between entities: frozen uncertain regions, new
    # fragments, and the children's blocked regions
    n_und = len(undecided)
    edges = _concat([undecided, decided])  # (the undecided edges first)
    del undecided, decided, ui, vi
    # the ends as supervoxel indices (int32), in place of their keys (sv_key[eu]) while
    # the edges are held
    eu = np.searchsorted(sv_key, edges.u).astype(np.int32)
    ev = np.searchsorted(sv_key, edges.v).astype(np.int32)
    edges = edges.relabeled(eu, ev)
    frozen_key = np.unique(sv_key[root[in_comp & uncertain]])
    new_key = np.unique(sv_key[root[final & ~dust]])
    reg_from, reg_to, done, region_key, region_rank, region_graph = [], [], [], [], [], []
    new_region = np.full((n_thr, n), _NONE)
    for t in range(n_thr):
        def entity(i, t=t):
            """Entity key of supervoxels ``i`` at threshold t (-1: leave the edge out)."""
            own = sv_key[root[i]]
            return np.where(in_comp[i], np.where(dust[i], _NONE, own), sv_region[t, i])

        # the edges between two entities (summing drops the others: an end left out, or
        # both in one entity)
        ent = entity(np.arange(n))
        ku, kv = ent[eu], ent[ev]
        sel = np.flatnonzero((ku != kv) & (ku != _NONE) & (kv != _NONE))
        ku, kv = ku[sel], kv[sel]
        children, child_regions[t] = child_regions[t], None
        child_key = np.concatenate([c[0] for c in children])
        child_rank = np.concatenate([c[1] for c in children])
        keys = np.concatenate([child_key, new_key, frozen_key])
        ranks = np.concatenate([child_rank, frag_rank[np.searchsorted(sv_key, new_key)],
                                frag_rank[np.searchsorted(sv_key, frozen_key)]])
        order = np.argsort(keys)
        keys, ranks = keys[order], ranks[order]
        frozen = _in(frozen_key, keys)
        graph = _cat([c[2] for c in children] + [edges.select(sel).relabeled(ku, kv)])
        del children, ku, kv, sel
        local = graph.relabeled(np.searchsorted(keys, graph.u), np.searchsorted(keys, graph.v))
        if not len(graph):
            local = RegionGraph.empty(bins)
        del graph  # (each threshold's graphs go before the next one's are built)
        reps, _, _, blocked = _run(local, keys.size, [thresholds[t]], score, None, None,
                                   None, rank=ranks, frozen=frozen)
        reps, blocked = reps[0], blocked[0]
        group = np.full(keys.size, np.iinfo(np.int64).max)
        np.minimum.at(group, reps, keys)
        group = group[reps]  # each entity's region: its lowest key
        moved = (group != keys) & ~frozen
        reg_from.append(keys[moved])
        reg_to.append(group[moved])
        finished = ~blocked & ~frozen
        done.append(np.unique(group[finished]))
        waiting = blocked & ~frozen
        wait_key = np.unique(group[waiting])
        g_rank = np.full(keys.size, np.iinfo(np.int64).min)
        np.maximum.at(g_rank, reps, ranks)
        region_key.append(wait_key)
        region_rank.append(_lookup(keys, g_rank[reps], wait_key))
        between = combine([local.relabeled(group[local.u], group[local.v])]
                          ) if len(local) else RegionGraph.empty(bins)
        del local
        both = _in(wait_key, between.u) & _in(wait_key, between.v)
        region_graph.append(between.select(both))
        del between
        # the region at t of every final supervoxel (-1 where finished)
        reg = _lookup(keys, group, ent, _NONE)
        new_region[t] = np.where(_in(wait_key, reg), reg, _NONE)

    # -- what travels up: uncertain regions' supervoxels and edges, and the final
    # supervoxels those edges reach while their region waits at some threshold
    unc = in_comp & uncertain
    waits = (new_region != _NONE).any(axis=0) & ~unc
    internal = (root[eu] == root[ev]) & in_comp[eu] & in_comp[ev]
    carried = ((unc[eu] & (unc[ev] | waits[ev])) | (unc[ev] & waits[eu])) & ~internal
    left |= partial  # partial edges are summed with their other parts above: undecided
    # (a left edge joins two uncertain regions; a replayed merge lies inside one)
    still = (left & carried[:n_und]) | replay
    dec = carried.copy()
    dec[:n_und] &= ~still
    keep_sv = unc.copy()
    keep_sv[eu[carried]] = True
    keep_sv[ev[carried]] = True
    # each group travels as one row under its lowest key: an uncertain region's groups
    # (the merges applied in advance) and a final fragment's carried supervoxels.  Edge
    # order does not depend on ids, and the first of parallel edges decides for all of
    # them, so their edges are summed between the rows.
    group = np.where(unc, contracted, root)[keep_sv]
    rows, row = np.unique(group, return_inverse=True)
    row_key = sv_key[rows]
    collapsed = sv_key[keep_sv] != row_key[row]
    old, new = sv_key[keep_sv][collapsed], row_key[row][collapsed]
    row_rank = np.full(rows.size, np.iinfo(np.int64).min)
    np.maximum.at(row_rank, row, sv_rank[keep_sv])
    # renames of this box: joins first, then the collapse (their keys are disjoint)
    sv_to = _lookup(old, new, sv_to)
    order = np.argsort(np.concatenate([sv_from, old]))
    sv_from, sv_to = np.concatenate([sv_from, old])[order], np.concatenate([sv_to, new])[order]
    up = Carried(
        face_key[face_side > 0], face_side[face_side > 0],
        _lookup(old, new, face_sv[face_side > 0]), row_key,
        np.bincount(row, sv_size[keep_sv], rows.size).astype(np.int64), row_rank,
        np.where(unc[rows], row_key, _NONE), new_region[:, rows],
        _relabel(_keyed(edges.select(np.flatnonzero(still)), sv_key), old, new),
        _relabel(_keyed(edges.select(dec), sv_key), old, new),
        region_key, region_rank, region_graph)
    held += up.nbytes
    return up, Resolution(sv_from, sv_to, frag_sv, frag_key, reg_from, reg_to, done,
                          n_joined=n_joined,
                          n_edges=int(len(edges) - np.count_nonzero(carried)), nbytes=held)


def resolve(keys: np.ndarray, path: list[Resolution], n_thresholds: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Basin keys of a block -> (fragment key, segment key per threshold; -1 for dust),
    through the resolutions of its boxes from its own up to the root."""
    sv = np.asarray(keys, np.int64).copy()
    frag = np.full(sv.size, -2, np.int64)  # -2: not decided yet
    seg = np.full((n_thresholds, sv.size), -2, np.int64)
    fin = np.zeros((n_thresholds, sv.size), bool)
    for res in path:
        pending = frag == -2
        sv[pending] = _lookup(res.sv_from, res.sv_to, sv[pending])
        got = pending & _in(res.frag_sv, sv)
        frag[got] = _lookup(res.frag_sv, res.frag_key, sv[got])
        seg[:, got] = frag[got]
        fin[:, got & (frag == -1)] = True
        for t in range(n_thresholds):
            live = (frag >= 0) & ~fin[t]
            seg[t, live] = _lookup(res.reg_from[t], res.reg_to[t], seg[t, live])
            fin[t, live] = _in(res.done[t], seg[t, live])
    if not fin.all():
        raise RuntimeError("the tree left regions undecided at its root: a bug")
    return frag, seg


def _bit(d: int, upper: bool) -> int:
    return 1 << (2 * d + int(upper))


@dataclass
class Box:
    """A node of the tree: blocks ``lo`` to ``hi`` (grid indices, end exclusive)."""

    lo: tuple
    hi: tuple
    open_sides: int  # side bits of faces not on the volume's edge
    children: tuple = ()  # indices of the two halves in the tree's list
    axis: int = -1  # the halves meet at block ``mid`` on this axis
    mid: int = -1
    block: int = -1  # a single block's id (C order)


def tree(grid: tuple) -> list[Box]:
    """The boxes of the tree over a block grid, children before parents (the root last):
    each box splits in halves along its longest axis (in blocks)."""
    ids = np.arange(int(np.prod(grid))).reshape(grid)
    boxes: list[Box] = []

    def visit(lo, hi) -> int:
        sides = sum(_bit(d, False) for d in range(3) if lo[d] > 0) + sum(
            _bit(d, True) for d in range(3) if hi[d] < grid[d])
        extent = [h - low for low, h in zip(lo, hi, strict=True)]
        if max(extent) == 1:
            boxes.append(Box(tuple(lo), tuple(hi), sides, block=int(ids[tuple(lo)])))
            return len(boxes) - 1
        d = int(np.argmax(extent))
        mid = lo[d] + extent[d] // 2
        first_hi, second_lo = list(hi), list(lo)
        first_hi[d], second_lo[d] = mid, mid
        children = (visit(lo, first_hi), visit(second_lo, hi))
        boxes.append(Box(tuple(lo), tuple(hi), sides, children, d, mid))
        return len(boxes) - 1

    visit([0, 0, 0], list(grid))
    return boxes


def paths(boxes: list[Box]) -> dict[int, list[int]]:
    """Block id -> the indices of its boxes, its own first and the root last."""
    parent = {c: i for i, box in enumerate(boxes) for c in box.children}
    out = {}
    for i, box in enumerate(boxes):
        if box.block >= 0:
            chain = [i]
            while chain[-1] in parent:
                chain.append(parent[chain[-1]])
            out[box.block] = chain
    return out


def to_arrays(state: Carried | Resolution) -> dict[str, np.ndarray]:
    """A box's state or resolution as named plain arrays (for an ``.npz``)."""
    from dataclasses import fields

    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        items = value if isinstance(value, list) else [value]
        names = [f"{f.name}.{t}" for t in range(len(items))] if isinstance(
            value, list) else [f.name]
        if isinstance(value, list):
            out[f"{f.name}.n"] = np.array(len(items))
        for name, item in zip(names, items, strict=True):
            if isinstance(item, RegionGraph):
                out.update({f"{name}.{k}": getattr(item, k) for k in FIELDS})
            else:
                out[name] = np.asarray(item)
    return out


def from_arrays(cls, arrays: dict[str, np.ndarray]):
    """The inverse of :func:`to_arrays`."""
    from dataclasses import fields

    def one(name):
        if f"{name}.u" in arrays:
            return RegionGraph(*(arrays[f"{name}.{k}"] for k in FIELDS))
        value = arrays[name]
        return value.item() if value.ndim == 0 else value

    kwargs = {}
    for f in fields(cls):
        if f"{f.name}.n" in arrays:
            kwargs[f.name] = [one(f"{f.name}.{t}") for t in range(int(arrays[f"{f.name}.n"]))]
        elif f.name in arrays or f"{f.name}.u" in arrays:
            kwargs[f.name] = one(f.name)
    return cls(**kwargs)


def plane_faces(box: Box, grid: tuple) -> list[tuple[int, int, int]]:
    """(lower block, upper block, axis) of every face on the plane between its halves."""
    ids = np.arange(int(np.prod(grid))).reshape(grid)
    span = [slice(a, b) for a, b in zip(box.lo, box.hi, strict=True)]
    span[box.axis] = slice(box.mid, box.mid + 1)
    upper = ids[tuple(span)].ravel()
    span[box.axis] = slice(box.mid - 1, box.mid)
    lower = ids[tuple(span)].ravel()
    return [(int(a), int(b), box.axis) for a, b in zip(lower, upper, strict=True)]


def face_keys(upper_faces: dict, lower_faces: dict, upper_first: np.ndarray,
              lower_first: np.ndarray, d: int, high_q: int, bins: int):
    """:func:`emdask.region_graph.face_links` between a block and the one below it, in
    basin keys: (2, n) joined pairs and the graph across the face."""
    joined, g = face_links(upper_faces, lower_faces, d, high_q, bins)
    lower_first, upper_first = np.asarray(lower_first), np.asarray(upper_first)
    return (np.stack([lower_first[joined[0]], upper_first[joined[1]]]),
            g.relabeled(lower_first[g.u], upper_first[g.v - B_OFFSET]))


def leaf_box(basin_info, graph: RegionGraph, faces: dict, box: Box, params, thresholds,
             score: str) -> tuple[Carried, Resolution]:
    """The box of one block: what its summary decides on its own."""
    child = leaf(basin_info[0], basin_info[1], basin_info[3], graph, faces, len(thresholds))
    up, res = merge_boxes([child], [box.open_sides], np.zeros((2, 0), np.int64),
                          RegionGraph.empty(graph.hist.shape[1]), params, thresholds, score)
    res.n_basins = int(np.size(basin_info[0]))
    return up, res


def inner_box(halves: list[Carried], links: list, box: Box, params, thresholds,
              score: str) -> tuple[Carried, Resolution]:
    """A box from its two halves (a list that :func:`merge_boxes` empties) and the
    :func:`face_keys` links of the plane between."""
    keep = [box.open_sides & ~_bit(box.axis, True), box.open_sides & ~_bit(box.axis, False)]
    joins = np.concatenate([lk[0] for lk in links] + [np.zeros((2, 0), np.int64)], axis=1)
    return merge_boxes(halves, keep, joins, _cat([lk[1] for lk in links]), params,
                       thresholds, score)


def finished(res: Resolution) -> tuple[np.ndarray, list[np.ndarray]]:
    """The keys of the fragments and segments a box finished (what :func:`numbering`
    gathers of it)."""
    return np.unique(res.frag_key[res.frag_key >= 0]), res.done


def numbering(keys: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """The keys of every fragment and, per threshold, every segment, sorted, from the
    boxes' :func:`finished`: output ids are ranks + 1.  The one step that gathers the
    whole volume: 8 bytes per fragment and per segment."""
    frag = np.unique(np.concatenate([k[0] for k in keys]))
    n_thr = len(keys[0][1])
    return frag, [np.unique(np.concatenate([k[1][t] for k in keys])) for t in range(n_thr)]


def counts(res: Resolution) -> np.ndarray:
    """A box's share of the problem's sizes: basins, supervoxels, fragments, edges, and
    the bytes it held (:func:`totals` adds them up)."""
    return np.array([res.n_basins, res.n_basins - res.n_joined, res.n_fragments,
                     res.n_edges, res.nbytes], np.int64)


def totals(parts: list) -> tuple:
    """(basins, supervoxels, fragments, edges, largest bytes one box held)."""
    a = np.stack(parts)
    return (*(int(x) for x in a[:, :4].sum(axis=0)), int(a[:, 4].max()))


def block_lut(first: np.ndarray, path: list[Resolution], numbers) -> np.ndarray:
    """(outputs, basins) uint64: a block's basins -> fragment id, then segment id per
    threshold (0: dust), from the resolutions of its boxes (its own first, the root last)."""
    frag_keys, seg_keys = numbers
    frag, seg = resolve(first, path, len(seg_keys))

    def ids(keys, known):
        return np.where(keys >= 0, np.searchsorted(known, keys) + 1, 0).astype(np.uint64)

    return np.stack([ids(frag, frag_keys)] + [ids(s, k) for s, k in zip(seg, seg_keys,
                                                                          strict=True)])


def solve(basin_info: list, block_graphs: list, faces: list, grid: tuple, params,
          thresholds, score: str = "mean", high_q: int | None = None, bins: int = 0):
    """The tree solve in one process (for tests and small volumes): the lookup tables
    of :func:`emdask.segmentation._solve` (one row per output, blocks in C order), the
    blocks' offsets into them, and the largest state a box passed up (bytes)."""
    if high_q is None:
        high_q = params.quantized()[1]
    boxes = tree(grid)
    done: list = []
    paths: dict[int, list] = {}
    largest = 0
    for box in boxes:
        if box.block >= 0:
            b = box.block
            up, res = leaf_box(basin_info[b], block_graphs[b], faces[b], box, params,
                               thresholds, score)
            members = [b]
        else:
            links = [face_keys(faces[u], faces[lw], basin_info[u][0], basin_info[lw][0], d,
                               high_q, bins) for lw, u, d in plane_faces(box, grid)]
            up, res = inner_box([done[c][0] for c in box.children], links, box, params,
                                thresholds, score)
            members = done[box.children[0]][1] + done[box.children[1]][1]
        for b in members:
            paths.setdefault(b, []).append(res)
        done.append((up, members, res))
        largest = max(largest, up.nbytes)
    numbers = numbering([finished(d[2]) for d in done])
    luts = np.concatenate([block_lut(basin_info[b][0], paths[b], numbers)
                           for b in range(len(basin_info))], axis=1)
    bases = np.concatenate([[0], np.cumsum([np.size(i[0]) for i in basin_info])])
    return luts, bases, largest
