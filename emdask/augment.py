"""Training augmentations, including the ssEM defects that break reconstruction.

Every augmentation takes a patch of raw EM (float32, z-y-x, values in [0, 1]) and its
labels, and a :class:`numpy.random.Generator`, and returns both transformed consistently.
Geometric ones (flips, transposes, misalignment) move raw and labels together; photometric
ones (intensity, blur) and missing data (whole or partial black sections) change only the
raw: the target stays the true one, so the net learns to see through them.

Misalignment needs context: :func:`augment` takes a patch with ``margin`` extra voxels on
each side in x-y and crops the shifted sections out of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "AugmentConfig",
    "augment",
    "blur",
    "flip_transpose",
    "intensity",
    "misalign",
    "missing_section",
    "partial_section",
    "volume_edge",
]


@dataclass
class AugmentConfig:
    """Rates (probability per patch) and strengths of each augmentation."""

    flip: float = 1.0  # random flips on every axis and an x-y transpose
    intensity: float = 0.8
    contrast: float = 0.3  # scale in [1 - c, 1 + c]
    brightness: float = 0.15  # shift in [-b, b]
    gamma: float = 0.3  # exponent 2**u, u in [-g, g]
    blur: float = 0.2
    blur_sigma: float = 2.0  # max sigma (x-y), per section
    missing: float = 0.15  # whole sections black
    partial: float = 0.15  # a black region in a section
    slip: float = 0.2  # one section displaced
    shift: float = 0.2  # all sections above a plane displaced
    max_shift: int = 8  # voxels; needs margin >= max_shift
    # the patch at the volume's end, black beyond it as inference pads there (0: off, and
    # no random number drawn, so recipes without it train as before)
    edge: float = 0.0


def flip_transpose(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Random flips of z, y and x and a random x-y transpose (the 16 symmetries of a
    stack of sections)."""
    for axis in range(3):
        if rng.random() < 0.5:
            raw, labels = np.flip(raw, axis), np.flip(labels, axis)
    if rng.random() < 0.5:
        raw, labels = raw.transpose(0, 2, 1), labels.transpose(0, 2, 1)
    return np.ascontiguousarray(raw), np.ascontiguousarray(labels)


def intensity(raw: np.ndarray, rng: np.random.Generator, contrast=0.3, brightness=0.15,
              gamma=0.3) -> np.ndarray:
    """Contrast, brightness and gamma, drawn once per patch; values stay in [0, 1]."""
    out = (raw - 0.5) * rng.uniform(1 - contrast, 1 + contrast) + 0.5
    out = out + rng.uniform(-brightness, brightness)
    out = np.clip(out, 0, 1) ** (2.0 ** rng.uniform(-gamma, gamma))
    return out.astype(np.float32)


def blur(raw: np.ndarray, rng: np.random.Generator, max_sigma=2.0) -> np.ndarray:
    """Gaussian blur of random sections (out-of-focus sections), in x-y only."""
    out = raw.copy()
    for z in np.flatnonzero(rng.random(raw.shape[0]) < 0.5):
        out[z] = ndi.gaussian_filter(raw[z], rng.uniform(0.5, max_sigma))
    return out


def missing_section(raw: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One whole section black (a lost or destroyed section); returns it and its index."""
    out = raw.copy()
    z = int(rng.integers(raw.shape[0]))
    out[z] = 0
    return out, z


def partial_section(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A black region (a fold, a crack, debris) covering 10-50% of one section: the part
    of the section on one side of a random line."""
    out = raw.copy()
    z = int(rng.integers(raw.shape[0]))
    ny, nx = raw.shape[1:]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:ny, :nx]
    proj = (yy - ny / 2) * np.sin(angle) + (xx - nx / 2) * np.cos(angle)
    cut = np.quantile(proj, 1 - rng.uniform(0.1, 0.5))
    out[z][proj > cut] = 0
    return out


def volume_edge(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """The patch cut by the volume's end: a band of up to half the patch along one of its
    six faces black, as inference pads beyond a volume, and its labels 0 (no synapse; for
    affinities, unlabelled and so out of the loss).  Without it a net never sees the void
    beyond a volume and may take its dark face for a synaptic density."""
    raw, labels = raw.copy(), labels.copy()
    axis, far = int(rng.integers(3)), bool(rng.integers(2))
    width = int(rng.integers(1, raw.shape[axis] // 2 + 1))
    band = [slice(None)] * 3
    band[axis] = slice(raw.shape[axis] - width, None) if far else slice(0, width)
    raw[tuple(band)] = 0
    labels[tuple(band)] = 0
    return raw, labels


def misalign(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator, margin: int,
             mode: str, max_shift: int = 8):
    """Crop a patch out of one with ``margin`` extra voxels on each side in x-y, with a
    section displaced (``mode="slip"``) or every section from a plane on (``"shift"``).

    Raw and labels move together, so the target affinities follow the displaced sections
    (across the misaligned face they become 0 where the labels no longer match).
    Returns raw, labels and the per-section (dy, dx) shifts.
    """
    nz, ny, nx = raw.shape
    out_y, out_x = ny - 2 * margin, nx - 2 * margin
    shifts = np.zeros((nz, 2), int)
    if mode not in ("slip", "shift"):
        raise ValueError(f"mode must be 'slip' or 'shift', got {mode!r}")
    limit = min(max_shift, margin)  # 0: no room to displace anything, only crop
    if limit > 0:
        d = rng.integers(-limit, limit + 1, 2)
        if np.all(d == 0):
            d[int(rng.integers(2))] = 1
        if mode == "slip":
            shifts[int(rng.integers(nz))] = d
        else:
            shifts[int(rng.integers(1, nz)) if nz > 1 else 0:] = d
    r = np.empty((nz, out_y, out_x), raw.dtype)
    lab = np.empty((nz, out_y, out_x), labels.dtype)
    for z, (dy, dx) in enumerate(shifts):
        sl = (z, slice(margin + dy, margin + dy + out_y), slice(margin + dx, margin + dx + out_x))
        r[z], lab[z] = raw[sl], labels[sl]
    return r, lab, shifts


def augment(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator, margin: int,
            config: AugmentConfig | None = None):
    """All augmentations, each at its rate.  ``raw``/``labels`` carry ``margin`` extra
    voxels on each side in x-y; the result does not."""
    c = config or AugmentConfig()
    if rng.random() < c.slip:
        raw, labels, _ = misalign(raw, labels, rng, margin, "slip", c.max_shift)
    elif rng.random() < c.shift:
        raw, labels, _ = misalign(raw, labels, rng, margin, "shift", c.max_shift)
    elif margin:
        crop = (slice(None), slice(margin, -margin), slice(margin, -margin))
        raw, labels = raw[crop], labels[crop]
    if rng.random() < c.flip:
        raw, labels = flip_transpose(raw, labels, rng)
    if rng.random() < c.intensity:
        raw = intensity(raw, rng, c.contrast, c.brightness, c.gamma)
    if rng.random() < c.blur:
        raw = blur(raw, rng, c.blur_sigma)
    if rng.random() < c.missing:
        raw, _ = missing_section(raw, rng)
    if rng.random() < c.partial:
        raw = partial_section(raw, rng)
    if c.edge and rng.random() < c.edge:
        raw, labels = volume_edge(raw, labels, rng)
    return np.ascontiguousarray(raw, np.float32), np.ascontiguousarray(labels)
