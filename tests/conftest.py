"""Shared fixtures: the real EM data in ../shared/data (skipped with a reason when absent)."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

FILES = {
    "cremi": SHARED / "cremi_sampleB_crop_bigcat" / "cremi_sampleB_z46-50_x0-250.h5",
    "isbi": SHARED / "isbi2012_sstem" / "isbi2012_train.h5",
    "medulla": SHARED / "flyem_medulla_fib_neuroproof_sample2" / "medulla_fib_sample2_250cube.h5",
    "gala": SHARED / "gala_tiny_fib" / "gala_train.h5",
    "snemi": SHARED / "snemi3d_mini_gala" / "snemi3d_mini.h5",
    "vnc": SHARED / "drosophila_vnc_sstem_gerhard2013" / "vnc_stack1_synapses_x0-640.h5",
}


@pytest.fixture
def shared_file():
    """Return the path of a named real volume, or skip when ../shared/data is absent."""

    def get(name: str) -> str:
        path = FILES[name]
        if not path.exists():
            pytest.skip(f"real data not available: {path} (../shared/data is absent)")
        return str(path)

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A small untrained net: tests that use it check the machinery, not the accuracy."""
    import torch

    from emdask.models import AffinityUNet, ModelConfig, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(AffinityUNet(ModelConfig(width=4, downsample=[[1, 2, 2]],
                                        voxel_size=[10.0, 10.0, 10.0])), path)
    return str(path)


def neurons_config(folder) -> dict:
    """The run config of :func:`neurons` (in ``folder``): the bundled sample's ground-truth
    affinities segmented, in 16 x 64 x 64 blocks."""
    from emdask.data import sample_path

    return {"input": {"url": str(sample_path()), "dataset": "raw",
                      "roi": [[0, 0, 0], [40, 160, 160]]},
            "affinities": {"url": str(Path(folder) / "affs.zarr"), "dataset": "affinities"},
            "output": {"path": str(Path(folder) / "run.zarr"), "chunks": [16, 64, 64]},
            "segment": {"thresholds": [0.5]},
            "cluster": {"processes": False, "n_workers": 2}}


@pytest.fixture(scope="session")
def neurons(tmp_path_factory) -> str:
    """A store segmented from ground-truth affinities (every stage but errors and report):
    real neurons to look at."""
    import numpy as np

    from emdask import affinities_from_labels, open_volume, save_volume
    from emdask.data import sample_path
    from emdask.pipeline import run

    folder = tmp_path_factory.mktemp("neurons")
    truth = open_volume(str(sample_path()), "neuron_ids")
    affs, _ = affinities_from_labels(truth.values)
    save_volume(affs.astype(np.float32), folder / "affs.zarr", "affinities",
                voxel_size=truth.attrs["voxel_size"], offset=truth.attrs["offset"])
    config = neurons_config(folder)
    run(config)
    return config["output"]["path"]

