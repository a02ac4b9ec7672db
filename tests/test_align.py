"""Section alignment: block matching, the global solve, rendering, and real stacks."""

import importlib

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import xarray as xr

from emdask.align import (
    LEVELS,
    _dense,
    _detrend,
    _hold_parts,
    _masked_ncc,
    _ncc,
    _parts,
    _smoothness,
    _solve,
    _source,
    _tiles,
    _windowed_solve,
    align,
    block_match,
    displacement_error,
    distort,
    invert_fields,
    render,
    warp_section,
)
from emdask.defects import detect_defects
from emdask.volumes import open_volume


def test_block_match_finds_a_subpixel_shift(shared_file):
    img = open_volume(shared_file("isbi"), "raw")[0].values.astype(np.float32)
    moved = ndi.shift(img, (3.3, -5.6), order=3)  # moved(p) = img(p - s)
    centres = [(150, 150), (300, 200), (250, 380)]
    templates = np.stack([img[y - 24:y + 24, x - 24:x + 24] for y, x in centres])
    windows = np.stack([moved[y - 32:y + 32, x - 32:x + 32] for y, x in centres])
    offsets, scores = block_match(templates, windows)
    np.testing.assert_allclose(offsets, [[3.3, -5.6]] * 3, atol=0.15)
    assert (scores > 0.9).all()
    # a shift beyond the search window is not reported as a match on its edge
    far = np.stack([ndi.shift(img, (12, 0))[y - 32:y + 32, x - 32:x + 32] for y, x in centres])
    offsets, _ = block_match(templates, far)
    assert np.isnan(offsets[:, 0]).all()


def test_block_match_on_blocks_partly_without_data(shared_file):
    img = open_volume(shared_file("isbi"), "raw")[0].values.astype(np.float64)
    moved = ndi.shift(img, (2.4, -3.7), order=3)
    centres = [(150, 150), (300, 200), (250, 380)]
    templates = np.stack([img[y - 24:y + 24, x - 24:x + 24] for y, x in centres])
    windows = np.stack([moved[y - 32:y + 32, x - 32:x + 32] for y, x in centres])
    # a quarter of each template and of each window lost, filled with garbage that would
    # pull a plain NCC off: the masked one matches on the data that is left
    lost_t = np.zeros(templates.shape, bool)
    lost_t[:, :, :12] = True
    lost_w = np.zeros(windows.shape, bool)
    lost_w[:, 48:] = True
    rng = np.random.default_rng(0)
    t, w = templates.copy(), windows.copy()
    t[lost_t] = rng.uniform(0, 255, lost_t.sum())
    w[lost_w] = 0
    offsets, scores = block_match(t, w, lost_w, lost_t)
    np.testing.assert_allclose(offsets, [[2.4, -3.7]] * 3, atol=0.2)
    assert (scores > 0.9).all()
    # with nothing lost the masked correlation is the plain one
    nothing_t, nothing_w = np.zeros(templates.shape, bool), np.zeros(windows.shape, bool)
    np.testing.assert_allclose(_masked_ncc(templates, windows, ~nothing_t, ~nothing_w, 0.5)[0],
                               _ncc(templates, windows)[0], atol=1e-9)
    # less than half the block with data on both sides: no match
    lost_t[:, :, :30] = True
    _, scores = block_match(t, w, lost_w, lost_t)
    assert (scores == -1).all()
    # a peak next to a shift that does not count (too little overlap) is not refined by a
    # parabola through it (that was 0.8 px off): it is rejected, as at the window's edge
    lost_w = np.zeros(windows.shape, bool)
    lost_w[:, 35:] = True  # shifts of 4 px and more down overlap less than half the block
    shifted = np.stack([ndi.shift(img, (3.3, 0), order=3)[y - 32:y + 32, x - 32:x + 32]
                        for y, x in centres])
    offsets, _ = block_match(templates, shifted, lost_w)
    assert np.isnan(offsets[:, 0]).all()

def test_global_solve_by_hand():
    # Three sections, a 2x2 grid: section 1 must move 2 pixels down relative to 0, section
    # 2 one pixel left relative to 1 (and the pair 2-0 agrees).  The weak prior towards 0
    # fixes the common frame: the corrections sum to 0.
    grid = (2, 2)
    shifts = [np.tile(s, (2, 2, 1)) for s in ([2.0, 0.0], [0.0, -1.0], [2.0, -1.0])]
    w = np.ones(grid)
    delta = _solve([(1, 0), (2, 1), (2, 0)], shifts, [w, w, w], [0, 1, 2],
                   np.zeros((3, 2, *grid)), grid, stiffness=1.0, prior=1e-6)
    d0 = -np.array([4.0, -1.0]) / 3
    for z, expected in enumerate([d0, d0 + [2, 0], d0 + [2, -1]]):
        np.testing.assert_allclose(delta[z], expected[:, None, None] * np.ones((2, 2, 2)),
                                   atol=1e-3)
    # the prior acts on the whole field: sections already displaced are pulled back by it
    current = np.zeros((3, 2, *grid))
    current[:, 0] = 5.0
    delta = _solve([(1, 0), (2, 1), (2, 0)], shifts, [w, w, w], [0, 1, 2], current, grid,
                   stiffness=1.0, prior=1e-6)
    np.testing.assert_allclose(delta[0], (d0 - [5, 0])[:, None, None] * np.ones((2, 2, 2)),
                               atol=1e-3)


def test_global_solve_is_the_least_squares_solution():
    # Random matches (some rejected: weight 0) between 5 sections on a 4 x 5 grid, solved
    # iteratively; the same objective written out densely and solved by lstsq must agree.
    rng = np.random.default_rng(1)
    grid, stiffness, prior = (4, 5), 50.0, 0.01
    sections = [0, 1, 3, 4, 6]  # 2 and 5 missing
    nz, n = len(sections), grid[0] * grid[1]
    pairs = [(z, sections[i - k]) for i, z in enumerate(sections) for k in (1, 2) if i >= k]
    shifts = [rng.normal(0, 3, (*grid, 2)) for _ in pairs]
    weights = [rng.uniform(0.2, 1, grid) * (rng.uniform(size=grid) > 0.3) for _ in pairs]
    current = rng.normal(0, 5, (nz, 2, *grid))
    delta = _solve(pairs, shifts, weights, sections, current, grid, stiffness, prior)
    pos = {z: i for i, z in enumerate(sections)}
    rows, rhs = [], []
    for (zm, zf), s, w in zip(pairs, shifts, weights, strict=True):
        zm, zf = pos[zm], pos[zf]
        for node in range(n):
            row = np.zeros(nz * n)
            row[zm * n + node], row[zf * n + node] = 1, -1
            rows.append(np.sqrt(w.ravel()[node]) * row)
            rhs.append(np.sqrt(w.ravel()[node]) * s.reshape(-1, 2)[node])
    smooth = _smoothness(*grid).toarray()
    for z in range(nz):
        for r in smooth:
            row = np.zeros(nz * n)
            row[z * n:(z + 1) * n] = np.sqrt(stiffness) * r
            rows.append(row)
            rhs.append(np.zeros(2))
    for z in range(nz):
        for node in range(n):
            row = np.zeros(nz * n)
            row[z * n + node] = np.sqrt(prior)
            rows.append(row)
            rhs.append(-np.sqrt(prior) * current[z].reshape(2, -1)[:, node])
    expected, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    np.testing.assert_allclose(delta, expected.reshape(nz, n, 2).transpose(0, 2, 1).reshape(
        nz, 2, *grid), atol=1e-5)


def _record_solves(monkeypatch) -> list[int]:
    """The number of sections of every call of ``_solve`` from now on."""
    module = importlib.import_module("emdask.align")
    sizes, solve = [], module._solve

    def recording(pairs, shifts, weights, sections, *args, **kwargs):
        sizes.append(len(sections))
        return solve(pairs, shifts, weights, sections, *args, **kwargs)

    monkeypatch.setattr(module, "_solve", recording)
    return sizes


def test_solve_in_windows_is_the_one_piece_solve(monkeypatch):
    # Random matches between 40 sections (2 and 5 missing), the pairs across section 20
    # all rejected (two parts, each held by its prior only), solved in windows of 8: the
    # sweeps and the coarse steps (20 groups, themselves in windows) find the one-piece
    # solution.  Measured: 8.6e-5 px apart.
    rng = np.random.default_rng(2)
    grid, stiffness, prior = (3, 4), 50.0, 0.01
    sections = [z for z in range(42) if z not in (2, 5)]
    pairs = [(z, sections[i - k]) for i, z in enumerate(sections) for k in (1, 2) if i >= k]
    shifts = [rng.normal(0, 3, (*grid, 2)) for _ in pairs]
    weights = [rng.uniform(0.2, 1, grid) * (rng.uniform(size=grid) > 0.3)
               * (not zf < 20 <= zm) for zm, zf in pairs]
    current = rng.normal(0, 5, (len(sections), 2, *grid))
    args = (pairs, shifts, weights, sections, current, grid, stiffness, prior)
    whole = _solve(*args)
    sizes = _record_solves(monkeypatch)
    windowed = _windowed_solve(*args, window=8)
    assert max(sizes) == 8 and len(sizes) > 10, sizes
    np.testing.assert_allclose(windowed, whole, atol=1e-3)
    # up to the window, the one-piece solve itself
    np.testing.assert_array_equal(_windowed_solve(*args, window=40), whole)


def _medulla(shared_file, n=12, size=192):
    return open_volume(shared_file("medulla"))[:n, :size, :size].values


def test_aligns_distorted_real_sections(shared_file):
    stack = _medulla(shared_file)
    distorted, truth = distort(stack, seed=3, translation=10, rotation=1.5, elastic=5,
                               max_displacement=15)
    before = displacement_error(
        xr.DataArray(np.zeros((len(stack), 2, 7, 7)), attrs={"spacing": 32}), truth)
    assert np.median(before) > 5
    result = align(da.from_array(distorted, chunks=(4, 96, 96)))
    err = displacement_error(result.fields, truth)[:, 4:-4, 4:-4]
    vec = displacement_error(result.fields, truth, vectors=True)[:, :, 4:-4, 4:-4]
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), err)
    assert np.median(err) < 1.0 and np.percentile(err, 95) < 2.0, (
        np.median(err), np.percentile(err, 95))
    assert not result.table["unreliable"].any()
    # the aligned stack is the distorted one rendered with the fields
    aligned = result.aligned.values
    ncc = [np.corrcoef(a[20:-20, 20:-20].ravel(), b[20:-20, 20:-20].ravel())[0, 1]
           for a, b in zip(aligned[1:], aligned[:-1], strict=True)]
    ncc_before = [np.corrcoef(a[20:-20, 20:-20].ravel(), b[20:-20, 20:-20].ravel())[0, 1]
                  for a, b in zip(distorted[1:], distorted[:-1], strict=True)]
    assert np.mean(ncc) > np.mean(ncc_before) + 0.2


def test_aligning_in_windows_agrees_with_one_piece(shared_file, monkeypatch):
    # 12 sections aligned with the solve in windows of 4 sections (its coarse problem, 6
    # groups of 2, is itself solved in windows): no solve holds more than 4 sections; on
    # the same matches each level's solve is the one-piece one to 1e-3 px (measured:
    # 1.9e-4 at most), and so are the fields, matched anew at each level (8.8e-5); the
    # residual against the truth is the same (median 0.533 px, p95 1.019, both).
    module = importlib.import_module("emdask.align")
    stack = _medulla(shared_file, n=12, size=128)
    distorted, truth = distort(stack, seed=3, translation=10, rotation=1.5, elastic=5,
                               max_displacement=15)
    whole = align(distorted)
    gaps, robust = [], module._robust_solve

    def compared(*args):  # each level's windowed solve against the one-piece one
        delta, weights = robust(*args)
        n = len(sizes)
        one, one_weights = robust(*args[:-1], 10 ** 6)
        del sizes[n:]  # (its solves hold all 12 sections)
        gaps.append(np.abs(delta - one).max())
        assert all(np.array_equal(a, b) for a, b in zip(weights, one_weights, strict=True))
        return delta, weights

    monkeypatch.setattr(module, "_robust_solve", compared)
    sizes = _record_solves(monkeypatch)
    windowed = align(distorted, window=4)
    assert len(gaps) == len(LEVELS) and max(gaps) < 1e-3, gaps
    assert max(sizes) == 4 and len(sizes) > 10 * len(LEVELS), sizes
    np.testing.assert_allclose(windowed.fields.values, whole.fields.values, atol=1e-3)
    errors = [displacement_error(r.fields, truth)[:, 4:-4, 4:-4] for r in (whole, windowed)]
    for q in (50, 95):
        assert abs(np.percentile(errors[1], q) - np.percentile(errors[0], q)) < 0.01


def test_sections_far_apart_are_brought_close_first(shared_file):
    # Section 4 lies 55 px down and 35 px left of its neighbours: far beyond the first
    # level's search (32 px), so whole sections are matched first.  (Before, it was
    # flagged unreliable and given its neighbours' fields.)
    stack = _medulla(shared_file, n=8, size=250)
    moved = stack.copy()
    moved[4] = ndi.shift(stack[4], (55, -35), order=1)
    truth = np.zeros((8, 2, 250, 250), np.float32)
    truth[4, 0], truth[4, 1] = -55, 35
    result = align(moved)
    assert not result.table["unreliable"].any()
    err = displacement_error(result.fields, truth)[:, 4:-4, 4:-4]
    assert np.median(err) < 0.5 and np.median(err[4]) < 1.0, np.median(err, axis=(1, 2))


def test_a_jump_just_beyond_the_first_level_is_caught(shared_file):
    # Sections 6 on lie 12 px up and 40 px left of those before: beyond the first level's
    # search (32 px), below the bar at which rough steps are used outright (48 px).  The
    # first level ties the two halves only by a few stray matches; it starts again with the
    # rough step across the jump.  (Before: residual 7.5 px median, 17.5 p95, unflagged.)
    stack = _medulla(shared_file, n=12, size=256)
    moved = stack.copy()
    moved[6:] = ndi.shift(stack[6:], (0, 12, -40), order=1)
    truth = np.zeros((12, 2, 256, 256), np.float32)
    truth[6:, 0], truth[6:, 1] = -12, 40
    result = align(moved)
    err = displacement_error(result.fields, truth)[:, 4:-4, 4:-4]
    assert np.median(err) < 0.5 and np.percentile(err, 95) < 1.5, np.median(err, axis=(1, 2))


def _align_flagging_apart(stack: np.ndarray, apart: list[int]):
    """align(stack), asserting that it warns that the sections ``apart`` lie apart from the
    rest and are given their neighbours' fields."""
    with pytest.warns(UserWarning) as caught:
        result = align(stack)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"sections {apart} lie apart") for m in messages), messages
    assert any(m.endswith(f"neighbours' fields: {apart}") for m in messages), messages
    return result


def test_a_rough_step_that_does_not_help_is_dropped(shared_file, monkeypatch):
    # The same jump, with rough steps that point the wrong way: starting from them ties the
    # stack no better, so the first level goes back to its first start, and the result is
    # that of no rough step at all.
    align_module = importlib.import_module("emdask.align")
    stack = _medulla(shared_file, n=12, size=256)
    moved = stack.copy()
    moved[6:] = ndi.shift(stack[6:], (0, 12, -40), order=1)
    steps = np.zeros((11, 2))
    monkeypatch.setattr(align_module, "_rough_steps", lambda *a: steps)
    # Without a right step the halves stay apart, and are flagged as such both times.
    none = _align_flagging_apart(moved, [6, 7, 8, 9, 10, 11]).fields.values
    steps[5] = (-12, 40)  # right: (12, -40)
    wrong = _align_flagging_apart(moved, [6, 7, 8, 9, 10, 11]).fields.values
    np.testing.assert_array_equal(wrong, none)


def test_sections_beyond_every_search_are_flagged(shared_file):
    # Sections 8 on lie 90 px right of those before: beyond the first level's search and
    # the rough steps' (a quarter of the section, 64 px).  Nothing can tie them to the
    # rest, and the later levels search a few pixels only: they are flagged, with a
    # warning that names them, not warped by stray matches.
    stack = _medulla(shared_file, n=12, size=256)
    moved = stack.copy()
    moved[8:] = ndi.shift(stack[8:], (0, 0, 90), order=1)
    result = _align_flagging_apart(moved, [8, 9, 10, 11])
    assert np.flatnonzero(result.table["unreliable"]).tolist() == [8, 9, 10, 11]
    # A failed image cuts a chain of single matches, but says nothing of where the
    # sections on either side lie: only it is flagged, not the sections before it.
    noisy = stack[:8].copy()
    noisy[3] = np.random.default_rng(0).integers(0, 256, noisy[3].shape)
    with pytest.warns(UserWarning, match="unreliable"):
        table = align(noisy, neighbours=1).table
    assert np.flatnonzero(table["unreliable"]).tolist() == [3]


def test_matching_in_tiles_gives_the_same_fields(shared_file, monkeypatch):
    # Block matching is cut into tiles of the node grid, so that a task renders and holds
    # a window of each section, not the whole section; the tiling must not change the
    # result (a defect spans several tiles).
    stack = _medulla(shared_file, n=5, size=192)
    distorted, _ = distort(stack, seed=5, translation=6, rotation=1, elastic=3)
    distorted[2, 100:160, 20:90] = 0
    whole = align(distorted)
    monkeypatch.setattr(importlib.import_module("emdask.align"), "_TILE", 64)
    tiles = _tiles((7, 7), 32, LEVELS[-1])
    assert len(tiles) == 16
    (ys, xs), _ = _source(whole.fields.values[1], 32, tiles[5], LEVELS[-1], (192, 192))
    assert ys.stop - ys.start < 120 and xs.stop - xs.start < 120  # a window, not 192 x 192
    tiled = align(distorted)
    # the same to 1e-3 px (the solve's tolerance; the matches agree to rounding)
    np.testing.assert_allclose(tiled.fields.values, whole.fields.values, atol=1e-3)
    pd.testing.assert_frame_equal(tiled.table, whole.table, atol=1e-3)


def test_inputs_numpy_backed_dataarray_and_a_defects_table_without_means(shared_file):
    stack = _medulla(shared_file, n=3, size=160)
    plain = align(stack)
    wrapped = align(xr.DataArray(stack, dims=("z", "y", "x")))
    np.testing.assert_allclose(wrapped.fields.values, plain.fields.values, atol=1e-4)
    np.testing.assert_array_equal(wrapped.aligned.values, plain.aligned.values)
    defects = detect_defects(stack)
    older = defects._replace(table=defects.table.drop(columns="mean"))
    np.testing.assert_allclose(align(stack, defects=older).fields.values,
                               plain.fields.values, atol=1e-3)


def test_parts_that_no_match_ties_move_with_the_stack():
    # Rows 0-1 and 2-3 are tied by matches, 4 by none: inside a part the corrections
    # keep their differences, and each part's common correction becomes the stack's.
    # (Sections 2 and 5 are missing: pairs name sections, delta's rows are valid ones.)
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(5, 2, 3, 3))
    w, none = np.ones((3, 3)), np.zeros((3, 3))
    valid = [0, 1, 3, 4, 6]
    pairs = [(1, 0), (3, 1), (4, 3), (6, 4)]
    part = _parts(pairs, [w, none, w, none], valid)
    np.testing.assert_array_equal(part, [0, 0, 1, 1, 2])
    out = _hold_parts(delta, part)
    common = delta.mean(axis=0)
    np.testing.assert_allclose(out[1] - out[0], delta[1] - delta[0])
    np.testing.assert_allclose(out[3] - out[2], delta[3] - delta[2])
    for part in ([0, 1], [2, 3], [4]):
        np.testing.assert_allclose(out[part].mean(axis=0), common)
    # one part: unchanged; two accepted matches do not tie a pair (they fix no affine)
    np.testing.assert_array_equal(_hold_parts(delta, _parts(pairs, [w] * 4, valid)), delta)
    two = none.copy()
    two[0, :2] = 1
    np.testing.assert_allclose(_hold_parts(delta, _parts(pairs, [w, w, w, two], valid))[4],
                               common)


def test_lost_section_does_not_tear_the_stack_apart(shared_file):
    # The medulla as 40 nm sections (each the mean of 4 slices, as a TEM image projects
    # its section), aligned as acquired, section 15 lost.  The fine levels match next to
    # nothing across the gap; the pull towards 0 then re-centred each half of the stack on
    # its own, and the sections after the gap lay 16 px from those before it.
    vol = open_volume(shared_file("medulla"))[:120, :250, :250].values.astype(np.float32)
    stack = np.rint(vol.reshape(30, 4, 250, 250).mean(axis=1)).astype(np.uint8)
    stack[15] = 0
    mean = _detrend(align(stack).fields.values.mean(axis=(2, 3)))
    assert np.linalg.norm(mean[16] - mean[14]) < 6, mean[:, 0].round(1).tolist()
    assert np.abs(mean).max() < 5, np.abs(mean).max()


def test_missing_section_is_skipped_and_interpolated(shared_file):
    stack = _medulla(shared_file, n=8, size=160)
    distorted, truth = distort(stack, seed=4, translation=6, rotation=0.5, elastic=3)
    distorted[4] = 0
    result = align(distorted)
    table = result.table.set_index("z")
    assert table.loc[4, "missing"] and table.loc[4, "interpolated"]
    assert table.loc[4, "matches"] == 0 and table.loc[5, "matches"] > 0
    fields = result.fields.values
    np.testing.assert_allclose(fields[4], (fields[3] + fields[5]) / 2, atol=1e-4)
    err = displacement_error(result.fields, truth)[[0, 1, 2, 3, 5, 6, 7], 4:-4, 4:-4]
    assert np.median(err) < 1.0
    # a float stack that marks the lost section NaN is aligned the same
    nan = distorted.astype(np.float32)
    nan[4] = np.nan
    np.testing.assert_allclose(align(nan).fields, result.fields, atol=1e-4)


def test_partly_missing_section_is_judged_by_its_data(shared_file):
    # Two thirds of section 4 are lost; its remaining third still matches well, so it is
    # aligned by its own matches (not flagged unreliable and interpolated), and is right.
    stack = _medulla(shared_file, n=8, size=192)
    distorted, truth = distort(stack, seed=5, translation=8, rotation=1.0, elastic=3)
    whole = distorted[4].copy()
    distorted[4][:, :128] = 0
    result = align(distorted)
    row = result.table.set_index("z").loc[4]
    assert not row["missing"] and not row["unreliable"] and not row["interpolated"]
    assert 0 < row["matches"] < result.table.set_index("z").loc[3, "matches"]
    err = displacement_error(result.fields, truth)[4, 4:-4, 34:-4]  # where it has data
    assert np.median(err) < 1.0, np.median(err)
    # A section that is all there but only noise (a failed image) matches nothing:
    # flagged, not warped.  (Under noise of std 1000, clipped, its smoothed image still
    # correlates 0.24 with the section: the coarse level aligns it to 2.4 px.)
    noisy = distorted.copy()
    noise = np.random.default_rng(0).normal(0, 1000, whole.shape)
    noisy[4] = np.clip(128 + noise, 0, 255).astype(np.uint8)
    with pytest.warns(UserWarning, match="unreliable"):
        table = align(noisy).table.set_index("z")
    assert table.loc[4, "unreliable"] and table.loc[4, "interpolated"]
    assert table["unreliable"].sum() == 1
    # the first section too: its evidence is its matches with the next ones
    with pytest.warns(UserWarning, match="unreliable"):
        first = align(noisy[4:]).table
    assert first["unreliable"].tolist() == [True] + [False] * 3
    # and an intact first section is not blamed for the bad one after it
    with pytest.warns(UserWarning, match="unreliable"):
        second = align(noisy[3:]).table
    assert second["unreliable"].tolist() == [False, True] + [False] * 3
    # a stack of sections that match nothing: nothing can be told apart, so it says so
    pure = np.random.default_rng(1).integers(0, 255, (4, 192, 192), dtype=np.uint8)
    with pytest.warns(UserWarning) as caught:  # which of them look unreliable is chance
        align(pure)
    assert any("typical section accepts only" in str(w.message) for w in caught)
    # Less noise: it matches at the coarse levels only, and keeps that field where finer
    # levels accept nothing (the prior alone pulled it back to 0, 7.7 px off)
    noisy[4] = np.clip(whole + noise * 250 / 1000, 0, 255).astype(np.uint8)
    result = align(noisy)
    assert not result.table["unreliable"].any()
    err = displacement_error(result.fields, truth)[4, 4:-4, 4:-4]
    assert np.median(err) < 2.0, np.median(err)


def test_intact_section_of_a_hard_stack_is_not_flagged(shared_file):
    # The CREMI crop (40 nm, 500 x 250 pixels) accepts few matches even where intact: about
    # half of its nodes at best.  Asked for more (min_matches 0.6), its last section,
    # against a partly blacked-out neighbour, falls short, but no shorter than half of what
    # its stack typically does: aligned, not flagged.
    stack = open_volume(shared_file("cremi"), "raw").values
    distorted, _ = distort(stack, seed=1)
    distorted[2] = 0
    distorted[3][125:250, 62:125] = 0
    with pytest.warns(UserWarning, match="typical section accepts only"):
        table = align(distorted, min_matches=0.6).table.set_index("z")
    assert table["missing"].tolist() == [False, False, True, False, False]
    cov = table["coverage"]
    assert cov.loc[4] < 0.6 and cov.loc[4] >= 0.5 * np.nanmedian(cov), cov.tolist()
    assert not table["unreliable"].any() and table["interpolated"].tolist() == [
        False, False, True, False, False]


def test_warp_section_in_strips_is_exact():
    # 2100 x 2100 pixels: two strips of rows; the same as interpolating all at once
    rng = np.random.default_rng(0)
    section = rng.integers(0, 255, (2100, 2100), dtype=np.uint8)
    field = rng.normal(0, 5, (2, 67, 67))
    out = warp_section(section, field, 32)
    ys, xs = np.meshgrid(np.arange(2100.0), np.arange(2100.0), indexing="ij")
    u = _dense(field, 32, ys, xs)
    expected = ndi.map_coordinates(section, [ys + u[0], xs + u[1]], order=1, cval=0)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_render_is_blockwise_and_invertible(shared_file):
    img = open_volume(shared_file("isbi"), "raw")[:3, :200, :240].values
    rng = np.random.default_rng(0)
    fields = xr.DataArray(rng.uniform(-6, 6, (3, 2, 8, 9)), dims=("z", "c", "gy", "gx"),
                          attrs={"spacing": 30})
    whole = np.stack([np.clip(np.rint(warp_section(img[z], fields.values[z], 30)), 0, 255)
                      for z in range(3)]).astype(np.uint8)
    for chunks in [(1, 64, 50), (3, 200, 240), (2, 77, 131)]:
        out = render(da.from_array(img, chunks=chunks), fields).values
        np.testing.assert_array_equal(out, whole)
    inverse = invert_fields(fields)
    for z in range(3):  # v(q) + u(q + v(q)) = 0 at every node
        ys, xs = np.meshgrid(np.arange(8) * 30.0, np.arange(9) * 30.0, indexing="ij")
        v = inverse.values[z]
        u = _dense(fields.values[z], 30, ys + v[0], xs + v[1])
        np.testing.assert_allclose(u + v, 0, atol=0.05)
    smooth = ndi.gaussian_filter(img.astype(np.float32), (0, 2, 2))
    back = render(render(smooth, fields), inverse).values
    inner = np.s_[:, 20:-20, 20:-20]
    assert np.abs(back[inner] - smooth[inner]).mean() < 0.1 * smooth.std()


def test_a_single_usable_section_stays_in_place():
    img = np.random.default_rng(0).integers(1, 255, (1, 128, 128)).astype(np.uint8)
    result = align(img)
    assert not result.fields.values.any()
    np.testing.assert_array_equal(result.aligned.values, img)


def test_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        align(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="every section"):
        align(np.zeros((3, 300, 300), np.uint8))
    with pytest.raises(ValueError, match="at least one Level"):
        align(np.zeros((3, 64, 64)), levels=())
    for window in (3, 4.0, True):  # at least 2 * neighbours, a whole number
        with pytest.raises(ValueError, match="window must be a whole number of sections"):
            align(np.zeros((3, 128, 128), np.uint8), window=window)
    with pytest.raises(ValueError, match="block exceeds the section"):
        align(np.random.default_rng(0).integers(0, 255, (3, 100, 100)).astype(np.uint8))
    fields = xr.DataArray(np.zeros((2, 2, 3, 3)), attrs={"spacing": 32})
    with pytest.raises(ValueError, match="fields for 2 sections"):
        render(np.zeros((3, 65, 65), np.uint8), fields)
