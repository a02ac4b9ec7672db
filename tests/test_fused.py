"""The fused Numba steps of the inference net against torch's own ops."""

import numpy as np
import pytest
import torch

from emdask.fused import elu_, probabilities_

CL = torch.channels_last_3d


def maps(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    return x.to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_skip", [False, True])
def test_elu_matches_torch(dtype, with_skip):
    y = maps((2, 5, 3, 7, 9), dtype)
    skip = maps((2, 5, 5, 11, 13), dtype, seed=1) if with_skip else None
    at = (1, 2, 2)
    # the float32 result, rounded once to the maps' dtype
    want = y.float()
    if with_skip:
        want = want + skip[:, :, 1:4, 2:9, 2:11].float()
    want = torch.nn.functional.elu(want).to(dtype)
    got = elu_(y.clone(memory_format=CL), skip, at)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=3e-7, atol=1e-7)
    # other layouts (and GPUs) take torch's ops: the same values
    plain = elu_(y.contiguous(), None if skip is None else skip.contiguous(), at)
    np.testing.assert_allclose(plain.float().numpy(), got.float().numpy(),
                               atol=8e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_match_torch(dtype):
    logits = maps((1, 6, 4, 33, 17), dtype, scale=8.0)
    p = torch.sigmoid(logits.float())
    out = torch.zeros((1, 6, 7, 33, 17))
    probabilities_(logits, out, 2)
    np.testing.assert_allclose(out[:, :, 2:6].numpy(), p.numpy(), rtol=3e-7, atol=3e-8)
    assert not out[:, :, :2].any() and not out[:, :, 6:].any()
    as_uint8 = torch.zeros((1, 6, 4, 33, 17), dtype=torch.uint8)
    probabilities_(logits, as_uint8)
    want = np.rint(p.numpy() * np.float32(255)).astype(np.uint8)
    assert np.array_equal(as_uint8.numpy(), want)


def test_torch_threads_kept():
    """Numba's OpenMP layer shares torch's runtime; a worker set to 1 thread stays so."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        elu_(maps((1, 4, 2, 8, 8), torch.float32))
        probabilities_(maps((1, 2, 2, 8, 8), torch.float32), torch.zeros(1, 2, 2, 8, 8))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_shapes_that_do_not_fit_are_refused():
    """The kernels have no bounds checks: a mismatch must be an error, not a write
    outside the arrays."""
    logits = maps((1, 2, 3, 4, 5), torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        probabilities_(logits, torch.zeros(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="do not fit"):
        probabilities_(logits, torch.zeros(1, 2, 4, 4, 5), z0=2)
    with pytest.raises(ValueError, match="does not cover"):
        elu_(maps((1, 4, 2, 8, 8), torch.float32), maps((1, 4, 2, 8, 8), torch.float32),
             (0, 0, 1))
    kept = logits.clone()
    probabilities_(logits.contiguous(), torch.zeros(1, 2, 3, 4, 5))  # torch's path
    assert torch.equal(logits, kept)  # the logits are left as they were
