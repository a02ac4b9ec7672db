"""``emdask run CONFIG``: raw EM to segmentation, resumable, on any Dask cluster.

Stages, in order (each can be run alone with ``--stage``)::

    align        (with an [align] section) fields, then the aligned stack raw/s0 and
                 its missing-data mask raw/labels/defects/s0
    predict      raw -> affinities/s0 (and a copy of the raw read into raw/s0)
    watershed    affinities -> block basins + graphs      one task per block
    agglomerate  block graphs -> lookup tables: a task per face, then a tree of boxes of
                 blocks (emdask.solve_tree) or one global solve, then a task per block
    relabel      basins + tables -> raw/labels/fragments, raw/labels/segmentation_<t>
    synapses     (with a [synapses] model) raw -> synapse_probabilities/s0 (one task per
                 block), then objects raw/labels/synapses and the tables synapses.parquet
                 and connectome.parquet (partners in the chosen segmentation)
    pyramid      downsampled levels s1, s2, ... of every image and label (viewers)
    meshes       marching cubes of one segmentation, precomputed meshes beside it
    skeletons    TEASAR skeletons of the same, joined across blocks; skeletons.parquet
    errors       (with an [errors] section) split and merge candidates, errors.parquet
    correct      the confident ones and people's edits applied: segmentation_<t>_corrected
    report       scores against ground truth (if configured), a figure (emdask.report)

This module is the orchestration: which stage runs after which, on which blocks, with
what recorded.  What a block task computes is a step of its stage's module
(:mod:`emdask.blockwise`: the same definition as the library function's); where tasks run
is :mod:`emdask.cluster`; the store's layout, markers and lease are :mod:`emdask.store`.

Every stage is a list of block tasks submitted to a ``distributed`` client.  A task reads
its block plus halo straight from the store (:func:`emdask.volumes.read_box`), so the
graph is one small task per block whatever the volume's size, and writes whole chunks.
Zarr writes whole chunk objects atomically (a local store writes a temporary file and
renames it; an object store's PUT is atomic), so no half-written chunk is ever visible.
After its writes a task leaves a marker (:mod:`emdask.store`); a rerun skips marked
blocks, so an interrupted run resumes where it stopped.  Each stage records its
parameters, the emdask version, its generation and its timings in the store's attributes,
and a rerun with different parameters is refused unless ``overwrite`` is given.  A run
holds the store's lease; :func:`verify` checks the finished blocks' chunks.

The store is a zarr v3 group of OME-Zarr images with the input's voxel size and offset
(of the region of interest), so neuroglancer and napari show outputs in place.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from emdask.cluster import (
    HELD_LEASE,
    connect,
    guarded,
    local_cluster,
    local_workers,
    make_cluster,
    progress,
    worker_memory,
)
from emdask.geometry import Box, Grid
from emdask.report import check_offsets, ground_truth, report
from emdask.run_config import (
    ClusterSpec,
    MeshSpec,
    PredictSpec,
    RunConfig,
    SegmentSpec,
    classifier_of,
    histogram_bins,
    label_datasets,
    load_run_config,
    open_configured,
    watershed_params,
)
from emdask.store import (
    CORRECTED,
    EDITS,
    LABELS,
    RAW,
    Lease,
    Problem,
    StoreBusy,
    block_chunks,
    chunk_keys,
    decode_error,
    done_blocks,
    exists,
    get_bytes,
    has,
    lease,
    load_arrays,
    mark_done,
    marked,
    meshed,
    open_root,
    put_bytes,
    quiet_listing,
    remove,
    run_record,
    save_arrays,
    stage_generation,
    unmark,
)
from emdask.store import list_keys as _list
from emdask.store import local_path as _local_path
from emdask.volumes import clear_chunk_cache

__all__ = ["STAGES", "RunConfig", "StoreBusy", "load_run_config", "local_cluster",
           "make_cluster", "run", "verify"]

#: Markers of the boxes of the tree solve (the agglomerate stage's steps).
TREE_MARKERS = "agglomerate-tree"

STAGES = ("align", "predict", "watershed", "agglomerate", "relabel", "synapses", "pyramid",
          "meshes", "skeletons", "errors", "correct", "report")


# ---------------------------------------------------------------- the store
def _array(ctx: _Context, path: str):
    """A zarr array of the output store (cached per worker process and run)."""
    return _cached_array(ctx.store, path, ctx.generation)


@functools.lru_cache(maxsize=32)
def _cached_array(url: str, path: str, generation: int):
    # every chunk is stored, zeros too: a missing chunk is then always a loss (verify)
    return open_root(url, "r+")[path].with_config({"write_empty_chunks": True})


# ---------------------------------------------------------------- blocks
@dataclass(frozen=True)
class _Context:
    """What a block task needs (small and picklable)."""

    store: str
    grid: Grid
    source: Any = None  # the input array-like (predict)
    roi_begin: tuple = (0, 0, 0)
    predict: PredictSpec | None = None
    segment: SegmentSpec | None = None
    generation: int = 0  # per run: cached zarr arrays of an earlier run are not reused
    mask: Any = None  # missing-data mask (predict: affinities touching it are 0)
    source_name: str = "raw"  # names the source in the per-worker chunk cache
    window: int = 15  # align: side of the flat squares that are missing data
    intensity: tuple | None = None  # predict: the data values taken for black and white
    stamp: str = "0"  # the stage's generation: its markers are written under it
    copy_raw: bool = False  # predict: also write the block of raw it read into raw/s0


def _slices(begin, end) -> tuple:
    return tuple(slice(b, e) for b, e in zip(begin, end, strict=True))


def _model(name: str, device: str):
    # imported here: models imports torch, which `import emdask` must not
    from emdask.models import cached_model

    return cached_model(name, device)


def _precision(spec: PredictSpec, model: str) -> str:
    """What a net computes in on this machine (``precision = "auto"`` depends on its model
    card and the hardware): recorded, so that a run resumed where it means something else
    is told that the parameters changed."""
    from emdask.models import model_card
    from emdask.predict import _torch_dtype

    try:
        card = model_card(model)
    except (ValueError, FileNotFoundError):  # named in the preflight, not here
        card = None
    return str(_torch_dtype(spec.precision, _device(spec), card)).removeprefix("torch.")


def _task_blocks(cfg: RunConfig, model, grid: Grid, client=None, tta: int | None = None
                 ) -> tuple:
    """Blocks (per axis) one prediction task computes: as many as its memory allows
    (:func:`emdask.predict.task_shape`, with ``tta`` passes: None, the card's), so little
    of the net's context is computed twice, and cut so that the worker processes (of
    ``client``'s cluster, else as configured) share the work evenly."""
    from dask.utils import parse_bytes

    from emdask.predict import _tta, task_shape

    spec, cl = cfg.predict, cfg.cluster
    budget = (0.6 * worker_memory(cl) if spec.task_memory == "auto"
              else float(parse_bytes(spec.task_memory)))
    # a process runs one net pass at a time (on all its threads): processes share the work
    if client is not None and client.nthreads():
        processes = len(set(client.run(os.getpid).values()))
    elif cl.kind == "local":
        processes = local_workers(cl) if cl.processes else 1
    else:  # an adaptive cluster may have no workers yet: as many as it may get
        processes = cl.maximum_jobs * max(1, int(cl.jobqueue.get("processes", 1)))
    task = task_shape(model, grid.shape, grid.chunks, budget, _device(spec), spec.precision,
                      workers=max(1, processes), tta=_tta(model, tta))
    return tuple(t // c for t, c in zip(task, grid.chunks, strict=True))


def _device(spec: PredictSpec) -> str:
    import torch

    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _predict_task(ctx: _Context, blocks: list[int], model_name: str | None = None,
                  dataset: str = "affinities", stage: str = "predict",
                  tta: int | None = None) -> None:
    """Predict the box of ``blocks`` (neighbouring blocks: one large box computes little
    context twice) with the boundary net (or, with ``model_name``, another net such as
    the synapse detector, ``tta`` its symmetries averaged) into ``dataset``; each block
    is marked done."""
    import torch

    from emdask.blockwise import write_blocks
    from emdask.predict import prediction_step

    with contextlib.suppress(ValueError):  # outside a worker: leave torch's default
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    spec = ctx.predict
    step = prediction_step(model_name or spec.model, _device(spec), spec.patch,
                           spec.batch_size, spec.dtype, ctx.intensity, spec.precision,
                           masked=ctx.mask is not None, tta=tta)
    boxes = [ctx.grid.box(b) for b in blocks]
    # context beyond the region of interest is real data where the volume has it
    inputs, offsets = [ctx.source], [ctx.roi_begin]
    if ctx.mask is not None:
        inputs.append(ctx.mask)
        offsets.append((0, 0, 0))

    def done(i: int) -> None:
        if ctx.copy_raw:  # the EM read (from the cache), kept: what was segmented
            _copy_raw(ctx, boxes[i], cached=True)
        mark_done(ctx.store, stage, blocks[i], ctx.stamp)

    # block by block, each marked as soon as written: a task killed midway leaves at
    # most one block's chunks written but unmarked
    write_blocks(step, boxes, inputs, _array(ctx, f"{dataset}/s0"), ctx.grid.shape, offsets,
                 [(ctx.source_name, ctx.generation), None], done)


def _copy_raw(ctx: _Context, box, cached: bool) -> None:
    """Copy a box of the input's region of interest into raw/s0 (``cached``: through the
    chunk cache, where the net has just read it)."""
    from emdask.blockwise import COPY, write_blocks

    write_blocks(COPY, [box], [ctx.source], _array(ctx, f"{RAW}/s0"), ctx.grid.shape,
                 [ctx.roi_begin], [(ctx.source_name, ctx.generation) if cached else None])


def _copy_raw_task(ctx: _Context, block: int) -> None:
    """Copy one block of the input's region of interest into raw/s0 (with [affinities],
    where no net reads it; each chunk is read once, so not through the chunk cache,
    which would keep up to its 512 MB of them in every worker)."""
    _copy_raw(ctx, ctx.grid.box(block), cached=False)
    mark_done(ctx.store, "predict", block, ctx.stamp)


def _align_task(ctx: _Context, block: int) -> None:
    """Render one block of the aligned stack and of its missing-data mask."""
    from emdask.align import StackFields, render_step
    from emdask.blockwise import write_blocks

    stored = _array(ctx, "alignment/fields")
    box, cache = ctx.grid.box(block), [("raw", ctx.generation)]
    # the block's sections only, read once for both steps (each reads them twice)
    z0, z1 = box.begin[0], box.end[0]
    fields = StackFields(np.asarray(stored[z0:z1]), int(stored.attrs["spacing"]), first=z0)
    for out, step in ((f"{RAW}/s0", render_step(fields, ctx.source.dtype, 0, 1)),
                      (f"{LABELS}/defects/s0", render_step(fields, np.uint8, 1, 0,
                                                           window=ctx.window))):
        write_blocks(step, [box], [ctx.source], _array(ctx, out), ctx.grid.shape,
                     [ctx.roi_begin], cache)
    mark_done(ctx.store, "align", block, ctx.stamp)


def _array_complete(root, path: str) -> bool:
    return has(root, path) and bool(root[path].attrs.get("complete"))


def _align(client, ctx: _Context, cfg: RunConfig, vol) -> dict:
    """Defects and deformation fields (one global step: block matching runs as Dask tasks
    on the cluster), then the aligned stack and mask rendered block by block."""
    from emdask.align import align
    from emdask.defects import detect_defects
    from emdask.volumes import create_volume

    spec, store = cfg.align, cfg.output.path
    root = open_root(store)
    extra = {}
    if not _array_complete(root, "alignment/fields"):
        defects = detect_defects(vol, window=spec.window,
                                 missing_fraction=spec.missing_fraction)
        result = align(vol, spacing=spec.spacing, neighbours=spec.neighbours,
                       stiffness=spec.stiffness, prior=spec.prior, min_score=spec.min_score,
                       defects=defects, window=spec.solve_window)
        table = defects.table.merge(result.table.drop(columns="missing"), on="z")
        put_bytes(store, "sections.parquet", _parquet(table))
        # one chunk per section (a block task reads only its sections); the "complete"
        # attribute, set after the data, tells a resumed run the fields need no new solve
        arr = root.create_array("alignment/fields", shape=result.fields.shape,
                                dtype=np.float32, chunks=(1, *result.fields.shape[1:]),
                                overwrite=True)
        arr[:] = result.fields.values
        arr.attrs.update(spacing=spec.spacing, units="pixels", dims=list(result.fields.dims),
                         complete=True)
        extra = {"missing": table["z"][table["missing"]].tolist(),
                 "unreliable": table["z"][table["unreliable"]].tolist()}
        print(f"  align: fields solved; missing sections {extra['missing']}, unreliable "
              f"{extra['unreliable']}; table sections.parquet", file=sys.stderr)
    fresh = _fresh(store, "align")
    for name, dtype in ((RAW, vol.dtype), (f"{LABELS}/defects", np.uint8)):
        if fresh or not has(root, name):
            create_volume(store, name, ctx.grid.shape, dtype, ctx.grid.chunks,
                          vol.attrs["voxel_size"], vol.attrs["offset"], overwrite=True)
    _run_blocks(client, replace(ctx, window=spec.window), "align", _align_task, cfg.cluster)
    return extra


def _watershed_task(ctx: _Context, block: int) -> None:
    from emdask.segmentation import watershed_step

    seg = ctx.segment
    step = watershed_step(watershed_params(seg), histogram_bins(seg))
    if ctx.source is None:  # the predict stage's
        inputs, offsets, cache = [_array(ctx, "affinities/s0")], [(0, 0, 0)], [
            ("affinities", ctx.generation)]
    else:  # the user's ([affinities]), whose region of interest begins at roi_begin
        inputs, offsets, cache = [ctx.source], [ctx.roi_begin], [None]
    classifier = classifier_of(seg)
    if classifier is not None and classifier.raw:  # the EM, for raw features
        # (a cache token of its own: "raw" names the input in the predict tasks' cache)
        inputs.append(_array(ctx, f"{RAW}/s0"))
        offsets.append((0, 0, 0))
        cache.append(("store raw", ctx.generation))
    box = ctx.grid.box(block)
    labels, basin_info, graph, faces = step.compute(box, inputs, ctx.grid.shape, offsets,
                                                    cache)
    _array(ctx, "_emdask/basins")[box.slices()] = labels
    save_arrays(ctx.store, f"_emdask/graph/{block}.npz", _pack_graph(basin_info, graph))
    save_arrays(ctx.store, f"_emdask/faces/{block}.npz", _pack_faces(faces, basin_info[0]))
    mark_done(ctx.store, "watershed", block, ctx.stamp)


# a block's summary as plain arrays (the store holds no pickles)
def _pack_graph(basin_info, graph) -> dict:
    from emdask.region_graph import FIELDS

    return {"first": basin_info[0], "sizes": basin_info[1], "raw_sums": basin_info[2],
            "last": basin_info[3],
            **{k: getattr(graph, k) for k in FIELDS}}


def _unpack_graph(arrays: dict):
    from emdask.region_graph import FIELDS, RegionGraph

    # (raw_sums: absent from stores written before learned agglomeration; last: before
    # the tree solve, whose ties it breaks: such a store's graphs are read, not resumed,
    # by this version unless told, see run(other_version=))
    return ((arrays["first"], arrays["sizes"], arrays.get("raw_sums", np.zeros(0, np.int64)),
             arrays.get("last", arrays["first"])),
            RegionGraph(**{k: arrays[k] for k in FIELDS}))


# (with the basins' keys, which the tree solve's face links need: it then reads a
# neighbour's small faces file, not its whole graph)
def _pack_faces(faces: dict, keys: np.ndarray) -> dict:
    return {"keys": keys, **{f"{side}{d}_{i}": a for (side, d), parts in faces.items()
                             for i, a in enumerate(parts)}}


def _unpack_faces(arrays: dict) -> dict:
    faces: dict = {}
    for name in sorted(set(arrays) - {"keys"}):  # "lower0_0": side, axis, part's index
        key = (name[:5], int(name[5]))
        faces.setdefault(key, []).append((int(name[7:]), arrays[name]))
    return {k: tuple(a for _, a in sorted(parts)) for k, parts in faces.items()}


def _face_task(ctx: _Context, block: int, axis: int):
    from emdask.region_graph import face_links

    below = ctx.grid.neighbour(block, axis)
    upper = _unpack_faces(load_arrays(ctx.store, f"_emdask/faces/{block}.npz"))
    lower = _unpack_faces(load_arrays(ctx.store, f"_emdask/faces/{below}.npz"))
    return face_links(upper, lower, axis, watershed_params(ctx.segment).quantized()[1],
                       histogram_bins(ctx.segment))


def _solve_task(ctx: _Context, faces: list, links: list) -> dict:
    """The global solve: supervoxels, global graph, agglomeration -> lookup tables."""
    from emdask.segmentation import _solve

    infos, graphs = [], []  # (two lists, which _solve empties once it has summed them)
    for b in range(len(ctx.grid)):
        info, graph = _unpack_graph(load_arrays(ctx.store, f"_emdask/graph/{b}.npz"))
        infos.append(info)
        graphs.append(graph)
    del info, graph
    pairs = [(ctx.grid.neighbour(b, axis), b) for b, axis in faces]
    luts, bases, info = _solve(infos, graphs, links, pairs, watershed_params(ctx.segment),
                               ctx.segment.thresholds, ctx.segment.score,
                               classifier_of(ctx.segment))
    # one lookup table per block: a relabel task reads just its own
    for b in range(len(ctx.grid)):
        save_arrays(ctx.store, f"_emdask/lut/{b}.npz", {"lut": luts[:, bases[b]:bases[b + 1]]})
    mark_done(ctx.store, "agglomerate", 0, ctx.stamp)
    return asdict(info)


def _relabel_task(ctx: _Context, block: int) -> None:
    from emdask.segmentation import _apply_luts

    box = ctx.grid.box(block)
    labels = np.asarray(_array(ctx, "_emdask/basins")[box.slices()])
    luts = load_arrays(ctx.store, f"_emdask/lut/{block}.npz")["lut"]
    for name, out in zip(label_datasets(ctx.segment), _apply_luts(labels, luts),
                         strict=True):
        _array(ctx, f"{LABELS}/{name}/s0")[box.slices()] = out
    mark_done(ctx.store, "relabel", block, ctx.stamp)


def _pyramid_job(layout: list, index: int) -> tuple:
    """The (dataset, level, block, factors) of a pyramid block index: ``layout`` lists
    (dataset, level, number of blocks, factors) in order (a task gets this, not a list of
    every block)."""
    for dataset, level, n, factors in layout:
        if index < n:
            return dataset, level, index, factors
        index -= n
    raise IndexError(index)


def _pyramid_task(ctx: _Context, index: int, layout: list) -> None:
    """One block of one level of one image: the block of the level below, downsampled."""
    from emdask.blockwise import write_blocks
    from emdask.pyramids import downsample_step

    dataset, level, block, factors = _pyramid_job(layout, index)
    out, below = _array(ctx, f"{dataset}/s{level}"), _array(ctx, f"{dataset}/s{level - 1}")
    step = downsample_step(factors, below.dtype, channels=below.shape[0]
                           if below.ndim == 4 else None)
    write_blocks(step, [Grid.of(out).box(block)], [below], out,
                 done=lambda _: mark_done(ctx.store, "pyramid", index, ctx.stamp))


def _pyramid(client, ctx: _Context, cfg: RunConfig, vol) -> dict:
    """Levels s1, s2, ... of every image and label image, level by level, block by block
    (each level from the one below: a task reads at most 8 blocks' worth)."""
    from emdask.pyramids import pyramid_factors
    from emdask.volumes import add_levels

    root = open_root(cfg.output.path)
    factors = pyramid_factors(ctx.grid.shape, vol.attrs["voxel_size"])
    if not factors:
        print("  pyramid: the volume is small; s0 alone", file=sys.stderr)
        return {"levels": 0}
    with quiet_listing():
        labels = sorted(root[LABELS].group_keys()) if has(root, LABELS) else []
    datasets = [n for n in (RAW, "affinities", "synapse_probabilities") if has(root, n)]
    datasets += [f"{LABELS}/{n}" for n in labels]
    fresh, layout = _fresh(cfg.output.path, "pyramid"), []
    for dataset in datasets:
        for level, arr in enumerate(add_levels(cfg.output.path, dataset, factors,
                                               overwrite=fresh), start=1):
            grid = Grid.of(arr)
            layout.append((dataset, level, len(grid), factors[level - 1]))
    task = functools.partial(_pyramid_task, layout=layout)
    starts = np.concatenate([[0], np.cumsum([n for _, _, n, _ in layout])])
    for level in range(1, len(factors) + 1):
        _run_blocks(client, ctx, "pyramid", task, cfg.cluster, label=f"pyramid s{level}",
                    blocks=[i for k, (_, lv, _, _) in enumerate(layout) if lv == level
                            for i in range(int(starts[k]), int(starts[k + 1]))])
    print(f"  pyramid: {len(factors)} levels of {len(datasets)} images, factors "
          f"{[list(f) for f in factors]}", file=sys.stderr)
    return {"levels": len(factors), "factors": [list(f) for f in factors]}


def _mesh_task(ctx: _Context, block: int, dataset: str, spec: MeshSpec,
               voxel_size: tuple, offset: tuple) -> None:
    """Meshes of one block (plus one voxel on its high sides) of a segmentation: a
    fragment per segment, and the list of the segments meshed."""
    from emdask.meshes import mesh_block, pieces_step

    step = pieces_step(functools.partial(mesh_block, max_error=spec.max_error,
                                         dust=spec.mesh_dust), voxel_size, offset)
    pieces = step.compute(ctx.grid.box(block), [_array(ctx, f"{dataset}/s0")],
                          ctx.grid.shape)
    for segment, (mesh,) in pieces.items():
        put_bytes(ctx.store, f"{dataset}/meshes/{segment}:0:{block}", mesh.to_precomputed())
    save_arrays(ctx.store, f"_emdask/meshes/{block}.npz",
                {"ids": np.array(sorted(pieces), np.uint64)})
    mark_done(ctx.store, "meshes", block, ctx.stamp)


def _meshes(client, ctx: _Context, cfg: RunConfig, vol) -> dict:
    """Meshes of one segmentation, block by block, then a manifest per segment."""
    from emdask.meshes import INFO, manifest

    t = cfg.meshes.segmentation
    t = cfg.segment.thresholds[-1] if t is None else t
    dataset = f"{LABELS}/segmentation_{t:g}"
    task = functools.partial(_mesh_task, dataset=dataset, spec=cfg.meshes,
                             voxel_size=tuple(vol.attrs["voxel_size"]),
                             offset=tuple(vol.attrs["offset"]))
    _run_blocks(client, ctx, "meshes", task, cfg.cluster)
    blocks: dict[int, list[int]] = {}
    for b in range(len(ctx.grid)):
        for segment in load_arrays(ctx.store, f"_emdask/meshes/{b}.npz")["ids"].tolist():
            blocks.setdefault(segment, []).append(b)
    for segment, where in blocks.items():
        put_bytes(ctx.store, f"{dataset}/meshes/{segment}:0", manifest(segment, where))
    put_bytes(ctx.store, f"{dataset}/meshes/info", json.dumps(INFO).encode())
    print(f"  meshes: {len(blocks)} segments of segmentation_{t:g}, "
          f"{sum(map(len, blocks.values()))} fragments -> {dataset}/meshes", file=sys.stderr)
    return {"segments": len(blocks), "segmentation": t}


def _skeleton_task(ctx: _Context, block: int, dataset: str, spec: MeshSpec,
                   voxel_size: tuple, offset: tuple) -> None:
    """Skeletons of one block (plus one voxel on its high sides) of a segmentation, as
    plain arrays: per segment its vertices (nm) and edges."""
    from emdask.meshes import pieces_step
    from emdask.skeletons import skeleton_block

    step = pieces_step(functools.partial(
        skeleton_block, dust=spec.skeleton_dust,
        teasar={"scale": spec.skeleton_scale, "const": spec.skeleton_const}),
        voxel_size, offset)
    pieces = {s: p for s, (p,) in step.compute(ctx.grid.box(block),
                                                [_array(ctx, f"{dataset}/s0")],
                                                ctx.grid.shape).items()}
    ids = sorted(pieces)
    save_arrays(ctx.store, f"_emdask/skeletons/{block}.npz", {
        "ids": np.array(ids, np.uint64),
        "n_vertices": np.array([len(pieces[i].vertices) for i in ids], np.int64),
        "n_edges": np.array([len(pieces[i].edges) for i in ids], np.int64),
        "vertices": np.concatenate([pieces[i].vertices for i in ids] or [np.zeros((0, 3))]
                                   ).astype(np.float32),
        "edges": np.concatenate([pieces[i].edges for i in ids] or [np.zeros((0, 2))]
                                ).astype(np.uint32)})
    mark_done(ctx.store, "skeletons", block, ctx.stamp)


def _skeletons(client, ctx: _Context, cfg: RunConfig, vol) -> dict:
    """Skeletons of one segmentation block by block; then each segment's pieces joined
    (precomputed skeleton files beside the segmentation) and skeletons.parquet."""
    from osteoid import Skeleton

    from emdask.skeletons import INFO, cable_lengths, join

    t = cfg.meshes.segmentation
    t = cfg.segment.thresholds[-1] if t is None else t
    dataset = f"{LABELS}/segmentation_{t:g}"
    task = functools.partial(_skeleton_task, dataset=dataset, spec=cfg.meshes,
                             voxel_size=tuple(vol.attrs["voxel_size"]),
                             offset=tuple(vol.attrs["offset"]))
    _run_blocks(client, ctx, "skeletons", task, cfg.cluster)
    pieces: dict[int, list] = {}
    for b in range(len(ctx.grid)):
        a = load_arrays(ctx.store, f"_emdask/skeletons/{b}.npz")
        v_at = np.concatenate([[0], np.cumsum(a["n_vertices"])])
        e_at = np.concatenate([[0], np.cumsum(a["n_edges"])])
        for k, segment in enumerate(a["ids"].tolist()):
            pieces.setdefault(segment, []).append(Skeleton(
                a["vertices"][v_at[k]:v_at[k + 1]], a["edges"][e_at[k]:e_at[k + 1]],
                segid=segment))
    joined = {s: join(p) for s, p in pieces.items()}
    for segment, skeleton in joined.items():
        put_bytes(ctx.store, f"{dataset}/skeletons/{segment}", skeleton.to_precomputed())
    put_bytes(ctx.store, f"{dataset}/skeletons/info", json.dumps(INFO).encode())
    table = cable_lengths(joined)
    put_bytes(ctx.store, "skeletons.parquet", _parquet(table))
    print(f"  skeletons: {len(joined)} segments of segmentation_{t:g}, "
          f"{table['cable_nm'].sum() / 1e3:.1f} um of cable; table skeletons.parquet",
          file=sys.stderr)
    return {"segments": len(joined), "cable_um": round(float(table["cable_nm"].sum()) / 1e3, 3)}


def _merge_task(ctx: _Context, block: int, dataset: str, model: str, voxel_size: tuple,
                offset: tuple) -> None:
    """The merge net on the windows centred in one block (``_emdask/errors/jobs.npz``),
    read from the stored raw and segmentation."""
    from emdask.errors import score_windows

    jobs = load_arrays(ctx.store, "_emdask/errors/jobs.npz")
    mine = jobs["block"] == block
    windows = score_windows(_model(model, "cpu"), _array(ctx, f"{RAW}/s0"),
                            _array(ctx, f"{dataset}/s0"),
                            list(zip(jobs["segment"][mine].tolist(), jobs["point"][mine],
                                     strict=True)), voxel_size, offset)
    save_arrays(ctx.store, f"_emdask/errors/{block}.npz", {
        "segment": windows.segment.to_numpy(np.uint64), "score": windows.score.to_numpy(),
        "at": windows[["z_nm", "y_nm", "x_nm"]].to_numpy(float).reshape(-1, 3)})
    mark_done(ctx.store, "errors", block, ctx.stamp)


def _stored_skeletons(store: str, dataset: str, ids) -> dict:
    from osteoid import Skeleton

    return {int(s): Skeleton.from_precomputed(get_bytes(store, f"{dataset}/skeletons/{s}"),
                                              segid=int(s)) for s in ids}


def _stored_affinities(cfg: RunConfig, root, full, vol, roi_begin):
    """The nearest-neighbour affinities of the segmented region, lazily: the predicted
    ones in the store, or the user's (``[affinities]``)."""
    import dask.array as da

    if has(root, "affinities"):
        return da.from_zarr(root["affinities/s0"])[:3]
    source, begin = _affinities_given(cfg, full, vol, roi_begin)
    shape = tuple(vol.shape)
    return da.from_array(source, chunks=(3, *_chunks(cfg)))[
        (slice(0, 3), *_slices(begin, np.add(begin, shape)))]


def _errors(client, ctx: _Context, cfg: RunConfig, root, affs) -> dict:
    """Split candidates from the contacts (one blockwise pass) and the split model; merge
    candidates from the merge net in windows along the stored skeletons, one task per
    block of window centres (resumable); both in errors.parquet."""
    import pandas as pd

    from emdask.errors import (
        _contacts_and_sizes,
        best_windows,
        candidate_table,
        detect_splits,
        load_merge_model,
        load_split_model,
        merge_jobs,
        merge_window,
        small_joins,
    )
    from emdask.volumes import open_volume

    spec, store = cfg.errors, cfg.output.path
    t = cfg.meshes.segmentation
    t = cfg.segment.thresholds[-1] if t is None else t
    dataset = f"{LABELS}/segmentation_{t:g}"
    done = root.attrs.get("emdask", {}).get("stages", {}).get("skeletons", {})
    if not done.get("finished") or done.get("params") != _stage_params(cfg, "skeletons"):
        raise ValueError(f"{store}: the errors stage reads the skeletons of "
                         f"segmentation_{t:g}; run the skeletons stage first")
    seg = open_volume(store, f"segmentation_{t:g}")
    vs, offset = tuple(seg.attrs["voxel_size"]), tuple(seg.attrs["offset"])
    touching = _contacts_and_sizes(seg, affs)  # one pass: contacts and sizes
    big = [s for s, n in touching[1].items() if s != 0 and n >= spec.min_size]
    skeleton_ids = set(pd.read_parquet(io.BytesIO(get_bytes(store, "skeletons.parquet"))).id)
    skeletons = _stored_skeletons(store, dataset, sorted(set(big) & skeleton_ids))
    splits = merges = None
    split_threshold = merge_threshold = 1.0
    if spec.split_model:
        model = load_split_model(spec.split_model)
        split_threshold = model.threshold
        splits = detect_splits(seg, affs, model, vs, spec.min_size, skeletons, touching)
    if spec.merge_model:
        net = load_merge_model(_model(spec.merge_model, "cpu"))
        merge_threshold = float(net.card.get("threshold", 1.0))
        jobs = merge_jobs(skeletons, merge_window(net, seg.shape) * np.asarray(vs))
        points = np.array([p for _, p in jobs], float).reshape(-1, 3)
        voxel = np.clip(((points - offset) / vs).astype(np.int64), 0,
                        np.array(seg.shape) - 1)
        blocks = np.array([np.ravel_multi_index(tuple(v // ctx.grid.chunks), ctx.grid.counts)
                           for v in voxel], np.int64)
        if _fresh(store, "errors"):
            save_arrays(store, "_emdask/errors/jobs.npz", {
                "segment": np.array([s for s, _ in jobs], np.uint64), "point": points,
                "block": blocks})
        _run_blocks(client, ctx, "errors", functools.partial(
            _merge_task, dataset=dataset, model=spec.merge_model, voxel_size=vs,
            offset=offset), cfg.cluster, blocks=sorted(set(blocks.tolist())),
            label="errors (merge net)")
        parts = [load_arrays(store, f"_emdask/errors/{b}.npz") for b in sorted(set(blocks))]
        windows = pd.DataFrame({
            "segment": np.concatenate([p["segment"] for p in parts] or [[]]).astype(
                np.uint64),
            "score": np.concatenate([p["score"] for p in parts] or [[]]),
            **{f"{a}_nm": np.concatenate([p["at"][:, k] for p in parts] or [[]])
               for k, a in enumerate("zyx")}})
        merges = best_windows(windows, touching[1])
    small = small_joins(seg, affs, spec.floor, vs, touching) if spec.floor else None
    table = candidate_table(splits, merges, split_threshold, merge_threshold, small)
    put_bytes(store, "errors.parquet", _parquet(table))
    counts = table.kind.value_counts().to_dict() if len(table) else {}
    print(f"  errors: {counts.get('split', 0)} split and {counts.get('merge', 0)} merge "
          f"candidates in segmentation_{t:g} ({int(table.auto.sum()) if len(table) else 0} "
          f"above the models' correction thresholds, {counts.get('small', 0)} of them "
          f"segments under {spec.floor} voxels); table errors.parquet", file=sys.stderr)
    return {"splits": int(counts.get("split", 0)), "merges": int(counts.get("merge", 0)),
            "small": int(counts.get("small", 0))}


def _correct_task(ctx: _Context, block: int, dataset: str) -> None:
    """Cuts (fragments given new ids), then joins (segment ids mapped), on one block."""
    from emdask.errors import apply_cuts, relabel

    lut = load_arrays(ctx.store, "_emdask/correct/lut.npz")
    box = ctx.grid.box(block).slices()
    labels = np.asarray(_array(ctx, f"{dataset}/s0")[box])
    if lut["cut_from"].size:
        labels = apply_cuts(labels, np.asarray(_array(ctx, f"{LABELS}/fragments/s0")[box]),
                            (lut["cut_from"], lut["cut_to"]))
    _array(ctx, f"{dataset}{CORRECTED}/s0")[box] = relabel(labels, (lut["old"], lut["new"]))
    mark_done(ctx.store, "correct", block, ctx.stamp)


def _correct(client, ctx: _Context, cfg: RunConfig, root, affs) -> dict:
    """Apply the decisions of edits.parquet to the segmentation with error candidates,
    block by block, into segmentation_{t}_corrected.

    The first run writes edits.parquet from errors.parquet: the candidates at or above
    their model's threshold and the segments under the floor joined to their best
    neighbour (kind "small"), all ``auto``, ``apply`` true.  It is the record of every edit:
    set ``apply`` false to undo one, or add rows (kind "split", segments [a, b]: join
    them; kind "merge", segments [s] and a location in nm: cut s where it joins two
    neurons) to make one, and run the stage again; what changed is redone.  A cut splits
    the segment's fragments in two (:func:`emdask.errors.plan_cuts`), the part cut off
    taking a new id; joins apply after cuts."""
    import pandas as pd

    from emdask.errors import join_lut, merge_net_for, plan_cuts
    from emdask.volumes import create_volume, open_volume

    store = cfg.output.path
    t = cfg.meshes.segmentation
    t = cfg.segment.thresholds[-1] if t is None else t
    dataset = f"{LABELS}/segmentation_{t:g}"
    if not exists(store, "errors.parquet"):
        raise ValueError(f"{store}: the correct stage applies the errors stage's "
                         "candidates; run the errors stage first")
    if not exists(store, EDITS):
        errors = pd.read_parquet(io.BytesIO(get_bytes(store, "errors.parquet")))
        first = errors[errors.auto] if cfg.errors.auto else errors.iloc[:0]
        put_bytes(store, EDITS, _parquet(first.assign(apply=True, by="auto").drop(
            columns="auto").reset_index(drop=True)))
    data = get_bytes(store, EDITS)
    edits = pd.read_parquet(io.BytesIO(data))
    missing = {"kind", "segments", "apply"} - set(edits.columns)
    if missing:
        raise ValueError(f"{store}/{EDITS}: columns {sorted(missing)} are missing")
    joins = edits[edits.kind.isin(["split", "small"]) & edits["apply"].astype(bool)]
    bad = [list(s) for s in joins.segments if len(s) != 2]
    if bad:
        raise ValueError(f"{store}/{EDITS}: a split or small edit joins two segments, got "
                         f"{bad[:3]}")
    old, new = join_lut(np.array([list(s) for s in joins.segments], np.uint64).reshape(-1, 2))
    cuts = edits[(edits.kind == "merge") & edits["apply"].astype(bool)]
    cut = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    digest = hashlib.sha256(data).hexdigest()[:16]
    cut_rows = []
    if len(cuts):
        seg = open_volume(store, f"segmentation_{t:g}")
        name = cfg.errors.merge_model  # none set (a person's cuts): the shipped one
        try:
            net = merge_net_for(name and _model(name, "cpu"), seg.attrs["voxel_size"])
        except ValueError as err:
            raise ValueError(f"cuts in {EDITS} need a merge net (its window finds the two "
                             f"parts): {err}; set [errors] merge_model") from None
        # the card's limit on the affinity a cut crosses is for automated cuts only: a
        # person's cut is made wherever the net's window falls in two
        auto = (cuts["by"] == "auto").to_numpy() if "by" in cuts else np.zeros(len(cuts), bool)
        lut, done = plan_cuts(
            open_volume(store, RAW).data, seg, open_volume(store, "fragments").data, affs,
            cuts.assign(segment=[int(s[0]) for s in cuts.segments]), net,
            max_affinity=np.where(auto, float(net.card.get("max_cut_affinity", 1.0)), 1.0))
        cut = lut  # (no cut found: cut_affinity NaN, kept as null in the run record)
        cut_rows = [{k: None if isinstance(v, float) and np.isnan(v) else v
                     for k, v in r.items()} for r in done.to_dict("records")]
    record = run_record(store).get("stages", {}).get("correct", {})
    if record.get("edits") not in (None, digest):  # the decisions changed: all redone
        unmark(store, "correct", set(range(len(ctx.grid))), stage_generation(store, "correct"))
    if _fresh(store, "correct") or not has(root, f"{dataset}{CORRECTED}"):
        seg = open_volume(store, f"segmentation_{t:g}")
        create_volume(store, f"{dataset}{CORRECTED}", seg.shape, seg.dtype, ctx.grid.chunks,
                      seg.attrs["voxel_size"], seg.attrs["offset"], overwrite=True)
    save_arrays(store, "_emdask/correct/lut.npz", {"old": old, "new": new,
                                                    "cut_from": cut[0], "cut_to": cut[1]})
    _set_stages(root, dict(root.attrs["emdask"]["stages"]) | {
        "correct": record | {"edits": digest}})
    _run_blocks(client, ctx, "correct", functools.partial(_correct_task, dataset=dataset),
                cfg.cluster)
    made = [r for r in cut_rows if r["new_id"]]
    print(f"  correct: {len(joins)} joins applied ({old.size - np.unique(new).size} segments "
          f"fewer), {len(made)} of {len(cuts)} cuts made (new ids "
          f"{[r['new_id'] for r in made][:5]}{' ...' if len(made) > 5 else ''}) -> "
          f"segmentation_{t:g}{CORRECTED}; decisions in {EDITS}", file=sys.stderr)
    return {"joins": len(joins), "cuts": cut_rows, "edits": digest}


# ---------------------------------------------------------------- running tasks
def _run_blocks(client, ctx: _Context, stage: str, fn: Callable, cluster: ClusterSpec,
                blocks: Sequence[int] | None = None, label: str | None = None,
                group: Sequence[int] | None = None) -> int:
    """Submit one task per unfinished block of a stage (of ``blocks``, default all of the
    grid's); returns how many tasks ran.  Blocks marked done whose chunks have gone missing are
    recomputed.  With ``group`` (blocks per axis), a task gets the list of unfinished
    blocks of one group of neighbouring blocks instead."""
    ctx = replace(ctx, stamp=stage_generation(ctx.store, stage))
    blocks = range(len(ctx.grid)) if blocks is None else blocks
    finished = marked(ctx.store, stage, ctx.stamp) & set(blocks)
    lost = {p.block for p in _block_problems(ctx.store, stage, finished, decode=False)}
    if lost:
        print(f"  {stage}: {len(lost)} finished block(s) have lost chunks "
              f"({sorted(lost)[:8]}{' ...' if len(lost) > 8 else ''}); recomputing them",
              file=sys.stderr)
        unmark(ctx.store, stage, lost, ctx.stamp)
        finished -= lost
    todo = [b for b in blocks if b not in finished]
    label = label or stage
    if finished:
        print(f"  {label}: {len(finished)} of {len(blocks)} blocks already done",
              file=sys.stderr)
    if group is not None:  # blocks of one group (z, y, x // group) go to one task
        counts = np.array(ctx.grid.counts)
        owner = [tuple(np.array(ctx.grid.index(b)) // np.asarray(group)) for b in todo]
        todo = [[b for b, o in zip(todo, owner, strict=True) if o == g]
                for g in dict.fromkeys(owner)]
        print(f"  {label}: tasks of up to {list(group)} blocks "
              f"({(np.minimum(group, counts) * np.array(ctx.grid.chunks)).tolist()} voxels)",
              file=sys.stderr)
    task = functools.partial(guarded, functools.partial(fn, ctx), cluster.task_timeout)
    first = [t[0] if isinstance(t, list) else t for t in todo]
    futures = client.map(task, todo, key=[f"emdask-{stage}-{b}-{time.time_ns()}"
                                          for b in first],
                         retries=cluster.retries, pure=False)
    progress(futures, label)
    return len(todo)


# ---------------------------------------------------------------- the run
def _stage_params(cfg: RunConfig, stage: str) -> dict:
    """What a stage's output depends on (its upstream included), as stored."""
    return _jsonable(_depends_on(cfg, stage))


def _depends_on(cfg: RunConfig, stage: str) -> dict:
    p = {"input": asdict(cfg.input), "chunks": list(cfg.output.chunks)}
    if cfg.align is not None:  # (stores made without alignment keep their records)
        p["align"] = asdict(cfg.align)
    if stage == "align":  # the mask setting acts in predict, not on the alignment
        return p | ({"align": {k: v for k, v in p["align"].items() if k != "mask"}}
                    if "align" in p else {})
    p["predict"] = {k: v for k, v in asdict(cfg.predict).items()  # no effect on output:
                    if k not in ("device", "patch", "batch_size", "check_voxel_size",
                                 "task_memory")}
    if not cfg.predict.check_voxel_size:  # the input as it is: never read resampled
        p["predict"]["check_voxel_size"] = False
    p["predict"]["precision"] = _precision(cfg.predict, cfg.predict.model)
    if cfg.predict.model.endswith(".pt") and Path(cfg.predict.model).exists():
        st = Path(cfg.predict.model).stat()  # a retrained file at the same path differs
        p["predict"]["model_file"] = f"{st.st_size}:{st.st_mtime_ns}"
    if cfg.affinities is not None:  # no net: the affinities are the user's
        p["predict"] = {"affinities": asdict(cfg.affinities)}
    if stage == "predict":
        return p
    seg = asdict(cfg.segment)
    if seg["score"] == "learned" and Path(seg["classifier"]).suffix == ".json":
        st = Path(seg["classifier"]).stat()  # a retrained file at the same path differs
        seg["classifier_file"] = f"{st.st_size}:{st.st_mtime_ns}"
    if stage == "watershed":  # (a learned score's classifier may read the EM too)
        keys = ("low", "high", "bins", "score") + (
            ("classifier", "classifier_file") if seg["score"] == "learned" else ())
        return p | {"segment": {k: seg.get(k) for k in keys}}
    p["segment"] = seg
    if stage in ("synapses", "pyramid", "meshes", "skeletons", "errors", "correct",
                 "report"):
        # (tta and max_extent only where set: the records of stores made before they
        # existed still match)
        p["synapses"] = ({k: v for k, v in asdict(cfg.synapses).items()
                          if k != "accept_licence"
                          and not (k in ("tta", "max_extent") and v is None)}
                         if cfg.synapses else None)
        if cfg.synapses:
            p["synapses"]["precision"] = _precision(cfg.predict, cfg.synapses.model)
        if cfg.synapses and cfg.synapses.model.endswith(".pt") and Path(
                cfg.synapses.model).exists():
            st = Path(cfg.synapses.model).stat()
            p["synapses"]["model_file"] = f"{st.st_size}:{st.st_mtime_ns}"
        direction = cfg.synapses.direction_model if cfg.synapses else None
        if direction and direction.endswith(".pt") and Path(direction).exists():
            st = Path(direction).stat()
            p["synapses"]["direction_model_file"] = f"{st.st_size}:{st.st_mtime_ns}"
    if stage in ("meshes", "skeletons", "errors", "correct", "report"):
        p["meshes"] = asdict(cfg.meshes)
    if stage in ("errors", "correct"):
        # (floor only where it joins: the records of stores made before it existed match
        # a config with auto = false and floor = 0)
        p["errors"] = ({k: v for k, v in asdict(cfg.errors).items()
                        if not (k == "floor" and not v)} if cfg.errors else None)
        for key in ("split_model", "merge_model"):  # a retrained file at the same path
            name = p["errors"] and p["errors"][key]
            if name and Path(name).suffix in (".pt", ".json") and Path(name).exists():
                st = Path(name).stat()
                p["errors"][f"{key}_file"] = f"{st.st_size}:{st.st_mtime_ns}"
    if stage == "report":
        p["evaluate"] = asdict(cfg.evaluate) if cfg.evaluate else None
    return p


def _jsonable(value):
    """As stored in (and read back from) the store's JSON attributes: tuples -> lists."""
    return json.loads(json.dumps(value))


def _check_stage(root, cfg: RunConfig, stage: str, overwrite: bool) -> None:
    import emdask

    stages = dict(root.attrs.get("emdask", {}).get("stages", {}))
    params = _stage_params(cfg, stage)
    old = stages.get(stage)
    if old is not None and old["params"] != params and old.get("skipped"):
        old = None  # an earlier run skipped this stage: it left nothing that could differ
    elif (old is not None and old["params"] != params and not old.get("finished")
            and not done_blocks(cfg.output.path, stage)):
        # an earlier run started this stage and failed before finishing a single block:
        # nothing of it is worth keeping, so its parameters do not bind this run (the
        # stages after it keep their outputs: their own records still bind them)
        _clear(cfg, root, stage, downstream=False)
        old = None
        stages = dict(root.attrs.get("emdask", {}).get("stages", {}))
    if old is not None and old["params"] != params:
        if not overwrite:
            raise ValueError(
                f"{cfg.output.path}: stage {stage!r} was run with other parameters "
                f"({_diff(old['params'], params)}); use another output, or overwrite "
                "(output.overwrite = true or --overwrite) to redo it and what follows")
        _clear(cfg, root, stage)
        stages = dict(root.attrs.get("emdask", {}).get("stages", {}))
    if old is not None and old["params"] == params and old.get("version") != \
            emdask.__version__ and not cfg.output.other_version:
        raise ValueError(
            f"{cfg.output.path}: stage {stage!r} was run by emdask {old.get('version')}, "
            f"this is emdask {emdask.__version__}; going on would mix the outputs of two "
            "versions. Use another output, or output.other_version = true "
            "(--other-version) to go on anyway")
    if old is None or old["params"] != params:
        # a new generation: markers of any earlier one (a clear that failed half-way)
        # can never mark a block of this one done
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        stages[stage] = {"params": params, "version": emdask.__version__,
                         "generation": f"{digest[:12]}-{time.time_ns():x}",
                         "started": _now(), "finished": None, "seconds": None}
        _set_stages(root, stages)


def _fresh(store: str, stage: str) -> bool:
    """Whether no block of the stage's generation is done: its arrays are then made anew,
    so nothing written before this generation survives in them."""
    return not done_blocks(store, stage)


def _check_upstream(root, cfg: RunConfig, stage: str, running: list[str]) -> None:
    """A stage reads the outputs of the stages before it: they must be finished, and made
    with this config's parameters (stages run in this same call are checked as they run)."""
    recorded = root.attrs.get("emdask", {}).get("stages", {})
    for before in STAGES[:STAGES.index(stage)]:
        if before in ("report", "pyramid", "meshes", "skeletons", "errors", "correct") or (
                before in running) or (
                before == "synapses" and cfg.synapses is None) or (
                before == "align" and cfg.align is None):
            continue
        old = recorded.get(before)
        if old is None or not old.get("finished"):
            raise ValueError(f"{cfg.output.path}: stage {stage!r} needs stage {before!r} "
                             "finished first; run it (or the whole pipeline)")
        if old["params"] != _stage_params(cfg, before):
            raise ValueError(
                f"{cfg.output.path}: stage {before!r} was run with other parameters "
                f"({_diff(old['params'], _stage_params(cfg, before))}); rerun it with "
                f"--stage {before} (and --overwrite) before {stage!r}")


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{k}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(out)


def _outputs(root, stage: str) -> tuple[list[str], list[str], list[str]]:
    """What a stage writes: arrays written block by block (one block = one chunk), files
    per block (``{block}`` in their name), and outputs written whole."""
    with quiet_listing():
        labels = list(root[LABELS].group_keys()) if has(root, LABELS) else []
    segmentations = sorted(f"{LABELS}/{n}/s0" for n in labels
                           if n.startswith("segmentation_") and not n.endswith(CORRECTED))
    corrected = sorted(f"{LABELS}/{n}/s0" for n in labels if n.endswith(CORRECTED))
    # what predict writes depends on the run: no affinities where they were given, and
    # no raw where the align stage wrote it
    records = root.attrs.get("emdask", {}).get("stages", {})
    aligned = "align" in records and not records["align"].get("skipped")
    given = "affinities" in records.get("predict", {}).get("params", {}).get("predict", {})
    predict = ([] if given else ["affinities/s0"]) + ([] if aligned else [f"{RAW}/s0"])
    return {"align": ([f"{RAW}/s0", f"{LABELS}/defects/s0"], [], ["alignment/fields"]),
            "predict": (predict, [], []),
            "watershed": (["_emdask/basins"], ["_emdask/graph/{block}.npz",
                                                "_emdask/faces/{block}.npz"], []),
            "agglomerate": ([], [], ["_emdask/lut/{block}.npz"]),
            "relabel": ([f"{LABELS}/fragments/s0", *segmentations], [], []),
            "synapses": (["synapse_probabilities/s0"], [], [f"{LABELS}/synapses/s0"]),
            "meshes": ([], ["_emdask/meshes/{block}.npz"], []),
            "skeletons": ([], ["_emdask/skeletons/{block}.npz"], []),
            "errors": ([], ["_emdask/errors/{block}.npz"], []),
            "correct": (corrected, [], []),
            }.get(stage, ([], [], []))


def _clear(cfg: RunConfig, root, stage: str, downstream: bool = True) -> None:
    """Delete a stage's outputs and record (and, by default, everything downstream).

    In an order that no failure can turn into lost data marked done: the records first
    (the stage's next record brings a new generation, under which no old marker counts),
    then the markers, then the data.  Errors are raised, not ignored."""
    clear = STAGES[STAGES.index(stage):] if downstream else (stage,)
    stages = dict(root.attrs.get("emdask", {}).get("stages", {}))
    _set_stages(root, {k: v for k, v in stages.items() if k not in clear})
    store = cfg.output.path
    for s in clear:
        remove(store, f"_emdask/done/{s}")
        if s == "agglomerate":  # and the tree solve's boxes (intermediates, for resuming)
            remove(store, f"_emdask/done/{TREE_MARKERS}")
    for s in clear:
        arrays, files, whole = _outputs(root, s)
        for name in arrays + whole:
            if "{block}" in name:  # per-block files
                files = [*files, name]
            # (raw's labels belong to later stages: raw loses its array, not its group)
            elif has(root, group := name if name == f"{RAW}/s0" else
                      name.removesuffix("/s0")):
                del root[group]
        for pattern in files:
            remove(store, pattern.rsplit("/", 1)[0])
        if s == "agglomerate":
            for folder in ("_emdask/tree", "_emdask/resolution"):
                remove(store, folder)
        if s == "errors":  # (the per-block files went with their folder)
            remove(store, "errors.parquet")
        if s == "correct" and exists(store, EDITS):
            # people's decisions name segments of the segmentation being cleared: kept
            # aside, never applied to another one
            put_bytes(store, f"edits-{_now().replace(':', '')}.parquet",
                      get_bytes(store, EDITS))
            remove(store, EDITS)
        if s in ("meshes", "skeletons"):  # the files beside the segmentation
            for name in meshed(store, root, s):
                remove(store, f"{LABELS}/{name}/{s}")


def _block_problems(store: str, stage: str, blocks, decode: bool) -> list[Problem]:
    """Finished blocks of a stage whose chunks (or per-block files) are missing or, with
    ``decode``, do not decode."""
    if not blocks:
        return []
    root = open_root(store, "r")
    arrays, files, _ = _outputs(root, stage)
    problems = []
    for name in arrays:
        if not has(root, name):
            problems += [Problem(stage, b, name, "array missing") for b in sorted(blocks)]
            continue
        arr = root[name]
        grid, present = Grid.of(arr), chunk_keys(arr)
        for b in sorted(blocks):
            for c in block_chunks(arr, grid.box(b).begin, grid.box(b).end):
                why = ("missing (it would read back as zeros)" if c not in present
                       else decode_error(arr, c) if decode else None)
                if why:
                    problems.append(Problem(stage, b, f"{name} chunk {'.'.join(map(str, c))}",
                                            why))
    for pattern in files:
        have = set(_list(store, pattern.rsplit("/", 1)[0]))
        for b in sorted(blocks):
            key = pattern.format(block=b)
            if key.rsplit("/", 1)[1] not in have:
                problems.append(Problem(stage, b, key, "missing"))
            elif decode:
                try:
                    load_arrays(store, key)
                except Exception as err:  # noqa: BLE001 - any failure to read is a finding
                    problems.append(Problem(stage, b, key, f"does not load ({err})"))
    return problems


def _n_blocks(root) -> int:
    """How many blocks a store's stages are cut into (the block grid of its basins)."""
    if not has(root, "_emdask/basins"):
        return 0
    basins = root["_emdask/basins"]
    return len(Grid.of(basins))


def verify(store: str, repair: bool = False) -> list[Problem]:
    """Check that every finished block of a store's stages has all its chunks and that
    they decode (and that whole outputs of finished stages decode); return the problems
    (``emdask verify STORE``).

    With ``repair``, the blocks with problems are marked not done (broken whole outputs
    are deleted and their stage reopened), so that the next ``emdask run`` with the same
    config recomputes exactly them.
    """
    record = run_record(store)
    if not record.get("stages"):
        raise ValueError(f"{store}: not an emdask output store (no stage record in its "
                         "zarr.json)")
    with lease(store) if repair else contextlib.nullcontext():  # no run writes meanwhile
        return _verify(store, record if not repair else run_record(store), repair)


def _verify(store: str, record: dict, repair: bool) -> list[Problem]:
    root = open_root(store, "r+" if repair else "r")
    problems = []
    for stage, rec in record["stages"].items():
        if rec.get("skipped"):
            continue
        generation = rec.get("generation", "0")
        found = _block_problems(store, stage, marked(store, stage, generation), decode=True)
        for name in _outputs(root, stage)[2] if rec.get("finished") else []:
            if "{block}" in name:  # a file per block, written by one global task
                found += [Problem(stage, None, key, "missing")
                          for b in range(_n_blocks(root))
                          if not exists(store, key := name.format(block=b))]
                continue
            if not has(root, name):
                found.append(Problem(stage, None, name, "missing"))
                continue
            arr = root[name]  # written whole: zero chunks may be left out, so decode only
            found += [Problem(stage, None, f"{name} chunk {'.'.join(map(str, c))}", why)
                      for c in sorted(chunk_keys(arr)) if (why := decode_error(arr, c))]
        problems += found
        if repair and found:
            unmark(store, stage, {p.block for p in found if p.block is not None}, generation)
            if any(p.block is None for p in found):
                for name in _outputs(root, stage)[2]:
                    if "{block}" not in name and has(root, name):
                        del root[name]
                unmark(store, stage, [0], generation)  # a global stage's one marker
            stages = dict(root.attrs["emdask"]["stages"])
            stages[stage] = {**stages[stage], "finished": None}
            _set_stages(root, stages)
    return problems


def _ngff_index(root) -> None:
    """Make the store's root an NGFF 0.5 collection that lists its images (the
    bioformats2raw layout, whose ``OME`` group names them in ``series``)."""
    images = [n for n in (RAW, "affinities", "synapse_probabilities") if has(root, n)]
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    index = root.require_group("OME")
    index.attrs["ome"] = {"version": "0.5", "series": images}
    if has(root, LABELS):  # only the label images there are (a cleared stage's are gone)
        with quiet_listing():
            present = sorted(root[LABELS].group_keys())
        root[LABELS].attrs["ome"] = {"version": "0.5", "labels": present}


def _set_stages(root, stages: dict) -> None:
    meta = dict(root.attrs.get("emdask", {}))
    meta["stages"] = stages
    root.attrs["emdask"] = meta


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _finish_stage(root, stage: str, seconds: float, extra: dict | None = None) -> None:
    stages = dict(root.attrs["emdask"]["stages"])
    stages[stage] = {**stages[stage], "finished": _now(), "seconds": round(seconds, 2),
                     **(extra or {})}
    _set_stages(root, stages)


def _input(cfg: RunConfig, factors=(1, 1, 1)):
    """The input volume (at the working resolution: ``factors`` times coarser than the
    file, see :func:`_working_factors`), its region of interest, and where that begins
    (voxels)."""
    from emdask.volumes import cutout, resampled

    vol = open_configured(cfg.input.url, cfg.input.dataset, cfg.input.voxel_size, "input")
    if vol.ndim != 3:
        raise ValueError(f"{vol.attrs['source']}: the input must be a 3-D EM volume, got "
                         f"dims {vol.dims}")
    factors = tuple(int(f) for f in factors)
    work = resampled(vol, factors) if factors != (1, 1, 1) else vol
    if cfg.input.roi is None:
        return work, work, (0, 0, 0)
    roi = np.asarray(cfg.input.roi, float)
    if roi.shape != (2, 3):
        raise ValueError(f"input.roi must be [[z0, y0, x0], [z1, y1, x1]], got {cfg.input.roi}")
    try:  # the region on the file's own grid, as the user wrote it
        cut = cutout(vol, roi[0], roi[1], units=cfg.input.roi_units)
    except ValueError as err:
        if cfg.input.roi_units != "nm":
            raise
        extent = [[o, o + v * n] for o, v, n in zip(vol.attrs["offset"],
                                                     vol.attrs["voxel_size"], vol.shape,
                                                     strict=True)]
        raise ValueError(f"{err}; a roi in nm is absolute: the volume spans "
                         f"{[e[0] for e in extent]} to {[e[1] for e in extent]} nm") from None
    begin = np.rint((np.asarray(cut.attrs["offset"]) - np.asarray(vol.attrs["offset"]))
                    / np.asarray(vol.attrs["voxel_size"])).astype(int)
    if factors != (1, 1, 1):  # every group of voxels the region touches, within the volume
        end = np.minimum(-(-(begin + np.array(cut.shape)) // factors), work.shape)
        begin = begin // factors
        cut = cutout(work, begin, end, units="voxel")
    return work, cut, tuple(int(b) for b in begin)


def _affinities_given(cfg: RunConfig, full, vol, roi_begin) -> tuple[Any, tuple]:
    """The user's affinities (``[affinities]``), checked against the input: the array-like
    and where the region of interest begins in it."""
    spec = cfg.affinities
    affs = open_configured(spec.url, spec.dataset, spec.voxel_size, "affinities")
    where = affs.attrs["source"]
    if affs.ndim != 4 or affs.shape[0] < 3:
        raise ValueError(f"{where}: affinities must be (c, z, y, x) with at least the 3 "
                         f"nearest-neighbour channels, got shape {affs.shape}")
    if np.dtype(affs.dtype) not in (np.uint8, np.float32, np.float64):
        raise ValueError(f"{where}: affinities must be float in [0, 1] or uint8 (x255), "
                         f"got {affs.dtype}")
    if np.any(np.abs(np.subtract(affs.attrs["voxel_size"], vol.attrs["voxel_size"])) > 1e-6):
        raise ValueError(f"{where}: voxel size {list(affs.attrs['voxel_size'])} differs from "
                         f"the input's {list(vol.attrs['voxel_size'])}")
    spatial = tuple(affs.shape[1:])
    if spatial == tuple(full.shape):
        begin = roi_begin
    elif spatial == tuple(vol.shape):
        begin = (0, 0, 0)  # the region of interest alone
    else:
        raise ValueError(f"{where}: affinities of {spatial} voxels fit neither the input "
                         f"{tuple(full.shape)} nor its region of interest {tuple(vol.shape)}")
    offsets = affs.attrs.get("offsets")
    if offsets is not None and [list(o) for o in offsets[:3]] != [[-1, 0, 0], [0, -1, 0],
                                                                    [0, 0, -1]]:
        raise ValueError(f"{where}: channels 0-2 must be the nearest-neighbour affinities "
                         f"(offsets [-1, 0, 0], [0, -1, 0], [0, 0, -1]), got {offsets[:3]}")
    return affs.encoding["source"], begin


def _raw(cfg: RunConfig, root, full, roi_begin):
    """What the nets read: the input's region of interest, or the aligned stack (and its
    missing-data mask) when the pipeline aligns."""
    if cfg.align is None:
        return full.encoding["source"], roi_begin, None, "raw"
    if not has(root, f"{LABELS}/defects"):
        raise ValueError(f"{cfg.output.path}: the config has an [align] section but the "
                         "align stage has not run; run it first")
    mask = root[f"{LABELS}/defects/s0"] if cfg.align.mask else None
    return root[f"{RAW}/s0"], (0, 0, 0), mask, "aligned"


def _intensity(cfg: RunConfig, root, vol, model) -> tuple[float, float]:
    """The data values a net takes for black and white (:func:`emdask.intensity_range`).
    The volume's percentiles are sampled once and recorded in the store, so every block,
    every net and a resumed run map intensities the same way."""
    from emdask.predict import PERCENTILES, data_percentiles, intensity_range

    meta = dict(root.attrs.get("emdask", {}))
    key = ",".join(f"{p:g}" for p in PERCENTILES)
    source = _jsonable({k: v for k, v in asdict(cfg.input).items() if k != "intensity"})
    recorded = meta.get("percentiles", {})
    if recorded.get("input") != source:  # another input or region: sampled anew
        recorded = {"input": source}
    if key not in recorded:
        recorded[key] = list(data_percentiles(vol, PERCENTILES))
        meta["percentiles"] = recorded
        root.attrs["emdask"] = meta
    card = (getattr(model, "card", None) or {}).get("intensity", {})
    known = (tuple(recorded[key]) if list(card.get("percentiles", PERCENTILES))
             == list(PERCENTILES) else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lo, hi = intensity_range(vol, model, cfg.input.intensity, percentiles=known)
    for w in caught:
        print(f"  warning: {w.message}", file=sys.stderr)
    print(f"  intensity: {vol.dtype} values {lo:g} (black) to {hi:g} (white) for "
          f"{getattr(model, 'card', {}).get('name', 'the net')} "
          f"({cfg.input.intensity if isinstance(cfg.input.intensity, str) else 'given'})",
          file=sys.stderr)
    return float(lo), float(hi)


def _box_task(ctx: _Context, index: int, box, after: list = ()) -> None:
    """One box of the tree solve: from its block's summary or its halves' states and the
    face links between them; writes its state and its resolution.  (``after``: the
    children's tasks, so that Dask runs this one once they are done.)"""
    from emdask.solve_tree import (
        Carried,
        face_keys,
        from_arrays,
        inner_box,
        leaf_box,
        plane_faces,
        to_arrays,
    )

    seg = ctx.segment
    args = {"params": watershed_params(seg), "thresholds": seg.thresholds, "score": seg.score}

    def faces(block: int):
        arrays = load_arrays(ctx.store, f"_emdask/faces/{block}.npz")
        if "keys" not in arrays:  # written by an earlier version (run(other_version=))
            arrays["keys"] = load_arrays(ctx.store, f"_emdask/graph/{block}.npz")["first"]
        return _unpack_faces(arrays), arrays["keys"]

    if box.block >= 0:
        basin_info, graph = _unpack_graph(load_arrays(ctx.store,
                                                      f"_emdask/graph/{box.block}.npz"))
        up, res = leaf_box(basin_info, graph, faces(box.block)[0], box, **args)
    else:
        halves = [from_arrays(Carried, load_arrays(ctx.store, f"_emdask/tree/{c}.npz"))
                  for c in box.children]
        links = []
        for lower, upper, d in plane_faces(box, ctx.grid.counts):
            (faces_u, keys_u), (faces_l, keys_l) = faces(upper), faces(lower)
            links.append(face_keys(faces_u, faces_l, keys_u, keys_l, d,
                                   watershed_params(seg).quantized()[1], histogram_bins(seg)))
        up, res = inner_box(halves, links, box, **args)  # (which empties halves)
    save_arrays(ctx.store, f"_emdask/tree/{index}.npz", to_arrays(up))
    save_arrays(ctx.store, f"_emdask/resolution/{index}.npz", to_arrays(res))
    mark_done(ctx.store, TREE_MARKERS, index, ctx.stamp)


def _numbering_task(ctx: _Context, n_boxes: int) -> dict:
    """Every finished fragment's and segment's key, sorted (output ids are their ranks),
    and the problem's sizes; reads the resolutions one at a time."""
    from emdask.segmentation import SegmentationInfo
    from emdask.solve_tree import Resolution, counts, finished, from_arrays, numbering, totals

    keys, sizes = [], []
    for i in range(n_boxes):
        res = from_arrays(Resolution, load_arrays(ctx.store, f"_emdask/resolution/{i}.npz"))
        keys.append(finished(res))
        sizes.append(counts(res))
    frag, segs = numbering(keys)
    save_arrays(ctx.store, "_emdask/tree/numbers.npz",
                {"fragments": frag, **{f"segments{t}": k for t, k in enumerate(segs)}})
    return asdict(SegmentationInfo(len(ctx.grid), *totals(sizes)))


def _lut_task(ctx: _Context, block: int, chain: list) -> None:
    """A block's lookup tables from the resolutions of its boxes (its own up to the
    root) and the numbering."""
    from emdask.solve_tree import Resolution, block_lut, from_arrays

    first = load_arrays(ctx.store, f"_emdask/graph/{block}.npz")["first"]
    path = [from_arrays(Resolution, load_arrays(ctx.store, f"_emdask/resolution/{i}.npz"))
            for i in chain]
    numbers = load_arrays(ctx.store, "_emdask/tree/numbers.npz")
    n_thr = len(ctx.segment.thresholds)
    lut = block_lut(first, path, (numbers["fragments"],
                                  [numbers[f"segments{t}"] for t in range(n_thr)]))
    save_arrays(ctx.store, f"_emdask/lut/{block}.npz", {"lut": lut})


def _tree_solve(client, ctx: _Context, cfg: RunConfig) -> dict:
    """The tree solve (:mod:`emdask.solve_tree`): boxes from the blocks up, one Dask graph,
    resumable per box; then the numbering and every block's lookup tables."""
    from emdask.solve_tree import paths, tree

    boxes = tree(ctx.grid.counts)
    have = {d: set(_list(ctx.store, f"_emdask/{d}")) for d in ("tree", "resolution")}
    done = {i for i in marked(ctx.store, TREE_MARKERS, ctx.stamp)
            if all(f"{i}.npz" in have[d] for d in have)}
    if done:
        print(f"  tree: {len(done)} of {len(boxes)} boxes already done", file=sys.stderr)
    retries, timeout = cfg.cluster.retries, cfg.cluster.task_timeout
    task = functools.partial(guarded, functools.partial(_box_task, ctx), timeout)
    futures: dict = {}  # one graph: each box waits only for its own children
    for i, box in enumerate(boxes):  # children come first
        if i not in done:
            futures[i] = client.submit(
                task, i, box, [futures[c] for c in box.children if c in futures],
                retries=retries, pure=False, key=f"emdask-box-{i}-{time.time_ns()}")
    progress(list(futures.values()), "tree")
    info = progress([client.submit(_numbering_task, ctx, len(boxes), retries=retries,
                                    pure=False, key=f"emdask-numbering-{time.time_ns()}")],
                     "numbering")[0]
    chains = paths(boxes)
    blocks = sorted(chains)
    task = functools.partial(guarded, functools.partial(_lut_task, ctx), timeout)
    progress(client.map(task, blocks, [chains[b] for b in blocks], retries=retries,
                         pure=False, key=[f"emdask-lut-{b}-{time.time_ns()}" for b in blocks]),
              "lookup tables")
    mark_done(ctx.store, "agglomerate", 0, ctx.stamp)
    return info


def _agglomerate(client, ctx: _Context, cfg: RunConfig) -> dict:
    """The region graph solved: in a tree of boxes (mean and max scores), or by face
    links (one task per face between two blocks) and one global solve."""
    from emdask.segmentation import use_tree

    ctx = replace(ctx, stamp=stage_generation(ctx.store, "agglomerate"))
    if marked(ctx.store, "agglomerate", ctx.stamp):
        print("  agglomerate: already done", file=sys.stderr)
        return {}
    if use_tree(ctx.segment.solve, ctx.segment.score, len(ctx.grid)):
        info = _tree_solve(client, ctx, cfg)
        print(f"  tree: {info['n_supervoxels']} supervoxels, {info['n_edges']} edges; the "
              f"largest box held {info['graph_nbytes'] / 1e6:.1f} MB", file=sys.stderr)
        return {"graph": info}
    grid = ctx.grid
    faces = [(b, axis) for b in range(len(grid)) for axis in range(3)
             if grid.neighbour(b, axis) is not None]
    retries = cfg.cluster.retries
    links = client.map(lambda f: _face_task(ctx, *f), faces, retries=retries, pure=False,
                       key=[f"emdask-faces-{b}-{a}-{time.time_ns()}" for b, a in faces])
    progress(links, "faces")
    solve = client.submit(_solve_task, ctx, faces, links, retries=retries, pure=False,
                          key=f"emdask-solve-{time.time_ns()}")
    info = progress([solve], "global graph")[0]
    print(f"  global graph: {info['n_supervoxels']} supervoxels, {info['n_edges']} edges, "
          f"{info['graph_nbytes'] / 1e6:.1f} MB", file=sys.stderr)
    return {"graph": info}


def _synapses(client, ctx: _Context, cfg: RunConfig, full, vol, roi_begin, model) -> dict:
    """Synapse probabilities blockwise (resumable like predict), then objects, partners
    and the connectome (one pass over the stored arrays; redone whole if interrupted)."""
    from emdask.synapses import assign_partners, connectome, find_synapses
    from emdask.volumes import create_volume, open_volume, save_volume

    spec, store = cfg.synapses, cfg.output.path
    root = open_root(store)
    if _fresh(store, "synapses") or not has(root, "synapse_probabilities"):
        create_volume(store, "synapse_probabilities", ctx.grid.shape, spec.dtype,
                      ctx.grid.chunks, vol.attrs["voxel_size"], vol.attrs["offset"],
                      overwrite=True)
    source, begin, _, name = _raw(cfg, root, full, roi_begin)
    pctx = _Context(store, ctx.grid, source=source, roi_begin=begin,
                    predict=replace(cfg.predict, dtype=spec.dtype,
                                    precision=_precision(cfg.predict, spec.model)),
                    generation=ctx.generation, source_name=name,
                    intensity=_intensity(cfg, root, vol, model))
    _run_blocks(client, pctx, "synapses", functools.partial(
        _predict_task, model_name=spec.model, dataset="synapse_probabilities", stage="synapses",
        tta=spec.tta), cfg.cluster, group=_task_blocks(cfg, model, ctx.grid, client, spec.tta))
    record = run_record(store).get("stages", {}).get("synapses", {})
    if record.get("finished") and has(root, f"{LABELS}/synapses"):
        # (rewriting them would drop their pyramid levels)
        print("  synapses: objects and tables already made", file=sys.stderr)
        return {}
    labels, table = find_synapses(open_volume(store, "synapse_probabilities"),
                                  spec.threshold, spec.min_size,  # the config's, or the card's
                                  max_extent=spec.max_extent or np.inf)
    labels = save_volume(labels, store, f"{LABELS}/synapses", chunks=ctx.grid.chunks,
                         overwrite=True)
    t = spec.segmentation if spec.segmentation is not None else cfg.segment.thresholds[-1]
    segmentation = open_volume(store, f"segmentation_{t:g}")
    table = assign_partners(labels, segmentation, table,
                            radius=tuple(spec.radius))
    if spec.direction_model:  # which partner is presynaptic; else direction "unknown"
        from emdask.synapses import predict_direction

        raw = open_volume(store, RAW) if cfg.align is not None else vol
        table = predict_direction(raw, segmentation, table,
                                  _model(spec.direction_model, "cpu"),
                                  patch=tuple(spec.direction_patch))
    edges = connectome(table)
    put_bytes(store, "synapses.parquet", _parquet(table))
    put_bytes(store, "connectome.parquet", _parquet(edges))
    print(f"  synapses: {len(table)} objects, {len(edges)} connected pairs (segmentation_"
          f"{t:g}); tables synapses.parquet, connectome.parquet", file=sys.stderr)
    return {"n_synapses": len(table), "n_edges": len(edges)}


def _parquet(frame) -> bytes:
    def plain(v):  # Arrow wants lists, not tuples (bounding boxes, ranked partners)
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v

    frame = frame.copy()
    for col in frame.columns[frame.dtypes == object]:
        frame[col] = frame[col].map(plain)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def _chunks(cfg: RunConfig, factor=(1, 1, 1)) -> tuple:
    """Output chunks rounded up to the net's downsampling factor (so each block's pooling
    grid is anchored as in a whole-volume pass)."""
    return tuple(-(-int(c) // int(f)) * int(f)
                 for c, f in zip(cfg.output.chunks, factor, strict=True))


def run(config: RunConfig | str | Path | dict, stages: Sequence[str] | None = None,
        scheduler: str | None = None, overwrite: bool | None = None, client=None,
        dry_run: bool = False, other_version: bool = False) -> dict:
    """Run the pipeline (or some of its stages); returns the report.

    Everything that can be checked without computing (the input, the models and their
    voxel sizes, the volume's size against the nets' field of view, the ground truth, the
    output path) is checked first, before anything is written.  What the run prints is
    also appended to ``emdask.log`` in the output store.  A run holds the store's lease
    (:class:`emdask.store.Lease`): a second run on the same store refuses with
    :class:`StoreBusy`, naming the first.

    Parameters
    ----------
    config
        A :class:`RunConfig`, or a TOML/YAML file or dict for :func:`load_run_config`.
    stages
        Stage names from :data:`STAGES` (``"segment"`` means watershed, agglomerate and
        relabel); all by default.
    scheduler
        Address of a running Dask scheduler (overrides ``cluster``).
    overwrite
        Redo stages whose recorded parameters differ (default: the config's).
    client
        An existing ``distributed.Client`` to use (e.g. in a notebook).
    dry_run
        Check the config and print the plan (stages, blocks, output sizes, memory per
        task) without running anything; returns ``{"plan": text}``.
    other_version
        Go on with a store whose stages were run by another emdask version (else refused;
        also ``output.other_version``).
    """
    cfg = load_run_config(config)
    if other_version:
        cfg = replace(cfg, output=replace(cfg.output, other_version=True))
    overwrite = cfg.output.overwrite if overwrite is None else overwrite
    wanted = _expand(stages)
    if cfg.affinities is not None and "watershed" in wanted:
        # with given affinities the predict stage only copies the raw EM beside them (for
        # viewing): a segment run includes it (nothing to do where it is done)
        wanted = _expand(["predict", *wanted])
    checked = _preflight(cfg, wanted)
    if dry_run:
        text = plan(cfg, wanted, checked)
        print(text)
        return {"plan": text}
    with _log_to_store(cfg.output.path), lease(cfg.output.path, cfg.output.lease_timeout
                                                ) as held:
        token = HELD_LEASE.set(held)
        try:
            if client is not None:
                return _run(cfg, wanted, overwrite, client, checked, held)
            with connect(cfg.cluster, scheduler) as new_client:
                return _run(cfg, wanted, overwrite, new_client, checked, held)
        finally:
            HELD_LEASE.reset(token)


@dataclass
class _Checked:
    """What the preflight found: the input, its region of interest and the nets."""

    full: Any  # the whole input volume
    vol: Any  # its region of interest
    roi_begin: tuple
    model: Any  # the boundary net (None when its affinities are already stored)
    factor: tuple  # the boundary net's pooling factor: blocks are multiples of it
    synapse_model: Any = None
    existing: dict | None = None  # the store's emdask record, if the store exists
    resample: tuple = (1, 1, 1)  # the input read this many times coarser (the net's voxels)


def _working_factors(cfg: RunConfig, model, existing: dict | None) -> tuple:
    """Integer factors (z, y, x) by which the input is read coarser, so that its voxels
    match the net's: ssTEM at 4 nm in-plane for a net at 8-10 nm is mean-pooled 2x2.  A
    factor is the rounded ratio of the net's voxel size to the input's where that is 1.5
    or more, if the voxels then match the net's; a store keeps the factors it was made
    with.  (1, 1, 1) with ``predict.check_voxel_size = false`` (the input as it is)."""
    if model is None:
        return tuple((existing or {}).get("resample", (1, 1, 1)))
    if cfg.affinities is not None or not cfg.predict.check_voxel_size:
        return (1, 1, 1)
    vs = open_configured(cfg.input.url, cfg.input.dataset, cfg.input.voxel_size,
               "input").attrs["voxel_size"]
    from emdask.predict import _check_voxel_size

    ratio = np.asarray(model.config.voxel_size, float) / np.asarray(vs, float)
    factors = tuple(int(r) for r in np.where(ratio >= 1.5, np.rint(ratio), 1))
    try:  # only where that gives the net's voxels (else the check names the file's)
        _check_voxel_size(np.multiply(vs, factors), model, "")
    except ValueError:
        return (1, 1, 1)
    return factors


def _preflight(cfg: RunConfig, stages: list[str]) -> _Checked:
    """Check all that can be checked before computing or writing anything, so that a bad
    input fails at once and leaves nothing behind that could block the corrected rerun."""
    from emdask.models import check_licence
    from emdask.predict import _check_voxel_size, _tta, check_size

    store = cfg.output.path
    existing = _existing_record(store)
    model = None
    if cfg.affinities is None and ("predict" in stages or not (existing and
                                                              existing.get("factor"))):
        model = _model(cfg.predict.model, "cpu")
    factors = _working_factors(cfg, model, existing)
    full, vol, roi_begin = _input(cfg, factors)
    where = vol.attrs["source"]
    if factors != (1, 1, 1):
        fine = vol.attrs["resampled"]["voxel_size"]
        print(f"  input at {fine} nm, read at the net's resolution: {list(vol.attrs['voxel_size'])}"
              f" nm (each voxel the mean of {'x'.join(map(str, factors))} voxels)",
              file=sys.stderr)
    if cfg.affinities is not None:
        if cfg.align is not None:
            raise ValueError(f"{where}: [affinities] and [align] do not go together: given "
                             "affinities are not realigned; leave out one of them")
        _affinities_given(cfg, full, vol, roi_begin)
    elif model is not None:
        if model.config.target != "affinities":
            raise ValueError(f"predict.model {cfg.predict.model!r} predicts "
                             f"{model.config.target}, not affinities")
        if cfg.predict.check_voxel_size:
            _check_voxel_size(vol.attrs["voxel_size"], model, where)
        check_size(vol.shape, model, where)
        try:  # a card's tta: its net's offsets must allow it
            _tta(model, None)
        except ValueError as err:
            raise ValueError(f"predict.model {cfg.predict.model!r}: {err}") from None
    if ("predict" in stages or "synapses" in stages) and cfg.predict.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"predict.device = {cfg.predict.device!r} but this machine has no "
                             "CUDA GPU that torch can use; use 'auto' or 'cpu'")
    factor = ((1, 1, 1) if cfg.affinities is not None else
              tuple(model.factor if model is not None else existing["factor"]))
    synapse_model = None
    if cfg.synapses is not None and "synapses" in stages:
        spec = cfg.synapses
        check_licence(spec.model, spec.accept_licence, "[synapses] accept_licence = true")
        synapse_model = _model(spec.model, "cpu")
        if synapse_model.config.target != "synapses":
            raise ValueError(f"synapses.model {spec.model!r} predicts "
                             f"{synapse_model.config.target}, not synapses")
        chunks = _chunks(cfg, factor)
        if any(c % f for c, f in zip(chunks, synapse_model.factor, strict=True)):
            raise ValueError(f"output.chunks {list(chunks)} must be multiples of the "
                             f"synapse model's pooling factor {list(synapse_model.factor)}")
        if cfg.predict.check_voxel_size:
            _check_voxel_size(vol.attrs["voxel_size"], synapse_model, where)
        check_size(vol.shape, synapse_model, where)
        try:  # here, not in every worker's task
            _tta(synapse_model, spec.tta)
        except ValueError as err:
            raise ValueError(f"{where}: [synapses] {err}") from None
    if cfg.errors is not None and ({"errors", "correct"} & set(stages)):
        from emdask.errors import load_merge_model, load_split_model

        try:
            check = cfg.predict.check_voxel_size
            if cfg.errors.split_model:
                split = load_split_model(cfg.errors.split_model)
                if check:
                    split.check_voxel_size(vol.attrs["voxel_size"], where)
            if cfg.errors.merge_model:
                net = load_merge_model(_model(cfg.errors.merge_model, "cpu"))
                if check:
                    _check_voxel_size(vol.attrs["voxel_size"], net, where)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"[errors] {err}") from None
    if cfg.evaluate is not None and "report" in stages:
        for dataset in (cfg.evaluate.dataset, cfg.evaluate.synapses, cfg.evaluate.cells):
            if dataset:
                ground_truth(cfg, dataset, vol, roi_begin)
    return _Checked(full, vol, roi_begin, model, factor, synapse_model, existing, factors)


def _existing_record(store: str) -> dict | None:
    """The emdask record of an existing output store; None where there is no store yet.
    A path that is a file, or a folder of other things, is refused."""
    local = _local_path(store)
    if local is not None:
        path = Path(local)
        if path.is_file():
            raise ValueError(f"output.path {store} is a file; give the path of a folder for "
                             "the zarr store")
        if not path.exists():
            return None
        if not (path / "zarr.json").exists():
            # (the log, or the lease, of a run that has not yet made the store is no
            # obstacle)
            if any(p.name not in ("emdask.log", "_emdask") and not p.name.startswith(".")
                   for p in path.iterdir()):
                raise ValueError(f"output.path {store} is a folder of other files, not an "
                                 "emdask store; give a new or empty folder")
            return None
    else:
        import fsspec

        fs, root = fsspec.core.url_to_fs(store)
        if not fs.exists(f"{root}/zarr.json"):
            return None
    return dict(open_root(store, "r").attrs.get("emdask", {}))


class _LogTee(io.TextIOBase):
    """stderr that is also appended to the run's log; progress bars redrawn with a
    carriage return reach the log as their last state only."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def isatty(self) -> bool:
        return self.stream.isatty()

    def write(self, text: str) -> int:
        self.stream.write(text)
        if text.startswith("\r"):
            self.pending = text[1:]
            return len(text)
        if self.pending:
            self.log.write(self.pending)
            self.pending = ""
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


@contextlib.contextmanager
def _log_to_store(store: str) -> Iterator[None]:
    """Append what the run prints to ``emdask.log`` in the store (written once the run
    ends, or fails, for a remote store)."""
    local = _local_path(store)
    buffer = io.StringIO()
    log = buffer
    if local is not None:
        Path(local).mkdir(parents=True, exist_ok=True)
        log = open(Path(local, "emdask.log"), "a")  # noqa: SIM115 - closed below
    log.write(f"\n== emdask run, {_now()}\n")
    tee = _LogTee(sys.stderr, log)
    try:
        with contextlib.redirect_stderr(tee):
            yield
    except BaseException as err:
        log.write(f"failed: {type(err).__name__}: {err}\n")
        raise
    finally:
        log.flush()
        if local is None:
            with contextlib.suppress(Exception):  # the log must not hide the run's error
                old = get_bytes(store, "emdask.log") if "emdask.log" in _list(store, "") \
                    else b""
                put_bytes(store, "emdask.log", old + buffer.getvalue().encode())
        else:
            log.close()


def plan(cfg: RunConfig, stages: list[str], checked: _Checked | None = None) -> str:
    """What a run would do: its stages with blocks, outputs and their sizes, and the
    memory a task needs (estimates), as text (``emdask run CONFIG --dry-run``)."""
    from emdask.watershed import HALO

    checked = checked or _preflight(cfg, stages)
    vol = checked.vol
    shape = tuple(int(n) for n in vol.shape)
    grid = Grid(shape, _chunks(cfg, checked.factor))
    n_vox, block_vox = float(np.prod(shape)), float(np.prod(grid.chunks))
    done = (checked.existing or {}).get("stages", {})
    thresholds = cfg.segment.thresholds

    def size(nbytes: float) -> str:
        for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
            if nbytes >= scale:
                return f"{nbytes / scale:.1f} {unit}"
        return f"{nbytes / 1e3:.1f} kB"

    def net_task(model) -> tuple[float, str]:
        from emdask.predict import _input_shape, halo_overhead, inference_net

        group = _task_blocks(cfg, model, grid)
        task = np.minimum(np.multiply(group, grid.chunks), shape)
        net = inference_net(model, _device(cfg.predict), cfg.predict.precision)
        return (net.inference_bytes(_input_shape(net, task)),
                (f"tasks of {task.tolist()} voxels ({str(net.dtype)[6:]}; context "
                 f"computed twice: x{halo_overhead(model, shape, task):.2f} the FLOPs of "
                 "one pass)"))

    lines = [f"emdask run plan ({'dry run: nothing is computed or written'})",
             f"  input    {vol.attrs['source']}: {shape} voxels (z, y, x) at "
             f"{tuple(vol.attrs['voxel_size'])} nm, {vol.dtype}"
             + (f", region of interest from voxel {list(checked.roi_begin)}"
                if cfg.input.roi else ""),
             f"  output   {cfg.output.path}"
             + (" (exists: " + (", ".join(k for k, v in done.items() if v.get("finished"))
                                or "no stage finished") + ")" if checked.existing else " (new)"),
             f"  blocks   {len(grid)} of {grid.chunks} voxels ({grid.counts} per axis)",
             f"  intensity {cfg.input.intensity!r}",
             "  stages:"]
    memory = {}
    for stage in stages:
        status = "done" if done.get(stage, {}).get("finished") else "to run"
        if stage == "align":
            if cfg.align is None:
                continue
            what, memory[stage] = "fields (global solve), then aligned/ and defects/", 0.8e9
        elif stage == "predict" and cfg.affinities is not None:
            what, memory[stage] = (f"no net: affinities given ({cfg.affinities.url}); raw "
                                   "copied to raw/"), 0.0
        elif stage == "predict":
            model = checked.model
            memory[stage], tasks = net_task(model)
            what = (f"{cfg.predict.model} net (halo {model.halo}) -> affinities/ "
                    f"{size(len(model.config.offsets) * n_vox * np.dtype(cfg.predict.dtype).itemsize)}"
                    f", {tasks}")
        elif stage == "watershed":
            what = "block basins and region graphs -> _emdask/basins"
            memory[stage] = 40.0 * float(np.prod([c + 2 * HALO for c in grid.chunks]))
        elif stage == "agglomerate":
            what = f"one global solve, thresholds {thresholds}"
            memory[stage] = 7.5 * n_vox  # the global graph: 7.5 GB per gigavoxel measured
        elif stage == "relabel":
            what = (f"-> fragments/ and {len(thresholds)} segmentation(s), uint64, "
                    f"{size(8 * n_vox * (1 + len(thresholds)))}")
            memory[stage] = (12.0 + 8 * (1 + len(thresholds))) * block_vox
        elif stage == "synapses":
            if cfg.synapses is None:
                continue
            s = cfg.synapses
            what = (f"{s.model} net -> synapse_probabilities/, objects (threshold "
                    f"{s.threshold}, min size {s.min_size}"
                    + (f", at most {s.max_extent:g} nm long"
                       if s.max_extent and np.isfinite(s.max_extent) else "")
                    + f"), partners within {s.radius}")
            memory[stage], tasks = net_task(checked.synapse_model)
            what += f", {tasks}"
        elif stage == "skeletons":
            what = "TEASAR skeletons (kimimaro) of the same, joined across blocks"
            memory[stage] = 100.0 * block_vox
        elif stage == "errors":
            memory[stage] = 0.0
            if cfg.errors is None:
                what = "skipped (no [errors] section)"
            else:
                e = cfg.errors
                what = ("split candidates (contacts, model " + (e.split_model or "none")
                        + f", segments under {e.floor} voxels joined) and merge candidates"
                        " (net " + (e.merge_model or "none")
                        + " along the skeletons) -> errors.parquet")
                memory[stage] = 40.0 * block_vox
        elif stage == "correct":
            what = ("skipped (no [errors] section)" if cfg.errors is None else
                    f"the decisions of {EDITS} (first: "
                    + ("the candidates above the models' thresholds" if cfg.errors.auto
                       else "none, auto = false") + f") applied -> segmentation_..{CORRECTED}")
            memory[stage] = 24.0 * block_vox if cfg.errors is not None else 0.0
        elif stage == "meshes":
            t = cfg.meshes.segmentation
            what = (f"marching cubes of segmentation_"
                    f"{cfg.segment.thresholds[-1] if t is None else t:g} -> "
                    "precomputed meshes beside it")
            memory[stage] = 60.0 * block_vox
        elif stage == "pyramid":
            from emdask.pyramids import pyramid_factors

            factors = pyramid_factors(shape, vol.attrs["voxel_size"])
            what = (f"{len(factors)} downsampled levels (s1...) of every image and label, "
                    f"factors {[list(f) for f in factors]}")
            memory[stage] = 8 * 8.0 * block_vox * (1 + 8)  # 8 blocks below, uint64
        else:
            what = ("scores against " + cfg.evaluate.url if cfg.evaluate else "no ground "
                    "truth: figure only")
            memory[stage] = 24.0 * n_vox if cfg.evaluate else 0.0
        lines.append(f"    {stage:<12} {status:<7} {what}"
                     + (f"; ~{size(memory[stage])} per task" if memory[stage] else ""))
    c = cfg.cluster
    workers = (f"{c.n_workers or 'one per core'} worker(s) x {c.threads_per_worker} thread(s)"
               if c.kind == "local" else f"{c.kind} jobs ({c.minimum_jobs}-{c.maximum_jobs})")
    if memory:
        largest = max(memory, key=memory.get)
        lines.append(f"  cluster  {c.kind}: {workers}, memory limit {c.memory_limit}; a worker "
                     f"needs about {size(memory[largest])} per thread (largest task: "
                     f"{largest}; estimates)")
    return "\n".join(lines)


def _expand(stages: Sequence[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    out = []
    for s in stages:
        names = ["watershed", "agglomerate", "relabel"] if s == "segment" else [s]
        for n in names:
            if n not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}, segment")
            out.append(n)
    return [s for s in STAGES if s in out]


def _run(cfg: RunConfig, stages: list[str], overwrite: bool, client, checked: _Checked,
         held: Lease) -> dict:
    from emdask.volumes import create_volume

    full, vol, roi_begin, model = checked.full, checked.vol, checked.roi_begin, checked.model
    shape = tuple(int(n) for n in vol.shape)
    voxel_size, offset = vol.attrs["voxel_size"], vol.attrs["offset"]
    store = cfg.output.path
    root = open_root(store)
    timings = {}
    factor = checked.factor
    grid = Grid(shape, _chunks(cfg, factor))
    meta = dict(root.attrs.get("emdask", {}))
    meta.update({"config": asdict(cfg), "factor": list(factor),
                 "resample": list(checked.resample),
                 "roi_begin": list(roi_begin), "input_shape": list(shape)})
    root.attrs["emdask"] = meta
    ctx = _Context(store, grid, roi_begin=roi_begin, predict=cfg.predict,
                   segment=cfg.segment, generation=time.time_ns())
    print(f"emdask run: {vol.attrs['source']} {shape} voxels at {voxel_size} nm, "
          f"{len(grid)} blocks of {grid.chunks} -> {store}", file=sys.stderr)
    if tuple(grid.chunks) != tuple(cfg.output.chunks):
        print(f"  output.chunks {list(cfg.output.chunks)} rounded up to multiples of the "
              f"net's pooling factor {list(factor)}", file=sys.stderr)
    if cfg.evaluate is not None and "report" in stages:
        check_offsets(cfg, full, roi_begin, vol)
    for stage in stages:
        held.check()
        if stage not in ("align", "predict") and cfg.affinities is None and not has(
                root, "affinities"):
            raise ValueError(f"{store}: stage {stage!r} needs the predict stage's output "
                             "(affinities); run it first")
        _check_upstream(root, cfg, stage, stages)
        _check_stage(root, cfg, stage, overwrite)
        t0 = time.perf_counter()
        extra = None
        if stage == "align":
            if cfg.align is None:
                print("  align: no [align] section configured; skipped", file=sys.stderr)
                extra = {"skipped": True}
            else:
                actx = replace(ctx, source=full.encoding["source"])
                extra = _align(client, actx, cfg, vol)
        elif stage == "predict":
            fresh = _fresh(store, stage)
            if cfg.align is None and (fresh or not has(root, RAW)):
                # the EM segmented, kept for viewing (float64, which viewers do not read,
                # as float32)
                create_volume(store, RAW, shape, np.float32 if vol.dtype == np.float64
                              else vol.dtype, grid.chunks, voxel_size, offset, overwrite=True)
            if cfg.affinities is not None:
                print(f"  predict: affinities given ({cfg.affinities.url}); no prediction",
                      file=sys.stderr)
                _run_blocks(client, replace(ctx, source=full.encoding["source"]), stage,
                            _copy_raw_task, cfg.cluster)
            else:
                if fresh or not has(root, "affinities"):
                    create_volume(store, "affinities", (len(model.config.offsets), *shape),
                                  cfg.predict.dtype, grid.chunks, voxel_size, offset,
                                  attrs={"offsets": [list(o) for o in model.config.offsets]},
                                  overwrite=True)
                source, begin, mask, name = _raw(cfg, root, full, roi_begin)
                # "auto" decided here, once, as the stage's record says (not per worker)
                spec = replace(cfg.predict, precision=_precision(cfg.predict,
                                                                 cfg.predict.model))
                pctx = _Context(store, grid, source=source, roi_begin=begin,
                                predict=spec, segment=cfg.segment,
                                generation=ctx.generation, mask=mask, source_name=name,
                                intensity=_intensity(cfg, root, vol, model),
                                copy_raw=cfg.align is None)
                _run_blocks(client, pctx, stage, _predict_task, cfg.cluster,
                            group=_task_blocks(cfg, model, grid, client))
        elif stage == "watershed":
            classifier = classifier_of(cfg.segment)
            if classifier is not None and classifier.raw and (
                    not has(root, RAW) or root[f"{RAW}/s0"].dtype != np.uint8):
                raise ValueError(f"{store}: [segment] classifier {cfg.segment.classifier!r} "
                                 f"reads the EM (uint8 {RAW}/s0 in the store), but the store "
                                 f"has {root[f'{RAW}/s0'].dtype if has(root, RAW) else 'none'}")
            if _fresh(store, stage) or not has(root, "_emdask/basins"):
                root.create_array("_emdask/basins", shape=shape, chunks=grid.chunks,
                                  dtype=np.uint32, fill_value=0, overwrite=True)
            wctx = ctx if cfg.affinities is None else replace(
                ctx, source=(given := _affinities_given(cfg, full, vol, roi_begin))[0],
                roi_begin=given[1])
            _run_blocks(client, wctx, stage, _watershed_task, cfg.cluster)
        elif stage == "agglomerate":
            extra = _agglomerate(client, ctx, cfg)
        elif stage == "relabel":
            fresh = _fresh(store, stage)
            for name in label_datasets(cfg.segment):
                if fresh or not has(root, f"{LABELS}/{name}"):
                    create_volume(store, f"{LABELS}/{name}", shape, np.uint64, grid.chunks,
                                  voxel_size, offset, overwrite=True)
            _run_blocks(client, ctx, stage, _relabel_task, cfg.cluster)
        elif stage == "synapses":
            if cfg.synapses is None:
                print("  synapses: no [synapses] model configured; skipped", file=sys.stderr)
                extra = {"skipped": True}
            else:
                extra = _synapses(client, ctx, cfg, full, vol, roi_begin,
                                  checked.synapse_model)
        elif stage == "pyramid":
            extra = _pyramid(client, ctx, cfg, vol)
        elif stage == "meshes":
            extra = _meshes(client, ctx, cfg, vol)
        elif stage == "skeletons":
            extra = _skeletons(client, ctx, cfg, vol)
        elif stage in ("errors", "correct"):
            if cfg.errors is None:
                print(f"  {stage}: no [errors] section configured; skipped", file=sys.stderr)
                extra = {"skipped": True}
            else:
                step = _errors if stage == "errors" else _correct
                extra = step(client, ctx, cfg, root, _stored_affinities(
                    cfg, root, full, vol, roi_begin))
        elif stage == "report":
            from emdask.volumes import open_volume

            if cfg.affinities is None:
                affs = open_volume(store, "affinities")
            else:  # the user's, in the region of interest
                import dask.array as da

                source, begin = _affinities_given(cfg, full, vol, roi_begin)
                affs = da.from_array(source)[(slice(None), *Box(begin, np.add(
                    begin, vol.shape)).slices())]
            extra = {"scores": report(cfg, vol, roi_begin, affs)}
        timings[stage] = time.perf_counter() - t0
        client.run(clear_chunk_cache)  # (the next stage's tasks have no use for them)
        _ngff_index(root)
        _finish_stage(root, stage, timings[stage], extra)
        print(f"  {stage}: {timings[stage]:.1f} s", file=sys.stderr)
    return {"timings": timings, "store": store,
            "stages": dict(root.attrs["emdask"]["stages"])}
