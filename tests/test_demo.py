"""The demo (what `make demo` runs) end to end, with the shipped model."""

import pytest

from emdask.models import available_models


@pytest.mark.skipif("fibsem" not in available_models(), reason="no shipped fibsem weights")
def test_demo_beats_the_classical_baseline(tmp_path, capsys):
    from emdask.demo import run_demo

    result = run_demo(tmp_path / "demo")
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "demo.zarr" / "raw" / "labels" / "segmentation_0.5" / "zarr.json").exists()
    assert (tmp_path / "demo" / "demo.toml").exists()
    net, base = result["emdask"], result["baseline"]
    assert net["voi"] < base["voi"] and net["arand"] < base["arand"]
    assert "stage timings" in capsys.readouterr().out


@pytest.mark.skipif(not {"sstem", "synapses"} <= set(available_models()),
                    reason="no shipped sstem and synapse weights")
def test_vnc_demo_scores_synapses_and_writes_the_connectome(tmp_path, shared_file, capsys):
    """The synapse part of the demo on half of the VNC validation rows."""
    import pandas as pd

    from emdask.demo import run_vnc_demo

    # (the viewing stages are tested in test_viewing)
    scores = run_vnc_demo(shared_file("vnc"), tmp_path, roi=((0, 768, 0), (20, 1024, 320)),
                          stages=["align", "predict", "segment", "synapses", "report"])
    s = scores["synapses"]
    assert s["n_true"] >= 3 and s["f1"] > 0.5 and s["partners_of"] >= 1
    edges = pd.read_parquet(tmp_path / "vnc.zarr" / "connectome.parquet")
    assert len(edges) >= 1 and (edges["n_synapses"] >= 1).all()
    assert (tmp_path / "vnc.png").stat().st_size > 10_000
    assert "partners: the two top-ranked segments" in capsys.readouterr().out
