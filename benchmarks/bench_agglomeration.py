"""One segment() of the whole FlyEM medulla cube with a given score, for farm-bench.

    farm-bench -n 3 --vs "python benchmarks/bench_agglomeration.py mean" -- \\
        python benchmarks/bench_agglomeration.py learned

The shipped fibsem net's uint8 affinities of the cube (15.6 Mvoxel) are predicted once and
cached in /tmp; the timed process loads them and segments at one threshold, in one block
(threads scheduler), with mean agglomeration or with the shipped learned classifier (which
also reads the raw EM).
"""

from __future__ import annotations

import sys
from pathlib import Path

import dask
import h5py
import numpy as np
from common import MEDULLA

from emdask import segment

CACHE = Path("/tmp/emdask_bench_medulla_fibsem_affs.npy")


def main() -> None:
    score = sys.argv[1] if len(sys.argv) > 1 else "mean"
    with h5py.File(MEDULLA) as f:
        raw = f["raw"][:]
    if not CACHE.exists():
        from emdask.models import pretrained
        from emdask.predict import predict_affinities
        from emdask.volumes import as_volume

        np.save(CACHE, predict_affinities(as_volume(raw, (10, 10, 10)), pretrained("fibsem"),
                                          dtype="uint8")[:3].values)
    affs = np.load(CACHE)
    extra = {"classifier": "fibsem", "raw": raw} if score == "learned" else {}
    with dask.config.set(scheduler="threads"):
        dask.compute(*segment(affs, [0.5], score=score, **extra))


if __name__ == "__main__":
    main()
