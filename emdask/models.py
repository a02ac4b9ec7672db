"""The boundary net: an anisotropic residual 3D U-Net predicting affinities.

In the spirit of Lee et al. 2017 ("Superhuman accuracy on the SNEMI3D challenge"):
residual blocks, downsampling in x-y only at the first levels (serial sections are thick),
2-D (1x3x3) convolutions where z resolution is poor and 3-D convolutions deeper; outputs
are the 3 nearest-neighbour affinities plus optional long-range affinities, which Lee et
al. use as an auxiliary objective.

The net is fully convolutional with "same" padding.  Its field of view is computed from the
architecture (:attr:`AffinityUNet.field_of_view`); chunked inference gives every block a
halo at least that radius, rounded up to the total downsampling factor, so that every
output voxel sees exactly what it would see in a single pass over the whole volume.

Pretrained weights ship with the package (``emdask/weights/``); :func:`pretrained` loads
them without network access.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emdask.fused import elu_, probabilities_

__all__ = [
    "AffinityUNet",
    "ModelConfig",
    "ValidUNet",
    "available_models",
    "card_defaults",
    "check_licence",
    "load_model",
    "model_card",
    "model_from",
    "pretrained",
    "save_model",
]

WEIGHTS = Path(__file__).with_name("weights")
#: Models trained on data that allow only non-commercial use, kept apart with their licence.
WEIGHTS_NC = Path(__file__).with_name("weights_nc")


#: What a net can learn (:attr:`ModelConfig.target`).
TARGETS = ("affinities", "synapses", "partners", "merges")


@dataclass
class ModelConfig:
    """Architecture of an :class:`AffinityUNet`.

    Attributes
    ----------
    width
        Feature maps at the first level; doubled at every level below.
    downsample
        Pooling factor (z, y, x) between consecutive levels; its length + 1 is the depth.
        ``(1, 2, 2)`` entries make the first levels x-y only (anisotropic ssTEM);
        ``(2, 2, 2)`` everywhere suits isotropic FIB-SEM.
    conv3d_from_level
        Levels from this one down use 3x3x3 convolutions; above it 1x3x3 (2-D).
    offsets
        Affinity offsets (dz, dy, dx): the 3 nearest neighbours first, then long-range.
    voxel_size
        The voxel size (nm, z-y-x) the net was trained for; inputs are checked against it.
    target
        ``"affinities"`` (one output per offset), ``"synapses"`` (one output: the
        probability that a voxel is synaptic; ``offsets`` are then unused) or
        ``"partners"`` (the attentional partner net of Turner et al. 2020: input raw plus
        a ball marking one synapse, outputs the voxels of its presynaptic and its
        postsynaptic cell) or ``"merges"`` (the merge-error net: input raw plus one
        object's mask, output the object's voxels near a junction of two neurons, which
        marks the object as a merge error; :func:`emdask.errors.detect_merges`).
    attention
        ``"partners"``: radius (z, y, x voxels) of the ball that marks the synapse.
    lsd_sigma
        Affinity nets: Gaussian window (nm) of local shape descriptors
        (:func:`emdask.affinities.shape_descriptors`, Sheridan et al. 2023) that the net
        also learns to predict, an auxiliary target that makes it see each object's shape;
        inference computes the affinities only.  0 (default): none.
    planar
        Trained on 2-D labels only (every training volume ``labels_2d``, as ISBI 2012): the
        offsets with a z component never saw a target, so :func:`emdask.predict_affinities`
        returns 0 for them and sections are segmented separately (set by training).
    """

    width: int = 12
    downsample: list = field(default_factory=lambda: [[1, 2, 2], [2, 2, 2], [2, 2, 2]])
    conv3d_from_level: int = 1
    offsets: list = field(default_factory=lambda: [
        [-1, 0, 0], [0, -1, 0], [0, 0, -1], [-3, 0, 0], [0, -9, 0], [0, 0, -9]])
    voxel_size: list = field(default_factory=lambda: [10.0, 10.0, 10.0])
    in_channels: int = 1
    target: str = "affinities"
    attention: list = field(default_factory=lambda: [1, 6, 6])
    lsd_sigma: float = 0.0
    planar: bool = False

    def __post_init__(self):
        if self.width < 1 or not self.downsample:
            raise ValueError("width must be >= 1 and downsample must list at least one level")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target in ("partners", "merges") and self.in_channels != 2:
            raise ValueError(f"a {self.target[:-1]} net reads raw and a mask (the synapse "
                             "mark, the object): in_channels = 2")
        if self.target == "affinities" and [list(o) for o in self.offsets[:3]] != [
                [-1, 0, 0], [0, -1, 0], [0, 0, -1]]:
            raise ValueError("the first 3 offsets must be the nearest neighbours "
                             "[-1,0,0], [0,-1,0], [0,0,-1]")
        if self.lsd_sigma < 0 or (self.lsd_sigma and self.target != "affinities"):
            raise ValueError("lsd_sigma (nm) must be >= 0, and only affinity nets learn "
                             f"shape descriptors; got {self.lsd_sigma} for {self.target!r}")


    @property
    def n_predicted(self) -> int:
        """Channels that inference gives."""
        return {"affinities": len(self.offsets), "synapses": 1, "partners": 2,
                "merges": 1}[self.target]

    @property
    def n_outputs(self) -> int:
        """Channels the net learns: those predicted, then the auxiliary descriptors."""
        from emdask.affinities import DESCRIPTORS

        return self.n_predicted + (len(DESCRIPTORS) if self.lsd_sigma else 0)


class _ResBlock(nn.Module):
    """conv-BN-ELU, conv-BN, + skip, ELU.  BatchNorm (not Group/InstanceNorm): at inference
    it is a fixed affine map, so an output voxel does not depend on the patch around it."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int]):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.project = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.conv1 = nn.Conv3d(cout, cout, kernel, padding=pad)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, kernel, padding=pad)
        self.bn2 = nn.BatchNorm3d(cout)
        self.act = nn.ELU(inplace=True)

    def forward(self, x):
        x = self.project(x)
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + x)


class AffinityUNet(nn.Module):
    """Residual U-Net from raw EM (1, z, y, x) to affinities (len(offsets), z, y, x).

    Input sizes must be multiples of :attr:`factor`; outputs are probabilities (sigmoid)
    from :meth:`predict`, logits from :meth:`forward`.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        levels = len(config.downsample) + 1
        widths = [config.width * 2**i for i in range(levels)]
        kernels = [(1, 3, 3) if i < config.conv3d_from_level else (3, 3, 3)
                   for i in range(levels)]
        self.inp = nn.Conv3d(config.in_channels, widths[0], (1, 5, 5), padding=(0, 2, 2))
        self.down = nn.ModuleList(_ResBlock(widths[max(i - 1, 0)], widths[i], kernels[i])
                                  for i in range(levels - 1))
        self.pool = nn.ModuleList(nn.MaxPool3d(tuple(f)) for f in config.downsample)
        self.bottom = _ResBlock(widths[-2], widths[-1], kernels[-1])
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], tuple(config.downsample[i]),
                               stride=tuple(config.downsample[i]))
            for i in range(levels - 1))
        self.up_blocks = nn.ModuleList(_ResBlock(widths[i], widths[i], kernels[i])
                                       for i in range(levels - 1))
        self.out = nn.Conv3d(widths[0], config.n_outputs, 1)

    @property
    def factor(self) -> tuple[int, int, int]:
        """Total downsampling (z, y, x): input sizes must be multiples of it."""
        return tuple(int(v) for v in np.prod(np.asarray(self.config.downsample), axis=0))

    @property
    def field_of_view(self) -> tuple[int, int, int]:
        """Radius (z, y, x) of the voxels an output voxel depends on, from the layers."""
        radius = np.array([0, 2, 2])  # the 1x5x5 input convolution
        scale = np.ones(3, int)
        kernels = [np.array(b.conv1.kernel_size) for b in self.down]
        for k, f in zip(kernels, self.config.downsample, strict=True):
            radius += 2 * (k // 2) * scale  # two convolutions per residual block
            radius += (np.array(f) - 1) * scale  # max pooling
            scale = scale * np.array(f)
        radius += 2 * (np.array(self.bottom.conv1.kernel_size) // 2) * scale
        for k, f in reversed(list(zip(kernels, self.config.downsample, strict=True))):
            scale = scale // np.array(f)
            radius += (np.array(f) - 1) * scale  # transposed convolution
            radius += 2 * (k // 2) * scale
        return tuple(int(r) for r in radius)

    @property
    def halo(self) -> tuple[int, int, int]:
        """Inference context per side: the field of view rounded up to :attr:`factor`."""
        return tuple(int(-(-r // f) * f) for r, f in zip(self.field_of_view, self.factor,
                                                         strict=True))

    def flops_per_voxel(self) -> float:
        """Multiply-adds per output voxel x 2 (convolutions only)."""
        total = 0.0
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                level = _level_of(name, len(self.config.downsample))
                scale = float(np.prod([np.prod(f) for f in self.config.downsample[:level]]))
                k = float(np.prod(m.kernel_size))
                if isinstance(m, nn.ConvTranspose3d):
                    k /= float(np.prod(m.stride))  # one kernel tap per output voxel
                total += 2 * m.in_channels * m.out_channels * k / scale
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        skips = []
        for block, pool in zip(self.down, self.pool, strict=True):
            x = block(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for i in reversed(range(len(self.up))):
            x = self.up_blocks[i](self.up[i](x) + skips[i])
        return self.out(x)


def _fold(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    """``conv`` followed by an inference-mode ``bn`` as one convolution."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=0)
    fused.weight.data = conv.weight.detach() * scale.detach().view(-1, 1, 1, 1, 1)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data = ((bias - bn.running_mean) * scale + bn.bias).detach()
    return fused


class _OneDNNConv3d(nn.Conv3d):
    """A convolution that always runs oneDNN's kernel on CPU in float32.  torch (2.13)
    picks its slow reference kernel for a one-item batch wherever N*C*D*H <= 20480 (a
    heuristic made for 2-D images), which a U-Net's deeper levels almost always are: a
    float32 fibsem pass over 64 x 192 x 192 on one core took 4.7 s with it, 1.7 s without
    (``benchmarks/bench_conv.py``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.padding_mode != "zeros":
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, list(self.padding),
                                                 list(self.stride), list(self.dilation),
                                                 self.groups)


class _ValidRes(nn.Module):
    """A :class:`_ResBlock` for inference: BatchNorm folded, unpadded convolutions, the
    skip cropped to what they leave."""

    def __init__(self, block: _ResBlock):
        super().__init__()
        self.project = block.project
        self.conv1 = _fold(block.conv1, block.bn1)
        self.conv2 = _fold(block.conv2, block.bn2)
        self.crop = 2 * (np.array(block.conv1.kernel_size) // 2)

    def forward(self, x):
        x = self.project(x)
        return elu_(self.conv2(elu_(self.conv1(x))), x, self.crop)


class ValidUNet(nn.Module):
    """An :class:`AffinityUNet` for fast, exact inference over large boxes.

    The same function as the net it is made from, computed differently: BatchNorm folded
    into the convolutions, channels-last memory (oneDNN's fast 3-D kernels), optionally
    bfloat16, and every convolution *valid* (unpadded), so the output is the part of the
    input box whose every value the net computes from real input.  A padded ("same") net
    run on a box recomputes the whole field of view at every layer around every box; a
    valid one pays, at each layer, only for the context the layers after it still need,
    so the decoder runs almost on the output alone.  Where both are defined the values
    are the same (up to float rounding), so boxes predicted this way abut exactly.

    Max pooling is anchored on the global grid: the input box must start at a multiple of
    :attr:`factor` (and be a multiple of it long); :attr:`context` gives how much of it
    the output lacks on each side.
    """

    def __init__(self, model: AffinityUNet, dtype: torch.dtype = torch.float32):
        super().__init__()
        model = copy.deepcopy(model)  # the caller's net stays as it is
        self.config, self.factor = model.config, model.factor
        self.inp = model.inp
        self.down = nn.ModuleList(_ValidRes(b) for b in model.down)
        self.bottom = _ValidRes(model.bottom)
        self.up = model.up
        self.up_blocks = nn.ModuleList(_ValidRes(b) for b in model.up_blocks)
        self.out = model.out
        n = self.config.n_predicted
        if self.out.out_channels > n:  # auxiliary training targets: never computed here
            self.out = nn.Conv3d(self.out.in_channels, n, self.out.kernel_size)
            self.out.weight.data, self.out.bias.data = (model.out.weight.data[:n],
                                                        model.out.bias.data[:n])
        self.inp_crop = np.array(self.inp.kernel_size) // 2
        self.inp.padding = (0, 0, 0)
        self.eval().requires_grad_(False).to(dtype=dtype, memory_format=torch.channels_last_3d)
        for m in self.modules():  # the same weights, oneDNN's kernel whatever the size
            if type(m) is nn.Conv3d:
                m.__class__ = _OneDNNConv3d
        self.dtype = dtype
        # the full-resolution level is planar in most nets (2-D kernels, no pooling along
        # z): it then runs in slabs of sections, its largest maps never whole (memory)
        self.planar0 = (self.inp.kernel_size[0] == 1 and self.down[0].crop[0] == 0
                        and self.config.downsample[0][0] == 1
                        and self.up[0].kernel_size[0] == 1 == self.up[0].stride[0]
                        and self.up_blocks[0].crop[0] == 0 and self.out.kernel_size[0] == 1)
        self._reads: dict = {}  # input shape: the part of the first skip the decoder reads
        # each convolution's FLOPs per output voxel, and its output size along each axis
        # for each input size along that axis seen so far (see flops)
        self._conv_coeffs: list[float] = []
        self._sizes_by_axis: tuple[dict, dict, dict] = ({}, {}, {})
        self.context = self._context()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the output box of input ``x`` (n, c, z, y, x), which starts
        at a multiple of :attr:`factor` and lacks :attr:`context` on each side."""
        return self._forward(x)[0]

    def predict(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Probabilities of the output box of ``x`` (as :meth:`forward`) as float32, or as
        uint8 holding ``round(255 p)`` (the sigmoid, scaling and layout change fused into
        one pass over the last layer)."""
        return self._forward(x, probabilities=dtype)[0]

    def _forward(self, x: torch.Tensor, reads: list | None = None,
                 probabilities: torch.dtype | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Logits (or ``probabilities`` of that dtype) and where they start; ``reads``:
        gets (offset, size) of the part of the first skip that the decoder reads."""
        slabs = self.planar0 and x.device.type != "meta"
        if slabs:
            shape = tuple(int(n) for n in x.shape[2:])
            if shape not in self._reads:  # a pass on the meta device finds it
                reads: list = []
                with torch.device("meta"):
                    self._forward(torch.empty(x.shape), reads)
                self._reads[shape] = reads[0]
            read = self._reads[shape]
        begin = self.inp_crop.copy()  # where each tensor starts, in its level's voxels
        skips = []
        for i, (block, f) in enumerate(zip(self.down, self.config.downsample, strict=True)):
            f = np.array(f)
            at = begin + block.crop
            lo = -at % f  # pool only whole cells of the global grid, as a pass over all
            if i == 0 and slabs:
                x, skip = self._encode0(x, lo, f, read)
                skips.append((skip, at + read[0]))
            else:
                if i == 0:
                    x = self.inp(x.to(self.dtype).contiguous(
                        memory_format=torch.channels_last_3d))
                x = block(x)
                skips.append((x, at))
                n = (np.array(x.shape[2:]) - lo) // f * f
                x = _max_pool(x[_crop(lo, n)], f)
            begin = (at + lo) // f
        x = self.bottom(x)
        begin = begin + self.bottom.crop
        for i in reversed(range(len(self.up))):
            f = np.array(self.config.downsample[i])
            begin = begin * f
            skip, at = skips.pop()
            if i == 0 and slabs:
                return self._decode0(x, skip, probabilities), begin + self.up_blocks[0].crop
            x = self.up[i](x)
            if i == 0 and reads is not None:
                reads.append((begin - at, np.array(x.shape[2:])))
            x += skip[_crop(begin - at, np.array(x.shape[2:]))]
            del skip
            x = self.up_blocks[i](x)
            begin = begin + self.up_blocks[i].crop
        return _outputs(self.out(x), probabilities), begin

    def _encode0(self, x: torch.Tensor, lo, f, read) -> tuple[torch.Tensor, torch.Tensor]:
        """The input layer, the first block and the first pooling, slab by slab of
        sections; of the full-resolution maps only ``read`` (offset, size) is kept."""
        offset, size = read
        pooled = skip = None
        slab = _slab(x.device)
        for a in range(0, x.shape[2], slab):
            b = min(a + slab, x.shape[2])
            y = self.down[0](self.inp(x[:, :, a:b].to(self.dtype).contiguous(
                memory_format=torch.channels_last_3d)))
            n = (np.array(y.shape[2:]) - lo) // f * f
            p = _max_pool(y[_crop(lo, n)], f)
            if pooled is None:
                pooled = _empty_like(p, x.shape[2])
                skip = _empty_like(y, int(size[0]), size[1:])
            pooled[:, :, a:b] = p
            za, zb = max(a, int(offset[0])), min(b, int(offset[0] + size[0]))
            if za < zb:  # sections the decoder reads
                skip[:, :, za - int(offset[0]):zb - int(offset[0])] = y[
                    _crop((za - a, *offset[1:]), (zb - za, *size[1:]))]
        return pooled, skip

    def _decode0(self, x: torch.Tensor, skip: torch.Tensor,
                 probabilities: torch.dtype | None) -> torch.Tensor:
        """The last upsampling, block and output layer, slab by slab of sections."""
        out = None
        slab = _slab(x.device)
        for a in range(0, x.shape[2], slab):
            b = min(a + slab, x.shape[2])
            u = self.up[0](x[:, :, a:b])
            u += skip[:, :, a:b]
            y = self.out(self.up_blocks[0](u))
            if out is None:
                out = torch.empty((y.shape[0], y.shape[1], x.shape[2], *y.shape[3:]),
                                  dtype=probabilities or torch.float32, device=x.device)
            _outputs(y, probabilities, out, a)
        return out

    def input_box(self, begin, end) -> tuple[np.ndarray, np.ndarray]:
        """The input box (begin, end; multiples of :attr:`factor`) whose output covers the
        box ``begin``-``end`` (coordinates whose origin is a multiple of the factor)."""
        f = np.array(self.factor)
        lo, hi = (np.array(c) for c in self.context)
        in_begin = (np.asarray(begin) - lo) // f * f
        return in_begin, in_begin - (-(np.asarray(end) + hi - in_begin) // f) * f

    def flops(self, shape) -> float:
        """Multiply-adds x 2 of the convolutions for an input box of ``shape``."""
        # every layer's size along an axis depends on the input's size along that axis
        # only: sizes seen once per axis are reused (a task search asks for thousands)
        shape = tuple(int(n) for n in shape)
        seen = self._sizes_by_axis
        with _SIZES_LOCK:
            if any(n not in by_size for n, by_size in zip(shape, seen, strict=True)):
                self._conv_coeffs, outs = self._conv_outputs(shape)
                for axis, (n, by_size) in enumerate(zip(shape, seen, strict=True)):
                    by_size[n] = [o[axis] for o in outs]
            sizes = [by_size[n] for n, by_size in zip(shape, seen, strict=True)]
        return float(sum(k * z * y * x for k, z, y, x in
                         zip(self._conv_coeffs, *sizes, strict=True)))

    def _conv_outputs(self, shape) -> tuple[list[float], list[tuple[int, int, int]]]:
        """FLOPs per output voxel and output size (z, y, x) of each convolution."""
        coeffs, outs = [], []
        me = threading.get_ident()

        def record(module, args, out):
            if threading.get_ident() != me:  # a pass of another thread on these modules
                return
            k = float(np.prod(module.kernel_size))
            if isinstance(module, nn.ConvTranspose3d):
                k /= float(np.prod(module.stride))  # one kernel tap per output voxel
            coeffs.append(2 * module.in_channels * module.out_channels * k)
            outs.append(tuple(int(n) for n in out.shape[2:]))

        hooks = [m.register_forward_hook(record) for m in self.modules()
                 if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
        try:
            with torch.device("meta"):
                self._forward(torch.empty(1, self.config.in_channels, *shape))
        finally:
            for h in hooks:
                h.remove()
        return coeffs, outs

    def inference_bytes(self, shape) -> float:
        """Peak memory (bytes) of predicting an input box of ``shape``, the block's input
        and outputs included: 1.4 feature maps of every level at the net's precision
        plus 16 bytes per voxel, the full-resolution level counting 0.75 maps where it
        runs in slabs (measured on CPU, boxes of 24-48 Mvoxel, the shipped nets in
        bfloat16 and float32: 0.92-1.0 of this)."""
        voxels = float(np.prod(shape))
        scale, maps = 1.0, self.config.width * (0.75 if self.planar0 else 1.0)
        for level, f in enumerate(self.config.downsample, start=1):
            scale *= float(np.prod(f))
            maps += self.config.width * 2 ** level / scale
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return voxels * (1.4 * itemsize * maps + 16)

    def _context(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Voxels (z, y, x) the output lacks at the start and at the end of the input."""
        shape = np.array(self.factor) * 16
        with torch.device("meta"):
            y, lo = self._forward(torch.empty(1, self.config.in_channels, *shape.tolist()))
        hi = shape - lo - np.array(y.shape[2:])
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def _slab(device: torch.device) -> int:
    """Sections per slab of a planar first level (see :meth:`ValidUNet._encode0`).

    One section on a CPU: a slab's maps then stay in cache and are reused by the
    allocator (a 64x512x512 sstem box in bfloat16 in 8.7 s on one core, 10.7 s in slabs
    of 8; float32 too since its convolutions always run on oneDNN, see
    :class:`_OneDNNConv3d`).  Eight on a GPU, which wants large launches."""
    return 1 if device.type == "cpu" else 8


_SIZES_LOCK = threading.Lock()  # flops(): one meta pass with recording hooks at a time


def _empty_like(x: torch.Tensor, depth: int, yx=None) -> torch.Tensor:
    """An uninitialized map like ``x`` (channels last), ``depth`` sections deep."""
    yx = x.shape[3:] if yx is None else tuple(int(n) for n in yx)
    return torch.empty((*x.shape[:2], depth, *yx), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last_3d)


def _max_pool(x: torch.Tensor, f) -> torch.Tensor:
    """Max pooling by cells ``f`` as the maximum of strided views: twice as fast as
    ``max_pool3d`` on CPU, which also computes indices."""
    if x.device.type == "meta":  # shapes only: torch's meta maximum imports dynamo (1 s)
        return x[:, :, ::f[0], ::f[1], ::f[2]]
    out = None
    for o in itertools.product(*(range(int(k)) for k in f)):
        view = x[:, :, o[0]::f[0], o[1]::f[1], o[2]::f[2]]
        out = (view.clone(memory_format=torch.channels_last_3d) if out is None
               else torch.maximum(out, view, out=out))
    return out


def _outputs(y: torch.Tensor, probabilities: torch.dtype | None, out=None, z0: int = 0
             ) -> torch.Tensor:
    """The last layer's maps ``y`` as float32 logits, or as ``probabilities`` of that
    dtype, written into ``out`` at section ``z0`` (default: a new array)."""
    if out is None:
        if probabilities is None or y.device.type == "meta":
            return y.float()
        out = torch.empty(y.shape, dtype=probabilities, device=y.device)
    if probabilities is None:
        out[:, :, z0:z0 + y.shape[2]] = y
    else:
        probabilities_(y, out, z0)
    return out


def _crop(begin, size) -> tuple:
    return (slice(None), slice(None), *(slice(int(b), int(b + n)) for b, n in
                                       zip(begin, size, strict=True)))


def _level_of(name: str, n_down: int) -> int:
    """Resolution level (0 = full) at which a named convolution runs."""
    parts = name.split(".")
    if parts[0] in ("down", "up_blocks"):
        return int(parts[1])
    if parts[0] == "up":
        return int(parts[1]) + 1  # reads the coarser level
    if parts[0] == "bottom":
        return n_down
    return 0


def save_model(model: AffinityUNet, path: str | Path, card: dict | None = None) -> None:
    """Weights (``.pt``) and a JSON side file with the config and the model card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # the card also inside the weights: a .pt copied alone still maps inputs as in training
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict(),
                "card": json.dumps(card or {})}, tmp)
    tmp.replace(path)
    meta = {"config": asdict(model.config), "card": card or {}}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_model(path: str | Path, map_location: str = "cpu") -> AffinityUNet:
    """Load a model saved by :func:`save_model` (or a training checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = AffinityUNet(ModelConfig(**state["config"]))
    model.load_state_dict(state["state_dict"] if "state_dict" in state else state["model"])
    model.eval()
    model.card = _card(path, state)
    return model


def model_config(name: str | Path) -> ModelConfig:
    """The configuration (voxel size, offsets, target) of a model file or shipped model,
    without building the net (the weights file memory-mapped, its tensors not read)."""
    path = _model_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return ModelConfig(**state["config"])


def _card(path: Path, state: dict | None = None) -> dict:
    """A model's card: its JSON side file (cards are edited there), else the copy inside
    the weights file (a .pt copied without its .json keeps its intensity mapping)."""
    meta = path.with_suffix(".json")
    if meta.exists():
        return json.loads(meta.read_text()).get("card", {})
    if state is not None and "card" in state:
        return json.loads(state["card"])
    if state is not None and "state_dict" in state:  # a model file (not a checkpoint)
        warnings.warn(f"{path}: no model card (neither {meta.name} beside it nor one inside):"
                      " its threshold and the intensity mapping of its training data are "
                      "unknown, so inputs are mapped by their dtype, not as in training; copy "
                      "the .json with the .pt", stacklevel=3)
    return {}


def available_models() -> list[str]:
    """Names of the pretrained models shipped with emdask."""
    return sorted(p.stem for folder in (WEIGHTS, WEIGHTS_NC) for p in folder.glob("*.pt"))


def _model_path(name: str | Path) -> Path:
    """The file of a model file name (``.pt``) or of a shipped model's name."""
    if str(name).endswith(".pt"):
        return Path(name)
    path = next((f / f"{name}.pt" for f in (WEIGHTS, WEIGHTS_NC) if (f / f"{name}.pt").exists()),
                None)
    if path is None:
        hint = ("; the non-commercial synapse weights are not part of the BSD-licensed wheel: "
                "take emdask/weights_nc/ from the source repository and name its .pt file"
                if name == "synapses" else "")
        raise ValueError(f"no pretrained model {name!r}; available: "
                         f"{available_models() or '(none)'}{hint}")
    return path


_LICENCES_SHOWN: set = set()


def check_licence(name: str | Path, accepted: bool, how: str = "accept_licence=True"
                  ) -> None:
    """Refuse a model whose card restricts its use (weights trained on non-commercial
    data, kept in ``emdask/weights_nc/`` and out of the BSD-licensed wheel) unless its
    licence is ``accepted``; show the licence the first time it is used."""
    card = model_card(name)
    licence = str(card.get("licence", ""))
    if "-NC" not in licence and "non-commercial" not in licence.lower():
        return
    if not accepted:
        raise ValueError(
            f"model {str(name)!r} is licensed {licence}; it is not emdask's BSD licence and is "
            f"never used by default. Accept its licence to use it ({how}), or train your "
            "own (emdask train, see the README)")
    if str(name) not in _LICENCES_SHOWN:
        _LICENCES_SHOWN.add(str(name))
        import sys

        print(f"emdask: model {str(name)!r} is licensed {licence}", file=sys.stderr)


def model_from(name: str | Path) -> AffinityUNet:
    """A model file (``.pt``, :func:`load_model`) or a shipped model's name
    (:func:`pretrained`): what configs name."""
    return load_model(_model_path(name))


def cached_model(name: str, device: str = "cpu") -> AffinityUNet:
    """:func:`model_from` on ``device`` in eval mode, loaded once per process (and again
    when its file changes): what a worker's block tasks share."""
    path = Path(name)
    stamp = path.stat().st_mtime_ns if name.endswith(".pt") and path.exists() else 0
    return _cached_model(name, device, stamp)


@functools.lru_cache(maxsize=4)
def _cached_model(name: str, device: str, stamp: int) -> AffinityUNet:
    return model_from(name).to(device).eval()


def model_card(name: str | Path) -> dict:
    """The model card of a model file or shipped model, without loading its weights."""
    path = _model_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file")
    # a .pt copied alone: its own copy of the card (memory-mapped, weights not read)
    state = None if path.with_suffix(".json").exists() else torch.load(
        path, map_location="cpu", weights_only=True, mmap=True)
    return _card(path, state)


#: What a model card sets for the steps after its net (the operating point chosen on its
#: validation): the agglomeration threshold of a boundary net; the probability threshold,
#: minimum object size (voxels), partner search radius (z, y, x voxels) and, where the card
#: names one, the longest object (nm along any axis) of a synapse detector.  They are the
#: defaults of segment / find_synapses / assign_partners and of the pipeline.
OPERATING_POINT = ("threshold", "min_size", "radius", "max_extent")


def card_defaults(model: AffinityUNet | dict) -> dict:
    """The operating point (:data:`OPERATING_POINT`) of a model or of its card."""
    card = model if isinstance(model, dict) else getattr(model, "card", None) or {}
    return {k: card[k] for k in OPERATING_POINT if k in card}


def shipped_operating_point(name: str) -> dict:
    """The operating point of a shipped model's card (read from its JSON file; no weights
    are loaded, no licence is needed for these numbers), or {} where it is not installed."""
    try:
        return card_defaults(model_card(name))
    except (ValueError, FileNotFoundError):
        return {}


def pretrained(name: str = "fibsem", accept_licence: bool = False) -> AffinityUNet:
    """A shipped model, loaded from the package (no network access).

    Parameters
    ----------
    name
        ``"fibsem"``: isotropic FIB-SEM at 10 nm (trained on the FlyEM medulla data).
        ``"sstem"``: anisotropic ssTEM at 50 x 4 x 4 nm (trained on the ISBI 2012 stack,
        whose labels are 2-D: a planar model, each section segmented on its own).
        ``"sstem3d"``: anisotropic ssEM at 40 x 10 x 10 nm, 3-D (z affinities learned from
        the FlyEM medulla made into 40 nm sections, plus ISBI 2012): sections linked.
        ``"merges"``, ``"merges_ssem"``: merge-error nets (:func:`emdask.detect_merges`).
        ``"synapses"``: synaptic densities in ssTEM at 50 x 4.6 x 4.6 nm (trained on the
        larval VNC masks of Gerhard et al. 2013; CC BY-NC-SA 3.0, non-commercial use only,
        see ``emdask/weights_nc/README.md``): in a source checkout only, not in the wheel,
        and loaded only with ``accept_licence=True``.
    accept_licence
        Accept the licence of a model whose card restricts its use (non-commercial).
    """
    check_licence(name, accept_licence, f"pretrained({name!r}, accept_licence=True)")
    return load_model(_model_path(name))
