"""Errors of a segmentation: the true ones (against ground truth), and the split and merge
errors found without it, ranked for proofreading and corrected where the evidence is
strong.

A **split** leaves one neuron in two segments.  emdask's splits are mostly between
segments that touch, where the agglomeration stopped at a contact whose affinities were
not quite high enough; the candidates are therefore the touching pairs, described by the
affinities across their contact, the contact's size, the segments' sizes, and whether
their skeletons end at the contact pointing at each other (Dmitriev et al. examine
skeleton endpoints for splits).  A small logistic model (:class:`SplitModel`, trained from
ground truth by :func:`train_split_model`) turns those features into the probability that
the pair is one neuron.  Below a size floor (the model card's ``floor``) a segment is
a split whatever its features: no neuron is that small, so :func:`small_joins` joins it
to the touching segment it shares the highest mean affinity with.

A **merge** joins two neurons in one segment.  A merge net (:func:`detect_merges`; trained
on artificial merges of touching ground-truth neurons, :mod:`emdask.training`) sees the EM
and one segment's mask in windows along the segment's skeleton and marks where two neurons
meet; :func:`correct_merges` cuts a segment there, along its graph of watershed fragments.
Both work on lazy arrays a window or a block at a time, as the pipeline's ``errors`` and
``correct`` stages run them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from emdask.metrics import _as_array, contingency_table

__all__ = [
    "SplitModel",
    "apply_cuts",
    "best_windows",
    "candidate_table",
    "contacts",
    "correct_merges",
    "correct_splits",
    "cut_seeds",
    "detect_merges",
    "detect_splits",
    "error_table",
    "fragment_graphs",
    "join_gain",
    "join_lut",
    "load_merge_model",
    "load_split_model",
    "merge_candidates",
    "merge_jobs",
    "merge_net_for",
    "merge_scores",
    "merge_window",
    "plan_cuts",
    "relabel",
    "score_windows",
    "seeded_cut",
    "shipped_error_models",
    "small_joins",
    "split_features",
    "split_labels",
    "train_split_model",
]


# ---------------------------------------------------------------- the truth
def error_table(segmentation: Any, ground_truth: Any, min_voxels: int = 100) -> pd.DataFrame:
    """The true merge and split errors, from the contingency table (computed blockwise).

    A segment overlapping two or more true neurons by at least ``min_voxels`` each is a
    merge; a true neuron covered by two or more segments that way is a split.  ``voi`` is
    the error's share (bits) of VOI merge or VOI split: what fixing it would remove.

    Returns
    -------
    pandas.DataFrame
        Columns ``kind`` ("merge" or "split"), ``segments``, ``true_ids`` (tuples),
        ``voxels`` and ``voi``, largest ``voi`` first.
    """
    gt, seg, count = contingency_table(segmentation, ground_truth)
    columns = ["kind", "segments", "true_ids", "voxels", "voi"]
    if count.size == 0:  # no ground truth: no errors to name
        return pd.DataFrame(columns=columns)
    n = count.sum()
    p = count / n
    rows = []
    for kind, key, other in (("split", gt, seg), ("merge", seg, gt)):
        order = np.argsort(key, kind="stable")
        k, o, c, pk = key[order], other[order], count[order], p[order]
        start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        total = np.add.reduceat(pk, start)
        for i, s in enumerate(start):
            end = start[i + 1] if i + 1 < start.size else k.size
            # background: no segment, no neuron
            big = (c[s:end] >= min_voxels) & (o[s:end] != 0)
            if big.sum() >= 2 and k[s] != 0:
                q = pk[s:end]
                voi = float(-(q * np.log2(q / total[i])).sum())
                ids = tuple(int(x) for x in o[s:end][big])
                segs, true = ((ids, (int(k[s]),)) if kind == "split"
                              else ((int(k[s]),), ids))
                rows.append((kind, segs, true, int(c[s:end].sum()), voi))
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("voi", ascending=False, ignore_index=True)


def split_labels(pairs: np.ndarray, segmentation: Any, ground_truth: Any,
                 min_voxels: int = 100) -> np.ndarray:
    """Whether each pair (a, b) of segments is one true neuron: both segments' largest true
    neuron (by at least ``min_voxels``) is the same."""
    gt, seg, count = contingency_table(segmentation, ground_truth)
    if count.size == 0:
        return np.zeros(len(pairs), bool)
    order = np.lexsort((-count, seg))
    seg, gt, count = seg[order], gt[order], count[order]
    first = np.r_[True, seg[1:] != seg[:-1]]
    best = dict(zip(seg[first].tolist(), np.where(count[first] >= min_voxels, gt[first],
                                                  0).tolist(), strict=True))
    a = np.array([best.get(int(x), 0) for x in pairs[:, 0]])
    b = np.array([best.get(int(x), 0) for x in pairs[:, 1]])
    return (a == b) & (a != 0)


# ---------------------------------------------------------------- merge errors
def _merge_maps(model: Any, raws: np.ndarray, masks: np.ndarray, batch: int = 8
                ) -> np.ndarray:
    """A merge net's output (n, z, y, x) on windows ``raws`` with the object ``masks``."""
    import torch

    from emdask.predict import normalize_raw

    device = next(model.parameters()).device
    out = np.empty(np.shape(masks), np.float32)
    for i in range(0, len(raws), batch):
        x = np.stack([np.stack([normalize_raw(r), m]) for r, m in
                      zip(raws[i:i + batch], masks[i:i + batch], strict=True)])
        with torch.no_grad():
            y = model(torch.from_numpy(x.astype(np.float32)).to(device))
        out[i:i + batch] = torch.sigmoid(y[:, 0]).float().cpu().numpy()
    return out


def merge_scores(model: Any, raws: np.ndarray, masks: np.ndarray, batch: int = 8
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A merge net's verdict on windows: for each (``raws``, ``masks``: n, z, y, x; sizes
    multiples of the net's factor), its highest output on the object's voxels (the
    probability that the object joins two neurons there) and that voxel (z, y, x in the
    window)."""
    masks = np.asarray(masks, bool)
    flat = np.where(masks, _merge_maps(model, raws, masks, batch), 0).reshape(len(masks), -1)
    at = flat.argmax(1)
    where = np.stack(np.unravel_index(at, masks.shape[1:]), axis=1)
    return flat[np.arange(len(flat)), at], where


def merge_candidates(skeleton: Any, spacing_nm: float) -> np.ndarray:
    """Where to look for a merge along a skeleton (points in nm, z-y-x): its branch points
    (where two neurons joined by a merge usually meet) and, for thin necks and contacts
    along a branch, one vertex per cube of ``spacing_nm`` that the skeleton passes, so that
    the number of windows grows with the cable length, not the volume."""
    verts = np.asarray(skeleton.vertices, float)[:, ::-1]  # x-y-z -> z-y-x
    edges = np.asarray(skeleton.edges, int).reshape(-1, 2)
    if len(verts) == 0:
        return np.zeros((0, 3))
    degree = np.bincount(edges.ravel(), minlength=len(verts))
    # branch points first, so that a cube keeps its branch point
    order = np.argsort(degree < 3, kind="stable")
    cells = np.floor(verts[order] / spacing_nm).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    return verts[order][np.sort(first)]


#: The window (nm, each axis) a merge net sees around a candidate point: 48 voxels of an
#: isotropic 10 nm net, 12 x 48 x 48 of a 40 x 10 x 10 nm one.
MERGE_WINDOW_NM = 480.0


def merge_window(model: Any, shape) -> np.ndarray:
    """The window (voxels) a merge net examines: :data:`MERGE_WINDOW_NM` at the net's
    voxel size, cut to the volume ``shape`` and to multiples of the net's factor."""
    window = np.rint(MERGE_WINDOW_NM / np.asarray(model.config.voxel_size, float)).astype(int)
    size = np.array([(min(n, w) // f) * f for n, w, f in zip(shape, window, model.factor,
                                                             strict=True)])
    if np.any(size == 0):
        raise ValueError(f"the volume {tuple(shape)} is smaller than the merge net's "
                         f"factor {model.factor}")
    return size


def merge_jobs(skeletons: dict, window_nm: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(segment, point in nm) for every window to examine: each skeleton's
    :func:`merge_candidates`, spaced half the window's shortest side apart."""
    spacing = float(np.min(window_nm)) / 2
    return [(int(s), p) for s, sk in sorted(skeletons.items())
            for p in merge_candidates(sk, spacing)]


def score_windows(model: Any, raw: Any, segmentation: Any, jobs: list, voxel_size,
                  offset=(0.0, 0.0, 0.0), batch: int = 8) -> pd.DataFrame:
    """The merge net on each job's window (:func:`merge_jobs`), read one at a time from
    ``raw`` and ``segmentation`` (arrays of the whole volume, lazy or not): a row per
    window with ``segment``, ``score`` and the location of its highest voxel in nm."""
    vs, offset = np.asarray(voxel_size, float), np.asarray(offset, float)
    shape = np.asarray(segmentation.shape)
    size = merge_window(model, shape)
    rows = []
    for i in range(0, len(jobs), batch):
        raws, masks, starts, ids = [], [], [], []
        for s, p in jobs[i:i + batch]:
            centre = np.round((np.asarray(p) - offset) / vs - 0.5).astype(int)
            start = np.clip(centre - size // 2, 0, shape - size)
            sl = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
            mask = np.asarray(segmentation[sl]) == s
            if mask.any():
                raws.append(np.asarray(raw[sl]))
                masks.append(mask)
                starts.append(start)
                ids.append(s)
        if ids:
            score, where = merge_scores(model, np.stack(raws), np.stack(masks))
            for s, start, sc, w in zip(ids, starts, score, where, strict=True):
                rows.append((s, float(sc), *(offset + (start + w + 0.5) * vs)))
    return pd.DataFrame(rows, columns=["segment", "score", "z_nm", "y_nm", "x_nm"])


def best_windows(windows: pd.DataFrame, sizes: dict[int, int]) -> pd.DataFrame:
    """Per segment, its highest-scoring window, how many were examined, its size
    (``voxels``, from ``sizes``) and ``gain``: what cutting it removes from VOI merge if it
    holds two neurons, at most (an even cut: one bit per voxel); highest score first."""
    if len(windows) == 0:
        return windows.assign(windows=np.zeros(0, np.int64), voxels=np.zeros(0, np.int64),
                              gain=np.zeros(0))
    count = windows.groupby("segment").size()
    best = windows.sort_values(["score", "segment"], ascending=[False, True],
                               kind="stable").drop_duplicates("segment")
    voxels = np.array([sizes.get(int(s), 0) for s in best.segment], np.int64)
    best = best.assign(windows=count.loc[best.segment].to_numpy(), voxels=voxels,
                       gain=voxels.astype(float))
    return best.reset_index(drop=True)


def detect_merges(raw: Any, segmentation: Any, model: Any = None,
                  skeletons: dict | None = None, min_size: int = 1000,
                  voxel_size=None, batch: int = 8) -> pd.DataFrame:
    """Candidate merge errors (one segment spanning two neurons), ranked for proofreading.

    Every segment of at least ``min_size`` voxels (or, with ``skeletons`` given, every
    segment they name) is examined by a merge net (raw plus the
    segment's mask, :data:`MERGE_WINDOW_NM` wide) in windows centred on its
    skeleton's :func:`merge_candidates` (spaced half a window apart); a segment's score is
    its highest window's, the location that window's highest voxel.  Windows are read one
    at a time, so lazy (Dask, zarr) inputs are never loaded whole.

    Parameters
    ----------
    raw, segmentation
        (z, y, x) EM and segmentation on the same grid (DataArray, Dask or NumPy).
    model
        A merge net (:class:`emdask.models.AffinityUNet` with target ``"merges"``), a
        ``.pt`` file, a shipped name, or None: the shipped one for the segmentation's
        voxel size (:func:`shipped_error_models`; its card gives the validation figures
        and the threshold for automated correction).
    skeletons
        Skeletons per segment id (as :func:`emdask.skeletons.skeletons` gives them; the
        pipeline's skeletons stage); computed here (from the whole segmentation) when not
        given.

    Returns
    -------
    pandas.DataFrame
        ``segment``, ``score``, location in nm (``z_nm``, ``y_nm``, ``x_nm``),
        ``windows`` examined, ``voxels`` (the segment's size) and ``gain``; highest score
        first.
    """
    seg_arr, raw_arr = _as_array(segmentation), _as_array(raw)
    if seg_arr.shape != raw_arr.shape or len(seg_arr.shape) != 3:
        raise ValueError(f"raw {raw_arr.shape} and segmentation {seg_arr.shape} must be "
                         "(z, y, x) volumes on the same grid")
    attrs = getattr(segmentation, "attrs", {})
    vs = _voxel_size(segmentation, voxel_size)
    model = merge_net_for(model, vs)
    offset = np.asarray(attrs.get("offset", (0, 0, 0)), float)
    size = merge_window(model, seg_arr.shape)
    # segment sizes for the gain: per chunk for a Dask segmentation, never loaded whole
    ids, counts = (dask.compute(*da.unique(seg_arr, return_counts=True))
                   if isinstance(seg_arr, da.Array)
                   else np.unique(np.asarray(seg_arr), return_counts=True))
    if skeletons is None:
        skeletons = _skeletons_of(seg_arr, ids[(counts >= min_size) & (ids != 0)], vs,
                                  offset)
    windows = score_windows(model, raw_arr, seg_arr, merge_jobs(skeletons, size * vs), vs,
                            offset, batch)
    return best_windows(windows, dict(zip(ids.tolist(), counts.tolist(), strict=True)))


def _voxel_size(segmentation: Any, voxel_size=None) -> np.ndarray:
    vs = np.asarray(voxel_size if voxel_size is not None else getattr(
        segmentation, "attrs", {}).get("voxel_size", ()), float)
    if vs.shape != (3,):
        raise ValueError("give voxel_size: the segmentation carries none")
    return vs


def merge_net_for(model: Any, voxel_size) -> Any:
    """The merge net ``model`` (None: the shipped one for ``voxel_size``), loaded and
    checked against the segmentation's ``voxel_size`` (within 25%: its window is in nm,
    its features were learned at its own voxels)."""
    vs = np.asarray(voxel_size, float)
    if model is None:
        model = shipped_error_models(vs)[1]
        if model is None:
            raise ValueError(f"no shipped merge net for segmentations at "
                             f"{tuple(vs.tolist())} nm; give one (model=)")
    model = load_merge_model(model)
    if not np.allclose(vs, model.config.voxel_size, rtol=0.25):
        raise ValueError(f"the merge net was trained at {model.config.voxel_size} nm, the "
                         f"segmentation's voxel size is {vs.tolist()} nm")
    return model


def load_merge_model(model: Any = "merges"):
    """A merge net from a model, a ``.pt`` file or a shipped name, checked."""
    from emdask.models import load_model, pretrained

    if isinstance(model, str | Path):
        model = load_model(model) if str(model).endswith(".pt") else pretrained(str(model))
    if model.config.target != "merges":
        raise ValueError(f"a merge net (target 'merges') is needed, got a "
                         f"{model.config.target!r} net")
    return model


def shipped_error_models(voxel_size, score: str = "mean") -> tuple[str | None, str | None]:
    """The shipped split model and merge net for segmentations at ``voxel_size`` (nm,
    within 25% on every axis) made by ``score`` agglomeration, or None where none is:
    ``"splits"`` (``"splits_learned"``) and ``"merges"`` for the fibsem net's 10 nm,
    ``"splits_ssem"`` (``"splits_ssem_learned"``) and ``"merges_ssem"`` for the sstem3d
    net's 40 x 10 x 10 nm.  Split models are calibrated for one agglomeration
    (``_learned``: learned, else mean)."""
    from emdask.models import WEIGHTS, model_config

    vs = np.asarray(voxel_size, float)

    def near(other) -> bool:
        return other is not None and bool(np.all(np.abs(vs / np.asarray(other, float) - 1)
                                                  <= 0.25))

    merge = next((p.stem for p in sorted(WEIGHTS.glob("merges*.pt"))
                  if near(model_config(p).voxel_size)), None)
    split = next((p.stem for p in sorted(WEIGHTS.glob("splits*.json"))
                  if score in ("mean", "learned")
                  and p.stem.endswith("_learned") == (score == "learned")
                  and near(SplitModel.load(p).card.get("voxel_size"))), None)
    return split, merge


# ---------------------------------------------------------------- candidates
_CONTACT = ("a", "b", "contact", "sum", "max", "z", "y", "x")  # per pair: sums over faces


def _contact_sums(seg: np.ndarray, affs: np.ndarray, origin=(0, 0, 0), box=None):
    """The contacts of a block and its segments' sizes, as sums that add across blocks:
    ``(a, b, faces, affinity sum, affinity max, centre sums z, y, x)`` per touching pair
    and ``(ids, voxels)``.  ``seg`` may carry neighbours' voxels (``box``: the block proper,
    in the volume's voxels); a face belongs to the block that holds its lower voxel."""
    from emdask.region_graph import observations
    from emdask.watershed import quantize_affinities

    seg = np.asarray(seg)
    origin = np.asarray(origin)
    begin, end = (np.asarray(b) - origin for b in box) if box is not None else (
        np.zeros(3, int), np.array(seg.shape))
    u, v, w, at = observations(seg, quantize_affinities(np.asarray(affs[:3]), check=False),
                               positions=True)
    low = np.floor(at).astype(np.int64)  # the face's lower voxel
    own = np.all((low >= begin) & (low < end), axis=1)
    u, v, w, at = u[own], v[own], w[own], at[own] + origin
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    proper = seg[tuple(slice(b, e) for b, e in zip(begin, end, strict=True))]
    ids, voxels = np.unique(proper, return_counts=True)
    return _sum_contacts(lo, hi, np.ones(lo.size, np.int64), w, w, at), (ids, voxels)


def _sum_contacts(lo, hi, n, total, top, at):
    """Rows of the same pair summed (``top``: the maximum)."""
    order = np.lexsort((hi, lo))
    lo, hi, n, total, top, at = lo[order], hi[order], n[order], total[order], top[order], \
        at[order]
    if lo.size == 0:
        return lo, hi, n, total, top, at.reshape(0, 3)
    start = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
    return (lo[start], hi[start], np.add.reduceat(n, start), np.add.reduceat(total, start),
            np.maximum.reduceat(top, start), np.add.reduceat(at, start, axis=0))


def _merge_contact_sums(*parts):
    pairs = [p[0] for p in parts]
    merged = _sum_contacts(*(np.concatenate([p[k] for p in pairs]) for k in range(6)))
    ids = np.concatenate([p[1][0] for p in parts])
    voxels = np.concatenate([p[1][1] for p in parts])
    keys, inverse = np.unique(ids, return_inverse=True)
    return merged, (keys, np.bincount(inverse, voxels).astype(np.int64))


def _contacts_and_sizes(segmentation: Any, affinities: Any
                        ) -> tuple[pd.DataFrame, dict[int, int]]:
    """:func:`contacts` and every segment's voxel count, in one pass (blockwise when either
    input is a Dask array: memory bounded by a block and the tables)."""
    from emdask.blockwise import map_reduce
    from emdask.watershed import Q

    seg, affs = _as_array(segmentation), _as_array(affinities)
    if tuple(affs.shape[1:]) != tuple(seg.shape) or affs.shape[0] < 3:
        raise ValueError(f"affinities {tuple(affs.shape)} must be (>= 3, z, y, x) on the "
                         f"segmentation's grid {tuple(seg.shape)}")
    if isinstance(seg, da.Array) or isinstance(affs, da.Array):
        seg = seg if isinstance(seg, da.Array) else da.from_array(seg, chunks=64)
        affs = da.asarray(affs)[:3].rechunk((3, *seg.chunks))
        pairs, (ids, voxels) = map_reduce(_contact_sums, _merge_contact_sums, [seg, affs],
                                          depth=1).compute()
    else:
        pairs, (ids, voxels) = _contact_sums(seg, affs)
    lo, hi, n, total, top, at = pairs
    frame = pd.DataFrame({"a": lo.astype(seg.dtype), "b": hi.astype(seg.dtype),
                          "contact": n, "mean": total / np.maximum(n, 1) / float(Q),
                          "max": top / float(Q)})
    for k, name in enumerate("zyx"):
        frame[name] = at[:, k] / np.maximum(n, 1)
    return frame, dict(zip(ids.tolist(), voxels.tolist(), strict=True))


def contacts(segmentation: Any, affinities: Any) -> pd.DataFrame:
    """Every pair of touching segments: contact size, mean and max affinity across it,
    and the contact's centre (voxels, z-y-x).

    ``affinities``: the nearest-neighbour channels (3, z, y, x), float or uint8.  Dask
    inputs are read block by block (each with one voxel of its neighbours).
    """
    return _contacts_and_sizes(segmentation, affinities)[0]


def _endpoints(skeleton: Any, back: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A skeleton's endpoints (nm) and the unit direction in which each points (from the
    vertex ``back`` edges behind it)."""
    # skeleton vertices are x-y-z nm: turned to z-y-x like everything else here
    verts = np.asarray(skeleton.vertices, float)[:, ::-1]
    edges = np.asarray(skeleton.edges, int)
    if edges.size == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    degree = np.bincount(edges.ravel(), minlength=len(verts))
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(int(a), []).append(int(b))
        neighbours.setdefault(int(b), []).append(int(a))
    ends, dirs = [], []
    for e in np.flatnonzero(degree == 1):
        prev, cur = int(e), neighbours[int(e)][0]
        for _ in range(back - 1):  # walk back along the branch
            nxt = [x for x in neighbours[cur] if x != prev]
            if len(nxt) != 1:
                break
            prev, cur = cur, nxt[0]
        d = verts[e] - verts[cur]
        norm = np.linalg.norm(d)
        if norm > 0:
            ends.append(verts[e])
            dirs.append(d / norm)
    return np.array(ends).reshape(-1, 3), np.array(dirs).reshape(-1, 3)


FEATURES = ("mean", "max", "log_contact", "log_small", "log_large", "end_a", "end_b",
            "facing")


def _skeletons_of(segmentation: Any, ids: np.ndarray, voxel_size, offset) -> dict:
    """Skeletons (:func:`emdask.skeletons.skeletons`) of the segments ``ids`` only."""
    from emdask.skeletons import skeletons

    if not np.size(ids):
        return {}
    seg = np.asarray(segmentation)
    keep = np.where(np.isin(seg, ids), seg, 0)
    return skeletons(xr.DataArray(keep, dims=("z", "y", "x"), attrs={
        "voxel_size": np.asarray(voxel_size, float).tolist(),
        "offset": np.asarray(offset, float).tolist()}))


def split_features(segmentation: Any, affinities: Any, voxel_size,
                   min_size: int = 1000, skeletons: dict | None = None,
                   touching: tuple | None = None) -> pd.DataFrame:
    """The candidate split pairs (touching segments of at least ``min_size`` voxels each)
    and their features (:data:`FEATURES`).

    ``gain``: what joining the pair removes from VOI split if it is one neuron
    (:func:`join_gain`, voxel-bits).  ``end_a`` / ``end_b``: distance (um, capped at 2)
    from the contact to the nearest skeleton endpoint of each segment; ``facing``: how well
    the two nearest endpoints point at each other (mean cosine; 0 where a segment has no
    endpoint).  ``skeletons`` (per
    segment id) and ``touching`` (the contacts and sizes, as the pipeline has them) are
    computed when not given.
    """

    vs = np.asarray(voxel_size, float)
    pairs, size = touching or _contacts_and_sizes(segmentation, affinities)
    big = np.array([size[a] >= min_size and size[b] >= min_size
                    for a, b in zip(pairs.a, pairs.b, strict=True)], bool)
    pairs = pairs[big].reset_index(drop=True) if len(pairs) else pairs
    if skeletons is None:
        skeletons = _skeletons_of(_as_array(segmentation), np.unique(
            np.r_[pairs.a.to_numpy(), pairs.b.to_numpy()]), vs, (0.0, 0.0, 0.0))
    ends = {k: _endpoints(s) for k, s in skeletons.items()}
    rows = []
    for p in pairs.itertuples():
        at = np.array([p.z, p.y, p.x]) * vs
        feats = []
        nearest = []
        for s in (p.a, p.b):
            e, d = ends.get(int(s), (np.zeros((0, 3)), np.zeros((0, 3))))
            if len(e) == 0:
                feats.append(2.0)
                nearest.append(None)
                continue
            dist = np.linalg.norm(e - at, axis=1)
            i = int(np.argmin(dist))
            feats.append(min(dist[i] / 1000.0, 2.0))
            nearest.append((e[i], d[i]))
        facing = 0.0
        if all(n is not None for n in nearest):
            (ea, da_), (eb, db) = nearest
            gap = eb - ea
            norm = np.linalg.norm(gap)
            if norm > 0:
                facing = 0.5 * (float(da_ @ gap) / norm - float(db @ gap) / norm)
        small, large = sorted((size[p.a], size[p.b]))
        rows.append((np.log10(p.contact), np.log10(small), np.log10(large), *feats, facing,
                     join_gain(small, large)))
    extra = pd.DataFrame(rows, columns=["log_contact", "log_small", "log_large", "end_a",
                                        "end_b", "facing", "gain"], index=pairs.index)
    return pd.concat([pairs, extra], axis=1)


def join_gain(a: Any, b: Any) -> Any:
    """Voxel-bits of VOI split that joining two pieces of one neuron (``a`` and ``b``
    voxels) removes: (a + b) H(a / (a + b)); over the volume's voxels, bits of VOI."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.nan_to_num(n * np.log2(n) - a * np.log2(a) - b * np.log2(b))
    return h if h.ndim else float(h)


# ---------------------------------------------------------------- the model
@dataclass
class SplitModel:
    """Logistic model: P(one neuron) = sigmoid(w . standardized features + b)."""

    weights: list
    bias: float
    mean: list
    scale: list
    threshold: float = 0.5  # for automated correction (the card's operating point)
    card: dict = field(default_factory=dict)
    floor: int = 0  # voxels: smaller segments join their best neighbour (small_joins)

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        x = (features[list(FEATURES)].to_numpy(float) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))

    def check_voxel_size(self, voxel_size, where: str) -> None:
        """A segmentation's voxel size must be within 25% of the one the model was
        calibrated at (card ``voxel_size``), on every axis: its floor counts voxels and
        its features were learned there."""
        expected = self.card.get("voxel_size")
        vs = np.asarray(voxel_size, float)
        if expected is not None and np.any(np.abs(vs / np.asarray(expected) - 1) > 0.25):
            raise ValueError(
                f"{where}: voxel size {tuple(vs.tolist())} nm does not match the split "
                f"model's {tuple(float(v) for v in expected)} nm (its floor counts voxels, "
                "its features were learned there); give [errors] split_model = a model "
                "for this resolution, or none")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SplitModel:
        return cls(**json.loads(Path(path).read_text()))


def train_split_model(features: pd.DataFrame, labels: np.ndarray, l2: float = 1.0
                      ) -> SplitModel:
    """Fit the logistic model (L2-regularized log-loss, classes weighted equally)."""
    from scipy.optimize import minimize

    x = features[list(FEATURES)].to_numpy(float)
    y = np.asarray(labels, float)
    if y.min() == y.max():
        raise ValueError("training pairs need both true splits and distinct neurons")
    mean, scale = x.mean(0), x.std(0) + 1e-9
    x = (x - mean) / scale
    w = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))

    def loss(theta):
        z = x @ theta[:-1] + theta[-1]
        p = 1 / (1 + np.exp(-z))
        value = -(w * (y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))).mean()
        grad = x.T @ (w * (p - y)) / len(y)
        return value + 0.5 * l2 * theta[:-1] @ theta[:-1] / len(y), \
            np.r_[grad + l2 * theta[:-1] / len(y), (w * (p - y)).mean()]

    theta = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return SplitModel(theta[:-1].tolist(), float(theta[-1]), mean.tolist(), scale.tolist())


# ---------------------------------------------------------------- detection, correction
def load_split_model(model: SplitModel | str | Path = "splits") -> SplitModel:
    """A split model from a model, a ``.json`` file or a shipped name (``"splits"``)."""
    if isinstance(model, SplitModel):
        return model
    path = Path(model)
    if path.suffix != ".json":
        path = Path(__file__).parent / "weights" / f"{model}.json"
        if not path.exists():
            raise ValueError(f"no shipped split model {str(model)!r}; give a .json file "
                             "from emdask.errors.train_split_model")
    return SplitModel.load(path)


def detect_splits(segmentation: Any, affinities: Any,
                  model: SplitModel | str | Path = "splits", voxel_size=None,
                  min_size: int = 1000, skeletons: dict | None = None,
                  touching: tuple | None = None) -> pd.DataFrame:
    """Candidate split errors ranked for proofreading.

    ``model``: a :class:`SplitModel`, a file, or a shipped name: ``"splits"`` (the fibsem
    net's segmentations by mean agglomeration) or ``"splits_learned"`` (by learned
    agglomeration); their cards give the validation figures.  ``min_size``: the segments
    examined; the shipped models were calibrated on pairs of at least 1000 voxels each.

    Returns
    -------
    pandas.DataFrame
        One row per pair of touching segments: ``a``, ``b``, ``score`` (probability that
        they are one neuron), the contact's centre in nm (``z_nm``, ``y_nm``, ``x_nm``),
        the features and ``gain`` (:func:`join_gain`); highest score first
        (:func:`candidate_table` ranks them for proofreading).
    """
    model = load_split_model(model)  # (skeletons and touching: see split_features)
    if voxel_size is None:
        voxel_size = getattr(segmentation, "attrs", {}).get("voxel_size")
        if voxel_size is None:
            raise ValueError("give voxel_size: the segmentation carries none")
    feats = split_features(segmentation, affinities, voxel_size, min_size, skeletons,
                           touching)
    feats["score"] = model.predict(feats)
    return _in_nm(feats, segmentation, voxel_size).sort_values("score", ascending=False,
                                                               ignore_index=True)


def _in_nm(frame: pd.DataFrame, segmentation: Any, voxel_size) -> pd.DataFrame:
    """``frame`` with its voxel positions (``z``, ``y``, ``x``) also in nm (``z_nm`` ...),
    from the voxel size and the segmentation's offset."""
    vs = np.asarray(voxel_size, float)
    offset = np.asarray(getattr(segmentation, "attrs", {}).get("offset", (0, 0, 0)), float)
    return frame.assign(**{f"{name}_nm": offset[axis] + frame[name].to_numpy(float) * vs[axis]
                           for axis, name in enumerate("zyx")})


def small_joins(segmentation: Any, affinities: Any, floor: int, voxel_size=(1.0, 1.0, 1.0),
                touching: tuple | None = None) -> pd.DataFrame:
    """Joins that leave no segment under ``floor`` voxels: each such segment (or group
    already joined) to the touching segment (or group) it shares the highest mean affinity
    with, in rounds until every group reaches the floor or touches nothing else.

    Mean agglomeration stops at every contact below its threshold, so it leaves thousands
    of specks of a few hundred voxels along membranes (on the fibsem net's medulla
    validation, 15,000 segments under 200 voxels, 4% of the voxels); each is a split
    error, since no neuron is that small.  Two large segments are never joined through
    specks: only groups under the floor make joins, one each per round.  Ties go to the
    lower id.  ``touching``: the contacts and sizes, as :func:`split_features` takes them
    (computed blockwise when not given).

    Returns
    -------
    pandas.DataFrame
        One row per join, in rounds: ``a`` (a segment of the small group: its lowest id),
        ``b`` (one of the group it joins), ``score`` (the mean affinity between the two
        groups), ``contact``, the contact's centre in voxels (``z``, ``y``, ``x``) and nm
        (``z_nm`` ...), ``gain`` (:func:`join_gain` of the two groups' sizes) and
        ``round``.
    """
    pairs, size = touching or _contacts_and_sizes(segmentation, affinities)
    columns = ["a", "b", "score", "contact", "z", "y", "x", "gain", "round"]
    pairs = pairs[(pairs.a != 0) & (pairs.b != 0)]
    # per pair: sums that add when groups join (affinity and centre weighted by contact)
    edges = pd.DataFrame({"a": pairs.a.to_numpy(), "b": pairs.b.to_numpy(),
                          "contact": pairs.contact.to_numpy(float)})
    for k in ("mean", "z", "y", "x"):
        edges[k] = pairs[k].to_numpy(float) * edges.contact
    sizes = pd.Series(list(size.values()), index=np.array(list(size), dtype=pairs.a.dtype),
                      dtype=np.int64)
    group = pd.Series(np.unique(np.r_[edges.a.to_numpy(), edges.b.to_numpy()]))
    group = pd.Series(group.to_numpy(), index=group.to_numpy())  # segment -> its group
    voxels = sizes.reindex(group.index).to_numpy()  # (in group's order, for every round)
    rounds = []
    for r in range(len(group)):
        g = edges.assign(a=edges.a.map(group), b=edges.b.map(group))
        g = g[g.a != g.b]
        g = pd.concat([g, g.rename(columns={"a": "b", "b": "a"})], ignore_index=True)
        g = g.groupby(["a", "b"], as_index=False, sort=False).sum()
        held = pd.Series(voxels).groupby(group.to_numpy()).sum()  # voxels per group
        g["size_a"] = g.a.map(held).to_numpy()
        g = g[g.size_a < floor]
        if len(g) == 0:
            break
        g["score"] = g["mean"] / g.contact
        best = (g.sort_values(["a", "score", "b"], ascending=[True, False, True],
                              kind="stable").drop_duplicates("a"))
        for k in ("z", "y", "x"):
            best[k] = best[k] / best.contact
        best["gain"] = join_gain(best.size_a.to_numpy(), best.b.map(held).to_numpy())
        rounds.append(best.assign(round=r))
        lut = join_lut(np.c_[best.a.to_numpy(np.uint64), best.b.to_numpy(np.uint64)])
        moved = group.isin(lut[0])
        group[moved] = lut[1][np.searchsorted(lut[0], group[moved].to_numpy(np.uint64))]
    if not rounds:
        return pd.DataFrame(columns=[*columns, "z_nm", "y_nm", "x_nm"])
    out = pd.concat(rounds, ignore_index=True)
    dtype = pairs.a.dtype
    out = out.assign(a=out.a.to_numpy(dtype), b=out.b.to_numpy(dtype))
    return _in_nm(out, segmentation, voxel_size)[[*columns, "z_nm", "y_nm", "x_nm"]]


def join_lut(pairs: np.ndarray, dtype=np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The lookup table that joins each pair (a, b) of segment ids (and, transitively,
    their groups): sorted ids -> the lowest id of their group."""
    pairs = np.asarray(pairs, dtype).reshape(-1, 2)
    ids = np.unique(pairs)
    parent = np.arange(ids.size)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in np.searchsorted(ids, pairs):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(ids.size)], np.int64)
    return ids, ids[roots] if ids.size else ids


def relabel(segmentation: np.ndarray, lut: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``segmentation`` with the ids of ``lut[0]`` (sorted) replaced by ``lut[1]``."""
    seg = np.asarray(segmentation)
    old, new = lut
    out = seg.copy()
    if old.size:
        flat = out.ravel()
        hit = np.isin(flat, old)
        flat[hit] = new[np.searchsorted(old, flat[hit])]
        out = flat.reshape(seg.shape)
    return out


def correct_splits(segmentation: np.ndarray, candidates: pd.DataFrame, threshold: float,
                   small: pd.DataFrame | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Merge the candidate pairs scored at least ``threshold``, and the pairs of ``small``
    (:func:`small_joins`: each speck with its best neighbour), if given.

    Returns the corrected segmentation (each merged group takes its lowest id) and the
    edits (``a``, ``b``, ``score``, ``kept``: the id the two now share; ``reason``:
    "model" or "size"), so that every edit can be reviewed and undone.
    """
    seg = np.asarray(segmentation)
    parts = [(candidates[candidates.score >= threshold], "model")]
    if small is not None:
        parts.append((small, "size"))
    # ids as the segmentation's dtype before the tables meet: a concat of uint64 and int64
    # columns is float64, which loses ids of 2**53 and above
    pairs = np.concatenate([np.c_[t.a.to_numpy(seg.dtype), t.b.to_numpy(seg.dtype)]
                            for t, _ in parts]).reshape(-1, 2)
    lut = join_lut(pairs, seg.dtype)
    edits = pd.DataFrame({"a": pairs[:, 0], "b": pairs[:, 1], "score": np.concatenate(
        [t.score.to_numpy(float) for t, _ in parts]), "kept": lut[1][np.searchsorted(
            lut[0], pairs[:, 0])] if len(pairs) else pairs[:, 0],
        "reason": np.concatenate([[why] * len(t) for t, why in parts]).astype(object)})
    return relabel(seg, lut), edits


def _fragment_sums(frag, seg, affs, origin=(0, 0, 0), box=None, segments=()):
    """:func:`_contact_sums` of the fragments of ``segments`` with each other, within one
    segment (the pairs a cut may separate), and each such fragment's segment."""
    frag, seg = np.asarray(frag), np.asarray(seg)
    inside = np.isin(seg, np.asarray(segments, seg.dtype))
    frag = np.where(inside, frag, 0)
    owner = np.unique(np.stack([frag[inside], seg[inside]]), axis=1)
    pairs, _ = _contact_sums(frag, affs, origin, box)
    lookup = dict(zip(owner[0].tolist(), owner[1].tolist(), strict=True))
    same = np.array([lookup[a] == lookup[b] for a, b in zip(pairs[0].tolist(),
                                                             pairs[1].tolist(), strict=True)],
                    bool).reshape(-1)
    return tuple(x[same] for x in pairs), owner


def _merge_fragment_sums(*parts):
    pairs = _sum_contacts(*(np.concatenate([p[0][k] for p in parts]) for k in range(6)))
    return pairs, np.unique(np.concatenate([p[1] for p in parts], axis=1), axis=1)


def fragment_graphs(fragments: Any, segmentation: Any, affinities: Any, segments
                    ) -> tuple[pd.DataFrame, dict[int, int]]:
    """The graph of each of ``segments`` over its fragments: touching fragment pairs of one
    segment (``a``, ``b``, ``contact``, ``mean`` affinity) and each fragment's segment, in
    one blockwise pass when an input is a Dask array."""
    from emdask.blockwise import map_reduce
    from emdask.watershed import Q

    frag, seg, affs = (_as_array(x) for x in (fragments, segmentation, affinities))
    segments = np.unique(np.asarray(segments, np.uint64))
    if any(isinstance(x, da.Array) for x in (frag, seg, affs)):
        seg = seg if isinstance(seg, da.Array) else da.from_array(seg, chunks=64)
        frag = da.asarray(frag).rechunk(seg.chunks)
        affs = da.asarray(affs)[:3].rechunk((3, *seg.chunks))
        pairs, owner = map_reduce(_fragment_sums, _merge_fragment_sums, [frag, seg, affs],
                                  depth=1, segments=segments).compute()
    else:
        pairs, owner = _fragment_sums(frag, seg, affs, segments=segments)
    lo, hi, n, total = pairs[:4]
    graph = pd.DataFrame({"a": lo, "b": hi, "contact": n,
                          "mean": total / np.maximum(n, 1) / float(Q)})
    return graph, dict(zip(owner[0].tolist(), owner[1].tolist(), strict=True))


def cut_seeds(model: Any, raw: np.ndarray, segmentation: np.ndarray, fragments: np.ndarray,
              segment: int, min_voxels: int = 50) -> tuple[np.ndarray, np.ndarray] | None:
    """Where a merge net says a segment joins two neurons in a window: the segment's voxels
    away from the junction (output below 0.5) fall in pieces; the fragments of the two
    largest pieces (each fragment to the piece holding most of its voxels) seed the cut.
    None when the window does not fall in two pieces of ``min_voxels``."""
    import cc3d

    mask = np.asarray(segmentation) == segment
    maps = _merge_maps(model, raw[None], mask[None])[0]
    pieces = cc3d.connected_components(np.ascontiguousarray(mask & (maps < 0.5)),
                                       connectivity=6)
    ids, counts = np.unique(pieces[pieces > 0], return_counts=True)
    if (counts >= min_voxels).sum() < 2:
        return None
    two = ids[np.argsort(-counts, kind="stable")[:2]]
    frag = np.asarray(fragments)[mask]
    piece = pieces[mask]
    keys, inverse = np.unique(frag, return_inverse=True)
    votes = np.stack([np.bincount(inverse, piece == p, minlength=keys.size) for p in two])
    side = np.where(votes.max(0) > 0, votes.argmax(0), -1)
    seeds = keys[side == 0], keys[side == 1]
    return seeds if all(x.size for x in seeds) else None


def seeded_cut(graph: pd.DataFrame, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The fragments of one segment on the side of ``second``: its fragment graph
    (``a``, ``b``, ``mean``) grown from the two seed sets along the strongest edges first
    (maximin paths; an edge between the two sides is never taken).  Fragments reached
    from neither stay with ``first``."""
    ids = np.unique(np.r_[graph.a.to_numpy(), graph.b.to_numpy(), first, second]).astype(
        np.uint64)
    parent = np.arange(ids.size)
    side = np.zeros(ids.size, np.int8)
    side[np.searchsorted(ids, np.asarray(first, np.uint64))] = 1
    side[np.searchsorted(ids, np.asarray(second, np.uint64))] = 2

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for s in (first, second):  # each seed set is one component to start with
        at = np.searchsorted(ids, np.asarray(s, np.uint64))
        for i in at[1:]:
            parent[find(i)] = find(at[0])
    order = np.argsort(-graph["mean"].to_numpy(), kind="stable")
    a = np.searchsorted(ids, graph.a.to_numpy(np.uint64)[order])
    b = np.searchsorted(ids, graph.b.to_numpy(np.uint64)[order])
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        ri, rj = find(i), find(j)
        if ri == rj or (side[ri] and side[rj]):
            continue
        parent[rj] = ri
        side[ri] = side[ri] or side[rj]
    roots = np.array([find(i) for i in range(ids.size)], np.int64)
    return ids[side[roots] == 2]


def plan_cuts(raw: Any, segmentation: Any, fragments: Any, affinities: Any,
              candidates: pd.DataFrame, model: Any = None, first_id: int | None = None,
              voxel_size=None, offset=None, max_affinity: Any = None
              ) -> tuple[tuple[np.ndarray, np.ndarray], pd.DataFrame]:
    """How to cut the merge ``candidates`` (rows with ``segment`` and a location in nm):
    per segment, seeds from the merge net's window at the location (:func:`cut_seeds`),
    then its fragments split along its graph (:func:`seeded_cut`); the fragments cut off
    get a new id from ``first_id`` on (default: one above the largest id).  Inputs may be
    lazy: one blockwise pass for the fragment graphs, one window per cut.

    A cut is made only where it follows a boundary: the mean affinity across it (between
    the two parts' fragments, weighted by contact) at most ``max_affinity``: one value, or
    one per candidate (default: the merge net's card ``max_cut_affinity``, 1.0 where it
    names none).  A cut through the middle of a neuron crosses affinities as high as its
    inside, and does harm.  ``model``: the merge net (None: the shipped one for the
    segmentation's voxel size, :func:`merge_net_for`).

    Returns the lookup table (fragment ids, sorted -> new segment ids) and a row per
    candidate: ``segment``, ``new_id`` (0: not cut: the window did not fall in two
    pieces, or the cut crosses affinities above ``max_affinity``), ``fragments`` moved
    (would move, where not cut) and ``cut_affinity`` (NaN where no cut was found)."""
    vs = _voxel_size(segmentation, voxel_size)
    model = merge_net_for(model, vs)
    if max_affinity is None:
        max_affinity = float(model.card.get("max_cut_affinity", 1.0))
    limits = np.broadcast_to(np.asarray(max_affinity, float), (len(candidates),))
    seg_arr, frag_arr, raw_arr = (_as_array(x) for x in (segmentation, fragments, raw))
    attrs = getattr(segmentation, "attrs", {})
    offset = np.asarray(offset if offset is not None else attrs.get("offset", (0, 0, 0)),
                        float)
    if first_id is None:
        first_id = int(da.asarray(seg_arr).max().compute()) + 1
    segments = candidates.segment.to_numpy(np.uint64)
    graph, owner = fragment_graphs(frag_arr, seg_arr, affinities, segments)
    shape = np.asarray(seg_arr.shape)
    size = merge_window(model, shape)
    cut_from, cut_to, rows = [], [], []
    for row, limit in zip(candidates.itertuples(), limits, strict=True):
        centre = np.round((np.array([row.z_nm, row.y_nm, row.x_nm]) - offset) / vs
                          - 0.5).astype(int)
        start = np.clip(centre - size // 2, 0, shape - size)
        sl = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
        seeds = cut_seeds(model, np.asarray(raw_arr[sl]), np.asarray(seg_arr[sl]),
                          np.asarray(frag_arr[sl]), int(row.segment))
        moved, across = np.zeros(0, np.uint64), np.nan
        if seeds is not None:
            mine = [f for f, s in owner.items() if s == int(row.segment)]
            edges = graph[np.isin(graph.a, mine)]
            moved = seeded_cut(edges, *seeds)
            cross = np.isin(edges.a, moved) != np.isin(edges.b, moved)
            if moved.size:  # (parts that do not touch: nothing holds them together)
                w = edges.contact.to_numpy(float)[cross]
                across = float((edges["mean"].to_numpy()[cross] * w).sum() / w.sum()
                               if cross.any() else 0.0)
        cut = bool(moved.size) and across <= limit + 1e-9
        new_id = first_id + len(rows) if cut else 0
        if cut:
            cut_from.append(moved)
            cut_to.append(np.full(moved.size, new_id, np.uint64))
        rows.append((int(row.segment), new_id, int(moved.size), across))
    frags = np.concatenate(cut_from or [np.zeros(0, np.uint64)]).astype(np.uint64)
    order = np.argsort(frags, kind="stable")
    lut = frags[order], np.concatenate(cut_to or [np.zeros(0, np.uint64)])[order]
    return lut, pd.DataFrame(rows, columns=["segment", "new_id", "fragments",
                                            "cut_affinity"])


def apply_cuts(segmentation: np.ndarray, fragments: np.ndarray,
               lut: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``segmentation`` with the voxels of the fragments in ``lut[0]`` given ``lut[1]``."""
    out = np.array(segmentation, copy=True)
    frag = np.asarray(fragments)
    if lut[0].size:
        hit = np.isin(frag, lut[0])
        out[hit] = lut[1][np.searchsorted(lut[0], frag[hit])]
    return out


def correct_merges(raw: Any, segmentation: Any, fragments: Any, affinities: Any,
                   candidates: pd.DataFrame, threshold: float | None = None,
                   model: Any = None, voxel_size=None, offset=None
                   ) -> tuple[np.ndarray, pd.DataFrame]:
    """Cut the merge candidates (:func:`detect_merges`) scored at least ``threshold``
    (default: the merge net's card threshold) into two segments each (:func:`plan_cuts`).

    ``fragments``: the watershed fragments the segmentation was agglomerated from
    (``segment(..., return_fragments=True)``; the store's ``fragments``).  Returns the
    corrected segmentation and the edits (``segment``, ``new_id``: 0 where no cut was
    made, ``fragments`` moved or that would move, ``cut_affinity``: the mean affinity
    across the cut, at most the card's ``max_cut_affinity`` for a cut made; ``score``), so
    that every edit can be reviewed and undone.  ``voxel_size`` and ``offset`` (nm): for a
    segmentation that carries none (a numpy array); ``model``: as :func:`plan_cuts`."""
    model = merge_net_for(model, _voxel_size(segmentation, voxel_size))
    threshold = float(model.card.get("threshold", 1.0)) if threshold is None else threshold
    chosen = candidates[candidates.score >= threshold].reset_index(drop=True)
    lut, edits = plan_cuts(raw, segmentation, fragments, affinities, chosen, model,
                           voxel_size=voxel_size, offset=offset)
    out = apply_cuts(np.asarray(_as_array(segmentation)), np.asarray(_as_array(fragments)),
                     lut)
    return out, edits.assign(score=chosen.score.to_numpy())


# ---------------------------------------------------------------- for proofreading
def candidate_table(splits: pd.DataFrame | None, merges: pd.DataFrame | None,
                    split_threshold: float = 0.5, merge_threshold: float = 0.5,
                    small: pd.DataFrame | None = None) -> pd.DataFrame:
    """Split and merge candidates in one table for proofreading: ``kind``, ``segments``
    (the pair to join, or the segment to cut), ``score``, location in nm, ``auto`` (at or
    above the model's threshold for automated correction) and ``priority``.

    The table is ranked by ``priority``, the fix's expected gain: ``score`` times the
    ``gain`` column of the candidates (the voxel-bits of VOI that a right fix removes), so
    a proofreader's first checks go where the most error is likely to be, not to
    near-certain joins of tiny fragments.  Split candidates below 0.5 (more likely two
    neurons than one) are left out.  ``small`` (:func:`small_joins`) adds the specks below
    the split model's floor, kind "small", each joined to its best neighbour (``auto``),
    after all the others: they are recorded to be reviewable, not to be checked first."""
    parts = []
    if splits is not None and len(splits):
        keep = splits[splits.score >= min(0.5, split_threshold)]
        parts.append(pd.DataFrame({
            "kind": "split", "segments": [[int(a), int(b)] for a, b in zip(
                keep.a, keep.b, strict=True)], "score": keep.score.to_numpy(float),
            "z_nm": keep.z_nm, "y_nm": keep.y_nm, "x_nm": keep.x_nm,
            "auto": keep.score.to_numpy() >= split_threshold,
            "priority": keep.score.to_numpy(float) * keep.gain.to_numpy(float)}))
    if merges is not None and len(merges):
        parts.append(pd.DataFrame({
            "kind": "merge", "segments": [[int(s)] for s in merges.segment],
            "score": merges.score.to_numpy(float), "z_nm": merges.z_nm,
            "y_nm": merges.y_nm, "x_nm": merges.x_nm,
            "auto": merges.score.to_numpy() >= merge_threshold,
            "priority": merges.score.to_numpy(float) * merges.gain.to_numpy(float)}))
    columns = ["kind", "segments", "score", "z_nm", "y_nm", "x_nm", "auto", "priority"]
    pieces = [pd.concat(parts, ignore_index=True)[columns].sort_values(
        "priority", ascending=False, kind="stable")] if parts else []
    if small is not None and len(small):
        pieces.append(pd.DataFrame({
            "kind": "small", "segments": [[int(a), int(b)] for a, b in zip(
                small.a, small.b, strict=True)], "score": small.score.to_numpy(float),
            "z_nm": small.z_nm.to_numpy(float), "y_nm": small.y_nm.to_numpy(float),
            "x_nm": small.x_nm.to_numpy(float), "auto": True, "priority": 0.0}))
    if not pieces:
        return pd.DataFrame(columns=columns)
    return pd.concat(pieces, ignore_index=True)
