"""Blockwise segmentation on Dask whose result does not depend on the chunking.

``segment(affinities, thresholds)`` runs in three steps:

1. **Per block** (one task each, block plus a halo of ``HALO`` voxels): steepest-ascent basins with
   block-local labels (:func:`emdask.watershed.basins`), their sizes and lowest global voxel
   index, the region graph of edges inside the block, and the labels, pointers and
   affinities on the block's faces.
2. **Per face** between two blocks: which basins the pointers and high-affinity edges join
   across the face, and the region-graph edges that cross it.
3. **Once, on the global graph**: a union-find over all block-local basins gives the
   supervoxels; the block graphs are summed into one global region graph (all statistics
   are additive); small basins merge (:func:`emdask.agglomerate.merge_small_regions`);
   hierarchical agglomeration yields one merge table per threshold
   (:func:`emdask.agglomerate.agglomerate`; with a learned score whose classifier reads
   the EM, the raw block travels as a fourth channel beside the affinities and its sums
   on boundaries and inside basins are additive too).

Blocks are then relabelled lazily: each output block recomputes its basins (cheap) and
looks its labels up in the table.  The per-block work is one step,
:func:`watershed_step`, which ``emdask run`` runs on stored blocks too.  For volumes
opened from a file (zarr, HDF5), every block task reads block plus halo straight from it
(decoded chunks cached per worker), so memory stays bounded by blocks in flight plus the
global step's state; a Dask input's blocks are assembled from the chunks they touch (any
chunking) and held between the two passes.  Because every decision is made with
canonical ids (a region is known by its lowest global voxel index, sums are exact
integers), the result is identical for every chunking, ids included.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.callbacks import Callback
from numba import njit

from emdask.affinities import mask_affinities
from emdask.agglomerate import (
    LEARNED_BINS,
    _check_thresholds,
    agglomerate,
    load_classifier,
    merge_small_regions,
    parse_score,
)
from emdask.blockwise import BlockGraph, Step, Where, block_data
from emdask.region_graph import (
    B_OFFSET,
    RegionGraph,
    combine,
    edge_index,
    face_links,
    from_observations,
    observations,
    raw_pairs,
)
from emdask.solve_tree import (
    block_lut,
    counts,
    face_keys,
    finished,
    inner_box,
    leaf_box,
    numbering,
    plane_faces,
    totals,
    tree,
)
from emdask.volumes import stored_source
from emdask.watershed import (
    HALO,
    WatershedParams,
    _union_all,
    basins,
    quantize_affinities,
)

__all__ = ["SegmentationInfo", "segment"]

@dataclass
class SegmentationInfo:
    """Sizes of the global problem (returned by ``segment(..., return_info=True)``)."""

    n_blocks: int
    n_basins: int  # block-local basins before joining across faces
    n_supervoxels: int
    n_fragments: int  # after small-region merging and dust removal
    n_edges: int
    # the region graph of supervoxels one task held: the global graph, or with the tree
    # solve (mean and max scores) the largest state of one box
    graph_nbytes: int

    def per_gigavoxel(self, n_voxels: int) -> float:
        """Global graph bytes per 1e9 voxels."""
        return self.graph_nbytes * 1e9 / n_voxels


# ---------------------------------------------------------------- per block
def watershed_step(params: WatershedParams, bins: int, labels: bool = True) -> Step:
    """The watershed stage's step, run by :func:`segment` and ``emdask run`` alike: per
    block (plus a halo of :data:`~emdask.watershed.HALO` voxels), its block-local basins
    and what the global step needs of them: ``(labels, basin info, graph, faces)``, see
    :func:`_block_basins`; without ``labels`` (the library recomputes them in its
    relabel pass rather than hold them), the other three.  Inputs: affinities (the first
    three channels), and the uint8 raw EM for a learned score that reads it."""
    return Step("watershed", _watershed, np.uint32, halo=(HALO,) * 3, summary=True,
                params={"params": params, "bins": int(bins), "labels": labels})


def _watershed(affs: np.ndarray, raw: np.ndarray | None = None, *, where: Where,
               params: WatershedParams, bins: int, labels: bool) -> tuple:
    data = affs[:3] if raw is None else np.concatenate([affs[:3],
                                                        raw[None].astype(affs.dtype)])
    out = _block_basins(data, where.box.begin, where.shape, params, bins)
    return out if labels else out[1:]


@njit(cache=True)
def _last_voxels(labels, n, origin, shape):
    """Each label's highest global voxel index in the block (C order: the last seen)."""
    last = np.zeros(n, np.int64)
    nz, ny, nx = labels.shape
    for i in range(nz):
        for j in range(ny):
            for k in range(nx):
                lab = labels[i, j, k]
                if lab > 0:
                    last[lab - 1] = ((origin[0] + i) * shape[1] + origin[1] + j) * shape[2] \
                        + origin[2] + k
    return last


def _block_basins(padded: np.ndarray, origin, shape, params: WatershedParams, bins: int):
    """One block's block-local basin labels and what the global solve needs of it: basin
    info (lowest global index, size, sum of raw, highest global index), the region graph
    inside the block, and its faces.  ``padded`` is (3, ...) affinities, or (4, ...) with
    raw EM as channel 3 (for a learned score with raw features)."""
    padded = block_data(padded)
    inside = (slice(HALO, -HALO),) * 3
    # check only the block itself: the halo belongs to neighbours, which report their own
    quantize_affinities(padded[(slice(0, 3), *inside)],
                        where=f"affinities block at voxel {tuple(map(int, origin))}")
    aq = quantize_affinities(padded[:3], check=False)
    labels, direction, first = basins(aq, origin, shape, params)
    inner = aq[(slice(None), *inside)]
    u, v, w, at = observations(labels, inner, origin=origin, shape=shape)
    sizes = np.bincount(labels.ravel(), minlength=first.size + 1)[1:]
    raw_sums, r, pairs = np.zeros(0, np.int64), None, None
    if padded.shape[0] == 4:
        pairs = raw_pairs(padded[3])[(slice(None), *inside)]
        r = observations(labels, pairs)[2]
        raw = padded[(3, *inside)].astype(np.float64).ravel()  # exact: sums below 2**53
        raw_sums = np.bincount(labels.ravel(), raw, first.size + 1)[1:].astype(np.int64)
    basin_info = (first, sizes, raw_sums, _last_voxels(labels, first.size,
                                                          tuple(origin), tuple(shape)))
    graph = from_observations(u - 1, v - 1, w, bins, r, at)
    faces = {}
    for d in range(3):
        # the voxel edges between this block's lower face and the block below
        face_end = np.add(origin, labels.shape)
        face_end[d] = origin[d] + 1
        faces[("lower", d)] = (labels.take(0, d), direction.take(0, d) == d,
                               inner[d].take(0, d),
                               edge_index(d, origin, face_end, shape).reshape(
                                   labels.take(0, d).shape)) + (
                                   () if pairs is None else (pairs[d].take(0, d),))
        faces[("upper", d)] = (labels.take(-1, d), direction.take(-1, d) == d + 3)
    return labels, basin_info, graph, faces


def _consecutive(ids: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..k in order, keeping 0 as 0."""
    return np.unique(np.r_[0, ids], return_inverse=True)[1][1:]


def _canonical(root: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each element's group, groups numbered by their smallest key."""
    group_key = np.full(root.size, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(group_key, root, keys)
    return np.unique(group_key[root], return_inverse=True)[1]


# ---------------------------------------------------------------- global graph
def _supervoxels(basin_info, pairs, links):
    """Union-find over all block-local basins: basins joined across faces form one
    supervoxel; supervoxels are numbered by their lowest global voxel index.  Returns the
    blocks' offsets into the basins, each basin's supervoxel, the supervoxels' sizes and
    their sums of raw EM (None where the blocks carry none)."""
    counts = np.array([info[0].size for info in basin_info], np.int64)
    bases = np.concatenate([[0], np.cumsum(counts)])
    n = int(bases[-1])
    keys = np.concatenate([info[0] for info in basin_info] + [np.zeros(0, np.int64)])
    sizes = np.concatenate([info[1] for info in basin_info] + [np.zeros(0, np.int64)])
    raws = np.concatenate([info[2] for info in basin_info if len(info) > 2]
                          + [np.zeros(0, np.int64)])
    pa, pb = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for (ia, ib), joined in zip(pairs, links, strict=True):
        pa.append(joined[0] + bases[ia])
        pb.append(joined[1] + bases[ib])
    sv = _canonical(_union_all(n, np.concatenate(pa), np.concatenate(pb)), keys)
    n_sv = int(sv.max()) + 1 if n else 0
    sv_raw = (np.bincount(sv, weights=raws, minlength=n_sv).astype(np.int64)
              if raws.size == n and n else None)
    return bases, sv, np.bincount(sv, weights=sizes, minlength=n_sv).astype(np.int64), sv_raw


def _global_graph(block_graphs, face_graphs, pairs, supervoxels) -> RegionGraph:
    """Every block's and face's graph in supervoxel ids, summed: the global graph."""
    bases, sv = supervoxels[:2]
    offsets = [(bases[b], bases[b]) for b in range(len(block_graphs))]
    offsets += [(bases[a], bases[b] - B_OFFSET) for a, b in pairs]
    return combine([*block_graphs, *face_graphs], relabel=sv, offsets=offsets)


def _finish(block_graphs, face_graphs, pairs, supervoxels, params: WatershedParams,
            thresholds, score: str, classifier=None, last=None):
    """Global graph, small-region merging and agglomeration; lookup tables.  ``last``, the
    basins' highest global voxel indices, ranks fragments for ties in agglomeration (their
    highest voxel index: the same for any chunking, and growing under merges, as
    :mod:`emdask.solve_tree` needs).  ``block_graphs`` and ``face_graphs`` are emptied
    once summed into the global graph, so that a caller that holds nothing else of them
    frees them then."""
    bases, sv, sv_sizes, sv_raw = supervoxels
    n_blocks = len(block_graphs)
    sv_graph = _global_graph(block_graphs, face_graphs, pairs, supervoxels)
    block_graphs.clear()
    face_graphs.clear()
    n, n_sv = sv.size, sv_sizes.size
    # fragments: small supervoxels merged (roots are lowest ids, hence canonical)
    frag = np.arange(n_sv)
    if params.size_threshold > 0 and n_sv:
        frag = merge_small_regions(sv_graph, sv_sizes, params.size_threshold,
                                   params.merge_threshold)
        frag = np.unique(frag, return_inverse=True)[1]
    n_frag = int(frag.max()) + 1 if n_sv else 0
    frag_sizes = np.bincount(frag, weights=sv_sizes, minlength=n_frag).astype(np.int64)
    frag_raw = None if sv_raw is None else np.bincount(
        frag, weights=sv_raw, minlength=n_frag).astype(np.int64)
    frag_graph = combine([sv_graph], relabel=frag)
    n_edges, graph_nbytes = len(sv_graph), sv_graph.nbytes
    del sv_graph
    dust = frag_sizes < params.dust_size
    if dust.any():
        frag_graph = frag_graph.select(~(dust[frag_graph.u] | dust[frag_graph.v]))
    tables = [_consecutive(np.where(dust, 0, np.arange(1, n_frag + 1)))]
    rank = None
    if last is not None and n:
        rank = np.full(n_frag, -1, np.int64)
        np.maximum.at(rank, frag[sv], last)
    for reps in agglomerate(frag_graph, n_frag, thresholds, score, sizes=frag_sizes,
                            classifier=classifier, raw=frag_raw, rank=rank):
        seg = _canonical(reps, np.arange(n_frag)) + 1
        tables.append(_consecutive(np.where(dust, 0, seg)))
    # lookup tables from block-local basin to output id, one row per output
    luts = np.stack([t[frag[sv]] for t in tables]) if n else np.zeros((len(tables), 0))
    info = SegmentationInfo(n_blocks, n, n_sv, n_frag, n_edges, graph_nbytes)
    return luts.astype(np.uint64), bases, info


def _solve(basin_info, block_graphs, links, pairs, params: WatershedParams, thresholds,
           score: str, classifier=None):
    """The global solve from the block and face summaries: lookup tables and info."""
    supervoxels = _supervoxels(basin_info, pairs, [lk[0] for lk in links])
    last = np.concatenate([info[3] for info in basin_info] + [np.zeros(0, np.int64)])
    return _finish(block_graphs, [lk[1] for lk in links], pairs, supervoxels, params,
                   thresholds, score, classifier, last)


def _block_solution(solution, block: int):
    """One block's part of the global solve's lookup tables (what its relabel needs)."""
    luts, bases = solution[0], solution[1]
    return luts[:, bases[block]:bases[block + 1]]


def _relabel(padded, lut, origin, shape, params, sweep: tuple = ()):
    """A block's output labels from its basins and its lookup tables (one row per
    output, one column per basin)."""
    padded = block_data(padded)
    labels, _, _ = basins(quantize_affinities(padded[:3], check=False), origin, shape,
                          params)
    outputs = _apply_luts(labels, lut)
    if sweep:  # kept for the other thresholds of a sweep (see _SweepCache)
        _SWEEP_CACHE.put(*sweep, outputs)
    return outputs


def _apply_luts(labels: np.ndarray, lut: np.ndarray):
    """Block-local basin labels (1..n, 0 background) -> one output label block per row
    of ``lut`` (n columns)."""
    lut = np.concatenate([np.zeros((lut.shape[0], 1), np.uint64), lut], axis=1)
    return tuple(row[labels] for row in lut)


# ---------------------------------------------------------------- the tree solve
#: Scores solved in a tree of boxes (:mod:`emdask.solve_tree`); the others in one task.
TREE_SCORES = ("mean", "max")


#: With ``solve="auto"``, volumes of at most this many blocks use the single task: its
#: graph is small (below a GB with 128^3 blocks of noisy affinities), and a tree's many small
#: tasks cost more there (a test pipeline of 45 blocks: 77 s against 51 s).
TREE_MIN_BLOCKS = 64


def use_tree(solve: str, score: str, n_blocks: int | None = None) -> bool:
    """Whether the global step runs as a tree of boxes (``solve``: "auto", "global" or
    "tree"; "auto" is the tree wherever the score allows it and the volume has more than
    :data:`TREE_MIN_BLOCKS` blocks).  Without ``n_blocks``, only checks the words."""
    if solve not in ("auto", "global", "tree"):
        raise ValueError(f"solve = {solve!r}: use 'auto', 'global' or 'tree'")
    if solve == "tree" and score not in TREE_SCORES:
        raise ValueError(f"solve = 'tree' works for the scores {list(TREE_SCORES)}, not "
                         f"{score!r} (which needs its edges' whole history in one task)")
    return solve == "tree" or (solve == "auto" and score in TREE_SCORES
                               and (n_blocks or 0) > TREE_MIN_BLOCKS)


def _info(parts, n_blocks: int) -> SegmentationInfo:
    return SegmentationInfo(n_blocks, *totals(list(parts)))


def _tree_tasks(g: BlockGraph, summaries: dict, params: WatershedParams, bins: int,
                thresholds, score: str):
    """Tasks of the tree solve over the blocks' summaries (keys of the watershed step,
    without labels): face links, one task per box, the numbering, and each block's
    lookup tables.  Returns {block index: key of its solution} and the key of the info."""
    parts, index = {}, {}
    for idx, block, _, _ in g.blocks():
        parts[block] = [g.item(f"summary{i}", idx, summaries[idx], i) for i in range(3)]
        parts[block].append(g.item("first", idx, parts[block][0], 0))  # basin keys
        index[block] = idx
    boxes = tree(g.grid)
    carried, resolutions, paths = [], [], {}
    args = {"params": params, "thresholds": thresholds, "score": score}
    for i, box in enumerate(boxes):
        if box.block >= 0:
            b = box.block
            key = g.add("box", (i,), leaf_box, *parts[b][:3], box=box, **args)
            members = [b]
        else:
            links = [g.add("face", (lw, u), face_keys, parts[u][2], parts[lw][2], parts[u][3],
                           parts[lw][3], d=d, high_q=params.quantized()[1], bins=bins)
                     for lw, u, d in plane_faces(box, g.grid)]
            key = g.add("box", (i,), inner_box, [carried[c][0] for c in box.children],
                        links, box=box, **args)
            members = carried[box.children[0]][1] + carried[box.children[1]][1]
        carried.append((g.item("carried", (i,), key, 0), members))
        resolutions.append(g.item("resolution", (i,), key, 1))
        for b in members:
            paths.setdefault(b, []).append(resolutions[-1])
    keys = [g.add("finished", (i,), finished, r) for i, r in enumerate(resolutions)]
    numbers = g.add("numbering", (), numbering, keys)
    solutions = {index[b]: g.add("lut", index[b], block_lut, parts[b][3], path, numbers)
                 for b, path in paths.items()}
    info = g.add("info", (), _info, [g.add("counts", (i,), counts, r)
                                     for i, r in enumerate(resolutions)],
                 n_blocks=len(paths))
    return solutions, info


# ---------------------------------------------------------------- threshold sweeps
#: Bytes of relabelled blocks kept for live :func:`segment` results (0 disables the cache).
SWEEP_CACHE_BYTES = 1 << 30


class _SweepCache(Callback):
    """Keeps, for the results of :func:`segment` that are still alive, each block's relabel
    output (every threshold at once), so that computing their segmentations one at a time
    runs the shared work (the net upstream, the watershed, the global solve) once.

    The relabel task puts its outputs here; a Dask callback of the local schedulers then
    replaces, at the start of a computation, every output block task whose block is kept by
    its value, which leaves the upstream tasks unreachable, so they do not run.  (On a
    ``distributed`` cluster, compute the segmentations together, ``dask.compute(*segs)``,
    or persist them.)  Blocks are kept within :data:`SWEEP_CACHE_BYTES`, least recently
    used first out; a result's blocks are dropped when its arrays are garbage collected."""

    def __init__(self):
        super().__init__()
        self.data: OrderedDict = OrderedDict()  # (graph name, block index) -> outputs
        self.nbytes = 0
        self.live: dict[str, int] = {}  # graph name -> its arrays alive
        self.layers: dict[str, tuple[str, int]] = {}  # output layer -> (graph name, item)
        self.lock = threading.RLock()  # (a release from the garbage collector may interrupt)
        self.registered = False

    def _start(self, dsk) -> None:
        with self.lock:
            for key in list(dsk):
                where = self.layers.get(key[0]) if isinstance(key, tuple) else None
                block = where and self.data.get((where[0], key[1:]))
                if block is not None:  # a copy: the caller may change what it gets
                    dsk[key] = block[where[1]].copy()
                    self.data.move_to_end((where[0], key[1:]))

    def put(self, name: str, index: tuple, outputs: tuple) -> None:
        size = sum(v.nbytes for v in outputs)
        with self.lock:
            if name not in self.live or (name, index) in self.data or (
                    size > SWEEP_CACHE_BYTES):
                return
            self.data[(name, index)] = tuple(o.copy() for o in outputs)
            self.nbytes += size
            while self.nbytes > SWEEP_CACHE_BYTES:
                _, old = self.data.popitem(last=False)
                self.nbytes -= sum(v.nbytes for v in old)

    def track(self, name: str, layers: dict[str, int], arrays: list) -> None:
        """Keep the blocks of graph ``name`` while ``arrays`` live; ``layers`` maps the
        output layers to the item of the relabel output each holds."""
        if SWEEP_CACHE_BYTES <= 0:
            return
        if not self.registered:  # (a global callback: any local compute may reuse blocks)
            self.register()
            self.registered = True
        with self.lock:
            self.live[name] = self.live.get(name, 0) + len(arrays)
            self.layers.update({layer: (name, i) for layer, i in layers.items()})
        for a in arrays:
            weakref.finalize(a, self._release, name)

    def _release(self, name: str) -> None:
        with self.lock:
            self.live[name] -= 1
            if self.live[name] > 0:
                return
            del self.live[name]
            self.layers = {k: v for k, v in self.layers.items() if v[0] != name}
            for key in [k for k in self.data if k[0] == name]:
                self.nbytes -= sum(v.nbytes for v in self.data.pop(key))


_SWEEP_CACHE = _SweepCache()


# ---------------------------------------------------------------- public
def score_bins(score: str, bins: int | None, classifier=None) -> int:
    """Histogram bins the region graph needs for ``score`` (checked up front); a learned
    score takes its classifier's."""
    parse_score(score)
    if score == "learned":
        need = LEARNED_BINS if classifier is None else classifier.bins
        if bins is not None and int(bins) != need:
            raise ValueError(f"the learned score's classifier needs bins = {need}, got {bins}")
        return need
    quantile = score not in ("mean", "max")
    bins = (32 if quantile else 0) if bins is None else int(bins)
    if quantile and bins < 2:
        raise ValueError(f"score {score!r} needs a histogram: bins must be >= 2, got {bins}")
    return bins


def _as_affinities(affinities: Any) -> tuple[da.Array, xr.DataArray | None]:
    template = affinities if isinstance(affinities, xr.DataArray) else None
    data = affinities.data if template is not None else affinities
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks=(-1,) + data.shape[1:] if data.ndim == 4 else -1)
    if data.ndim != 4:
        raise ValueError(
            f"affinities must be 4-D (3, z, y, x), got {data.ndim}-D shape {data.shape}"
        )
    if min(data.shape[1:]) == 0:
        raise ValueError(f"affinities are empty (shape {data.shape})")
    if data.shape[0] != 3:
        raise ValueError(
            f"affinities must have 3 nearest-neighbour channels (z, y, x), got {data.shape[0]}"
            " (for a net with long-range outputs pass affinities[:3])"
        )
    if not (np.issubdtype(data.dtype, np.floating) or data.dtype == np.uint8):
        # uint16 too: its scale is the writer's choice (x65535? x1000?), so it is not guessed
        raise ValueError(
            f"affinities must be float in [0, 1] or uint8 (scaled by 1/255), got {data.dtype}"
            "; convert them, e.g. affs.astype('float32') / scale"
        )
    return data.rechunk({0: -1}), template


def _raw_input(raw: Any, shape: tuple) -> Any:
    """The raw EM for a learned score's raw features, checked: a volume still in its
    file is read from there, block by block; anything else as a Dask array."""
    source = stored_source(raw) if isinstance(raw, xr.DataArray) else None
    raw = raw.data if isinstance(raw, xr.DataArray) else raw
    if tuple(raw.shape) != shape:
        raise ValueError(f"raw {tuple(raw.shape)} and affinities {shape} differ in shape")
    if raw.dtype != np.uint8:
        raise ValueError(f"raw must be uint8 EM (the classifier's raw features are in its "
                         f"units), got {raw.dtype}")
    if source is not None:
        return source
    return raw if isinstance(raw, da.Array) else da.from_array(np.asarray(raw))


def segment(
    affinities: Any,
    thresholds: Sequence[float] | None = None,
    *,
    low: float = 0.0001,
    high: float = 0.9999,
    size_threshold: int = 25,
    merge_threshold: float = 0.5,
    dust_size: int = 0,
    score: str = "mean",
    bins: int | None = None,
    return_fragments: bool = False,
    return_info: bool = False,
    mask: Any = None,
    classifier: Any = None,
    raw: Any = None,
    solve: str = "auto",
):
    """Segment affinities into neurons, blockwise, identically for any chunking.

    Parameters
    ----------
    affinities
        (3, z, y, x) nearest-neighbour affinities: a DataArray, Dask or numpy array, float
        in [0, 1] or uint8 (scaled by 1/255).  Channel ``d`` at voxel ``v`` is the affinity
        between ``v`` and ``v - e_d``.  The Dask chunks are the blocks.
    thresholds
        Strictly increasing agglomeration thresholds (merge costs, 1 - affinity score);
        one segmentation per threshold, from one pass over the graph.  Default: the
        model card's threshold (the ``threshold`` attr of
        :func:`emdask.predict_affinities`' result).
    low, high, size_threshold, merge_threshold, dust_size
        Watershed parameters, see :class:`emdask.watershed.WatershedParams`.
    score
        Agglomeration score: ``"mean"`` affinity (default), ``"max"``, ``"median"``,
        ``"quantile-NN"``, or ``"learned"``: the probability of a right merge given by
        ``classifier`` from the boundary's affinities, the regions' sizes and (if it was
        trained with them) the raw EM's statistics (:mod:`emdask.learn_agglomeration`).
    bins
        Histogram bins per graph edge (default 32 for quantile scores, the classifier's
        for the learned score, else 0).
    return_fragments
        Also return the watershed fragments (supervoxels after small-region merging),
        as the first element of the list.
    return_info
        Also return a delayed :class:`SegmentationInfo` (graph sizes).
    mask
        Optional (z, y, x) boolean volume of missing data (from
        :func:`emdask.detect_defects`): edges touching it get affinity 0, so its voxels are
        background and no segment is joined across a missing section.
    classifier
        For ``score="learned"``: a shipped classifier's name (that of the boundary net whose
        affinities it was trained on, e.g. ``"fibsem"``), a file from
        :meth:`~emdask.learn_agglomeration.EdgeClassifier.save`, or the classifier itself.
    raw
        The (z, y, x) uint8 EM the affinities were predicted from, for a classifier that
        uses raw features (ignored otherwise).  Only the watershed pass reads it (from its
        file, for a volume opened from one).
    solve
        How the global step (joining the blocks' graphs and agglomerating) runs:
        ``"tree"``, in a tree of boxes of blocks that each pass up only what touches their
        open faces (:mod:`emdask.solve_tree`; mean and max scores), or ``"global"``, in
        one task that holds the whole graph (any score).  The results are identical, ids
        included; the tree's memory per task follows a box's faces, not the volume (see
        the README's Scaling).  ``"auto"`` (default): the tree where the score allows it
        and the volume has more than :data:`TREE_MIN_BLOCKS` blocks.

    Returns
    -------
    list
        One lazy uint64 segmentation (z, y, x) per threshold, in threshold order
        (DataArrays with the input's coordinates if the input was one), preceded by the
        fragments if asked; and the info if asked, as ``(list, info)``.

    Notes
    -----
    The segmentations of one call share their work: however they are computed (together,
    or one after another as in ``[s.values for s in segment(affs, thresholds)]``), the
    affinities upstream (a net), the watershed and the global solve run once; each block's
    outputs for every threshold are kept while the results live (up to
    :data:`SWEEP_CACHE_BYTES`, local schedulers; on a ``distributed`` cluster compute them
    together with ``dask.compute(*segs)``).

    Examples
    --------
    >>> import numpy as np
    >>> affs = np.ones((3, 4, 4, 4), np.float32); affs[2, :, :, 2] = 0.0  # a wall at x=2
    >>> [seg] = segment(affs, [0.5], size_threshold=0)
    >>> np.unique(seg.compute()).tolist()
    [1, 2]
    """
    if thresholds is None:
        card = getattr(affinities, "attrs", {}).get("threshold")
        if card is None:
            raise ValueError("give thresholds: these affinities carry no model card's "
                             "threshold (they were not made by predict_affinities)")
        thresholds = [card]
    data, template = _as_affinities(affinities)
    if mask is not None:
        data = mask_affinities(data, mask)
        template = None if template is None else template.copy(data=data)
    thr = _check_thresholds(thresholds)
    params = WatershedParams(low, high, size_threshold, merge_threshold, dust_size)
    if score == "learned":
        if classifier is None:
            raise ValueError("score='learned' needs a classifier: a shipped name "
                             "('fibsem') or a file from train_agglomeration")
        classifier = load_classifier(classifier)
        if classifier.raw and raw is None:
            raise ValueError("this classifier uses raw EM features: pass raw=, the EM "
                             "the affinities were predicted from")
    bins = score_bins(score, bins, classifier)
    shape = tuple(int(s) for s in data.shape[1:])
    step = watershed_step(params, bins, labels=False)
    # Each block task gets its block plus a halo (zeros beyond the volume: the kernel knows
    # the volume's shape and ignores edges outside it).  Input in a file (zarr, HDF5) is
    # read block plus halo by each task that needs it, in both passes, with decoded chunks
    # cached per worker (a halo reaches into 26 neighbouring chunks): nothing is held
    # between the passes but the block summaries, so memory is bounded by blocks in flight
    # plus the global graph.  A Dask input's blocks are held until the relabel pass
    # (bounded by the input's size: it is in memory already).
    stored = stored_source(template) if template is not None else None
    g = BlockGraph("segment", data.chunks[1:])
    inputs = g.read("input", data if stored is None else stored, step.halo_of(0),
                    cache=uuid.uuid4().hex)
    reads = [inputs]
    if classifier is not None and classifier.raw:  # (read by the watershed pass only)
        reads.append(g.read("raw", _raw_input(raw, shape), step.halo_of(1),
                            cache=uuid.uuid4().hex))
    summaries = g.step("watershed", step, reads, shape)
    tree_solve = use_tree(solve, score, int(np.prod(g.grid)))
    if tree_solve:
        solutions, info = _tree_tasks(g, summaries, params, bins, thr, score)
    else:  # one global task (see emdask.solve_tree for why these scores need it)
        solution = g.solve(
            summaries, face_links, _solve,
            link_args={"high_q": params.quantized()[1], "bins": bins},
            solve_args={"params": params, "thresholds": thr, "score": score,
                        "classifier": classifier})
        solutions = {idx: g.add("lut", idx, _block_solution, solution, block)
                     for idx, block, _, _ in g.blocks()}
        info = g.item("info", (), solution, 2)
    relabelled = {idx: g.add("relabel", idx, _relabel, inputs[idx], solutions[idx],
                             origin=origin, shape=shape, params=params,
                             sweep=(g.name, idx))
                  for idx, _, origin, _ in g.blocks()}
    results = [g.array(f"labels{i}", relabelled, np.uint64, item=i)
               for i in range(len(thr) + 1)]
    if not return_fragments:
        results = results[1:]
    _SWEEP_CACHE.track(g.name, {f"{g.name}-labels{i}": i for i in range(len(thr) + 1)},
                       results)
    if template is not None:
        spatial = template.isel(c=0, drop=True) if "c" in template.dims else template
        results = [xr.DataArray(r, dims=("z", "y", "x"), coords=spatial.coords,
                                attrs=dict(template.attrs), name="segmentation")
                   for r in results]
    if return_info:
        return results, g.delayed(info)
    return results
