"""The affinity U-Net: field of view, seamless chunked inference, saving and loading."""

import numpy as np
import pytest
import torch

from emdask.models import AffinityUNet, ModelConfig, load_model, pretrained, save_model
from emdask.predict import predict_affinities
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
    whole = predict_affinities(raw, m, chunks=raw.shape).values
    # chunks of 12 x 32 x 32 (multiples of the net's factor), the last ones shorter
    chunked = predict_affinities(raw.chunk({"z": 12, "y": 32, "x": 32}), m)
    assert chunked.data.numblocks[1:] == (3, 3, 3)
    chunked = chunked.values
    assert chunked.shape == (4, 34, 100, 93)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    assert 0 <= whole.min() and whole.max() <= 1 and whole.std() > 0


def test_tiled_prediction_equals_untiled():
    m = _model()
    raw = as_volume(np.random.default_rng(1).random((8, 90, 90)).astype(np.float32),
                    (40, 4, 4))
    a = predict_affinities(raw, m, chunks=raw.shape, intensity="dtype").values
    b = predict_affinities(raw, m, chunks=raw.shape, patch=(24, 64, 64), batch_size=3,
                           intensity="dtype").values
    np.testing.assert_allclose(a, b, atol=1e-4)


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
