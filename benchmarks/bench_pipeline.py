"""How `emdask run` scales: the segmentation stages at 1x, 8x, 64x and 512x a 128^3 base.

The affinities are the FlyEM medulla cube's ground truth plus noise and blur (a stand-in
for a net, with real supervoxel and graph sizes), made once for a 128^3 crop and
mirror-tiled up to each size (1x to 512x: 128^3 to 1024^3 voxels, about a gigavoxel),
written to zarr, and segmented by `emdask run --stage segment` from the `[affinities]`
section (no net).  Printed per size: wall time per voxel of each step (watershed, the
tree solve, relabel), the tasks, the peak memory of all processes together and of the
largest single process, and the largest state one box of the tree held.

    python benchmarks/bench_pipeline.py [--sizes 1 8 64 512] [--workers 2] [--block 128]
                                        [--solve auto|global|tree]

``--solve`` picks how the global step runs: a tree of boxes of blocks (``tree``; what a run
does by default, ``auto``, with these mean-affinity thresholds) or one task (``global``).

Aim (issue 23): cost per voxel flat within 1.3x and the largest process's peak within 1.5x
from 8x to 512x.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import zarr
from common import MEDULLA, PeakMemory, noisy_affinities

from emdask import save_volume
from emdask.pipeline import load_run_config, run
from emdask.solve_tree import plane_faces, tree

BASE = 128


def _tiled(base: np.ndarray, reps: int) -> da.Array:
    """``base`` (c, z, y, x) mirrored ``reps`` times along each spatial axis, lazily."""
    out = da.from_array(base, chunks=base.shape)
    for axis in (1, 2, 3):
        out = da.concatenate([out if i % 2 == 0 else da.flip(out, axis)
                              for i in range(reps)], axis=axis)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block", type=int, default=128, help="block side (voxels)")
    parser.add_argument("--tmp", help="folder for the stores (default: a temporary one)")
    parser.add_argument("--solve", default="auto", choices=["auto", "global", "tree"])
    args = parser.parse_args()
    if not MEDULLA.exists():
        sys.exit(f"needs {MEDULLA}")
    with h5py.File(MEDULLA, "r") as f:
        labels = f["labels/neuron_ids"][:BASE, :BASE, :BASE]
    base = np.rint(noisy_affinities(labels) * 255).astype(np.uint8)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        for factor in args.sizes:
            reps = round(factor ** (1 / 3))
            shape = (BASE * reps,) * 3
            affs = str(tmp / f"affs_{factor}x.zarr")
            save_volume(_tiled(base, reps), affs, "affinities", voxel_size=(10, 10, 10),
                        chunks=(args.block,) * 3)
            # the input only gives the geometry: an empty array (no chunk is written)
            raw = str(tmp / f"raw_{factor}x.zarr")
            zarr.create_array(raw, shape=shape, chunks=(args.block,) * 3, dtype="uint8",
                              fill_value=0, attributes={"voxel_size": [10, 10, 10]})
            cfg = load_run_config({
                "input": {"url": raw, "voxel_size": [10, 10, 10]},
                "affinities": {"url": affs, "dataset": "affinities"},
                "output": {"path": str(tmp / f"out_{factor}x.zarr"),
                           "chunks": [args.block] * 3},
                "segment": {"thresholds": [0.3, 0.5], "solve": args.solve},
                "cluster": {"n_workers": args.workers, "threads_per_worker": 1},
            })
            with PeakMemory(interval=0.05) as peaks:
                t0 = time.perf_counter()
                result = run(cfg, stages=["segment"])
                wall = time.perf_counter() - t0
            grid = (reps * BASE // args.block,) * 3
            boxes = tree(grid)
            n_faces = sum(len(plane_faces(b, grid)) for b in boxes if b.children)
            n_blocks = int(np.prod(grid))
            graph = result["stages"]["agglomerate"].get("graph", {})
            rows.append((factor, shape, n_blocks, len(boxes), n_faces, result["timings"],
                         wall, peaks, graph.get("graph_nbytes", 0)))
            for path in (affs, raw, cfg.output.path):  # room for the next size
                shutil.rmtree(path, ignore_errors=True)

    print(f"\nemdask run --stage segment, {args.workers} worker processes, blocks "
          f"{args.block}^3, affinities given (medulla ground truth + noise, mirrored), "
          f"solve = {args.solve}")
    print(f"{'size':>4} {'Gvox':>6} {'blocks':>6} {'boxes':>6} {'faces':>6} "
          f"{'watershed':>10} {'solve':>10} {'relabel':>10} {'total':>10} "
          f"{'wall s':>7} {'peak all MB':>11} {'peak 1 proc MB':>14} {'graph MB':>8}")
    for factor, shape, blocks, n_boxes, faces, timings, wall, peaks, box_bytes in rows:
        n = float(np.prod(shape))
        per = [timings.get(s, 0) / n * 1e9 for s in ("watershed", "agglomerate", "relabel")]
        print(f"{factor:>3}x {n / 1e9:6.3f} {blocks:6d} {n_boxes:6d} {faces:6d} "
              + " ".join(f"{p:7.1f} ns" for p in per)
              + f" {sum(per):7.1f} ns {wall:7.1f} {peaks.peak_mb:11.0f} "
              f"{peaks.process_mb:14.0f} {box_bytes / 1e6:8.1f}")
    print("(times per voxel: each step's wall time over the voxels; 'solve': the agglomerate "
          "stage; 'graph MB': the largest state one task held, the global graph or, with "
          "--solve tree, the largest box's)")


if __name__ == "__main__":
    main()
