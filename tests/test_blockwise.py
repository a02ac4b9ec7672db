"""Boxes, grids and the two executors of a blockwise step."""

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from emdask.blockwise import Step, apply, write_blocks
from emdask.geometry import Box, Grid


def test_box_operations():
    box = Box((0, 2, 4), (3, 6, 10))
    assert box.shape == (3, 4, 6) and box.size == 72 and not box.empty
    assert box.grow((1, 2, 3)) == Box((-1, 0, 1), (4, 8, 13))
    assert box.intersect(Box((1, 0, 0), (2, 3, 5))) == Box((1, 2, 4), (2, 3, 5))
    assert box.intersect(Box((5, 5, 5), (6, 6, 6))).empty
    assert box.hull(Box((4, 0, 0), (5, 1, 1))) == Box((0, 0, 0), (5, 6, 10))
    assert box.scale((1, 2, 2)) == Box((0, 4, 8), (3, 12, 20))
    assert box.slices((0, 2, 0)) == (slice(0, 3), slice(0, 4), slice(4, 10))
    assert box.to_nm((40, 4, 4), (100, 0, 0)) == ((100.0, 8.0, 16.0), (220.0, 24.0, 40.0))
    with pytest.raises(ValueError, match="3 values"):
        Box((0, 0), (1, 1))


@pytest.mark.parametrize("chunks", [(4, 5, 6), ((4, 3), (5, 5, 1), (6, 5))])
def test_grid_boxes_tile_the_volume(chunks):
    grid = Grid((7, 11, 11), chunks)
    seen = np.zeros(grid.shape, int)
    for block, box in enumerate(grid.boxes()):
        seen[box.slices()] += 1
        assert grid.id(grid.index(block)) == block
    assert (seen == 1).all() and len(grid) == 12
    assert grid.neighbour(grid.id((1, 2, 1)), 1) == grid.id((1, 1, 1))
    assert grid.neighbour(grid.id((1, 0, 1)), 1) is None
    with pytest.raises(ValueError, match="do not add up"):
        Grid((7, 11, 11), ((4, 4), (11,), (11,)))


def _box_sum(x, where, weight=1.0):
    """Sum over each voxel's 3x3x3 neighbourhood (zeros beyond the volume)."""
    return weight * 27 * ndi.uniform_filter(x.astype(float), 3, mode="constant")[
        1:-1, 1:-1, 1:-1]


SUM = Step("sum", _box_sum, np.float64, halo=(1, 1, 1), params={"weight": 2.0})


@pytest.mark.parametrize("in_chunks", [(2, 3, 4), (1, 1, 1), (7, 9, 11), (3, 5, 2)])
@pytest.mark.parametrize("out_chunks", [(2, 2, 2), (4, 5, 6), (7, 9, 11)])
def test_lazy_steps_are_the_same_for_any_chunking(in_chunks, out_chunks):
    a = np.random.default_rng(0).random((7, 9, 11))
    whole = 2 * 27 * ndi.uniform_filter(a, 3, mode="constant")
    out = apply(SUM, da.from_array(a, chunks=in_chunks), chunks=out_chunks)
    assert out.chunksize == tuple(min(c, n) for c, n in zip(out_chunks, a.shape,
                                                             strict=True))
    np.testing.assert_allclose(out.compute(), whole)


def test_a_block_depends_only_on_the_chunks_its_halo_touches():
    x = da.zeros((40, 40, 40), chunks=10)
    out = apply(SUM, x, chunks=10)
    graph = dict(out.__dask_graph__())
    deps = [task for key, task in graph.items() if key[0] == out.name]
    # an interior block reads its 26 neighbours and itself; a corner block 8 chunks
    sizes = sorted(len([k for k in task[2:]]) for task in deps)
    assert sizes[0] == 8 and sizes[-1] == 27


def _shifted(x, mask, where):
    """Channel 0: x; channel 1: mask's voxel one below along z (a halo of 1 on mask)."""
    return np.stack([x, mask[:-2, 1:-1, 1:-1]]).astype(np.float32)


def test_inputs_with_their_own_halo_and_offset_and_channels():
    rng = np.random.default_rng(1)
    big = rng.random((10, 12, 12))
    mask = rng.random((6, 8, 8))
    step = Step("two", _shifted, np.float32, halo=((0, 0, 0), (1, 1, 1)), channels=2)
    # the output is big's region [2:8, 3:11, 1:9): offset (2, 3, 1); mask is the output's
    out = apply(step, da.from_array(big, chunks=5), da.from_array(mask, chunks=3),
                shape=(6, 8, 8), chunks=(4, 3, 5), offsets=[(2, 3, 1), (0, 0, 0)])
    got = out.compute()
    np.testing.assert_allclose(got[0], big[2:8, 3:11, 1:9])
    below = np.pad(mask, ((1, 0), (0, 0), (0, 0)))[:-1]
    np.testing.assert_allclose(got[1], below)
    # the stored executor: the same blocks, written with a callback after each
    stored, done = np.zeros((2, 6, 8, 8), np.float32), []
    grid = Grid((6, 8, 8), (4, 3, 5))
    write_blocks(step, list(grid.boxes()), [big, mask], stored, offsets=[(2, 3, 1),
                                                                          (0, 0, 0)],
                 done=done.append)
    np.testing.assert_array_equal(stored, got)
    assert done == list(range(len(grid)))


def test_a_kernel_returning_the_wrong_shape_is_named():
    step = Step("broken", lambda x, where: x[:1], np.float64)
    with pytest.raises(RuntimeError, match="step 'broken'.*shape"):
        apply(step, da.zeros((4, 4, 4), chunks=2)).compute()


def test_a_step_without_dtype_keeps_the_input_s():
    from emdask.blockwise import COPY

    x = da.from_array(np.arange(24, dtype=np.uint16).reshape(2, 3, 4), chunks=2)
    out = apply(COPY, x, offsets=[(0, 0, 0)])
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out.compute(), x.compute())
