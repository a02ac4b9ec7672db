"""The tree solve (emdask.solve_tree) gives the single global solve's answer exactly."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from emdask import solve_tree
from emdask.agglomerate import _run
from emdask.region_graph import RegionGraph, face_links
from emdask.segmentation import _block_basins, _solve
from emdask.watershed import HALO, WatershedParams


def summaries(affs, chunks, params, bins=0):
    """Block summaries and face links of ``affs`` cut into ``chunks`` (as segment does)."""
    shape = affs.shape[1:]
    starts = [np.r_[0, np.cumsum(c)[:-1]] for c in chunks]
    grid = tuple(len(c) for c in chunks)
    padded = np.pad(affs, [(0, 0)] + [(HALO, HALO)] * 3)
    out = []
    for idx in np.ndindex(*grid):
        o = [int(starts[d][idx[d]]) for d in range(3)]
        box = padded[(slice(None), *(slice(o[d], o[d] + chunks[d][idx[d]] + 2 * HALO)
                                     for d in range(3)))]
        out.append(_block_basins(box, o, shape, params, bins))
    ids = np.arange(np.prod(grid)).reshape(grid)
    pairs, links = [], []
    for idx in np.ndindex(*grid):
        for d in range(3):
            if idx[d] > 0:
                below = list(idx)
                below[d] -= 1
                a, b = int(ids[tuple(below)]), int(ids[idx])
                pairs.append((a, b))
                links.append(face_links(out[b][3], out[a][3], d, params.quantized()[1], bins))
    return out, pairs, links, grid


def random_case(seed):
    rng = np.random.default_rng(seed)
    params = WatershedParams(float(rng.choice([0.0, 0.1])), float(rng.choice([0.8, 0.99])),
                             int(rng.choice([0, 10, 50, 200])),
                             float(rng.choice([0.1, 0.3, 0.6])), int(rng.choice([0, 5, 30])))
    shape = tuple(int(s) for s in rng.integers(10, 22, 3))
    chunks = []
    for s in shape:  # 1 to 4 blocks of random sizes (one voxel thin included)
        k = int(rng.integers(1, 5))
        cuts = np.sort(rng.choice(np.arange(1, s), k - 1, replace=False))
        chunks.append(tuple(int(c) for c in np.diff(np.r_[0, cuts, s])))
    thresholds = sorted(rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 1.0], int(rng.integers(1, 4)),
                                   replace=False).tolist())
    affs = np.stack([ndi.gaussian_filter(rng.random(shape), 1.0) for _ in range(3)])
    affs = (affs - affs.min()) / (affs.max() - affs.min())
    affs = np.round(affs * 8) / 8  # coarse values: many ties in cost
    return affs.astype(np.float32), tuple(chunks), params, thresholds, str(
        rng.choice(["mean", "max"]))


@pytest.mark.parametrize("seed", range(40))
def test_tree_gives_the_global_lookup_tables(seed):
    affs, chunks, params, thresholds, score = random_case(seed)
    out, pairs, links, grid = summaries(affs, chunks, params)
    ref_luts, ref_bases, _ = _solve([o[1] for o in out], [o[2] for o in out], links, pairs,
                                    params, thresholds, score)
    luts, bases, _ = solve_tree.solve([o[1] for o in out], [o[2] for o in out],
                                      [o[3] for o in out], grid, params, thresholds, score)
    np.testing.assert_array_equal(bases, ref_bases)
    np.testing.assert_array_equal(luts, ref_luts)  # ids included


def test_a_box_passes_up_less_than_the_global_graph():
    """Neuron-like regions in 64 blocks: the largest state one box passes up is a small
    part of the global graph (it scales with the faces, not the volume)."""
    rng = np.random.default_rng(0)
    seeds = np.zeros((48, 48, 48), np.int64)
    seeds.flat[rng.choice(seeds.size, 300, replace=False)] = np.arange(1, 301)
    labels = ndi.grey_dilation(seeds, size=3)  # grow cells: a Voronoi-like partition
    _, (near) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(near)]
    affs = np.ones((3, *labels.shape), np.float32)
    for d in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[d], hi[d] = slice(None, -1), slice(1, None)
        affs[d][tuple(hi)] = labels[tuple(hi)] == labels[tuple(lo)]
    affs = np.clip(ndi.gaussian_filter(affs, (0, 1, 1, 1))
                   + rng.normal(0, 0.1, affs.shape), 0, 1).astype(np.float32)
    params = WatershedParams(0.0001, 0.9999, 25, 0.5, 0)
    out, pairs, links, grid = summaries(affs, ((12,) * 4,) * 3, params)
    ref = _solve([o[1] for o in out], [o[2] for o in out], links, pairs, params, [0.5],
                 "mean")
    luts, _, largest = solve_tree.solve([o[1] for o in out], [o[2] for o in out],
                                        [o[3] for o in out], grid, params, [0.5], "mean")
    np.testing.assert_array_equal(luts, ref[0])
    assert largest < 0.5 * ref[2].graph_nbytes


def test_frozen_regions_block_their_cheapest_neighbours():
    # a chain 0 - 1 - 2 with 2 frozen (its edges not all known yet)
    def graph(mean01, mean12):
        q = 65535
        return RegionGraph(np.array([0, 1]), np.array([1, 2]), np.array([1, 1]),
                           np.array([round(mean01 * q), round(mean12 * q)]),
                           np.array([round(mean01 * q), round(mean12 * q)]),
                           np.zeros((2, 0), np.int64))

    frozen = np.array([False, False, True])
    # 1's cheapest edge goes to the frozen region: neither 0 nor 1 may merge yet
    reps, _, _, blocked = _run(graph(0.8, 0.9), 3, [0.5], "mean", None, None, None,
                               frozen=frozen)
    assert reps[0].tolist() == [0, 1, 2] and blocked[0].tolist() == [True, True, True]
    # 0 - 1 is the cheapest edge of both: it merges whatever 2 turns out to be
    reps, _, _, blocked = _run(graph(0.9, 0.8), 3, [0.5], "mean", None, None, None,
                               frozen=frozen)
    assert reps[0][0] == reps[0][1] != reps[0][2] and blocked[0][reps[0][0]]


def test_ties_go_to_the_regions_ranks():
    # 0 - 1 and 0 - 2 cost the same: the pair with the smaller ranks merges first, and
    # then 1 - 2's weak edge averages the merged region's edge above the threshold
    q = 65535
    g = RegionGraph(np.array([0, 0, 1]), np.array([1, 2, 2]), np.ones(3, np.int64),
                    np.array([int(0.9 * q)] * 2 + [int(0.1 * q)]),
                    np.array([int(0.9 * q)] * 2 + [int(0.1 * q)]),
                    np.zeros((3, 0), np.int64))
    by_id = _run(g, 3, [0.3], "mean", None, None, None)[0][0]
    by_rank = _run(g, 3, [0.3], "mean", None, None, None, rank=np.array([0, 9, 5]))[0][0]
    assert by_id[0] == by_id[1] != by_id[2]
    assert by_rank[0] == by_rank[2] != by_rank[1]


@pytest.mark.parametrize("score", ["mean", "max"])
def test_ties_do_not_depend_on_the_chunking(score):
    """Coarse affinities (many exact ties in cost): segment() gives one answer for any
    chunking, ids included (ties go to the regions' highest voxel index, which is the same
    however the volume is cut)."""
    import dask
    import dask.array as da

    from emdask import segment

    affs = random_case(3)[0]  # values in steps of 1/8

    def run(chunks, solve="tree"):
        segs = segment(da.from_array(affs, chunks=(3, *chunks)), [0.4, 0.5, 0.6],
                       size_threshold=10, score=score, return_fragments=True, solve=solve)
        return np.stack(dask.compute(*segs, scheduler="sync"))

    ref = run(affs.shape[1:], "global")
    assert all(np.unique(level).size > 10 for level in ref)
    for chunks in [(4, 5, 6), (7, 3, 9), (2, 11, 5)]:
        np.testing.assert_array_equal(run(chunks), ref)
