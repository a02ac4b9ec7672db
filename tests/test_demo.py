"""The demo (what `make demo` runs) end to end, with the shipped model."""

import pytest

from emdask.models import available_models


@pytest.mark.skipif("fibsem" not in available_models(), reason="no shipped fibsem weights")
def test_demo_beats_the_classical_baseline(tmp_path, capsys):
    from emdask.demo import run_demo

    result = run_demo(tmp_path / "demo")
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "demo.zarr" / "segmentation_0.5" / "zarr.json").exists()
    assert (tmp_path / "demo" / "demo.toml").exists()
    net, base = result["emdask"], result["baseline"]
    assert net["voi"] < base["voi"] and net["arand"] < base["arand"]
    assert "stage timings" in capsys.readouterr().out
