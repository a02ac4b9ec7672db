"""Score a boundary net on its validation region against the classical baseline, and
optionally ship it (weights + model card) into the package.

    python benchmarks/eval_boundary.py runs/fibsem/model.pt emdask/weights/fibsem.toml \\
        [--ship fibsem]

The validation region (the config's [validation]) is never trained on.  Both the net's
affinities and the baseline's (smoothed intensity, no training) are segmented with the same
threshold sweep; each is reported at its best threshold.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import dask
import numpy as np

from emdask import evaluate, segment
from emdask.affinities import affinities_from_intensity
from emdask.models import WEIGHTS, load_model, save_model
from emdask.predict import predict_affinities
from emdask.training import _load, _z_factor, load_config
from emdask.volumes import as_volume

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# terms of the training data in ../shared/data, by folder (from each folder's README)
DATA_TERMS = {
    "flyem_medulla_fib_neuroproof_sample2": "FlyEM medulla (CC BY, HHMI Janelia)",
    "gala_tiny_fib": "gala tiny FIB (BSD-style, HHMI)",
    "isbi2012_sstem": "ISBI 2012 challenge stack (the challenge's terms; cite Cardona et al. "
                      "2010 and Arganda-Carreras et al. 2015)",
}


def sweep(affs: np.ndarray, gt: np.ndarray, planar: bool = False) -> list[dict]:
    """Segment at each threshold and score; ``planar``: 2-D labels, so every section is
    segmented on its own (z affinities 0)."""
    if planar:
        affs = affs.copy()
        affs[0] = 0
    segs = dask.compute(*segment(affs, THRESHOLDS))
    return [evaluate(s, gt) | {"threshold": t} for s, t in zip(segs, THRESHOLDS, strict=True)]


def _write_card(card: dict, net: list[dict], base: list[dict], path: Path) -> None:
    """The model card as markdown, beside the weights."""
    v, b = card["validation_scores"], card["baseline_scores"]
    lines = [
        f"# Model card: `{card['name']}`",
        "",
        f"Affinity U-Net (emdask.models.AffinityUNet) for {card['description']}.",
        "",
        "- **Training data**: " + "; ".join(f"{d['url'].split('/')[-1]} `{d['raw']}`/"
                                           f"`{d['labels']}` voxels {d['roi_voxels'] or '(all)'}"
                                           for d in card["data"]),
        (f"- **Validation** (never trained on): {card['validation']['url'].split('/')[-1]} "
        f"voxels {card['validation']['roi_voxels']} ({card['validation']['note']})"),
        (f"- **Iterations**: {card['iterations']}, **wall time**: "
        f"{card['train_seconds'] / 60:.0f} min on {card['hardware']}"),
        f"- **Recommended threshold**: {card['threshold']} (mean-affinity agglomeration)",
        f"- **Licence**: {card['licence']}",
        f"- **Reproduce**: `{card['reproduce']}`",
        "",
        "| affinities | threshold | VOI split | VOI merge | VOI | ARAND | CREMI score |",
        "|---|---|---|---|---|---|---|",
        (f"| this net | {card['threshold']} | {v['voi_split']} | {v['voi_merge']} | {v['voi']} | "
        f"{v['arand']} | {v['cremi_score']} |"),
        (f"| baseline: smoothed intensity, no training | {b['threshold']} | {b['voi_split']} | "
        f"{b['voi_merge']} | {b['voi']} | {b['arand']} | {b['cremi_score']} |"),
        "",
        ("Both at their best threshold of the same sweep. Training curves: "
        f"`{card['name']}_curves.png`."),
    ]
    path.write_text("\n".join(lines) + "\n")


def _description(model, cfg) -> str:
    vs = model.config.voxel_size
    kind = "isotropic FIB-SEM" if vs[0] == vs[1] else "anisotropic ssTEM"
    text = f"{kind} at {' x '.join(f'{v:g}' for v in vs)} nm (z, y, x)"
    if all(v.labels_2d for v in cfg.volumes):
        text += (". Trained on 2-D labels only: its z affinities are untrained and "
                 "`predict_affinities` sets them to 0, so sections are segmented separately")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("config")
    parser.add_argument("--ship", help="copy into emdask/weights/NAME.pt with a model card")
    parser.add_argument("--note", default="never trained on",
                        help="what the model card says of the validation region")
    parser.add_argument("--intensity", default="auto", help="'auto' (the default users "
                        "get), 'dtype', or 'BLACK,WHITE' (emdask.intensity_range)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "uint8"],
                        help="affinities as stored (the pipeline's default is uint8)")
    parser.add_argument("--precision", default="auto",
                        choices=["auto", "float32", "bfloat16"],
                        help="the net's arithmetic (auto: bfloat16 where the model card "
                        "allows it and the CPU has it)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    model = load_model(args.model)
    raw, gt, vol = _load(cfg.validation)
    t = time.perf_counter()
    intensity = ([float(v) for v in args.intensity.split(",")] if "," in args.intensity
                 else args.intensity)
    vs = vol.attrs["voxel_size"]
    f = cfg.validation.downsample  # sections of several slices, pixels pooled in-plane
    vs = (vs[0] * _z_factor(cfg.validation), vs[1] * f[1], vs[2] * f[2])
    affs = predict_affinities(as_volume(raw, vs), model,
                              chunks=raw.shape, intensity=intensity,
                              dtype=args.dtype, precision=args.precision)[:3].values
    predict_s = time.perf_counter() - t
    planar = cfg.validation.labels_2d
    net = sweep(affs, gt, planar)
    base = sweep(affinities_from_intensity(raw), gt, planar)
    best_net, best_base = (min(r, key=lambda x: x["voi"]) for r in (net, base))
    print(f"validation region {cfg.validation.roi} of {cfg.validation.url} "
          f"({raw.size / 1e6:.2f} Mvoxel{', sections segmented separately' if planar else ''})"
          f", prediction {predict_s:.1f} s\n")
    print("| affinities | threshold | VOI split | VOI merge | VOI | ARAND | CREMI score |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in (("net", net), ("baseline: smoothed intensity", base)):
        for r in rows:
            mark = " **best**" if r is min(rows, key=lambda x: x["voi"]) else ""
            print(f"| {name}{mark} | {r['threshold']} | {r['voi_split']:.3f} | "
                  f"{r['voi_merge']:.3f} | {r['voi']:.3f} | {r['arand']:.3f} | "
                  f"{r['cremi_score']:.3f} |")
    if not args.ship:
        return
    run = Path(args.model).parent
    with open(run / "log.csv") as f:
        log = list(csv.DictReader(f))
    card = {
        "name": args.ship,
        "data": [{"url": v.url, "raw": v.raw, "labels": v.labels, "roi_voxels": v.roi,
                  "section_step": v.section_step, "section_mean": v.section_mean}
                 for v in cfg.volumes],
        "description": _description(model, cfg),
        "validation": {"url": cfg.validation.url, "roi_voxels": cfg.validation.roi,
                       "note": args.note},
        # the model file's own record (the log may run on past the last checkpoint)
        "iterations": int(model.card.get("iterations", log[-1]["iteration"])),
        "train_seconds": int(float(model.card.get("train_seconds", log[-1]["seconds"]))),
        "hardware": "2 CPU cores",
        "intensity": model.card.get("intensity"),
        "threshold": best_net["threshold"],
        "validation_scores": {k: round(best_net[k], 4) for k in
                              ("voi_split", "voi_merge", "voi", "arand", "cremi_score")},
        "baseline_scores": {k: round(best_base[k], 4) for k in
                            ("voi_split", "voi_merge", "voi", "arand", "cremi_score")}
                           | {"threshold": best_base["threshold"]},
        "reproduce": f"emdask train {args.config} && python benchmarks/eval_boundary.py "
                     f"{run}/model.pt {args.config} --ship {args.ship}",
        "licence": "weights: BSD-3-Clause; training data: " + ", ".join(
            DATA_TERMS[Path(v.url).parent.name] for v in cfg.volumes),
    }
    save_model(model, WEIGHTS / f"{args.ship}.pt", card=card)
    _write_card(card, net, base, WEIGHTS / f"{args.ship}.md")
    shutil.copy(run / "curves.png", WEIGHTS / f"{args.ship}_curves.png")
    print(f"\nshipped {WEIGHTS / (args.ship + '.pt')} "
          f"({(WEIGHTS / (args.ship + '.pt')).stat().st_size / 1e6:.1f} MB)")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
