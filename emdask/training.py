"""Training of the affinity net from labelled volumes, with checkpoints that resume.

``emdask train CONFIG.toml`` (or :func:`train`) draws random patches from any number of
labelled volumes (anything :func:`emdask.open_volume` reads), augments them
(:mod:`emdask.augment`), computes affinity targets from the labels
(:func:`emdask.affinities.affinities_from_labels`: label 0 is unlabelled, and edges that
touch it are masked out of the loss rather than taught as boundary, unless the volume says
``background = "boundary"``: label 0 is membrane, as in ISBI 2012), and minimizes a
class-rebalanced binary cross-entropy with Adam.  Every ``validate_every`` iterations the
net predicts a validation region that is never trained on; the prediction is segmented
(:func:`emdask.segment`) and scored (VOI, adapted Rand error) at its best threshold.  Loss
and validation curves go to ``log.csv`` and ``curves.png`` in the output folder, and
``checkpoint.pt`` is written atomically, so a killed run resumes where it stopped.

Example config::

    out = "runs/fibsem"
    iterations = 3000
    patch = [32, 96, 96]
    seed = 0

    [[volumes]]
    url = "../shared/data/flyem_medulla_fib_neuroproof_sample2/medulla_fib_sample2_250cube.h5"
    raw = "raw"
    labels = "labels/neuron_ids"
    roi = [[0, 0, 0], [200, 250, 250]]       # voxels; z 200-249 is validation

    [validation]
    url = "..."                               # same keys as a volume
    roi = [[200, 0, 0], [250, 192, 192]]

    [model]                                   # emdask.models.ModelConfig
    width = 12

    [augment]                                 # emdask.augment.AugmentConfig
    missing = 0.15
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdask.affinities import BACKGROUNDS, affinities_from_labels
from emdask.augment import AugmentConfig, augment
from emdask.config import from_dict, read_file
from emdask.models import AffinityUNet, ModelConfig, save_model
from emdask.predict import PERCENTILES, native_bfloat16, normalize_raw

__all__ = ["PatchSampler", "TrainConfig", "VolumeSpec", "load_config", "train"]


@dataclass
class VolumeSpec:
    """A labelled volume to train (or validate) on."""

    url: str
    raw: str = "raw"
    labels: str = "labels/neuron_ids"
    roi: list | None = None  # [[z0, y0, x0], [z1, y1, x1]] in voxels
    section_step: int = 1  # take every n-th section (simulate anisotropic ssEM)
    # n consecutive slices averaged into one section (a physical ssEM section integrates
    # its thickness), labels from the middle slice: isotropic data made anisotropic
    section_mean: int = 1
    # in-plane downsampling [1, fy, fx] to the net's resolution (e.g. 4 nm ssTEM for a net
    # at 8 nm): raw by mean pooling, labels by the centre voxel of each pool
    downsample: list = field(default_factory=lambda: [1, 1, 1])
    labels_2d: bool = False  # labels not linked across z: mask z affinities
    background: str = "unlabelled"  # label 0: "unlabelled" (masked) or "boundary" (membrane)
    weight: float = 1.0  # sampling weight
    annotations: str = "annotations"  # partner nets: the CREMI annotations group

    def __post_init__(self):
        if self.section_step < 1 or self.section_mean < 1 or min(
                self.section_step, self.section_mean) > 1:
            raise ValueError(f"{self.url}: section_step and section_mean must be >= 1, and "
                             "only one of them above 1")
        if (len(self.downsample) != 3 or self.downsample[0] != 1
                or any(not isinstance(f, int) or f < 1 for f in self.downsample)):
            raise ValueError(f"{self.url}: downsample must be [1, fy, fx] with integers >= 1, "
                             f"got {self.downsample}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"{self.url}: background must be one of {BACKGROUNDS}, "
                             f"got {self.background!r}")


@dataclass
class TrainConfig:
    out: str
    volumes: list
    validation: VolumeSpec | None = None
    iterations: int = 2000
    patch: list = field(default_factory=lambda: [32, 96, 96])
    # On CPU a batch of 2 costs about what a batch of 1 does: torch 2.13 sends a one-item
    # batch through its slow reference 3-D convolution, forwards and backwards, wherever
    # N*C*D*H <= 20480 (sstem3d, 12 x 128 x 128, one core: 6.9 s for 1, 3.2 s for 2)
    batch_size: int = 1
    lr: float = 1e-3
    # piecewise-constant schedule: [[iteration, lr], ...], e.g. [[5000, 3e-4]] lowers the
    # rate from iteration 5000 on (computed from the iteration, so it survives a resume)
    lr_steps: list = field(default_factory=list)
    seed: int = 0
    threads: int = 0  # torch threads (0: leave torch's default)
    # "bfloat16": the forward pass and loss under bf16 autocast (weights, gradients and
    # optimizer stay float32), about twice as fast where the CPU has avx512_bf16 or AMX
    precision: str = "float32"
    checkpoint_every: int = 100
    validate_every: int = 500
    thresholds: list = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # synapse nets: the share of patches drawn around a labelled synapse (synaptic voxels
    # are under 1%), and the weight of a soft Dice loss added to the balanced
    # cross-entropy (it scores whole objects, so stray positive voxels cost more)
    positive_fraction: float = 0.5
    dice: float = 0.0
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config (TOML or YAML), with clear errors for unknown keys and
    wrong types."""
    raw = read_file(path)
    vols = [from_dict(VolumeSpec, v, f"{path}: [[volumes]]") for v in raw.pop("volumes", [])]
    if not vols:
        raise ValueError(f"{path}: at least one [[volumes]] entry is needed")
    val = raw.pop("validation", None)
    model = from_dict(ModelConfig, raw.pop("model", {}), f"{path}: [model]")
    aug = from_dict(AugmentConfig, raw.pop("augment", {}), f"{path}: [augment]")
    cfg = from_dict(TrainConfig, {**raw, "volumes": vols, "model": model, "augment": aug,
                                   "validation": None}, str(path))
    if val is not None:
        cfg.validation = from_dict(VolumeSpec, val, f"{path}: [validation]")
    if cfg.precision not in ("float32", "bfloat16"):
        raise ValueError(f"{path}: precision must be 'float32' or 'bfloat16', got "
                         f"{cfg.precision!r}")
    return cfg


def _load(spec: VolumeSpec) -> tuple[np.ndarray, np.ndarray, Any]:
    from emdask.volumes import cutout, open_volume

    raw = open_volume(spec.url, spec.raw)
    labels = open_volume(spec.url, spec.labels)
    if raw.shape != labels.shape:
        raise ValueError(f"{spec.url}: raw {raw.shape} and labels {labels.shape} differ")
    if spec.roi is not None:
        raw = cutout(raw, *spec.roi, units="voxel")
        labels = cutout(labels, *spec.roi, units="voxel")
    step = spec.section_step
    if spec.section_mean > 1:
        r, lab = section_means(raw.values, labels.values, spec.section_mean)
    else:
        r, lab = raw.values[::step], labels.values[::step].astype(np.uint64)
    return (*downsample_in_plane(r, lab, spec.downsample[1:]), raw)


def downsample_in_plane(raw: np.ndarray, labels: np.ndarray, factor
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Raw mean-pooled by ``factor`` (fy, fx) in each section, labels picked at each pool's
    centre voxel (never averaged: ids stay ids); the remainder at the end is dropped."""
    fy, fx = (int(f) for f in factor)
    if fy == fx == 1:
        return raw, labels
    y, x = raw.shape[1] // fy * fy, raw.shape[2] // fx * fx
    pooled = raw[:, :y, :x].reshape(raw.shape[0], y // fy, fy, x // fx, fx).mean(
        axis=(2, 4), dtype=np.float64)
    if np.issubdtype(raw.dtype, np.integer):
        pooled = np.rint(pooled)
    return pooled.astype(raw.dtype), labels[:, fy // 2:y:fy, fx // 2:x:fx]


def section_means(raw: np.ndarray, labels: np.ndarray, n: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic sections from isotropic data: each the mean of ``n`` consecutive slices
    (as a physical section integrates its thickness), labelled by its middle slice."""
    z = raw.shape[0] // n * n
    means = raw[:z].reshape(z // n, n, *raw.shape[1:]).mean(axis=1, dtype=np.float64)
    if np.issubdtype(raw.dtype, np.integer):
        means = np.rint(means)
    return means.astype(raw.dtype), labels[n // 2:z:n].astype(np.uint64)


def _z_factor(spec: VolumeSpec) -> int:
    """Slices of the data per section of the loaded volume."""
    return spec.section_step * spec.section_mean


def _partner_pairs(spec: VolumeSpec, labels: np.ndarray) -> np.ndarray:
    """The annotated (pre, post) voxel pairs inside the loaded volume, as rows
    ``[pre_z, pre_y, pre_x, post_z, post_y, post_x, pre_cell, post_cell]``; pairs whose
    sites lie on unlabelled voxels are dropped."""
    from emdask.synapses import read_partner_annotations

    table = read_partner_annotations(spec.url, spec.raw, spec.annotations)
    begin = np.asarray(spec.roi[0]) if spec.roi is not None else np.zeros(3, int)
    rows = []
    for pre, post in zip(table["pre"], table["post"], strict=True):
        a, b = np.asarray(pre) - begin, np.asarray(post) - begin
        if a[0] % spec.section_step or b[0] % spec.section_step:
            continue  # not on a slice that is kept
        for p in (a, b):  # (with section_mean: the section the slice lies in)
            p //= np.array([_z_factor(spec), *spec.downsample[1:]])
        if not all(0 <= v < n for p in (a, b) for v, n in zip(p, labels.shape, strict=True)):
            continue
        ca, cb = int(labels[tuple(a)]), int(labels[tuple(b)])
        if ca and cb and ca != cb:
            rows.append([*a, *b, ca, cb])
    if not rows:
        raise ValueError(f"{spec.url}: no partner pair with both sites on labelled cells "
                         "inside the volume's roi")
    return np.asarray(rows, np.int64)


def _partner_example(raw, labels, pair, start, size, attention):
    """Window ``[start, start + size)`` around a pair, with the cells and the synapse mark
    coded as bits of one label volume, so augmentations move them with the raw:
    1 = presynaptic cell, 2 = postsynaptic cell, 4 = the mark at the pair's midpoint."""
    from emdask.synapses import attention_ball

    sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    lab = labels[sl]
    mid = (pair[:3] + pair[3:6]) / 2 - np.asarray(start)
    code = ((lab == pair[6]) * 1 + (lab == pair[7]) * 2
            + attention_ball(lab.shape, mid, attention) * 4).astype(np.uint64)
    return raw[sl], code


#: Merge nets: voxels of a merged object within this distance (nm) of the junction of its
#: two neurons are the target (the window they see: :data:`emdask.errors.MERGE_WINDOW_NM`).
MERGE_RADIUS_NM = 50.0


def contact_sites(labels: np.ndarray, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Where two labelled neurons touch (face-adjacent voxels of two different non-zero
    labels): rows ``[z, y, x, a, b]`` (``a < b``; the voxel is on the lower side), sorted by
    pair, every ``step``-th of each pair's kept, and the first row of each pair (so that a
    pair can be drawn uniformly, small contacts such as a spine's as often as large ones).
    """
    parts = []
    for d in range(3):
        lo = tuple(slice(0, -1) if k == d else slice(None) for k in range(3))
        hi = tuple(slice(1, None) if k == d else slice(None) for k in range(3))
        a, b = labels[lo], labels[hi]
        touch = (a != b) & (a > 0) & (b > 0)
        u, v = a[touch].astype(np.int64), b[touch].astype(np.int64)
        parts.append(np.column_stack([np.argwhere(touch), np.minimum(u, v),
                                      np.maximum(u, v)]))
    rows = np.concatenate(parts) if parts else np.zeros((0, 5), np.int64)
    rows = rows[np.lexsort((rows[:, 4], rows[:, 3]))]
    first = np.flatnonzero(np.r_[True, np.any(rows[1:, 3:] != rows[:-1, 3:], axis=1)]
                           ) if len(rows) else np.zeros(0, np.int64)
    within = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
    rows = rows[within % step == 0]
    first = np.flatnonzero(np.r_[True, np.any(rows[1:, 3:] != rows[:-1, 3:], axis=1)]
                           ) if len(rows) else first
    return rows, first


def _merge_crop(raw, labels, site, size, rng: np.random.Generator):
    """A window of ``size`` near a contact ``site`` (jittered by up to a quarter window),
    with the two neurons coded 1 and 2 in one label volume (so augmentations move them
    with the raw)."""
    start = [int(np.clip(c - n // 2 + rng.integers(-(n // 4), n // 4 + 1), 0, d - n))
             for c, n, d in zip(site[:3], size, raw.shape, strict=True)]
    sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    lab = labels[sl]
    return raw[sl], ((lab == site[3]) * 1 + (lab == site[4]) * 2).astype(np.uint64)


def merge_target(code: np.ndarray, voxel_size) -> np.ndarray:
    """The voxels of neuron 1 within :data:`MERGE_RADIUS_NM` of neuron 2 and vice versa:
    where an object made of both joins them."""
    from scipy.ndimage import distance_transform_edt

    a, b = code == 1, code == 2
    if not a.any() or not b.any():
        return np.zeros(code.shape, bool)
    near_b = distance_transform_edt(~b, sampling=voxel_size) <= MERGE_RADIUS_NM
    near_a = distance_transform_edt(~a, sampling=voxel_size) <= MERGE_RADIUS_NM
    return (a & near_b) | (b & near_a)


def _merge_example(raw: np.ndarray, code: np.ndarray, keep: int, voxel_size):
    """Input (raw, object mask) and target of a merge net: the object is neuron 1, 2 or
    both (``keep`` 1, 2 or 3: an artificial merge, whose junction is the target)."""
    mask = (code & keep) > 0
    target = merge_target(code, voxel_size) if keep == 3 else np.zeros(code.shape, bool)
    x = np.stack([raw, mask]).astype(np.float32)
    return x, target[None].astype(np.float32)


def card_intensity(volumes: list[np.ndarray], weights=None) -> dict:
    """The intensity percentiles (:data:`emdask.predict.PERCENTILES`) of training volumes
    on the net's input scale (:func:`emdask.predict.normalize_raw` by dtype), as a model
    card records them: their mean over the volumes, with ``weights``."""
    values = np.array([np.percentile(normalize_raw(v[:: max(1, v.shape[0] // 16)]),
                                     PERCENTILES) for v in volumes])
    mean = np.average(values, axis=0, weights=weights)
    return {"percentiles": list(PERCENTILES), "values": [round(float(v), 5) for v in mean]}


class PatchSampler:
    """Random augmented patches and their affinity targets; a seed fixes the sequence."""

    def __init__(self, volumes: list[VolumeSpec], patch, model_config: ModelConfig,
                 augment_config: AugmentConfig, seed: int, positive_fraction: float = 0.5):
        self.specs = volumes
        self.positive_fraction = positive_fraction
        self.data = [_load(v)[:2] for v in volumes]
        self.patch = np.asarray(patch)
        self.offsets = model_config.offsets
        self.target = model_config.target
        # shape descriptors' window in voxels (0: none); volumes are at the net's voxels
        self.lsd_sigma = np.divide(model_config.lsd_sigma, model_config.voxel_size)
        self._positives = [np.argwhere(lab > 0)[::16] if self.target == "synapses"
                           else np.zeros((0, 3), int) for _, lab in self.data]
        self.attention = model_config.attention
        self.pairs = [_partner_pairs(v, lab) for v, (_, lab) in zip(volumes, self.data,
                                                                     strict=True)
                      ] if self.target == "partners" else []
        self.sites = [contact_sites(lab) for _, lab in self.data
                      ] if self.target == "merges" else []
        for spec, (_, first) in zip(volumes, self.sites, strict=False):
            if not len(first):  # (labels with 0 between cells never touch)
                raise ValueError(f"{spec.url}: no two labelled neurons touch; a merge net "
                                 "learns from contacts of dense labels")
        self.voxel_size = np.asarray(model_config.voxel_size, float)
        self.aug = augment_config
        self.margin = augment_config.max_shift if (augment_config.slip
                                                   or augment_config.shift) else 0
        self.rng = np.random.default_rng(seed)
        weights = np.array([v.weight for v in volumes], float)
        self.p = weights / weights.sum()
        for spec, (raw, _) in zip(volumes, self.data, strict=True):
            need = self.patch + [0, 2 * self.margin, 2 * self.margin]
            if np.any(np.array(raw.shape) < need):
                raise ValueError(f"{spec.url}: volume {raw.shape} smaller than patch plus "
                                 f"margin {need.tolist()}")

    @functools.cached_property
    def intensity(self) -> dict:
        """The model card's ``intensity``: the 1st and 99th percentiles of the training
        volumes' intensities on the net's input scale, averaged with the sampling weights
        (inference maps every volume's own percentiles there)."""
        return card_intensity([raw for raw, _ in self.data], self.p)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One (raw (1,z,y,x), target (C,z,y,x), mask (C,z,y,x)) example."""
        i = int(self.rng.choice(len(self.data), p=self.p))
        raw, labels = self.data[i]
        size = self.patch + [0, 2 * self.margin, 2 * self.margin]
        start = [int(self.rng.integers(0, n - s + 1)) for n, s in zip(raw.shape, size,
                                                                     strict=True)]
        if (self.target == "synapses" and self.rng.random() < self.positive_fraction
                and self._positives[i].size):
            # synapses are rare (under 1% of voxels): a set share of patches contain one
            at = self._positives[i][int(self.rng.integers(len(self._positives[i])))]
            start = [int(np.clip(a - self.rng.integers(0, s), 0, n - s))
                     for a, s, n in zip(at, size, raw.shape, strict=True)]
        if self.target == "partners":  # a window around a random annotated pair
            pair = self.pairs[i][int(self.rng.integers(len(self.pairs[i])))]
            mid = (pair[:3] + pair[3:6]) // 2
            start = [int(np.clip(m - n // 2 + self.rng.integers(-(n // 4), n // 4 + 1), 0,
                                 d - n)) for m, n, d in zip(mid, size, raw.shape, strict=True)]
            r, code = _partner_example(raw, labels, pair, start, size, self.attention)
            r, code = augment(normalize_raw(r), code, self.rng, self.margin, self.aug)
            x = np.stack([r, (code & 4) > 0]).astype(np.float32)
            target = np.stack([(code & 1) > 0, (code & 2) > 0]).astype(np.float32)
            return x, target, np.ones_like(target)
        if self.target == "merges":  # two touching neurons, as one object or not
            rows, first = self.sites[i]
            k = int(self.rng.integers(len(first)))
            end = first[k + 1] if k + 1 < len(first) else len(rows)
            site = rows[int(self.rng.integers(first[k], end))]
            r, code = _merge_crop(raw, labels, site, size, self.rng)
            r, code = augment(normalize_raw(r), code, self.rng, self.margin, self.aug)
            keep = 3 if self.rng.random() < 0.5 else int(self.rng.integers(1, 3))
            x, target = _merge_example(r, code, keep, self.voxel_size)
            return x, target, np.ones_like(target)
        sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
        r, lab = augment(normalize_raw(raw[sl]), labels[sl], self.rng, self.margin, self.aug)
        if self.target == "synapses":  # labels: synapse ids (0 = none)
            target = (lab > 0)[None].astype(np.float32)
            return r[None], target, np.ones_like(target)
        target, mask = affinities_from_labels(lab, self.offsets, self.specs[i].background)
        if self.specs[i].labels_2d:
            mask[[k for k, o in enumerate(self.offsets) if o[0] != 0]] = 0
        if np.any(self.lsd_sigma):
            lsd, lsd_mask = _descriptors(lab, self.lsd_sigma, self.specs[i].labels_2d)
            target, mask = np.concatenate([target, lsd]), np.concatenate([mask, lsd_mask])
        return r[None], target, mask

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return tuple(torch.from_numpy(np.stack(x)) for x in zip(*items, strict=True))


def _descriptors(labels: np.ndarray, sigma: np.ndarray, labels_2d: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Shape descriptor targets of a patch; masked where the patch cuts the window short
    (within 1.5 sigma of its faces, the objects beyond the patch are unseen).  2-D labels
    (ids not linked across sections) get in-plane windows, their z statistics and their
    mass (a 2-D fraction, not comparable with 3-D labels') masked."""
    from emdask.affinities import shape_descriptors

    if labels_2d:
        sigma = np.array([0.0, *sigma[1:]])
    factor = np.where(sigma >= 2, 2, 1)  # smooth targets: computed on a coarser grid
    lsd, mask = shape_descriptors(labels, sigma, factor)
    edge = np.ceil(1.5 * sigma).astype(int)
    for axis, (e, n) in enumerate(zip(edge, labels.shape, strict=True)):
        band = [slice(None)] * 4
        band[axis + 1] = np.r_[0:e, n - e:n] if 2 * e < n else slice(None)
        mask[tuple(band)] = 0
    if labels_2d:
        mask[[0, 3, 6, 7, 9]] = 0
    return lsd, mask


def descriptor_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor:
    """Mean squared error of the sigmoid outputs against the descriptors (in [0, 1]),
    over the masked-in voxels."""
    err = (torch.sigmoid(logits) - target) ** 2 * mask
    return err.sum() / mask.sum().clamp(min=1)


def training_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  n_predicted: int, dice: float = 0.0) -> torch.Tensor:
    """Balanced cross-entropy of the predicted channels, plus ``dice`` times their soft
    Dice loss, plus the descriptors' error where the net learns them as an auxiliary
    target."""
    loss = balanced_bce(logits[:, :n_predicted], target[:, :n_predicted],
                        mask[:, :n_predicted])
    if dice:
        loss = loss + dice * dice_loss(logits[:, :n_predicted], target[:, :n_predicted],
                                       mask[:, :n_predicted])
    if logits.shape[1] > n_predicted:
        loss = loss + descriptor_loss(logits[:, n_predicted:], target[:, n_predicted:],
                                      mask[:, n_predicted:])
    return loss


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
              ) -> torch.Tensor:
    """1 - soft Dice of the sigmoid outputs over the batch's masked-in voxels (Milletari
    et al. 2016), per channel, averaged; a patch with nothing positive still counts its
    false positives through the sum of outputs."""
    prob = torch.sigmoid(logits) * mask
    dims = (0, 2, 3, 4)
    inter = (prob * target).sum(dims)
    total = prob.sum(dims) + (target * mask).sum(dims)
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Binary cross-entropy with each class of each channel weighted to half the loss
    (boundaries are rare), over the masked-in voxels only."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target,
                                                                reduction="none")
    dims = (0, 2, 3, 4)
    n = mask.sum(dims, keepdim=True).clamp(min=1)
    pos = (target * mask).sum(dims, keepdim=True)
    frac = (pos / n).clamp(0.01, 0.99)
    weight = torch.where(target > 0.5, 0.5 / frac, 0.5 / (1 - frac)) * mask
    return (loss * weight).sum() / mask.sum().clamp(min=1)


#: validation scores logged per target (the best threshold's)
SCORES = {"affinities": ("voi_split", "voi_merge", "voi", "arand", "threshold"),
          "synapses": ("precision", "recall", "f1", "fp_distance", "threshold"),
          "partners": ("accuracy", "pairs"), "merges": ("accuracy", "auc")}
SYNAPSE_MIN_SIZE = 50  # voxels: smaller detections are dropped when validating
PARTNER_WINDOW = (8, 96, 96)  # voxels around each pair when validating a partner net


def validate(model: AffinityUNet, spec: VolumeSpec, thresholds) -> dict:
    """Score the model on the validation region at each threshold; the best row.

    Affinities are segmented (:func:`emdask.segment`) and scored by VOI (lowest wins);
    with ``labels_2d`` every section is segmented and scored on its own (pooled);
    synapse probabilities become objects (:func:`emdask.find_synapses`) scored by F1
    against the labelled synapses (highest wins); partner nets by the fraction of
    annotated pairs whose direction they get right."""
    import dask

    from emdask.metrics import evaluate
    from emdask.predict import _predict
    from emdask.segmentation import segment
    from emdask.synapses import find_synapses, synapse_scores
    from emdask.volumes import as_volume

    raw, labels, vol = _load(spec)
    if model.config.target == "partners":
        return _validate_partners(model, spec, raw, labels)
    if model.config.target == "merges":
        return _validate_merges(model, raw, labels)
    vs = vol.attrs["voxel_size"]
    vs = (vs[0] * _z_factor(spec), vs[1] * spec.downsample[1], vs[2] * spec.downsample[2])
    pred = _predict(as_volume(raw, voxel_size=vs), model, chunks=raw.shape, device=_device(),
                    check_voxel_size=False)
    with dask.config.set(scheduler="synchronous"):
        if model.config.target == "synapses":
            prob = pred[0].values
            truth = labels  # the labelled synapse objects, ids as given
            # objects of any length: no card (not the shipped one's either) filters them
            rows = [synapse_scores(find_synapses(prob, t, SYNAPSE_MIN_SIZE, vs, np.inf)[0]
                                   .values, truth, vs, SYNAPSE_MIN_SIZE) | {"threshold": t}
                    for t in thresholds]
            return max(rows, key=lambda r: r["f1"])
        affs = pred[:3].compute()
        if spec.labels_2d:  # labels of single sections: segment each section on its own
            affs[0] = 0
        segs = dask.compute(*[s.data for s in segment(affs, thresholds)])
    rows = [evaluate(s, labels) | {"threshold": t} for s, t in zip(segs, thresholds,
                                                                   strict=True)]
    return min(rows, key=lambda r: r["voi"])


def _validate_partners(model: AffinityUNet, spec: VolumeSpec, raw, labels) -> dict:
    """Fraction of annotated pairs whose direction the net gets right (see
    :func:`emdask.synapses.direction_score`), each scored in a :data:`PARTNER_WINDOW`
    around the pair."""
    from emdask.synapses import direction_score, partner_maps

    pairs = _partner_pairs(spec, labels)
    size = [(min(n, w) // f) * f for n, w, f in zip(raw.shape, PARTNER_WINDOW, model.factor,
                                                    strict=True)]
    right = 0
    for pair in pairs:
        mid = (pair[:3] + pair[3:6]) // 2
        start = [int(np.clip(m - n // 2, 0, d - n)) for m, n, d in zip(mid, size, raw.shape,
                                                                     strict=True)]
        sl = tuple(slice(s0, s0 + n) for s0, n in zip(start, size, strict=True))
        centre = (pair[:3] + pair[3:6]) / 2 - np.asarray(start)
        maps = partner_maps(model, raw[sl][None], [centre])[0]
        right += direction_score(maps, centre, labels[sl], int(pair[6]), int(pair[7]),
                                 model.config.attention) > 0
    return {"accuracy": right / len(pairs), "pairs": float(len(pairs))}


MERGE_VALIDATION = 200  # windows (half of them merged objects) when validating


def _validate_merges(model: AffinityUNet, raw, labels) -> dict:
    """Window classification of a merge net on :data:`MERGE_VALIDATION` fixed windows at
    contacts of the validation labels, half showing one neuron, half two as one object:
    accuracy at 0.5 and the area under the ROC curve of the window's score
    (:func:`emdask.errors.merge_scores`)."""
    from emdask.errors import merge_scores, merge_window

    rng = np.random.default_rng(0)
    rows, first = contact_sites(labels)
    size = merge_window(model, raw.shape)
    raws, masks, truth = [], [], []
    for j in range(MERGE_VALIDATION):
        k = int(rng.integers(len(first)))
        end = first[k + 1] if k + 1 < len(first) else len(rows)
        r, code = _merge_crop(raw, labels, rows[int(rng.integers(first[k], end))], size, rng)
        keep = 3 if j % 2 == 0 else int(rng.integers(1, 3))
        raws.append(r)
        masks.append((code & keep) > 0)
        truth.append(keep == 3)
    score = merge_scores(model, np.stack(raws), np.stack(masks))[0]
    truth = np.asarray(truth)
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = truth.sum(), (~truth).sum()
    auc = (ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": float(((score >= 0.5) == truth).mean()), "auc": float(auc)}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _plot(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    it = [int(r["iteration"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(it, [float(r["loss"]) for r in rows])
    a.set(xlabel="iteration", ylabel="training loss (smoothed)", yscale="log")
    for key, label, marker in [("voi", "VOI split+merge", "o-"),
                               ("arand", "adapted Rand error", "s-"),
                               ("f1", "synapse F1", "o-"), ("precision", "precision", "s-"),
                               ("recall", "recall", "^-"),
                               ("accuracy", "direction accuracy", "o-")]:
        val = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key)]
        if val:
            b.plot(*zip(*val, strict=True), marker, label=label)
            b.legend()
    b.set(xlabel="iteration", title="validation (never trained on)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


_PROBE = """
import json, sys, torch
from emdask.models import AffinityUNet, ModelConfig
cfg, shape, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
model = AffinityUNet(ModelConfig(**cfg)).train()
x = torch.rand(*shape)
grads = []
for bf16 in (False, True, True):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = model(x).float().square().mean()
    loss.backward()
    grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
cos = [torch.nn.functional.cosine_similarity(grads[0], g, dim=0).item() for g in grads[1:]]
print(min(cos))
"""


def _bfloat16_works(config: TrainConfig) -> bool:
    """Whether a training step under bf16 autocast runs, on this machine, for this net and
    patch, with gradients that agree with float32 (cosine > 0.99).  Tried in a separate
    process: oneDNN's bf16 convolution backward crashes or hangs for some shapes (torch
    2.13, AMX CPUs: a (1, 3, 3) convolution, 12 channels, 2 x 8 x 96 x 96)."""
    import json
    import subprocess
    import sys
    from dataclasses import asdict

    shape = (config.batch_size, config.model.in_channels, *config.patch)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, json.dumps(asdict(config.model)), json.dumps(shape),
             str(config.threads)], check=False, capture_output=True, text=True, timeout=120)
        return out.returncode == 0 and float(out.stdout.split()[-1]) > 0.99
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return False


def _learning_rate(config: TrainConfig, iteration: int) -> float:
    lr = config.lr
    for at, value in sorted(config.lr_steps):
        if iteration >= at:
            lr = value
    return lr


def train(config: TrainConfig, max_seconds: float | None = None) -> AffinityUNet:
    """Train (or resume) from a config; returns the model.  ``max_seconds`` stops early
    (after a checkpoint), for runs split across working sessions."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = _device()
    if config.precision == "bfloat16" and not native_bfloat16(device):
        # emulated bf16 measured 23 s/iteration against 1.3 s for float32 (AMD EPYC, merges)
        warnings.warn(f"{device} has no native bfloat16 (avx512_bf16, AMX or a recent GPU); "
                      "training in float32", stacklevel=2)
        config = replace(config, precision="float32")
    if config.batch_size == 1 and device == "cpu":
        warnings.warn("batch_size = 1 on CPU sends small layers through torch's slow "
                      "reference 3-D convolution; batch_size = 2 takes about as long per "
                      "iteration", stacklevel=2)
    if config.precision == "bfloat16" and device == "cpu" and not _bfloat16_works(config):
        warnings.warn("bfloat16 training fails on this CPU for this net and patch (oneDNN); "
                      "training in float32", stacklevel=2)
        config = replace(config, precision="float32")
    model_config = config.model
    if model_config.target == "affinities" and all(v.labels_2d for v in config.volumes):
        model_config = replace(model_config, planar=True)  # z affinities never trained
    model = AffinityUNet(model_config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sampler = PatchSampler(config.volumes, config.patch, config.model, config.augment,
                           config.seed, config.positive_fraction)
    # validation maps intensities as users of the shipped model will (its card's record)
    model.card = {"intensity": sampler.intensity}
    ckpt, log_path = out / "checkpoint.pt", out / "log.csv"
    start, elapsed, smooth = 0, 0.0, None
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        start, elapsed = state["iteration"], state["elapsed"]
        smooth = state.get("smooth_loss")
        print(f"resuming from iteration {start} ({elapsed / 60:.1f} min trained)")
    if not log_path.exists() or start == 0:
        log_path.write_text(",".join(["iteration", "loss", "seconds",
                                      *SCORES[config.model.target]]) + "\n")
    else:  # drop rows logged after the checkpoint (redone now) and any half-written row
        lines = log_path.read_text().splitlines()
        kept = [ln for ln in lines[1:] if ln.split(",")[0].isdigit()
                and int(ln.split(",")[0]) <= start and len(ln.split(",")) == len(
                    lines[0].split(","))]
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text("\n".join([lines[0], *kept]) + "\n")
        tmp.replace(log_path)
    t0 = time.perf_counter()
    operating_point = {}
    for it in range(start + 1, config.iterations + 1):
        model.train()
        for group in opt.param_groups:
            group["lr"] = _learning_rate(config, it)
        raw, target, mask = (x.to(device) for x in sampler.batch(config.batch_size))
        with torch.autocast(device, torch.bfloat16, enabled=config.precision == "bfloat16"):
            loss = training_loss(model(raw).float(), target, mask,
                                 model_config.n_predicted, config.dice)
        opt.zero_grad()
        loss.backward()
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        now = elapsed + time.perf_counter() - t0
        scores = {}
        if config.validation is not None and (it % config.validate_every == 0
                                              or it == config.iterations):
            model.eval()
            scores = validate(model, config.validation, config.thresholds)
            operating_point = {"threshold": scores["threshold"]} if "threshold" in scores \
                else {}
            operating_point |= (
                {"min_size": SYNAPSE_MIN_SIZE} if config.model.target == "synapses" else {})
            print(f"it {it}: validation " + ", ".join(
                f"{k} {scores[k]:.3f}" for k in SCORES[config.model.target]), flush=True)
        if it % 10 == 0 or scores:
            with open(log_path, "a") as f:
                f.write(f"{it},{smooth:.5f},{now:.0f},"
                        + ",".join(f"{scores[k]:.4f}" if scores else "" for k in
                                   SCORES[config.model.target])
                        + "\n")
        done = it == config.iterations or (max_seconds and now - elapsed > max_seconds)
        if it % config.checkpoint_every == 0 or done:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "sampler_rng": sampler.rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(), "iteration": it,
                        "elapsed": now, "smooth_loss": smooth,
                        "config": dataclasses.asdict(model.config)}, tmp)
            tmp.replace(ckpt)  # atomic: a crash never leaves a half-written checkpoint
            card = {"iterations": it, "train_seconds": round(now),
                    "intensity": sampler.intensity}
            if operating_point:  # the last validation's: defaults of the steps after the net
                card |= operating_point
            save_model(model.eval(), out / "model.pt", card=card)
            _plot(log_path, out / "curves.png")
            print(f"it {it}: loss {smooth:.4f}, {now / 60:.1f} min", flush=True)
        if done:
            break
    return model.eval()
