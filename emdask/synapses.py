"""Synapses: objects from a synapse probability map, their partner segments, scores.

``find_synapses`` thresholds a (lazy) probability map and groups the synaptic voxels into
objects blockwise, with the same machinery as :func:`emdask.segment`: each block labels
its connected components (6-connected, connected-components-3d), components that touch
across a block face are joined by a union-find over all blocks, and every object is known
by its lowest global voxel index.  Sizes are summed over blocks before the size filter,
so the objects and their ids are the same for any chunking.

``assign_partners`` ranks, for each synapse, the segments it touches (within a small
in-plane radius) by contact; ``predict_direction`` decides which of the two top partners
is presynaptic with an attentional partner net (Turner et al. 2020: given the EM and a
mark on one synapse, the net outputs the voxels of that synapse's presynaptic and
postsynaptic cells), trained from CREMI partner annotations
(``read_partner_annotations``); ``connectome`` turns the partner table into an edge list;
``synapse_scores`` compares detected objects with ground truth (precision, recall and F1
of objects matched by overlap, and the CREMI distances).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from emdask.blockwise import BlockGraph, Step, Where, map_reduce
from emdask.segmentation import SWEEP_CACHE_BYTES, _apply_luts, _supervoxels
from emdask.volumes import stored_source

__all__ = ["assign_partners", "connectivity_matrix", "connectome", "find_synapses",
           "partner_accuracy", "predict_direction", "read_partner_annotations",
           "synapse_scores"]


# ---------------------------------------------------------------- objects
def _components(mask: np.ndarray) -> np.ndarray:
    import cc3d

    return cc3d.connected_components(np.ascontiguousarray(mask), connectivity=6,
                                     out_dtype=np.uint32)


def _block_objects(mask: np.ndarray, *, where: Where):
    """Block-local components, their lowest global voxel index, size, coordinate sums and
    bounding boxes (global voxels), and the labels on the block's faces."""
    origin, shape = where.box.begin, where.shape
    labels = _components(mask)
    n = int(labels.max())
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx].astype(np.int64) - 1
    coords = np.stack(np.unravel_index(idx, labels.shape)) + np.asarray(origin)[:, None]
    flat = np.ravel_multi_index(coords, shape)
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, lab, flat)
    size = np.bincount(lab, minlength=n).astype(np.int64)
    sums = np.stack([np.bincount(lab, weights=c, minlength=n) for c in coords])
    lo = np.full((3, n), np.iinfo(np.int64).max, np.int64)
    hi = np.full((3, n), -1, np.int64)
    for d in range(3):
        np.minimum.at(lo[d], lab, coords[d])
        np.maximum.at(hi[d], lab, coords[d])
    faces = {(side, d): labels.take(0 if side == "lower" else -1, d)
             for d in range(3) for side in ("lower", "upper")}
    return (first, size), (sums, lo, hi + 1), faces


#: Per block, its objects (components of the mask) and their statistics.
OBJECTS = Step("objects", _block_objects, None, summary=True)


def _face_joins(upper_faces, lower_faces, d: int) -> np.ndarray:
    """Component pairs (block below, block above) that touch across a face."""
    la, lb = lower_faces[("upper", d)], upper_faces[("lower", d)]
    both = (la > 0) & (lb > 0)
    return np.unique(np.stack([la[both].astype(np.int64) - 1,
                               lb[both].astype(np.int64) - 1]), axis=1)


def _objects(infos, stats, links, pairs, min_size: int, max_extent=None):
    """Global objects: lookup table from block-local component to final id, and the
    per-object statistics.  Objects under ``min_size`` voxels, or longer than
    ``max_extent`` voxels along an axis, are dropped."""
    bases, group, sizes, _ = _supervoxels(infos, pairs, links)
    n = sizes.size
    sums = np.zeros((3, n))
    lo = np.full((3, n), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((3, n), np.int64)
    for b, (s, l, h) in enumerate(stats):
        g = group[bases[b]:bases[b + 1]]
        for d in range(3):
            np.add.at(sums[d], g, s[d])
            np.minimum.at(lo[d], g, l[d])
            np.maximum.at(hi[d], g, h[d])
    keep = sizes >= min_size
    if max_extent is not None:
        keep &= np.all(hi - lo <= np.asarray(max_extent)[:, None], axis=0)
    final = np.where(keep, np.cumsum(keep), 0)  # ids 1.. in order of lowest voxel index
    lut = final[group].astype(np.uint64)[None] if group.size else np.zeros((1, 0), np.uint64)
    return lut, bases, (sizes[keep], sums[:, keep], lo[:, keep], hi[:, keep])


def longest(max_extent: float | None, voxel_size) -> np.ndarray | None:
    """The most voxels an object may span along each axis to be no longer than
    ``max_extent`` nm (None: no limit)."""
    if max_extent is None:
        return None
    return np.floor(float(max_extent) / np.asarray(voxel_size, float) + 1e-9).astype(np.int64)


def _relabel(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Block-local components -> object ids, with the block's part of the lookup table."""
    return _apply_luts(_components(mask), lut)[0]


def _operating_point(data: Any, key: str, value: Any, optional: bool = False) -> Any:
    """``value``, or where it is None the model card's: that of the net that made ``data``
    (the attrs of :func:`emdask.predict_synapses`' result, carried on by
    :func:`find_synapses`), else the shipped synapse detector's.  An ``optional`` key that
    the card does not name is None (a net's card is not mixed with the shipped one's)."""
    if value is not None:
        return value
    attrs = data.attrs if isinstance(data, xr.DataArray) else {}
    if key in attrs:
        return attrs[key]
    if optional and "threshold" in attrs:
        return None
    from emdask.models import shipped_operating_point

    shipped = shipped_operating_point("synapses")
    if key not in shipped and not optional:
        raise ValueError(f"give {key}: these synapses carry no model card's {key} and the "
                         "shipped synapse detector's card is not installed")
    return shipped.get(key)


def find_synapses(
    probabilities: Any,
    threshold: float | None = None,
    min_size: int | None = None,
    voxel_size: tuple[float, float, float] | None = None,
    max_extent: float | None = None,
) -> tuple[xr.DataArray, pd.DataFrame]:
    """Synapse objects from a synapse probability map (or a binary mask), blockwise.

    Parameters
    ----------
    probabilities
        (z, y, x) DataArray, Dask or numpy array: floats in [0, 1], uint8 (x 255) or bool.
        The Dask chunks are the blocks.
    threshold
        Voxels with probability >= threshold are synaptic.  Default: the model card's
        (the attrs of :func:`emdask.predict_synapses`' result).
    min_size
        Objects smaller than this many voxels (summed over all blocks) are dropped.
        Default: the model card's.
    voxel_size
        nm per voxel, for the table's centroids and ``max_extent`` (default: the
        DataArray's, else 1).
    max_extent
        Objects whose bounding box is longer than this many nm along any axis are dropped:
        a synaptic density is a small sheet (the larval VNC's labelled densities span at
        most 570 nm), a long dark structure such as a membrane seen along its length is
        not.  Default: the card's that the threshold comes from (that of the net that
        made the probabilities, or the shipped detector's where ``threshold`` is left to
        it too), else no limit; ``numpy.inf``: no limit in any case.

    Returns
    -------
    labels : xarray.DataArray
        Lazy uint64 object ids (0 = none), numbered 1.. in order of each object's lowest
        voxel index: identical for any chunking.
    table : pandas.DataFrame
        One row per object: ``id``, ``size`` (voxels), centroid ``z_nm``, ``y_nm``,
        ``x_nm`` (physical coordinates, offset included) and bounding box ``begin``,
        ``end`` (voxels, end exclusive).
    """
    template = probabilities if isinstance(probabilities, xr.DataArray) else None
    data = template.data if template is not None else probabilities
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    if data.ndim != 3:
        raise ValueError(f"synapse probabilities must be 3-D (z, y, x), got shape {data.shape}")
    attrs = dict(template.attrs) if template is not None else {}
    # The length filter comes from the card the threshold comes from: the net's that made
    # the probabilities (their attrs), else the shipped detector's only where the caller
    # leaves the threshold to it too.  A mask is the caller's own: no card filters it.
    card_extent = max_extent is None and data.dtype != bool and (
        "threshold" in attrs or threshold is None)
    threshold = 1.0 if data.dtype == bool else _operating_point(probabilities, "threshold",
                                                                 threshold)
    min_size = _operating_point(probabilities, "min_size", min_size)
    if card_extent:
        max_extent = _operating_point(probabilities, "max_extent", None, optional=True)
    if max_extent is not None and (isinstance(max_extent, bool) or not (
            isinstance(max_extent, int | float | np.number) and max_extent > 0)):
        raise ValueError(f"max_extent must be a positive number of nm, got {max_extent!r}")
    if max_extent is not None and np.isinf(max_extent):
        max_extent = None  # no limit, whatever the card says
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.number):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if data.dtype == np.uint8:
        mask = data >= np.uint8(min(255, int(np.ceil(threshold * 255 - 1e-9))))
    elif data.dtype == bool or np.issubdtype(data.dtype, np.floating):
        mask = data >= threshold if data.dtype != bool else data
    else:
        raise ValueError(f"synapse probabilities must be float, uint8 or bool, got {data.dtype}")
    if voxel_size is None and "voxel_size" not in attrs and max_extent is not None:
        raise ValueError(
            f"max_extent {max_extent:g} nm ({'the model card' if card_extent else 'given'}) "
            "needs the voxel size: give voxel_size (or a DataArray that carries it)"
            + (", or max_extent=numpy.inf for no limit" if card_extent else ""))
    vs = np.asarray(voxel_size if voxel_size is not None
                    else attrs.get("voxel_size", (1.0, 1.0, 1.0)), float)
    offset = np.asarray(attrs.get("offset", (0.0, 0.0, 0.0)), float)
    shape = tuple(int(n) for n in data.shape)
    if (template is None or stored_source(template) is None) and (
            mask.nbytes <= SWEEP_CACHE_BYTES):
        # computed probabilities (a net upstream): both passes below read the mask, so it
        # is computed once and kept (1 byte a voxel, within the sweep cache's budget)
        # instead of running the net twice
        mask = mask.persist()
    g = BlockGraph("synapses", mask.chunks, dependency=mask)
    keys = np.empty(g.grid, object)
    keys[...] = mask.__dask_keys__()
    inputs = {idx: keys[idx] for idx in np.ndindex(*g.grid)}
    solution = g.solve(g.step("objects", OBJECTS, [inputs], shape), _face_joins, _objects,
                       link_args={}, solve_args={"min_size": int(min_size),
                                                 "max_extent": longest(max_extent, vs)})
    # The global solve is small (one row per object): computed now for the table, it
    # enters the relabel pass as a value, each block given its own part of the table.
    lut, bases, stats = g.delayed(solution).compute()
    out = BlockGraph("synapses", mask.chunks, dependency=mask)
    relabelled = {idx: out.add("relabel", idx, _relabel, keys[idx],
                               lut=lut[:, bases[block]:bases[block + 1]])
                  for idx, block, _, _ in out.blocks()}
    labels = out.array("labels", relabelled, np.uint64)
    sizes, sums, lo, hi = stats
    centroid = offset[:, None] + vs[:, None] * (sums / np.maximum(sizes, 1))
    table = pd.DataFrame({
        "id": np.arange(1, sizes.size + 1, dtype=np.uint64), "size": sizes,
        "z_nm": centroid[0], "y_nm": centroid[1], "x_nm": centroid[2],
        "begin": pd.Series([tuple(map(int, b)) for b in lo.T], dtype=object),
        "end": pd.Series([tuple(map(int, e)) for e in hi.T], dtype=object),
    })
    coords = template.coords if template is not None else None
    carried = {k: attrs[k] for k in ("radius",) if k in attrs}  # for assign_partners
    return (xr.DataArray(labels, dims=("z", "y", "x"), coords=coords,
                         attrs={"voxel_size": tuple(vs), "offset": tuple(offset)} | carried,
                         name="synapses"), table)


# ---------------------------------------------------------------- scores
def synapse_scores(detected: Any, truth: Any, voxel_size=(1.0, 1.0, 1.0),
                   min_size: int = 0, distances: bool = True) -> dict:
    """Detected synapse objects against ground-truth objects.

    Objects are matched one to one by overlap, the assignment of largest total overlap; a
    detection left without a true object is a false positive.  Also the CREMI distances
    (nm): the mean distance of detected synaptic voxels to the nearest true one
    (``fp_distance``) and of true voxels to the nearest detected one (``fn_distance``).

    A true object that touches the volume's edge with fewer than ``min_size`` voxels
    inside (a synapse that lies almost entirely outside the region scored) is not scored:
    give the detection's size filter, since a detection of that piece alone would be
    filtered out.  Neither it nor a detection that overlaps only such pieces counts.

    Dask inputs are scored blockwise, in two passes over their blocks (an overlap table;
    then the voxels outside the other's objects, and the objects' surfaces, from which
    the distances are exact): memory is bounded by a block, the table and those voxels,
    not by the volume.  ``distances=False`` skips the second pass (the distances are then
    NaN): a search over operating points that needs only F1 runs several times faster.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``n_detected``, ``n_true``, ``n_matched``,
        ``fp_distance``, ``fn_distance``.
    """
    from emdask.metrics import _merge_tables

    det, gt = (x.data if isinstance(x, xr.DataArray) else x for x in (detected, truth))
    if det.shape != gt.shape:
        raise ValueError(f"detected shape {det.shape} differs from truth shape {gt.shape}")
    det = da.asarray(det, chunks=det.shape if not isinstance(det, da.Array) else None)
    gt = da.asarray(gt).rechunk(det.chunks)
    (gt_ids, det_ids, counts), edge = map_reduce(_overlaps, _merge_overlaps, [gt, det],
                                                 shape=gt.shape).compute()
    dropped_gt, dropped_det = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if min_size > 0:
        ids, inv = np.unique(gt_ids, return_inverse=True)
        sizes = np.bincount(inv, counts)
        dropped_gt = ids[(ids > 0) & (sizes < min_size) & np.isin(ids, edge)]
        cut = np.isin(gt_ids, dropped_gt)
        # detections touching only cut pieces are left out, like the pieces
        dropped_det = np.setdiff1d(det_ids[cut], det_ids[(gt_ids > 0) & ~cut])
        dropped_det = dropped_det[dropped_det > 0]
        gt_ids = np.where(cut, 0, gt_ids).astype(np.uint64)
        det_ids = np.where(np.isin(det_ids, dropped_det), 0, det_ids).astype(np.uint64)
        gt_ids, det_ids, counts = _merge_tables((gt_ids, det_ids, counts))
    n_det = np.unique(det_ids[det_ids > 0]).size
    n_gt = np.unique(gt_ids[gt_ids > 0]).size
    n_match = len(_match_table(gt_ids, det_ids, counts))
    precision = n_match / n_det if n_det else 1.0
    recall = n_match / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores = {"precision": precision, "recall": recall, "f1": f1, "n_detected": n_det,
              "n_true": n_gt, "n_matched": n_match}
    if not distances:
        return scores | {"fp_distance": np.nan, "fn_distance": np.nan}
    parts = map_reduce(_distance_parts, _concat_parts, [gt, det], shape=gt.shape,
                       voxel_size=tuple(float(v) for v in voxel_size),
                       dropped_gt=dropped_gt, dropped_det=dropped_det).compute()
    return scores | {"fp_distance": _mean_distance(*parts[0]),
                     "fn_distance": _mean_distance(*parts[1])}


def _overlaps(gt: np.ndarray, det: np.ndarray, origin, shape):
    """Pass 1 of :func:`synapse_scores` on a block: the (true, detected, count) table of
    voxels where either is an object, and the true ids on the volume's faces."""
    from emdask.metrics import _pair_counts

    faces = [np.take(gt, [0], axis=d).ravel() for d in range(3) if origin[d] == 0]
    faces += [np.take(gt, [-1], axis=d).ravel() for d in range(3)
              if origin[d] + gt.shape[d] == shape[d]]
    edge = np.unique(np.concatenate(faces)) if faces else np.zeros(0, gt.dtype)
    return _pair_counts(gt, det, either=True), edge.astype(np.uint64)


def _merge_overlaps(*parts):
    from emdask.metrics import _merge_tables

    return (_merge_tables(*(p[0] for p in parts)),
            np.unique(np.concatenate([p[1] for p in parts])))


def _distance_parts(gt: np.ndarray, det: np.ndarray, origin, shape, voxel_size,
                    dropped_gt, dropped_det):
    """Pass 2 of :func:`synapse_scores` on a block, for each direction (detected to true,
    true to detected): the source voxels inside the target (distance 0), the positions
    (nm) of those outside it, and of the target's surface voxels (block faces included),
    among which the nearest target voxel of any outside point lies."""
    import scipy.ndimage as ndi

    t = (gt > 0) & ~np.isin(gt, dropped_gt)
    d = (det > 0) & ~np.isin(det, dropped_det)
    scale = np.asarray(voxel_size) * 1.0

    def nm(mask):
        return (np.argwhere(mask) + np.asarray(origin)) * scale

    def surface(mask):
        return nm(mask & ~ndi.binary_erosion(mask, border_value=0))

    return ((np.count_nonzero(d & t), nm(d & ~t), surface(t), bool(t.any())),
            (np.count_nonzero(t & d), nm(t & ~d), surface(d), bool(d.any())))


def _concat_parts(*parts):
    return tuple((sum(p[k][0] for p in parts), np.concatenate([p[k][1] for p in parts]),
                  np.concatenate([p[k][2] for p in parts]), any(p[k][3] for p in parts))
                 for k in range(2))


def _mean_distance(n_in: int, outside: np.ndarray, surface: np.ndarray,
                   any_target: bool) -> float:
    """Mean distance (nm) of the source voxels to the nearest target voxel (0 inside)."""
    from scipy.spatial import cKDTree

    if n_in + len(outside) == 0:
        return 0.0
    if not any_target:
        return float("inf")
    if not len(outside):
        return 0.0
    dist, _ = cKDTree(surface).query(outside)
    return float(dist.sum() / (n_in + len(outside)))


def _match_table(gt_ids: np.ndarray, det_ids: np.ndarray, counts: np.ndarray
                 ) -> dict[int, int]:
    """One-to-one matches, detected id -> true id, of largest total overlap, from an
    overlap table.

    Greedy matching (largest overlap first) can waste a match: a detection spanning two
    true synapses takes the one it overlaps most, although that one is also covered by a
    second detection.  The optimal assignment (Hungarian, within each group of objects
    linked by overlaps, so the matrices stay small) matches both."""
    import scipy.sparse as sp
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import connected_components

    both = (det_ids > 0) & (gt_ids > 0)
    gt_ids, det_ids, counts = gt_ids[both], det_ids[both], counts[both]
    if not len(counts):
        return {}
    dets, di = np.unique(det_ids, return_inverse=True)
    gts, gi = np.unique(gt_ids, return_inverse=True)
    nd = len(dets)
    graph = sp.coo_matrix((np.ones(len(di)), (di, nd + gi)), shape=(nd + len(gts),) * 2)
    _, group = connected_components(graph, directed=False)
    matches = {}
    for g in np.unique(group[di]):
        edges = np.flatnonzero(group[di] == g)
        rows, r = np.unique(di[edges], return_inverse=True)
        cols, c = np.unique(gi[edges], return_inverse=True)
        overlap = np.zeros((len(rows), len(cols)))
        overlap[r, c] = counts[edges]
        for a, b in zip(*linear_sum_assignment(overlap, maximize=True), strict=True):
            if overlap[a, b] > 0:
                matches[int(dets[rows[a]])] = int(gts[cols[b]])
    return matches


def _read_local(*arrays: Any) -> tuple:
    """Small (lazy) reads, one per synapse, computed with threads in this process: through
    a cluster of worker processes each is a round trip (partner_accuracy on the demo's VNC
    rows: 28.1 s there, 5.8 s here; predict_direction 7 ms a patch)."""
    return dask.compute(*arrays, scheduler="threads")


def _match(detected: Any, truth: Any) -> dict[int, int]:
    """:func:`_match_table` of two label volumes."""
    from emdask.metrics import contingency_table

    return _match_table(*contingency_table(detected, truth))


def partner_accuracy(detected: Any, truth: Any, cells: Any, segmentation: Any,
                     radius=(0, 6, 6), second: float = 0.5,
                     cells_radius=None) -> tuple[int, int]:
    """How many detected synapses get the right two partners, of those matching a true one.

    For each detected synapse matched to a true synapse (by overlap, as
    :func:`synapse_scores`), in the section where the true synapse is largest, the
    ``cells`` (per-section ground-truth cells, as the larval VNC's ``labels/cell_ids_2d``)
    within ``cells_radius`` (default: ``radius``) of the true synapse are ranked as
    :func:`assign_partners` ranks segments.  The detection is right when its two
    top-ranked segments of ``segmentation`` (:func:`assign_partners` with ``radius``) lie,
    by majority overlap, in the first cell and in a cell on the other side of the synapse
    whose contact there is at least ``second`` times that of the second-ranked cell.
    Insect synapses are polyadic (one presynaptic cell facing several postsynaptic ones,
    often with near-equal contact), so which of those ranks second is a toss-up;
    ``second=1`` asks for the second-ranked cell itself (or an exact tie).

    Returns
    -------
    right, matched : int
    """
    from emdask.metrics import contingency_table

    det, gt, cells, seg = (x.data if isinstance(x, xr.DataArray) else x
                           for x in (detected, truth, cells, segmentation))
    right, matches = 0, _match(det, gt)
    # each true synapse's largest section, from a (true id, z) table: with Dask inputs
    # counted blockwise, and the volumes then read one section per synapse
    z_of = da.broadcast_to(da.arange(gt.shape[0], chunks=(da.asarray(gt).chunks[0],))[
        :, None, None], gt.shape, chunks=da.asarray(gt).chunks) if isinstance(
        gt, da.Array) else np.broadcast_to(np.arange(gt.shape[0])[:, None, None], gt.shape)
    ids, zs, n = contingency_table(z_of, gt)
    order = np.lexsort((zs, -n, ids))  # per id: the largest count, then the lowest z
    first = np.r_[True, ids[order][1:] != ids[order][:-1]]
    section = dict(zip(ids[order][first].tolist(), zs[order][first].tolist(), strict=True))
    for d, g in matches.items():
        sl = slice(section[g], section[g] + 1)
        g_s, d_s, cells_s, seg_s = _read_local(*(x[sl] for x in (gt, det, cells, seg)))
        _, true = _partner_contacts(np.where(g_s == g, g, 0), cells_s,
                                    radius if cells_radius is None else cells_radius, None)
        found = assign_partners(np.where(d_s == d, d, 0), seg_s,
                                radius=radius).set_index("id")
        if d not in found.index or g not in true or len(true[g][0]) < 2:
            continue
        cell_ids, seg_ids, counts = contingency_table(seg_s, cells_s)
        order = np.lexsort((-counts, seg_ids))  # each segment's cell of largest overlap
        cell_of = {}
        for s_, c in zip(seg_ids[order], cell_ids[order], strict=True):
            cell_of.setdefault(int(s_), int(c))
        cell, _, away = true[g]  # cells in ranked order, and their contact across
        first = int(cell[0])
        seconds = ({int(c) for c, n in zip(cell[1:], away[1:], strict=True)
                    if n > 0 and n >= second * away[1]} if away[1] > 0 else {int(cell[1])})
        # a missing partner (0) is never right
        a = cell_of.get(int(found.loc[d, "partner_1"]) or -1, -1)
        b = cell_of.get(int(found.loc[d, "partner_2"]) or -2, -2)
        right += (a == first and b in seconds) or (b == first and a in seconds)
    return right, len(matches)


# ---------------------------------------------------------------- partners
def _moments(synapses: np.ndarray, origin) -> tuple:
    """Per synapse id and section in a block: (id, global z) keys, voxel count, sum of
    global voxel coordinates, and sum of their outer products (float64: exact enough for
    covariances at any volume size)."""
    idx = np.flatnonzero(synapses)
    if not len(idx):
        return np.zeros((0, 2), np.int64), np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3, 3))
    p = np.stack(np.unravel_index(idx, synapses.shape), axis=1) + np.asarray(origin)
    keys, inverse = np.unique(np.stack([synapses.ravel()[idx].astype(np.int64), p[:, 0]],
                                       axis=1), axis=0, return_inverse=True)
    inverse, p, k = inverse.ravel(), p.astype(np.float64), len(keys)
    n = np.bincount(inverse, minlength=k).astype(np.float64)
    first = np.stack([np.bincount(inverse, p[:, i], k) for i in range(3)], axis=1)
    second = np.stack([[np.bincount(inverse, p[:, i] * p[:, j], k) for j in range(3)]
                       for i in range(3)]).transpose(2, 0, 1)
    return keys, n, first, second


class _Sides(NamedTuple):
    """Where each synapse (or, in ssTEM, each of its sections) lies and faces."""

    ids: np.ndarray  # the synapse ids, sorted
    keys: np.ndarray  # sorted: row in ids * (nz + 1) + (section + 1 if planar else 0)
    centres: np.ndarray  # (len(keys), 3) voxels
    normals: np.ndarray  # (len(keys), 3) in voxel units: side = sign((p - centre) . normal)
    planar: bool
    nz: int


def _sides(moments, voxel_size, nz: int) -> _Sides:
    """Centroids and normals (the axis along which a synapse is thinnest, in physical
    units: a synaptic density is a sheet between its partners).  Where sections are much
    thicker than the pixels (ssTEM), each section of a synapse gets its own centroid and
    in-plane normal: a synapse cut obliquely moves from section to section.  Elsewhere a
    synapse gets one 3-D normal, in-plane if it lies in one section."""
    vs = np.asarray(voxel_size, np.float64)
    planar = bool(vs[0] >= 2 * max(vs[1], vs[2]))
    keys = np.concatenate([m[0] for m in moments])
    ids = np.unique(keys[:, 0])
    combined = np.searchsorted(ids, keys[:, 0]) * (nz + 1) + (keys[:, 1] + 1 if planar else 0)
    ukeys, inverse = np.unique(combined, return_inverse=True)
    inverse = inverse.ravel()
    n = np.bincount(inverse, np.concatenate([m[1] for m in moments]), len(ukeys))
    first = np.zeros((len(ukeys), 3))
    second = np.zeros((len(ukeys), 3, 3))
    np.add.at(first, inverse, np.concatenate([m[2] for m in moments]))
    np.add.at(second, inverse, np.concatenate([m[3] for m in moments]))
    centre = first / n[:, None]
    cov = (second / n[:, None, None] - centre[:, :, None] * centre[:, None, :]) * np.outer(vs, vs)
    normals = np.zeros((len(ukeys), 3))
    if len(ukeys):
        normals[:, 1:] = np.linalg.eigh(cov[:, 1:, 1:])[1][:, :, 0]  # in the plane
        # 3-D normals, except in ssTEM or for synapses within one section
        solid = np.zeros(len(ukeys), bool) if planar else cov[:, 0, 0] >= 1e-9 * vs[0] ** 2
        if solid.any():
            normals[solid] = np.linalg.eigh(cov[solid])[1][:, :, 0]
    if planar and len(ukeys) > 1:
        # eigh's sign is arbitrary: turn each section's normal the way of the one below, so
        # a side is the same side in every section of a synapse
        same = (ukeys[1:] // (nz + 1)) == (ukeys[:-1] // (nz + 1))
        turn = np.where(same & ((normals[1:] * normals[:-1]).sum(axis=1) < 0), -1, 1)
        sign = np.cumprod(np.concatenate([[1], turn]))
        starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
        start = starts[np.searchsorted(starts, np.arange(len(ukeys)), side="right") - 1]
        normals *= (sign * sign[start])[:, None]
    # n_phys . (x_phys - c_phys) = (n_phys * vs) . (x_vox - c_vox)
    return _Sides(ids, ukeys, centre, normals * vs, planar, nz)


def _block_moments(synapses: np.ndarray, origin) -> list:
    return [_moments(synapses, origin)]


def _joined(*parts: list) -> list:
    return [x for part in parts for x in part]


def _block_contacts(synapses: np.ndarray, segmentation: np.ndarray, origin, box, radius,
                    halo, sides: _Sides) -> np.ndarray:
    return _contacts(synapses, segmentation, radius, halo, origin, sides)


def _stacked(*parts: np.ndarray) -> np.ndarray:
    return np.hstack(parts)


def _contacts(synapses: np.ndarray, segmentation: np.ndarray, radius, halo, origin,
              sides: _Sides) -> np.ndarray:
    """(synapse, segment, voxels on the normal's side, voxels on the other side) for
    segment voxels within ``radius`` of a synapse (an ellipsoid, in voxels per axis) but
    outside it, each voxel counted for its nearest synapse only, in the block's core (the
    arrays carry ``halo`` extra voxels per side and start at global voxel ``origin``)."""
    import scipy.ndimage as ndi

    core = tuple(slice(h, n - h) for h, n in zip(halo, synapses.shape, strict=True))
    if not synapses.any():
        return np.zeros((4, 0), np.int64)
    # distances in units of the radius: an axis with radius 0 is not grown along
    sampling = [1.0 / r if r else 1e6 for r in radius]
    dist, nearest = ndi.distance_transform_edt(synapses == 0, sampling=sampling,
                                               return_indices=True)
    # the synapse's own voxels do not count: its dark density looks like membrane, and a
    # segmentation cuts it into fragments that are no cell
    grown = np.where((dist > 0) & (dist <= 1.0 + 1e-9), synapses[tuple(nearest)], 0)[core]
    seg = segmentation[core]
    keep = (grown > 0) & (seg > 0)
    if not keep.any():
        return np.zeros((4, 0), np.int64)
    s, g = grown[keep].astype(np.int64), seg[keep].astype(np.int64)
    p = np.argwhere(keep) + np.asarray(origin) + np.asarray(halo)
    key = np.searchsorted(sides.ids, s) * (sides.nz + 1)
    if sides.planar:  # the section of the synapse voxel nearest to each contact voxel
        key += nearest[0][core][keep] + origin[0] + 1
    row = np.searchsorted(sides.keys, key)
    plus = ((p - sides.centres[row]) * sides.normals[row]).sum(axis=1) >= 0
    pairs, inverse = np.unique(np.stack([s, g]), axis=1, return_inverse=True)
    inverse = inverse.ravel()
    return np.vstack([pairs, np.bincount(inverse, plus, pairs.shape[1]),
                      np.bincount(inverse, ~plus, pairs.shape[1])]).astype(np.int64)


def _rank(segments, plus, minus) -> tuple[list[int], np.ndarray]:
    """Order of one synapse's rows, sorted by contact (then segment id): most contact
    first, then the segment with most contact on the other side of the synapse (if any
    has some there), then the rest by contact; and each row's contact on that side."""
    other = minus if plus[0] >= minus[0] else plus
    rest = np.arange(1, len(segments))
    across = rest[other[rest] > 0]
    order = [0]
    if len(across):
        order.append(int(across[np.lexsort((segments[across], -other[across]))[0]]))
    return order + [int(i) for i in rest if i not in order], other


def _partner_contacts(synapses: Any, segmentation: Any, radius, voxel_size
                      ) -> tuple[np.ndarray, dict]:
    """The synapse ids, and for each its segments in :func:`assign_partners` order as
    arrays: segment, contact, and contact on the side away from the first segment."""
    vs = voxel_size if voxel_size is not None else (
        synapses.attrs.get("voxel_size", (1.0, 1.0, 1.0))
        if isinstance(synapses, xr.DataArray) else (1.0, 1.0, 1.0))
    syn = synapses.data if isinstance(synapses, xr.DataArray) else synapses
    seg = segmentation.data if isinstance(segmentation, xr.DataArray) else segmentation
    if tuple(np.shape(syn)) != tuple(np.shape(seg)):
        raise ValueError(f"synapses shape {np.shape(syn)} differs from segmentation shape "
                         f"{np.shape(seg)}")
    if len(np.shape(syn)) != 3:
        raise ValueError(f"synapses must be 3-D (z, y, x), got shape {np.shape(syn)}")
    radius = tuple(int(r) for r in _operating_point(synapses, "radius", radius))
    if len(radius) != 3 or min(radius) < 0 or max(radius[1:]) == 0:
        raise ValueError(f"radius must be 3 voxel counts (z, y, x), >= 0, with y or x > 0, "
                         f"got {radius}")
    syn = syn if isinstance(syn, da.Array) else da.from_array(np.asarray(syn), chunks=-1)
    seg = da.asarray(seg)
    # the halo: the radius, or the whole axis where that is shorter
    halo = tuple(min(r, n) for r, n in zip(radius, syn.shape, strict=True))
    sides = _sides(map_reduce(_block_moments, _joined, [syn]).compute(), vs, syn.shape[0])
    found = map_reduce(_block_contacts, _stacked, [syn, seg], depth=halo, pad=True,
                       radius=radius, halo=halo, sides=sides).compute()
    contacts = (pd.DataFrame({"id": found[0], "segment": found[1], "plus": found[2],
                              "minus": found[3]})
                .groupby(["id", "segment"], as_index=False)[["plus", "minus"]].sum())
    contacts["contact"] = contacts["plus"] + contacts["minus"]
    contacts = contacts.sort_values(["id", "contact", "segment"],
                                    ascending=[True, False, True])
    cols = [contacts[c].to_numpy() for c in ("id", "segment", "contact", "plus", "minus")]
    cuts = np.flatnonzero(np.diff(cols[0])) + 1
    ranked = {}
    for i, segs, contact, plus, minus in zip(*(np.split(c, cuts) for c in cols),
                                             strict=True):
        if not len(i):
            continue
        order, away = _rank(segs, plus, minus)
        ranked[int(i[0])] = (segs[order], contact[order], away[order])
    return sides.ids, ranked


def assign_partners(synapses: Any, segmentation: Any, table: pd.DataFrame | None = None,
                    radius: tuple[int, int, int] | None = None,
                    voxel_size: tuple[float, float, float] | None = None) -> pd.DataFrame:
    """The segments each synapse touches, ranked by contact.

    A segment's contact is its number of voxels within ``radius`` (voxels, z-y-x: an
    ellipsoid) of the synapse but outside it, each voxel counted for its nearest synapse:
    the synapse lies on the membranes between its partners, so its grown mask reaches into
    both.  The first partner is the segment with most contact; the second the one with
    most contact on the *other side* of the synapse (the side of a voxel is that of the
    synapse's normal, its thinnest axis; in ssTEM, in the voxel's section), so two pieces
    of one cell on the same side of the density are not taken for the two partners (where
    no segment touches the other side, the second by contact); the rest follow by
    contact.  No direction model is applied: ``direction`` is ``"unknown"`` rather than a
    guess (``partner_1`` is not implied to be presynaptic).

    Parameters
    ----------
    synapses, segmentation
        Synapse object ids (from :func:`find_synapses`) and the neuron segmentation, on
        the same grid; lazy arrays are counted blockwise (with a halo of ``radius``).
    table
        The synapse table to extend (default: one row per synapse id found).
    radius
        Voxels (z, y, x) around a synapse searched for partners; y or x must be > 0.
        Default: the model card's (carried by :func:`find_synapses`' labels).
    voxel_size
        nm per voxel, for the synapses' normals (default: the synapses DataArray's, else
        isotropic).  With sections at least twice as thick as the pixels, sides are taken
        in each section's plane.

    Returns
    -------
    pandas.DataFrame
        The table with ``partner_1``, ``contact_1``, ``partner_2``, ``contact_2`` (0 where
        there is none), ``partners`` (all touching segments, ranked, with contacts) and
        ``direction``.
    """
    ids, ranked = _partner_contacts(synapses, segmentation, radius, voxel_size)
    out = (pd.DataFrame({"id": ids}) if table is None else table).copy()
    lists = {i: list(zip(segs.tolist(), contact.tolist(), strict=True))
             for i, (segs, contact, _) in ranked.items()}
    for k in (1, 2):
        out[f"partner_{k}"] = [lists.get(int(i), [])[k - 1][0]
                               if len(lists.get(int(i), [])) >= k else 0 for i in out["id"]]
        out[f"contact_{k}"] = [lists.get(int(i), [])[k - 1][1]
                               if len(lists.get(int(i), [])) >= k else 0 for i in out["id"]]
    out["partners"] = [lists.get(int(i), []) for i in out["id"]]
    out["direction"] = "unknown"
    return out


def connectome(partners: pd.DataFrame) -> pd.DataFrame:
    """Edges between segments from a partner table: one row per pair of partners with
    their synapse count and total synapse size.  Synapses whose direction is known (``pre``
    and ``post`` columns of :func:`predict_direction`, non-zero) give directed edges
    ``partner_a`` -> ``partner_b``; the others unordered pairs (``directed`` False,
    ``partner_a`` < ``partner_b``), never a guessed direction."""
    pairs = partners[(partners["partner_1"] > 0) & (partners["partner_2"] > 0)]
    p1, p2 = pairs["partner_1"].to_numpy(), pairs["partner_2"].to_numpy()
    a, b = np.minimum(p1, p2), np.maximum(p1, p2)
    directed = np.zeros(len(pairs), bool)
    if {"pre", "post"} <= set(pairs.columns):  # synapses of unknown direction stay unordered
        directed = (pairs["pre"].to_numpy() > 0) & (pairs["post"].to_numpy() > 0)
        a = np.where(directed, pairs["pre"].to_numpy(), a)
        b = np.where(directed, pairs["post"].to_numpy(), b)
    size = pairs["size"].to_numpy() if "size" in pairs else np.ones(len(pairs), np.int64)
    return (pd.DataFrame({"partner_a": a, "partner_b": b, "directed": directed, "size": size})
            .groupby(["partner_a", "partner_b", "directed"], as_index=False)
            .agg(n_synapses=("size", "size"), total_size=("size", "sum")))


def connectivity_matrix(edges: pd.DataFrame, weight: str = "n_synapses"
                        ) -> tuple[Any, np.ndarray]:
    """The connectome of :func:`connectome` as a sparse adjacency matrix.

    Parameters
    ----------
    edges
        The edge table of :func:`connectome`.
    weight
        The column that gives the entries: ``"n_synapses"`` or ``"total_size"``.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix
        (n, n); entry ``[i, j]`` sums the weights of synapses from segment ``ids[i]`` to
        ``ids[j]``.  Directed edges give one entry (pre -> post); edges of unknown
        direction are entered both ways, so the matrix is symmetric where no direction
        is known.
    ids : numpy.ndarray
        The segment id of each row and column, sorted.
    """
    import scipy.sparse as sp

    if weight not in ("n_synapses", "total_size"):
        raise ValueError(f"weight must be 'n_synapses' or 'total_size', got {weight!r}")
    a, b = edges["partner_a"].to_numpy(), edges["partner_b"].to_numpy()
    w, directed = edges[weight].to_numpy(), edges["directed"].to_numpy(bool)
    ids = np.unique(np.concatenate([a, b])).astype(np.int64)
    i, j = np.searchsorted(ids, a), np.searchsorted(ids, b)
    rows = np.concatenate([i, j[~directed]])
    cols = np.concatenate([j, i[~directed]])
    vals = np.concatenate([w, w[~directed]])
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(ids), len(ids))), ids


# ---------------------------------------------------------------- direction
def read_partner_annotations(url: str, volume: str = "volumes/raw",
                             group: str = "annotations") -> pd.DataFrame:
    """Pre/post partner locations from a CREMI-format HDF5 file, in voxels of ``volume``.

    Reads ``<group>/ids``, ``<group>/locations`` (nm, relative to the group's ``offset``
    attribute if any), and ``<group>/presynaptic_site/partners`` (pairs of ids), and
    converts locations with the volume's ``resolution`` and ``offset``.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``pre_id``, ``post_id``, ``pre`` and ``post`` (z, y, x voxels).
    """
    import h5py

    with h5py.File(url, "r") as f:
        for key in (f"{group}/ids", f"{group}/locations", f"{group}/presynaptic_site/partners",
                    volume):
            if key not in f:
                raise ValueError(f"{url}: no {key!r}; partner annotations need the CREMI "
                                 f"layout ({group}/ids, {group}/locations, "
                                 f"{group}/presynaptic_site/partners)")
        ids = f[f"{group}/ids"][:]
        loc = f[f"{group}/locations"][:].astype(np.float64) + np.asarray(
            f[group].attrs.get("offset", (0.0, 0.0, 0.0)), np.float64)
        pairs = f[f"{group}/presynaptic_site/partners"][:]
        res = np.asarray(f[volume].attrs.get("resolution", (1.0, 1.0, 1.0)), np.float64)
        off = np.asarray(f[volume].attrs.get("offset", (0.0, 0.0, 0.0)), np.float64)
    where = {int(i): np.rint((p - off) / res).astype(int) for i, p in zip(ids, loc,
                                                                            strict=True)}
    missing = [int(i) for pair in pairs for i in pair if int(i) not in where]
    if missing:
        raise ValueError(f"{url}: partner ids without a location: {missing[:5]}")
    return pd.DataFrame({"pre_id": pairs[:, 0].astype(int), "post_id": pairs[:, 1].astype(int),
                         "pre": [tuple(where[int(a)]) for a in pairs[:, 0]],
                         "post": [tuple(where[int(b)]) for b in pairs[:, 1]]})


def attention_ball(shape, centre, radius) -> np.ndarray:
    """The partner net's synapse mark: an ellipsoid of ``radius`` voxels at ``centre``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = [max(float(v), 0.5) for v in radius]
    return sum(((g - c) / q) ** 2 for g, c, q in zip(grids, centre, r, strict=True)) <= 1


def partner_maps(model, raws: np.ndarray, centres) -> np.ndarray:
    """The partner net's presynaptic and postsynaptic outputs (n, 2, z, y, x) for patches
    ``raws`` (n, z, y, x; sizes multiples of the model's factor), each marked at its
    centre."""
    import torch

    from emdask.predict import normalize_raw

    marks = [attention_ball(raws.shape[1:], c, model.config.attention) for c in centres]
    x = np.stack([np.stack([normalize_raw(r), m.astype(np.float32)])
                  for r, m in zip(raws, marks, strict=True)])
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x).to(device))).float().cpu().numpy()


def direction_score(maps: np.ndarray, centre, segmentation: np.ndarray, a: int, b: int,
                    attention) -> float:
    """How strongly segment ``a`` (rather than ``b``) is the presynaptic partner, in
    [-1, 1], from a patch's :func:`partner_maps` (2, z, y, x): the presynaptic output on
    ``a`` minus on ``b``, plus the postsynaptic output on ``b`` minus on ``a``, halved,
    over the voxels within 3 mark radii of the synapse."""
    pre, post = maps
    near = attention_ball(segmentation.shape, centre, [3 * r for r in attention])
    in_a, in_b = near & (segmentation == a), near & (segmentation == b)
    if not in_a.any() or not in_b.any():
        return 0.0
    return float((pre[in_a].mean() - pre[in_b].mean()
                  + post[in_b].mean() - post[in_a].mean()) / 2)


def predict_direction(raw: Any, segmentation: Any, table: pd.DataFrame, model,
                      patch=(8, 96, 96)) -> pd.DataFrame:
    """Which of each synapse's two top partners is presynaptic, by a partner net.

    Parameters
    ----------
    raw, segmentation
        (z, y, x) EM and neuron segmentation on the same grid (lazy arrays are read patch
        by patch).
    table
        The table of :func:`assign_partners` (``partner_1``, ``partner_2``, and the
        bounding box ``begin``/``end`` of :func:`find_synapses`).
    model
        A net trained with ``target = "partners"`` (:func:`emdask.train`).
    patch
        Patch (voxels) around each synapse; rounded up to the model's factor.

    Returns
    -------
    pandas.DataFrame
        The table with ``pre``, ``post``, ``direction`` (``"1->2"``, ``"2->1"``, or
        ``"unknown"`` with ``pre`` = ``post`` = 0 where a synapse has fewer than two
        partners or the net shows no preference) and ``direction_score`` (0..1, how
        clearly the net prefers that direction).
    """
    if model.config.target != "partners":
        raise ValueError(f"this model predicts {model.config.target}, not partners")
    raw = raw.data if isinstance(raw, xr.DataArray) else raw
    seg = segmentation.data if isinstance(segmentation, xr.DataArray) else segmentation
    if tuple(raw.shape) != tuple(seg.shape):
        raise ValueError(f"raw shape {tuple(raw.shape)} differs from segmentation shape "
                         f"{tuple(seg.shape)}")
    size = [-(-p // f) * f for p, f in zip(patch, model.factor, strict=True)]
    out = table.copy()
    pre, post, direction, score = [], [], [], []
    rows = list(out.itertuples())
    for first_row in range(0, len(rows), 256):  # one Dask computation per 256 synapses
        batch = rows[first_row:first_row + 256]
        boxes, pads, centres = [], [], []
        for row in batch:
            centre = [(int(lo) + int(hi) - 1) // 2 for lo, hi in zip(row.begin, row.end,
                                                                      strict=True)]
            start = [c - n // 2 for c, n in zip(centre, size, strict=True)]
            boxes.append(tuple(slice(max(s0, 0), s0 + n) for s0, n in zip(start, size,
                                                                          strict=True)))
            pads.append([(max(-s0, 0), s0 + n - min(s0 + n, m)) for s0, n, m in
                         zip(start, size, raw.shape, strict=True)])
            centres.append([c - s0 for c, s0 in zip(centre, start, strict=True)])
        keep = [k for k, row in enumerate(batch) if row.partner_1 and row.partner_2]
        loaded = _read_local(*[(raw[boxes[k]], seg[boxes[k]]) for k in keep])
        patches = {k: (np.pad(np.asarray(r), pads[k]), np.pad(np.asarray(g), pads[k]))
                   for k, (r, g) in zip(keep, loaded, strict=True)}
        maps = {}
        for n in range(0, len(keep), 16):  # the net runs on 16 patches at a time
            ks = keep[n:n + 16]
            out_maps = partner_maps(model, np.stack([patches[k][0] for k in ks]),
                                    [centres[k] for k in ks])
            maps.update(zip(ks, out_maps, strict=True))
        for k, row in enumerate(batch):
            a, b = int(row.partner_1), int(row.partner_2)
            s = direction_score(maps[k], centres[k], patches[k][1], a, b,
                                model.config.attention) if k in maps else 0.0
            if s == 0:  # fewer than two partners, or no evidence either way
                pre.append(0)
                post.append(0)
                direction.append("unknown")
                score.append(0.0)
                continue
            first = s > 0
            pre.append(a if first else b)
            post.append(b if first else a)
            direction.append("1->2" if first else "2->1")
            score.append(abs(s))
    out["pre"], out["post"] = pre, post
    out["direction"], out["direction_score"] = direction, score
    return out
