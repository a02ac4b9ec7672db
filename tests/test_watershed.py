"""In-memory kernels of the segmentation: watershed basins, region graph, agglomeration."""

import numpy as np
import pytest

from emdask.affinities import affinities_from_labels
from emdask.agglomerate import agglomerate, merge_small_regions
from emdask.region_graph import RegionGraph, combine, from_observations, region_graph
from emdask.watershed import HALO, WatershedParams, basins, quantize_affinities


def _basins(affs, **params):
    """Basins of a whole volume (one block; the halo lies outside the volume)."""
    aq = quantize_affinities(np.asarray(affs, np.float32))
    padded = np.pad(aq, [(0, 0)] + [(HALO, HALO)] * 3)
    return basins(padded, (0, 0, 0), aq.shape[1:], WatershedParams(**params))


def _line(weights):
    """A 1x1xN volume whose x-affinities are ``weights`` (weights[0] has no edge)."""
    affs = np.zeros((3, 1, 1, len(weights)), np.float32)
    affs[2, 0, 0] = weights
    return affs


def test_wall_splits_cube_into_two_basins():
    affs = np.full((3, 4, 4, 6), 0.9, np.float32)
    affs[2, :, :, 3] = 0.0  # x-edges between x=2 and x=3 are cut
    labels, _, first = _basins(affs)
    assert np.all(labels[..., :3] == 1) and np.all(labels[..., 3:] == 2)
    assert first.tolist() == [0, 3]  # lowest global index of each basin


def test_steepest_ascent_on_a_line():
    # edges: 0-1: 0.9, 1-2: 0.2, 2-3: 0.8.  Voxel 2's strongest edge leads to 3.
    labels, direction, _ = _basins(_line([0, 0.9, 0.2, 0.8]))
    assert labels[0, 0].tolist() == [1, 1, 2, 2]
    # 1 points to 0 (same m, lower index), 3 points to 2 (tie at 0.8, lower index wins)
    assert direction[0, 0].tolist() == [-1, 2, -1, 2]


def test_plateau_resolves_by_global_index():
    # a flat plateau: every voxel has the same strongest edge; all drain to the lowest index
    labels, direction, first = _basins(np.full((3, 3, 3, 3), 0.5, np.float32))
    assert np.all(labels == 1) and first.tolist() == [0]
    assert direction[0, 0, 0] == -1 and direction[1, 1, 1] == 0  # towards -z first


def test_strict_ascent_beats_lower_index():
    # voxel 1 ties between 0 (0.5) and 2 (0.5); voxel 2 has a stronger edge (0.7) to 3,
    # so 1 ascends towards 2, although 0 has the lower index
    labels, direction, _ = _basins(_line([0, 0.5, 0.5, 0.7]))
    assert direction[0, 0, 1] == 5
    assert labels[0, 0].tolist() == [1, 1, 1, 1]


def test_plateau_drains_to_its_nearest_exit():
    # 0-1-2-3 is a plateau at 0.5 whose only exit is voxel 3 (edge 0.5 to 4, which has a
    # 0.8 edge): voxels 0..2 walk the plateau towards it instead of towards index 0
    labels, direction, _ = _basins(_line([0, 0.5, 0.5, 0.5, 0.5, 0.8]))
    assert direction[0, 0].tolist()[:4] == [5, 5, 5, 5]
    assert np.unique(labels).tolist() == [1]


def test_low_threshold_makes_background():
    labels, _, _ = _basins(_line([0, 0.9, 0.01, 0.01, 0.9]), low=0.05)
    assert labels[0, 0].tolist() == [1, 1, 0, 2, 2]


def test_high_edges_join_unconditionally():
    # two strong pairs joined by a high edge; without it they would be separate basins
    w = [0, 0.995, 0.995, 0.995]
    assert np.unique(_basins(_line(w), high=0.99)[0]).tolist() == [1]
    affs = _line([0, 0.995, 0.3, 0.995])
    assert _basins(affs, high=0.99)[0][0, 0].tolist() == [1, 1, 2, 2]


def test_quantize_rejects_bad_values():
    with pytest.raises(ValueError, match="contain NaN"):
        quantize_affinities(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], found \[-0.1, 1.2\]"):
        quantize_affinities(np.array([-0.1, 1.2]))
    assert quantize_affinities(np.array([0, 255], np.uint8)).tolist() == [0, 65535]


def test_region_graph_statistics():
    labels = np.array([[[1, 1, 2, 2, 3]]])
    affs = np.zeros((3, 1, 1, 5), np.float32)
    affs[2, 0, 0] = [0, 1.0, 0.25, 1.0, 0.8]
    g = region_graph(labels, affs, bins=4)
    assert g.u.tolist() == [1, 2] and g.v.tolist() == [2, 3]
    assert g.count.tolist() == [1, 1]
    np.testing.assert_allclose(g.mean, [0.25, 0.8], atol=1e-4)
    assert g.hist.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    # two faces between the same regions add up
    labels = np.array([[[1, 2], [1, 2]]])
    affs = np.zeros((3, 1, 2, 2), np.float32)
    affs[2, 0, :, 1] = [0.2, 0.6]
    g = region_graph(labels, affs)
    assert g.count.tolist() == [2] and g.max.tolist() == [round(0.6 * 65535)]
    np.testing.assert_allclose(g.mean, [0.4], atol=1e-4)


def test_region_graphs_of_parts_combine_to_the_whole():
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 6, (4, 5, 6))
    affs = rng.random((3, 4, 5, 6)).astype(np.float32)
    whole = region_graph(labels, affs, bins=8)
    # the whole graph = graph of z<2 + graph of z>=2 + the edges across z=2
    top = region_graph(labels[:2], affs[:, :2], bins=8)
    bottom = region_graph(labels[2:], affs[:, 2:], bins=8)
    aq = quantize_affinities(affs)
    from emdask.region_graph import from_observations

    across = from_observations(labels[2].ravel(), labels[1].ravel(), aq[0, 2].ravel(), 8)
    summed = combine([top, bottom, across])
    for f in ("u", "v", "count", "total", "max", "hist"):
        np.testing.assert_array_equal(getattr(summed, f), getattr(whole, f))


def _graph(edges, bins=0):
    """RegionGraph from (u, v, [affinities...]) tuples."""
    from emdask.region_graph import from_observations

    u = [e[0] for e in edges for _ in e[2]]
    v = [e[1] for e in edges for _ in e[2]]
    w = [round(a * 65535) for e in edges for a in e[2]]
    return from_observations(np.array(u), np.array(v), np.array(w), bins)


def test_agglomerate_one_pass_threshold_sweep():
    # 0 -0.9- 1 -0.4- 2  (mean affinities): costs 0.1 and 0.6
    g = _graph([(0, 1, [0.9]), (1, 2, [0.4])])
    reps = agglomerate(g, 3, [0.05, 0.2, 0.7])
    assert [len(set(r)) for r in reps] == [3, 2, 1]
    assert reps[1][0] == reps[1][1] != reps[1][2]


def test_agglomerate_updates_mean_after_merge():
    # A-B cost .1; A-C one edge at .2, B-C three edges at .6: merged mean (0.2+1.8)/4 = 0.5
    g = _graph([(0, 1, [0.9]), (0, 2, [0.2]), (1, 2, [0.6, 0.6, 0.6])], bins=8)
    mean = agglomerate(g, 3, [0.45, 0.55])
    assert [len(set(r)) for r in mean] == [2, 1]
    # with max affinity the merged edge scores 0.6 (cost .4): all merge below 0.45
    assert len(set(agglomerate(g, 3, [0.45], score="max")[0])) == 1
    # median of {.2,.6,.6,.6} is .6, estimated from 8 bins as 0.54 (cost .46)
    assert [len(set(r)) for r in agglomerate(g, 3, [0.4, 0.5], score="median")] == [2, 1]


def _greedy(u, v, count, total, n, thresholds):
    """Agglomeration by its definition, slowly: merge the pair of regions with the lowest
    cost (1 - mean of their summed boundary), ties by their rank pair (a region's rank: the
    highest id in it), while it is below the threshold; each threshold's partition."""
    group = np.arange(n)
    out = []
    for thr in thresholds:
        while True:
            a, b = group[u], group[v]
            cut = a != b
            if not cut.any():
                break
            lo, hi = np.minimum(a, b)[cut], np.maximum(a, b)[cut]
            pairs, inv = np.unique(np.stack([lo, hi]), axis=1, return_inverse=True)
            cost = 1 - np.bincount(inv, total[cut]) / (np.bincount(inv, count[cut]) * 65535.0)
            rank = np.full(n, -1)
            np.maximum.at(rank, group, np.arange(n))
            ra, rb = rank[pairs[0]], rank[pairs[1]]
            best = np.lexsort((np.maximum(ra, rb), np.minimum(ra, rb), cost))[0]
            if cost[best] >= thr:
                break
            group[group == pairs[1, best]] = pairs[0, best]
        out.append(group.copy())
    return out


def test_agglomerate_is_the_greedy_definition():
    """Many merges of many-neighboured regions (the kernel's adjacency: parallel edges
    summed, edges moved, its table rebuilt) give the greedy partitions."""
    rng = np.random.default_rng(7)
    for n in (5, 30, 80):
        for _ in range(4):
            m = 6 * n
            u, v = rng.integers(0, n, m), rng.integers(0, n, m)
            w = rng.integers(0, 65536, m)
            g = from_observations(u, v, w)
            thresholds = [0.3, 0.5, 0.7]
            reps = agglomerate(g, n, thresholds)
            want = _greedy(g.u, g.v, g.count, g.total, n, thresholds)
            for r, groups in zip(reps, want, strict=True):
                # the same partition (representatives are the kernel's choice)
                assert len(np.unique(np.stack([r, groups]), axis=1).T) == len(set(r))
                assert len(set(r)) == len(set(groups))


def test_agglomerate_rejects_bad_thresholds_and_scores():
    g = _graph([(0, 1, [0.9])])
    with pytest.raises(ValueError, match="strictly increasing"):
        agglomerate(g, 2, [0.5, 0.2])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        agglomerate(g, 2, [1.5])
    with pytest.raises(ValueError, match="unknown score 'mode'"):
        agglomerate(g, 2, [0.5], score="mode")
    with pytest.raises(ValueError, match="needs a region graph with histogram"):
        agglomerate(g, 2, [0.5], score="median")


def test_merge_small_regions_follows_strongest_edge():
    g = _graph([(0, 1, [0.9]), (1, 2, [0.95])])
    sizes = np.array([100, 3, 100])
    assert merge_small_regions(g, sizes, 10, 0.5).tolist() == [0, 1, 1]
    assert merge_small_regions(g, sizes, 10, 0.96).tolist() == [0, 1, 2]  # edge too weak
    assert merge_small_regions(g, sizes, 2, 0.5).tolist() == [0, 1, 2]  # none small


def test_affinities_from_labels_long_range_and_mask():
    labels = np.zeros((1, 1, 6), np.uint64)
    labels[0, 0] = [1, 1, 1, 2, 2, 0]
    affs, mask = affinities_from_labels(labels, [(0, 0, -1), (0, 0, -2)])
    assert affs[0, 0, 0].tolist() == [0, 1, 1, 0, 1, 0]
    assert mask[0, 0, 0].tolist() == [0, 1, 1, 1, 1, 0]
    assert affs[1, 0, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert mask[1, 0, 0].tolist() == [0, 0, 1, 1, 1, 0]
    # label 0 as membrane (ISBI 2012): edges touching it are boundaries that count
    affs, mask = affinities_from_labels(labels, [(0, 0, -1)], background="boundary")
    assert affs[0, 0, 0].tolist() == [0, 1, 1, 0, 1, 0]
    assert mask[0, 0, 0].tolist() == [0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="background must be"):
        affinities_from_labels(labels, background="membrane")


def test_empty_graph_is_fine():
    assert len(RegionGraph.empty()) == 0
    assert agglomerate(RegionGraph.empty(), 2, [0.5]).tolist() == [[0, 1]]


def test_intensity_baseline_affinities_are_low_on_dark_membranes():
    from emdask.affinities import affinities_from_intensity

    raw = np.full((3, 20, 20), 200, np.uint8)
    raw[:, :, 10] = 20  # a dark membrane at x = 10
    affs = affinities_from_intensity(raw, sigma=0.5)
    assert affs.shape == (3, 3, 20, 20) and affs.min() >= 0 and affs.max() <= 1
    assert affs[2, :, :, 10].max() < 0.2
    assert affs[2, :, :, 5].min() > 0.8
