"""Dask graphs of blockwise solves: a task per block, a task per face between neighbouring
blocks, one global task that sees them all, and a task per block that applies its answer.

Segmentation (:func:`emdask.segment`) and synapse objects (:func:`emdask.find_synapses`)
both have this shape.  Built with ``dask.delayed``, such a graph takes time quadratic in the
number of blocks, because every call merges the graphs of all its arguments and the output
tasks all depend on the global task (109 s for 1728 blocks).  :class:`BlockGraph` writes the
tasks into one dict instead: linear time, and one layer for Dask to schedule.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

__all__ = ["BlockGraph", "map_reduce"]


def _constant(value: Any) -> Any:
    return value


class BlockGraph:
    """Tasks over the blocks of a 3-D chunk grid, collected into one Dask graph.

    Parameters
    ----------
    name
        Prefix of the task keys (a unique suffix is added).
    chunks
        The three spatial chunk tuples: the blocks.
    dependency
        Optional Dask collection whose keys tasks refer to (for example a block input).

    Tasks are ``func(*values of keys, **literals)``: positional arguments are keys (or lists
    of keys) of this graph or of ``dependency``, resolved by Dask; everything else is passed
    by keyword, untouched.
    """

    def __init__(self, name: str, chunks, dependency: Any = None):
        self.name = f"{name}-{uuid.uuid4().hex[:16]}"
        self.chunks = tuple(tuple(int(c) for c in cs) for cs in chunks)
        self.grid = tuple(len(c) for c in self.chunks)
        self.starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int)
                       for c in self.chunks]
        self.ids = np.arange(int(np.prod(self.grid))).reshape(self.grid)
        self.dependency = dependency
        self.tasks: dict = {}
        self._frozen = False  # collections made: their layer must not change afterwards

    # ---------------------------------------------------------------- the grid
    def blocks(self) -> Iterator[tuple[tuple, int, tuple, tuple]]:
        """``(index, id, origin, shape)`` of every block, in C order."""
        for idx in np.ndindex(*self.grid):
            origin = tuple(int(self.starts[d][idx[d]]) for d in range(3))
            shape = tuple(self.chunks[d][idx[d]] for d in range(3))
            yield idx, int(self.ids[idx]), origin, shape

    def faces(self) -> Iterator[tuple[tuple, tuple, int]]:
        """``(lower index, upper index, axis)`` of every pair of face neighbours."""
        for idx in np.ndindex(*self.grid):
            for d in range(3):
                if idx[d] > 0:
                    yield tuple(i - (k == d) for k, i in enumerate(idx)), idx, d

    # ---------------------------------------------------------------- tasks
    def _put(self, step: str, index: tuple, task: tuple) -> tuple:
        if self._frozen:
            raise RuntimeError("add every task before making arrays or delayeds of the graph")
        key = (f"{self.name}-{step}", *index)
        self.tasks[key] = task
        return key

    def add(self, step: str, index: tuple, func: Callable, *keys, **literals) -> tuple:
        """Add the task ``func(*keys, **literals)``; return its key."""
        return self._put(step, index, (partial(func, **literals) if literals else func, *keys))

    def constant(self, step: str, index: tuple, value: Any) -> tuple:
        """A task that returns ``value`` (for a small per-block object, passed as is)."""
        return self._put(step, index, (partial(_constant, value),))

    def item(self, step: str, index: tuple, key: tuple, i: int) -> tuple:
        """A task that picks element ``i`` of the tuple a task returns."""
        return self._put(step, index, (operator.getitem, key, int(i)))

    def solve(self, inputs: dict, summarize: Callable, link: Callable, solve: Callable, *,
              summary_args: dict, link_args: dict, solve_args: dict) -> tuple:
        """The blockwise-solve pattern; returns the key of the global task.

        Per block, ``summarize(inputs[idx], origin=..., **summary_args)`` returns
        ``(part_a, part_b, faces)``; per pair of face neighbours,
        ``link(faces of the upper block, faces of the lower, d=axis, **link_args)``; once,
        ``solve([part_a...], [part_b...], [link...], pairs=[(lower id, upper id)...],
        **solve_args)``, blocks in C order.  Only the faces travel to the face tasks.
        """
        parts = {}
        for idx, _, origin, _ in self.blocks():
            s = self.add("summary", idx, summarize, inputs[idx], origin=origin, **summary_args)
            parts[idx] = [self.item(f"summary{i}", idx, s, i) for i in range(3)]
        links, pairs = [], []
        for below, idx, d in self.faces():
            links.append(self.add("face", (*idx, d), link, parts[idx][2], parts[below][2],
                                  d=d, **link_args))
            pairs.append((int(self.ids[below]), int(self.ids[idx])))
        order = list(np.ndindex(*self.grid))
        return self.add("solve", (), solve, [parts[i][0] for i in order],
                        [parts[i][1] for i in order], links, pairs=pairs, **solve_args)

    # ---------------------------------------------------------------- collections
    def _graph(self, name: str | None = None, layer: dict | None = None) -> HighLevelGraph:
        self._frozen = True  # every collection of this graph sees the same tasks
        layers, deps = {self.name: self.tasks}, {self.name: set()}
        if self.dependency is not None:
            hlg = self.dependency.__dask_graph__()
            if not isinstance(hlg, HighLevelGraph):
                hlg = HighLevelGraph.from_collections(
                    self.dependency.__dask_layers__()[0], hlg, dependencies=())
            layers.update(hlg.layers)
            deps.update(hlg.dependencies)
            deps[self.name] = set(self.dependency.__dask_layers__())
        if name is not None:
            layers[name], deps[name] = layer, {self.name}
        return HighLevelGraph(layers, deps)

    def array(self, step: str, keys: dict, dtype, item: int | None = None) -> da.Array:
        """A Dask array on the grid whose block ``idx`` is the value of ``keys[idx]``
        (its element ``item`` if the task returns a tuple)."""
        name = f"{self.name}-{step}"
        if any(k[0] == name for k in self.tasks):
            raise ValueError(f"array step {step!r} is also the name of tasks")
        layer = {(name, *idx): (operator.getitem, keys[idx], item) if item is not None
                 else (_constant, keys[idx]) for idx in np.ndindex(*self.grid)}
        return da.Array(self._graph(name, layer), name, self.chunks, dtype=dtype)

    def delayed(self, key: tuple) -> Delayed:
        """The value of one task, as a Dask delayed."""
        return Delayed(key, self._graph(), layer=self.name)


def map_reduce(func: Callable, combine: Callable, arrays: list, split_every: int = 8,
               depth: int = 0, **literals) -> Delayed:
    """``func(*blocks, origin=..., **literals)`` on each block of ``arrays`` (Dask arrays
    of one chunking), the results combined ``combine(*parts)`` in a tree of fan-in
    ``split_every``: the pattern of a blockwise table or score, memory bounded by a block
    and the combined result.  Returns the result as a delayed.

    With ``depth``, each block comes with up to ``depth`` voxels of its neighbours on every
    spatial side (the last three axes; none beyond the volume), ``origin`` is where that
    padded block begins, and ``func`` also gets ``box=(begin, end)``: the block proper, in
    the volume's voxels, so that it can count what it owns exactly once."""
    import dask

    for a in arrays[1:]:
        if a.chunks[-3:] != arrays[0].chunks[-3:] or a.numblocks[:-3] != (1,) * (a.ndim - 3):
            raise ValueError("map_reduce needs arrays of one chunking")
    chunks = arrays[0].chunks[-3:]
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in chunks]
    if depth:
        arrays = [da.overlap.overlap(a, depth={k: depth if k >= a.ndim - 3 else 0
                                               for k in range(a.ndim)}, boundary="none")
                  for a in arrays]
    blocks = [a.to_delayed().reshape(a.numblocks[-3:]) for a in arrays]
    apply = dask.delayed(partial(func, **literals), pure=True)
    parts = []
    for idx in np.ndindex(*blocks[0].shape):
        begin = np.array([starts[d][i] for d, i in enumerate(idx)])
        extra = {}
        if depth:
            end = begin + [chunks[d][i] for d, i in enumerate(idx)]
            extra = {"box": (tuple(int(b) for b in begin), tuple(int(e) for e in end))}
            begin = np.maximum(begin - depth, 0)
        parts.append(apply(*(b[idx] for b in blocks), origin=tuple(int(b) for b in begin),
                           **extra))
    merge = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i:i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]
