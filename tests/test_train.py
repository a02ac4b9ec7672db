"""Training: config, reproducible patches, the loss, checkpoints that resume, curves."""

import numpy as np
import pytest
import torch

from emdask import save_volume
from emdask.augment import AugmentConfig
from emdask.training import PatchSampler, balanced_bce, dice_loss, load_config, train

TINY_MODEL = """
[model]
width = 2
downsample = [[1, 2, 2], [2, 2, 2]]
offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0]]
voxel_size = [40.0, 4.0, 4.0]
"""


@pytest.fixture
def labelled(tmp_path):
    """A synthetic labelled volume: cells of random size, darker boundaries."""
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 48, 48), np.uint64)
    labels[:, :20, :] = 1
    labels[:, 20:, :30] = 2
    labels[:, 20:, 30:] = 3
    raw = np.where(labels == 1, 150, 180).astype(np.uint8) + rng.integers(0, 20, labels.shape,
                                                                          dtype=np.uint8)
    url = tmp_path / "train.zarr"
    save_volume(raw, url, "raw", voxel_size=(40, 4, 4))
    save_volume(labels, url, "labels", voxel_size=(40, 4, 4))
    return str(url)


def _config(tmp_path, url, iterations, extra=""):
    text = f"""
out = "{tmp_path / 'run'}"
iterations = {iterations}
patch = [8, 24, 24]
checkpoint_every = 2
validate_every = 4
thresholds = [0.3, 0.6]
seed = 3

[[volumes]]
url = "{url}"
labels = "labels"
roi = [[0, 0, 0], [12, 48, 48]]

[validation]
url = "{url}"
labels = "labels"
roi = [[8, 0, 0], [16, 48, 48]]
{TINY_MODEL}
{extra}
"""
    path = tmp_path / "train.toml"
    path.write_text(text)
    return load_config(path)


def test_unknown_config_keys_are_errors(tmp_path, labelled):
    with pytest.raises(ValueError, match=r"\[augment\]: unknown keys \['warp'\]"):
        _config(tmp_path, labelled, 2, "[augment]\nwarp = 0.5\n")


def test_seed_gives_the_same_first_batches(tmp_path, labelled):
    cfg = _config(tmp_path, labelled, 2)
    a = PatchSampler(cfg.volumes, cfg.patch, cfg.model, cfg.augment, seed=5)
    b = PatchSampler(cfg.volumes, cfg.patch, cfg.model, cfg.augment, seed=5)
    c = PatchSampler(cfg.volumes, cfg.patch, cfg.model, cfg.augment, seed=6)
    batches_a, batches_b = [a.batch(2) for _ in range(3)], [b.batch(2) for _ in range(3)]
    for x, y in zip(batches_a, batches_b, strict=True):
        for u, v in zip(x, y, strict=True):
            torch.testing.assert_close(u, v)
    assert not torch.equal(c.batch(2)[0], batches_a[0][0])
    raw, target, mask = batches_a[0]
    assert raw.shape == (2, 1, 8, 24, 24) and target.shape == mask.shape == (2, 4, 8, 24, 24)


def test_balanced_bce_masks_and_rewards_the_truth():
    target = torch.zeros(1, 1, 2, 4, 4)
    target[..., :2] = 1
    mask = torch.ones_like(target)
    right = balanced_bce((target * 2 - 1) * 10, target, mask)
    wrong = balanced_bce((1 - target * 2) * 10, target, mask)
    assert right < 1e-3 < wrong
    mask[..., :2] = 0  # masked-out voxels do not count, however wrong
    wrong_masked = (target * 2 - 1) * 10
    wrong_masked[..., :2] = -10
    assert balanced_bce(wrong_masked, target, mask) < 1e-3


def test_dice_loss_counts_false_positives_in_empty_patches():
    target = torch.zeros(1, 1, 2, 4, 4)
    target[..., :2] = 1
    mask = torch.ones_like(target)
    assert dice_loss((target * 2 - 1) * 20, target, mask) < 1e-3
    assert dice_loss((1 - target * 2) * 20, target, mask) > 0.95
    empty = torch.zeros_like(target)  # nothing to find: every positive output costs
    quiet, noisy = torch.full_like(target, -20.0), torch.full_like(target, -20.0)
    noisy[..., 0, 0, 0] = 20
    assert dice_loss(quiet, empty, mask) < 1e-3
    assert dice_loss(noisy, empty, mask) > 0.4


def test_synapse_patches_hold_a_synapse_at_the_set_rate(tmp_path):
    syn = np.zeros((16, 48, 48), np.uint64)
    syn[6:8, 40:42, 40:42] = 1
    url = tmp_path / "syn.zarr"
    save_volume(np.full(syn.shape, 128, np.uint8), url, "raw", voxel_size=(40, 4, 4))
    save_volume(syn, url, "clefts", voxel_size=(40, 4, 4))
    cfg = load_config(_synapse_config(tmp_path, str(url)))
    still = AugmentConfig(slip=0, shift=0)  # no margin: a drawn synapse stays in the patch
    for fraction in (0.0, 0.25, 0.75):
        sampler = PatchSampler(cfg.volumes, [4, 16, 16], cfg.model, still, 0,
                               positive_fraction=fraction)
        hits = np.mean([sampler.sample()[1].any() for _ in range(300)])
        # a random patch holds the synapse under 5% of the time
        assert abs(hits - fraction) < 0.08, (fraction, hits)


def test_training_runs_and_resumes(tmp_path, labelled, capsys):
    train(_config(tmp_path, labelled, 2))
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and (run / "model.pt").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 2
    with open(run / "log.csv", "a") as f:  # as if a crash came after logging iteration 3
        f.write("3,0.5,1,,,,,\n")
    train(_config(tmp_path, labelled, 4))  # resumes at 3, validates at 4
    assert "resuming from iteration 2" in capsys.readouterr().out
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,loss")
    last = log[-1].split(",")
    assert last[0] == "4" and last[5] != ""  # validation VOI written at iteration 4
    iterations = [int(row.split(",")[0]) for row in log[1:]]
    assert iterations == sorted(set(iterations))  # no row twice after the resume
    assert (run / "curves.png").stat().st_size > 1000


def test_learning_rate_steps():
    from emdask.training import TrainConfig, _learning_rate

    cfg = TrainConfig(out="x", volumes=[], lr=1e-3, lr_steps=[[200, 1e-5], [100, 1e-4]])
    assert [_learning_rate(cfg, i) for i in (1, 99, 100, 199, 200, 10**6)] == [
        1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]


def test_synapse_model_trains_and_validates_by_f1(tmp_path):
    """target = "synapses": one output, the synaptic mask as target, F1 in the log."""
    rng = np.random.default_rng(1)
    syn = np.zeros((16, 48, 48), np.uint64)
    syn[2:6, 10:16, 10:20], syn[9:13, 30:38, 25:31] = 1, 2  # two dark densities
    raw = (170 - 90 * (syn > 0) + rng.integers(0, 20, syn.shape)).astype(np.uint8)
    url = tmp_path / "syn.zarr"
    save_volume(raw, url, "raw", voxel_size=(40, 4, 4))
    save_volume(syn, url, "clefts", voxel_size=(40, 4, 4))
    model = train(load_config(_synapse_config(tmp_path, str(url))))
    assert model.out.out_channels == 1
    header, *rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert header.endswith("precision,recall,f1,fp_distance,threshold")
    assert rows[-1].split(",")[0] == "4" and rows[-1].split(",")[5] != ""

    from emdask.predict import predict_affinities, predict_synapses
    from emdask.volumes import as_volume

    prob = predict_synapses(as_volume(raw, (40, 4, 4)), model)
    assert prob.dims == ("z", "y", "x") and prob.shape == raw.shape
    with pytest.raises(ValueError, match="predicts synapses, not affinities"):
        predict_affinities(as_volume(raw, (40, 4, 4)), model)


def _synapse_config(tmp_path, url: str):
    """The tiny config (4 iterations) with the labels "clefts" and target = "synapses"."""
    _config(tmp_path, url, 4)  # writes train.toml
    text = (tmp_path / "train.toml").read_text().replace('labels = "labels"',
                                                         'labels = "clefts"')
    text = text.replace("[model]", '[model]\ntarget = "synapses"')
    (tmp_path / "train.toml").write_text(text)
    return tmp_path / "train.toml"


def test_2d_labels_mask_z_and_make_a_planar_model(tmp_path, labelled):
    """Labels of single sections (ISBI 2012): z affinities get no loss, and the trained
    model predicts 0 across sections, so nothing is linked across sections by chance."""
    from emdask import predict_affinities
    from emdask.models import load_model

    cfg = _config(tmp_path, labelled, 2)
    for v in cfg.volumes:
        v.labels_2d = True
    _, _, mask = PatchSampler(cfg.volumes, cfg.patch, cfg.model, cfg.augment, 0).batch(1)
    assert mask[:, 0].sum() == 0 and mask[:, 1:].sum() > 0  # offset 0 is z, others x-y
    train(cfg)
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.config.planar
    raw = np.random.default_rng(1).integers(0, 255, (8, 24, 24), np.uint8)
    affs = predict_affinities(raw, model).values
    assert np.all(affs[0] == 0) and np.all(affs[1:].std(axis=(1, 2, 3)) > 0)


def test_section_means_make_anisotropic_sections():
    from emdask.training import VolumeSpec, section_means

    raw = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8)
    labels = np.arange(10, dtype=np.uint64)[:, None, None] * np.ones((1, 2, 3), np.uint64)
    means, middle = section_means(raw, labels, 4)  # slices 0-3 and 4-7; 8, 9 left over
    assert means.dtype == np.uint8 and means.shape == (2, 2, 3)
    np.testing.assert_array_equal(means[:, 0, 0], [2, 6])  # 1.5 and 5.5, rounded to even
    np.testing.assert_array_equal(middle[:, 0, 0], [2, 6])  # the middle slice's labels
    with pytest.raises(ValueError, match="only one of them above 1"):
        VolumeSpec(url="x.h5", section_step=2, section_mean=4)


def test_downsampling_in_plane_pools_raw_and_picks_labels():
    from emdask.training import downsample_in_plane

    raw = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    labels = raw.astype(np.uint64) + 1000
    pooled, picked = downsample_in_plane(raw, labels, (2, 2))
    assert pooled.shape == picked.shape == (2, 2, 2) and pooled.dtype == np.uint8
    assert pooled[0, 0, 0] == np.rint(np.mean([0, 1, 4, 5])) and picked[0, 0, 0] == 1005
    assert set(np.unique(picked)) <= set(np.unique(labels))  # ids, never averages


def test_bfloat16_training_runs_or_falls_back(tmp_path, labelled):
    """precision = "bfloat16" trains under autocast where a probe step in a separate
    process runs and agrees with float32, else in float32 with a warning; a wrong value is
    named."""
    import dataclasses

    _config(tmp_path, labelled, 3)
    path = tmp_path / "train.toml"
    path.write_text('precision = "half"\n' + path.read_text())
    with pytest.raises(ValueError, match="precision must be 'float32' or 'bfloat16'"):
        load_config(path)
    cfg = dataclasses.replace(_config(tmp_path, labelled, 3), precision="bfloat16")
    model = train(cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "run" / "model.pt").exists()


def test_shape_descriptors_describe_the_voxels_own_object():
    from emdask.affinities import shape_descriptors

    labels = np.zeros((12, 40, 40), np.uint64)
    labels[:, :20] = 1
    labels[:, 20:] = 2
    labels[:, 20:, :4] = 0  # unlabelled: no target there
    lsd, mask = shape_descriptors(labels, (2, 3, 3))
    assert lsd.shape == mask.shape == (10, 12, 40, 40) and lsd.min() >= 0 and lsd.max() <= 1
    np.testing.assert_array_equal(mask[0], labels > 0)
    assert np.all(lsd[:, labels == 0] == 0)
    # the y offset to the window's centre of mass points into the object, more so near
    # its face, and the other object's window never counts: symmetric about the contact
    col = lsd[1, 6, :, 20]
    assert col[19] < col[10] - 0.2 and col[20] > col[30] + 0.2
    np.testing.assert_allclose(col[:20], 1 - col[20:][::-1], atol=1e-6)
    assert abs(col[10] - 0.5) < 0.02 and lsd[9, 6, 10, 20] > 0.9  # deep inside: centred, full
    coarse, coarse_mask = shape_descriptors(labels, (2, 4, 4), (1, 2, 2))
    fine, _ = shape_descriptors(labels, (2, 4, 4))
    inside = coarse_mask[0] > 0
    assert np.abs(coarse - fine)[:, inside].mean() < 0.03
    # a voxel whose nearest sample lies in another object is masked
    two = np.ones((4, 10, 10), np.uint64)
    two[:, 5:] = 2  # samples at rows 1, 3, 5, ...: row 4's nearest is row 5
    _, two_mask = shape_descriptors(two, (1, 2, 2), (1, 2, 2))
    assert not two_mask[:, :, 4].any() and two_mask[:, :, [3, 5]].all()
    planar, _ = shape_descriptors(labels, (0, 3, 3))  # 2-D windows: no z statistics
    assert np.all(planar[[0, 6, 7]][:, labels > 0] == 0.5) and np.all(planar[3] == 0)


def test_shape_descriptors_equal_a_direct_computation():
    """Each voxel's descriptors from the sums over its own object's voxels, weighted by
    the (truncated, normalized) Gaussian around it."""
    from emdask.affinities import shape_descriptors

    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, (3, 4, 4)).repeat(2, 0).repeat(3, 1).repeat(3, 2)
    sigma = np.array([1.0, 1.5, 2.0])
    lsd, _ = shape_descriptors(labels, sigma)
    reach = np.ceil(3 * sigma).astype(int)
    kernels = []  # scipy's 1-D kernels: truncated at 3 sigma, normalized
    for s, r in zip(sigma, reach, strict=True):
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        kernels.append(k / k.sum())
    coords = np.indices(labels.shape).reshape(3, -1).T
    for v in coords[rng.choice(len(coords), 25, replace=False)]:
        d = coords - v
        near = np.all(np.abs(d) <= reach, axis=1)
        w = np.prod([kernels[a][d[near, a] + reach[a]] for a in range(3)], axis=0)
        same = labels[tuple(coords[near].T)] == labels[tuple(v)]
        w, u = w * same, d[near] / sigma
        mean = (w[:, None] * u).sum(0) / w.sum()
        cov = (w[:, None, None] * u[:, :, None] * u[:, None, :]).sum(0) / w.sum() - np.outer(
            mean, mean)
        r = [cov[a, b] / np.sqrt(cov[a, a] * cov[b, b]) for a, b in ((0, 1), (0, 2), (1, 2))]
        expect = np.clip([*(0.5 + mean / 2), *np.diag(cov), *(0.5 + np.array(r) / 2),
                          w.sum()], 0, 1)
        np.testing.assert_allclose(lsd[(slice(None), *v)], expect, atol=1e-5)


def test_a_net_learns_shape_descriptors_beside_affinities(tmp_path, labelled):
    """lsd_sigma adds 10 descriptor outputs to training (masked near the patch faces);
    inference gives the affinities alone, without computing the descriptors."""
    from emdask import predict_affinities
    from emdask.models import ValidUNet, load_model

    cfg = _config(tmp_path, labelled, 2, extra="lsd_sigma = 12.0")  # 3 voxels in-plane
    _, target, mask = PatchSampler(cfg.volumes, cfg.patch, cfg.model, cfg.augment, 0).batch(1)
    assert target.shape[1] == mask.shape[1] == 4 + 10
    lsd_mask = mask[0, 4:]
    # sigma (0.3, 3, 3) voxels: bands of 1 section and 5 pixels at the faces are masked
    assert lsd_mask[:, [0, -1]].sum() == 0 and lsd_mask[:, :, :5].sum() == 0
    assert lsd_mask[:, :, :, -5:].sum() == 0 and lsd_mask[:, 1:-1, 5:-5, 5:-5].mean() > 0.5
    train(cfg)
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.config.n_outputs == 14 and ValidUNet(model).out.out_channels == 4
    raw = np.random.default_rng(1).integers(0, 255, (8, 24, 24), np.uint8)
    assert predict_affinities(raw, model).shape == (4, 8, 24, 24)
