"""Error detection and correction: trained, calibrated and validated on separate volumes,
for FIB-SEM (both agglomerations a user gets) and for anisotropic ssEM.

    python benchmarks/eval_errors.py [--modality fibsem|ssem] [--only splits|merges] [--ship]
    python benchmarks/eval_errors.py [--modality ...] --remaining
    python benchmarks/eval_errors.py --figure notebooks/figures/errors.png

FIB-SEM (the default): the fibsem net's affinities are segmented two ways: mean
agglomeration at the net's card threshold (``emdask run``'s default score) and learned
agglomeration with the shipped classifier at its card's threshold (what the demo runs,
``emdask.demo.operating_point``).  Three volumes, each with dense ground truth:

- train: FlyEM medulla z 0-159.  A split model (emdask.errors) per agglomeration learns
  from the touching pairs of that segmentation (emdask/weights/splits.json for mean,
  splits_learned.json for learned); the merge net (emdask/weights/merges.toml) was
  trained on artificial merges of touching ground-truth neurons of z 0-199.
- calibration: gala's tiny FIB-SEM volume (another crop of the medulla, 50 x 100 x 200
  voxels), which none of the nets or models trained on.
- validation: medulla z 200-249, never trained or calibrated on.

ssEM (``--modality ssem``): the same three volumes made into 40 nm sections (each the mean
of 4 slices, labels from the middle one, as the sstem3d net trained: 40, 12 and 12
sections), segmented by mean agglomeration of the sstem3d net's affinities (``--net``) at
its card threshold and by learned agglomeration with the sstem3d classifier; the split
models are emdask/weights/splits_ssem.json (mean) and splits_ssem_learned.json (learned)
and the merge net emdask/weights/merges_ssem.toml (``--merges``), trained on artificial
merges of medulla z 0-199 as sections.

Operating points (the cards'): among those whose automated correction does no harm on the
calibration segmentations (raises neither ARAND nor VOI on any of them: train and
calibration; for a split model, those of its agglomeration), the one with the lowest VOI
split + merge summed over them (1.0: correct nothing).  A split model's point is a threshold and a floor: segments under the
floor join the touching segment of highest mean affinity (emdask.errors.small_joins).  A
threshold chosen on the training data alone would trust the scores where they are best;
the independent volume keeps that honest.

On the validation region, for each segmentation: precision and recall of the candidates
above the threshold; what a proofreader checking the top 20 candidates removes, in the
candidate table's order (expected gain: score times what the fix removes,
emdask.errors.join_gain for joins, the segment's size for cuts) and by score alone
(splits: the share of VOI split removed by merging the true pairs; merges: the share of
VOI merge held by the true merges among them, against the 20 largest segments' share, the
order a proofreader has without a detector); merges: the ROC AUC over segments (a segment
is a true merge when it overlaps two true neurons by 100 voxels each); and VOI split /
merge and ARAND before and after automated correction.  --ship writes the split models and
their cards to emdask/weights/splits*.json and the merge net's threshold and figures into
its card.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

import emdask
from emdask.errors import (
    _contacts_and_sizes,
    apply_cuts,
    correct_splits,
    detect_merges,
    error_table,
    load_merge_model,
    plan_cuts,
    small_joins,
    split_features,
    split_labels,
    train_split_model,
)
from emdask.learn_agglomeration import load_classifier
from emdask.models import load_model, pretrained
from emdask.run_config import ErrorSpec
from emdask.segmentation import segment
from emdask.training import section_means

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CUBE = DATA / "flyem_medulla_fib_neuroproof_sample2" / "medulla_fib_sample2_250cube.h5"
GALA = DATA / "gala_tiny_fib" / "gala_train.h5"


@dataclass
class Modality:
    """What one study runs on: the boundary net and merge net (names or .pt
    paths), the volumes (file, box of FIB-SEM slices), the slices averaged into one section
    (1: isotropic), the agglomerations and the suffix of the shipped files' names."""

    name: str
    net: str
    merges: str
    voxel: tuple
    section_mean: int
    scores: tuple
    suffix: str
    volumes: dict = field(default_factory=lambda: {
        "train": (CUBE, (slice(0, 160), slice(0, 250), slice(0, 250))),
        "calibration": (GALA, (slice(None),) * 3),
        "validation": (CUBE, (slice(200, 250), slice(0, 250), slice(0, 250)))})

    @property
    def flag(self) -> str:
        """The command-line flag that selects this modality ('' for the default)."""
        return "" if self.name == "fibsem" else f"--modality {self.name} "

    def split_name(self, score: str) -> str:
        return "splits" + self.suffix + ("" if score == "mean" else f"_{score}")

    @property
    def as_sections(self) -> str:
        """How the cards name the volumes' form."""
        return (f" as {self.voxel[0]:g} nm sections (means of {self.section_mean} slices)"
                if self.section_mean > 1 else "")


MODALITIES = {
    "fibsem": Modality("fibsem", "fibsem", "merges", (10.0, 10.0, 10.0), 1,
                       ("mean", "learned"), ""),
    "ssem": Modality("ssem", "sstem3d", "merges_ssem", (40.0, 10.0, 10.0), 4,
                     ("mean", "learned"), "_ssem"),
}
MODE = MODALITIES["fibsem"]  # set by --modality
TOP = 20
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
FLOORS = (0, 100, 200, 500, 1000, 2000, 5000)  # voxels: segments below join their best neighbour
MIN_SIZE = ErrorSpec.min_size  # split candidates: what the errors stage examines
CUT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
GATES = (0.5, 0.6, 0.7, 0.8, 1.0)  # the highest mean affinity a cut may cross


@functools.cache
def volume(name: str):
    """Raw, the boundary net's three nearest-neighbour affinities and ground truth (as
    sections where the modality's are: means of slices, labels of the middle one)."""
    import h5py

    path, box = MODE.volumes[name]
    with h5py.File(path, "r") as f:
        raw, gt = f["raw"][box], f["labels/neuron_ids"][box]
    if MODE.section_mean > 1:
        raw, gt = section_means(raw, gt, MODE.section_mean)
    affs = emdask.predict_affinities(
        xr.DataArray(raw, dims=("z", "y", "x"), attrs={"voxel_size": list(MODE.voxel)}),
        boundary_net())
    return raw, np.asarray(affs[:3]), gt


@functools.cache
def region(name: str, score: str):
    """Raw, segmentation, affinities, ground truth and fragments of a volume, segmented
    with ``score`` at its card threshold."""
    raw, affs, gt = volume(name)
    if score == "learned":
        options = {"score": "learned", "classifier": MODE.net,
                   "raw": da.from_array(raw, chunks=(64, 128, 128))}
        threshold = load_classifier(MODE.net).card["threshold"]
    else:
        options, threshold = {}, boundary_net().card["threshold"]
    fragments, seg = dask.compute(*segment(da.from_array(affs, chunks=(3, 64, 128, 128)),
                                           [threshold], return_fragments=True, **options))
    return raw, np.asarray(seg), affs, gt, np.asarray(fragments)


@functools.cache
def boundary_net():
    return load_model(MODE.net) if MODE.net.endswith(".pt") else pretrained(MODE.net)


def labelled(seg: np.ndarray) -> xr.DataArray:
    return xr.DataArray(seg, dims=("z", "y", "x"), attrs={"voxel_size": list(MODE.voxel),
                                                          "offset": [0.0, 0.0, 0.0]})


def calibrate() -> list:
    """The calibration segmentations: (volume, agglomeration)."""
    return [(name, score) for name in ("train", "calibration") for score in MODE.scores]


@functools.cache
def merge_net():
    return load_merge_model(MODE.merges)


def choose(sweeps: dict, order: list):
    """The correction's operating point: of ``order`` (least correction first, the first
    meaning none), those that do no harm (raise neither ARAND nor VOI on any calibration
    segmentation), the one with the lowest VOI summed over them (the first of equals);
    ``sweeps[(name, score)][key]`` are the scores after correcting at ``key``."""
    none = order[0]
    fine = [k for k in order if all(s[k][m] <= s[none][m] + 1e-9 for s in sweeps.values()
                                    for m in ("arand", "voi"))]
    return min(fine, key=lambda k: sum(s[k]["voi"] for s in sweeps.values()))


def print_grid(sweeps: dict, rows: tuple, cols: tuple, point: tuple, what: str) -> None:
    """VOI / ARAND (and, where counted, cuts) of each segmentation in ``sweeps`` at each
    operating point ``(row, col)``; ``point`` is the chosen one."""
    def cell(x: dict) -> str:
        return f"{x['voi']:.3f}/{x['arand']:.3f}" + (f" ({x['cuts']})" if "cuts" in x else "")

    print(f"{what}: {point} chosen")
    for (name, score), s in sweeps.items():
        width = 19 if "cuts" in next(iter(s.values())) else 14
        print(f"  {name}, {score}; rows \\ columns")
        print(f"  {'':>8}" + "".join(f"{c:>{width}}" for c in cols))
        for r in rows:
            cells = [s.get((r, c)) for c in cols]
            print(f"  {r:>8}" + "".join(f"{'-' if x is None else cell(x):>{width}}"
                                        for x in cells))


def auc(score: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks, n_pos = rankdata(score), truth.sum()
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (~truth).sum()))


def scores_of(s: dict) -> dict:
    return {k: round(s[k], 4) for k in ("voi_split", "voi_merge", "arand")}


# ---------------------------------------------------------------- splits
@functools.cache
def touching(name: str, score: str) -> tuple:
    """Contacts and sizes of a segmentation's segments (what the errors stage computes)."""
    _, seg, affs, _, _ = region(name, score)
    return _contacts_and_sizes(seg, affs)


@functools.cache
def split_table(name: str, score: str) -> pd.DataFrame:
    """Candidate pairs of a segmentation (segments of the errors stage's default
    ``min_size``) with their features and truth."""
    _, seg, affs, gt, _ = region(name, score)
    feats = split_features(seg, affs, MODE.voxel, MIN_SIZE, touching=touching(name, score))
    return feats.assign(true=split_labels(feats[["a", "b"]].to_numpy(), seg, gt))


@functools.cache
def small_table(name: str, score: str, floor: int) -> pd.DataFrame | None:
    _, seg, affs, _, _ = region(name, score)
    return small_joins(seg, affs, floor, MODE.voxel, touching(name, score)) if floor else None


def split_keys() -> list:
    """(floor, threshold) operating points, least correction first."""
    return [(f, t) for f in FLOORS for t in (1.0, *sorted(THRESHOLDS, reverse=True))]


def split_sweep(model, name: str, score: str) -> dict:
    _, seg, _, gt, _ = region(name, score)
    feats = split_table(name, score).assign(score=lambda f: model.predict(f))
    none, *points = split_keys()  # (none: the segmentation itself, whatever the scores)
    return {none: emdask.evaluate(seg, gt)} | {
        (f, t): emdask.evaluate(correct_splits(seg, feats, t, small_table(name, score, f))[0],
                                gt) for f, t in points}


def splits(ship: bool) -> None:
    """A split model and operating point (floor, threshold) per agglomeration, each trained
    and calibrated on that agglomeration's segmentations only (a model of both raised
    ARAND on learned z 0-159 at every threshold that helped mean agglomeration)."""
    for score in MODE.scores:
        train = split_table("train", score)
        model = train_split_model(train, train.true.to_numpy())
        sweeps = {key: split_sweep(model, *key) for key in calibrate() if key[1] == score}
        model.floor, model.threshold = choose(sweeps, split_keys())
        print(f"splits ({score}): the model learned from {len(train)} pairs of the training "
              f"region ({int(train.true.sum())} true splits)")
        print_grid(sweeps, FLOORS, (1.0, *sorted(THRESHOLDS, reverse=True)),
                   (model.floor, model.threshold), f"splits ({score}): (floor, threshold)")

        _, seg, _, gt, _ = region("validation", score)
        before = emdask.evaluate(seg, gt)
        feats = split_table("validation", score)
        feats = feats.assign(score=model.predict(feats))
        feats = feats.sort_values("score", ascending=False, ignore_index=True)
        chosen = feats.score >= model.threshold
        tp = int((chosen & feats.true).sum())
        truth = error_table(seg, gt)
        print(f"\nsplits, validation, {score} agglomeration: {len(feats)} candidate pairs, "
              f"{int(feats.true.sum())} true splits among them; "
              f"{int((truth.kind == 'split').sum())} split errors (neurons in >= 2 "
              "segments of >= 100 voxels)")
        print(f"at the threshold {model.threshold:.2f}: {int(chosen.sum())} detected, "
              f"precision {tp / max(int(chosen.sum()), 1):.3f}, recall "
              f"{tp / max(int(feats.true.sum()), 1):.3f}")
        small = small_table("validation", score, model.floor)
        right = 0
        if small is not None:  # a speck joined into its own neuron (by its largest part)
            right = int(split_labels(small[["a", "b"]].to_numpy(), seg, gt, 1).sum())
            print(f"floor {model.floor}: {len(small)} segments joined to their best "
                  f"neighbour, {right} into the neuron that holds most of them")
        # a proofreader checks the top candidates and merges those that are true
        shares = {}
        for order, ranked in (("priority", feats.assign(priority=feats.score * feats.gain)
                               .sort_values("priority", ascending=False, kind="stable")),
                              ("score", feats)):
            top = ranked.head(TOP)
            fixed, _ = correct_splits(seg, top[top.true].assign(score=1.0), 0.5)
            after_top = emdask.evaluate(fixed, gt)
            shares[order] = (before["voi_split"] - after_top["voi_split"]) / before[
                "voi_split"]
            print(f"top {TOP} by {order} checked by a proofreader: {int(top.true.sum())} "
                  f"true; VOI split {before['voi_split']:.3f} -> "
                  f"{after_top['voi_split']:.3f} ({shares[order]:.1%} of it)")
        rows = {"before": before}
        for label, (floor, t) in ((f"floor {model.floor} only", (model.floor, 1.0)),
                                  (f"model at {model.threshold:.2f} only",
                                   (0, model.threshold)),
                                  ("auto-corrected (both)", (model.floor, model.threshold))):
            corrected, edits = correct_splits(seg, feats, t, small_table(
                "validation", score, floor))
            rows[f"{label} ({len(edits)})"] = emdask.evaluate(corrected, gt)
        print(f"{'':32} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} {'ARAND':>7}")
        for label, r in rows.items():  # ARAND to 4 places: a few specks move it little
            print(f"{label:32} {r['voi_split']:9.3f} {r['voi_merge']:9.3f} {r['voi']:7.3f} "
                  f"{r['arand']:7.4f}")
        after = list(rows.values())[-1]
        scores = {"candidates": len(feats), "true_splits": int(feats.true.sum()),
                  "detected": int(chosen.sum()), "true_detected": tp,
                  "floor_joins": 0 if small is None else len(small),
                  "floor_joins_right": right,
                  f"top{TOP}_voi_split_share": round(shares["priority"], 3),
                  f"top{TOP}_by_score_voi_split_share": round(shares["score"], 3),
                  "before": scores_of(before), "after": scores_of(after)}
        if ship:
            name = MODE.split_name(score)
            model.card = {
                "name": name, "segmentation": f"the {Path(MODE.net).stem} net's, {score} "
                "agglomeration at " + ("the net's card threshold" if score == "mean"
                                       else "the classifier's"),
                "train": f"FlyEM medulla z 0-159 (CC BY){MODE.as_sections}",
                "calibration": f"gala tiny FIB-SEM (BSD){MODE.as_sections} and the "
                "training region",
                "validation": f"FlyEM medulla z 200-249{MODE.as_sections}",
                "candidates": f"touching segments of >= {MIN_SIZE} voxels each",
                "voxel_size": list(MODE.voxel),
                "operating_point_rule": "of the floors and thresholds raising neither ARAND "
                "nor VOI on any calibration segmentation, the lowest VOI summed over them "
                "(floor 0 and threshold 1.0: no automated correction)",
                "validation_scores": scores,
                "reproduce": f"python benchmarks/eval_errors.py {MODE.flag}--only splits "
                "--ship"}
            path = Path(emdask.__file__).parent / "weights" / f"{name}.json"
            model.save(path)
            print(f"wrote {path}")


# ---------------------------------------------------------------- merges
@functools.cache
def merge_table(name: str, score: str) -> tuple:
    """The merge net's verdict per segment, with whether it is a true merge and its share
    of VOI merge (bits); and the true merges."""
    raw, seg, _, gt, _ = region(name, score)
    found = detect_merges(raw, labelled(seg), merge_net())
    truth = error_table(seg, gt)
    truth = truth[truth.kind == "merge"]
    voi = {s[0]: v for s, v in zip(truth.segments, truth.voi, strict=True)}
    found["true"] = [s in voi for s in found.segment]
    found["voi"] = [voi.get(s, 0.0) for s in found.segment]
    return found, truth


def cut_keys() -> list:
    """(threshold, the highest affinity a cut may cross) operating points, least
    correction first."""
    return [(1.0, 1.0)] + [(t, g) for t in sorted(CUT_THRESHOLDS, reverse=True)
                           for g in GATES]


@functools.cache
def cut_sweep(name: str, score: str) -> dict:
    """VOI and ARAND after cutting the candidates at or above each threshold whose cut
    crosses affinities no higher than the gate (one cut plan for all: cuts of different
    segments do not interact)."""
    raw, seg, affs, gt, fragments = region(name, score)
    found, _ = merge_table(name, score)
    chosen = found[found.score >= min(CUT_THRESHOLDS)].reset_index(drop=True)
    lut, edits = plan_cuts(raw, labelled(seg), fragments, affs, chosen, merge_net(),
                           max_affinity=1.0)
    none, *points = cut_keys()  # (none: the segmentation itself, whatever the scores)
    rows = {none: emdask.evaluate(seg, gt) | {"cuts": 0}}
    for t, g in points:
        ids = edits.new_id[(chosen.score >= t) & (edits.new_id > 0)
                           & (edits.cut_affinity <= g)].to_numpy(np.uint64)
        keep = np.isin(lut[1], ids)
        fixed = apply_cuts(seg, fragments, (lut[0][keep], lut[1][keep]))
        rows[(t, g)] = emdask.evaluate(fixed, gt) | {"cuts": int(ids.size)}
    return rows


def merges(ship: bool) -> None:
    sweeps = {key: cut_sweep(*key) for key in calibrate()}
    threshold, gate = choose(sweeps, cut_keys())
    cols = (1.0, *sorted(CUT_THRESHOLDS, reverse=True))
    print_grid({k: {(g, t): r for (t, g), r in s.items()} for k, s in sweeps.items()},
               GATES, cols, (gate, threshold), "merges: (cut affinity at most, threshold)")
    card = {}
    for score in MODE.scores:
        found, truth = merge_table("validation", score)
        chosen = found.score >= threshold
        tp = int((chosen & found.true).sum())
        total = truth.voi.sum()
        shares = {}
        # the candidate table's order (expected gain: score x voxels), the score alone,
        # and the order a proofreader has without a detector: the largest segments first
        for order, key in (("priority", found.score * found.gain), ("score", found.score),
                           ("size", found.voxels)):
            top = found.assign(key=key).sort_values("key", ascending=False,
                                                    kind="stable").head(TOP)
            shares[order] = float(top.voi[top.true].sum() / total) if len(truth) else 0.0
        scores = {"segments": len(found), "true_merges": int(found.true.sum()),
                  "true_merges_all": len(truth),
                  "auc": round(auc(found.score.to_numpy(), found.true.to_numpy()), 3),
                  "auc_size": round(auc(found.voxels.to_numpy(float),
                                        found.true.to_numpy()), 3),
                  "detected": int(chosen.sum()), "true_detected": tp,
                  f"top{TOP}_voi_merge_share": round(shares["priority"], 3),
                  f"top{TOP}_by_score_voi_merge_share": round(shares["score"], 3),
                  f"largest{TOP}_voi_merge_share": round(shares["size"], 3),
                  "windows": int(found.windows.sum())}
        print(f"\nmerges, validation, {score} agglomeration: {scores['segments']} segments "
              f"examined, {scores['true_merges']} true merges among them "
              f"({scores['true_merges_all']} in all); ROC AUC {scores['auc']:.3f} (segment "
              f"size alone: {scores['auc_size']:.3f})")
        print(f"at the threshold {threshold:.2f}: {scores['detected']} detected, precision "
              f"{tp / max(int(chosen.sum()), 1):.3f}, recall "
              f"{tp / max(int(found.true.sum()), 1):.3f}")
        print(f"top {TOP} checked by a proofreader hold of VOI merge ({total:.3f} bits): "
              f"{shares['priority']:.0%} by priority, {shares['score']:.0%} by score, "
              f"{shares['size']:.0%} for the {TOP} largest segments")
        sweep = cut_sweep("validation", score)
        print_grid({("validation", score): {(g, t): r for (t, g), r in sweep.items()}},
                   GATES, cols, (gate, threshold), "the same on validation")
        card[score] = scores | {"cuts": sweep[(threshold, gate)]["cuts"],
                                "before": scores_of(sweep[(1.0, 1.0)]),
                                "after": scores_of(sweep[(threshold, gate)])}
    if ship:
        from emdask.models import WEIGHTS, save_model

        path, model = WEIGHTS / f"merges{MODE.suffix}.pt", merge_net()
        save_model(model, path, card=model.card | {
            "threshold": threshold, "max_cut_affinity": gate,
            "threshold_rule": "of the thresholds and highest affinities a cut may cross "
            "(emdask.errors.plan_cuts) raising neither ARAND nor VOI on any calibration "
            f"segmentation (medulla z 0-159 and gala tiny FIB-SEM{MODE.as_sections}; "
            f"{' and '.join(MODE.scores)} agglomeration), the lowest VOI summed over them "
            "(1.0: no automated cuts)",
            "validation": f"FlyEM medulla z 200-249{MODE.as_sections}, the "
            f"{Path(MODE.net).stem} net's segmentations (mean agglomeration at its card "
            "threshold" + (", learned at the classifier's)" if "learned" in MODE.scores
                           else ")"),
            "validation_scores": card,
            "reproduce": f"python benchmarks/eval_errors.py {MODE.flag}--only merges --ship"})
        print(f"wrote the card of {path}")


# ---------------------------------------------------------------- after correction
def remaining() -> None:
    """What a proofreader faces after the automated correction of the cards (the gated
    cuts, then the joins, as the correct stage applies them): on the validation region,
    the share of the remaining VOI split that merging the true pairs among the top 20
    split candidates removes, and the share of the remaining VOI merge that the true
    merges among the top 20 merge candidates hold (both in the candidate table's order)."""
    from emdask.errors import detect_merges, join_lut, relabel
    from emdask.errors import load_split_model as split_model

    net = merge_net()
    for score in MODE.scores:
        raw, seg, affs, gt, fragments = region("validation", score)
        model = split_model(MODE.split_name(score))
        found, _ = merge_table("validation", score)
        cut = found[found.score >= net.card["threshold"]].reset_index(drop=True)
        lut, _ = plan_cuts(raw, labelled(seg), fragments, affs, cut, net)
        feats = split_table("validation", score)
        _, joins = correct_splits(seg, feats.assign(score=model.predict(feats)),
                                  model.threshold, small_table("validation", score,
                                                               model.floor))
        fixed = relabel(apply_cuts(seg, fragments, lut),
                        join_lut(joins[["a", "b"]].to_numpy(), seg.dtype))
        after = emdask.evaluate(fixed, gt)
        pairs = split_features(fixed, affs, MODE.voxel, MIN_SIZE)
        pairs = pairs.assign(score=model.predict(pairs), true=split_labels(
            pairs[["a", "b"]].to_numpy(), fixed, gt))
        top = pairs[pairs.score >= 0.5].assign(p=lambda f: f.score * f.gain).sort_values(
            "p", ascending=False, kind="stable").head(TOP)
        joined = emdask.evaluate(correct_splits(fixed, top[top.true].assign(score=1.0),
                                                0.5)[0], gt)
        split_share = (after["voi_split"] - joined["voi_split"]) / after["voi_split"]
        merges_found = detect_merges(raw, labelled(fixed), net)
        truth = error_table(fixed, gt)
        truth = truth[truth.kind == "merge"]
        voi = {t[0]: v for t, v in zip(truth.segments, truth.voi, strict=True)}
        top_m = merges_found.assign(p=merges_found.score * merges_found.gain).sort_values(
            "p", ascending=False, kind="stable").head(TOP)
        merge_share = sum(voi.get(int(x), 0.0) for x in top_m.segment) / max(
            truth.voi.sum(), 1e-12)
        print(f"validation, {score} agglomeration, after automated correction: VOI split "
              f"{after['voi_split']:.3f}, merge {after['voi_merge']:.3f}, ARAND "
              f"{after['arand']:.4f}")
        print(f"  top {TOP} split candidates: {int(top.true.sum())} true; joining them "
              f"removes {split_share:.1%} of VOI split ({after['voi_split']:.3f} -> "
              f"{joined['voi_split']:.3f})")
        print(f"  top {TOP} merge candidates: {sum(int(x) in voi for x in top_m.segment)} "
              f"true merges, holding {merge_share:.0%} of VOI merge")


# ---------------------------------------------------------------- the README's figure
def figure(path: Path) -> None:
    """Examples on the validation region, mean agglomeration: the first merge and split
    candidates of the proofreading table (crops through their locations), and one section
    before and after automated correction, each beside the ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emdask.errors import load_split_model

    raw, seg, _, gt, _ = region("validation", "mean")
    model = load_split_model("splits")
    found, _ = merge_table("validation", "mean")
    merge = found.assign(p=found.score * found.gain).sort_values("p", ascending=False).iloc[0]
    feats = split_table("validation", "mean")
    feats = feats.assign(score=model.predict(feats))
    listed = feats[feats.score >= 0.5]  # as the candidate table lists them
    split = listed.assign(p=listed.score * listed.gain).sort_values("p", ascending=False
                                                                   ).iloc[0]
    fixed, edits = correct_splits(seg, feats, model.threshold,
                                  small_table("validation", "mean", model.floor))
    def colours(labels):  # by id, so a segment keeps its colour after the joins
        h = labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return np.stack([(h >> np.uint64(k)) & np.uint64(255) for k in (16, 32, 48)],
                        -1) / 255.0

    def crop(at, half=64):
        z, y, x = (round(float(v)) for v in at)
        y0, x0 = (int(np.clip(c - half, 0, n - 2 * half)) for c, n in zip(
            (y, x), seg.shape[1:], strict=True))
        return z, slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half), (x - x0, y - y0)

    merge_at = np.array([merge.z_nm, merge.y_nm, merge.x_nm]) / MODE.voxel - 0.5
    rows = [(f"merge candidate 1 (score {merge.score:.2f}, segment {merge.segment})",
             crop(merge_at), [(int(merge.segment), "red")])]
    truth = "one neuron" if split.true else "two neurons"
    rows.append((f"split candidate 1 (score {split.score:.2f}, {truth} in truth)",
                 crop((split.z, split.y, split.x)),
                 [(int(split.a), "red"), (int(split.b), "cyan")]))
    fig, ax = plt.subplots(3, 3, figsize=(12, 12.6))
    for r, (what, (z, ys, xs, point), marked) in enumerate(rows):
        for c, (name, labels) in enumerate((("raw EM", None), ("segmentation", seg),
                                            ("ground truth", gt))):
            a = ax[r, c]
            a.imshow(raw[z, ys, xs], cmap="gray")
            if labels is not None:
                a.imshow(colours(labels[z, ys, xs]), alpha=0.35)
            for label, colour in marked:
                mask = seg[z, ys, xs] == label
                if mask.any():
                    a.contour(mask, levels=[0.5], colors=colour, linewidths=1.5)
            a.plot(*point, "y+", markersize=14, mew=2)
            a.set_title(f"{what}\n{name}, z {z}" if c == 0 else f"{name}, z {z}",
                        fontsize=9, loc="left")
            a.axis("off")
    z = seg.shape[0] // 2
    before, after = emdask.evaluate(seg, gt), emdask.evaluate(fixed, gt)
    for c, (name, labels) in enumerate((
            (f"before: {len(np.unique(seg))} segments, VOI {before['voi']:.3f}", seg),
            (f"automated correction ({len(edits)} joins): VOI {after['voi']:.3f}", fixed),
            ("ground truth", gt))):
        ax[2, c].imshow(raw[z], cmap="gray")
        ax[2, c].imshow(colours(labels[z]), alpha=0.45)
        ax[2, c].set_title(f"{name}, z {z}", fontsize=9, loc="left")
        ax[2, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # a third
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=MODALITIES, default="fibsem")
    parser.add_argument("--net", help="the boundary net (a shipped name or a .pt path; "
                        "default: the modality's)")
    parser.add_argument("--merges", help="the merge net (a shipped name or a .pt path; "
                        "default: the modality's)")
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--only", choices=("splits", "merges"))
    parser.add_argument("--remaining", action="store_true",
                        help="only the top candidates' share of the error left after "
                        "automated correction")
    parser.add_argument("--figure", type=Path, metavar="PNG",
                        help="only draw the README's figure of examples")
    args = parser.parse_args()
    global MODE
    chosen = {k: getattr(args, k) for k in ("net", "merges") if getattr(args, k)}
    MODE = replace(MODALITIES[args.modality], **chosen)
    if args.figure:
        return figure(args.figure)
    if args.remaining:
        return remaining()
    if args.only != "splits":
        merges(args.ship)
    if args.only != "merges":
        splits(args.ship)


if __name__ == "__main__":
    main()
