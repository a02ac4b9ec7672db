"""Synaptic partner direction: CREMI partner annotations, the attentional partner net
(Turner et al. 2020) trained on a synthetic scene, and predict_direction."""

import h5py
import numpy as np
import pandas as pd
import pytest

from emdask.augment import AugmentConfig
from emdask.models import ModelConfig
from emdask.synapses import connectome, predict_direction, read_partner_annotations
from emdask.training import TrainConfig, VolumeSpec, train

TILE = 64


def _scene(path, n_tiles: int, seed: int):
    """Cell pairs side by side along x, split by a dark membrane; the presynaptic side
    (random per pair) carries vesicles (small dark disks).  Written in the CREMI layout
    with partner annotations."""
    rng = np.random.default_rng(seed)
    shape = (8, TILE, TILE * n_tiles)
    raw = rng.normal(150, 10, shape)
    labels = np.zeros(shape, np.uint64)
    yy, xx = np.mgrid[:TILE, :TILE]
    ids, locs, pairs = [], [], []
    for k in range(n_tiles):
        x0 = k * TILE
        labels[:, :, x0:x0 + 31] = 2 * k + 1
        labels[:, :, x0 + 33:x0 + TILE] = 2 * k + 2
        raw[:, :, x0 + 31:x0 + 33] = 60
        pre_left = rng.random() < 0.5
        for _ in range(14):
            d = rng.uniform(4, 14)
            cx = x0 + (32 - d if pre_left else 32 + d)
            cy = rng.uniform(16, 48)
            disk = (yy - cy) ** 2 + (xx - (cx - x0)) ** 2 <= 4
            raw[:, :, x0:x0 + TILE][:, disk] = 80
        left, right = (4, 32, x0 + 28), (4, 32, x0 + 36)
        pre, post = (left, right) if pre_left else (right, left)
        ids += [2 * k + 1, 2 * k + 2]
        locs += [np.multiply(pre, (40, 4, 4)), np.multiply(post, (40, 4, 4))]
        pairs.append((2 * k + 1, 2 * k + 2))
    with h5py.File(path, "w") as f:
        f["volumes/raw"] = np.clip(raw, 0, 255).astype(np.uint8)
        f["volumes/labels/neuron_ids"] = labels
        for name in ("volumes/raw", "volumes/labels/neuron_ids"):
            f[name].attrs["resolution"] = (40.0, 4.0, 4.0)
        f["annotations/ids"] = np.asarray(ids, np.uint64)
        f["annotations/locations"] = np.asarray(locs, np.float64)
        f["annotations/types"] = np.asarray(["presynaptic_site", "postsynaptic_site"]
                                            * n_tiles, dtype="S")
        f["annotations/presynaptic_site/partners"] = np.asarray(pairs, np.uint64)
    return labels


def test_reads_cremi_partner_annotations(tmp_path):
    _scene(tmp_path / "a.h5", 3, seed=0)
    table = read_partner_annotations(str(tmp_path / "a.h5"))
    assert table["pre_id"].tolist() == [1, 3, 5] and table["post_id"].tolist() == [2, 4, 6]
    assert all(p[0] == 4 and p[1] == 32 for p in table["pre"])
    with h5py.File(tmp_path / "a.h5", "a") as f:
        del f["annotations/locations"]
    with pytest.raises(ValueError, match="annotations/locations"):
        read_partner_annotations(str(tmp_path / "a.h5"))


def test_partner_net_learns_direction(tmp_path):
    _scene(tmp_path / "train.h5", 24, seed=0)
    truth = _scene(tmp_path / "val.h5", 12, seed=1)
    spec = {"raw": "volumes/raw", "labels": "volumes/labels/neuron_ids"}
    config = TrainConfig(
        out=str(tmp_path / "run"), volumes=[VolumeSpec(str(tmp_path / "train.h5"), **spec)],
        validation=VolumeSpec(str(tmp_path / "val.h5"), **spec), iterations=200,
        patch=[8, 48, 48], batch_size=2, lr=3e-3, validate_every=200,
        model=ModelConfig(width=4, downsample=[[1, 2, 2], [1, 2, 2]], conv3d_from_level=2,
                          voxel_size=[40.0, 4.0, 4.0], in_channels=2, target="partners",
                          attention=[1, 4, 4]),
        augment=AugmentConfig(missing=0.0, partial=0.0, slip=0.0, shift=0.0))
    model = train(config)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert log["accuracy"].dropna().iloc[-1] >= 0.9
    # predict_direction on the validation scene, partners given in a random order
    with h5py.File(tmp_path / "val.h5") as f:
        raw = f["volumes/raw"][:]
    sites = read_partner_annotations(str(tmp_path / "val.h5"))
    cells = np.array([[truth[pre], truth[post]] for pre, post in zip(
        sites["pre"], sites["post"], strict=True)], np.int64)  # pre cell, post cell
    rng = np.random.default_rng(2)
    rows = []
    for k, (pre, post) in enumerate(cells):
        a, b = (int(pre), int(post)) if rng.random() < 0.5 else (int(post), int(pre))
        rows.append({"id": k + 1, "size": 10, "begin": (3, 30, k * TILE + 31),
                     "end": (6, 35, k * TILE + 33), "partner_1": a, "partner_2": b})
    table = predict_direction(raw, truth, pd.DataFrame(rows), model, patch=(8, 64, 64))
    right = (table["pre"].to_numpy() == cells[:, 0]) & (table["post"].to_numpy() == cells[:, 1])
    assert right.mean() >= 0.9, table
    edges = connectome(table)
    assert edges["directed"].all() and len(edges) == len(cells)
