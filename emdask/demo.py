"""``emdask demo``: the pipeline on the bundled sample, with the shipped model.

Raw EM -> affinities (shipped boundary net) -> watershed + agglomeration -> evaluation
against the sample's ground truth -> a figure.  Also scores the classical baseline that
needs no training (watershed of the smoothed intensity), so the net's value is visible.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask
import numpy as np

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def _figure(raw, affs, seg, gt, path: Path, z: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)

    def colours(labels):
        ids, inv = np.unique(labels, return_inverse=True)
        lut = rng.random((ids.size, 3))
        lut[ids == 0] = 0
        return lut[inv].reshape(*labels.shape, 3)

    fig, ax = plt.subplots(1, 4, figsize=(16, 4.4))
    ax[0].imshow(raw[z], cmap="gray")
    ax[0].set_title("raw EM (FIB-SEM, 10 nm)")
    ax[1].imshow(affs[1:3, z].mean(0), cmap="gray", vmin=0, vmax=1)
    ax[1].set_title("predicted affinities (x-y mean)")
    ax[2].imshow(raw[z], cmap="gray")
    ax[2].imshow(colours(seg[z]), alpha=0.45)
    ax[2].set_title("emdask segmentation")
    ax[3].imshow(raw[z], cmap="gray")
    ax[3].imshow(colours(gt[z]), alpha=0.45)
    ax[3].set_title("ground truth")
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(out: str | Path = "emdask_demo_output", model_name: str = "fibsem") -> dict:
    """Run the demo; returns the scores. Writes ``segmentation.zarr`` and ``demo.png``."""
    from emdask import evaluate, save_volume, segment
    from emdask.affinities import affinities_from_intensity
    from emdask.data import sample
    from emdask.models import pretrained
    from emdask.predict import predict_affinities

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = sample()
    raw, gt = ds.raw, ds.neuron_ids.values
    print(f"sample: {raw.shape} voxels at {raw.attrs['voxel_size']} nm (FlyEM medulla, CC BY)")
    timings = {}

    t = time.perf_counter()
    model = pretrained(model_name)
    affs = predict_affinities(raw, model, chunks=raw.shape)[:3]
    affs = affs.compute()
    timings["predict affinities"] = time.perf_counter() - t

    t = time.perf_counter()
    segs = dask.compute(*segment(affs, THRESHOLDS))
    timings["watershed + agglomerate"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = [evaluate(s, gt) | {"threshold": th} for s, th in zip(segs, THRESHOLDS,
                                                                 strict=True)]
    card_threshold = model.card.get("threshold")
    chosen = next((r for r in rows if r["threshold"] == card_threshold),
                  min(rows, key=lambda r: r["voi"]))
    baseline_segs = dask.compute(*segment(affinities_from_intensity(raw.values), THRESHOLDS))
    baseline = min((evaluate(s, gt) | {"threshold": th}
                    for s, th in zip(baseline_segs, THRESHOLDS, strict=True)),
                   key=lambda r: r["voi"])
    timings["evaluate"] = time.perf_counter() - t

    seg = segs[THRESHOLDS.index(chosen["threshold"])]
    save_volume(raw, out / "segmentation.zarr", "raw", overwrite=True)
    save_volume(seg.astype(np.uint64), out / "segmentation.zarr", "segmentation",
                voxel_size=raw.attrs["voxel_size"], offset=raw.attrs["offset"],
                overwrite=True)
    _figure(raw.values, affs.values, seg, gt, out / "demo.png", z=raw.shape[0] // 2)

    print("\nstage timings (s):")
    for k, v in timings.items():
        print(f"  {k:26s} {v:6.1f}")
    print("\n                          threshold  VOI split  VOI merge  ARAND")
    print(f"  emdask ({model_name} net)      {chosen['threshold']:5.2f}  "
          f"{chosen['voi_split']:9.3f}  {chosen['voi_merge']:9.3f}  {chosen['arand']:.3f}")
    print(f"  baseline (intensity)      {baseline['threshold']:5.2f}  "
          f"{baseline['voi_split']:9.3f}  {baseline['voi_merge']:9.3f}  {baseline['arand']:.3f}"
          "  (best threshold)")
    print(f"\nwrote {out / 'demo.png'} and {out / 'segmentation.zarr'}")
    return {"emdask": chosen, "baseline": baseline, "timings": timings}
