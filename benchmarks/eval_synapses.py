"""Score a synapse net on the larval VNC stack: detection and partners.

    python benchmarks/eval_synapses.py runs/synapses_vnc/model.pt [--thresholds 0.98 ...]
    python benchmarks/eval_synapses.py --folds 4 [--train] [--max-minutes M]
                                       [--recipe TOML] [--set KEY=VALUE ...] [--only K ...]
                                       [--tta N] [--ship]

The first form scores one net on the validation rows (y 768-1023).  ``--folds 4`` is
cross-validation over the whole stack: the rows are cut into 4 folds at rows no labelled
synapse crosses (every synapse lies in exactly one fold: 10, 10, 6 and 7 synapses); fold k's
net trains (``--train``: ``runs/synapse_folds/<recipe>/fold<k>``, resumable; the shipped
recipe ``emdask/weights_nc/synapses.toml`` unless ``--recipe`` names another, ``--set``
changing its keys (``--set dice=1 augment.edge=0.25``), with its rows
replaced; under bfloat16 autocast with 1 x 12 x 96 x 96 patches where the CPU has native
bfloat16) on the rows outside the fold and a margin of 32 rows around it; its threshold,
minimum size and maximum extent (objects longer than it, in nm along any axis, dropped)
are chosen on those training rows only, by F1; then the fold is scored at that operating
point (precision, recall, F1, CREMI distances, partners with the true cells and with the
``sstem`` net's segmentation), and the table ends with mean +- sd over the folds.  A second table scores each fold at the
operating point the *other* folds choose (the best F1 summed over the other fold nets'
held-out folds), a third every fold at one operating point, as a model card has one: the
best F1 summed over all held-out folds (the card's point; table 2 estimates a point chosen
without the fold's scores).  ``--ship`` writes the card's point, and the folds' scores
there, into the shipped detector's card: the defaults everywhere.

``--tta N``: the nets' outputs averaged over N symmetries of the volume (test-time
augmentation, N passes; default the model card's, 1 for fold nets).

Detection: the net runs chunkwise (``predict_synapses`` over 4 x 2 x 2 blocks), objects
come from ``find_synapses``, and are scored against the labelled synaptic densities
(precision, recall, F1 by overlap; CREMI distances in nm) at each threshold.

Partners: for every labelled synapse that a detection matches, in the section where the
labelled synapse is largest, the cells (``labels/cell_ids_2d``: cells per section, from the
ground-truth membranes) around the true mask are ranked as ``assign_partners`` ranks
segments; ``assign_partners`` ranks the segments the *detected* object touches in a
segmentation, and a synapse counts as right when its two top-ranked segments lie (by
majority overlap) in the first true cell and in a second one facing the synapse
(``partner_accuracy``; also given: in the second-ranked cell itself).  Scored for
the ground-truth cells (isolates detection errors) and for a segmentation that needs no
training (per-section watershed of the smoothed intensity).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from emdask import segment
from emdask.affinities import affinities_from_intensity
from emdask.models import card_defaults, load_model
from emdask.predict import predict_synapses
from emdask.synapses import find_synapses, longest, partner_accuracy, synapse_scores
from emdask.volumes import cutout, open_volume

VNC = "../shared/data/drosophila_vnc_sstem_gerhard2013/vnc_stack1_synapses_x0-640.h5"
ROI = ((0, 768, 0), (20, 1024, 640))  # validation rows, never trained on
CELLS_RADIUS = (0, 6, 6)  # voxels: the densities lie 4 px (median) from the nearest cell
# Partners searched within 10 pixels (46 nm): chosen on the training rows (the pipeline with
# the net's segmentation at 0.5: 17 of 22 right within 10 pixels, 14 of 22 within 6)
RADIUS = (0, 10, 10)
# fold boundaries (rows y) in rows that no labelled synapse covers
FOLDS = (0, 425, 619, 815, 1024)
MARGIN = 32  # rows between a fold and the rows its net trains on
FOLD_RUNS = Path("runs/synapse_folds")
# operating points searched on each fold's training rows (the labelled densities have
# 255-6593 voxels, median 2310)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
MIN_SIZES = (0, 25, 50, 100, 200, 400, 800)
# longest object (nm along any axis; None: no limit): the labelled densities span at most
# 570 nm, long dark structures (membranes along their length) far more
MAX_EXTENTS = (None, 1000, 800, 700, 600)
RECIPE = "emdask/weights_nc/synapses.toml"


def validation_rows():
    """Raw (lazy), labelled synaptic densities and cells of the validation rows (ROI)."""
    raw = cutout(open_volume(VNC, "raw"), *ROI, units="voxel")
    clefts, cells = (cutout(open_volume(VNC, f"labels/{name}"), *ROI, units="voxel").values
                     for name in ("clefts", "cell_ids_2d"))
    return raw, clefts, cells


def fold_config(k: int, recipe: str = RECIPE, changes: dict | None = None):
    """A detector's training recipe (with ``changes`` to its keys, ``section.key`` for one
    of a section's) on the rows
    outside fold ``k`` and its margin, without a validation region (nothing of the fold is
    looked at in training)."""
    from emdask.predict import native_bfloat16
    from emdask.training import load_config

    cfg = load_config(recipe)
    for key, value in (changes or {}).items():  # "augment.edge": a key of a section
        section, _, name = key.rpartition(".")
        cfg = dataclasses.replace(cfg, **({section: dataclasses.replace(
            getattr(cfg, section), **{name: value})} if section else {name: value}))
    lo, hi = FOLDS[k] - MARGIN, FOLDS[k + 1] + MARGIN
    vol = cfg.volumes[0]
    boxes = [((0, 0, 0), (20, lo, 640))] if lo > 0 else []
    boxes += [((0, hi, 0), (20, 1024, 640))] if hi < 1024 else []
    # patches drawn in proportion to the rows of each part
    volumes = [dataclasses.replace(vol, roi=[list(b), list(e)], weight=(e[1] - b[1]) / 1024)
               for b, e in boxes]
    cfg = dataclasses.replace(cfg, out=str(fold_folder(k, recipe, changes)), volumes=volumes,
                              validation=None)
    if not native_bfloat16("cpu"):
        return cfg
    # bfloat16 autocast, 1 x 12 x 96 x 96 patches (as many voxels as the recipe's 2 x 8 x
    # 96 x 96, whose bf16 backward crashes in oneDNN on AMX CPUs)
    return dataclasses.replace(cfg, precision="bfloat16", batch_size=1, patch=[12, 96, 96])


def fold_folder(k: int, recipe: str = RECIPE, changes: dict | None = None) -> Path:
    name = "+".join([Path(recipe).stem, *(f"{key}={v}" for key, v in sorted((changes or {})
                                                                           .items()))])
    return FOLD_RUNS / name / f"fold{k}"


def _score_rows(prob, clefts, rows, threshold, filters, vs, keep: bool,
                distances: bool = False) -> dict:
    """Detection scores inside ``rows`` (``keep``) or outside them (the training rows), per
    (minimum size, maximum extent) in ``filters``: the objects are found once at
    ``threshold``, then filtered (as ``find_synapses`` filters them)."""
    sl = (slice(None), slice(*rows), slice(None)) if keep else (slice(None),) * 3
    labels, table = find_synapses(da.from_array(prob[sl], chunks=(10, 128, 160)), threshold,
                                  0, voxel_size=vs, max_extent=np.inf)
    labels, gt = labels.values, clefts[sl].copy()
    if not keep:
        gt[:, slice(*rows)] = 0
    spans = (np.stack(table.end.to_list()) - np.stack(table.begin.to_list())) if len(
        table) else np.zeros((0, 3), np.int64)
    scores = {}
    for m, e in filters:  # as find_synapses(min_size=m, max_extent=e) filters them
        ok = (table["size"] >= m) & (True if e is None else np.all(spans <= longest(e, vs), 1))
        det = np.where(np.isin(labels, table.id[ok].to_numpy()), labels, 0)
        if not keep:
            det[:, slice(*rows)] = 0
        scores[m, e] = synapse_scores(det, gt, vs, m, distances=distances) | (
            {"labels": det} if keep else {})
    return scores


def cross_validate(train: bool, max_minutes: float | None, recipe: str = RECIPE,
                   changes: dict | None = None, only: list[int] | None = None,
                   tta: int | None = None, ship: bool = False) -> None:
    from emdask.models import pretrained
    from emdask.predict import predict_affinities
    from emdask.training import train as train_net

    raw = open_volume(VNC, "raw")
    clefts = open_volume(VNC, "labels/clefts").values
    cells = open_volume(VNC, "labels/cell_ids_2d").values
    vs = raw.attrs["voxel_size"]
    folds = only if only else range(len(FOLDS) - 1)
    if train:
        for k in folds:
            train_net(fold_config(k, recipe, changes),
                      max_seconds=max_minutes * 60 if max_minutes else None)
    # the boundary net's per-section segmentation at its card's threshold, for partners
    sstem = pretrained("sstem")
    affs = predict_affinities(raw, sstem, dtype="uint8").values[:3]
    with dask.config.set(scheduler="threads"):
        net_seg = segment(affs, [sstem.card["threshold"]])[0].compute()
    header = ("| fold | rows y | synapses | threshold | min size | max extent (nm) | "
              "precision | recall | F1 | FP dist (nm) | FN dist (nm) | partners, true cells | "
              "partners, sstem net |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    # per fold: the net's probabilities, and F1 per operating point on its own training rows
    # and on the fold's (held-out) rows
    probs, trained, held = {}, {}, {}
    for k in folds:
        model_path = fold_folder(k, recipe, changes) / "model.pt"
        if not model_path.exists():
            print(f"| {k} | fold net not trained ({model_path}); run with --train |")
            continue
        probs[k] = _fold_probabilities(raw, model_path, tta)
        margin_rows = (FOLDS[k] - MARGIN, FOLDS[k + 1] + MARGIN)
        filters = [(m, e) for m in MIN_SIZES for e in MAX_EXTENTS]
        trained[k], held[k] = (
            {(t, *f): s["f1"] for t in THRESHOLDS for f, s in _score_rows(
                probs[k], clefts, rows, t, filters, vs, keep=keep).items()}
            for rows, keep in ((margin_rows, False), ((FOLDS[k], FOLDS[k + 1]), True)))
    if not probs:
        return
    grid = [(t, m, e) for t in THRESHOLDS for m in MIN_SIZES for e in MAX_EXTENTS]
    # 1. each fold at the best F1 of its net on the net's own training rows
    print("Each fold at the operating point of its net's training rows:\n" + header)
    _mean_row([_fold_row(k, probs[k], clefts, cells, net_seg,
                         *max(grid, key=trained[k].get), vs) for k in probs])
    # 2. each fold at the best summed F1 of the *other* fold nets on their held-out folds:
    # chosen without fold k's net or fold k's scores (only as training rows of the others)
    if len(probs) > 1:
        print("\nEach fold at the operating point of the other folds (best summed F1 of "
              "the other fold nets on their held-out folds):\n" + header)
        _mean_row([_fold_row(k, probs[k], clefts, cells, net_seg,
                             *max(grid, key=lambda tm, k=k: sum(
                                 f1[tm] for j, f1 in held.items() if j != k)), vs)
                   for k in probs])
    # 3. one operating point for every fold, as the model card has one: the best summed F1
    # of the fold nets on their held-out folds (chosen on the folds it is scored on, so
    # this table is the card's operating point, not an unbiased estimate: that is table 2)
    card = max(grid, key=lambda tm: sum(f1[tm] for f1 in held.values()))
    print(f"\nAt one operating point for all folds, the card's (threshold {card[0]}, min "
          f"size {card[1]}, max extent {card[2] or 'none'}{f', tta {tta}' if tta else ''}: best "
          "summed F1 on the held-out folds):\n" + header)
    rows = [_fold_row(k, prob, clefts, cells, net_seg, *card, vs) for k, prob in probs.items()]
    _mean_row(rows)
    if ship:
        if changes or recipe != RECIPE or tta or len(probs) < len(FOLDS) - 1:
            raise SystemExit("--ship takes the operating point of the shipped recipe's four "
                             "fold nets at one pass: leave out --recipe, --set, --only, --tta")
        ship_operating_point(card, rows)


def ship_operating_point(point: tuple, rows: list[dict]) -> None:
    """Write the folds' operating point (threshold, minimum size, maximum extent) and their
    scores there into the shipped detector's card (emdask/weights_nc/synapses.json and the
    card inside synapses.pt): the defaults of find_synapses, predict_synapses and the
    pipeline."""
    from emdask.models import WEIGHTS_NC, save_model

    path = WEIGHTS_NC / "synapses.pt"
    model = load_model(path)
    t, m, e = point
    folds = [{"fold": k, "rows_y": [FOLDS[k], FOLDS[k + 1]], "synapses": r["n_true"],
              **{key: round(float(r[key]), 3) for key in ("precision", "recall", "f1")}}
             for k, r in enumerate(rows)]
    f1 = [r["f1"] for r in rows]
    card = {key: v for key, v in model.card.items() if key != "max_extent"} | {
        "threshold": t, "min_size": m, **({"max_extent": e} if e is not None else {}),
        "operating_point": {
            "rule": "best F1 summed over the held-out folds of 4-fold cross-validation over "
                    "the VNC rows (each fold's net trained by the shipped recipe on the "
                    "other rows, 32 rows of margin)",
            "folds": folds, "f1_mean": round(float(np.mean(f1)), 3),
            "f1_sd": round(float(np.std(f1)), 3),
            "reproduce": "python benchmarks/eval_synapses.py --folds 4 --train --ship"}}
    # the shipped net (trained on rows 0-767) on its validation rows at the new point
    raw, clefts, _ = validation_rows()
    vs = raw.attrs["voxel_size"]
    prob = predict_synapses(raw, model).values
    labels, _ = find_synapses(da.from_array(prob, chunks=(10, 128, 160)), t, m, voxel_size=vs,
                              max_extent=e if e is not None else np.inf)
    v = synapse_scores(labels.values, clefts, vs, m)
    card["validation_scores"] = {"threshold": t, "min_size": m, "max_extent": e} | {
        key: round(float(v[key]), 3) for key in ("precision", "recall", "f1")} | {
        "fp_distance_nm": round(float(v["fp_distance"]), 1)}
    print(f"shipped net, validation rows 768-1023 at {point}: precision "
          f"{v['precision']:.3f}, recall {v['recall']:.3f}, F1 {v['f1']:.3f}")
    save_model(model, path, card)
    print(f"\nwrote the operating point {point} into {path} and its .json")


def _fold_probabilities(raw, model_path: Path, tta: int | None) -> np.ndarray:
    """The fold net's synapse probabilities over the whole stack, cached beside the net
    (recomputed when the net is newer than the cache)."""
    cache = model_path.with_name(f"probabilities_tta{tta or 1}.npy")
    if cache.exists() and cache.stat().st_mtime > model_path.stat().st_mtime:
        return np.load(cache)
    prob = predict_synapses(raw, load_model(model_path), tta=tta).values
    np.save(cache, prob)
    return prob


def _fold_row(k, prob, clefts, cells, net_seg, t, m, e, vs) -> dict:
    """Score fold ``k`` at threshold ``t``, minimum size ``m`` and maximum extent ``e``:
    one table row."""
    rows = (FOLDS[k], FOLDS[k + 1])
    s = _score_rows(prob, clefts, rows, t, [(m, e)], vs, keep=True, distances=True)[m, e]
    sl = (slice(None), slice(*rows), slice(None))
    partners = []
    for seg in (cells, net_seg):
        right, matched = partner_accuracy(s["labels"], clefts[sl], cells[sl], seg[sl],
                                          RADIUS, cells_radius=CELLS_RADIUS)
        partners.append(f"{right} of {matched}")
    print(f"| {k} | {rows[0]}-{rows[1]} | {s['n_true']} | {t} | {m} | {e or '-'} | "
          f"{s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
          f"{s['fp_distance']:.1f} | {s['fn_distance']:.1f} | {partners[0]} | "
          f"{partners[1]} |", flush=True)
    return s


def _mean_row(results: list[dict]) -> None:
    mean = {key: (np.mean([r[key] for r in results]), np.std([r[key] for r in results]))
            for key in ("precision", "recall", "f1")}
    print(f"| mean +- sd ({len(results)} folds) | | | | | | "
          + " | ".join(f"{m:.3f} +- {sd:.3f}" for m, sd in mean.values()) + " | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--folds", type=int, choices=[len(FOLDS) - 1],
                        help="cross-validation over the folds")
    parser.add_argument("--train", action="store_true",
                        help="with --folds: train (or resume) each fold's net first")
    parser.add_argument("--max-minutes", type=float, help="training time per fold and call")
    parser.add_argument("--recipe", default=RECIPE, help="with --folds: the training recipe")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --folds: change keys of the recipe (section.key for "
                             "one of a section's)")
    parser.add_argument("--only", type=int, nargs="+", choices=range(len(FOLDS) - 1),
                        help="with --folds: these folds only")
    parser.add_argument("--ship", action="store_true",
                        help="with --folds: write the card's operating point into the "
                             "shipped detector's card")
    parser.add_argument("--tta", type=int, choices=[1, 2, 4, 8, 16],
                        help="symmetries averaged at inference (default: the card's)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99],
                        help="swept, with the model card's")
    parser.add_argument("--min-size", type=int, help="default: the model card's")
    parser.add_argument("--max-extent", type=float, help="nm; default: the model card's")
    args = parser.parse_args()
    if args.folds:
        changes = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
        cross_validate(args.train, args.max_minutes, args.recipe, changes, args.only,
                       args.tta, args.ship)
        return
    if not args.model:
        parser.error("give a model file, or --folds 4")
    model = load_model(args.model)
    point = card_defaults(model)
    min_size = args.min_size if args.min_size is not None else point.get("min_size", 50)
    max_extent = args.max_extent or point.get("max_extent") or np.inf  # the net's own card
    thresholds = sorted(set(args.thresholds) | ({point["threshold"]} if "threshold" in point
                                                 else set()))
    raw, clefts, cells = validation_rows()
    vs = raw.attrs["voxel_size"]
    lazy = raw.copy(data=raw.data.rechunk((5, 128, 320)))
    prob = predict_synapses(lazy, model, tta=args.tta).compute()
    print(f"VNC validation rows {ROI}: {len(np.unique(clefts)) - 1} labelled synapses; "
          f"net {args.model}")
    print(f"objects of at least {min_size} voxels"
          + (f", at most {max_extent:g} nm long" if np.isfinite(max_extent) else "")
          + f"; the card's threshold: {point.get('threshold')}")
    print("threshold precision recall    F1  fp_dist  fn_dist (nm)")
    rows = []
    for t in thresholds:
        labels, table = find_synapses(da.from_array(prob.values, chunks=(10, 128, 160)), t,
                                      min_size, voxel_size=vs, max_extent=max_extent)
        s = synapse_scores(labels.values, clefts, vs, min_size)
        rows.append((t, labels.values, table, s))
        print(f"{t:9.3f} {s['precision']:9.3f} {s['recall']:6.3f} {s['f1']:5.3f} "
              f"{s['fp_distance']:8.1f} {s['fn_distance']:8.1f}")
    t, detected, table, s = max(rows, key=lambda r: r[3]["f1"])
    affs = affinities_from_intensity(raw.values, sigma=(0, 2, 2))
    affs[0] = 0  # per section
    with dask.config.set(scheduler="threads"):
        baseline = segment(affs, [0.5])[0].compute()
    for name, seg in [("ground-truth cells", cells), ("baseline watershed", baseline)]:
        right, n = partner_accuracy(detected, clefts, cells, seg, RADIUS,
                                    cells_radius=CELLS_RADIUS)
        strict, _ = partner_accuracy(detected, clefts, cells, seg, RADIUS, second=1.0,
                                     cells_radius=CELLS_RADIUS)
        print(f"partners at threshold {t}, {name}: right for {right} of {n} matched "
              f"synapses ({right / max(n, 1):.0%}; {strict} with the second-ranked true "
              "cell itself)")


if __name__ == "__main__":
    main()
