"""``emdask demo``: the whole pipeline on the bundled sample, with the shipped model.

It writes the run config it uses (``demo.toml``, a starting point for your own data) and
runs it with :func:`emdask.pipeline.run` on a local Dask cluster: raw EM -> affinities
(shipped boundary net) -> watershed -> agglomeration -> relabel -> report against the
sample's ground truth, with a figure.  It also scores the classical baseline that needs no
training (watershed of the smoothed intensity), so the net's value is visible.

Given the larval VNC ssTEM stack (``--vnc``; non-commercial, so not bundled) it also runs
the synapse part there: the ssTEM boundary net, segmentation, the shipped synapse detector,
partners and the connectome, with detection and partner scores against the stack's labels
and a figure with the detected synapses outlined.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
VNC_ROI = ((0, 768, 0), (20, 1024, 640))  # the synapse net's validation rows


def operating_point(model_name: str) -> tuple[dict, float]:
    """The ``[segment]`` settings and the threshold a user of this net should take: the
    learned agglomeration of its shipped edge classifier where there is one (it beat mean
    agglomeration on the net's validation region), else mean agglomeration at the net's
    card threshold."""
    from emdask.learn_agglomeration import load_classifier
    from emdask.models import model_card

    try:
        card = load_classifier(model_name).card
        return {"score": "learned", "classifier": model_name}, card["threshold"]
    except (FileNotFoundError, ValueError):  # none shipped for this net (or a .pt path)
        return {}, model_card(model_name).get("threshold", 0.5)


def demo_config(out: Path, model_name: str = "fibsem") -> dict:
    from emdask.data import sample_path

    score, chosen = operating_point(model_name)
    return {
        "input": {"url": str(sample_path()), "dataset": "raw"},
        "output": {"path": str(out / "demo.zarr"), "chunks": [56, 96, 96], "overwrite": True},
        "predict": {"model": model_name},
        "segment": {"thresholds": sorted({*THRESHOLDS, chosen}), **score},
        "meshes": {"segmentation": chosen},  # the card's operating point, for emdask view
        "evaluate": {"url": str(sample_path()), "dataset": "neuron_ids"},
    }


def vnc_config(vnc: str | Path, out: Path, model_name: str = "sstem", roi=VNC_ROI) -> dict:
    """The synapse part: the larval VNC stack's validation rows (never trained on),
    boundary net -> segmentation -> synapses -> partners -> connectome, scored."""
    from emdask.models import model_card

    vnc = str(vnc)
    chosen = model_card(model_name).get("threshold", 0.5)
    return {
        "input": {"url": vnc, "dataset": "raw", "roi": [list(b) for b in roi]},
        "output": {"path": str(out / "vnc.zarr"), "chunks": [20, 128, 320],
                   "overwrite": True},
        "predict": {"model": model_name},
        "segment": {"thresholds": sorted({*THRESHOLDS, chosen})},
        # The detector's threshold, minimum size and partner radius (10 pixels, 46 nm) are
        # its card's.  Partners from the segmentation at 0.5, below the boundary card's
        # threshold of least VOI: split cells cost partners more than merged ones (chosen
        # on the VNC's training rows: 17 of 22 right; 15 at the card's threshold).  The
        # detector's weights are CC BY-NC-SA 3.0, like the stack the user passed.
        "synapses": {"model": "synapses", "accept_licence": True, "segmentation": 0.5},
        "meshes": {"segmentation": chosen},
        "evaluate": {"url": vnc, "dataset": "labels/cell_ids_2d",
                     "synapses": "labels/clefts", "cells": "labels/cell_ids_2d"},
    }


def run_vnc_demo(vnc: str | Path, out: str | Path = "emdask_demo_output",
                 model_name: str = "sstem", roi=VNC_ROI, stages=None) -> dict:
    """Synapses and the connectome on the larval VNC stack (Gerhard et al. 2013; CC BY-NC-SA
    3.0, so not bundled: pass the path of ``vnc_stack1_synapses_x0-640.h5``).  Writes
    ``vnc.toml``, ``vnc.zarr`` (with ``synapses.parquet`` and ``connectome.parquet``) and
    ``vnc.png``; returns the report's scores.  ``stages``: all unless given."""
    from emdask.config import to_toml
    from emdask.pipeline import run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = vnc_config(vnc, out, model_name, roi)
    (out / "vnc.toml").write_text(to_toml(cfg))
    print(f"\nlarval VNC ssTEM, region {roi} of the validation rows (no net trained on them)")
    scores = run(cfg, stages)["stages"]["report"]["scores"]
    s = scores["synapses"]
    print(f"\nsynapses: {s['n_detected']:.0f} detected, {s['n_true']:.0f} labelled; precision "
          f"{s['precision']:.3f}, recall {s['recall']:.3f}, F1 {s['f1']:.3f}; CREMI distances "
          f"FP {s['fp_distance']:.1f} nm, FN {s['fn_distance']:.1f} nm")
    print(f"partners: the two top-ranked segments lie in the cell with most contact and in "
          f"a cell across the synapse for {s['partners_right']:.0f} of "
          f"{s['partners_of']:.0f} matched synapses ({s['partners_right_strict']:.0f} in the "
          "true first and second partners)")
    print(f"wrote {out / 'vnc.png'} (detected synapses outlined in red, labelled ones in "
          f"yellow) and {out / 'vnc.zarr'}/connectome.parquet")
    return scores


def run_demo(out: str | Path = "emdask_demo_output", model_name: str = "fibsem",
             vnc: str | Path | None = None) -> dict:
    """Run the demo; returns the scores.  Writes ``demo.toml``, ``demo.zarr``, ``demo.png``;
    with ``vnc`` (the larval VNC stack) also the synapse part (:func:`run_vnc_demo`)."""
    from emdask import evaluate, segment
    from emdask.affinities import affinities_from_intensity
    from emdask.config import to_toml
    from emdask.data import sample
    from emdask.pipeline import run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = sample()
    raw, gt = ds.raw, ds.neuron_ids.values
    print(f"sample: {raw.shape} voxels at {raw.attrs['voxel_size']} nm (FlyEM medulla, CC BY)")
    cfg = demo_config(out, model_name)
    (out / "demo.toml").write_text(to_toml(cfg))
    result = run(cfg)
    scores = result["stages"]["report"]["scores"]
    rows = [scores[f"segmentation_{t:g}"] | {"threshold": t} for t in THRESHOLDS]
    # the threshold chosen on the model's validation, not the best one here
    score, card_threshold = operating_point(model_name)
    chosen = next((r for r in rows if r["threshold"] == card_threshold),
                  min(rows, key=lambda r: r["voi"]))

    t = time.perf_counter()
    baseline_segs = dask.compute(*segment(affinities_from_intensity(raw.values), THRESHOLDS))
    baseline = min((evaluate(s, gt) | {"threshold": th}
                    for s, th in zip(baseline_segs, THRESHOLDS, strict=True)),
                   key=lambda r: r["voi"])
    timings = dict(result["timings"], baseline=time.perf_counter() - t)

    print("\nstage timings (s):")
    for k, v in timings.items():
        print(f"  {k:26s} {v:6.1f}")
    how = f"emdask ({model_name} net, {score.get('score', 'mean')} agglomeration)"
    print("\n" + " " * 48 + "threshold  VOI split  VOI merge  ARAND")
    for name, r, note in ((how, chosen, ""),
                          ("baseline (intensity)", baseline, "  (its best threshold)")):
        print(f"  {name:46s}{r['threshold']:9.2f}  {r['voi_split']:9.3f}  "
              f"{r['voi_merge']:9.3f}  {r['arand']:.3f}{note}")
    print(f"\nwrote {out / 'demo.png'}, {out / 'demo.zarr'} (view it in napari or "
          f"neuroglancer) and {out / 'demo.toml'} (rerun: emdask run {out / 'demo.toml'})")
    result = {"emdask": chosen, "baseline": baseline, "timings": timings}
    if vnc is not None:
        result["vnc"] = run_vnc_demo(vnc, out)
    else:
        print("\nsynapses: pass --vnc PATH (the larval VNC stack of Gerhard et al. 2013, CC "
              "BY-NC-SA 3.0: figshare, 'stack 1') to also detect synapses and build the "
              "connectome")
    return result
