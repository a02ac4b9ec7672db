"""segment(): blockwise on Dask, identical for any chunking, with clear errors."""

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from emdask import contingency_table, open_volume, save_volume
from emdask.affinities import affinities_from_labels
from emdask.segmentation import segment

THRESHOLDS = [0.05, 0.15, 0.25]


def noisy_affinities(labels: np.ndarray, seed: int = 0, sigma=(0, 1, 1, 1), noise=0.1):
    """Affinities of ground truth, blurred and with Gaussian noise: a stand-in for a net."""
    affs, _ = affinities_from_labels(labels)
    affs = ndi.gaussian_filter(affs, sigma)
    rng = np.random.default_rng(seed)
    return np.clip(affs + rng.normal(0, noise, affs.shape), 0, 1).astype(np.float32)


def assert_same_partition(a: np.ndarray, b: np.ndarray):
    """Every segment of ``a`` maps to exactly one of ``b`` and vice versa (contingency)."""
    ia, ib, _ = contingency_table(b, a + 1)  # +1: no id is background here
    assert np.unique(ia).size == ia.size, "a segment of a is split in b"
    assert np.unique(ib).size == ib.size, "a segment of b is split in a"


def _run(affs, chunks, **kwargs):
    segs = segment(da.from_array(affs, chunks=(3, *chunks)), THRESHOLDS,
                   return_fragments=True, **kwargs)
    return np.stack(dask.compute(*segs, scheduler="threads"))


def _check_invariance(affs, chunkings, **kwargs):
    ref = _run(affs, affs.shape[1:], **kwargs)  # a single chunk
    for level in ref:
        assert 1 < np.unique(level).size < level.size  # a real segmentation, not trivia
    for chunks in chunkings:
        out = _run(affs, chunks, **kwargs)
        for r, o in zip(ref, out, strict=True):
            assert_same_partition(r, o)
            np.testing.assert_array_equal(r, o)  # even the ids agree
    return ref


def test_invariant_to_chunking_random_affinities():
    affs = np.random.default_rng(1).random((3, 21, 26, 23)).astype(np.float32)
    _check_invariance(affs, [(7, 9, 11), (10, 13, 4), (5, 25, 22)])


def test_invariant_to_chunking_uint8_plateaus():
    """uint8 affinities have many ties: plateaus must be resolved the same way."""
    rng = np.random.default_rng(2)
    affs = (rng.integers(0, 6, (3, 18, 19, 17)) * 51).astype(np.uint8)
    _check_invariance(affs, [(7, 8, 9), (4, 11, 6), (17, 5, 16)])


def test_invariant_to_chunking_medulla(shared_file):
    gt = open_volume(shared_file("medulla"), "labels/neuron_ids")[:60, :100, :100].values
    affs = noisy_affinities(gt)
    ref = _check_invariance(affs, [(23, 41, 37), (60, 33, 51), (17, 100, 29)])
    assert np.unique(ref[-1]).size > 20


def test_invariant_to_chunking_cremi(shared_file):
    gt = open_volume(shared_file("cremi"), "labels/neuron_ids")[:, :300, :].values
    affs = noisy_affinities(gt, sigma=(0, 0, 1, 1))
    _check_invariance(affs, [(2, 77, 93), (3, 131, 61), (5, 101, 57)])


def test_segmentation_is_accurate_on_noisy_ground_truth(shared_file):
    from emdask import evaluate

    gt = open_volume(shared_file("medulla"), "labels/neuron_ids")[:60, :100, :100].values
    segs = segment(noisy_affinities(gt), [0.1, 0.2, 0.25])
    best = min(evaluate(s.compute(), gt)["voi"] for s in segs)
    assert best < 1.0


def test_dataarray_in_dataarray_out(tmp_path):
    from emdask.volumes import as_volume

    affs = as_volume(np.random.default_rng(3).random((3, 8, 9, 10)).astype(np.float32),
                     voxel_size=(40, 4, 4), offset=(400, 0, 8))
    [seg] = segment(affs, [0.5])
    assert seg.dims == ("z", "y", "x") and seg.dtype == np.uint64
    assert seg.attrs["voxel_size"] == (40.0, 4.0, 4.0) and float(seg.x[0]) == 8.0
    saved = save_volume(seg, tmp_path / "o.zarr", "segmentation")
    np.testing.assert_array_equal(saved.values, seg.values)


def test_thresholds_give_nested_segmentations():
    affs = np.random.default_rng(4).random((3, 12, 12, 12)).astype(np.float32)
    segs = [s.compute() for s in segment(affs, [0.2, 0.4, 0.6, 0.8])]
    counts = [np.unique(s).size for s in segs]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for finer, coarser in itertools.pairwise(segs):  # each segment lies inside one coarser one
        f, _, _ = contingency_table(coarser, finer + 1)
        assert np.unique(f).size == f.size


def test_graph_info():
    affs = np.random.default_rng(5).random((3, 10, 10, 10)).astype(np.float32)
    _, info = segment(da.from_array(affs, chunks=(3, 5, 5, 5)), [0.5], return_info=True)
    info = info.compute()
    assert info.n_blocks == 8 and info.n_supervoxels <= info.n_basins
    assert info.graph_nbytes > 0 and info.n_edges > 0


# ---------------------------------------------------------------- bad input
def test_error_wrong_channel_count():
    with pytest.raises(ValueError, match="3 nearest-neighbour channels .* got 5"):
        segment(np.zeros((5, 4, 4, 4), np.float32), [0.5])


def test_error_not_4d():
    with pytest.raises(ValueError, match=r"must be 4-D \(3, z, y, x\), got 3-D"):
        segment(np.zeros((4, 4, 4), np.float32), [0.5])


def test_error_nan():
    affs = np.full((3, 12, 12, 12), 0.5, np.float32)
    affs[1, 8, 8, 8] = np.nan
    [seg] = segment(da.from_array(affs, chunks=(3, 6, 6, 6)), [0.5])
    with pytest.raises(ValueError, match=r"block at voxel \(6, 6, 6\): affinities contain NaN"):
        seg.compute()


def test_error_out_of_range():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], found \[2, 2\]"):
        segment(np.full((3, 4, 4, 4), 2.0, np.float32), [0.5])[0].compute()


def test_uint8_is_scaled():
    f = np.random.default_rng(6).integers(0, 256, (3, 9, 9, 9)).astype(np.uint8)
    a = segment(f, [0.5])[0].compute()
    b = segment(f.astype(np.float32) / 255, [0.5])[0].compute()
    np.testing.assert_array_equal(a, b)


def test_error_thresholds_out_of_order():
    with pytest.raises(ValueError, match="strictly increasing"):
        segment(np.zeros((3, 4, 4, 4), np.float32), [0.5, 0.3])


def test_error_bad_dtype():
    with pytest.raises(ValueError, match="float in \\[0, 1\\] or uint8"):
        segment(np.zeros((3, 4, 4, 4), np.int32), [0.5])


def test_zarr_input_is_read_again_for_relabelling(tmp_path):
    """The relabel pass reads blocks straight from the store (memory bound)."""
    affs = np.random.default_rng(7).random((3, 12, 12, 12)).astype(np.float32)
    save_volume(affs, tmp_path / "a.zarr", "affinities", voxel_size=(1, 1, 1),
                chunks=(6, 6, 6))
    vol = open_volume(tmp_path / "a.zarr", "affinities")
    [seg] = segment(vol, [0.5])
    from dask.core import get_dependencies

    dsk = dict(seg.data.__dask_graph__())
    step = lambda k: k[0].split("-")[-1] if isinstance(k, tuple) else k
    relabel = [k for k in dsk if step(k) == "relabel"]
    assert len(relabel) == 8
    for k in relabel:  # each reads its block itself, needing only its lookup tables
        assert sorted(step(d) for d in get_dependencies(dsk, k)) == ["input", "lut"]
    np.testing.assert_array_equal(seg.values, segment(affs, [0.5])[0].compute())


def test_changed_zarr_input_is_not_reread_from_the_store(tmp_path):
    affs = np.random.default_rng(8).random((3, 12, 12, 12)).astype(np.float32)
    save_volume(affs, tmp_path / "a.zarr", "affinities", voxel_size=(1, 1, 1),
                chunks=(6, 6, 6))
    flipped = open_volume(tmp_path / "a.zarr", "affinities").isel(x=slice(None, None, -1))
    [seg] = segment(flipped, [0.5], size_threshold=0)
    expected = segment(np.ascontiguousarray(affs[..., ::-1]), [0.5], size_threshold=0)[0]
    np.testing.assert_array_equal(seg.values, expected.compute())


def test_error_quantile_score_without_histogram():
    # caught when the graph is built, not after the first pass has run
    with pytest.raises(ValueError, match="score 'median' needs a histogram: bins must be >= 2"):
        segment(np.ones((3, 4, 4, 4), np.float32), [0.5], score="median", bins=0)


@pytest.mark.parametrize("chunks", [(3, 7, 4), (12, 12, 12), (5, 2, 11)])
def test_stored_input_gives_the_in_memory_result(tmp_path, chunks):
    """Blocks read straight from the file (chunks thinner than the halo included)."""
    affs = noisy_affinities(np.random.default_rng(9).integers(1, 4, (14, 13, 12)), seed=3)
    save_volume(affs, tmp_path / "a.zarr", "affinities", voxel_size=(1, 1, 1), chunks=chunks)
    stored = segment(open_volume(tmp_path / "a.zarr", "affinities"), THRESHOLDS,
                     return_fragments=True)
    memory = _run(affs, affs.shape[1:])
    np.testing.assert_array_equal(np.stack([s.values for s in stored]), memory)


@pytest.mark.parametrize("solve", ["tree", "global"])
def test_graph_is_built_in_linear_time(solve):
    """segment() writes its tasks into one graph layer: building it for 1728 blocks takes
    well under a second (dask.delayed needed minutes: quadratic in the blocks)."""
    import time

    affs = da.zeros((3, 96, 96, 96), np.float32, chunks=(3, 8, 8, 8))
    t0 = time.perf_counter()
    [seg] = segment(affs, [0.5], solve=solve)
    assert time.perf_counter() - t0 < 5
    graph = seg.__dask_graph__()
    assert len(graph.layers) < 20  # the input's few, and two: not one per task
    own = sum(len(layer) for name, layer in graph.layers.items()
              if name.startswith("segment-"))
    # a fixed number of tasks per block, face and box of the tree solve (about 21)
    assert own < 24 * 1728


def test_the_global_step_runs_as_asked():
    from emdask.segmentation import TREE_MIN_BLOCKS, use_tree

    assert use_tree("tree", "max") and not use_tree("global", "mean")
    # auto: the tree for a large volume with a score that allows it
    assert use_tree("auto", "mean", TREE_MIN_BLOCKS + 1)
    assert not use_tree("auto", "mean", TREE_MIN_BLOCKS)
    assert not use_tree("auto", "learned", 10 * TREE_MIN_BLOCKS)
    with pytest.raises(ValueError, match="solve = 'tree' works for the scores"):
        use_tree("tree", "quantile-75")
    with pytest.raises(ValueError, match="solve = 'trees': use 'auto', 'global' or 'tree'"):
        segment(np.ones((3, 4, 4, 4), np.float32), [0.5], solve="trees")


def test_info_and_segmentation_computed_together():
    affs = np.random.default_rng(3).random((3, 10, 12, 12)).astype(np.float32)
    segs, info = segment(da.from_array(affs, chunks=(3, 5, 6, 6)), [0.5], return_info=True)
    for args in [(info, segs[0]), (segs[0], info)]:  # the graphs merge in either order
        out = dask.compute(*args, optimize_graph=False)
        assert {type(o).__name__ for o in out} == {"SegmentationInfo", "ndarray"}


def test_a_sweep_computed_one_threshold_at_a_time_costs_one_pass(monkeypatch):
    """The net upstream, the watershed and the solve run once for all thresholds, however
    the segmentations are consumed (local schedulers)."""
    import dask.array as da

    from emdask import segmentation

    calls = {"upstream": 0, "summary": 0}

    def upstream(block):
        calls["upstream"] += 1
        return block

    summary = segmentation._block_basins

    def counted(*args, **kwargs):
        calls["summary"] += 1
        return summary(*args, **kwargs)

    monkeypatch.setattr(segmentation, "_block_basins", counted)
    affs = np.random.default_rng(0).random((3, 32, 64, 64)).astype(np.float32)
    lazy = da.from_array(affs, chunks=(3, 16, 32, 32)).map_blocks(
        upstream, meta=np.zeros((0, 0, 0, 0), np.float32))
    segs = segmentation.segment(lazy, [0.3, 0.5, 0.7], size_threshold=5)
    one_at_a_time = [np.asarray(s) for s in segs]
    assert calls == {"upstream": 8, "summary": 8}  # 8 blocks, one pass
    together = segmentation.segment(affs, [0.3, 0.5, 0.7], size_threshold=5)
    for a, b in zip(one_at_a_time, together, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    name = next(iter(segmentation._SWEEP_CACHE.live))
    del segs, together
    import gc

    gc.collect()
    assert name not in segmentation._SWEEP_CACHE.live  # blocks dropped with the arrays
    assert not any(k[0] == name for k in segmentation._SWEEP_CACHE.data)


def test_volumes_thinner_than_the_halo():
    """A block padded beyond a volume of 1-2 sections (its edges' positions clipped)."""
    for shape in [(2, 9, 10), (1, 12, 12)]:
        affs = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
        whole = _run(affs, shape)
        for chunks in [(shape[0], 5, 4), (1, 6, 6)]:
            np.testing.assert_array_equal(_run(affs, chunks), whole)
