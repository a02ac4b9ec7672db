"""The report stage of ``emdask run``: each segmentation (and the synapses) scored against
ground truth, blockwise (:func:`emdask.evaluate` and :func:`emdask.synapse_scores` read
the stored outputs chunk by chunk), and a figure of one section.

With alignment, the ground truth is brought into the aligned frame first, by the same
fields as the raw and by integer gathering (uint64 ids are moved, never interpolated), so
that outputs and truth are compared in one frame.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import xarray as xr

from emdask.geometry import Box
from emdask.run_config import RunConfig, label_datasets, open_configured
from emdask.store import CORRECTED, LABELS, RAW, exists, has, local_path, meshed, open_root

__all__ = ["figure", "report"]


def ground_truth(cfg: RunConfig, dataset: str, vol, roi_begin):
    """A ground-truth dataset of ``[evaluate]``, cut to the region of interest."""

    from emdask.volumes import resampled

    full = open_configured(cfg.evaluate.url, dataset, cfg.evaluate.voxel_size, "evaluate")
    # ground truth finer than the outputs by integer factors: each output voxel compared
    # with the true label at its centre (nearest neighbour)
    ratio = np.asarray(vol.attrs["voxel_size"], float) / np.asarray(full.attrs["voxel_size"])
    factors = np.rint(ratio).astype(int)
    if np.all(factors >= 1) and np.any(factors > 1) and np.allclose(ratio, factors,
                                                                    rtol=1e-6):
        full = resampled(full, factors, "nearest")
    end = [b + n for b, n in zip(roi_begin, vol.shape, strict=True)]
    if any(e > n for e, n in zip(end, full.shape, strict=True)):
        raise ValueError(f"{full.attrs['source']}: ground truth of shape {full.shape} does "
                         f"not cover the region of interest [{list(roi_begin)}, {end})")
    if np.any(np.abs(np.array(full.attrs["voxel_size"]) - vol.attrs["voxel_size"]) > 1e-6):
        raise ValueError(f"{full.attrs['source']}: ground truth voxel size "
                         f"{full.attrs['voxel_size']} differs from the input's "
                         f"{vol.attrs['voxel_size']}")
    return full.data[Box(roi_begin, end).slices()]


def check_offsets(cfg: RunConfig, full_input, roi_begin, vol) -> None:
    """Ground truth is compared voxel by voxel on the input's grid: say so when its offset
    differs from the input's (two files that may not cover the same place)."""
    for dataset in (cfg.evaluate.dataset, cfg.evaluate.synapses, cfg.evaluate.cells):
        if not dataset:
            continue
        gt = open_configured(cfg.evaluate.url, dataset, cfg.evaluate.voxel_size, "evaluate")
        if np.any(np.abs(np.subtract(gt.attrs["offset"], full_input.attrs["offset"]))
                  > 0.5 * np.asarray(vol.attrs["voxel_size"])):
            print(f"  warning: ground truth {gt.attrs['source']} has offset "
                  f"{list(gt.attrs['offset'])} nm, the input {list(full_input.attrs['offset'])}"
                  " nm: they are compared voxel by voxel (same grid assumed)", file=sys.stderr)


def report(cfg: RunConfig, vol, roi_begin, affinities) -> dict:
    """Scores of each segmentation (and of the synapses) against the ground truth, and a
    figure.

    ``vol`` is the input's region of interest, which begins at voxel ``roi_begin`` of
    the input; ``affinities`` an array-like (c, z, y, x) in the outputs' frame, for the
    figure."""
    import dask.array as da

    from emdask.metrics import evaluate
    from emdask.synapses import partner_accuracy, synapse_scores
    from emdask.volumes import open_volume

    store = cfg.output.path
    names = [n for n in label_datasets(cfg.segment)[1:]]
    scores = {}
    gt = synapses = true_synapses = None
    region = vol  # the input's region of interest
    if cfg.align is not None:  # one frame: the outputs are in the aligned stack's
        vol = open_volume(store, RAW)

    def truth(dataset: str):
        """Ground truth in the outputs' frame: with alignment, warped like the raw, by
        integer gathering (uint64 ids are moved, never interpolated)."""
        labels = ground_truth(cfg, dataset, region, roi_begin)
        if cfg.align is None:
            return labels
        from emdask.align import render

        fields = open_root(store, "r")["alignment/fields"]
        return render(labels, xr.DataArray(fields[:], attrs=dict(fields.attrs)), order=0,
                      fill=0).data

    if cfg.evaluate is not None:
        gt = truth(cfg.evaluate.dataset)
        print(f"  {'threshold':>9} {'VOI split':>9} {'VOI merge':>9} {'VOI':>7} "
              f"{'ARAND':>7}", file=sys.stderr)
        rows = list(zip(cfg.segment.thresholds, names, strict=True))
        t = cfg.meshes.segmentation
        t = cfg.segment.thresholds[-1] if t is None else t
        if has(open_root(store), f"{LABELS}/segmentation_{t:g}{CORRECTED}"):
            rows.append((f"{t:g} corr.", f"segmentation_{t:g}{CORRECTED}"))
        for t, name in rows:
            seg = open_volume(store, name)
            s = evaluate(seg.data, gt)
            scores[name] = {k: float(v) for k, v in s.items()}
            print(f"  {t:>9} {s['voi_split']:9.3f} {s['voi_merge']:9.3f} {s['voi']:7.3f} "
                  f"{s['arand']:7.3f}", file=sys.stderr)
    if cfg.synapses is not None and has(open_root(store), f"{LABELS}/synapses"):
        synapses = open_volume(store, "synapses").data  # lazy: scored blockwise
    if synapses is not None and cfg.evaluate is not None and cfg.evaluate.synapses:
        true_synapses = da.asarray(truth(cfg.evaluate.synapses))
        s = synapse_scores(synapses, true_synapses, vol.attrs["voxel_size"],
                           min_size=cfg.synapses.min_size)
        line = (f"  synapses: precision {s['precision']:.3f} recall {s['recall']:.3f} "
                f"F1 {s['f1']:.3f} ({s['n_matched']} of {s['n_true']} true, "
                f"{s['n_detected']} detected); FP distance {s['fp_distance']:.1f} nm, "
                f"FN distance {s['fn_distance']:.1f} nm")
        if cfg.evaluate.cells:
            t = cfg.synapses.segmentation
            t = cfg.segment.thresholds[-1] if t is None else t
            args = (synapses, true_synapses,
                    truth(cfg.evaluate.cells), open_volume(store, f"segmentation_{t:g}"),
                    tuple(cfg.synapses.radius))
            within = tuple(cfg.evaluate.cells_radius)
            right, n = partner_accuracy(*args, cells_radius=within)
            strict, _ = partner_accuracy(*args, second=1.0, cells_radius=within)
            s |= {"partners_right": right, "partners_right_strict": strict, "partners_of": n}
            line += (f"; partners right for {right} of {n} matched synapses ({strict} with "
                     "the second-ranked true cell itself)")
        scores["synapses"] = {k: float(v) for k, v in s.items()}
        print(line, file=sys.stderr)
    local = local_path(store)
    if local is not None:
        segs = [n for n in names if n in scores]
        best = min(segs, key=lambda n: scores[n]["voi"]) if segs else names[-1]
        # the section with most synapse voxels if there are any, else the middle one
        per_section = (None if synapses is None
                       else (synapses > 0).sum(axis=(1, 2)).compute())
        z = (int(np.argmax(per_section)) if per_section is not None and per_section.any()
             else vol.shape[0] // 2)
        affs = np.asarray(affinities[:, z])
        figure(np.asarray(vol[z]), affs,
               np.asarray(open_volume(store, best)[z]),
               None if gt is None else np.asarray(gt[z]),
               Path(local).with_suffix(".png"),
               f"emdask, threshold {best.removeprefix('segmentation_')}",
               None if synapses is None else np.asarray(synapses[z]),
               None if true_synapses is None else np.asarray(true_synapses[z]),
               _figure_meshes(cfg))
        print(f"  figure: {Path(local).with_suffix('.png')}", file=sys.stderr)
    return scores


def _figure_meshes(cfg: RunConfig) -> list | None:
    """The meshes stage's meshes of the three largest segments (None before that stage)."""
    from emdask.meshes import largest_segments, load_mesh

    store = cfg.output.path
    root = open_root(store, "r")
    names = meshed(store, root)
    if not names:
        return None
    dataset = f"{LABELS}/{names[0]}"
    folder = f"{dataset}/meshes"
    # (a segment whose surface is all open block or volume faces has no mesh)
    return [load_mesh(store, folder, s) for s in largest_segments(store, dataset, 3)
            if exists(store, f"{folder}/{s}:0")] or None


def figure(raw: np.ndarray, affs: np.ndarray, seg: np.ndarray, gt: np.ndarray | None,
           path: str | Path, title: str = "segmentation", synapses: np.ndarray | None = None,
           true_synapses: np.ndarray | None = None, meshes: list | None = None) -> None:
    """One section: raw EM, affinities (x-y mean), segmentation overlay, ground truth;
    detected synapses outlined in red on the segmentation, true ones in yellow on the
    ground truth; with ``meshes`` ((vertices, triangles) of a few segments), a 3-D view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)

    def colours(labels):
        ids, inv = np.unique(labels, return_inverse=True)
        lut = rng.random((ids.size, 3))
        lut[ids == 0] = 0
        return lut[inv].reshape(*labels.shape, 3)

    affs = affs.astype(np.float32) / (255 if affs.dtype == np.uint8 else 1)
    panels = [("raw EM", None), ("predicted affinities (x-y mean)", None), (title, seg)]
    if gt is not None:
        panels.append(("ground truth", gt))
    n = len(panels) + bool(meshes)
    fig = plt.figure(figsize=(4 * n, 4.4))
    ax = [fig.add_subplot(1, n, i + 1) for i in range(len(panels))]
    if meshes:
        a = fig.add_subplot(1, n, n, projection="3d")
        for (vertices, triangles), colour in zip(meshes, rng.random((len(meshes), 3)),
                                                 strict=True):
            a.plot_trisurf(vertices[:, 0], vertices[:, 1], triangles, vertices[:, 2],
                           color=colour, linewidth=0)
        a.set_title(f"the {len(meshes)} largest segments (meshes)")
        a.set_axis_off()
    for a, (name, labels) in zip(ax, panels, strict=True):
        if name.startswith("predicted"):
            a.imshow(affs[1:3].mean(0), cmap="gray", vmin=0, vmax=1)
        else:
            a.imshow(raw, cmap="gray")
        if labels is not None:
            a.imshow(colours(labels), alpha=0.45)
        outline = {title: (synapses, "red"), "ground truth": (true_synapses, "yellow")}
        mask, colour = outline.get(name, (None, None))
        if mask is not None and mask.any():
            a.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1.2)
        a.set_title(name)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
