"""Affinities from labels: the training targets of the boundary net, and test inputs.

An affinity with offset ``o`` at voxel ``v`` is 1 when ``v`` and ``v + o`` carry the same
non-zero label, else 0.  Nearest-neighbour offsets are ``(-1, 0, 0), (0, -1, 0), (0, 0, -1)``
(the convention of :func:`emdask.segment`); long-range offsets such as ``(0, -9, 0)``
follow the same rule.  Label 0 (unlabelled or boundary) never connects: its affinities are
0, and the returned mask marks where both voxels are labelled, so a loss can ignore edges
that touch unlabelled voxels instead of teaching "boundary" there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["NEAREST", "affinities_from_intensity", "affinities_from_labels", "mask_affinities",
           "shape_descriptors"]

NEAREST: tuple[tuple[int, int, int], ...] = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def _shifted_pair(labels: np.ndarray, offset: Sequence[int]):
    """Views ``(a, b)`` with ``b`` the label at ``v + offset`` of each ``a`` voxel, and the
    slices of the output they fill."""
    out, src = [], []
    for o, n in zip(offset, labels.shape, strict=True):
        if o <= 0:
            out.append(slice(-o, n))
            src.append(slice(0, n + o))
        else:
            out.append(slice(0, n - o))
            src.append(slice(o, n))
    return labels[tuple(out)], labels[tuple(src)], tuple(out)


BACKGROUNDS = ("unlabelled", "boundary")  # what label 0 can mean in training labels


def affinities_from_labels(
    labels: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST,
    background: str = "unlabelled",
) -> tuple[np.ndarray, np.ndarray]:
    """Affinities and their validity mask from a label volume.

    Parameters
    ----------
    labels
        Integer labels (z, y, x).
    offsets
        One (dz, dy, dx) per output channel.
    background
        What label 0 means: ``"unlabelled"`` (unknown: edges that touch it are masked) or
        ``"boundary"`` (membrane, as in ISBI 2012 and the larval VNC labels: edges that
        touch it have affinity 0 and count).

    Returns
    -------
    affinities : float32 (len(offsets), z, y, x)
    mask : float32, same shape
        1 where both voxels exist (and, for ``"unlabelled"``, are labelled); 0 at the
        volume border.

    Examples
    --------
    >>> affs, mask = affinities_from_labels(np.array([[[1, 1, 2, 0]]]))
    >>> affs[2, 0, 0].tolist(), mask[2, 0, 0].tolist()
    ([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0])
    >>> affs, mask = affinities_from_labels(np.array([[[1, 1, 0, 2]]]), background="boundary")
    >>> affs[2, 0, 0].tolist(), mask[2, 0, 0].tolist()
    ([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0])
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    affs = np.zeros((len(offsets), *labels.shape), np.float32)
    mask = np.zeros_like(affs)
    for c, offset in enumerate(offsets):
        if len(offset) != 3:
            raise ValueError(f"offsets must be (dz, dy, dx) triples, got {offset}")
        a, b, sl = _shifted_pair(labels, offset)
        labelled = (a != 0) & (b != 0)
        affs[c][sl] = labelled & (a == b)
        mask[c][sl] = labelled if background == "unlabelled" else 1
    return affs, mask


def affinities_from_intensity(raw: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Nearest-neighbour affinities from EM intensity alone: the classical baseline.

    Membranes are dark, so the smoothed intensity rescaled to [0, 1] is a boundary map
    needing no training; the affinity of two neighbours is the darker of the two.
    Segmenting it with :func:`emdask.segment` is a watershed of the smoothed inverted
    intensity followed by the same agglomeration as for a net's affinities.

    Parameters
    ----------
    raw
        EM volume (z, y, x).
    sigma
        Gaussian smoothing in voxels (x-y only for anisotropic data: pass a tuple).
    """
    import scipy.ndimage as ndi

    smooth = ndi.gaussian_filter(np.asarray(raw, np.float32), sigma)
    lo, hi = np.percentile(smooth, [1, 99])
    b = np.clip((smooth - lo) / max(hi - lo, 1e-6), 0, 1)
    affs = np.zeros((3, *b.shape), np.float32)
    affs[0, 1:] = np.minimum(b[1:], b[:-1])
    affs[1, :, 1:] = np.minimum(b[:, 1:], b[:, :-1])
    affs[2, :, :, 1:] = np.minimum(b[:, :, 1:], b[:, :, :-1])
    return affs


#: channels of :func:`shape_descriptors`
DESCRIPTORS = ("offset_z", "offset_y", "offset_x", "var_z", "var_y", "var_x",
               "corr_zy", "corr_zx", "corr_yx", "mass")


def shape_descriptors(labels: np.ndarray, sigma: Sequence[float],
                      factor: Sequence[int] = (1, 1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Local shape descriptors (Sheridan et al. 2023): for every labelled voxel, statistics
    of its own object's voxels within a Gaussian window around it.

    An auxiliary training target: to predict them the net must see each object's local
    shape (where its centre of mass lies, how it extends, its orientation), which makes
    its affinities better at telling touching objects apart.

    Parameters
    ----------
    labels
        Integer labels (z, y, x); 0 is unlabelled (masked).
    sigma
        Gaussian window (z, y, x) in voxels; 0 on an axis: per plane (2-D labels, whose
        ids are not linked along that axis; its statistics are then 0.5 or 0).
    factor
        Compute on labels subsampled by this factor (nearest) and take each voxel's
        values from the nearest sample: the descriptors are smooth, and this makes them
        ``prod(factor)`` times cheaper.  Voxels whose nearest sample lies in another
        object are masked.

    Returns
    -------
    descriptors : float32 (10, z, y, x) in [0, 1]
        :data:`DESCRIPTORS`: the offset from the voxel to the window's centre of mass in
        units of sigma (mapped as 0.5 + offset / 2), the variances in units of sigma
        squared, the Pearson correlations (0.5 + r / 2), and the window's object mass
        (the Gaussian-weighted fraction of the window inside the object).
    mask : float32 (10, z, y, x)
        1 on labelled voxels.
    """
    import scipy.ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    factor = np.asarray(factor, int)
    sub = labels[tuple(slice(f // 2, None, f) for f in factor)]
    sig = np.asarray(sigma, float) / factor
    out = np.zeros((len(DESCRIPTORS), *sub.shape), np.float32)
    reach = np.ceil(3 * sig).astype(int)
    # one box per id 1..max (None where absent)
    for i, found in enumerate(ndi.find_objects(sub), start=1):
        if found is None:
            continue
        box = tuple(slice(max(0, b.start - r), min(n, b.stop + r))
                    for b, r, n in zip(found, reach, sub.shape, strict=True))
        m = (sub[box] == i).astype(np.float64)
        # coordinates in units of sigma, centred in the box (small numbers, exact sums);
        # 0 along an axis without a window
        grids = np.meshgrid(*[(np.arange(s.start, s.stop) - (s.start + s.stop) / 2) / g
                              if g > 0 else np.zeros(s.stop - s.start)
                              for s, g in zip(box, sig, strict=True)], indexing="ij")

        def smooth(a):
            return ndi.gaussian_filter(a, sig, mode="constant", truncate=3.0)

        mass = smooth(m)
        inside = m > 0
        w = np.maximum(mass[inside], 1e-12)
        means = [smooth(m * c)[inside] / w for c in grids]
        offs = [mu - c[inside] for mu, c in zip(means, grids, strict=True)]
        second = {}
        for a in range(3):
            for b in range(a, 3):
                second[a, b] = (smooth(m * grids[a] * grids[b])[inside] / w
                                - means[a] * means[b])
        view = out[(slice(None), *box)]
        values = [*(0.5 + o / 2 for o in offs), *(second[a, a] for a in range(3)),
                  *(0.5 + second[a, b] / np.sqrt(np.maximum(second[a, a] * second[b, b],
                                                            1e-12)) / 2
                    for a, b in ((0, 1), (0, 2), (1, 2))),
                  mass[inside]]
        for c, v in enumerate(values):
            view[c][inside] = np.clip(v, 0, 1)
    mask = labels > 0
    if np.any(factor > 1):  # each voxel from its nearest sample, within its own object
        near = np.ix_(*[np.clip(np.rint((np.arange(n) - f // 2) / f), 0, m - 1).astype(int)
                        for n, f, m in zip(labels.shape, factor, sub.shape, strict=True)])
        out = out[(slice(None), *near)]
        mask &= sub[near] == labels
    mask = np.broadcast_to(mask, out.shape).astype(np.float32)
    return out * mask, mask


def mask_affinities(affinities, mask):
    """Set to 0 every nearest-neighbour affinity whose edge touches a masked voxel.

    Used with the mask of :func:`emdask.defects.detect_defects`: the watershed then leaves
    missing voxels as background and joins nothing across a missing section.

    Parameters
    ----------
    affinities
        (3, z, y, x) numpy or Dask array (channel ``d`` at ``v`` joins ``v`` and ``v - e_d``).
    mask
        (z, y, x) boolean, True where data is missing.

    Returns
    -------
    Array of the same type, shape and dtype (lazy for Dask input).

    Examples
    --------
    >>> affs = np.ones((3, 3, 1, 1), np.float32)
    >>> mask_affinities(affs, np.array([False, True, False])[:, None, None])[0, :, 0, 0].tolist()
    [1.0, 0.0, 0.0]
    """
    import dask.array as da

    from emdask.blockwise import apply

    mask = mask.data if hasattr(mask, "dims") else mask
    if tuple(mask.shape) != tuple(affinities.shape[1:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the affinities' "
                         f"volume shape {tuple(affinities.shape[1:])}")
    if not isinstance(affinities, da.Array) and not isinstance(mask, da.Array):
        return _masked_kernel(np.asarray(affinities), np.pad(np.asarray(mask, bool), 1))
    affinities, mask = da.asarray(affinities), da.asarray(mask)
    return apply(mask_step(affinities.shape[0], affinities.dtype), affinities, mask,
                 chunks=affinities.chunks[1:])


def mask_step(channels: int, dtype):
    """The blockwise step of :func:`mask_affinities`: (affinities, mask) -> affinities."""
    from emdask.blockwise import Step

    # A block's edges reach one voxel below it along every axis: the mask's halo is 1.
    return Step("masked", _masked_kernel, np.dtype(dtype), halo=((0, 0, 0), (1, 1, 1)),
                channels=int(channels))


def _masked_kernel(affs: np.ndarray, mask: np.ndarray, where=None) -> np.ndarray:
    """Nearest-neighbour affinities of a block with edges touching ``mask`` (the block
    plus a halo of 1) set to 0; further channels kept.  (A copy: the block read may be a
    view of the caller's array.)"""
    return cut_masked(affs.copy(), mask)


def cut_masked(affs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`_masked_kernel` in place: ``affs`` (the block) changed and returned."""
    mask = mask.astype(bool, copy=False)
    inner = mask[1:-1, 1:-1, 1:-1]
    for d in range(3):  # edge d at v joins v and v - e_d: cut where either is masked
        below = tuple(slice(0, -2) if k == d else slice(1, -1) for k in range(3))
        affs[d][inner | mask[below]] = 0
    return affs
