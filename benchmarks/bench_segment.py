"""emdask segmentation versus waterz (and mwatershed) on the FlyEM medulla cube.

Affinities come from the ground truth with blur and noise, so that all methods see the
same realistic input whose errors are known.  Single-core methods are pinned to one core;
``emdask-2`` runs on a LocalCluster of two single-threaded worker processes.  Each method runs in its own subprocess so that peak memory is its own; every
method sweeps the same thresholds and is scored at its best one (lowest VOI split+merge).

    python benchmarks/bench_segment.py [--size 250] [--chunk 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import MEDULLA, PeakMemory, noisy_affinities

THRESHOLDS = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]


def _scores(segs, gt):
    from emdask import evaluate

    rows = [evaluate(s, gt) | {"threshold": t} for s, t in zip(segs, THRESHOLDS, strict=True)]
    return min(rows, key=lambda r: r["voi"])


def run_emdask(workdir: Path, workers: int, chunk: int) -> dict:
    """Affinities read from zarr, segmentations written to zarr: the way a pipeline runs."""
    import dask

    import emdask

    affs = emdask.open_volume(workdir / "affs.zarr", "affinities")
    out = workdir / f"seg-{workers}.zarr"

    def run():
        segs = emdask.segment(affs, THRESHOLDS)
        writes = [emdask.save_volume(s, out, f"t{i}", compute=False, overwrite=True)
                  for i, s in enumerate(segs)]
        dask.compute(*writes)

    if workers == 1:
        with dask.config.set(scheduler="synchronous"), PeakMemory() as mem:
            t0 = time.perf_counter()
            run()
            elapsed = time.perf_counter() - t0
    else:
        from distributed import Client

        from emdask.pipeline import local_cluster

        with local_cluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None) as cluster, Client(cluster):
            run()  # warm up the workers (numba loads its compiled kernels per process)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                run()
                elapsed = time.perf_counter() - t0
    segs = [emdask.open_volume(out, f"t{i}").values for i in range(len(THRESHOLDS))]
    return {"seconds": elapsed, "peak_mb": mem.peak_mb,
            **_scores(segs, np.load(workdir / "gt.npy"))}


def run_waterz(workdir: Path) -> dict:
    import waterz

    affs = np.load(workdir / "affs.npy")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        segs = [s.copy() for s in waterz.agglomerate(affs, THRESHOLDS)]
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "peak_mb": mem.peak_mb,
            **_scores(segs, np.load(workdir / "gt.npy"))}


def run_mwatershed(workdir: Path) -> dict:
    """Mutex watershed on the nearest-neighbour affinities (no long-range repulsion: the
    closest fit to this input); its bias plays the role of the threshold."""
    import mwatershed

    affs = np.load(workdir / "affs.npy").astype(np.float64)
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        segs = [mwatershed.agglom(affs - (1 - t), offsets) for t in THRESHOLDS]
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "peak_mb": mem.peak_mb,
            **_scores(segs, np.load(workdir / "gt.npy"))}


def child(method: str, workdir: Path, chunk: int) -> None:
    import logging

    logging.disable(logging.WARNING)
    if method != "emdask-2" and hasattr(os, "sched_setaffinity"):
        # single-core figures on one core: zarr decodes chunks in a thread pool otherwise
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if method.startswith("emdask"):
        out = run_emdask(workdir, int(method.split("-")[1]), chunk)
    elif method == "waterz":
        out = run_waterz(workdir)
    else:
        out = run_mwatershed(workdir)
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=250)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--methods", default="emdask-1,emdask-2,waterz,mwatershed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.workdir), args.chunk)

    import emdask

    gt = emdask.open_volume(MEDULLA, "labels/neuron_ids")
    gt = gt[: args.size, : args.size, : args.size].values
    affs = noisy_affinities(gt)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.save(work / "gt.npy", gt)
        np.save(work / "affs.npy", affs)
        emdask.save_volume(affs, work / "affs.zarr", "affinities", voxel_size=(10, 10, 10),
                           chunks=(args.chunk,) * 3)
        n = gt.size
        print(f"FlyEM medulla {gt.shape}, {n / 1e6:.1f} Mvoxel, GT affinities + noise(0.3), "
              f"blurred(1); thresholds {THRESHOLDS}; emdask chunks {args.chunk}^3\n")
        print("| method | Mvoxel/s | seconds | peak MB | best threshold | VOI split | "
              "VOI merge | ARAND |")
        print("|---|---|---|---|---|---|---|---|")
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        for method in args.methods.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", method, "--workdir", tmp,
                 "--chunk", str(args.chunk)], capture_output=True, text=True, env=env, check=False)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(line[0][7:])
            print(f"| {method} | {n / r['seconds'] / 1e6:.2f} | {r['seconds']:.1f} | "
                  f"{r['peak_mb']:.0f} | {r['threshold']} | {r['voi_split']:.3f} | "
                  f"{r['voi_merge']:.3f} | {r['arand']:.3f} |")


if __name__ == "__main__":
    main()
