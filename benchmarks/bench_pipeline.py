"""How `emdask run` scales: wall time, peak memory and task count for growing volumes.

The input is the FlyEM medulla FIB-SEM cube (../shared/data), mirrored to reach 1x, 8x and
64x a base size of 64 x 128 x 128 voxels, written to a zarr store first.  Every stage runs
on a LocalCluster.  ``--model tiny`` (default) predicts with an untrained width-4 net, so
the predict column shows the machinery (reads, writes, scheduling) rather than the net's
FLOPs (bench_predict.py measures those), and the segmentation stages then run on
affinities from the ground truth plus noise and blur (as in bench_segment.py) written over
the prediction, so supervoxel and graph sizes are those of real data.  ``--model fibsem``
runs the shipped net and segments its output.

    python benchmarks/bench_pipeline.py [--sizes 1 8 64] [--workers 2] [--model tiny]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import torch
import zarr
from common import MEDULLA, PeakMemory, noisy_affinities

from emdask import save_volume
from emdask.models import AffinityUNet, ModelConfig, save_model
from emdask.pipeline import STAGES, load_run_config, run

BASE = np.array([64, 128, 128])


def _tile(data: np.ndarray, shape) -> np.ndarray:
    """Mirrored copies of ``data`` up to ``shape``: no seams in the image or the labels."""
    for axis, n in enumerate(shape):
        reps = int(np.ceil(n / data.shape[axis]))
        data = np.concatenate([data if i % 2 == 0 else np.flip(data, axis)
                               for i in range(reps)], axis=axis)
    return data[tuple(slice(0, n) for n in shape)]


def _input(factor: int, folder: Path) -> tuple[str, tuple, np.ndarray]:
    """The medulla raw data mirrored to ``factor`` times the base volume, as zarr, and the
    labels mirrored alike."""
    shape = tuple(int(n) for n in BASE * round(factor ** (1 / 3)))
    with h5py.File(MEDULLA, "r") as f:
        raw, labels = f["raw"][:], f["labels/neuron_ids"][:]
    url = str(folder / f"raw_{factor}x.zarr")
    save_volume(_tile(raw, shape), url, "raw", voxel_size=(10, 10, 10), chunks=(64, 128, 128))
    return url, shape, _tile(labels, shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--model", default="tiny", help="'tiny' (untrained) or a model name")
    args = parser.parse_args()
    if not MEDULLA.exists():
        sys.exit(f"needs {MEDULLA}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model == "tiny":
            torch.manual_seed(0)
            model = str(tmp / "tiny.pt")
            save_model(AffinityUNet(ModelConfig(width=4, downsample=[[1, 2, 2]],
                                                voxel_size=[10.0, 10.0, 10.0])), model)
        for factor in args.sizes:
            url, shape, labels = _input(factor, tmp)
            cfg = load_run_config({
                "input": {"url": url, "dataset": "raw"},
                "output": {"path": str(tmp / f"out_{factor}x.zarr"), "chunks": args.chunks},
                "predict": {"model": model},
                "segment": {"thresholds": [0.3, 0.5]},
                "cluster": {"n_workers": args.workers, "threads_per_worker": 1},
            })
            if args.model == "tiny":  # made before the timed runs, out of their memory
                fake = np.rint(noisy_affinities(labels) * 255).astype(np.uint8)
                save_volume(fake, tmp / "fake.zarr", f"{factor}x", voxel_size=(10, 10, 10),
                            chunks=args.chunks)
                del fake
            del labels
            # wall times include starting the LocalCluster
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                result = run(cfg, stages=["predict"])
                wall = time.perf_counter() - t0
            if args.model == "tiny":  # untimed: realistic affinities for the other stages
                fake = da.from_zarr(str(tmp / "fake.zarr"), component=f"{factor}x/s0")
                affs = zarr.open_array(f"{cfg.output.path}/affinities/s0", mode="r+")
                da.store(fake, affs, regions=(slice(0, 3),), lock=False)
            with PeakMemory() as mem2:
                t0 = time.perf_counter()
                rest = run(cfg, stages=STAGES[1:])
                wall += time.perf_counter() - t0
            mem.peak_mb = max(mem.peak_mb, mem2.peak_mb)
            result["timings"].update(rest["timings"])
            result["stages"] = rest["stages"]
            n_blocks = int(np.prod([-(-n // c) for n, c in zip(shape, args.chunks,
                                                                strict=True)]))
            counts = [-(-n // c) for n, c in zip(shape, args.chunks, strict=True)]
            n_faces = sum(int(np.prod(counts)) // c * (c - 1) for c in counts)
            n_tasks = 3 * n_blocks + n_faces + 1  # predict, watershed, relabel; faces; solve
            graph = result["stages"]["agglomerate"].get("graph", {})
            rows.append((factor, shape, n_blocks, n_tasks, result["timings"], wall,
                         mem.peak_mb, graph.get("graph_nbytes", 0)))

    print(f"\nemdask run, {args.workers} worker processes, chunks {args.chunks}, "
          f"model {args.model}")
    head = " ".join(f"{s[:9]:>9}" for s in STAGES)
    print(f"{'size':>4} {'shape':>16} {'Mvox':>6} {'blocks':>6} {'tasks':>6} {head} "
          f"{'total s':>7} {'Mvox/s':>6} {'peak MB':>8} {'graph MB':>8}")
    for factor, shape, blocks, tasks, timings, wall, peak, graph_bytes in rows:
        mvox = np.prod(shape) / 1e6
        stage_s = " ".join(f"{timings.get(s, 0):9.1f}" for s in STAGES)
        print(f"{factor:>3}x {shape!s:>16} {mvox:6.1f} {blocks:6d} {tasks:6d} {stage_s} "
              f"{wall:7.1f} {mvox / wall:6.2f} {peak:8.0f} {graph_bytes / 1e6:8.1f}")


if __name__ == "__main__":
    main()
