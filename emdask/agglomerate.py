"""Agglomeration on the region graph: small-region merging and hierarchical merging.

Both kernels work on a :class:`~emdask.region_graph.RegionGraph` over regions ``0..n-1``
and return, for every region, the region it is merged into.  They run in Numba and never
touch voxels, so their cost is set by the size of the graph, not of the volume.

Determinism: the kernels are pure functions of the graph.  Regions and edges are ordered
canonically by the caller (:mod:`emdask.segmentation` orders regions by their lowest global
voxel index), edge scores are computed from exact integer sums, and ties are broken by edge
order, so the same graph always gives the same merges, however the volume was chunked.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
from numba import njit, types
from numba.typed import Dict, List

from emdask.region_graph import RegionGraph
from emdask.watershed import Q, _find

__all__ = ["agglomerate", "merge_small_regions", "parse_score"]

_SCORES = {"mean": 0, "max": 1, "quantile": 2}


def parse_score(score: str) -> tuple[int, float]:
    """``"mean"``, ``"max"``, ``"median"`` or ``"quantile-75"`` -> (code, quantile)."""
    if score in ("mean", "max"):
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
        f"unknown score {score!r}; use 'mean', 'max', 'median' or 'quantile-NN' (0 < NN < 100)"
    )


@njit(cache=True)
def _merge_small_kernel(n, eu, ev, emax, order, sizes, size_threshold, merge_q):
    parent = np.arange(n)
    size = sizes.copy()
    for e in order:
        if emax[e] < merge_q:
            break
        a, b = _find(parent, eu[e]), _find(parent, ev[e])
        if a == b:
            continue
        if size[a] < size_threshold or size[b] < size_threshold:
            keep, gone = min(a, b), max(a, b)
            parent[gone] = keep
            size[keep] += size[gone]
    for i in range(n):
        parent[i] = _find(parent, i)
    return parent


def merge_small_regions(
    graph: RegionGraph,
    sizes: np.ndarray,
    size_threshold: int,
    merge_threshold: float,
) -> np.ndarray:
    """Size-dependent single linkage (Zlateski and Seung 2015).

    Edges are visited from the strongest (maximum affinity) down to ``merge_threshold``;
    an edge merges its two regions if either is smaller than ``size_threshold`` voxels.

    Returns
    -------
    numpy.ndarray
        ``root[i]``: the lowest-numbered region that region ``i`` was merged with.
    """
    merge_q = int(np.ceil(merge_threshold * Q - 1e-9))
    # strongest edges first; a stable sort keeps canonical edge order among ties
    order = np.argsort(-graph.max, kind="stable")
    return _merge_small_kernel(len(sizes), graph.u, graph.v, graph.max, order,
                               np.asarray(sizes, np.int64), int(size_threshold), merge_q)


@njit(cache=True)
def _cost(e, count, total, emax, hist, code, q):
    """Merge cost of an edge: 1 - its affinity score."""
    if code == 0:
        return 1.0 - total[e] / (count[e] * 65535.0)
    if code == 1:
        return 1.0 - emax[e] / 65535.0
    bins = hist.shape[1]
    target = q * count[e]
    cum = 0.0
    for b in range(bins):
        c = hist[e, b]
        if c > 0 and cum + c >= target:
            return 1.0 - (b + (target - cum) / c) / bins  # interpolate inside the bin
        cum += c
    return 0.0


@njit(cache=True)
def _agglomerate_kernel(n, eu, ev, count, total, emax, hist, code, q, thresholds):
    n_edges = eu.size
    eu, ev = eu.copy(), ev.copy()
    count, total, emax, hist = count.copy(), total.copy(), emax.copy(), hist.copy()
    parent = np.arange(n)
    adj = List()
    for _ in range(n):
        adj.append(Dict.empty(key_type=types.int64, value_type=types.int64))
    heap = [(0.0, np.int64(0), np.int64(0))]
    heap.pop()
    for e in range(n_edges):
        adj[eu[e]][ev[e]] = e
        adj[ev[e]][eu[e]] = e
        heap.append((_cost(e, count, total, emax, hist, code, q), np.int64(e), np.int64(0)))
    heapq.heapify(heap)
    alive = np.ones(n_edges, np.bool_)
    stamp = np.zeros(n_edges, np.int64)
    n_thr = thresholds.size
    out = np.empty((n_thr, n), np.int64)
    t = 0
    while len(heap) > 0 and t < n_thr:
        c, e, s = heapq.heappop(heap)
        if not alive[e] or s != stamp[e]:
            continue
        while t < n_thr and c >= thresholds[t]:
            for i in range(n):
                out[t, i] = _find(parent, i)
            t += 1
        if t == n_thr:
            break
        a, b = eu[e], ev[e]
        alive[e] = False
        # the region with more neighbours survives, so fewer edges move
        if len(adj[a]) >= len(adj[b]):
            keep, gone = a, b
        else:
            keep, gone = b, a
        parent[gone] = keep
        adj[keep].pop(gone)
        for nb, f in adj[gone].items():
            if nb == keep:
                continue
            adj[nb].pop(gone)
            if nb in adj[keep]:
                g = adj[keep][nb]
                count[g] += count[f]
                total[g] += total[f]
                emax[g] = max(emax[g], emax[f])
                for b2 in range(hist.shape[1]):
                    hist[g, b2] += hist[f, b2]
                alive[f] = False
                stamp[g] += 1
                heapq.heappush(heap, (_cost(g, count, total, emax, hist, code, q), g,
                                      stamp[g]))
            else:
                adj[keep][nb] = f
                adj[nb][keep] = f
                if eu[f] == gone:
                    eu[f] = keep
                else:
                    ev[f] = keep
        adj[gone].clear()
    while t < n_thr:
        for i in range(n):
            out[t, i] = _find(parent, i)
        t += 1
    return out


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


def agglomerate(
    graph: RegionGraph,
    n_regions: int,
    thresholds: Sequence[float],
    score: str = "mean",
) -> np.ndarray:
    """Hierarchical agglomeration for a sweep of thresholds in one pass (as waterz does).

    The pair of regions with the lowest merge cost (1 - score of their boundary affinities)
    is merged, and the statistics of its edges to common neighbours are summed, until the
    lowest cost reaches the threshold.  Thresholds increase, so each result contains the
    merges of the previous one; one run yields all of them.

    Parameters
    ----------
    graph
        Region graph over regions ``0..n_regions-1`` (histogram needed for quantile scores).
    thresholds
        Strictly increasing costs in [0, 1]; pairs merge while their cost is below the
        threshold: 0 merges nothing, 1 merges every touching pair with a non-zero score.
    score
        ``"mean"`` (default), ``"max"``, ``"median"`` or ``"quantile-NN"`` affinity.

    Returns
    -------
    numpy.ndarray, shape (len(thresholds), n_regions)
        For each threshold, the representative region of every region.
    """
    thr = _check_thresholds(thresholds)
    code, q = parse_score(score)
    if code == _SCORES["quantile"] and graph.hist.shape[1] == 0:
        raise ValueError(f"score {score!r} needs a region graph with histogram bins")
    return _agglomerate_kernel(int(n_regions), graph.u, graph.v, graph.count, graph.total,
                               graph.max, graph.hist, code, q, thr)
