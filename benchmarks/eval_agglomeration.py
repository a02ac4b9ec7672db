"""Learned agglomeration against mean and quantile agglomeration of the same affinities.

    python benchmarks/eval_agglomeration.py [--net fibsem|sstem3d] [--halves] [--tta N] [--ship]

The shipped net predicts the FlyEM medulla cube (uint8, as the pipeline stores
affinities): ``fibsem`` at 10 nm; ``sstem3d`` on the cube made into 40 nm sections (each
the mean of 4 slices, as in its training).  The edge classifier (affinity, size and raw EM
features) learns from sections z 0-199 (the nets' own training region); every score is
measured on the net's validation region (z 200-249), which neither the net nor the
classifier saw.  Each score is reported at the
operating point a user gets (mean: the net's card threshold; learned: 0.5, where a merge is
as likely right as wrong, fixed before looking at validation) and at its best threshold.
``--halves`` also trains on the first half of the training sections and scores the second,
and the other way round (a second look, on the net's training sections).  ``--ship``
writes emdask/weights/NET_agglomeration.json and its card (.md).  The sstem3d classifier
is scored on the other ssEM regions by ``benchmarks/eval_ssem.py --learned``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dask
import h5py
import numpy as np
from common import MEDULLA

from emdask import evaluate, segment
from emdask.learn_agglomeration import train_agglomeration
from emdask.models import WEIGHTS, load_model, pretrained, shipped_operating_point
from emdask.predict import predict_affinities
from emdask.training import section_means
from emdask.volumes import as_volume

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# per net: slices averaged into one section, the training and validation boxes (in the
# net's sections), and the validation region as the card says it
NETS = {
    "fibsem": (1, np.s_[0:200, :, :], np.s_[200:250, 0:192, 0:192],
               "z 200-249, y 0-191, x 0-191"),
    "sstem3d": (4, np.s_[0:50, :, :], np.s_[50:62, :, :],
                "z 200-247 as 12 sections of 40 nm, y 0-249, x 0-249"),
}
LEARNED_THRESHOLD = 0.5
KEYS = ("voi_split", "voi_merge", "voi", "arand", "cremi_score")


def scores(affs, truth, raw, score: str, classifier=None) -> tuple[list[dict], float]:
    """One segmentation per threshold (one pass), each scored; and the seconds it took."""
    t = time.perf_counter()
    segs = dask.compute(*segment(affs, THRESHOLDS, score=score, classifier=classifier,
                                 raw=raw))
    seconds = time.perf_counter() - t
    return [evaluate(s, truth) | {"threshold": th}
            for s, th in zip(segs, THRESHOLDS, strict=True)], seconds


def compare(clf, affs, truth, raw, where: str, card_threshold: float) -> tuple[dict, bool]:
    """Mean, quantile-75 and learned agglomeration of one region (the mean and quantile at
    the net's card threshold and at their best): the table, and whether the learned score
    at its default beats the others' best on VOI and ARAND."""
    default = {"mean": card_threshold, "quantile-75": card_threshold,
               "learned": LEARNED_THRESHOLD}
    print(f"{where} ({truth.size / 1e6:.2f} Mvoxel)\n")
    print("| score | threshold | VOI split | VOI merge | VOI | ARAND | agglomeration s |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for score, threshold in default.items():
        rows, seconds = scores(affs, truth, raw, score, clf if score == "learned" else None)
        at = next(r for r in rows if r["threshold"] == threshold)
        best = min(rows, key=lambda r: r["voi"])
        results[score] = {"default": at, "best": best, "seconds": seconds}
        for label, r in (("default", at), ("best", best)):
            print(f"| {score} ({label}) | {r['threshold']} | {r['voi_split']:.3f} | "
                  f"{r['voi_merge']:.3f} | {r['voi']:.3f} | {r['arand']:.3f} | "
                  f"{seconds:.1f} |")
    learned = results["learned"]["default"]
    beats = all(learned["voi"] < results[s]["best"]["voi"] and
                learned["arand"] <= results[s]["best"]["arand"] for s in ("mean", "quantile-75"))
    print(f"\nlearned at {LEARNED_THRESHOLD} beats the best of mean and quantile-75 on VOI and "
          f"ARAND: {beats}\n")
    return results, beats


def _train(affs, truth, raw, box, rounds: int, net: str, **options):
    t = time.perf_counter()
    clf = train_agglomeration([(affs[(slice(None), *box)], truth[box], raw[box])], rounds,
                              card={"net": net, "threshold": LEARNED_THRESHOLD}, **options)
    print(f"classifier from z {box[0].start}-{box[0].stop - 1}: {clf.card['examples']} "
          f"teacher decisions ({clf.card['right']} right), {rounds} rounds, "
          f"{time.perf_counter() - t:.0f} s\n")
    return clf, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", default="fibsem", choices=sorted(NETS))
    parser.add_argument("--ship", action="store_true", help="write the shipped classifier")
    parser.add_argument("--halves", action="store_true", help="also train on each half of "
                        "the training sections and score on the other")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tta", type=int, help="the net's test-time augmentation (default: "
                        "its card's)")
    parser.add_argument("--weight-power", type=float, default=0.0, help="examples weighted "
                        "by the smaller region's size to this power (VOI weighs by volume)")
    parser.add_argument("--model", help="a .pt file of the net to use in place of the "
                        "shipped one (a candidate; never shipped with --ship)")
    args = parser.parse_args()
    if args.ship and args.model:
        parser.error("--ship is for the shipped net's classifier; leave out --model")
    n, train, validation, where = NETS[args.net]
    model = load_model(args.model) if args.model else pretrained(args.net)
    card_threshold = (model.card.get("threshold")
                      or shipped_operating_point(args.net).get("threshold", 0.5))
    with h5py.File(MEDULLA) as f:
        raw, truth = section_means(f["raw"][:], f["labels/neuron_ids"][:], n)
    t = time.perf_counter()
    affs = predict_affinities(as_volume(raw, model.config.voxel_size), model, tta=args.tta,
                              dtype="uint8")[:3].values
    print(f"{args.net} affinities of the medulla cube {raw.shape}: "
          f"{time.perf_counter() - t:.1f} s")
    if args.halves:
        z = train[0].stop // 2
        for a, b in ((0, z), (z, 2 * z)), ((z, 2 * z), (0, z)):
            clf, _ = _train(affs, truth, raw, np.s_[a[0]:a[1], :, :], args.rounds, args.net,
                            weight_power=args.weight_power)
            test = np.s_[b[0]:b[1], :, :]
            compare(clf, affs[(slice(None), *test)], truth[test], raw[test],
                    f"sections {b[0]}-{b[1] - 1}", card_threshold)
    clf, train_s = _train(affs, truth, raw, train, args.rounds, args.net,
                          weight_power=args.weight_power)
    results, beats = compare(clf, affs[(slice(None), *validation)], truth[validation],
                             raw[validation], f"validation {where}", card_threshold)
    if not args.ship:
        return
    if not beats:
        raise SystemExit("not shipped: the learned score does not beat the others")
    clf.card.update({
        "training": (f"{MEDULLA.name} sections z 0-199 (the {args.net} net's training "
                     f"region{', as 40 nm sections' if n > 1 else ''})"),
        "validation": f"{MEDULLA.name} voxels {where} (never trained on)",
        "train_seconds": round(train_s),
        "validation_scores": {s: {k: round(r["default"][k], 4) for k in KEYS}
                              | {"threshold": r["default"]["threshold"]}
                              for s, r in results.items()},
        "reproduce": f"python benchmarks/eval_agglomeration.py --net {args.net} --ship",
        "licence": "BSD-3-Clause; training data: FlyEM medulla (CC BY, HHMI Janelia)",
    })
    path = WEIGHTS / f"{args.net}_agglomeration.json"
    clf.save(path)
    _write_card(clf.card, results, path.with_suffix(".md"))
    print(f"shipped {path} ({path.stat().st_size / 1e3:.0f} kB)")
    print(json.dumps(clf.card, indent=2))


def _write_card(card: dict, results: dict, path: Path) -> None:
    net = card["net"]
    lines = [
        f"# Classifier card: `{net}_agglomeration`",
        "",
        (f"Learned agglomeration score (`segment(..., score=\"learned\", classifier=\"{net}\")`,"
         f" or `score = \"learned\"` and `classifier = \"{net}\"` in `[segment]`) for the "
         f"affinities of the shipped `{net}` net: a gradient-boosted tree ensemble over "
         "the boundary's affinity statistics, the two regions' sizes and the raw EM on the "
         "boundary and inside the regions (so it needs the uint8 EM: `raw=`)."),
        "",
        (f"- **Training**: {card['training']}; {card['examples']} teacher decisions "
         f"({card['right']} right), {card['rounds']} rounds, {card['train_seconds']} s"),
        f"- **Validation**: {card['validation']}",
        f"- **Recommended threshold**: {card['threshold']}",
        f"- **Licence**: {card['licence']}",
        f"- **Reproduce**: `{card['reproduce']}`",
        "",
        "| score | threshold | VOI split | VOI merge | VOI | ARAND |",
        "|---|---|---|---|---|---|",
    ]
    for score, r in results.items():
        for label in ("default", "best"):
            x = r[label]
            lines.append(f"| {score} ({label}) | {x['threshold']} | {x['voi_split']:.3f} | "
                         f"{x['voi_merge']:.3f} | {x['voi']:.3f} | {x['arand']:.3f} |")
    lines += ["", (f"Default: the threshold a user gets (mean and quantile: the {net} net's "
                   "card; learned: 0.5); best: the best of the sweep 0.1-0.9 on validation.")]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
