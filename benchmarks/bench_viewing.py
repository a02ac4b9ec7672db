"""Time and peak memory of the viewing stages on the FlyEM medulla cube (250^3 voxels at
10 nm, 15.6 Mvoxel), with its dense ground-truth labels as the segmentation:

    python benchmarks/bench_viewing.py [--chunks 64 128 128]

Prints, for the pyramid (all levels of the labels), the meshes and the skeletons, each
computed block by block as the pipeline's stages compute them: seconds, Mvoxel per second,
peak resident memory of the process (the labels, 125 MB as uint64, included), and what
came out (levels, segments, triangles, cable length).  Skeletons are also made whole (one block) to show how
much joining blocks adds to the cable length.
"""

from __future__ import annotations

import argparse
import time

import h5py
import numpy as np
from common import MEDULLA, PeakMemory

from emdask.meshes import meshes
from emdask.pyramids import downsample_block, pyramid_factors
from emdask.skeletons import cable_lengths, skeletons
from emdask.volumes import as_volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128])
    args = p.parse_args()
    with h5py.File(MEDULLA) as f:
        labels = f["labels/neuron_ids"][:].astype(np.uint64)
    seg = as_volume(labels, (10.0, 10.0, 10.0))
    mvox = labels.size / 1e6
    print(f"medulla cube {labels.shape} ({mvox:.1f} Mvoxel), "
          f"{len(np.unique(labels)) - 1} segments; blocks {args.chunks}")
    print(f"{'step':<22} {'s':>7} {'Mvoxel/s':>9} {'peak MB':>8}  result")
    def step(name, fn):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out, what = fn()
            seconds = time.perf_counter() - t0
        print(f"{name:<22} {seconds:7.1f} {mvox / seconds:9.2f} {mem.peak_mb:8.0f}  {what}",
              flush=True)
        return out

    def pyramid():
        level, factors = labels, pyramid_factors(labels.shape, (10, 10, 10))
        for f in factors:
            level = downsample_block(level, f)
        return level, f"{len(factors)} levels, coarsest {level.shape}"

    def mesh():
        m = meshes(seg, args.chunks)
        return m, f"{len(m)} segments, {sum(len(x.faces) for x in m.values())} triangles"

    def skeleton(chunks):
        s = skeletons(seg, chunks, dust=100)
        return s, f"{len(s)} segments"

    step("pyramid (labels)", pyramid)
    step("meshes", mesh)
    blocks = step("skeletons", lambda: skeleton(args.chunks))
    whole = step("skeletons (one block)", lambda: skeleton(labels.shape))
    a, b = cable_lengths(blocks), cable_lengths(whole)
    both = a.merge(b, on="id", suffixes=("_blocks", "_whole"))
    print(f"cable length: {a['cable_nm'].sum() / 1e3:.0f} um in blocks, "
          f"{b['cable_nm'].sum() / 1e3:.0f} um whole (x{a['cable_nm'].sum() / b['cable_nm'].sum():.2f}); "
          f"segments in one piece: {(both['components_blocks'] <= both['components_whole']).mean():.1%} "
          "as connected as the whole-volume skeleton")


if __name__ == "__main__":
    main()
