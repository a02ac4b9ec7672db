"""Skeletons of segments (TEASAR, by ``kimimaro``), block by block, joined across blocks.

Each block plus one voxel on its high sides is skeletonized with ``fix_borders``: where a
segment crosses a block face, kimimaro ends its skeleton at the centre of the segment's
cross-section on that face, and the neighbouring block, which shares that face's voxels,
ends its own skeleton at the same point.  The pieces of a segment, in nm, are then joined
by merging the vertices they share, which makes one connected skeleton.  Skeletons are
written in neuroglancer's precomputed skeleton format (``info`` and one file per segment)
with a table of cable length per segment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["cable_lengths", "join", "skeleton_block", "skeletons"]

INFO = {"@type": "neuroglancer_skeletons",
        "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],  # vertices are in nm already
        "vertex_attributes": []}

#: TEASAR parameters (kimimaro's): ``scale`` and ``const`` (nm) set how far from the
#: centreline a branch must reach to be kept.
TEASAR = {"scale": 1.5, "const": 300}


def skeleton_block(labels: np.ndarray, origin: Sequence[int], voxel_size: Sequence[float],
                   offset: Sequence[float] = (0.0, 0.0, 0.0), dust: int = 0,
                   teasar: dict | None = None) -> dict[int, Any]:
    """Skeletons of every segment in one block (plus one voxel on its high sides), as
    ``osteoid.Skeleton`` objects with vertices in nm (x, y, z) at voxel centres."""
    import kimimaro

    vs = np.asarray(voxel_size, float)
    pieces = kimimaro.skeletonize(
        np.asfortranarray(np.asarray(labels).T), teasar_params=teasar or TEASAR,
        anisotropy=tuple(vs[::-1]), dust_threshold=int(dust), fix_borders=True,
        progress=False, parallel=1)
    shift = ((np.asarray(origin, float) + 0.5) * vs + np.asarray(offset, float))[::-1]
    out = {}
    for segment, skeleton in pieces.items():
        skeleton.vertices = (skeleton.vertices + shift).astype(np.float32)
        out[int(segment)] = skeleton
    return out


def join(pieces: Sequence[Any]) -> Any:
    """One skeleton from the pieces of a segment: shared vertices (the block faces')
    merged."""
    from osteoid import Skeleton

    return Skeleton.simple_merge(list(pieces)).consolidate()


def skeletons(segmentation: Any, chunks: Sequence[int] = (64, 256, 256), dust: int = 0,
              teasar: dict | None = None) -> dict[int, Any]:
    """Skeletons of every segment of a segmentation, computed block by block and joined
    (one ``osteoid.Skeleton`` per segment id; vertices in nm, x-y-z).

    Parameters
    ----------
    segmentation
        (z, y, x) DataArray (voxel size and offset from its attrs) or array.
    chunks
        The blocks skeletonized one at a time.
    dust
        Segments with fewer voxels in a block are not skeletonized there.
    teasar
        kimimaro's TEASAR parameters (default :data:`TEASAR`).
    """
    from emdask.meshes import per_block

    pieces = per_block(segmentation, chunks, functools.partial(skeleton_block, dust=dust,
                                                               teasar=teasar))
    return {s: join(p) for s, p in sorted(pieces.items())}


def cable_lengths(skeletons: dict[int, Any]) -> pd.DataFrame:
    """A row per segment: ``id``, ``cable_nm`` (total length of its skeleton's edges),
    ``vertices``, ``components`` (1 for a connected skeleton)."""
    rows = [{"id": s, "cable_nm": float(sk.cable_length()), "vertices": len(sk.vertices),
             "components": len(sk.components())} for s, sk in sorted(skeletons.items())]
    return pd.DataFrame(rows, columns=["id", "cable_nm", "vertices", "components"])
