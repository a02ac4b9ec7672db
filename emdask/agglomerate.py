"""Agglomeration on the region graph: small-region merging and hierarchical merging.

Both kernels work on a :class:`~emdask.region_graph.RegionGraph` over regions ``0..n-1``
and return, for every region, the region it is merged into.  They run in Numba and never
touch voxels, so their cost is set by the size of the graph, not of the volume.

Determinism: the kernels are pure functions of the graph.  Regions and edges are ordered
canonically by the caller (:mod:`emdask.segmentation` orders regions by their lowest global
voxel index), edge scores are computed from exact integer sums, and ties are broken by where
an edge's maximum occurs (small-region merging) or by the regions' ranks (agglomeration),
so the same graph always gives the same merges, however the volume was chunked.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from emdask.region_graph import RegionGraph
from emdask.watershed import Q, _find

__all__ = ["EdgeClassifier", "agglomerate", "load_classifier", "merge_small_regions",
           "parse_score"]

_SCORES = {"mean": 0, "max": 1, "quantile": 2, "learned": 3}


def parse_score(score: str) -> tuple[int, float]:
    """``"mean"``, ``"max"``, ``"median"`` or ``"quantile-75"`` -> (code, quantile)."""
    if score in ("mean", "max", "learned"):
        return _SCORES[score], 0.0
    if score == "median":
        return _SCORES["quantile"], 0.5
    if score.startswith("quantile-"):
        try:
            q = float(score.split("-", 1)[1]) / 100
        except ValueError:
            q = -1.0
        if 0 < q < 1:
            return _SCORES["quantile"], q
    raise ValueError(
        f"unknown score {score!r}; use 'mean', 'max', 'median', 'quantile-NN' (0 < NN < 100) "
        "or 'learned'"
    )


@njit(cache=True)
def _merge_small_kernel(eu, ev, emax, order, parent, sizes, size_threshold, merge_q,
                        uncertain, partial):
    """Size-dependent single linkage from a partition (``parent``, sizes at the roots).

    In the hierarchical solve some regions' sizes and edges are not all known yet
    (``uncertain`` at their roots, their sizes lower bounds; ``partial`` edges, whose
    statistics are incomplete, may fall anywhere in the order).  An edge merges two
    regions if either is smaller than ``size_threshold`` when it is visited, so it is
    decided wherever one side is *certainly* small (a certain region's size and history
    are exact) and, as sizes only grow, wherever both are already large.  Any other edge
    that could merge is left for the level above, and both its regions become uncertain:
    what they are depends on it.  A large region stays large, so its own decisions stay
    known; uncertainty spreads only through small regions.

    A merge into a region whose size the level above needs at an earlier time (a left
    edge or an unknown one touched it while it was small: it is *sensitive*) must be
    replayed there in order: it is ``replay``-flagged.  Every other merge can be applied
    in advance (``contracted``, a partition that the level above starts from).

    Returns the roots, each region's uncertainty, which edges were left, which merges
    must be replayed, and the contracted roots."""
    parent, size, uncertain = parent.copy(), sizes.copy(), uncertain.copy()
    contracted = parent.copy()
    sensitive = uncertain & (sizes < size_threshold)
    left = np.zeros(eu.size, np.bool_)
    replay = np.zeros(eu.size, np.bool_)
    for e in order:
        a, b = _find(parent, eu[e]), _find(parent, ev[e])
        if a == b:
            continue
        if size[a] >= size_threshold and size[b] >= size_threshold:
            continue  # never merges
        if not partial[e] and emax[e] < merge_q:
            continue
        small_a = size[a] < size_threshold and not uncertain[a]
        small_b = size[b] < size_threshold and not uncertain[b]
        if partial[e] or not (small_a or small_b):
            # needs a size (or a place in the order) not known yet
            left[e] = True
            uncertain[a] = True
            uncertain[b] = True
            sensitive[a] |= size[a] < size_threshold
            sensitive[b] |= size[b] < size_threshold
            continue
        keep, gone = min(a, b), max(a, b)
        if sensitive[a] or sensitive[b]:
            replay[e] = True
        else:
            ca, cb = _find(contracted, eu[e]), _find(contracted, ev[e])
            contracted[max(ca, cb)] = min(ca, cb)
        parent[gone] = keep
        size[keep] += size[gone]
        uncertain[keep] = uncertain[keep] or uncertain[gone]
        sensitive[keep] = sensitive[keep] or sensitive[gone]
    for i in range(parent.size):
        parent[i] = _find(parent, i)
        contracted[i] = _find(contracted, i)
    return parent, uncertain[parent], left, replay, contracted


def merge_small_regions(
    graph: RegionGraph,
    sizes: np.ndarray,
    size_threshold: int,
    merge_threshold: float,
) -> np.ndarray:
    """Size-dependent single linkage (Zlateski and Seung 2015).

    Edges are visited from the strongest (maximum affinity) down to ``merge_threshold``,
    ties by where their maximum first occurs (:meth:`RegionGraph.order`, the same for any
    chunking and numbering); an edge merges its two regions if either is smaller than
    ``size_threshold`` voxels.

    Returns
    -------
    numpy.ndarray
        ``root[i]``: the lowest-numbered region that region ``i`` was merged with.
    """
    n = len(sizes)
    no = np.zeros(n, np.bool_)
    return _merge_small(graph, np.arange(n), np.asarray(sizes, np.int64), size_threshold,
                        merge_threshold, no, np.zeros(len(graph), np.bool_))[0]


def _merge_small(graph: RegionGraph, parent, sizes, size_threshold: int,
                 merge_threshold: float, uncertain, partial):
    """:func:`_merge_small_kernel` with the edges in their order."""
    merge_q = int(np.ceil(merge_threshold * Q - 1e-9))
    # strongest edges first, ties by where their maximum occurs (not by ids, which the
    # hierarchical solve does not know for good until the end)
    order = graph.order()
    return _merge_small_kernel(graph.u, graph.v, graph.max, order, np.asarray(parent, np.int64),
                               np.asarray(sizes, np.int64), int(size_threshold), merge_q,
                               uncertain, partial)


#: What the learned score sees of an edge (see :func:`_features`); all of it follows from
#: additive statistics, so it is the same for any chunking.
FEATURES = ("mean", "max", "q10", "q25", "q50", "q75", "q90", "log_boundary", "log_smaller",
            "log_larger", "contact", "raw_boundary", "raw_smaller", "raw_larger", "raw_contrast")
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Histogram bins of the region graph for the learned score (unless its classifier says).
LEARNED_BINS = 16
#: Cost levels at which a learned agglomeration rescores every edge whose regions grew.
_LEVELS = 128.0


@njit(cache=True)
def _quantile(e, count, hist, q):
    """Quantile ``q`` of an edge's affinities from its histogram, in [0, 1]."""
    bins = hist.shape[1]
    target = q * count[e]
    cum = 0.0
    for b in range(bins):
        c = hist[e, b]
        if c > 0 and cum + c >= target:
            return (b + (target - cum) / c) / bins  # interpolate inside the bin
        cum += c
    return 1.0


@njit(cache=True)
def _features(e, a, b, count, total, emax, hist, eraw, region, out):
    """The features of edge ``e`` between regions ``a`` and ``b`` (:data:`FEATURES`)."""
    out[0] = total[e] / (count[e] * 65535.0)
    out[1] = emax[e] / 65535.0
    for i in range(len(_QUANTILES)):
        out[2 + i] = _quantile(e, count, hist, _QUANTILES[i])
    s, g = (a, b) if region[a, 0] <= region[b, 0] else (b, a)  # smaller, larger
    out[7] = np.log(count[e])
    out[8] = np.log(region[s, 0])
    out[9] = np.log(region[g, 0])
    # boundary against the smaller region's surface scale: a fragment wrapped by its
    # neighbour shares most of its surface with it
    out[10] = count[e] / region[s, 0] ** (2.0 / 3.0)
    # raw EM (0 where not given): a membrane is darker than the cells it parts
    # eraw: both voxels of each voxel edge (empty without raw)
    out[11] = (eraw[e] if eraw.size else 0) / (count[e] * 510.0)
    out[12] = region[s, 1] / (region[s, 0] * 255.0)
    out[13] = region[g, 1] / (region[g, 0] * 255.0)
    out[14] = min(out[12], out[13]) - out[11]


@njit(cache=True)
def _forest(x, forest):
    """Probability from a gradient-boosted tree ensemble (``x <= threshold`` goes left)."""
    feature, threshold, left, right, value, base = forest
    f = base
    for t in range(feature.shape[0]):
        node = 0
        while left[t, node] >= 0:
            if x[feature[t, node]] <= threshold[t, node]:
                node = left[t, node]
            else:
                node = right[t, node]
        f += value[t, node]
    return 1.0 / (1.0 + np.exp(-f))


@njit(cache=True)
def _cost(e, a, b, count, total, emax, hist, eraw, region, code, q, forest, x):
    """Merge cost of edge ``e`` between ``a`` and ``b``: 1 - its score."""
    if code == 0:
        return 1.0 - total[e] / (count[e] * 65535.0)
    if code == 1:
        return 1.0 - emax[e] / 65535.0
    if code == 2:
        return 1.0 - _quantile(e, count, hist, q)
    _features(e, a, b, count, total, emax, hist, eraw, region, x)
    return 1.0 - _forest(x, forest)


@njit(cache=True)
def _pair(rank, a, b):
    return (rank[a], rank[b]) if rank[a] <= rank[b] else (rank[b], rank[a])


# The agglomeration kernel's adjacency: which edge joins two regions, and every region's
# edges.  A typed dict per region cost about 300 bytes a region even when small (120 MB
# in a box of the tree solve at 512 blocks) and 19 us an edge; flat arrays instead: one
# open-addressing table of edge ids keyed by their regions (-1 empty, -2 deleted), and
# per region a linked list of edge ends (end 2e + 0 at eu[e], 2e + 1 at ev[e]).
_EMPTY, _DELETED = -1, -2


@njit(cache=True)
def _slot(a, b, mask):
    """Where the probe for the edge between regions ``a`` and ``b`` starts."""
    lo, hi = np.uint64(min(a, b)), np.uint64(max(a, b))
    h = lo * np.uint64(0x9E3779B97F4A7C15) ^ hi * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(mask))


@njit(cache=True)
def _lookup_edge(table, eu, ev, a, b):
    """The slot of ``table`` that holds the edge between regions ``a`` and ``b``, or -1."""
    mask = table.size - 1
    i = _slot(a, b, mask)
    while True:
        f = table[i]
        if f == _EMPTY:
            return -1
        if f >= 0 and ((eu[f] == a and ev[f] == b) or (eu[f] == b and ev[f] == a)):
            return i
        i = (i + 1) & mask


@njit(cache=True)
def _insert_edge(table, eu, ev, f):
    """Put edge ``f`` (not in the table) in the table; 1 if it took an empty slot."""
    mask = table.size - 1
    i = _slot(eu[f], ev[f], mask)
    while table[i] >= 0:
        i = (i + 1) & mask
    taken = table[i] == _EMPTY
    table[i] = f
    return 1 if taken else 0


@njit(cache=True)
def _append_ends(head, tail, nxt, r, first, last):
    """Append a chain of edge ends (``first`` .. ``last``, linked by ``nxt``) to region
    ``r``'s list."""
    nxt[last] = -1
    if head[r] < 0:
        head[r] = first
    else:
        nxt[tail[r]] = first
    tail[r] = last


@njit(cache=True)
def _agglomerate_kernel(n, eu, ev, count, total, emax, hist, eraw, region, code, q, forest,
                        thresholds, truth, rank, frozen):
    """Greedy agglomeration; with ``truth`` (one id per region, 0 unknown, -1 boundary), a
    teacher run instead: the lowest-cost edge is merged only where both regions have the
    same true id, otherwise dropped, and each decision is recorded with the edge's features
    (none where a region is unknown; a boundary region's merges are wrong).

    Ties in cost go to the edge whose regions' ``rank`` pair (lower, higher) is smallest; a
    merged region takes the larger rank.  Ranks only grow under merges, so an edge that is
    the cheapest of both its regions stays so whatever merges happen elsewhere, and any
    order of such merges ends in the same partition: the ground of the hierarchical solve
    (:mod:`emdask.solve_tree`).  There, ``frozen`` regions (whose edges are not all known
    yet) never merge; an edge that would be merged next but touches a frozen region (or one
    already blocked) blocks both its regions, which then wait for the level above.  Returns
    the representatives and the blocked regions at each threshold."""
    n_edges = eu.size
    eu, ev = eu.astype(np.int32), ev.astype(np.int32)
    count, total, emax, hist = count.copy(), total.copy(), emax.copy(), hist.copy()
    eraw, region = eraw.copy(), region.copy()  # (eraw: empty without raw)
    with_raw = eraw.size > 0
    x = np.empty(len(FEATURES))
    # The learned score depends on region sizes too, so a merge changes the cost of every
    # edge of the merged region.  Those are scored again lazily: an edge popped after one of
    # its regions grew is scored anew and pushed back (versions only grow, so their sum
    # names the state it was scored in), and all of them at fixed levels of cost.  An
    # edge that became cheaper may thus merge later than a strictly greedy order would
    # (eager rescoring of every neighbour costs the region's degree per merge: 25x slower
    # on the medulla); training and use follow the same order.
    resize = code == 3
    version = np.zeros(n, np.int64)
    scored = np.zeros(n_edges if resize else 0, np.int64)
    teach = truth.size > 0
    records = np.empty((n_edges if teach else 0, len(FEATURES)))
    labels = np.empty(n_edges if teach else 0, np.bool_)
    n_records = 0
    parent = np.arange(n)
    # the adjacency (see _slot): a table at most half full of live edges, rebuilt when
    # deleted ones leave a quarter of it free
    size = 8
    while size < 2 * n_edges:
        size *= 2
    table = np.full(size, _EMPTY, np.int32)
    used = 0  # slots not empty
    head, tail = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    nxt = np.empty(2 * n_edges, np.int32)
    degree = np.zeros(n, np.int64)  # live edges of a region
    rank = rank.copy()
    blocked = frozen.copy()
    heap = [(0.0, np.int64(0), np.int64(0), np.int64(0), np.int64(0))]
    heap.pop()
    for e in range(n_edges):
        used += _insert_edge(table, eu, ev, e)
        _append_ends(head, tail, nxt, eu[e], 2 * e, 2 * e)
        _append_ends(head, tail, nxt, ev[e], 2 * e + 1, 2 * e + 1)
        degree[eu[e]] += 1
        degree[ev[e]] += 1
        lo, hi = _pair(rank, eu[e], ev[e])
        heap.append((_cost(e, eu[e], ev[e], count, total, emax, hist, eraw, region, code, q, forest,
                           x), lo, hi, np.int64(e), np.int64(0)))
    heapq.heapify(heap)
    alive = np.ones(n_edges, np.bool_)
    stamp = np.zeros(n_edges, np.int64)
    n_thr = thresholds.size
    out = np.empty((n_thr, n), np.int64)
    out_blocked = np.zeros((n_thr, n), np.bool_)
    t = 0
    level = 0.0
    while len(heap) > 0 and t < n_thr:
        c, lo, hi, e, s = heapq.heappop(heap)
        if not alive[e] or s != stamp[e]:
            continue
        # ranks only grow: an entry with outdated ranks sorts too early, so it is pushed back
        lo2, hi2 = _pair(rank, eu[e], ev[e])
        if lo2 != lo or hi2 != hi:
            heapq.heappush(heap, (c, lo2, hi2, e, s))
            continue
        if resize and scored[e] != version[eu[e]] + version[ev[e]]:
            scored[e] = version[eu[e]] + version[ev[e]]
            heapq.heappush(heap, (_cost(e, eu[e], ev[e], count, total, emax, hist, eraw, region, code,
                                        q, forest, x), lo, hi, e, s))
            continue
        if resize and c >= level:
            # At every 1/128 of cost, every edge whose regions grew since it was scored is
            # scored anew, so one that became cheaper merges within 1/128 of its cost.
            # (The levels are fixed, not the thresholds asked for: a result does not
            # depend on which other thresholds are computed with it.)
            level = (np.floor(c * _LEVELS) + 1) / _LEVELS
            flushed = False
            for f in range(n_edges):
                if alive[f] and f != e and scored[f] != version[eu[f]] + version[ev[f]]:
                    scored[f] = version[eu[f]] + version[ev[f]]
                    stamp[f] += 1
                    flo, fhi = _pair(rank, eu[f], ev[f])
                    heapq.heappush(heap, (_cost(f, eu[f], ev[f], count, total, emax, hist,
                                                eraw, region, code, q, forest, x), flo, fhi,
                                          f, stamp[f]))
                    flushed = True
            if flushed:
                heapq.heappush(heap, (c, lo, hi, e, s))
                continue
        while t < n_thr and c >= thresholds[t]:
            for i in range(n):
                out[t, i] = _find(parent, i)
                out_blocked[t, i] = blocked[out[t, i]]
            t += 1
        if t == n_thr:
            break
        a, b = eu[e], ev[e]
        if blocked[a] or blocked[b]:  # not known to be the cheapest edge of both: wait
            blocked[a] = True
            blocked[b] = True
            continue
        alive[e] = False
        table[_lookup_edge(table, eu, ev, a, b)] = _DELETED
        # (a dead edge's ends stay in the lists until their region merges away: skipped)
        if teach:
            if truth[a] != 0 and truth[b] != 0:
                _features(e, a, b, count, total, emax, hist, eraw, region, records[n_records])
                labels[n_records] = truth[a] == truth[b]
                n_records += 1
            if truth[a] <= 0 or truth[a] != truth[b]:  # the teacher does not merge
                degree[a] -= 1
                degree[b] -= 1
                continue
        # the region with more neighbours survives, so fewer edges move
        if degree[a] >= degree[b]:
            keep, gone = a, b
        else:
            keep, gone = b, a
        parent[gone] = keep
        region[keep] += region[gone]
        rank[keep] = max(rank[keep], rank[gone])
        version[keep] += 1
        degree[keep] -= 1
        # gone's live edges: summed into keep's edge to the same neighbour, or moved to
        # keep (their ends relinked into a list appended to keep's)
        end, first, last = head[gone], -1, -1
        while end >= 0:
            following = nxt[end]
            f = end >> 1
            if alive[f]:
                nb = ev[f] if end & 1 == 0 else eu[f]
                table[_lookup_edge(table, eu, ev, gone, nb)] = _DELETED
                at = _lookup_edge(table, eu, ev, keep, nb)
                if at >= 0:
                    g = np.int64(table[at])
                    count[g] += count[f]
                    total[g] += total[f]
                    if with_raw:
                        eraw[g] += eraw[f]
                    emax[g] = max(emax[g], emax[f])
                    for b2 in range(hist.shape[1]):
                        hist[g, b2] += hist[f, b2]
                    alive[f] = False
                    degree[nb] -= 1
                    stamp[g] += 1
                    if resize:
                        scored[g] = version[keep] + version[nb]
                    glo, ghi = _pair(rank, keep, nb)
                    heapq.heappush(heap, (_cost(g, keep, nb, count, total, emax, hist, eraw,
                                                region, code, q, forest, x), glo, ghi, g,
                                          stamp[g]))
                else:
                    if end & 1 == 0:
                        eu[f] = keep
                    else:
                        ev[f] = keep
                    used += _insert_edge(table, eu, ev, f)
                    degree[keep] += 1
                    if resize:
                        scored[f] = -1  # now between other regions: scored anew when popped
                    if last < 0:
                        first = end
                    else:
                        nxt[last] = end
                    last = end
            end = following
        if last >= 0:
            _append_ends(head, tail, nxt, keep, first, last)
        head[gone], tail[gone], degree[gone] = -1, -1, 0
        if 4 * used > 3 * table.size:  # too few empty slots: the live edges anew
            table[:] = _EMPTY
            used = 0
            for f in range(n_edges):
                if alive[f]:
                    used += _insert_edge(table, eu, ev, f)
    while t < n_thr:
        for i in range(n):
            out[t, i] = _find(parent, i)
            out_blocked[t, i] = blocked[out[t, i]]
        t += 1
    return out, records[:n_records], labels[:n_records], out_blocked


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    values = list(np.ravel(thresholds)) if not np.isscalar(thresholds) else [thresholds]
    bad = [t for t in values if isinstance(t, bool | str | bytes)
           or not isinstance(t, int | float | np.number)]
    if bad:
        raise TypeError(f"thresholds must be numbers, got {bad!r} in {list(values)!r}")
    thr = np.asarray(values, np.float64).ravel()
    if thr.size == 0:
        raise ValueError("give at least one agglomeration threshold")
    if np.isnan(thr).any() or thr.min() < 0 or thr.max() > 1:
        raise ValueError(f"thresholds must lie in [0, 1], got {thr.tolist()}")
    if np.any(np.diff(thr) <= 0):
        raise ValueError(f"thresholds must be strictly increasing, got {thr.tolist()}")
    return thr


#: The forest argument of the kernels when no classifier is used.
_NO_FOREST = (np.zeros((0, 1), np.int64), np.zeros((0, 1)), np.zeros((0, 1), np.int64),
              np.zeros((0, 1), np.int64), np.zeros((0, 1)), 0.0)


def _run(graph: RegionGraph, n_regions: int, thresholds: Sequence[float], score: str,
         sizes: np.ndarray | None, classifier, truth: np.ndarray | None,
         raw: np.ndarray | None = None, rank: np.ndarray | None = None,
         frozen: np.ndarray | None = None):
    """Checked arguments for :func:`_agglomerate_kernel`, and its result: representatives,
    teacher records and labels, blocked regions."""
    thr = _check_thresholds(thresholds)
    code, q = parse_score(score)
    if code in (_SCORES["quantile"], _SCORES["learned"]) and graph.hist.shape[1] == 0:
        raise ValueError(f"score {score!r} needs a region graph with histogram bins")
    forest = _NO_FOREST
    if code == _SCORES["learned"]:
        if classifier is None:
            raise ValueError("score 'learned' needs a classifier "
                             "(emdask.learn_agglomeration.load_classifier)")
        if graph.hist.shape[1] != classifier.bins:
            raise ValueError(f"the classifier was trained on graphs with {classifier.bins} "
                             f"histogram bins, this graph has {graph.hist.shape[1]}")
        if classifier.raw and raw is None and len(graph):  # (no edges: nothing to score)
            raise ValueError("this classifier was trained with raw EM features: give raw "
                             "(each region's sum of raw EM)")
        if classifier.raw and graph.raw.shape[1] == 0 and len(graph):
            raise ValueError("this classifier was trained with raw EM features: its region "
                             "graph needs the boundaries' raw (region_graph(..., raw=))")
        forest = classifier.forest
    if sizes is None:
        if code == _SCORES["learned"] or truth is not None:
            raise ValueError("give the regions' sizes (voxels) for a learned score")
        sizes = np.ones(n_regions, np.int64)
    sizes = np.asarray(sizes, np.int64)
    if sizes.shape != (n_regions,):
        raise ValueError(f"sizes must have one entry per region ({n_regions}), got shape "
                         f"{sizes.shape}")
    with_raw = raw is not None and graph.raw.shape[1] == 1
    edge_raw = graph.raw[:, 0] if with_raw else np.zeros(0, np.int64)
    region_raw = np.asarray(raw, np.int64) if with_raw else np.zeros(n_regions, np.int64)
    if region_raw.shape != (n_regions,):
        raise ValueError(f"raw must have one sum per region ({n_regions}), got shape "
                         f"{region_raw.shape}")
    region = np.stack([sizes, region_raw], axis=1).astype(np.float64)
    truth = np.zeros(0, np.int64) if truth is None else np.asarray(truth, np.int64)
    rank = np.arange(n_regions, dtype=np.int64) if rank is None else np.asarray(rank, np.int64)
    frozen = (np.zeros(n_regions, np.bool_) if frozen is None
              else np.asarray(frozen, np.bool_))
    if rank.shape != (n_regions,) or frozen.shape != (n_regions,):
        raise ValueError(f"rank and frozen must have one entry per region ({n_regions})")
    return _agglomerate_kernel(int(n_regions), graph.u, graph.v, graph.count, graph.total,
                               graph.max, graph.hist, edge_raw, region,
                               code, q, forest, thr, truth, rank, frozen)


def agglomerate(
    graph: RegionGraph,
    n_regions: int,
    thresholds: Sequence[float],
    score: str = "mean",
    *,
    sizes: np.ndarray | None = None,
    classifier=None,
    raw: np.ndarray | None = None,
    rank: np.ndarray | None = None,
) -> np.ndarray:
    """Hierarchical agglomeration for a sweep of thresholds in one pass (as waterz does).

    The pair of regions with the lowest merge cost (1 - score of their boundary affinities)
    is merged, and the statistics of its edges to common neighbours are summed, until the
    lowest cost reaches the threshold.  Thresholds increase, so each result contains the
    merges of the previous one; one run yields all of them.

    Parameters
    ----------
    graph
        Region graph over regions ``0..n_regions-1`` (histogram needed for quantile and
        learned scores).
    thresholds
        Strictly increasing costs in [0, 1]; pairs merge while their cost is below the
        threshold: 0 merges nothing, 1 merges every touching pair with a non-zero score.
    score
        ``"mean"`` (default), ``"max"``, ``"median"`` or ``"quantile-NN"`` affinity, or
        ``"learned"``: the probability that the merge is right, from ``classifier``.
    sizes
        Voxels of each region (needed for the learned score, whose features include them).
    classifier
        An :class:`emdask.learn_agglomeration.EdgeClassifier`, for ``score="learned"``.
    raw
        Sum of raw EM inside each region, with a graph that holds the boundaries' raw
        (for a classifier trained with raw features).
    rank
        Breaks ties in cost: the edge whose regions' (lower, higher) rank pair is smallest
        merges first, and a merged region takes the larger rank (default: the region ids).

    Returns
    -------
    numpy.ndarray, shape (len(thresholds), n_regions)
        For each threshold, the representative region of every region.
    """
    return _run(graph, n_regions, thresholds, score, sizes, classifier, None, raw, rank)[0]


# ------------------------------------------------------ the learned score's classifier
#: Shipped classifiers live beside the nets' weights as ``{name}_agglomeration.json``.
_WEIGHTS = Path(__file__).with_name("weights")


@njit(cache=True)
def _predict_rows(x, forest):
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = _forest(x[i], forest)
    return out


@dataclass(frozen=True, eq=False)
class EdgeClassifier:
    """A gradient-boosted tree ensemble over edge features, as plain arrays.

    Tree ``t`` has nodes ``0..``; node ``k`` is a leaf where ``left[t, k] < 0``, else it
    sends ``x[feature[t, k]] <= threshold[t, k]`` left.  The log-odds of a right merge are
    ``base`` plus the sum of the leaves' ``value`` (learning rate included).
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    base: float
    bins: int = LEARNED_BINS
    card: dict = field(default_factory=dict)

    @property
    def raw(self) -> bool:
        """Whether it was trained with raw EM features (and needs raw to score)."""
        return bool(self.card.get("raw", False))

    @property
    def forest(self) -> tuple:
        """The arrays in the order the Numba kernels take them."""
        return (self.feature, self.threshold, self.left, self.right, self.value,
                float(self.base))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probability of a right merge for each row of ``features`` (n, len(FEATURES))."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES):
            raise ValueError(f"features must have shape (n, {len(FEATURES)}), got {x.shape}")
        return _predict_rows(x, self.forest)

    def save(self, path: str | Path) -> None:
        """Write the classifier and its card as JSON."""
        trees = {k: getattr(self, k).tolist()
                 for k in ("feature", "threshold", "left", "right", "value")}
        doc = {"format": "emdask-edge-classifier/1", "features": list(FEATURES),
               "quantiles": list(_QUANTILES), "bins": self.bins, "base": self.base,
               "trees": trees, "card": self.card}
        Path(path).write_text(json.dumps(doc))

    @classmethod
    def from_sklearn(cls, model: Any, bins: int = LEARNED_BINS, card: dict | None = None
                     ) -> EdgeClassifier:
        """From a fitted binary ``sklearn.ensemble.HistGradientBoostingClassifier``."""
        # its trees as scikit-learn predicts with them (TreePredictor.nodes: a leaf's value
        # includes the learning rate; x <= num_threshold goes left)
        trees = [p[0].nodes for p in model._predictors]
        n = max(t.size for t in trees)

        def pad(field, fill, dtype):
            out = np.full((len(trees), n), fill, dtype)
            for i, t in enumerate(trees):
                out[i, :t.size] = t[field]
            return out

        leaf = pad("is_leaf", True, bool)
        left = np.where(leaf, -1, pad("left", -1, np.int64))
        return cls(pad("feature_idx", 0, np.int64), pad("num_threshold", 0.0, np.float64),
                   left, np.where(leaf, -1, pad("right", -1, np.int64)),
                   pad("value", 0.0, np.float64),
                   float(np.ravel(model._baseline_prediction)[0]), int(bins), dict(card or {}))


def _check_trees(clf: EdgeClassifier) -> None:
    """Numba reads the trees unchecked: refuse what would read out of bounds or loop."""
    shape = clf.feature.shape
    if len(shape) != 2 or any(getattr(clf, k).shape != shape for k in
                              ("threshold", "left", "right", "value")):
        raise ValueError("tree arrays of different shapes")
    node = np.arange(shape[1])
    inner = clf.left >= 0
    if ((clf.feature < 0) | (clf.feature >= len(FEATURES)))[inner].any():
        raise ValueError(f"a feature index outside 0..{len(FEATURES) - 1}")
    # children come after their parent (as scikit-learn numbers them): no cycles
    for child in (clf.left, clf.right):
        if (inner & ((child <= node) | (child >= shape[1]))).any():
            raise ValueError("a tree's children must follow their parent inside the tree")
    if clf.bins < 2:
        raise ValueError(f"bins must be >= 2, got {clf.bins}")


def load_classifier(name: str | Path | EdgeClassifier) -> EdgeClassifier:
    """A shipped classifier by the name of its boundary net (``"fibsem"``), or a file
    written by :meth:`EdgeClassifier.save`."""
    if isinstance(name, EdgeClassifier):
        return name
    path = Path(name)
    shipped = _WEIGHTS / f"{name}_agglomeration.json"
    if path.suffix != ".json" and shipped.exists():
        path = shipped
    if not path.exists():
        names = sorted(p.name.removesuffix("_agglomeration.json")
                       for p in _WEIGHTS.glob("*_agglomeration.json"))
        raise FileNotFoundError(f"{name}: no such classifier file, and not a shipped one "
                                f"({', '.join(names) or 'none shipped'})")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != "emdask-edge-classifier/1":
            raise ValueError("not an emdask edge classifier")
        if doc["features"] != list(FEATURES):
            raise ValueError(f"trained on features {doc['features']}, this emdask computes "
                             f"{list(FEATURES)}")
        t = doc["trees"]
        clf = EdgeClassifier(np.asarray(t["feature"], np.int64),
                             np.asarray(t["threshold"], np.float64),
                             np.asarray(t["left"], np.int64), np.asarray(t["right"], np.int64),
                             np.asarray(t["value"], np.float64), float(doc["base"]),
                             int(doc["bins"]), doc.get("card", {}))
        _check_trees(clf)
        return clf
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read an edge classifier ({err})") from None
