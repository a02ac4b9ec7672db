"""Section alignment on real stacks with known distortions, and missing-section detection.

Each real stack is distorted section by section with :func:`emdask.align.distort`
(translation, rotation and a smooth elastic field, at most 20 pixels; the first section is
left alone), one section is blacked out entirely and one in part, and :func:`emdask.align`
aligns the result.  Two tables are printed.

Alignment, one row per stack and distortion seed:

* residual displacement against the known truth (pixels; median and 95th percentile, where
  data exist and inside the blacked-out region), after removing its mean and linear trend
  in z (the stack's frame and shear, which no aligner can see in the images), and its
  non-affine part (the residual minus each section's best affine fit: what is left once
  the sections' position, rotation and scale are right);
* "undone": the residual against the alignment of the undistorted stack instead of the
  stack as given, i.e. how exactly the known distortions alone are removed;
* the mean NCC of consecutive sections, distorted and realigned;
* where the stack has 3-D labels (traced by people; the aligner never sees them), their
  continuity: the fraction of labelled pixels that carry the same neuron id in the next
  section, with the labels distorted like the raw, and rendered with the alignment's
  fields;
* whether the blacked-out section is found.

The stack as given, one row per stack: how good a truth it is.  The residual can only be
as small as the stack used to judge it is aligned.

* how far aligning the undistorted stack moves it (residual of that alignment against
  the identity);
* the NCC of consecutive sections (smoothed, median), and the label continuity, as given
  and after that alignment,
  and the sections that alignment moves by more than 4 pixels against a neighbour while
  raising the NCC with every neighbour by more than 0.05: sections misplaced in the stack
  as given (or anatomy that moves coherently over the whole section);
* the jitter: the median, over consecutive sections, of the shift that block matching
  (blocks of 96 pixels or a third of the section, median over the blocks) finds between
  them;
* the floor that jitter sets: the residual (median, p95) that the best estimator of the
  sections' positions from such matches reaches, in a linear-Gaussian model
  (:func:`floor`); a residual far above it is the aligner's fault, one near it is not;
* missing-section false alarms.

The medulla FIB-SEM cube is isotropic (10 nm), so it is cut into sections across each of
its three axes: three stacks whose truth is aligned as acquired, with different anatomy.
It also stands in for 40 nm ssTEM with a truth aligned to the pixel, in two ways: every
4th slice, and sections that are each the mean of 4 slices (a TEM image projects the
whole thickness of its section).

    python benchmarks/bench_align.py [--sections 30] [--seeds 0 1] [--offsets S]

``--offsets S`` moves every section but the first by a further random whole-pixel
translation of up to S pixels per axis, on top of the distortions (sections that lie
anywhere on their grids, as raw ssTEM stacks do): beyond what the aligner is built for
(20 pixels), to measure its reach.

With ``--scale N TY TX`` it times instead one large stack: N sections of the larval VNC
stack (mirrored in z to make up the number) tiled TY x TX times in y and x (mirrored, so
that the tiles join smoothly), distorted with seed 0: seconds, the peak memory that numpy
allocates while aligning (traced; not SuperLU's or the FFT's own) and the residual.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from common import MEDULLA, SHARED

from emdask.align import _dense, align, block_match, displacement_error, distort, render
from emdask.defects import detect_defects
from emdask.volumes import open_volume

#: name: (file, raw dataset, 3-D labels dataset or None, axis cut into sections, step);
#: a negative step -k makes each section the mean of k consecutive slices (the labels:
#: the middle one), as a TEM image projects the whole thickness of its section.
STACKS = {
    "ISBI 2012 ssTEM (50x4x4 nm)":
        (SHARED / "isbi2012_sstem" / "isbi2012_train.h5", "raw", None, 0, 1),
    "CREMI B crop ssTEM (40x4x4 nm)":
        (SHARED / "cremi_sampleB_crop_bigcat" / "cremi_sampleB_z46-50_x0-250.h5", "raw",
         "labels/neuron_ids", 0, 1),
    "larval VNC ssTEM (50x4.6x4.6 nm)":
        (SHARED / "drosophila_vnc_sstem_gerhard2013" / "vnc_stack1_synapses_x0-640.h5", "raw",
         None, 0, 1),
    "medulla FIB-SEM 10 nm, sections across z": (MEDULLA, "raw", "labels/neuron_ids", 0, 1),
    "medulla FIB-SEM 10 nm, sections across y": (MEDULLA, "raw", "labels/neuron_ids", 1, 1),
    "medulla FIB-SEM 10 nm, sections across x": (MEDULLA, "raw", "labels/neuron_ids", 2, 1),
    "medulla FIB-SEM, every 4th z slice (40 nm)":
        (MEDULLA, "raw", "labels/neuron_ids", 0, 4),
    "medulla FIB-SEM, 40 nm projections (4 slices)":
        (MEDULLA, "raw", "labels/neuron_ids", 0, -4),
}


def sections(path: Path, raw: str, truth_labels: str | None, axis: int, step: int,
             n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` sections of a stack (and its labels) as :data:`STACKS` describes them."""
    k = abs(step)
    vol = np.moveaxis(open_volume(str(path), raw).values, axis, 0)[: n * k]
    vol = vol[: len(vol) // k * k]
    if step < 0:  # projections: the mean of k slices
        vol = np.rint(vol.reshape(-1, k, *vol.shape[1:]).mean(axis=1)).astype(vol.dtype)
    else:
        vol = vol[::k]
    labels = None
    if truth_labels is not None:
        lab = np.moveaxis(open_volume(str(path), truth_labels).values, axis, 0)[: len(vol) * k]
        labels = np.ascontiguousarray(lab[k // 2::k] if step < 0 else lab[::k])
    return np.ascontiguousarray(vol), labels


def continuity(labels: np.ndarray | None) -> str:
    """Fraction of labelled pixels that carry the same neuron id in the next section (both
    labelled): how well the 3-D labels, traced by people, line up from section to section.
    An independent check of an alignment: the aligner never sees the labels."""
    if labels is None:
        return "    -"
    a, b = labels[:-1], labels[1:]
    both = (a != 0) & (b != 0)
    return f"{(a[both] == b[both]).mean():5.3f}"


def warp_labels(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The labels distorted like the raw by :func:`distort` (nearest neighbour; 0 outside)."""
    ys, xs = np.meshgrid(np.arange(labels.shape[1], dtype=np.float64),
                         np.arange(labels.shape[2], dtype=np.float64), indexing="ij")
    return np.stack([ndi.map_coordinates(lab, [ys + t[0], xs + t[1]], order=0, cval=0)
                     for lab, t in zip(labels, truth, strict=True)])


def smoothed_ncc(a: np.ndarray, b: np.ndarray, margin: int = 24) -> float:
    """NCC of two sections, smoothed (sigma 2) so that noise does not hide their overlap."""
    a, b = (ndi.gaussian_filter(x.astype(np.float64), 2)[margin:-margin, margin:-margin]
            for x in (a, b))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def ncc(stack: np.ndarray) -> float:
    """Mean NCC of consecutive sections that have data."""
    good = [z for z in range(len(stack)) if stack[z].std() > 0]
    return float(np.mean([smoothed_ncc(stack[z], stack[w])
                          for z, w in itertools.pairwise(good)]))


def misplaced(stack: np.ndarray, still) -> tuple[list[int], float, float]:
    """Sections that aligning the (undistorted) ``stack`` moves by more than 4 pixels
    against a neighbour while raising the NCC with every neighbour by more than 0.05; and
    the median consecutive NCC before and after."""
    aligned = still.aligned.values
    mean = still.fields.values.mean(axis=(2, 3))
    before = [smoothed_ncc(a, b) for a, b in itertools.pairwise(stack)]
    after = [smoothed_ncc(a, b) for a, b in itertools.pairwise(aligned)]
    out = []
    for z in range(len(stack)):
        nb = [w for w in (z - 1, z + 1) if 0 <= w < len(stack)]
        moved = max(np.linalg.norm(mean[z] - mean[w]) for w in nb)
        gain = min(after[min(z, w)] - before[min(z, w)] for w in nb)
        if moved > 4 and gain > 0.05:
            out.append(z)
    return out, float(np.median(before)), float(np.median(after))


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


def floor(jitter_px: float, sections: int, spread: float) -> tuple[float, float]:
    """The residual (2-D median, p95 in px) that the best estimator of the sections'
    positions reaches from consecutive matches that err by ``jitter_px``.

    A linear-Gaussian model of what any aligner of pairwise matches faces: the matches see
    only ``d[z+1] - d[z] + e[z]``, the distortions' difference plus an error of the
    anatomy (oblique neurites), and nothing ties a section to its true position but the
    prior that distortions are independent, of ``spread`` px per axis.  The posterior
    covariance of ``d``, less its mean and linear trend in z (as the residual is
    measured), is that floor.  ``jitter_px`` is a median 2-D length, so per axis its
    error is ``jitter_px / sqrt(2 ln 2)`` (Rayleigh).
    """
    rayleigh = np.sqrt(2 * np.log(2))
    diff = np.diff(np.eye(sections), axis=0)
    cov = np.linalg.inv(np.eye(sections) / spread**2
                        + diff.T @ diff / (jitter_px / rayleigh) ** 2)
    trend = np.stack([np.ones(sections), np.arange(sections)], axis=1)
    keep = np.eye(sections) - trend @ np.linalg.pinv(trend)
    sd = np.sqrt(np.mean(np.diag(keep @ cov @ keep.T)))
    return sd * rayleigh, sd * np.sqrt(-2 * np.log(0.05))


def stats(err: np.ndarray) -> str:
    return f"{np.median(err):5.2f} {np.percentile(err, 95):5.2f}" if err.size else "    -     -"


def offset(distorted: np.ndarray, truth: np.ndarray, most: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Move every section but the first by a random whole-pixel translation ``b`` of up to
    ``most`` pixels per axis: the section becomes ``s(p + b)``, its truth
    ``b + t(p + b)`` (exact: whole pixels)."""
    rng = np.random.default_rng(seed + 10)
    b = rng.uniform(-most, most, (len(distorted), 2)).round()
    b[0] = 0
    moved = np.stack([ndi.shift(s, -v, order=0, cval=0) for s, v in zip(distorted, b,
                                                                         strict=True)])
    moved_truth = np.stack([[ndi.shift(t[c], -v, order=0, mode="nearest") + v[c]
                             for c in range(2)] for t, v in zip(truth, b, strict=True)])
    return moved, moved_truth.astype(np.float32)


def distorted_row(stack: np.ndarray, labels: np.ndarray | None, seed: int, still,
                  offsets: float = 0.0) -> str:
    """Distort ``stack`` (seed; further ``offsets``), black out a section and a region,
    align, measure."""
    nz = len(stack)
    distorted, truth = distort(stack, seed=seed)
    if offsets:
        distorted, truth = offset(distorted, truth, offsets, seed)
    bent = None if labels is None else warp_labels(labels, truth)
    lost, part = nz // 2, nz // 2 + 1 if nz > 3 else None
    region = np.zeros(stack.shape[1:], bool)
    if part is not None and part < nz:
        h, w = stack.shape[1:]
        region[h // 4: h // 2, w // 4: w // 2] = True
    for img in (distorted, bent) if bent is not None else (distorted,):
        img[lost] = 0
        if part is not None and part < nz:
            img[part][region] = 0
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
        u = _dense(result.fields.values[part].astype(np.float64),
                   result.fields.attrs["spacing"], ys, xs)
        hit = ndi.map_coordinates(region.astype(np.uint8), [ys + u[0], xs + u[1]], order=0)
        in_region[part] = hit[4:-4, 4:-4].astype(bool)
    data = err[keep][~in_region[keep]]
    flex = nonaffine(vec[keep], in_region[keep])[~in_region[keep]]
    undone = displacement_error(result.fields, truth, reference=still.fields)[
        :, 4:-4, 4:-4][keep][~in_region[keep]]
    realigned = None if bent is None else render(bent, result.fields, order=0).values
    return (f"{seed:4d} {seconds:4.0f} | {stats(data)} {stats(flex)} {stats(err[in_region])} "
            f"{stats(undone)} | {ncc(distorted):5.3f} {ncc(result.aligned.values):5.3f} | "
            f"{continuity(bent)} {continuity(realigned)} | {found!s:>5s}")


def scale(sections: int, ty: int, tx: int) -> None:
    """Time the alignment of a large stack made of tiled VNC sections."""
    path, raw, *_ = STACKS["larval VNC ssTEM (50x4.6x4.6 nm)"]
    vnc = open_volume(str(path), raw).values
    vnc = np.concatenate([vnc, vnc[::-1]] * (sections // (2 * len(vnc)) + 1))[:sections]
    stack = np.stack([np.block([[s if (i + j) % 2 == 0 else s[:, ::-1] for j in range(tx)]
                                for i in range(ty)]) for s in vnc])
    distorted, truth = distort(stack, seed=0)
    del vnc, stack
    # numpy's allocations are traced: the peak of what aligning allocates (the process's
    # own peak would be that of distorting the stack); SuperLU's factor and FFT scratch
    # space are not counted
    tracemalloc.start()
    t0 = time.perf_counter()
    result = align(distorted)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    err = displacement_error(result.fields, truth)[:, 4:-4, 4:-4]
    print(f"{sections} sections of {distorted.shape[1]} x {distorted.shape[2]} pixels "
          f"({distorted.nbytes / 1e6:.0f} MB): aligned in {seconds:.0f} s; peak memory "
          f"allocated while aligning {peak:.0f} MB; residual px median "
          f"{np.median(err):.2f}, p95 {np.percentile(err, 95):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scale", type=int, nargs=3, metavar=("N", "TY", "TX"))
    parser.add_argument("--offsets", type=float, default=0.0)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    if args.scale:
        scale(*args.scale)
        return
    stacks = {}
    print("Alignment of the distorted stacks: residual px (median p95) against the stack as "
          "given where data exist, its non-affine part, in the blacked-out region; 'undone': "
          "against the alignment of the undistorted stack"
          + (f"; sections further moved by up to {args.offsets:g} px per axis"
             if args.offsets else ""))
    print(f"{'stack':44s} {'seed':>4s} {'s':>4s} | {'data':>11s} {'non-affine':>11s} "
          f"{'blacked':>11s} {'undone':>11s} | NCC {'dist':>5s} {'after':>5s} | labels "
          f"{'dist':>5s} {'after':>5s} | found")
    for name, (path, raw, truth_labels, axis, step) in STACKS.items():
        if not Path(path).exists():
            print(f"{name}: {path} not found; skipped")
            continue
        stack, labels = sections(path, raw, truth_labels, axis, step, args.sections)
        still = align(stack)
        stacks[name] = (stack, labels, still)
        for seed in args.seeds:
            print(f"{name:44s} {distorted_row(stack, labels, seed, still, args.offsets)}",
                  flush=True)
    print("\nThe stacks as given: how far aligning them moves them (px, median p95), median "
          "NCC of consecutive sections before and after, sections misplaced in the given "
          "stack, block-matching jitter (px), the residual that jitter leaves the best "
          "aligner of pairwise matches (px, median p95), missing-section false alarms")
    print(f"{'stack':44s} {'sections':>8s} | {'moved':>11s} | NCC {'given':>5s} "
          f"{'after':>5s} | labels {'given':>5s} {'after':>5s} | misplaced | jitter | "
          f"{'floor':>11s} | false alarms")
    for name, (stack, labels, still) in stacks.items():
        moved = displacement_error(still.fields, np.zeros((len(stack), 2, *stack.shape[1:]),
                                                          np.float32))[:, 4:-4, 4:-4]
        bad, before, after = misplaced(stack, still)
        realigned = None if labels is None else render(labels, still.fields, order=0).values
        shift = jitter(stack)
        # distort's translations are uniform up to 12 px per axis: sd 12 / sqrt(3)
        low = floor(shift, len(stack), 12 / np.sqrt(3))
        print(f"{name:44s} {len(stack):8d} | {stats(moved)} |     {before:5.3f} {after:5.3f} | "
              f"       {continuity(labels)} {continuity(realigned)} | "
              f"{len(bad):2d} {str(bad)[:40]} | {shift:6.2f} | {low[0]:5.2f} {low[1]:5.2f} | "
              f"{int(detect_defects(stack).table['missing'].sum())}", flush=True)


if __name__ == "__main__":
    main()
