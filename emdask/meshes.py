"""Meshes of segments, block by block, in neuroglancer's precomputed mesh format.

Each block is meshed by marching cubes (``zmesh``) over the block plus one voxel on its
high sides, without closing the surface at the block's faces: the cells between two
blocks belong to exactly one of them, so a segment's pieces from all its blocks join into
one surface with neither gaps nor overlaps.  Pieces are simplified (``max_error`` nm) and
written as fragments; a manifest per segment lists its fragments, which is what
neuroglancer's legacy precomputed mesh source reads (``info``, ``<id>:0``,
``<id>:0:<block>``).  Vertices are in nm, (x, y, z) as neuroglancer expects, with the
voxel (z, y, x) at ``offset + (index + 0.5) * voxel_size`` (voxel centres).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mesh_block", "meshes"]

INFO = {"@type": "neuroglancer_legacy_mesh"}


def mesh_block(labels: np.ndarray, origin: Sequence[int], voxel_size: Sequence[float],
               offset: Sequence[float] = (0.0, 0.0, 0.0), max_error: float | None = None,
               dust: int = 0) -> dict[int, Any]:
    """Meshes of every segment in one block of labels, as ``zmesh.Mesh`` objects.

    Parameters
    ----------
    labels
        (z, y, x) ids of the block plus one voxel on each high side (where the volume has
        it); 0 is background.
    origin
        The block's first voxel in the volume (z, y, x).
    voxel_size, offset
        nm per voxel and the volume's offset (z, y, x).
    max_error
        Simplification error allowed, nm (default: the largest voxel size; 0: none).
    dust
        Segments with fewer voxels than this in the block get no mesh there (as igneous's
        ``dust_threshold``): each mesh is a file, and writing thousands of specks costs
        more than meshing them.
    """
    import fastremap
    import zmesh

    labels = np.asarray(labels)
    if dust > 0:
        ids, counts = fastremap.unique(labels, return_counts=True)
        small = ids[(counts < dust) & (ids != 0)]
        if len(small):
            labels = fastremap.mask(labels, small)  # a copy: the caller's block stays
    vs = np.asarray(voxel_size, float)
    mesher = zmesh.Mesher(tuple(vs[::-1]))  # zmesh works in (x, y, z)
    mesher.mesh(np.asfortranarray(labels.T), close=False)
    shift = (np.asarray(origin, float) + 0.5) * vs + np.asarray(offset, float)
    error = float(vs.max()) if max_error is None else float(max_error)
    out = {}
    for segment in mesher.ids():
        mesh = mesher.get(int(segment), normals=False, reduction_factor=10 if error else 0,
                          max_error=error)
        mesher.erase(int(segment))
        if len(mesh.faces):
            mesh.vertices = (mesh.vertices + shift[::-1]).astype(np.float32)
            out[int(segment)] = mesh
    return out


def _as_labels(segmentation: Any):
    """The array of a DataArray, Dask or numpy label volume (read block by block)."""
    import dask.array as da
    import xarray as xr

    if isinstance(segmentation, xr.DataArray):
        return segmentation.data
    return segmentation if isinstance(segmentation, da.Array) else np.asarray(segmentation)


def load_mesh(store: str, folder: str, segment: int) -> tuple[np.ndarray, np.ndarray]:
    """One segment's mesh as written by the pipeline (its manifest's fragments joined):
    vertices (nm, x-y-z) and triangles."""
    from emdask.store import get_bytes

    names = json.loads(get_bytes(store, f"{folder}/{segment}:0"))["fragments"]
    vertices, faces = [], []
    for name in names:
        data = get_bytes(store, f"{folder}/{name}")
        n = int(np.frombuffer(data[:4], np.uint32)[0])
        faces.append(np.frombuffer(data[4 + 12 * n:], np.uint32).reshape(-1, 3)
                     + sum(len(v) for v in vertices))
        vertices.append(np.frombuffer(data[4:4 + 12 * n], np.float32).reshape(n, 3))
    return (np.concatenate(vertices or [np.zeros((0, 3), np.float32)]),
            np.concatenate(faces or [np.zeros((0, 3), np.uint32)]))


def largest_segments(store: str, dataset: str, k: int) -> list[int]:
    """The ``k`` largest segments of a stored label image, counted on its coarsest level
    (none for a volume over 64 Mvoxel without a pyramid: it is not read whole)."""
    from emdask.volumes import open_volume

    coarsest = open_volume(store, dataset, level=-1)
    if coarsest.size > 64e6:
        return []
    labels = coarsest.values
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts, kind="stable")[:k]]]


def manifest(segment: int, blocks: Sequence[int]) -> bytes:
    """The manifest of one segment: the fragment files of the blocks it was meshed in."""
    return json.dumps({"fragments": [f"{segment}:0:{b}" for b in sorted(blocks)]}).encode()


def meshes(segmentation: Any, chunks: Sequence[int] = (64, 256, 256),
           max_error: float | None = None, dust: int = 0) -> dict[int, Any]:
    """Meshes of every segment of a segmentation, computed block by block and joined
    (one ``zmesh.Mesh`` per segment id; vertices in nm, x-y-z).

    Parameters
    ----------
    segmentation
        (z, y, x) DataArray (voxel size and offset from its attrs) or array.
    chunks
        The blocks meshed one at a time (the result does not depend on them, up to the
        order of vertices and the simplification).
    max_error
        Simplification error allowed, nm (default: the largest voxel size; 0: none).
    dust
        Segments with fewer voxels than this in a block get no mesh there (default 0:
        every segment, whatever the blocks).
    """
    import zmesh

    pieces = per_block(segmentation, chunks, functools.partial(mesh_block,
                                                               max_error=max_error,
                                                               dust=dust))
    return {s: zmesh.Mesh.concatenate(*m) for s, m in sorted(pieces.items())}


def pieces_step(kernel, voxel_size: Sequence[float], offset: Sequence[float]):
    """The blockwise step of :func:`meshes` and :func:`emdask.skeletons.skeletons` (and of
    the pipeline's meshes and skeletons stages): ``kernel(labels, origin, voxel_size,
    offset)`` on a block plus one voxel on its high sides, giving segment id -> [piece]."""
    from emdask.blockwise import Step

    return Step("pieces", _block_pieces, None, clip=True, summary=True, reads=_high_sides,
                params={"kernel": kernel, "voxel_size": tuple(float(v) for v in voxel_size),
                        "offset": tuple(float(o) for o in offset)})


def _high_sides(box, shape, **_):
    """The block and one voxel beyond its high sides (within the volume)."""
    from emdask.geometry import Box

    return Box(box.begin, tuple(min(e + 1, n) for e, n in zip(box.end, shape, strict=True)))


def _block_pieces(labels: np.ndarray, where, kernel, voxel_size, offset) -> dict:
    return {s: [p] for s, p in kernel(labels, where.box.begin, voxel_size, offset).items()}


def _joined_pieces(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:  # in block order
        for segment, pieces in part.items():
            out.setdefault(segment, []).extend(pieces)
    return out


def per_block(segmentation: Any, chunks: Sequence[int], kernel) -> dict[int, list]:
    """``kernel(labels, origin, voxel_size, offset)`` on every block plus one voxel on its
    high sides (how both meshes and skeletons are computed), its per-segment results
    collected: segment id -> the pieces of its blocks, in block order."""
    import dask.array as da

    from emdask.blockwise import map_reduce

    attrs = getattr(segmentation, "attrs", {})
    step = pieces_step(kernel, attrs.get("voxel_size", (1.0, 1.0, 1.0)),
                       attrs.get("offset", (0.0, 0.0, 0.0)))
    data = da.asarray(_as_labels(segmentation)).rechunk(tuple(chunks))
    return map_reduce(step, _joined_pieces, [data]).compute()
