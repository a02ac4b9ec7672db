"""Error detection and correction: trained, calibrated and validated on separate FIB-SEM
volumes, for both agglomerations a user gets.

    python benchmarks/eval_errors.py [--only splits|merges] [--ship] [--per-score]

The fibsem net's affinities are segmented two ways: mean agglomeration at the net's card
threshold (``emdask run``'s default score) and learned agglomeration with the shipped
classifier at its card's threshold (what the demo runs, ``emdask.demo.operating_point``).
Three volumes, each with dense ground truth:

- train: FlyEM medulla z 0-159.  The split model (emdask.errors) learns from the touching
  pairs of both segmentations; the merge net (emdask/weights/merges.toml) was trained on
  artificial merges of touching ground-truth neurons of z 0-199.
- calibration: gala's tiny FIB-SEM volume (another crop of the medulla, 50 x 100 x 200
  voxels), which none of the nets or models trained on.
- validation: medulla z 200-249, never trained or calibrated on.

Correction thresholds (the cards'): among the thresholds whose automated correction raises
ARAND on none of the four calibration segmentations (train and calibration, mean and
learned), the one with the lowest VOI split + merge summed over them (1.0: correct
nothing).  A threshold chosen on the merge net's own training data alone would trust its
scores where they are best; the independent volume keeps that honest.

On the validation region, for each segmentation: precision and recall of the candidates
above the threshold; what a proofreader checking the top 20 candidates removes, in the
candidate table's order (expected gain: score times what the fix removes,
emdask.errors.join_gain for joins, the segment's size for cuts) and by score alone
(splits: the share of VOI split removed by merging the true pairs; merges: the share of
VOI merge held by the true merges among them, against the 20 largest segments' share, the
order a proofreader has without a detector); merges: the ROC AUC over segments (a segment
is a true merge when it overlaps two true neurons by 100 voxels each); and VOI split /
merge and ARAND before and after automated correction.  --ship writes the split model and
its card to emdask/weights/splits.json and the merge net's threshold and figures into its
card.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

import emdask
from emdask.errors import (
    apply_cuts,
    correct_splits,
    detect_merges,
    error_table,
    plan_cuts,
    split_features,
    split_labels,
    train_split_model,
)
from emdask.learn_agglomeration import load_classifier
from emdask.models import pretrained
from emdask.segmentation import segment

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CUBE = DATA / "flyem_medulla_fib_neuroproof_sample2" / "medulla_fib_sample2_250cube.h5"
GALA = DATA / "gala_tiny_fib" / "gala_train.h5"
VOLUMES = {"train": (CUBE, (slice(0, 160), slice(0, 250), slice(0, 250))),
           "calibration": (GALA, (slice(None),) * 3),
           "validation": (CUBE, (slice(200, 250), slice(0, 250), slice(0, 250)))}
SCORES = ("mean", "learned")
CALIBRATE = [(name, score) for name in ("train", "calibration") for score in SCORES]
VOXEL = (10.0, 10.0, 10.0)
TOP = 20
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
CUT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


@functools.cache
def volume(name: str):
    """Raw, the fibsem net's three nearest-neighbour affinities and ground truth."""
    import h5py

    path, box = VOLUMES[name]
    with h5py.File(path, "r") as f:
        raw, gt = f["raw"][box], f["labels/neuron_ids"][box]
    affs = emdask.predict_affinities(
        xr.DataArray(raw, dims=("z", "y", "x"), attrs={"voxel_size": list(VOXEL)}),
        pretrained("fibsem"))
    return raw, np.asarray(affs[:3]), gt


@functools.cache
def region(name: str, score: str):
    """Raw, segmentation, affinities, ground truth and fragments of a volume, segmented
    with ``score`` at its card threshold."""
    raw, affs, gt = volume(name)
    if score == "learned":
        options = {"score": "learned", "classifier": "fibsem",
                   "raw": da.from_array(raw, chunks=(64, 128, 128))}
        threshold = load_classifier("fibsem").card["threshold"]
    else:
        options, threshold = {}, pretrained("fibsem").card["threshold"]
    fragments, seg = dask.compute(*segment(da.from_array(affs, chunks=(3, 64, 128, 128)),
                                           [threshold], return_fragments=True, **options))
    return raw, np.asarray(seg), affs, gt, np.asarray(fragments)


def labelled(seg: np.ndarray) -> xr.DataArray:
    return xr.DataArray(seg, dims=("z", "y", "x"), attrs={"voxel_size": list(VOXEL),
                                                          "offset": [0.0, 0.0, 0.0]})


def choose(sweeps: dict, thresholds) -> float:
    """The correction threshold: lowest VOI summed over the calibration segmentations among
    those raising ARAND on none (1.0: none); ``sweeps[(name, score)][t]`` are the scores
    after correcting at ``t``, ``[1.0]`` before."""
    fine = [t for t in thresholds if all(s[t]["arand"] <= s[1.0]["arand"] + 1e-9
                                         for s in sweeps.values())]
    return min([1.0, *fine], key=lambda t: (sum(s[t]["voi"] for s in sweeps.values()), -t))


def print_calibration(sweeps: dict, threshold: float, what: str) -> None:
    """VOI and ARAND of each calibration segmentation corrected at each threshold."""
    print(f"{what} threshold {threshold:.2f}, chosen on (VOI / ARAND after correcting at):")
    ts = sorted(next(iter(sweeps.values())), reverse=True)
    print(f"{'':22}" + "".join(f"{t:>14.2f}" for t in ts))
    for (name, score), s in sweeps.items():
        print(f"{name + ', ' + score:22}" + "".join(
            f"{s[t]['voi']:7.3f}/{s[t]['arand']:.3f}" for t in ts))


def auc(score: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks, n_pos = rankdata(score), truth.sum()
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (~truth).sum()))


def scores_of(s: dict) -> dict:
    return {k: round(s[k], 4) for k in ("voi_split", "voi_merge", "arand")}


# ---------------------------------------------------------------- splits
@functools.cache
def split_table(name: str, score: str) -> pd.DataFrame:
    """Candidate pairs of a segmentation with their features and truth."""
    _, seg, affs, gt, _ = region(name, score)
    feats = split_features(seg, affs, VOXEL)
    return feats.assign(true=split_labels(feats[["a", "b"]].to_numpy(), seg, gt))


def split_sweep(model, name: str, score: str) -> dict:
    _, seg, _, gt, _ = region(name, score)
    feats = split_table(name, score).assign(score=lambda f: model.predict(f))
    return {1.0: emdask.evaluate(seg, gt)} | {
        t: emdask.evaluate(correct_splits(seg, feats, t)[0], gt) for t in THRESHOLDS}


def splits(ship: bool, per_score: bool = False) -> None:
    # one model for both agglomerations (shipped), or (--per-score) one for each, trained
    # and calibrated on that agglomeration's segmentations only
    groups = {s: [s] for s in SCORES} if per_score else {"both": list(SCORES)}
    models = {}
    for group, scores in groups.items():
        train = [split_table("train", score) for score in scores]
        model = train_split_model(pd.concat(train, ignore_index=True),
                                  np.concatenate([t.true.to_numpy() for t in train]))
        sweeps = {key: split_sweep(model, *key) for key in CALIBRATE if key[1] in scores}
        model.threshold = choose(sweeps, THRESHOLDS)
        print(f"splits ({group}): the model learned from {sum(map(len, train))} pairs of "
              f"the training region ({sum(int(t.true.sum()) for t in train)} true splits)")
        print_calibration(sweeps, model.threshold, f"splits ({group}):")
        models |= dict.fromkeys(scores, model)
    card = {}
    for score in SCORES:
        model = models[score]
        threshold = model.threshold
        _, seg, _, gt, _ = region("validation", score)
        before = emdask.evaluate(seg, gt)
        feats = split_table("validation", score)
        feats = feats.assign(score=model.predict(feats))
        feats = feats.sort_values("score", ascending=False, ignore_index=True)
        chosen = feats.score >= threshold
        tp = int((chosen & feats.true).sum())
        truth = error_table(seg, gt)
        print(f"\nsplits, validation, {score} agglomeration: {len(feats)} candidate pairs, "
              f"{int(feats.true.sum())} true splits among them; "
              f"{int((truth.kind == 'split').sum())} split errors (neurons in >= 2 "
              "segments of >= 100 voxels)")
        print(f"at the threshold {threshold:.2f}: {int(chosen.sum())} detected, precision "
              f"{tp / max(int(chosen.sum()), 1):.3f}, recall "
              f"{tp / max(int(feats.true.sum()), 1):.3f}")
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
        corrected, edits = correct_splits(seg, feats, threshold)
        after = emdask.evaluate(corrected, gt)
        print(f"{'':24} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} {'ARAND':>7}")
        for label, s in (("before", before), (f"auto-corrected ({len(edits)})", after)):
            print(f"{label:24} {s['voi_split']:9.3f} {s['voi_merge']:9.3f} {s['voi']:7.3f} "
                  f"{s['arand']:7.3f}")
        card[score] = {"candidates": len(feats), "true_splits": int(feats.true.sum()),
                       "detected": int(chosen.sum()), "true_detected": tp,
                       f"top{TOP}_voi_split_share": round(shares["priority"], 3),
                       f"top{TOP}_by_score_voi_split_share": round(shares["score"], 3),
                       "before": scores_of(before), "after": scores_of(after)}
    if ship:
        if per_score:
            raise SystemExit("--ship writes the one shipped model, not --per-score's two")
        model.card = {
            "name": "splits", "segmentation": "fibsem net; mean agglomeration at the net's "
            "card threshold and learned agglomeration at the classifier's",
            "train": "FlyEM medulla z 0-159 (CC BY), both segmentations",
            "calibration": "gala tiny FIB-SEM (BSD), both segmentations, and the training "
                           "region",
            "validation": "FlyEM medulla z 200-249",
            "threshold_rule": "lowest VOI summed over the calibration segmentations among "
                              "thresholds raising ARAND on none (1.0: no automated "
                              "correction)",
            "validation_scores": card, "reproduce": "python benchmarks/eval_errors.py --ship"}
        path = Path(emdask.__file__).parent / "weights" / "splits.json"
        model.save(path)
        print(f"wrote {path}")
        json.loads(path.read_text())


# ---------------------------------------------------------------- merges
@functools.cache
def merge_table(name: str, score: str) -> tuple:
    """The merge net's verdict per segment, with whether it is a true merge and its share
    of VOI merge (bits); and the true merges."""
    raw, seg, _, gt, _ = region(name, score)
    found = detect_merges(raw, labelled(seg), "merges")
    truth = error_table(seg, gt)
    truth = truth[truth.kind == "merge"]
    voi = {s[0]: v for s, v in zip(truth.segments, truth.voi, strict=True)}
    found["true"] = [s in voi for s in found.segment]
    found["voi"] = [voi.get(s, 0.0) for s in found.segment]
    return found, truth


@functools.cache
def cut_sweep(name: str, score: str) -> dict:
    """VOI and ARAND after cutting the candidates at or above each threshold (one cut plan
    for all: cuts of different segments do not interact)."""
    raw, seg, affs, gt, fragments = region(name, score)
    found, _ = merge_table(name, score)
    chosen = found[found.score >= min(CUT_THRESHOLDS)].reset_index(drop=True)
    lut, edits = plan_cuts(raw, labelled(seg), fragments, affs, chosen, "merges")
    rows = {1.0: emdask.evaluate(seg, gt) | {"cuts": 0}}
    for t in CUT_THRESHOLDS:
        ids = edits.new_id[(chosen.score >= t) & (edits.new_id > 0)].to_numpy(np.uint64)
        keep = np.isin(lut[1], ids)
        fixed = apply_cuts(seg, fragments, (lut[0][keep], lut[1][keep]))
        rows[t] = emdask.evaluate(fixed, gt) | {"cuts": int(ids.size)}
    return rows


def print_sweep(sweep: dict, threshold: float) -> None:
    print(f"{'cut at':>8} {'cuts':>5} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} {'ARAND':>7}")
    for t, r in sorted(sweep.items(), reverse=True):
        mark = " <- the card's" if t == threshold else ""
        print(f"{t:8.2f} {r['cuts']:5d} {r['voi_split']:9.3f} {r['voi_merge']:9.3f} "
              f"{r['voi']:7.3f} {r['arand']:7.3f}{mark}")


def merges(ship: bool) -> None:
    threshold = choose({key: cut_sweep(*key) for key in CALIBRATE}, CUT_THRESHOLDS)
    print_calibration({key: cut_sweep(*key) for key in CALIBRATE}, threshold, "merges: cut")
    card = {}
    for score in SCORES:
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
        print_sweep(sweep, threshold)
        card[score] = scores | {"cuts": sweep[threshold]["cuts"],
                                "before": scores_of(sweep[1.0]),
                                "after": scores_of(sweep[threshold])}
    if ship:
        from emdask.models import WEIGHTS, load_model, save_model

        path = WEIGHTS / "merges.pt"
        model = load_model(path)
        save_model(model, path, card=model.card | {
            "threshold": threshold,
            "threshold_rule": "lowest VOI after automated cuts summed over the calibration "
            "segmentations (medulla z 0-159 and gala tiny FIB-SEM, mean and learned "
            "agglomeration) among thresholds raising ARAND on none (1.0: no automated cuts)",
            "validation": "FlyEM medulla z 200-249, the fibsem net's segmentations (mean "
            "agglomeration at its card threshold, learned at the classifier's)",
            "validation_scores": card,
            "reproduce": "python benchmarks/eval_errors.py --only merges --ship"})
        print(f"wrote the card of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--only", choices=("splits", "merges"))
    parser.add_argument("--per-score", action="store_true",
                        help="splits: a model per agglomeration (not shipped)")
    args = parser.parse_args()
    if args.only != "splits":
        merges(args.ship)
    if args.only != "merges":
        splits(args.ship, args.per_score)


if __name__ == "__main__":
    main()
