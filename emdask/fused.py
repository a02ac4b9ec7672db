"""Fused elementwise steps of the inference net (CPU), in Numba.

A residual block ends ``y = elu(conv2(...) + skip)``.  torch runs that as two passes over
the feature maps (``add_``, ``elu_``), each converting bfloat16 to float and back element
by element: 40% of a bfloat16 pass of the fibsem net on a CPU went to these two, against
48% to the convolutions.  One Numba pass does both, in float32, rounding once to the
maps' dtype (so bfloat16 results are the float32 ones correctly rounded, where torch
rounds twice), at 2.7x the speed of the two torch passes on one core.

``exp`` has no vectorized form in Numba without Intel's SVML, so ELU's ``exp(x) - 1``
is computed here: ``2**k * (1 + q) - 1`` with ``k = round(x / ln 2)`` and ``q`` the
degree-6 Taylor polynomial of ``exp(r) - 1`` at ``r = x - k ln 2``, ``|r| <= ln(2)/2``
(relative error < 5e-7, measured; no cancellation near 0, where it returns ``q``).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = ["elu_", "probabilities_"]


@intrinsic
def _as_float(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _as_bits(typingctx, value):
    """The bits (uint32) of the float32 ``value``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _load(v):
    """An element of a map (float32, or bfloat16 bits as uint16) as float32."""


@overload(_load, inline="always")
def _load_impl(v):
    if v == types.uint16:  # bfloat16: the high half of a float32
        return lambda v: _as_float(np.uint32(v) << np.uint32(16))
    return lambda v: np.float32(v)


def _store(x, like):
    """float32 ``x`` as an element of the map that holds ``like``."""


@overload(_store, inline="always")
def _store_impl(x, like):
    if like == types.uint16:  # round to nearest, ties to even (as torch's .bfloat16())
        def rounded(x, like):
            b = _as_bits(x)
            return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                             >> np.uint32(16))
        return rounded
    return lambda x, like: np.float32(x)


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 in two parts: k * _LN2_HI is exact
_LN2_LO = np.float32(1.428606765330187e-06)


@njit(inline="always")
def _exp_parts(x):
    """``(s, q)`` with ``exp(x) = s * (1 + q)``, ``s = 2**k``, for ``-87 <= x <= 87``."""
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - k * _LN2_HI - k * _LN2_LO
    q = r * (np.float32(1.0) + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
        np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
    return _as_float(np.uint32((np.int32(k) + np.int32(127)) << np.int32(23))), q


@njit(inline="always")
def _elu(x):
    s, q = _exp_parts(max(x, np.float32(-87.0)))  # exp underflows below; ELU is -1 there
    return x if x > np.float32(0.0) else s * q + (s - np.float32(1.0))


@njit(inline="always")
def _sigmoid(x):
    s, q = _exp_parts(min(max(-x, np.float32(-87.0)), np.float32(87.0)))
    return np.float32(1.0) / (np.float32(1.0) + s * q + s)


@njit(parallel=True, nogil=True, cache=True)
def _elu_kernel(y, skip, at):
    """``y <- elu(y + skip[at:])`` (``skip`` None: ``elu(y)``); both (n, z, y, x * c)."""
    n, depth, height, width = y.shape
    for i in prange(n * depth * height):
        b, zy = divmod(np.int64(i), np.int64(depth * height))  # int64: prange's index is
        z, row = divmod(zy, np.int64(height))  # unsigned, uint64 with int64 gives float64
        out = y[b, z, row]
        if skip is None:
            for j in range(width):
                out[j] = _store(_elu(_load(out[j])), out[j])
        else:
            add = skip[b, z + at[0], row + at[1], at[2]:at[2] + width]
            for j in range(width):
                out[j] = _store(_elu(_load(out[j]) + _load(add[j])), out[j])


def _output(x, like):
    """A logit as an element of the output array holding ``like``."""


@overload(_output, inline="always")
def _output_impl(x, like):
    if like == types.uint8:  # a probability in 1/255 steps, as round(255 * p) in NumPy
        return lambda x, like: np.uint8(np.rint(_sigmoid(x) * np.float32(255.0)))
    return lambda x, like: _sigmoid(x)


@njit(parallel=True, nogil=True, cache=True)
def _output_kernel(logits, out, z0):
    """``out[:, :, z0 + z] = p(logits[:, z])``; logits (n, z, y, x * c), out (n, c, z, y, x)."""
    n, depth, height, _ = logits.shape
    channels, width = out.shape[1], out.shape[4]
    for i in prange(n * depth * height):
        b, zy = divmod(np.int64(i), np.int64(depth * height))
        z, row = divmod(zy, np.int64(height))
        src = logits[b, z, row]
        for c in range(channels):
            dst = out[b, c, z0 + z, row]
            for j in range(width):
                dst[j] = _output(_load(src[j * channels + c]), dst[j])


_KERNEL_LOCK = threading.Lock()  # where Numba falls back to its workqueue layer (no OpenMP,
# no TBB) it runs one parallel kernel at a time per process; net passes are one at a time
# anyway


def _launch(kernel, *args) -> None:
    """Run a Numba kernel on as many threads as torch uses."""
    threads = torch.get_num_threads()
    with _KERNEL_LOCK:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            kernel(*args)
        finally:
            # Numba's OpenMP layer resolves to torch's OpenMP runtime and leaves the
            # calling thread's count at Numba's: torch's own is set back (else a worker set
            # to one thread would run its convolutions on every core)
            torch.set_num_threads(threads)


def _rows(t: torch.Tensor) -> np.ndarray | None:
    """A CPU channels-last map (n, c, z, y, x) as a NumPy view (n, z, y, x * c), or None
    where the kernel cannot take it."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) or (
            not t.is_contiguous(memory_format=torch.channels_last_3d)):
        return None
    a = (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16
         else t.numpy())
    n, c, z, y, x = a.shape
    return a.transpose(0, 2, 3, 4, 1).reshape(n, z, y, x * c)


def elu_(y: torch.Tensor, skip: torch.Tensor | None = None, at=(0, 0, 0)) -> torch.Tensor:
    """``y = elu(y + skip[..., at[0]:, at[1]:, at[2]:])`` in place (``skip`` None: ELU
    alone), cropping ``skip`` to ``y``'s size; returns ``y``.

    One Numba pass on CPU maps in channels-last layout (float32 or bfloat16) with the
    threads torch uses; torch's ``add_`` and ``elu_`` elsewhere (GPU, other layouts)."""
    if skip is not None and (skip.shape[:2] != y.shape[:2] or any(
            a < 0 or a + n > m for a, n, m in zip(at, y.shape[2:], skip.shape[2:],
                                                 strict=True))):
        raise ValueError(f"skip {tuple(skip.shape)} cropped at {tuple(at)} does not cover "
                         f"maps {tuple(y.shape)}")
    if y.device.type == "meta":  # shapes only (a meta pass): torch's meta ELU would
        return y  # import its Python decompositions, 1.6 s at a worker's first pass
    rows = _rows(y)
    add = None if skip is None else _rows(skip)
    if rows is None or (skip is not None and (add is None or skip.dtype != y.dtype)):
        if skip is not None:
            y += skip[(..., *(slice(int(a), int(a) + n) for a, n in zip(
                at, y.shape[2:], strict=True)))]
        return torch.nn.functional.elu_(y)
    _launch(_elu_kernel, rows, add, np.array([at[0], at[1], at[2] * y.shape[1]], np.int64))
    return y


def probabilities_(logits: torch.Tensor, out: torch.Tensor, z0: int = 0) -> None:
    """``out[:, :, z0:z0 + depth] = sigmoid(logits)``: the net's last layer (n, c, depth,
    y, x) written as probabilities into ``out`` (n, c, z, y, x; float32, or uint8 holding
    ``round(255 p)``).

    One Numba pass for CPU maps in channels-last layout (the sigmoid, the scaling and
    rounding, and the layout change at once); torch's ops elsewhere."""
    n, c, depth, *yx = logits.shape
    if (out.dim() != 5 or (out.shape[0], out.shape[1], *out.shape[3:]) != (n, c, *yx)
            or not 0 <= z0 <= out.shape[2] - depth):
        raise ValueError(f"logits {tuple(logits.shape)} do not fit into out "
                         f"{tuple(out.shape)} at section {z0}")
    rows = _rows(logits)
    if (rows is None or out.device.type != "cpu" or out.dtype not in (torch.float32,
                                                                     torch.uint8)
            or not out.is_contiguous()):
        y = torch.sigmoid(logits.float())  # not in place: .float() may be logits itself
        if out.dtype == torch.uint8:
            y = y.mul_(255).round_().to(torch.uint8)
        out[:, :, z0:z0 + logits.shape[2]] = y
        return
    _launch(_output_kernel, rows, out.numpy(), z0)
