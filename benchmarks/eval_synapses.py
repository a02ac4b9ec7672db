"""Score a synapse net on the larval VNC validation rows: detection and partners.

    python benchmarks/eval_synapses.py runs/synapses_vnc/model.pt [--threshold 0.98]

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

import dask
import dask.array as da
import numpy as np

from emdask import segment
from emdask.affinities import affinities_from_intensity
from emdask.models import load_model
from emdask.predict import predict_synapses
from emdask.synapses import find_synapses, partner_accuracy, synapse_scores
from emdask.volumes import cutout, open_volume

VNC = "../shared/data/drosophila_vnc_sstem_gerhard2013/vnc_stack1_synapses_x0-640.h5"
ROI = ((0, 768, 0), (20, 1024, 640))  # validation rows, never trained on
CELLS_RADIUS = (0, 6, 6)  # voxels: the densities lie 4 px (median) from the nearest cell
# Partners searched within 10 pixels (46 nm): chosen on the training rows (the pipeline with
# the net's segmentation at 0.5: 17 of 22 right within 10 pixels, 14 of 22 within 6)
RADIUS = (0, 10, 10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--min-size", type=int, default=50)
    args = parser.parse_args()
    model = load_model(args.model)
    raw = cutout(open_volume(VNC, "raw"), *ROI, units="voxel")
    clefts = cutout(open_volume(VNC, "labels/clefts"), *ROI, units="voxel").values
    cells = cutout(open_volume(VNC, "labels/cell_ids_2d"), *ROI, units="voxel").values
    vs = raw.attrs["voxel_size"]
    lazy = raw.copy(data=raw.data.rechunk((5, 128, 320)))
    prob = predict_synapses(lazy, model).compute()
    print(f"VNC validation rows {ROI}: {len(np.unique(clefts)) - 1} labelled synapses; "
          f"net {args.model}")
    print("threshold precision recall    F1  fp_dist  fn_dist (nm)")
    rows = []
    for t in args.thresholds:
        labels, table = find_synapses(da.from_array(prob.values, chunks=(10, 128, 160)), t,
                                      args.min_size, voxel_size=vs)
        s = synapse_scores(labels.values, clefts, vs, args.min_size)
        rows.append((t, labels.values, table, s))
        print(f"{t:9.2f} {s['precision']:9.3f} {s['recall']:6.3f} {s['f1']:5.3f} "
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
