"""The affinity U-Net: field of view, seamless chunked inference, saving and loading."""

import itertools

import numpy as np
import pytest
import torch

from emdask.models import AffinityUNet, ModelConfig, ValidUNet, load_model, pretrained, save_model
from emdask.predict import (
    _input_shape,
    _makespan,
    _overhead,
    halo_overhead,
    inference_net,
    predict_affinities,
    predict_synapses,
    symmetries,
    task_shape,
)
from emdask.volumes import as_volume

TINY = {"width": 2, "downsample": [[1, 2, 2], [2, 2, 2]], "conv3d_from_level": 1,
        "offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0]],
        "voxel_size": [40, 4, 4]}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = AffinityUNet(ModelConfig(**(TINY | kw)))
    for bn in [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm3d)]:
        bn.running_mean.uniform_(-0.1, 0.1)  # non-trivial eval statistics
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_field_of_view_bounds_the_influence_of_a_voxel():
    m = _model()
    fov = np.array(m.field_of_view)
    x = torch.rand(1, 1, 32, 64, 64)
    base = m(x)
    x2 = x.clone()
    x2[0, 0, 16, 32, 32] += 5.0
    changed = (m(x2) - base).abs().amax(1)[0] > 0
    zz, yy, xx = np.nonzero(changed.numpy())
    reach = np.array([np.abs(zz - 16).max(), np.abs(yy - 32).max(), np.abs(xx - 32).max()])
    assert np.all(reach <= fov), (reach, fov)
    assert np.all(reach >= fov // 2)  # the bound is not wildly loose either
    assert all(h % f == 0 and h >= r for h, f, r in zip(m.halo, m.factor, fov, strict=True))


def test_chunked_prediction_equals_whole_volume():
    m = _model()
    rng = np.random.default_rng(0)
    raw = as_volume(rng.integers(0, 256, (34, 100, 93)).astype(np.uint8), (40, 4, 4))
    whole = predict_affinities(raw, m, chunks=raw.shape, precision="float32").values
    # chunks of 12 x 32 x 32 (multiples of the net's factor), the last ones shorter
    chunked = predict_affinities(raw, m, chunks=(12, 32, 32), precision="float32")
    assert chunked.data.numblocks[1:] == (3, 4, 3)
    chunked = chunked.values
    assert chunked.shape == (4, 34, 100, 93)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    assert 0 <= whole.min() and whole.max() <= 1 and whole.std() > 0


def _symmetric_pass(raw, predict, m, flips, transpose):
    """``predict`` on ``raw`` transposed (if ``transpose``) and flipped, mapped back (the
    last three axes: z, y, x)."""
    x = raw.values.transpose(0, 2, 1) if transpose else raw.values
    x = np.flip(x, flips) if flips else x
    y = predict(as_volume(np.ascontiguousarray(x), (40, 4, 4)), m, precision="float32").values
    y = np.flip(y, [a + y.ndim - 3 for a in flips]) if flips else y
    return np.swapaxes(y, -1, -2) if transpose else y


@pytest.mark.parametrize("tta", [2, 16])
def test_test_time_augmentation_is_the_mean_over_symmetries_for_any_chunking(tta):
    """TTA averages the net over flipped and transposed copies of the volume; blocks whose
    far ends are off the pooling grid (the volume's last ones) give the whole volume's
    result."""
    m = _model(target="synapses", offsets=[[-1, 0, 0]])
    rng = np.random.default_rng(2)
    raw = as_volume(rng.integers(0, 256, (14, 52, 45)).astype(np.uint8), (40, 4, 4))
    whole = predict_synapses(raw, m, chunks=raw.shape, precision="float32", tta=tta)
    assert whole.attrs["tta"] == tta
    whole = whole.values
    chunked = predict_synapses(raw, m, chunks=(6, 20, 16), precision="float32", tta=tta)
    assert chunked.data.numblocks == (3, 3, 3)
    np.testing.assert_allclose(chunked.values, whole, atol=1e-5)
    # GPU settings: tiles predicted in batches (tiles on and off a flipped block's end)
    tiled = predict_synapses(raw, m, chunks=(6, 20, 16), precision="float32", tta=tta,
                             patch=(4, 8, 8), batch_size=3)
    np.testing.assert_allclose(tiled.values, whole, atol=1e-5)
    plain = predict_synapses(raw, m, chunks=raw.shape, precision="float32").values
    assert np.abs(whole - plain).max() > 1e-3  # the other passes count
    # on a volume the pooling grid fits, the definition: flip, predict, flip back, mean
    raw = raw[:, :, :44]
    passes = [_symmetric_pass(raw, predict_synapses, m, *s) for s in symmetries(tta)]
    np.testing.assert_allclose(predict_synapses(raw, m, precision="float32", tta=tta).values,
                               np.mean(passes, axis=0), atol=1e-5)
    # uint8 output: round(255 p) of the mean
    as_uint8 = predict_synapses(raw, m, precision="float32", tta=tta, dtype="uint8").values
    assert np.abs(as_uint8 - 255 * np.mean(passes, axis=0)).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("tta", [4, 16])
def test_affinity_tta_puts_each_pass_edges_back_for_any_chunking(tta):
    """A flipped pass's affinity for offset o at v is the edge (v, v - o), which the
    original stores at v - o: each pass's channels are moved back before the mean, for
    any chunking."""
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2, 0, 0], [0, -3, 0], [0, 0, -3]]
    m = _model(offsets=offsets)
    rng = np.random.default_rng(3)
    raw = as_volume(rng.integers(0, 256, (14, 52, 45)).astype(np.uint8), (40, 4, 4))
    whole = predict_affinities(raw, m, chunks=raw.shape, precision="float32", tta=tta)
    assert whole.attrs["tta"] == tta
    chunked = predict_affinities(raw, m, chunks=(6, 20, 16), precision="float32", tta=tta)
    assert chunked.data.numblocks[1:] == (3, 3, 3)
    # a margin only along axes some pass flips (z from 16 on), in whole pooling steps
    from emdask.predict import tta_margin

    assert tta_margin(m, tta).tolist() == [2 * (tta == 16), 4, 4]
    np.testing.assert_allclose(chunked.values, whole.values, atol=1e-5)
    # the definition, on a volume the pooling grid fits: flip, predict, flip back; the
    # pass's offset d (o with flipped axes negated, y and x swapped if transposed) is
    # o_k or -o_k; in the second case the edge (v, v + o_k) is the pass's value at v + o_k
    raw = raw[:, :, :44]
    passes = []
    for flips, transpose in symmetries(tta):
        y = _symmetric_pass(raw, predict_affinities, m, flips, transpose)
        d = [[-v if a in flips else v for a, v in enumerate(o)] for o in offsets]
        d = [[v[0], v[2], v[1]] if transpose else v for v in d]
        out = np.full(y.shape, np.nan)
        for k, o in enumerate(offsets):
            if o in d:
                out[k] = y[d.index(o)]
            else:
                c, n = d.index([-v for v in o]), y.shape[1:]
                out[k][tuple(slice(-v, None) for v in o)] = y[c][tuple(
                    slice(0, s + v) for s, v in zip(n, o, strict=True))]
        passes.append(out)
    inner = (slice(None), slice(2, None), slice(3, None), slice(3, None))  # v + o inside
    np.testing.assert_allclose(
        predict_affinities(raw, m, precision="float32", tta=tta).values[inner],
        np.mean(passes, axis=0)[inner], atol=1e-5)


def test_test_time_augmentation_is_refused_where_it_would_be_wrong():
    m = _model(target="synapses", offsets=[[-1, 0, 0]])
    raw = as_volume(np.zeros((8, 64, 64), np.uint8), (40, 4, 4))
    with pytest.raises(ValueError, match="tta must be 1, 2, 4, 8 or 16"):
        predict_synapses(raw, m, tta=3)
    with pytest.raises(ValueError, match=r"closed under its symmetries: offset \[0, -3, 0\]"):
        from emdask.predict import prediction_step

        prediction_step(_model(), tta=2)  # a long y offset and no x one: no transpose
    m.card = {"tta": 4}  # the card's number is the default
    assert predict_synapses(raw, m).attrs["tta"] == 4
    assert "tta" not in predict_synapses(raw, m, tta=1).attrs
    m.card = {"tta": 3}
    with pytest.raises(ValueError, match="the model card's tta = 3: tta must be"):
        predict_synapses(raw, m)
    affinity_net = _model()
    affinity_net.card = {"tta": 2}
    with pytest.raises(ValueError, match="the model card's tta = 2: test-time augmentation "
                                         "needs the net's offsets to be closed"):
        predict_affinities(raw, affinity_net)
    lopsided = _model(target="synapses", offsets=[[-1, 0, 0]], downsample=[[1, 4, 2]])
    with pytest.raises(ValueError, match="equal y and x pooling factors"):
        predict_synapses(raw, lopsided, tta=2)


def test_tiled_prediction_equals_untiled():
    m = _model()
    raw = as_volume(np.random.default_rng(1).random((8, 90, 90)).astype(np.float32),
                    (40, 4, 4))
    a = predict_affinities(raw, m, chunks=raw.shape, intensity="dtype",
                           precision="float32").values
    b = predict_affinities(raw, m, chunks=raw.shape, patch=(4, 24, 40), batch_size=3,
                           intensity="dtype", precision="float32").values
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 64, 64), (26, 60, 72), (30, 80, 96)])
def test_valid_net_equals_the_padded_net_where_both_are_defined(shape):
    """The inference form (BatchNorm folded, unpadded convolutions) computes the same
    function: on every input size, its output is the padded net's output minus the
    context it names."""
    m = _model()
    v = ValidUNet(m, torch.float32)
    lo, hi = (np.array(c) for c in v.context)
    x = torch.rand(1, 1, *shape)
    with torch.inference_mode():
        ref = m(x)[0].numpy()
        with torch.profiler.profile() as prof:
            out = v(x)[0].numpy()
    assert out.shape[1:] == tuple(np.array(shape) - lo - hi)
    # oneDNN for every convolution, even where torch would pick its slow reference kernel
    assert not any("slow_conv3d" in e.key for e in prof.key_averages())
    # the padded net is exact where its zero padding is out of reach: one field of view in
    fov = np.array(m.field_of_view)
    inner = tuple(slice(int(f - a), int(n - a - f)) for f, a, n in zip(fov, lo, shape,
                                                                       strict=True))
    centre = tuple(slice(int(f), int(n - f)) for f, n in zip(fov, shape, strict=True))
    np.testing.assert_allclose(out[(slice(None), *inner)], ref[(slice(None), *centre)],
                               atol=1e-5)
    # the block reader's halo covers the context (with the end rounded to the factor)
    assert np.all(np.array(m.halo) >= lo)
    assert np.all(np.array(m.halo) >= hi + np.array(m.factor) - 1)
    # FLOPs: the unpadded net costs the padded one's per output voxel on a large box
    per_voxel = [v.flops(box + lo + hi) / np.prod(box)
                 for box in (np.array(m.factor) * 40, np.array(m.factor) * 400)]
    assert per_voxel[0] > per_voxel[1] > m.flops_per_voxel()
    assert per_voxel[1] < 1.1 * m.flops_per_voxel()


def test_bfloat16_prediction_is_close_to_float32():
    m = _model()
    raw = as_volume(np.random.default_rng(4).integers(0, 256, (16, 64, 64)).astype(np.uint8),
                    (40, 4, 4))
    a = predict_affinities(raw, m, precision="float32").values
    b = predict_affinities(raw, m, precision="bfloat16").values
    c = predict_affinities(raw, m, chunks=(8, 32, 32), precision="bfloat16").values
    assert np.abs(a - b).max() < 0.05 and np.abs(a - b).mean() < 0.005
    np.testing.assert_allclose(b, c, atol=0.01)  # bf16 per block: the same up to rounding
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_affinities(raw, m, precision="half")


def test_tasks_grow_within_the_memory_budget_and_waste_little():
    m = pretrained("fibsem")
    shape = (1000, 1000, 1000)
    small = task_shape(m, shape, (64, 128, 128), budget=2.5e9, precision="float32")
    large = task_shape(m, shape, (64, 128, 128), budget=6e9, precision="float32")
    net = inference_net(m, "cpu", "float32")
    for task, budget in ((small, 2.5e9), (large, 6e9)):
        assert all(t % c == 0 for t, c in zip(task, (64, 128, 128), strict=True))
        assert net.inference_bytes(_input_shape(net, task)) <= budget
    # no other block of units within the budget recomputes less context
    best = _overhead(net, shape, large)
    for other in itertools.product(range(64, 1025, 64), range(128, 1025, 128),
                                   range(128, 1025, 128)):
        if net.inference_bytes(_input_shape(net, other)) <= 6e9:
            assert _overhead(net, shape, other) >= best - 1e-9
    assert np.prod(large) > np.prod(small)
    assert halo_overhead(m, shape, large) < halo_overhead(m, shape, small) < \
        halo_overhead(m, shape, (64, 128, 128))
    assert halo_overhead(m, (100, 200, 200), (128, 256, 256)) == 1.0  # one block
    # a volume smaller than the unit is one task
    assert task_shape(m, (30, 50, 50), (64, 128, 128), budget=6e9) == (64, 128, 128)
    # test-time augmentation: the block's margin and float32 mean count too
    from emdask.predict import tta_margin

    tta = task_shape(m, shape, (64, 128, 128), budget=6e9, precision="float32", tta=8)
    box = np.add(tta, 2 * tta_margin(m, 8))
    assert (net.inference_bytes(_input_shape(net, box)) + 8 * m.config.n_predicted
            * np.prod(box)) <= 6e9
    assert np.prod(tta) < np.prod(large)


def test_tasks_are_cut_so_that_the_workers_share_the_work():
    m = pretrained("fibsem")
    net = inference_net(m, "cpu", "float32")
    shape = (250, 500, 500)
    one = task_shape(m, shape, (64, 128, 128), budget=12e9, precision="float32")
    two = task_shape(m, shape, (64, 128, 128), budget=12e9, precision="float32", workers=2)
    # the fewest FLOPs overall may leave one of two workers idle for most of the run
    assert _makespan(net, shape, two, 2) < 0.9 * _makespan(net, shape, one, 2)
    assert _makespan(net, shape, two, 2) < 1.05 * _overhead(net, shape, two)
    assert _makespan(net, shape, one, 1) == _overhead(net, shape, one)
    # FLOPs composed from sizes seen per axis equal a fresh count, also when several
    # threads ask at once (the meta passes share the modules' hooks)
    from concurrent.futures import ThreadPoolExecutor

    boxes = [(96 + 8 * i, 200 + 16 * i, 300 - 16 * i) for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ValidUNet(m, torch.float32).flops, boxes))
    assert together == [ValidUNet(m, torch.float32).flops(b) for b in boxes]
    fresh = ValidUNet(m, torch.float32)
    for box in [(200, 300, 400), (96, 300, 208), (200, 208, 96)]:
        coeffs, outs = fresh._conv_outputs(box)
        assert net.flops(box) == sum(k * np.prod(o) for k, o in zip(coeffs, outs,
                                                                    strict=True))


def test_uint8_output_and_missing_section():
    m = _model()
    raw = np.random.default_rng(2).integers(0, 256, (8, 40, 40)).astype(np.uint8)
    raw[3] = 0  # an all-black (missing) section
    out = predict_affinities(as_volume(raw, (40, 4, 4)), m, dtype="uint8")
    assert out.dtype == np.uint8 and out.dims == ("c", "z", "y", "x")
    assert np.isfinite(out.values.astype(float)).all()
    # a float stack that marks the section NaN is predicted as if it were black
    flt = raw / np.float32(255)
    flt[3] = np.nan
    np.testing.assert_array_equal(
        predict_affinities(as_volume(flt, (40, 4, 4)), m, dtype="uint8", intensity="dtype").values, out.values)


def test_prediction_leaves_the_callers_model_as_it_was():
    m = _model().train()
    raw = np.random.default_rng(3).random((8, 24, 24), np.float32)
    predict_affinities(as_volume(raw, (40, 4, 4)), m, intensity="dtype").compute()
    assert m.training  # not switched to eval mode (or moved to another device) under it


def test_voxel_size_is_checked():
    raw = as_volume(np.zeros((8, 40, 40), np.uint8), (10, 10, 10))
    with pytest.raises(ValueError, match=r"voxel size \(10.0, 10.0, 10.0\) nm does not match"):
        predict_affinities(raw, _model())
    predict_affinities(raw, _model(), check_voxel_size=False)  # explicit override


def test_save_load_roundtrip(tmp_path):
    m = _model(seed=3)
    save_model(m, tmp_path / "m.pt", card={"note": "test"})
    back = load_model(tmp_path / "m.pt")
    x = torch.rand(1, 1, 8, 32, 32)
    torch.testing.assert_close(back(x), m(x))
    assert back.card == {"note": "test"} and back.config.offsets == TINY["offsets"]


def test_unknown_pretrained_name_lists_available():
    with pytest.raises(ValueError, match="no pretrained model 'nope'; available"):
        pretrained("nope")


def test_flops_per_voxel_counts_the_first_convolution():
    m = _model()
    # the 1x5x5 input convolution alone costs 2 * 1 * width * 25 flops per voxel
    assert m.flops_per_voxel() > 2 * 1 * TINY["width"] * 25


def test_import_emdask_does_not_load_torch():
    import subprocess
    import sys

    code = ("import sys, emdask; assert 'torch' not in sys.modules, 'torch loaded'; "
            "emdask.predict_affinities; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prediction_follows_weights_changed_in_place():
    """The cached inference form is rebuilt when the net's weights change in place (a
    training step, load_state_dict), so validation during training sees the new net."""
    m = _model()
    raw = as_volume(np.random.default_rng(5).integers(0, 256, (16, 48, 48)).astype(np.uint8),
                    (40, 4, 4))
    before = predict_affinities(raw, m, precision="float32").values
    with torch.no_grad():
        m.out.bias += 1.0
    after = predict_affinities(raw, m, precision="float32").values
    assert np.abs(after - before).min() > 0.01


def test_a_model_file_copied_without_its_card_keeps_it(tmp_path):
    """The card (threshold, intensity mapping) is inside the .pt as well as in the .json
    beside it: a .pt copied alone predicts the same; one with no card anywhere warns."""
    import shutil

    card = {"threshold": 0.6, "intensity": {"percentiles": [1.0, 99.0],
                                            "values": [0.2, 0.8]}}
    save_model(AffinityUNet(ModelConfig(width=2, downsample=[[1, 2, 2]])),
               tmp_path / "a.pt", card=card)
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "a.pt", tmp_path / "alone" / "a.pt")
    assert load_model(tmp_path / "alone" / "a.pt").card == card == load_model(
        tmp_path / "a.pt").card
    from emdask.models import model_card  # the card alone (licence, threshold), no weights

    assert model_card(tmp_path / "alone" / "a.pt") == card
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    del state["card"]
    torch.save(state, tmp_path / "alone" / "old.pt")  # as saved before cards went inside
    with pytest.warns(UserWarning, match="no model card"):
        assert load_model(tmp_path / "alone" / "old.pt").card == {}
