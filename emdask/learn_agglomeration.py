"""Learned agglomeration: which merges are right, learned from ground truth.

As in gala (Nunez-Iglesias et al. 2013) and NeuroProof (Parag et al. 2015), the score of
an edge between two regions is the probability, given by a classifier, that the two belong
to one neuron.  The classifier sees the features of :data:`emdask.agglomerate.FEATURES`:
the boundary's affinity mean, maximum and quantiles, its size, the two regions' sizes and
how much of the smaller one's surface the boundary is, and optionally the raw EM on the
boundary, inside each region and their contrast.  All follow from additive statistics (histogram counts, sums, voxel counts), so blockwise
segmentation with ``score="learned"`` stays identical for any chunking.

Training is a teacher's agglomeration of a volume with ground truth (gala's "strict"
learning): the lowest-cost edge is taken, recorded with its features and labelled right
(both regions belong to the same true neuron) or wrong; only right merges are made, so
every later example is between pure regions.  The first round orders edges by mean
affinity; each further round orders them by the classifier of the previous one, so the
examples come from the states that the learned agglomeration itself reaches.  The
classifier is a scikit-learn gradient-boosted tree ensemble, stored as plain arrays in a
JSON file (no pickle) and evaluated in Numba during agglomeration (scikit-learn is needed
only to train).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emdask.agglomerate import (
    FEATURES,
    LEARNED_BINS,
    EdgeClassifier,
    _run,
    load_classifier,
)
from emdask.metrics import contingency_table
from emdask.region_graph import region_graph
from emdask.segmentation import segment

__all__ = ["EdgeClassifier", "load_classifier", "merge_examples", "train_agglomeration"]

def _majority(fragments: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """For fragments ``1..n``, the true id (renumbered ``1..``) most of its voxels carry;
    0 where more of them are the truth's background (ties: background, then lower id)."""
    gt, frag, count = contingency_table(fragments, truth)  # (truth 0 not counted)
    keep = frag > 0
    gt, frag, count = gt[keep], frag[keep].astype(np.int64), count[keep]
    out = np.zeros(n + 1, np.int64)
    if frag.size == 0:
        return out[1:]
    true = np.searchsorted(np.unique(truth[truth > 0]), gt) + 1
    order = np.lexsort((true, -count, frag))  # per fragment, the largest overlap first
    first = order[np.r_[True, frag[order][1:] != frag[order][:-1]]]
    best = np.zeros(n + 1, np.int64)
    best[frag[first]] = count[first]
    out[frag[first]] = true[first]
    background = np.bincount(fragments.ravel(), minlength=n + 1) - np.bincount(
        frag, count, n + 1).astype(np.int64)
    out[background >= best] = 0
    return out[1:]


def merge_examples(affinities: np.ndarray, truth: np.ndarray, rounds_of: Sequence = ("mean",),
                   bins: int = LEARNED_BINS, raw: np.ndarray | None = None,
                   background: str = "unknown", **watershed) -> tuple[np.ndarray, np.ndarray]:
    """Teacher agglomerations of one volume: features and right/wrong of every decision.

    Parameters
    ----------
    affinities
        (3, z, y, x) nearest-neighbour affinities, float in [0, 1] or uint8.
    truth
        (z, y, x) true neuron ids; 0 is unlabelled (its fragments give no examples).
    rounds_of
        One teacher run per entry, its edges ordered by ``"mean"`` affinity or by an
        :class:`EdgeClassifier`.
    bins, watershed
        Histogram bins, and the watershed parameters of :func:`emdask.segment`.
    raw
        (z, y, x) uint8 raw EM, for the raw features (0 without).
    background
        What truth 0 is: ``"unknown"`` (its fragments give no examples) or ``"boundary"``
        (membranes, as in 2-D ssTEM labels: merging its fragments into anything is wrong,
        so that the classifier learns not to bridge cells through them).

    Returns
    -------
    features, right
        Arrays (n, len(FEATURES)) and (n,) bool.
    """
    if background not in ("unknown", "boundary"):
        raise ValueError(f"background must be 'unknown' or 'boundary', got {background!r}")
    affinities = np.asarray(affinities)
    truth = np.asarray(truth)
    if raw is not None and (np.shape(raw) != truth.shape or np.asarray(raw).dtype != np.uint8):
        raise ValueError(f"raw must be uint8 EM of the truth's shape {truth.shape}, got "
                         f"{np.asarray(raw).dtype} {np.shape(raw)}")
    if truth.shape != affinities.shape[1:]:
        raise ValueError(f"truth {truth.shape} and affinities {affinities.shape} differ in "
                         "shape")
    [fragments] = segment(affinities, [0.0], return_fragments=True, **watershed)[:1]
    fragments = np.asarray(fragments).astype(np.int64)
    n = int(fragments.max())
    graph = region_graph(fragments, affinities, bins, raw).shifted(-1, -1)
    sizes = np.bincount(fragments.ravel(), minlength=n + 1)[1:]
    true = _majority(fragments, truth, n)
    if background == "boundary":
        true[true == 0] = -1
    sums = None
    if raw is not None:  # the boundaries' raw, and each fragment's
        inside = np.bincount(fragments.ravel(), np.asarray(raw, np.float64).ravel(), n + 1)
        sums = inside[1:].astype(np.int64)
    xs, ys = [], []
    for policy in rounds_of:
        score, clf = ("learned", policy) if isinstance(policy, EdgeClassifier) else (policy,
                                                                                     None)
        _, x, y, _ = _run(graph, n, [1.0], score, sizes, clf, true, sums)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


#: The affinity features (mean, max, quantiles) may only raise the probability of a right
#: merge: a constraint on the trees, so that no region of feature space where training
#: examples are few learns that weaker boundaries are safer.
MONOTONIC = tuple(1 if name in ("mean", "max") or name.startswith("q") else 0
                  for name in FEATURES)


def train_agglomeration(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    rounds: int = 2,
    *,
    background: str = "unknown",
    bins: int = LEARNED_BINS,
    n_estimators: int = 200,
    max_leaf_nodes: int = 15,
    monotonic: bool = True,
    weight_power: float = 0.0,
    seed: int = 0,
    card: dict | None = None,
    **watershed,
) -> EdgeClassifier:
    """Learn which merges are right from volumes with ground truth.

    Parameters
    ----------
    volumes
        ``(affinities, truth)`` or ``(affinities, truth, raw)`` tuples (all of one kind), as
        :func:`merge_examples` takes them: the affinities of the boundary net the
        classifier will serve, and its uint8 EM for the raw features.
    rounds
        Teacher rounds: the first ordered by mean affinity, each further one by the
        classifier so far (its examples added to the previous ones).
    background
        What truth 0 is, see :func:`merge_examples`.
    bins
        Histogram bins of the region graph.
    n_estimators, max_leaf_nodes, monotonic, seed
        The tree ensemble (scikit-learn's ``HistGradientBoostingClassifier``): its trees,
        their leaves, whether the affinity features are constrained by :data:`MONOTONIC`.
    weight_power
        Examples weighted by the smaller region's size to this power (0: equal weights).
    card
        What to record with the classifier (data, scores).

    Returns
    -------
    EdgeClassifier
    """
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
    except ImportError:
        raise ImportError("training an agglomeration classifier needs scikit-learn: "
                          "pip install scikit-learn") from None
    kinds = {len(v) > 2 and v[2] is not None for v in volumes}
    if len(kinds) != 1:
        raise ValueError("give raw EM for every training volume or for none")
    with_raw = kinds.pop()
    xs, ys, clf = [], [], None
    for r in range(rounds):
        policy = ["mean" if clf is None else clf]
        for affs, truth, *raw in volumes:
            x, y = merge_examples(affs, truth, policy, bins, raw[0] if raw else None,
                                  background, **watershed)
            xs.append(x)
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.all() or not y.any():
            raise ValueError(f"the teacher made only {'right' if y.all() else 'wrong'} "
                             f"decisions ({y.size}): the ground truth cannot teach here")
        model = HistGradientBoostingClassifier(
            max_iter=n_estimators, max_leaf_nodes=max_leaf_nodes, early_stopping=False,
            monotonic_cst=list(MONOTONIC) if monotonic else None, random_state=seed)
        smaller = np.exp(x[:, FEATURES.index("log_smaller")])
        model.fit(x, y, sample_weight=smaller ** weight_power)
        info = {"rounds": r + 1, "examples": int(y.size), "right": int(y.sum()),
                "raw": with_raw}
        clf = EdgeClassifier.from_sklearn(model, bins, {**(card or {}), **info})
    return clf
