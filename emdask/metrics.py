"""Segmentation accuracy: variation of information, adapted Rand error, CREMI score.

Every metric is a function of the contingency table ``n[i, j]`` = number of voxels with
ground-truth id ``i`` and segment id ``j``.  The table is computed blockwise (sparse pair
counts per block, summed across blocks), so volumes larger than memory can be scored and
the in-memory and Dask paths give the same numbers.

Conventions (those of the CREMI and SNEMI3D challenges):

* Ground-truth background (label 0) is excluded: those voxels are ignored entirely.
* Segment id 0 in the *segmentation* is not special for VOI (it is one more segment, as in
  CREMI's ``voi``); for the adapted Rand error it marks unassigned voxels, each counted as
  its own singleton segment (SNEMI3D).
* VOI uses log base 2 (bits), as CREMI's ``voi`` does.  ``voi_split`` = H(seg | gt) grows with
  over-segmentation, ``voi_merge`` = H(gt | seg) with false merges.
* Adapted Rand error = 1 - F-score of Rand precision and recall (SNEMI3D definition).
* CREMI score = sqrt(VOI_total * ARAND).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from emdask.blockwise import map_reduce

__all__ = ["adapted_rand", "contingency_table", "evaluate", "voi"]

# A contingency table: (gt ids, seg ids, counts), sorted by (gt, seg), no duplicate pairs.
Table = tuple[np.ndarray, np.ndarray, np.ndarray]


def _pair_counts(gt: np.ndarray, seg: np.ndarray, either: bool = False) -> Table:
    """Contingency table of one in-memory block, ground-truth 0 excluded (with
    ``either``: only the voxels where both are 0 excluded)."""
    gt = np.asarray(gt).ravel()
    seg = np.asarray(seg).ravel()
    keep = (gt != 0) | (seg != 0) if either else gt != 0
    gt, seg = gt[keep].astype(np.uint64), seg[keep].astype(np.uint64)
    if gt.size == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, np.int64)
    order = np.lexsort((seg, gt))
    gt, seg = gt[order], seg[order]
    start = np.flatnonzero(np.r_[True, (gt[1:] != gt[:-1]) | (seg[1:] != seg[:-1])])
    counts = np.diff(np.r_[start, gt.size]).astype(np.int64)
    return gt[start], seg[start], counts


def _merge_tables(*tables: Table) -> Table:
    """Sum contingency tables (the reduction step of the blockwise path)."""
    gt = np.concatenate([t[0] for t in tables])
    seg = np.concatenate([t[1] for t in tables])
    cnt = np.concatenate([t[2] for t in tables])
    if gt.size == 0:
        return gt, seg, cnt
    order = np.lexsort((seg, gt))
    gt, seg, cnt = gt[order], seg[order], cnt[order]
    start = np.flatnonzero(np.r_[True, (gt[1:] != gt[:-1]) | (seg[1:] != seg[:-1])])
    return gt[start], seg[start], np.add.reduceat(cnt, start)


def _as_array(x: Any):
    return x.data if isinstance(x, xr.DataArray) else x


def contingency_table(segmentation: Any, ground_truth: Any, split_every: int = 8) -> Table:
    """Overlap counts of a segmentation with the ground truth (gt label 0 excluded).

    Numpy inputs are counted in memory; if either input is a Dask array (or a DataArray
    backed by one), counts are made per block and reduced in a tree of fan-in
    ``split_every``, so memory stays bounded by a block plus the table.

    Returns
    -------
    gt_ids, seg_ids, counts : numpy arrays of equal length
    """
    seg, gt = _as_array(segmentation), _as_array(ground_truth)
    if np.shape(seg) != np.shape(gt):
        raise ValueError(
            f"segmentation shape {np.shape(seg)} differs from ground truth shape {np.shape(gt)}"
        )
    for name, arr in (("segmentation", seg), ("ground truth", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
        if (np.issubdtype(arr.dtype, np.signedinteger) and not isinstance(arr, da.Array)
                and arr.size and arr.min() < 0):
            raise ValueError(f"{name} has negative ids; ids must be >= 0")
    if not isinstance(seg, da.Array) and not isinstance(gt, da.Array):
        return _pair_counts(gt, seg)
    seg = da.asarray(seg)
    gt = da.asarray(gt).rechunk(seg.chunks)
    return map_reduce(_block_table, _merge_tables, [gt, seg], split_every).compute()


def _block_table(gt: np.ndarray, seg: np.ndarray, origin=None, either: bool = False
                 ) -> Table:
    return _pair_counts(gt, seg, either)


def _entropy_terms(table: Table) -> tuple[float, float]:
    gt, seg, n_ij = table
    n = n_ij.sum()
    if n == 0:
        return 0.0, 0.0
    p_ij = n_ij / n
    _, gt_inv = np.unique(gt, return_inverse=True)
    _, seg_inv = np.unique(seg, return_inverse=True)
    p_i = np.bincount(gt_inv, weights=p_ij)
    p_j = np.bincount(seg_inv, weights=p_ij)
    # H(seg | gt) = -sum p_ij log(p_ij / p_i);  H(gt | seg) = -sum p_ij log(p_ij / p_j)
    split = -np.sum(p_ij * np.log2(p_ij / p_i[gt_inv]))
    merge = -np.sum(p_ij * np.log2(p_ij / p_j[seg_inv]))
    return float(max(0.0, split)), float(max(0.0, merge))


def _adapted_rand_terms(table: Table) -> dict[str, float]:
    gt, seg, n_ij = table
    n_ij = n_ij.astype(np.float64)
    if n_ij.sum() == 0:
        return {"arand": 0.0, "rand_precision": 1.0, "rand_recall": 1.0}
    unassigned = seg == 0  # SNEMI3D: voxels of segment 0 are singletons
    _, gt_inv = np.unique(gt, return_inverse=True)
    a_i = np.bincount(gt_inv, weights=n_ij)
    _, seg_inv = np.unique(seg[~unassigned], return_inverse=True)
    b_j = np.bincount(seg_inv, weights=n_ij[~unassigned])
    singletons = n_ij[unassigned].sum()
    sum_ab = np.sum(n_ij[~unassigned] ** 2) + singletons
    sum_a = np.sum(a_i**2)
    sum_b = np.sum(b_j**2) + singletons
    precision = sum_ab / sum_b
    recall = sum_ab / sum_a
    f = 2 * precision * recall / (precision + recall)
    return {"arand": float(1 - f), "rand_precision": float(precision),
            "rand_recall": float(recall)}


def voi(segmentation: Any, ground_truth: Any) -> tuple[float, float]:
    """Variation of information ``(split, merge)`` in bits, gt label 0 excluded.

    ``split`` = H(seg | gt) (over-segmentation), ``merge`` = H(gt | seg) (false merges).
    """
    return _entropy_terms(contingency_table(segmentation, ground_truth))


def adapted_rand(segmentation: Any, ground_truth: Any) -> float:
    """Adapted Rand error (SNEMI3D): 1 - F-score of Rand precision and recall."""
    return _adapted_rand_terms(contingency_table(segmentation, ground_truth))["arand"]


def evaluate(segmentation: Any, ground_truth: Any) -> dict[str, float]:
    """All segmentation metrics from one pass over the data.

    Parameters
    ----------
    segmentation, ground_truth
        Integer label volumes of the same shape: numpy, Dask or DataArray.  Dask inputs are
        scored out of core.

    Returns
    -------
    dict
        ``voi_split``, ``voi_merge``, ``voi`` (their sum), ``arand``, ``rand_precision``,
        ``rand_recall``, ``cremi_score`` = sqrt(voi * arand), and ``n_voxels`` scored.

    Examples
    --------
    >>> import numpy as np
    >>> gt = np.array([[[1, 1, 2, 2]]])
    >>> evaluate(gt * 7, gt)["voi"]
    0.0
    """
    table = contingency_table(segmentation, ground_truth)
    split, merge = _entropy_terms(table)
    out = {"voi_split": split, "voi_merge": merge, "voi": split + merge}
    out.update(_adapted_rand_terms(table))
    out["cremi_score"] = float(np.sqrt(out["voi"] * out["arand"]))
    out["n_voxels"] = int(table[2].sum())
    return out

