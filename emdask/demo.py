"""``emdask demo``: the whole pipeline on the bundled sample, with the shipped model.

It writes the run config it uses (``demo.toml``, a starting point for your own data) and
runs it with :func:`emdask.pipeline.run` on a local Dask cluster: raw EM -> affinities
(shipped boundary net) -> watershed -> agglomeration -> relabel -> report against the
sample's ground truth, with a figure.  It also scores the classical baseline that needs no
training (watershed of the smoothed intensity), so the net's value is visible.
"""

from __future__ import annotations

import time
from pathlib import Path

import dask

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def demo_config(out: Path, model_name: str = "fibsem") -> dict:
    from emdask.data import sample_path

    return {
        "input": {"url": str(sample_path()), "dataset": "raw"},
        "output": {"path": str(out / "demo.zarr"), "chunks": [56, 96, 96], "overwrite": True},
        "predict": {"model": model_name},
        "segment": {"thresholds": THRESHOLDS},
        "evaluate": {"url": str(sample_path()), "dataset": "neuron_ids"},
    }


def run_demo(out: str | Path = "emdask_demo_output", model_name: str = "fibsem") -> dict:
    """Run the demo; returns the scores.  Writes ``demo.toml``, ``demo.zarr``, ``demo.png``."""
    from emdask import evaluate, segment
    from emdask.affinities import affinities_from_intensity
    from emdask.config import to_toml
    from emdask.data import sample
    from emdask.models import pretrained
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
    card_threshold = pretrained(model_name).card.get("threshold")
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
    print("\n                          threshold  VOI split  VOI merge  ARAND")
    print(f"  emdask ({model_name} net)      {chosen['threshold']:5.2f}  "
          f"{chosen['voi_split']:9.3f}  {chosen['voi_merge']:9.3f}  {chosen['arand']:.3f}")
    print(f"  baseline (intensity)      {baseline['threshold']:5.2f}  "
          f"{baseline['voi_split']:9.3f}  {baseline['voi_merge']:9.3f}  {baseline['arand']:.3f}"
          "  (its best threshold)")
    print(f"\nwrote {out / 'demo.png'}, {out / 'demo.zarr'} (view it in napari or "
          f"neuroglancer) and {out / 'demo.toml'} (rerun: emdask run {out / 'demo.toml'})")
    return {"emdask": chosen, "baseline": baseline, "timings": timings}
