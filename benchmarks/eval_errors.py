"""Error detection and correction, trained and validated on separate FIB-SEM regions.

    python benchmarks/eval_errors.py [--only splits|merges] [--ship]

The fibsem net's affinities are segmented at the card's threshold on two regions of the
FlyEM medulla cube: z 0-159 (the classifiers' training region; the nets were trained on its
ground truth too) and z 200-249 (never trained on by any of them).

Splits: the split model (emdask.errors) is trained on the first region; its correction
threshold is the one whose automated correction lowers VOI split + merge most there
without raising ARAND.  On the validation region it prints precision and recall of the
candidates above that threshold; the share of VOI split that a proofreader checking the top
20 candidates removes (merging those that are true); and VOI split / merge and ARAND before
and after automated correction.

Merges: the shipped merge net (emdask/weights/merges.toml: artificial merges of touching
ground-truth neurons of z 0-199) examines every segment of at least 1000 voxels along its
skeleton.  A segment is a true merge when it overlaps two true neurons by 100 voxels each.
The threshold (for automated cuts, emdask.errors.plan_cuts) is chosen like the split
model's: the lowest VOI after cutting on the training region without raising ARAND (1.0:
none).  On the validation region it prints the ROC AUC over segments, precision and recall
at that threshold, the share of VOI merge held by the true merges among the top 20
candidates (what a proofreader cutting them would remove) against the 20 largest segments'
share (the order a proofreader has without a detector), and VOI and ARAND after cutting
at each threshold.  --ship writes the split model and its card to
emdask/weights/splits.json and the merge net's threshold and figures into its card.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
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
from emdask.models import pretrained
from emdask.segmentation import segment

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CUBE = DATA / "flyem_medulla_fib_neuroproof_sample2" / "medulla_fib_sample2_250cube.h5"
REGIONS = {"train": (slice(0, 160), slice(0, 250), slice(0, 250)),
           "validation": (slice(200, 250), slice(0, 250), slice(0, 250))}
VOXEL = (10.0, 10.0, 10.0)
TOP = 20
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@functools.cache
def region(name: str):
    """Raw, the fibsem net's segmentation and affinities, and ground truth of a region."""
    import h5py

    with h5py.File(CUBE, "r") as f:
        raw, gt = f["raw"][REGIONS[name]], f["labels/neuron_ids"][REGIONS[name]]
    model = pretrained("fibsem")
    affs = emdask.predict_affinities(
        xr.DataArray(raw, dims=("z", "y", "x"), attrs={"voxel_size": list(VOXEL)}), model)
    affs = np.asarray(affs[:3])
    fragments, seg = dask.compute(*segment(da.from_array(affs, chunks=(3, 64, 128, 128)),
                                           [model.card["threshold"]], return_fragments=True))
    return raw, np.asarray(seg), affs, gt, np.asarray(fragments)


def merge_table(name: str) -> tuple:
    """The merge net's verdict per segment of a region, with whether it is a true merge
    and its share of VOI merge (bits)."""
    raw, seg, _, gt, _ = region(name)
    found = detect_merges(raw, xr.DataArray(seg, dims=("z", "y", "x"), attrs={
        "voxel_size": list(VOXEL), "offset": [0.0, 0.0, 0.0]}), "merges")
    truth = error_table(seg, gt)
    truth = truth[truth.kind == "merge"]
    voi = {s[0]: v for s, v in zip(truth.segments, truth.voi, strict=True)}
    found["true"] = [s in voi for s in found.segment]
    found["voi"] = [voi.get(s, 0.0) for s in found.segment]
    return found, truth


def auc(score: np.ndarray, truth: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks, n_pos = rankdata(score), truth.sum()
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (~truth).sum()))


def cut_sweep(name: str, found) -> dict:
    """VOI and ARAND after cutting the candidates at or above each threshold (one cut plan
    for all: cuts of different segments do not interact)."""
    raw, seg, affs, gt, fragments = region(name)
    labels = xr.DataArray(seg, dims=("z", "y", "x"), attrs={"voxel_size": list(VOXEL),
                                                             "offset": [0.0, 0.0, 0.0]})
    chosen = found[found.score >= min(CUT_THRESHOLDS)].reset_index(drop=True)
    lut, edits = plan_cuts(raw, labels, fragments, affs, chosen, "merges")
    rows = {1.0: emdask.evaluate(seg, gt) | {"cuts": 0}}
    for t in CUT_THRESHOLDS:
        ids = edits.new_id[(chosen.score >= t) & (edits.new_id > 0)].to_numpy(np.uint64)
        keep = np.isin(lut[1], ids)
        fixed = apply_cuts(seg, fragments, (lut[0][keep], lut[1][keep]))
        rows[t] = emdask.evaluate(fixed, gt) | {"cuts": int(ids.size)}
    return rows


CUT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def print_sweep(sweep: dict, threshold: float) -> None:
    print(f"{'cut at':>8} {'cuts':>5} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} {'ARAND':>7}")
    for t, r in sorted(sweep.items(), reverse=True):
        mark = " <- the card's" if t == threshold else ""
        print(f"{t:8.2f} {r['cuts']:5d} {r['voi_split']:9.3f} {r['voi_merge']:9.3f} "
              f"{r['voi']:7.3f} {r['arand']:7.3f}{mark}")


def merges(ship: bool) -> None:
    found, _ = merge_table("train")
    # the correction threshold (the card's): lowest VOI after cutting on the training
    # region without raising ARAND (1.0: no automated cuts), as for splits
    sweep = cut_sweep("train", found)
    base = sweep[1.0]
    threshold = min((t for t in sweep if sweep[t]["arand"] <= base["arand"]),
                    key=lambda t: (sweep[t]["voi"], -t))
    print(f"merges, training region: {len(found)} segments examined, "
          f"{int(found.true.sum())} true merges; cut threshold {threshold:.3f} (VOI "
          f"{base['voi']:.3f} -> {sweep[threshold]['voi']:.3f})")
    print_sweep(sweep, threshold)
    found, truth = merge_table("validation")
    chosen = found.score >= threshold
    tp = int((chosen & found.true).sum())
    top = found.head(TOP)
    share = float(top.voi[top.true].sum() / truth.voi.sum()) if len(truth) else 0.0
    # the baseline a proofreader has without a detector: the largest segments first
    _, seg, _, _, _ = region("validation")
    ids, counts = np.unique(seg, return_counts=True)
    largest = set(ids[np.argsort(-counts, kind="stable")][:TOP].tolist())
    voi = dict(zip((s[0] for s in truth.segments), truth.voi, strict=True))
    by_size = sum(voi.get(s, 0.0) for s in largest) / truth.voi.sum() if len(truth) else 0.0
    scores = {"segments": len(found), "true_merges": int(found.true.sum()),
              "true_merges_all": len(truth), "auc": round(auc(found.score.to_numpy(),
                                                              found.true.to_numpy()), 3),
              "detected": int(chosen.sum()), "true_detected": tp,
              "precision": round(tp / max(int(chosen.sum()), 1), 3),
              "recall": round(tp / max(int(found.true.sum()), 1), 3),
              f"top{TOP}_true": int(top.true.sum()),
              f"top{TOP}_voi_merge_share": round(share, 3),
              f"largest{TOP}_voi_merge_share": round(float(by_size), 3),
              "windows": int(found.windows.sum())}
    print(f"merges, validation region: {scores['segments']} segments examined, "
          f"{scores['true_merges']} true merges among them ({scores['true_merges_all']} "
          f"in all); ROC AUC {scores['auc']:.3f}")
    print(f"at the threshold {threshold:.3f}: {scores['detected']} detected, precision "
          f"{scores['precision']:.3f}, recall {scores['recall']:.3f}")
    print(f"top {TOP} checked by a proofreader: {scores[f'top{TOP}_true']} true; they hold "
          f"{share:.0%} of VOI merge ({truth.voi.sum():.3f} bits); the {TOP} largest "
          f"segments hold {by_size:.0%}")
    sweep = cut_sweep("validation", found)
    after = sweep[threshold] if threshold < 1.0 else sweep[1.0]
    scores |= {"cuts": after["cuts"],
               "before": {k: round(sweep[1.0][k], 4) for k in ("voi_split", "voi_merge",
                                                                "arand")},
               "after": {k: round(after[k], 4) for k in ("voi_split", "voi_merge", "arand")}}
    print_sweep(sweep, threshold)
    if ship:
        from emdask.models import WEIGHTS, load_model, save_model

        path = WEIGHTS / "merges.pt"
        model = load_model(path)
        save_model(model, path, card=model.card | {
            "threshold": threshold, "threshold_rule": "lowest VOI after automated cuts on "
            "the training region (z 0-159), ARAND not raised (1.0: no automated cuts)",
            "validation": "FlyEM medulla z 200-249, the fibsem net's segmentation at its "
            "card threshold", "validation_scores": scores,
            "reproduce": "python benchmarks/eval_errors.py --only merges --ship"})
        print(f"wrote the card of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--only", choices=("splits", "merges"))
    args = parser.parse_args()
    if args.only != "splits":
        merges(args.ship)
    if args.only != "merges":
        splits(args.ship)


def splits(ship: bool) -> None:
    _, seg, affs, gt, _ = region("train")
    feats = split_features(seg, affs, VOXEL)
    labels = split_labels(feats[["a", "b"]].to_numpy(), seg, gt)
    model = train_split_model(feats, labels)
    # the correction threshold: the one whose automated correction lowers VOI split +
    # merge most on the training region without raising ARAND (1.0: correct nothing)
    feats["score"] = model.predict(feats)
    base = emdask.evaluate(seg, gt)
    best = (base["voi"], 1.0)
    for t in THRESHOLDS:
        s = emdask.evaluate(correct_splits(seg, feats, t)[0], gt)
        if s["arand"] <= base["arand"] and s["voi"] < best[0]:
            best = (s["voi"], t)
    model.threshold = best[1]
    print(f"training region: {len(feats)} candidate pairs, {labels.sum()} true splits; "
          f"threshold {model.threshold:.3f}")

    _, seg, affs, gt, _ = region("validation")
    before = emdask.evaluate(seg, gt)
    feats = split_features(seg, affs, VOXEL)
    labels = split_labels(feats[["a", "b"]].to_numpy(), seg, gt)
    feats["score"] = model.predict(feats)
    feats["true"] = labels
    feats = feats.sort_values("score", ascending=False, ignore_index=True)
    chosen = feats.score >= model.threshold
    tp = int((chosen & feats.true).sum())
    truth = error_table(seg, gt)
    print(f"validation region: {len(feats)} candidate pairs, {int(labels.sum())} true "
          f"splits among them; {int((truth.kind == 'split').sum())} true split errors "
          f"(neurons in >= 2 segments of >= 100 voxels)")
    print(f"at the threshold {model.threshold:.3f}: {int(chosen.sum())} detected, precision "
          f"{tp / max(int(chosen.sum()), 1):.3f}, recall {tp / max(int(labels.sum()), 1):.3f}")
    # a proofreader checks the top candidates and merges those that are true
    top = feats.head(TOP)
    fixed, _ = correct_splits(seg, top[top.true].assign(score=1.0), 0.5)
    after_top = emdask.evaluate(fixed, gt)
    share = (before["voi_split"] - after_top["voi_split"]) / before["voi_split"]
    print(f"top {TOP} checked by a proofreader: {int(top.true.sum())} true; VOI split "
          f"{before['voi_split']:.3f} -> {after_top['voi_split']:.3f} ({share:.0%} of it)")
    corrected, edits = correct_splits(seg, feats, model.threshold)
    after = emdask.evaluate(corrected, gt)
    print(f"{'':24} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} {'ARAND':>7}")
    for name, s in (("before", before), (f"auto-corrected ({len(edits)})", after)):
        print(f"{name:24} {s['voi_split']:9.3f} {s['voi_merge']:9.3f} {s['voi']:7.3f} "
              f"{s['arand']:7.3f}")
    if ship:
        model.card = {
            "name": "splits", "segmentation": "fibsem net, card threshold, emdask.segment",
            "train": "FlyEM medulla z 0-159 (CC BY)", "validation": "FlyEM medulla z 200-249",
            "threshold_rule": "lowest VOI after correction on the training region, ARAND "
                              "not raised (1.0: no automated correction)",
            "validation_scores": {
                "candidates": len(feats), "true_splits": int(labels.sum()),
                "detected": int(chosen.sum()), "true_detected": tp,
                f"top{TOP}_voi_split_share": round(share, 3),
                "before": {k: round(before[k], 4) for k in ("voi_split", "voi_merge",
                                                              "arand")},
                "after": {k: round(after[k], 4) for k in ("voi_split", "voi_merge",
                                                            "arand")}},
            "reproduce": "python benchmarks/eval_errors.py --ship"}
        path = Path(emdask.__file__).parent / "weights" / "splits.json"
        model.save(path)
        print(f"wrote {path}")
        json.loads(path.read_text())


if __name__ == "__main__":
    main()
