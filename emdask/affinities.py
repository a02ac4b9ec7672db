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

__all__ = ["NEAREST", "affinities_from_labels"]

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


def affinities_from_labels(
    labels: np.ndarray,
    offsets: Sequence[Sequence[int]] = NEAREST,
) -> tuple[np.ndarray, np.ndarray]:
    """Affinities and their validity mask from a label volume.

    Parameters
    ----------
    labels
        Integer labels (z, y, x); 0 = unlabelled/boundary.
    offsets
        One (dz, dy, dx) per output channel.

    Returns
    -------
    affinities : float32 (len(offsets), z, y, x)
    mask : float32, same shape
        1 where both voxels exist and are labelled; 0 at the volume border and where
        either voxel has label 0.

    Examples
    --------
    >>> affs, mask = affinities_from_labels(np.array([[[1, 1, 2, 0]]]))
    >>> affs[2, 0, 0].tolist(), mask[2, 0, 0].tolist()
    ([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0])
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    affs = np.zeros((len(offsets), *labels.shape), np.float32)
    mask = np.zeros_like(affs)
    for c, offset in enumerate(offsets):
        if len(offset) != 3:
            raise ValueError(f"offsets must be (dz, dy, dx) triples, got {offset}")
        a, b, sl = _shifted_pair(labels, offset)
        labelled = (a != 0) & (b != 0)
        affs[c][sl] = labelled & (a == b)
        mask[c][sl] = labelled
    return affs, mask
