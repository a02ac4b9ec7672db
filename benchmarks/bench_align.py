"""Section alignment on real stacks with known distortions, and missing-section detection.

Each real stack (already aligned as published) is distorted section by section with
:func:`emdask.align.distort` (translation, rotation and a smooth elastic field, at most 20
pixels; the first section is left alone), one section is blacked out entirely and one in
part, and :func:`emdask.align` aligns the result.  Printed per stack:

* residual displacement against the known truth (pixels; median and 95th percentile, where
  data exist and inside the blacked-out region), after removing its mean and linear trend
  in z (the stack's frame and shear, which no aligner can see in the images);
* the same for the undistorted stack: how far the aligner moves a stack that is already
  aligned (consecutive 40-50 nm sections differ; matching follows oblique neurites, and
  the ISBI stack carries real section-to-section warps);
* "undone": the residual against the alignment of the undistorted stack instead of the
  stack as given, i.e. how exactly the known distortions alone are removed;
* the mean NCC of consecutive sections: aligned as published, distorted, realigned;
* missing-section detection: false alarms on the undistorted stack, and whether the
  blacked-out section is found;
* what the residual is made of: its non-affine part (the residual minus each section's
  best affine fit: what is left once the sections' position, rotation and scale are
  right), and the stack's own jitter: the median, over consecutive sections of the stack
  as given, of the shift that block matching (blocks of 96 pixels or a third of the
  section, median over the blocks)
  finds between them.  A large jitter means the given stack is itself misaligned by that
  much, or its anatomy moves coherently from section to section: either way the residual
  against it cannot be much smaller.

    python benchmarks/bench_align.py [--sections 30]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from common import MEDULLA, SHARED

from emdask.align import _dense, align, block_match, displacement_error, distort
from emdask.defects import detect_defects
from emdask.volumes import open_volume

STACKS = {
    "ISBI 2012 ssTEM (50x4x4 nm)": (SHARED / "isbi2012_sstem" / "isbi2012_train.h5", "raw", 1),
    "CREMI B crop ssTEM (40x4x4 nm)": (
        SHARED / "cremi_sampleB_crop_bigcat" / "cremi_sampleB_z46-50_x0-250.h5", "raw", 1),
    "medulla FIB-SEM, every slice (10 nm)": (MEDULLA, None, 1),
    "medulla FIB-SEM, every 4th slice (40x10x10 nm)": (MEDULLA, None, 4),
}


def ncc(stack: np.ndarray, margin: int = 24) -> float:
    a = stack[:, margin:-margin, margin:-margin].astype(np.float64)
    good = [z for z in range(len(a)) if a[z].std() > 0]
    pairs = [(a[z], a[w]) for z, w in zip(good[1:], good[:-1], strict=True)]
    return float(np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in pairs]))


def nonaffine(vec: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """|residual - its least-squares affine fit|, per section of a (z, 2, y, x) field;
    the fit leaves out the samples in ``skip`` (z, y, x)."""
    nz, _, h, w = vec.shape
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    design = np.stack([np.ones(h * w), ys.ravel(), xs.ravel()], axis=1)
    out = np.empty((nz, h, w))
    for z in range(nz):
        flat = vec[z].reshape(2, -1).T
        use = ~skip[z].ravel()
        coef, *_ = np.linalg.lstsq(design[use], flat[use], rcond=None)
        out[z] = np.linalg.norm(flat - design @ coef, axis=1).reshape(h, w)
    return out


def jitter(stack: np.ndarray, search: int = 32) -> float:
    """Median over consecutive sections of |median block-matching shift| (pixels)."""
    smooth = [ndi.gaussian_filter(s.astype(np.float32), 2) for s in stack]
    ny, nx = stack.shape[1:]
    block = min(96, ny // 3, nx // 3)
    starts = [(y, x) for y in range(search + 8, ny - block - search - 8, 64)
              for x in range(search + 8, nx - block - search - 8, 64)]
    shifts = []
    for a, b in itertools.pairwise(smooth):
        t = np.stack([a[y:y + block, x:x + block] for y, x in starts])
        w = np.stack([b[y - search:y + block + search, x - search:x + block + search]
                      for y, x in starts])
        off, score = block_match(t, w)
        good = (score > 0.3) & np.isfinite(off).all(axis=1)
        if good.sum() >= 3:
            shifts.append(np.linalg.norm(np.median(off[good], axis=0)))
    return float(np.median(shifts)) if shifts else float("nan")


def stats(err: np.ndarray) -> str:
    return f"{np.median(err):5.2f} {np.percentile(err, 95):5.2f}" if err.size else "    -     -"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    print("residual px (median p95) against the stack as given: where data exist, in the "
          "blacked-out region, and for the undistorted stack; 'undone': against the "
          "alignment of the undistorted stack")
    print(f"{'stack':48s} {'sections':>8s} {'s':>5s} | {'data':>11s} {'blacked':>11s} "
          f"{'undistorted':>11s} {'undone':>11s} | NCC {'given':>5s} {'dist':>5s} "
          f"{'after':>5s} | missing: false found | {'non-affine':>11s} jitter")
    for name, (path, dataset, step) in STACKS.items():
        if not Path(path).exists():
            print(f"{name}: {path} not found; skipped")
            continue
        stack = open_volume(str(path), dataset).values[: args.sections * step : step]
        nz = len(stack)
        distorted, truth = distort(stack, seed=0)
        lost, part = nz // 2, nz // 2 + 1 if nz > 3 else None
        distorted[lost] = 0
        region = np.zeros(stack.shape[1:], bool)
        if part is not None and part < nz:
            h, w = stack.shape[1:]
            region[h // 4: h // 2, w // 4: w // 2] = True
            distorted[part][region] = 0
        false_alarms = int(detect_defects(stack).table["missing"].sum())
        t0 = time.perf_counter()
        result = align(distorted)
        seconds = time.perf_counter() - t0
        found = bool(result.table["missing"].iloc[lost])
        vec = displacement_error(result.fields, truth, vectors=True)[:, :, 4:-4, 4:-4]
        err = np.linalg.norm(vec, axis=1)
        keep = [z for z in range(nz) if z != lost]
        # which residual samples fall into the blacked-out region of `part`
        in_region = np.zeros(err.shape, bool)
        if part is not None and part < nz:
            ys, xs = np.meshgrid(np.arange(0, stack.shape[1], 4.0),
                                 np.arange(0, stack.shape[2], 4.0), indexing="ij")
            u = _dense(result.fields.values[part].astype(np.float64), 32, ys, xs)
            hit = ndi.map_coordinates(region.astype(np.uint8), [ys + u[0], xs + u[1]],
                                      order=0)
            in_region[part] = hit[4:-4, 4:-4].astype(bool)
        data = err[keep][~in_region[keep]]
        bent = nonaffine(vec[keep], in_region[keep])[~in_region[keep]]
        blacked = err[in_region]
        still = align(stack)
        moved = displacement_error(still.fields, np.zeros_like(truth))[:, 4:-4, 4:-4]
        undone = displacement_error(result.fields, truth, reference=still.fields)[
            :, 4:-4, 4:-4][keep][~in_region[keep]]
        aligned = result.aligned.values
        print(f"{name:48s} {nz:8d} {seconds:5.0f} | {stats(data)} {stats(blacked)} "
              f"{stats(moved)} {stats(undone)} |     {ncc(stack):5.3f} {ncc(distorted):5.3f} "
              f"{ncc(aligned):5.3f} | {false_alarms:13d} {found!s:>5s} | {stats(bent)} "
              f"{jitter(stack):6.2f}", flush=True)


if __name__ == "__main__":
    main()
