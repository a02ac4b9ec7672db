"""Synapse objects: blockwise connected components, identical for any chunking."""

import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi

from emdask.synapses import (
    assign_partners,
    connectivity_matrix,
    connectome,
    find_synapses,
    partner_accuracy,
    synapse_scores,
)


def test_objects_by_hand():
    mask = np.zeros((4, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels, lowest index 0
    mask[3, 4:6, 4:6] = True  # 4 voxels
    mask[1, 5, 0] = True  # 1 voxel: below min_size
    labels, table = find_synapses(da.from_array(mask, chunks=(3, 4, 5)), min_size=2,
                                  voxel_size=(40, 4, 4))
    out = labels.values
    assert out[0, 0, 0] == 1 and out[3, 5, 5] == 2 and out[1, 5, 0] == 0
    assert table["size"].tolist() == [8, 4]
    assert table.loc[0, ["z_nm", "y_nm", "x_nm"]].tolist() == [20.0, 2.0, 2.0]
    assert table.loc[1, "begin"] == (3, 4, 4) and table.loc[1, "end"] == (4, 6, 6)


@pytest.mark.parametrize("chunks", [(10, 40, 8), (3, 7, 5), (4, 16, 8)])
def test_objects_longer_than_max_extent_are_dropped(chunks):
    """The extent is the whole object's (summed over blocks): the same for any chunking."""
    p = np.zeros((10, 40, 8), np.float32)
    p[0:10, 1:3, 1:3] = 0.9  # 10 sections of 50 nm: 500 nm long in z
    p[2:4, 5:8, 5:8] = 0.9  # 100 nm in z, 12 nm in-plane
    p[6, 0:40, 7] = 0.9  # 40 x 4 nm = 160 nm long in y
    lazy = da.from_array(p, chunks=chunks)
    for max_extent, sizes in [(500, [40, 40, 18]), (450, [40, 18]), (160, [40, 18]),
                              (150, [18]), (99, [])]:
        _, table = find_synapses(lazy, 0.5, 1, voxel_size=(50, 4, 4), max_extent=max_extent)
        assert sorted(table["size"].tolist(), reverse=True) == sizes, max_extent
    with pytest.raises(ValueError, match="needs the voxel size"):
        find_synapses(lazy, 0.5, 1, max_extent=450)
    with pytest.raises(ValueError, match="positive number of nm"):
        find_synapses(lazy, 0.5, 1, voxel_size=(50, 4, 4), max_extent=-1)


def test_max_extent_from_the_card_of_the_net_that_made_the_probabilities(monkeypatch):
    """A net's card names the filter or not; the shipped card's is never mixed in, and a
    mask given by the caller is not filtered."""
    import xarray as xr

    monkeypatch.setattr("emdask.models.shipped_operating_point",
                        lambda name: {"threshold": 0.5, "min_size": 1, "max_extent": 100})
    p = np.zeros((10, 4, 4), np.float32)
    p[:, 1, 1] = 0.9  # 500 nm long
    attrs = {"voxel_size": (50, 4, 4), "threshold": 0.5, "min_size": 1}
    assert len(find_synapses(xr.DataArray(p, attrs=attrs))[1]) == 1
    assert len(find_synapses(xr.DataArray(p, attrs=attrs | {"max_extent": 450}))[1]) == 0
    assert len(find_synapses(p, voxel_size=(50, 4, 4))[1]) == 0  # the shipped card's
    assert len(find_synapses(p, voxel_size=(50, 4, 4), max_extent=np.inf)[1]) == 1
    # the caller's own threshold: not the shipped card's filter either
    assert len(find_synapses(p, 0.5, 1)[1]) == 1
    with pytest.raises(ValueError, match="the model card.*max_extent=numpy.inf"):
        find_synapses(p)
    assert len(find_synapses(p > 0.5, voxel_size=(50, 4, 4))[1]) == 1


def test_probabilities_thresholded_and_errors():
    p = np.zeros((2, 3, 3), np.float32)
    p[0, 0, 0], p[1, 2, 2] = 0.7, 0.4
    _, table = find_synapses(p, threshold=0.5, min_size=1)
    assert table["size"].tolist() == [1]
    _, table = find_synapses((p * 255).astype(np.uint8), threshold=0.3, min_size=1)
    assert table["size"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="must be 3-D"):
        find_synapses(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="float, uint8 or bool"):
        find_synapses(np.zeros((2, 2, 2), np.int32))


def test_computed_probabilities_are_computed_once():
    """find_synapses on a net's lazy output runs the net once per block, not per pass."""
    calls = {"net": 0}

    def net(block):
        calls["net"] += 1
        return block

    p = np.zeros((4, 8, 8), np.float32)
    p[0:2, 0:3, 0:3] = 0.9
    p[3, 5:8, 5:8] = 0.95
    lazy = da.from_array(p, chunks=(2, 4, 4)).map_blocks(net, meta=np.zeros((0, 0, 0), p.dtype))
    labels, table = find_synapses(lazy, threshold=0.5, min_size=1)
    assert labels.values.max() == 2 and table["size"].tolist() == [18, 9]
    assert calls["net"] == 8  # 8 blocks


@pytest.mark.parametrize("chunks", [(20, 1024, 640), (3, 97, 211), (7, 300, 64)])
def test_vnc_synapses_identical_for_any_chunking(shared_file, chunks):
    """The larval VNC synapse masks: 3-D objects, the same ids for every chunking."""
    with h5py.File(shared_file("vnc"), "r") as f:
        clefts = f["labels/clefts"][:]
    labels, table = find_synapses(da.from_array(clefts > 0, chunks=chunks), min_size=1,
                                  voxel_size=(50, 4.6, 4.6))
    labels = labels.values
    reference = _single_block(clefts)
    np.testing.assert_array_equal(labels, reference)
    _, n = ndi.label(clefts > 0)  # an independent count (6-connected)
    assert len(table) == labels.max() == n
    assert table["size"].sum() == (clefts > 0).sum()


def _single_block(clefts):
    return find_synapses(clefts > 0, min_size=1)[0].values


def test_scores_by_hand():
    gt = np.zeros((1, 10, 10), np.uint64)
    gt[0, 0:2, 0:2], gt[0, 8:10, 8:10] = 1, 2
    det = np.zeros_like(gt)
    det[0, 0:2, 0:3] = 4  # matches true object 1 (and 2 extra voxels)
    det[0, 5, 5] = 5  # a false positive, 3 voxels from object 2's corner (8, 8)
    det[0, 0, 9] = 6  # another false positive
    s = synapse_scores(det, gt, voxel_size=(1, 2, 2))
    assert (s["n_detected"], s["n_true"], s["n_matched"]) == (3, 2, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == 0.5
    assert s["f1"] == pytest.approx(0.4)
    # fp: 4 matched voxels at 0, two at 2 nm (x=2), (5,5) at 6*sqrt(2) nm, (0,9) at 16 nm
    assert s["fp_distance"] == pytest.approx((2 + 2 + 6 * np.sqrt(2) + 16) / 8)
    assert synapse_scores(gt, gt)["f1"] == 1.0 and synapse_scores(gt, gt)["fn_distance"] == 0


def test_scores_match_objects_optimally():
    # detection 5 spans true 1 and 2 (more of 2); detection 6 covers the rest of 2: the
    # greedy match (5 -> 2) would leave 1 unmatched, the optimal one matches both
    gt = np.zeros((1, 4, 12), np.uint64)
    gt[0, 0, 0:3], gt[0, 0, 3:12] = 1, 2
    det = np.zeros_like(gt)
    det[0, 0, 0:8], det[0, 0, 8:12] = 5, 6
    s = synapse_scores(det, gt)
    assert (s["n_detected"], s["n_true"], s["n_matched"]) == (2, 2, 2) and s["f1"] == 1.0


def test_scores_leave_out_cut_pieces():
    # object 3 is the 2-voxel end of a synapse cut by the region's edge
    gt = np.zeros((1, 10, 10), np.uint64)
    gt[0, 0:3, 0:3], gt[0, 9, 4:6] = 1, 3
    det = np.zeros_like(gt)
    det[0, 0:3, 0:3] = 4
    det[0, 8:10, 4:6] = 5  # detects only the piece: neither right nor wrong
    det[0, 5, 8] = 6  # a false positive
    full = synapse_scores(det, gt)
    assert (full["n_detected"], full["n_true"], full["n_matched"]) == (3, 2, 2)
    s = synapse_scores(det, gt, min_size=4)
    assert (s["n_detected"], s["n_true"], s["n_matched"]) == (2, 1, 1)
    assert s["precision"] == 0.5 and s["recall"] == 1.0
    det[0, 2, 2] = 5  # object 5 now overlaps object 1 too: it counts again
    assert synapse_scores(det, gt, min_size=4)["n_detected"] == 3
    # inside the volume a small synapse is a synapse: missed, it counts
    inner = np.zeros((3, 10, 10), np.uint64)
    inner[1] = gt[0]
    inner[1, 5, 5] = 8
    found = np.zeros_like(inner)
    found[1] = det[0]
    s = synapse_scores(found, inner, min_size=4)
    assert (s["n_true"], s["n_matched"]) == (2, 1)


def _blobs(seed: int, shape=(6, 24, 20)) -> np.ndarray:
    import cc3d

    noise = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 1.0)
    return cc3d.connected_components(noise > np.quantile(noise, 0.9),
                                     connectivity=6).astype(np.uint64)


@pytest.mark.parametrize("chunks", [(6, 24, 20), (2, 7, 9), (1, 24, 3), (4, 5, 20)])
def test_scores_are_the_same_blockwise(chunks):
    """Dask inputs are scored block by block: the same objects, matches and distances as
    the whole volume, for any chunking, and the distances those of a distance transform
    of the whole volume."""
    gt, det = _blobs(0), _blobs(1)
    det[det == det.max()] = gt.max() + 7  # ids that differ from the truth's
    vs = (40, 4, 5)
    whole = synapse_scores(det, gt, vs, min_size=6)
    assert whole["n_true"] > 5 and whole["n_detected"] > 5 and 0 < whole["n_matched"]
    s = synapse_scores(da.from_array(det, chunks=chunks), da.from_array(gt, chunks=chunks),
                       vs, min_size=6)
    assert s == pytest.approx(whole, rel=1e-12)
    # the distances by a distance transform (no object is left out at min_size 0)
    s = synapse_scores(da.from_array(det, chunks=chunks), gt, vs)
    edt = lambda target: ndi.distance_transform_edt(target == 0, sampling=vs)
    assert s["fp_distance"] == pytest.approx(edt(gt)[det > 0].mean(), rel=1e-12)
    assert s["fn_distance"] == pytest.approx(edt(det)[gt > 0].mean(), rel=1e-12)


def test_partners_and_connectome_by_hand():
    seg = np.zeros((3, 12, 12), np.uint64)
    seg[:, :, :6], seg[:, :, 6:] = 5, 7  # two cells meeting at x = 6
    seg[:, 10:, :] = 9  # a third one below
    syn = np.zeros_like(seg)
    syn[1, 2:5, 5:7] = 1  # on the 5|7 boundary
    syn[1, 8:10, 1:3] = 2  # inside cell 5, next to cell 9
    for chunks in [(3, 12, 12), (2, 5, 7)]:
        out = assign_partners(da.from_array(syn, chunks=chunks), seg, radius=(0, 2, 2))
        assert out["id"].tolist() == [1, 2]
        assert out.loc[0, ["partner_1", "partner_2"]].tolist() in ([5, 7], [7, 5])
        # rows 2-4 grown by 2 (ellipse), cells each side: the same contact
        assert out.loc[0, "contact_1"] == out.loc[0, "contact_2"] > 0
        assert out.loc[1, "partner_1"] == 5 and out.loc[1, "partner_2"] == 9
        assert (out["direction"] == "unknown").all()
    out["size"] = [6, 4]
    edges = connectome(pd.concat([out, out.iloc[[0]]]))
    assert edges[["partner_a", "partner_b", "n_synapses", "total_size"]].values.tolist() == [
        [5, 7, 2, 12], [5, 9, 1, 4]]
    assert not edges["directed"].any()
    # with a direction for synapse 1 only (9 -> 5 unknown stays unordered)
    out["pre"], out["post"] = [7, 0], [5, 0]
    edges = connectome(out)
    assert edges[["partner_a", "partner_b", "directed"]].values.tolist() == [
        [5, 9, False], [7, 5, True]]
    matrix, ids = connectivity_matrix(edges)
    assert ids.tolist() == [5, 7, 9]
    # 7 -> 5 one way; 5 - 9 of unknown direction both ways
    assert matrix.toarray().tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 0]]
    sized, _ = connectivity_matrix(edges, weight="total_size")
    assert sized[1, 0] == 6 and sized[0, 2] == sized[2, 0] == 4


def test_partner_accuracy_by_hand():
    cells = np.zeros((1, 12, 12), np.uint64)
    cells[:, :, :6], cells[:, :, 6:] = 5, 7  # two cells meeting at x = 6
    cells[:, 10:, :] = 9  # a third one below
    truth = np.zeros_like(cells)
    truth[0, 2:5, 5:7] = 1  # between cells 5 and 7
    detected = np.where(truth > 0, 3, 0).astype(np.uint64)
    detected[0, 0, 0] = 4  # a false positive: not counted
    assert partner_accuracy(detected, truth, cells, cells * 10) == (1, 1)  # renamed: right
    over = np.where(cells == 9, 1, 2)  # 5 and 7 merged: the top two are 2 and 1
    assert partner_accuracy(detected, truth, cells, over) == (0, 1)
    split = cells * 10 + (np.arange(12) >= 3)[None, :, None]  # 5 and 7 each split at y=3
    assert partner_accuracy(detected, truth, cells, split) == (1, 1)  # pieces of the cells
    one = np.where(cells == 5, 50, 0)  # cell 7 not segmented: one partner is not two
    assert partner_accuracy(detected, truth, cells, one) == (0, 1)


def test_second_partner_is_across_the_synapse():
    # a vertical density at x = 5-6; on its left one cell split in two segments (1: rows
    # < 6, 2: rows >= 6), on its right a cell (3) touching it less than either piece
    seg = np.zeros((1, 12, 12), np.uint64)
    seg[0, :6, :5], seg[0, 6:, :5], seg[0, 5:8, 7:9] = 1, 2, 3
    syn = np.zeros_like(seg)
    syn[0, 2:10, 5:7] = 1
    out = assign_partners(syn, seg, radius=(0, 3, 3))
    ranked = out["partners"][0]
    assert [s for s, _ in ranked] == [1, 3, 2] or [s for s, _ in ranked] == [2, 3, 1]
    assert ranked[1][1] < ranked[2][1]  # 3 has less contact than the other piece
    assert out.loc[0, "partner_2"] == 3
    # lazily in blocks that cut the synapse: the same
    chunked = assign_partners(da.from_array(syn, chunks=(1, 5, 4)), seg, radius=(0, 3, 3))
    assert chunked["partners"][0] == ranked
    seg[0, 4:6, 5:7] = 4  # a fragment of the density itself is no partner
    assert assign_partners(syn, seg, radius=(0, 3, 3))["partners"][0] == ranked


@pytest.mark.parametrize("chunks", [(1, 16, 13), (1, 5, 4), (1, 16, 7), (1, 7, 12)])
def test_partner_sides_do_not_depend_on_chunking(chunks):
    # narrow last chunks (13 = 7 + 6, 16 = 5 + 5 + 5 + 1) are grown for the halo: the
    # sides must still be taken at the right voxels
    seg = np.zeros((1, 16, 13), np.uint64)
    seg[0, :8, :6], seg[0, 8:, :6], seg[0, 6:10, 8:10] = 1, 2, 3
    syn = np.zeros_like(seg)
    syn[0, 3:13, 6:8] = 1
    whole = assign_partners(syn, seg, radius=(0, 3, 3))
    assert whole.loc[0, "partner_2"] == 3
    lazy = assign_partners(da.from_array(syn, chunks=chunks), seg, radius=(0, 3, 3))
    assert lazy["partners"][0] == whole["partners"][0]


def test_partner_sides_in_physical_units():
    # a sheet tilted in z-y, voxels 1.5 x 1 x 1: cells 1 (split into 1 and 3) and 2 on its
    # two sides; with the normal in the wrong units, 3 would be taken for the second partner
    vs = (1.5, 1.0, 1.0)
    zz, yy, _ = np.meshgrid(np.arange(30), np.arange(40), np.arange(6), indexing="ij")
    d = (zz * vs[0] - yy * vs[1]) / np.sqrt(2)  # signed distance (nm) to the sheet
    syn = (np.abs(d) < 0.8).astype(np.uint64)
    seg = np.where(d < 0, 1, 2).astype(np.uint64)
    seg[(d < 0) & (zz < 15)] = 3
    seg[syn > 0] = 0
    out = assign_partners(syn, seg, radius=(3, 3, 3), voxel_size=vs)
    assert {out.loc[0, "partner_1"], out.loc[0, "partner_2"]} in ({1, 2}, {3, 2})


def test_oblique_sstem_synapse_gets_sides_per_section():
    # ssTEM (50 x 5 x 5 nm): a 30-pixel density along x that moves 8 pixels in y per
    # section (pooled over sections it would look thinnest along x); the cell above it is
    # split in two (1 left, 3 right), the cell below (2) touches it over 10 pixels
    syn = np.zeros((5, 60, 80), np.uint64)
    seg = np.zeros_like(syn)
    for z in range(5):
        y0 = 10 + 8 * z
        syn[z, y0, 25:55] = 1
        seg[z, :y0, :40], seg[z, :y0, 40:], seg[z, y0 + 1:, 35:45] = 1, 3, 2
    out = assign_partners(syn, seg, radius=(0, 3, 3), voxel_size=(50.0, 5.0, 5.0))
    assert out.loc[0, "partner_1"] in (1, 3) and out.loc[0, "partner_2"] == 2


def test_sstem_sides_agree_between_sections():
    # a density turning from 43 to 47 degrees and back (eigh's sign flips near 45): the
    # cell above it is split (1 left, 3 right), cell 2 below touches less than either
    syn = np.zeros((4, 80, 80), np.uint64)
    seg = np.zeros_like(syn)
    yy, xx = np.mgrid[:80, :80] - 40.0
    for z, angle in enumerate([43, 47, 43, 47]):
        t = np.deg2rad(angle)
        across = -np.sin(t) * xx + np.cos(t) * yy  # signed distance from the density
        along = np.cos(t) * xx + np.sin(t) * yy
        syn[z][(np.abs(across) < 0.8) & (np.abs(along) < 20)] = 1
        seg[z][(across < -0.8) & (along < 0)], seg[z][(across < -0.8) & (along >= 0)] = 1, 3
        seg[z][(across > 0.8) & (np.abs(along) < 6)] = 2
    out = assign_partners(syn, seg, radius=(0, 3, 3), voxel_size=(50.0, 5.0, 5.0))
    assert out.loc[0, "partner_2"] == 2


def test_partner_radius_beyond_the_volume():
    # one section, a z radius of 2 (the evaluation works on single sections)
    syn = np.zeros((1, 8, 8), np.uint64)
    syn[0, 3:5, 4] = 1
    seg = np.full((1, 8, 8), 7, np.uint64)
    seg[..., :4] = 5
    out = assign_partners(syn, seg, radius=(2, 3, 3))
    assert {out.loc[0, "partner_1"], out.loc[0, "partner_2"]} == {5, 7}
    with pytest.raises(ValueError, match="must be 3-D"):
        assign_partners(syn[0], seg[0])


def test_partner_accuracy_polyadic():
    # cell 5 faces cells 7 (rows < 6) and 8 (rows >= 6) across x = 6; the synapse (rows 3-6)
    # touches 7 more than 8, but 8 is a postsynaptic cell too
    cells = np.zeros((1, 12, 12), np.uint64)
    cells[:, :, :6], cells[:, :6, 6:], cells[:, 6:, 6:] = 5, 7, 8
    truth = np.zeros_like(cells)
    truth[0, 3:7, 5:7] = 1
    true = assign_partners(truth, cells, radius=(0, 2, 2))
    assert true["partners"][0][:3] == [(5, 14), (7, 9), (8, 5)]  # 8: over half of 7
    seg = np.where(cells == 7, 0, cells)  # cell 7 unsegmented: the top two are 5 and 8
    assert partner_accuracy(truth, truth, cells, seg, (0, 2, 2)) == (1, 1)
    assert partner_accuracy(truth, truth, cells, seg, (0, 2, 2), second=1.0) == (0, 1)
    assert partner_accuracy(truth, truth, cells, cells, (0, 2, 2), second=1.0) == (1, 1)


def test_vnc_partners_are_the_cells_the_synapse_lies_between(shared_file):
    """With the per-section cells of the VNC labels as the segmentation, synapses touch
    two cells (the mask covers the density between them) and chunking changes nothing."""
    with h5py.File(shared_file("vnc"), "r") as f:
        clefts, cells = f["labels/clefts"][:], f["labels/cell_ids_2d"][:]
    labels, table = find_synapses(clefts > 0, min_size=1)
    whole = assign_partners(labels.values, cells, table, radius=(0, 3, 3))
    chunked = assign_partners(da.from_array(labels.values, chunks=(7, 300, 200)), cells, table,
                              radius=(0, 3, 3))
    pd.testing.assert_frame_equal(whole, chunked)
    two = (whole["partner_2"] > 0).mean()
    assert two >= 0.9, two


def test_shipped_synapse_model_finds_validation_synapses(shared_file):
    """The shipped (non-commercial) weights load offline and, chunk by chunk, find the
    labelled synapses of validation rows they never trained on."""
    from emdask import open_volume, predict_synapses
    from emdask.models import WEIGHTS_NC, available_models, pretrained
    from emdask.volumes import cutout

    assert "synapses" in available_models() and (WEIGHTS_NC / "README.md").exists()
    path = shared_file("vnc")
    roi = ((0, 768, 0), (20, 1024, 320))
    raw = cutout(open_volume(path, "raw"), *roi, units="voxel")
    truth = cutout(open_volume(path, "labels/clefts"), *roi, units="voxel").values
    prob = predict_synapses(raw.copy(data=raw.data.rechunk((10, 128, 160))),
                            pretrained("synapses", accept_licence=True))
    labels, _ = find_synapses(prob)  # the card's operating point: 0.99, 50 voxels
    scores = synapse_scores(labels.values, truth, raw.attrs["voxel_size"])
    assert scores["n_true"] >= 3 and scores["recall"] >= 0.6 and scores["precision"] >= 0.5, (
        scores)
