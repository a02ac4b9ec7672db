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

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from emdask.agglomerate import _QUANTILES, FEATURES, LEARNED_BINS, _forest, _run
from emdask.metrics import contingency_table
from emdask.region_graph import region_graph

__all__ = ["EdgeClassifier", "load_classifier", "merge_examples", "train_agglomeration"]

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
    from emdask.segmentation import segment

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
