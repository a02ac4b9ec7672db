"""Helpers shared by the benchmarks: real data, noisy affinities, peak memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from emdask.affinities import affinities_from_labels

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEDULLA = SHARED / "flyem_medulla_fib_neuroproof_sample2" / "medulla_fib_sample2_250cube.h5"


def noisy_affinities(labels: np.ndarray, seed: int = 0, sigma=(0, 1, 1, 1), noise=0.3):
    """Ground-truth affinities plus Gaussian noise, blurred: spatially correlated errors,
    a stand-in for a net's output."""
    affs, _ = affinities_from_labels(labels)
    rng = np.random.default_rng(seed)
    affs = ndi.gaussian_filter(affs + rng.normal(0, noise, affs.shape), sigma)
    return np.clip(affs, 0, 1).astype(np.float32)


class PeakMemory:
    """Sample the resident memory of this process and its children (Dask workers) in a
    thread; ``peak_mb`` is the largest total seen inside the ``with`` block,
    ``process_mb`` the largest of any single process."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb, self.process_mb = interval, 0.0, 0.0

    def _sample(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            sizes = [0.0]
            for p in [me, *me.children(recursive=True)]:
                try:
                    sizes.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, sum(sizes))
            self.process_mb = max(self.process_mb, max(sizes))
            self._stop.wait(self.interval)

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
