"""Boxes and block grids: the one vocabulary of where a block lies.

A :class:`Box` is a region of voxels ``[begin, end)`` on the three spatial axes (z, y, x),
in the spirit of funlib.geometry's ``Roi``; a :class:`Grid` cuts a volume's shape into
blocks, each a box.  Every blockwise step (:mod:`emdask.blockwise`) and the pipeline speak
in these, so block geometry is computed in one place and one convention: C order of block
indices, end exclusive, the last block of an axis cut at the volume's edge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "Grid"]


def _three(values: Sequence, what: str) -> tuple[int, int, int]:
    out = tuple(int(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{what} must have 3 values (z, y, x), got {tuple(values)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Box:
    """Voxels ``[begin, end)`` of the spatial axes (z, y, x)."""

    begin: tuple[int, int, int]
    end: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "begin", _three(self.begin, "begin"))
        object.__setattr__(self, "end", _three(self.end, "end"))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(max(0, e - b) for b, e in zip(self.begin, self.end, strict=True))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, halo: Sequence[int]) -> Box:
        """The box widened by ``halo`` voxels on both sides of each axis."""
        h = _three(halo, "halo")
        return Box(tuple(b - k for b, k in zip(self.begin, h, strict=True)),
                   tuple(e + k for e, k in zip(self.end, h, strict=True)))

    def shift(self, offset: Sequence[int]) -> Box:
        o = _three(offset, "offset")
        return Box(tuple(b + k for b, k in zip(self.begin, o, strict=True)),
                   tuple(e + k for e, k in zip(self.end, o, strict=True)))

    def intersect(self, other: Box) -> Box:
        """The common part (an empty box where there is none, inside ``other``'s range on
        every axis)."""
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        begin = tuple(min(max(a, b), e) for a, b, e in zip(self.begin, other.begin, end,
                                                           strict=True))
        return Box(begin, tuple(max(b, e) for b, e in zip(begin, end, strict=True)))

    def hull(self, other: Box) -> Box:
        """The smallest box holding both."""
        return Box(tuple(min(a, b) for a, b in zip(self.begin, other.begin, strict=True)),
                   tuple(max(a, b) for a, b in zip(self.end, other.end, strict=True)))

    def scale(self, factors: Sequence[int]) -> Box:
        """The box in the voxels of a volume ``factors`` times finer (a pyramid level's
        block in the level below)."""
        f = _three(factors, "factors")
        return Box(tuple(b * k for b, k in zip(self.begin, f, strict=True)),
                   tuple(e * k for e, k in zip(self.end, f, strict=True)))

    def slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
        """Slices of the box in an array whose first voxel is at ``origin``."""
        return tuple(slice(b - o, e - o) for b, e, o in zip(self.begin, self.end,
                                                            _three(origin, "origin"),
                                                            strict=True))

    def to_nm(self, voxel_size: Sequence[float], offset: Sequence[float] = (0, 0, 0)
              ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Begin and end in nm, for a volume of ``voxel_size`` whose first voxel lies at
        ``offset`` nm."""
        vs, off = np.asarray(voxel_size, float), np.asarray(offset, float)
        return (tuple((off + vs * self.begin).tolist()), tuple((off + vs * self.end).tolist()))

    def __str__(self) -> str:
        return f"[{list(self.begin)}, {list(self.end)})"


@dataclass(frozen=True)
class Grid:
    """The blocks of a ``shape`` volume (z, y, x) cut into ``chunks`` voxels (the last
    block of an axis cut at the edge).  ``chunks`` is a block size per axis, or, as Dask
    gives it, a tuple of block sizes per axis."""

    shape: tuple
    chunks: tuple

    def __post_init__(self):
        shape = _three(self.shape, "shape")
        chunks = tuple(tuple(int(c) for c in cs) if isinstance(cs, Sequence) else int(cs)
                       for cs in self.chunks)
        if len(chunks) != 3:
            raise ValueError(f"chunks must have 3 entries (z, y, x), got {self.chunks}")
        for n, cs in zip(shape, chunks, strict=True):
            if isinstance(cs, tuple) and sum(cs) != n:
                raise ValueError(f"chunks {self.chunks} do not add up to shape {shape}")
            if isinstance(cs, int) and cs < 1:
                raise ValueError(f"chunks must be positive, got {self.chunks}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "chunks", chunks)
        # where each block begins, per axis with explicit sizes (not part of eq/hash)
        object.__setattr__(self, "_starts", tuple(
            tuple(int(v) for v in np.cumsum((0,) + cs[:-1])) if isinstance(cs, tuple) else ()
            for cs in chunks))

    @classmethod
    def of(cls, array) -> Grid:
        """The grid of an array's storage (zarr) or Dask chunks, on its last three axes."""
        return cls(tuple(array.shape[-3:]), tuple(array.chunks[-3:]))

    def _sizes(self, axis: int) -> tuple[int, ...]:
        cs, n = self.chunks[axis], self.shape[axis]
        if isinstance(cs, tuple):
            return cs
        return tuple(min(cs, n - i) for i in range(0, n, cs)) or (0,)

    @property
    def sizes(self) -> tuple[tuple[int, ...], ...]:
        """Block sizes per axis (Dask's ``chunks``)."""
        return tuple(self._sizes(d) for d in range(3))

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(len(self._sizes(d)) for d in range(3))

    def __len__(self) -> int:
        return int(np.prod(self.counts))

    def index(self, block: int) -> tuple[int, int, int]:
        """Grid index (z, y, x) of a block id (C order)."""
        return tuple(int(i) for i in np.unravel_index(int(block), self.counts))

    def id(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.counts))

    def box(self, block: int) -> Box:
        idx = self.index(block)
        begin, end = [], []
        for d in range(3):
            cs = self.chunks[d]
            if isinstance(cs, int):
                b = idx[d] * cs
                begin.append(b)
                end.append(min(b + cs, self.shape[d]))
            else:
                begin.append(self._starts[d][idx[d]])
                end.append(begin[-1] + cs[idx[d]])
        return Box(begin, end)

    def boxes(self) -> Iterator[Box]:
        """Every block's box, in C order of block ids."""
        for block in range(len(self)):
            yield self.box(block)

    def neighbour(self, block: int, axis: int) -> int | None:
        """The block below ``block`` along ``axis`` (None at the volume's start)."""
        idx = list(self.index(block))
        if idx[axis] == 0:
            return None
        idx[axis] -= 1
        return self.id(idx)

    def extent(self) -> Box:
        """The whole volume."""
        return Box((0, 0, 0), self.shape)
