"""Blockwise steps, defined once and run by two executors.

A :class:`Step` is what a stage does to one block: an in-memory kernel, the halo of input
it needs around the block, how much finer its inputs are than its output, and the
output's dtype and channels.  The protocol is always the same: read the block's box plus
halo from each input (zeros beyond the volume, :func:`emdask.volumes.read_box`), run the
kernel, and write the box.  Two executors run a step:

- :func:`apply`: a lazy Dask array for the library API and notebooks.  Each output block
  is one task that depends only on the input chunks its box plus halo touches (any halo,
  any chunking: nothing is overlapped first, and only channel axes are put in one chunk).
- :func:`write_blocks`: one task of ``emdask run``, which reads from the store, writes the
  output's chunks and marks each block done (the pipeline's resumable runner submits
  these tasks).

Both call :meth:`Step.compute` on the same boxes, so the library and the pipeline give
the same voxels.  Steps whose blocks give a summary rather than voxels (a table, counts)
are reduced in a tree by :func:`map_reduce`, and global solves (a task per block, per
face, one global task, a task per block applying its answer) are written as one graph by
:class:`BlockGraph`.
"""

from __future__ import annotations

import itertools
import operator
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from emdask.geometry import Box, Grid
from emdask.volumes import box_inside, read_box

__all__ = ["COPY", "BlockGraph", "Step", "StoredBlock", "Where", "apply", "block_data",
           "map_reduce", "summary_step", "write_blocks"]


@dataclass(frozen=True)
class Where:
    """Where a kernel's block lies: the output ``box`` and the output volume's spatial
    ``shape``; per input, in the input's voxels with its offset taken off (the output's
    frame unless the step has a ``scale``), the box that the block needs (``read``, halo
    excluded) and where the data given begins (``origin``); and the part of the data given
    that lies inside the input (``inside``, slices; zeros beyond)."""

    box: Box
    shape: tuple
    read: tuple
    origin: tuple
    inside: tuple


@dataclass(frozen=True)
class Step:
    """One blockwise step.

    Parameters
    ----------
    name
        What it makes (names its Dask tasks).
    kernel
        ``kernel(*inputs, where=Where, **params) -> np.ndarray``: each input is the output
        box in the input's voxels (times ``scale``, moved by the input's offset) grown by
        its halo, zeros beyond the input, leading channel axes whole; returns the block
        (``channels`` first if set).
    dtype
        The output's dtype (None: the kernel's).
    halo
        Input voxels needed beyond the box on each side (z, y, x); or one such halo per
        input.
    scale
        Input voxels per output voxel (a pyramid level's factors; 1 otherwise).
    channels
        Length of the output's leading channel axis; None for a (z, y, x) output.
    clip
        Give only the part of the box plus halo inside the input (no zero padding beyond
        its edge; ``where.origin`` says where the data begins): for a partial group of
        voxels to downsample at the edge, or a filter that extends the volume's edge
        (``mode="nearest"``), whose result then equals one pass over the whole volume.
    reads
        ``reads(box, shape, **params) -> Box``: the input box that the output ``box`` of a
        volume of ``shape`` needs, where it depends on data (an alignment's fields; an
        empty box where it needs nothing); default ``box`` times ``scale``.
    summary
        The kernel returns a summary of the block (any object: a table, counts), not the
        block's voxels: for :func:`map_reduce`.
    params
        Further keyword arguments of the kernel (small, picklable).
    """

    name: str
    kernel: Callable[..., np.ndarray]
    dtype: Any
    halo: tuple = (0, 0, 0)
    scale: tuple = (1, 1, 1)
    channels: int | None = None
    clip: bool = False
    reads: Callable[..., Box] | None = None
    summary: bool = False
    params: dict = field(default_factory=dict)

    def halo_of(self, i: int) -> tuple:
        """The halo of input ``i``."""
        return tuple(self.halo[i] if isinstance(self.halo[0], Sequence) else self.halo)

    def input_box(self, box: Box, shape: Sequence[int], offset: Sequence[int] = (0, 0, 0)
                  ) -> Box:
        """The box of input voxels (halo excluded) that the output ``box`` of a volume of
        ``shape`` needs from an input whose voxel ``offset`` is the output's first."""
        return (self.reads(box, tuple(shape), **self.params) if self.reads is not None
                else box.scale(self.scale)).shift(offset)

    def _reading(self, i: int, box: Box, in_shape: Sequence[int], shape: Sequence[int],
                 offset: Sequence[int]) -> tuple[Box, Box, tuple]:
        """What input ``i`` gives the block: the box it needs, the box read (with halo,
        clipped to the input if ``clip``) and the halo read_box pads around that."""
        want = self.input_box(box, shape, offset)
        halo = self.halo_of(i)
        if not self.clip:
            return want, want, halo
        return want, want.grow(halo).intersect(Box((0, 0, 0), in_shape[-3:])), (0, 0, 0)

    def compute(self, box: Box, inputs: Sequence[Any], shape: Sequence[int],
                offsets: Sequence | None = None, cache: Sequence | None = None
                ) -> np.ndarray:
        """The output block at ``box`` of a volume of (output) ``shape``, its inputs read
        from array-likes.  ``offsets``: per input, its voxel where the output's first
        lies (default 0: context beyond a region of interest is read from the input where
        it has data); ``cache``: per input, a token for :func:`read_box`'s cache."""
        data, read, origin, inside = [], [], [], []
        for i, source in enumerate(inputs):
            offset = (0, 0, 0) if offsets is None else tuple(offsets[i])
            back = [-o for o in offset]
            want, got, pad = self._reading(i, box, source.shape, shape, offset)
            data.append(read_box(source, got.begin, got.end, pad,
                                 cache=None if cache is None else cache[i]))
            read.append(want.shift(back))
            origin.append(got.grow(pad).shift(back).begin)
            inside.append(box_inside(source.shape[-3:], got.begin, got.end, pad))
        return self.run(data, Where(box, tuple(shape), tuple(read), tuple(origin),
                                    tuple(inside)))

    def run(self, data: Sequence[np.ndarray], where: Where) -> np.ndarray:
        """The kernel on inputs already read; checks what it returns."""
        out = self.kernel(*data, where=where, **self.params)
        if self.summary:
            return out
        out = np.asarray(out)
        want = ((self.channels,) if self.channels is not None else ()) + where.box.shape
        if out.shape != want:
            raise RuntimeError(f"step {self.name!r} returned a block of shape {out.shape} "
                               f"for box {where.box}, not {want}: a bug")
        return out if self.dtype is None else out.astype(self.dtype, copy=False)


def _copy(data: np.ndarray, where: Where) -> np.ndarray:
    return data


#: The block as it is (a copy of a region of interest into the store).
COPY = Step("copy", _copy, None)


# ---------------------------------------------------------------- the lazy executor
class _Pieces:
    """The input chunks a block's box touches, as an array-like over the whole input:
    :func:`read_box` reads a block plus halo from it as from a stored volume."""

    def __init__(self, shape: tuple, dtype, origins: list, arrays: Sequence[np.ndarray]):
        self.shape, self.dtype = shape, dtype
        self.pieces = list(zip(origins, arrays, strict=True))

    def __getitem__(self, key: tuple) -> np.ndarray:
        lead, box = key[:-3], key[-3:]
        lo = [s.start for s in box]
        hi = [s.stop for s in box]
        out = np.zeros(self.shape[:-3] + tuple(b - a for a, b in zip(lo, hi, strict=True)),
                       self.dtype)
        for origin, arr in self.pieces:
            end = [o + n for o, n in zip(origin, arr.shape[-3:], strict=True)]
            src = tuple(slice(max(a, o) - o, min(b, e) - o)
                        for a, b, o, e in zip(lo, hi, origin, end, strict=True))
            if any(s.stop <= s.start for s in src):
                continue
            dst = tuple(slice(max(a, o) - a, min(b, e) - a)
                        for a, b, o, e in zip(lo, hi, origin, end, strict=True))
            out[(*lead, *dst)] = arr[(*lead, *src)]
        return out


def _block(box: Box, shape: tuple, layout: list, offsets, step: Step, *pieces
           ) -> np.ndarray:
    """One output block from the input chunks it depends on (``layout``: per input, its
    shape, dtype and the origins of the chunks given, in order)."""
    inputs, k = [], 0
    for in_shape, dtype, origins in layout:
        inputs.append(_Pieces(in_shape, dtype, origins, pieces[k:k + len(origins)]))
        k += len(origins)
    return step.compute(box, inputs, shape, offsets)


def _touching(starts: list, want: Box) -> list[tuple]:
    """Grid indices of the chunks that a box meets (``starts``: per axis, where each
    chunk begins, then the end)."""
    ranges = []
    for d in range(3):
        s = starts[d]
        lo = max(0, int(np.searchsorted(s, want.begin[d], side="right")) - 1)
        hi = min(len(s) - 1, int(np.searchsorted(s, want.end[d], side="left")))
        ranges.append(range(lo, hi))
    return list(itertools.product(*ranges))


def _block_tasks(step: Step, inputs: Sequence[da.Array], grid: Grid, name: str,
                 offsets: Sequence | None, index: Callable[[int], tuple]) -> dict:
    """A graph layer of one task per block of ``grid`` (keyed ``index(block)``), each
    depending on the step (one task of its own, not a copy in every task) and on the
    input chunks its box plus halo touches."""
    starts = [[np.concatenate([[0], np.cumsum(c)]).astype(int) for c in x.chunks[-3:]]
              for x in inputs]
    lead = [(0,) * (x.ndim - 3) for x in inputs]
    step_key = (f"{name}-step",)
    layer: dict = {step_key: step}
    for block, box in enumerate(grid.boxes()):
        keys, layout = [], []
        for i, (x, st, ld) in enumerate(zip(inputs, starts, lead, strict=True)):
            _, got, pad = step._reading(i, box, x.shape, grid.shape, (0, 0, 0)
                                        if offsets is None else offsets[i])
            need = got.grow(pad)
            touched = [] if need.empty else _touching(st, need)
            keys += [(x.name, *ld, *idx) for idx in touched]
            layout.append((x.shape, x.dtype,
                           [tuple(int(st[d][i]) for d, i in enumerate(idx)) for idx in touched]))
        layer[index(block)] = (partial(_block, box, grid.shape, layout, offsets), step_key,
                               *keys)
    return layer


def _whole_channels(inputs: Sequence[da.Array]) -> tuple:
    """Leading channel axes in one chunk (a block task reads them whole)."""
    return tuple(x.rechunk({i: -1 for i in range(x.ndim - 3)}) if x.ndim > 3 else x
                 for x in inputs)


def apply(step: Step, *inputs: da.Array, shape: Sequence[int] | None = None,
          chunks: Sequence | None = None, offsets: Sequence | None = None) -> da.Array:
    """The step over whole volumes, lazily: one task per output block.

    Parameters
    ----------
    step
        The step.
    inputs
        Dask arrays (spatial axes last; leading channel axes are read whole).
    shape
        The output's spatial shape; default the first input's divided by ``step.scale``
        (rounded up).
    chunks
        The output's blocks: a block size (per axis) or Dask-style tuples; default the
        first input's chunks (their largest size divided by ``step.scale`` where it has
        one).
    offsets
        Per input, its voxel where the output's first lies (default 0).

    Returns
    -------
    dask.array.Array
        (``channels``,) + shape, chunked as the blocks (channels in one chunk).
    """
    if not inputs:
        raise ValueError(f"step {step.name!r} needs at least one input")
    first = inputs[0]
    scale = np.asarray(step.scale)
    if shape is None:
        shape = tuple(-(-np.asarray(first.shape[-3:]) // scale))
    if chunks is None and not (scale > 1).any():
        chunks = first.chunks[-3:]
    elif chunks is None:
        chunks = tuple(max(1, int(c) // int(k)) for c, k in zip(first.chunksize[-3:], scale,
                                                                strict=True))
    if isinstance(chunks, int | np.integer):
        chunks = (int(chunks),) * 3
    grid = Grid(tuple(int(n) for n in shape), tuple(chunks))
    name = f"{step.name}-{uuid.uuid4().hex[:16]}"
    inputs = _whole_channels(inputs)
    lead = (0,) if step.channels is not None else ()
    layer = _block_tasks(step, inputs, grid, name, offsets,
                         lambda block: (name, *lead, *grid.index(block)))
    graph = HighLevelGraph.from_collections(name, layer, dependencies=inputs)
    out_chunks = (((step.channels,),) if step.channels is not None else ()) + grid.sizes
    dtype = inputs[0].dtype if step.dtype is None else np.dtype(step.dtype)
    return da.Array(graph, name, out_chunks, meta=np.empty((0,) * len(out_chunks), dtype))


def _summarize(*data: np.ndarray, where: Where, func: Callable, depth: bool) -> Any:
    extra = {"box": (where.box.begin, where.box.end)} if depth else {}
    return func(*data, origin=tuple(where.origin[0]), **extra)


def summary_step(func: Callable, depth: int | Sequence[int] = 0, pad: bool = False,
                 **literals) -> Step:
    """The step that :func:`map_reduce` runs on each block (arguments as there): for a
    pipeline task to summarize a stored block exactly as the library does."""
    halo = tuple(int(d) for d in depth) if isinstance(depth, Sequence) else (int(depth),) * 3
    return Step(getattr(func, "__name__", "summary").strip("_"), _summarize, None,
                halo=halo, clip=not pad, summary=True,
                params={"func": partial(func, **literals), "depth": any(halo)})


def map_reduce(func: Callable | Step, combine: Callable, arrays: Sequence[da.Array],
               split_every: int = 8, depth: int | Sequence[int] = 0, pad: bool = False,
               **literals) -> Delayed:
    """``func(*blocks, origin=..., **literals)`` on each block of ``arrays`` (the blocks
    of the first array's chunks), the results combined ``combine(*parts)`` in a tree of
    fan-in ``split_every``: the pattern of a blockwise table or score, memory bounded by
    a block and the combined result.  Returns the result as a delayed.

    With ``depth`` (voxels, or voxels per axis), each block comes with up to ``depth``
    voxels of its neighbours on every spatial side (the last three axes; none beyond the
    volume, or zeros there with ``pad``), ``origin`` is where that padded block begins,
    and ``func`` also gets ``box=(begin, end)``: the block proper, in the volume's voxels,
    so that it can count what it owns exactly once.  ``literals`` are one task of the
    graph, not a copy per block.  ``func`` may also be a step of :func:`summary_step`
    (then ``depth``, ``pad`` and ``literals`` are its own)."""
    arrays = _whole_channels(arrays)
    first = arrays[0]
    for a in arrays[1:]:
        if a.shape[-3:] != first.shape[-3:]:
            raise ValueError(f"map_reduce needs arrays of one shape, got {first.shape[-3:]} "
                             f"and {a.shape[-3:]}")
    step = func if isinstance(func, Step) else summary_step(func, depth, pad, **literals)
    grid = Grid(first.shape[-3:], first.chunks[-3:])
    name = f"{step.name}-{uuid.uuid4().hex[:16]}"
    layer = _block_tasks(step, arrays, grid, name, None, lambda block: (name, block))
    parts, level = [(name, b) for b in range(len(grid))], 0
    while len(parts) > 1:  # the tree of combines
        level += 1
        merged = []
        for i in range(0, len(parts), split_every):
            key = (f"{name}-combine", level, i // split_every)
            layer[key] = (combine, *parts[i:i + split_every])
            merged.append(key)
        parts = merged
    graph = HighLevelGraph.from_collections(name, layer, dependencies=arrays)
    return Delayed(parts[0], graph, layer=name)


# ---------------------------------------------------------------- the stored executor
def write_blocks(step: Step, boxes: Sequence[Box], inputs: Sequence[Any], out: Any,
                 shape: Sequence[int] | None = None, offsets: Sequence | None = None,
                 cache: Sequence | None = None, done: Callable[[int], None] | None = None
                 ) -> None:
    """Compute the blocks ``boxes`` of an output array-like ``out`` (a zarr array) in one
    go and write them, calling ``done(i)`` after the ``i``-th block's chunks are written
    (``offsets``, ``cache``: as :meth:`Step.compute`).

    Neighbouring blocks computed together (their hull box) read and compute the halo
    between them once: a net's context is large.  Each block is written and marked on its
    own, so an interrupted task leaves at most one block written but unmarked."""
    shape = tuple(out.shape[-3:]) if shape is None else tuple(shape)
    hull = boxes[0]
    for b in boxes[1:]:
        hull = hull.hull(b)
    data = step.compute(hull, inputs, shape, offsets, cache)
    lead = (slice(None),) * (data.ndim - 3)
    for i, box in enumerate(boxes):
        out[(*lead, *box.slices())] = data[(*lead, *box.slices(hull.begin))]
        if done is not None:
            done(i)


# ---------------------------------------------------------------- graphs of global solves
@dataclass(frozen=True)
class StoredBlock:
    """A block plus halo still in its file, read by the task that needs it."""

    source: Any
    box: Box
    halo: tuple
    cache: Any = None  # a token naming the unchanging input for read_box's chunk cache

    def read(self) -> np.ndarray:
        return read_box(self.source, self.box.begin, self.box.end, self.halo,
                        cache=self.cache)


def block_data(block: Any) -> np.ndarray:
    """A task's input block: read now if it is a :class:`StoredBlock`."""
    return block.read() if isinstance(block, StoredBlock) else block


def _as_read(data: np.ndarray, where: Where) -> np.ndarray:
    return data


def _on_read(*blocks: Any, what: Step, box: Box, shape: tuple) -> Any:
    """Step ``what`` at ``box`` on blocks that :meth:`BlockGraph.read` gave: the box plus
    the step's halo of each input, zeros beyond the volume (of ``shape``, the inputs'
    too)."""
    data = [block_data(b) for b in blocks]
    halos = [what.halo_of(i) for i in range(len(data))]
    return what.run(data, Where(box, shape, (box,) * len(data),
                                tuple(box.grow(h).begin for h in halos),
                                tuple(box_inside(shape, box.begin, box.end, h)
                                      for h in halos)))


# Segmentation (emdask.segment) and synapse objects (emdask.find_synapses) have the shape
# of a solve: a task per block, a task per face between neighbouring blocks, one global
# task that sees them all, and a task per block that applies its answer.  Built with
# dask.delayed, such a graph takes time quadratic in the number of blocks, because every
# call merges the graphs of all its arguments and the output tasks all depend on the
# global task (109 s for 1728 blocks); BlockGraph writes the tasks into one dict instead:
# linear time, and one layer for Dask to schedule.
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
    of keys) of this graph or of ``dependency`` (or of what :meth:`read` reads), resolved
    by Dask; everything else is passed by keyword, untouched.
    """

    def __init__(self, name: str, chunks, dependency: Any = None):
        self.name = f"{name}-{uuid.uuid4().hex[:16]}"
        self.chunks = tuple(tuple(int(c) for c in cs) for cs in chunks)
        self.grid = tuple(len(c) for c in self.chunks)
        self.starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int)
                       for c in self.chunks]
        self.ids = np.arange(int(np.prod(self.grid))).reshape(self.grid)
        self.dependencies = [] if dependency is None else [dependency]
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

    def read(self, step: str, source: Any, halo: Sequence[int], cache: Any = None
             ) -> dict[tuple, tuple]:
        """Per block (grid index), the key of its box plus ``halo`` of ``source`` (zeros
        beyond the volume; leading channel axes whole), for tasks to take as input.

        A Dask array's block is assembled from the chunks it touches (any chunking); Dask
        holds it until every task using it has run.  An array-like in a file (zarr, HDF5)
        gives a :class:`StoredBlock` instead, read by each task that uses it (decoded chunks
        cached per worker under ``cache``), so nothing is held between passes over it;
        tasks take either through :func:`block_data`."""
        grid = Grid(tuple(source.shape[-3:]), self.chunks)
        name = f"{self.name}-{step}"
        if not isinstance(source, da.Array):
            for idx, _, origin, size in self.blocks():
                box = Box(origin, tuple(o + n for o, n in zip(origin, size, strict=True)))
                self._put(step, idx, (partial(_constant, StoredBlock(source, box, tuple(halo),
                                                                     cache)),))
            return {idx: (name, *idx) for idx in np.ndindex(*self.grid)}
        if self._frozen:
            raise RuntimeError("add every task before making arrays or delayeds of the graph")
        (source,) = _whole_channels([source])
        window = Step(step, _as_read, None, halo=tuple(halo), summary=True)
        self.tasks.update(_block_tasks(window, [source], grid, name, None,
                                       lambda block: (name, *grid.index(block))))
        self.dependencies.append(source)
        return {idx: (name, *idx) for idx in np.ndindex(*self.grid)}

    def add(self, step: str, index: tuple, func: Callable, *keys, **literals) -> tuple:
        """Add the task ``func(*keys, **literals)``; return its key."""
        return self._put(step, index, (partial(func, **literals) if literals else func, *keys))

    def constant(self, step: str, index: tuple, value: Any) -> tuple:
        """A task that returns ``value`` (for a small per-block object, passed as is)."""
        return self._put(step, index, (partial(_constant, value),))

    def item(self, step: str, index: tuple, key: tuple, i: int) -> tuple:
        """A task that picks element ``i`` of the tuple a task returns."""
        return self._put(step, index, (operator.getitem, key, int(i)))

    def step(self, name: str, step: Step, inputs: Sequence[dict], shape: Sequence[int]
             ) -> dict[tuple, tuple]:
        """Per block (grid index), the key of a task that runs ``step`` on its box: the
        same as :meth:`Step.compute` there, from blocks already read (``inputs``: per
        input of the step, the keys :meth:`read` gave for it with the step's halo)."""
        shape = tuple(int(n) for n in shape)
        keys = {}
        for idx, _, origin, size in self.blocks():
            box = Box(origin, tuple(o + n for o, n in zip(origin, size, strict=True)))
            keys[idx] = self.add(name, idx, _on_read, *[inp[idx] for inp in inputs],
                                 what=step, box=box, shape=shape)
        return keys

    def solve(self, summaries: dict, link: Callable, solve: Callable, *, link_args: dict,
              solve_args: dict) -> tuple:
        """The blockwise-solve pattern; returns the key of the global task.

        Per block, ``summaries[idx]`` is the key of a task (a :meth:`step`) that returns
        ``(part_a, part_b, faces)``; per pair of face neighbours,
        ``link(faces of the upper block, faces of the lower, d=axis, **link_args)``; once,
        ``solve([part_a...], [part_b...], [link...], pairs=[(lower id, upper id)...],
        **solve_args)``, blocks in C order.  Only the faces travel to the face tasks.
        """
        parts = {idx: [self.item(f"summary{i}", idx, key, i) for i in range(3)]
                 for idx, key in summaries.items()}
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
        for dependency in self.dependencies:
            hlg = dependency.__dask_graph__()
            if not isinstance(hlg, HighLevelGraph):
                hlg = HighLevelGraph.from_collections(
                    dependency.__dask_layers__()[0], hlg, dependencies=())
            layers.update(hlg.layers)
            deps.update(hlg.dependencies)
            deps[self.name] |= set(dependency.__dask_layers__())
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
