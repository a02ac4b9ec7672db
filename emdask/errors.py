"""Errors of a segmentation: the true ones (against ground truth), and split errors found
without it, ranked for proofreading and corrected where the evidence is strong.

A **split** leaves one neuron in two segments.  emdask's splits are mostly between
segments that touch, where the agglomeration stopped at a contact whose affinities were
not quite high enough; the candidates are therefore the touching pairs, described by the
affinities across their contact, the contact's size, the segments' sizes, and whether
their skeletons end at the contact pointing at each other (Dmitriev et al. examine
skeleton endpoints for splits).  A small logistic model (:class:`SplitModel`, trained from
ground truth by :func:`train_split_model`) turns those features into the probability that
the pair is one neuron.

Merge errors (one segment spanning two neurons) are found here only against ground truth
(:func:`error_table`); detecting them without it needs a net that sees the EM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from emdask.metrics import _as_array, contingency_table

__all__ = [
    "SplitModel",
    "contacts",
    "correct_splits",
    "detect_splits",
    "error_table",
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


# ---------------------------------------------------------------- candidates
def contacts(segmentation: np.ndarray, affinities: np.ndarray) -> pd.DataFrame:
    """Every pair of touching segments: contact size, mean and max affinity across it,
    and the contact's centre (voxels, z-y-x).

    ``affinities``: the nearest-neighbour channels (3, z, y, x), float or uint8.
    """
    from emdask.region_graph import observations
    from emdask.watershed import Q, quantize_affinities

    seg = np.asarray(segmentation)
    affs = quantize_affinities(np.asarray(affinities[:3]), check=False)
    u, v, w, at = observations(seg, affs, positions=True)
    w = w / float(Q)
    if u.size == 0:  # no two segments touch
        return pd.DataFrame({k: np.zeros(0, t) for k, t in (
            ("a", seg.dtype), ("b", seg.dtype), ("contact", np.int64), ("mean", float),
            ("max", float), ("z", float), ("y", float), ("x", float))})
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    order = np.lexsort((hi, lo))
    lo, hi, w, at = lo[order], hi[order], w[order], at[order]
    start = np.flatnonzero(np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])])
    n = np.diff(np.r_[start, lo.size])
    centre = np.add.reduceat(at, start, axis=0) / n[:, None]
    return pd.DataFrame({"a": lo[start], "b": hi[start], "contact": n,
                         "mean": np.add.reduceat(w, start) / n,
                         "max": np.maximum.reduceat(w, start),
                         "z": centre[:, 0], "y": centre[:, 1], "x": centre[:, 2]})


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


def split_features(segmentation: Any, affinities: Any, voxel_size,
                   min_size: int = 200, skeletons: dict | None = None) -> pd.DataFrame:
    """The candidate split pairs (touching segments of at least ``min_size`` voxels each)
    and their features (:data:`FEATURES`).

    ``end_a`` / ``end_b``: distance (um, capped at 2) from the contact to the nearest
    skeleton endpoint of each segment; ``facing``: how well the two nearest endpoints point
    at each other (mean cosine; 0 where a segment has no endpoint).
    """
    from emdask.skeletons import skeletons as skeletonize

    seg = np.asarray(_as_array(segmentation))
    affs = np.asarray(_as_array(affinities))
    vs = np.asarray(voxel_size, float)
    ids, sizes = np.unique(seg, return_counts=True)
    size = dict(zip(ids.tolist(), sizes.tolist(), strict=True))
    pairs = contacts(seg, affs)
    big = np.array([size[a] >= min_size and size[b] >= min_size
                    for a, b in zip(pairs.a, pairs.b, strict=True)], bool)
    pairs = pairs[big].reset_index(drop=True) if len(pairs) else pairs
    if skeletons is None:
        wanted = np.unique(np.r_[pairs.a.to_numpy(), pairs.b.to_numpy()])
        keep = np.where(np.isin(seg, wanted), seg, 0)
        keep = xr.DataArray(keep, dims=("z", "y", "x"),
                            attrs={"voxel_size": vs.tolist(), "offset": [0.0, 0.0, 0.0]})
        skeletons = skeletonize(keep) if wanted.size else {}
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
        rows.append((np.log10(p.contact), np.log10(small), np.log10(large), *feats, facing))
    extra = pd.DataFrame(rows, columns=["log_contact", "log_small", "log_large", "end_a",
                                        "end_b", "facing"], index=pairs.index)
    return pd.concat([pairs, extra], axis=1)


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

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        x = (features[list(FEATURES)].to_numpy(float) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))

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
def detect_splits(segmentation: Any, affinities: Any,
                  model: SplitModel | str | Path = "splits", voxel_size=None,
                  min_size: int = 200) -> pd.DataFrame:
    """Candidate split errors ranked for proofreading.

    ``model``: a :class:`SplitModel`, a file, or ``"splits"``: the shipped model (trained
    on the fibsem net's segmentations; its card gives the validation figures).

    Returns
    -------
    pandas.DataFrame
        One row per pair of touching segments: ``a``, ``b``, ``score`` (probability that
        they are one neuron), the contact's centre in nm (``z_nm``, ``y_nm``, ``x_nm``)
        and the features; highest score first.
    """
    if model == "splits":
        model = Path(__file__).parent / "weights" / "splits.json"
    if not isinstance(model, SplitModel):
        model = SplitModel.load(model)
    if voxel_size is None:
        voxel_size = getattr(segmentation, "attrs", {}).get("voxel_size")
        if voxel_size is None:
            raise ValueError("give voxel_size: the segmentation carries none")
    feats = split_features(segmentation, affinities, voxel_size, min_size)
    feats["score"] = model.predict(feats)
    offset = np.asarray(getattr(segmentation, "attrs", {}).get("offset", (0, 0, 0)), float)
    for axis, name in enumerate("zyx"):
        feats[f"{name}_nm"] = offset[axis] + feats[name] * float(voxel_size[axis])
    return feats.sort_values("score", ascending=False, ignore_index=True)


def correct_splits(segmentation: np.ndarray, candidates: pd.DataFrame, threshold: float
                   ) -> tuple[np.ndarray, pd.DataFrame]:
    """Merge the candidate pairs scored at least ``threshold``.

    Returns the corrected segmentation (each merged group takes its lowest id) and the
    edits (``a``, ``b``, ``score``, ``kept``: the id the two now share), so that every
    edit can be reviewed and undone.
    """
    seg = np.asarray(segmentation)
    chosen = candidates[candidates.score >= threshold]
    ids = np.unique(np.r_[chosen.a.to_numpy(), chosen.b.to_numpy()]).astype(seg.dtype)
    parent = np.arange(ids.size)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(np.searchsorted(ids, chosen.a), np.searchsorted(ids, chosen.b),
                    strict=True):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(ids.size)], np.int64)
    lut_from, lut_to = ids, ids[roots] if ids.size else ids
    out = seg.copy()
    if ids.size:
        flat = out.ravel()
        hit = np.isin(flat, lut_from)
        flat[hit] = lut_to[np.searchsorted(lut_from, flat[hit])]
        out = flat.reshape(seg.shape)
    edits = chosen[["a", "b", "score"]].copy()
    edits["kept"] = lut_to[np.searchsorted(lut_from, edits.a)] if len(edits) else []
    return out, edits.reset_index(drop=True)
