"""Do the ssEM boundary nets link sections?  3-D scores on every ssEM validation region.

    python benchmarks/eval_ssem.py [--net sstem3d] [--planar PATH_OR_NAME] [--learned] [--tta N]

Each net sees every region at its own resolution, as ``emdask run`` would give it: the
region is mean-pooled in-plane by the integer factor that brings it within 25% of the net's
voxel size (4 nm CREMI and 4.6 nm VNC pixels pooled 2x for a 10 nm net), or, when no
integer factor does (10 nm medulla pixels for a 4 nm net), interpolated linearly to it.
Each segmentation goes back to the region's grid by nearest neighbour and is scored there
against the region's own labels.  Regions, none trained on by any shipped ssEM net:

* medulla sections: FlyEM medulla z 200-247 made into 12 sections of 40 nm (each the mean
  of 4 slices, labels from the middle slice), 3-D labels;
* CREMI B crop: 5 sections at 40 x 4 x 4 nm, 3-D labels.  It is thinner than the 3-D
  nets' context, so the sections are mirrored at both ends up to the net's minimum depth
  (scores on the 5 real sections only).  Scored twice: all labels, and with label 7 left
  unscored: a bundle of thin neurites, each with its own membrane, that carries one id
  (36% of the voxels; the data's README flags it), where a segmentation that separates
  the neurites counts as split;
* VNC rows 768-1023: larval VNC, 2-D labels only, so scored per section (z affinities 0).

Rows: the net at its card's threshold and at its best; ``--planar``: a planar net (the
previous shipped ``sstem``; an older one from git, with its card:
``git show a703df4:emdask/weights/sstem.pt > /tmp/sstem_planar.pt`` and the same for
``sstem.json``); the intensity
baseline (intensity smoothed in 3-D or in-plane, no training) at its best.  ``--learned``: also the net's
shipped agglomeration classifier at 0.5.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask
import numpy as np
import scipy.ndimage as ndi
from common import MEDULLA, SHARED

from emdask import evaluate, segment
from emdask.affinities import affinities_from_intensity
from emdask.learn_agglomeration import load_classifier
from emdask.models import AffinityUNet, load_model, pretrained
from emdask.predict import predict_affinities
from emdask.training import VolumeSpec, _load, _z_factor, downsample_in_plane
from emdask.volumes import as_volume

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
LEARNED_THRESHOLD = 0.5

CREMI = VolumeSpec(str(SHARED / "cremi_sampleB_crop_bigcat" / "cremi_sampleB_z46-50_x0-250.h5"))
#: name: (region, label ids left unscored)
REGIONS = {
    "medulla sections z 200-247 (3-D)": (VolumeSpec(
        str(MEDULLA), roi=[[200, 0, 0], [248, 250, 250]], section_mean=4), ()),
    "CREMI B crop (3-D)": (CREMI, ()),
    "CREMI B crop (3-D), the bundle of thin neurites (label 7) unscored": (CREMI, (7,)),
    "VNC rows 768-1023 (per section)": (VolumeSpec(
        str(SHARED / "drosophila_vnc_sstem_gerhard2013" / "vnc_stack1_synapses_x0-640.h5"),
        labels="labels/cell_ids_2d", roi=[[0, 768, 0], [20, 1024, 640]], labels_2d=True), ()),
}


def region(spec: VolumeSpec, unscored=()) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Raw, labels (``unscored`` ids as 0, which no score counts) and voxel size (nm) of a
    validation region."""
    raw, labels, vol = _load(spec)
    vs = vol.attrs["voxel_size"]
    labels = np.where(np.isin(labels, unscored), 0, labels) if unscored else labels
    return raw, labels, (vs[0] * _z_factor(spec), vs[1], vs[2])


def working_grid(raw: np.ndarray, vs, model: AffinityUNet) -> np.ndarray:
    """``raw`` at the net's in-plane resolution: mean-pooled by an integer factor where one
    lands within 25% of it (as ``emdask run`` does), else linearly interpolated to it."""
    target = np.asarray(model.config.voxel_size[1:], float)
    ratio = target / np.asarray(vs[1:], float)
    factor = np.maximum(np.rint(ratio), 1).astype(int)
    if np.all(np.abs(np.asarray(vs[1:]) * factor / target - 1) <= 0.25):
        return downsample_in_plane(raw, raw, factor)[0]
    info = np.iinfo(raw.dtype) if raw.dtype.kind in "iu" else np.finfo(raw.dtype)
    zoomed = ndi.zoom(raw.astype(np.float32), (1, *(1 / ratio)), order=1, grid_mode=True,
                      mode="nearest")  # voxel centres onto voxel centres, as back_to maps
    return zoomed.clip(info.min, info.max).astype(raw.dtype)


def back_to(seg: np.ndarray, shape) -> np.ndarray:
    """A segmentation on another grid over the same field of view, on ``shape`` by nearest
    neighbour (each voxel takes the label of the working voxel that holds its centre)."""
    idx = [np.minimum(((np.arange(n) + 0.5) * m / n).astype(int), m - 1)
           for n, m in zip(shape, seg.shape, strict=True)]
    return seg[np.ix_(*idx)]


def net_affinities(raw: np.ndarray, vs, model: AffinityUNet, tta: int | None = None
                   ) -> np.ndarray:
    """uint8 nearest-neighbour affinities (as the pipeline stores them) on the net's grid;
    a volume thinner than the net's context mirrored at both ends in z, then cropped."""
    work = working_grid(raw, vs, model)
    need = -(-model.field_of_view[0] // 2)
    pad = max(0, -(-(need - work.shape[0]) // 2))
    if pad:
        work = np.pad(work, ((pad, pad), (0, 0), (0, 0)), mode="reflect")
    wvs = (vs[0], *(v * n / m for v, n, m in zip(vs[1:], raw.shape[1:], work.shape[1:],
                                                   strict=True)))
    affs = predict_affinities(as_volume(work, wvs), model, chunks=work.shape,
                              dtype="uint8", tta=tta)[:3].values
    return affs[:, pad:affs.shape[1] - pad]


def sweep(affs, labels, planar: bool, raw=None, classifier=None, extra=()) -> list[dict]:
    """Segment at every threshold in one pass, back on the labels' grid, and score."""
    if planar:
        affs = affs.copy()
        affs[0] = 0
    score = "learned" if classifier is not None else "mean"
    ths = [LEARNED_THRESHOLD] if classifier is not None else sorted({*THRESHOLDS, *extra})
    segs = dask.compute(*segment(affs, ths, score=score, classifier=classifier, raw=raw))
    return [evaluate(back_to(np.asarray(s), labels.shape), labels) | {"threshold": t}
            for s, t in zip(segs, ths, strict=True)]


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {r['threshold']} | {r['voi_split']:.3f} | {r['voi_merge']:.3f} | "
            f"{r['voi']:.3f} | {r['arand']:.3f} | {r['cremi_score']:.3f} |")


def _model(name: str) -> AffinityUNet:
    return load_model(name) if name.endswith(".pt") else pretrained(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="sstem3d", help="a shipped name or a .pt path")
    parser.add_argument("--planar", default=None, help="a planar net to compare with "
                        "(name or .pt path)")
    parser.add_argument("--tta", type=int, help="the net's test-time augmentation (1, 2, 4, "
                        "8 or 16 symmetries; default: its card's)")
    parser.add_argument("--learned", action="store_true",
                        help="also the net's shipped agglomeration classifier")
    args = parser.parse_args()
    net = _model(args.net)
    others = {"planar net": _model(args.planar)} if args.planar else {}
    clf = load_classifier(Path(args.net).stem) if args.learned else None
    card_threshold = net.card.get("threshold", 0.5)
    for where, (spec, unscored) in REGIONS.items():
        raw, labels, vs = region(spec, unscored)
        t = time.perf_counter()
        work_raw = working_grid(raw, vs, net)
        affs = net_affinities(raw, vs, net, args.tta)
        rows = sweep(affs, labels, spec.labels_2d, extra=[card_threshold])
        seconds = time.perf_counter() - t
        print(f"\n{where}: {raw.shape} voxels of {' x '.join(f'{v:g}' for v in vs)} nm; "
              f"net grid {affs.shape[1:]}; {seconds:.0f} s\n")
        print("| affinities | threshold | VOI split | VOI merge | VOI | ARAND | CREMI score |")
        print("|---|---|---|---|---|---|---|")
        at = next(r for r in rows if r["threshold"] == card_threshold)
        best = {"net": min(rows, key=lambda r: r["voi"])}
        print(_row("net (card threshold)", at))
        print(_row("net (best)", best["net"]))
        if clf is not None:
            print(_row("net, learned agglomeration", sweep(affs, labels, spec.labels_2d,
                                                           work_raw, clf)[0]))
        for name, model in others.items():
            best[name] = min(sweep(net_affinities(raw, vs, model), labels, spec.labels_2d),
                             key=lambda r: r["voi"])
            print(_row(f"{name} (best)", best[name]))
        best["baseline"] = min((r for sigma in (1, (0, 1, 1)) for r in sweep(
            affinities_from_intensity(raw, sigma), labels, spec.labels_2d)),
            key=lambda r: r["voi"])
        print(_row("baseline: smoothed intensity (best)", best["baseline"]))
        for name, b in best.items():
            if name != "net":
                print(f"\nnet at its card threshold vs {name}: VOI {at['voi'] / b['voi'] - 1:+.0%}"
                      f", ARAND {at['arand'] / b['arand'] - 1:+.0%}")


if __name__ == "__main__":
    main()
