"""Any real volume in, a clear answer out: the catalogue of unusual and bad inputs.

Each case asserts either the correct result or the named error, raised before any compute;
command-line cases assert a one-line message and the exit code (2: bad input)."""

import json
import tomllib
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile
import xarray as xr

from emdask import find_synapses, open_volume, predict_affinities, segment, voi
from emdask.align import warp_section
from emdask.cli import main
from emdask.cluster import duration, make_cluster
from emdask.config import to_toml
from emdask.data import sample, sample_path
from emdask.models import WEIGHTS_NC, card_defaults, model_card, pretrained
from emdask.pipeline import ClusterSpec, load_run_config, run
from emdask.predict import intensity_range, normalize_raw, predict_synapses
from emdask.volumes import as_volume
from emdask.watershed import WatershedParams, basins

THREADS = {"processes": False, "n_workers": 1}
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, model, name="out", url=None, roi=((0, 0, 0), (24, 96, 96)), **extra):
    cfg = {
        "input": {"url": url or str(sample_path()), "dataset": None if url else "raw",
                  "roi": [list(r) for r in roi] if roi else None},
        "output": {"path": str(tmp_path / f"{name}.zarr"), "chunks": [24, 64, 64]},
        "predict": {"model": model},
        "segment": {"thresholds": [0.5]},
        "cluster": THREADS,
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values} if values is not None else None
    return cfg


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ intensity ranges
@pytest.fixture(scope="module")
def crop() -> xr.DataArray:
    return sample().raw[:16, :64, :64].compute()


@pytest.mark.parametrize("kind", ["uint16 full", "uint16 12-bit", "uint16 0-255", "int16",
                                  "float32 [0, 1]", "float32 [0, 255]"])
def test_every_dtype_segments_as_its_uint8_equivalent(crop, kind):
    x = crop.values
    data = {"uint16 full": x.astype(np.uint16) * 257,
            "uint16 12-bit": x.astype(np.uint16) * 16,
            "uint16 0-255": x.astype(np.uint16),
            "int16": (x.astype(np.int16) - 128) * 200,
            "float32 [0, 1]": x.astype(np.float32) / 255,
            "float32 [0, 255]": x.astype(np.float32)}[kind]
    model = pretrained("fibsem")
    ref = predict_affinities(crop, model, dtype="uint8")
    got = predict_affinities(crop.copy(data=data), model, dtype="uint8")
    diff = np.abs(got.values.astype(int) - ref.values)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding only
    [a], [b] = segment(ref[:3]), segment(got[:3])  # the card's threshold
    split, merge = voi(a.values, b.values)
    assert split + merge < 0.01, (kind, split, merge)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_integers_are_normalized_through_a_table_as_by_the_formula(dtype):
    info = np.iinfo(dtype)
    raw = np.random.default_rng(0).integers(info.min, info.max + 1, (4, 50, 60)).astype(dtype)
    for black, white in [(float(info.min), float(info.max)), (10.0, 200.0), (-5.5, 3e4)]:
        x = (raw.astype(np.float64) - black) / (white - black)
        expected = np.clip(x, 0, 1).astype(np.float32)
        np.testing.assert_array_equal(normalize_raw(raw, (black, white)), expected)


def test_dtype_scaling_warns_when_the_range_looks_wrong(crop):
    twelve_bit = crop.copy(data=crop.values.astype(np.uint16) * 16)
    with pytest.warns(UserWarning, match=r"uint16 data .* the range looks wrong"):
        intensity_range(twelve_bit, pretrained("fibsem"), "dtype")
    lo, hi = intensity_range(twelve_bit, pretrained("fibsem"), [0, 4095])
    assert (lo, hi) == (0, 4095)
    with pytest.raises(ValueError, match="black < white"):
        intensity_range(twelve_bit, None, [10, 5])
    flat = crop.copy(data=np.full(crop.shape, 7, np.uint8))
    with pytest.raises(ValueError, match="constant"):
        intensity_range(flat, pretrained("fibsem"))


def test_the_cards_record_their_training_intensities():
    for name in ("fibsem", "sstem", "sstem3d"):
        p = model_card(name)["intensity"]
        assert p["percentiles"] == [1.0, 99.0] and 0 <= p["values"][0] < p["values"][1] <= 1


def test_a_run_records_the_intensity_it_used(tmp_path, tiny_model):
    import zarr

    from emdask.predict import data_percentiles

    cfg = _config(tmp_path, tiny_model, roi=((0, 0, 0), (16, 64, 64)),
                  input={"intensity": [20, 230]})
    run(cfg, stages=["predict"])
    meta = zarr.open_group(cfg["output"]["path"], mode="r").attrs["emdask"]
    roi = sample().raw[:16, :64, :64]
    assert meta["percentiles"]["1,99"] == list(data_percentiles(roi))
    assert "20 (black) to 230 (white)" in (Path(cfg["output"]["path"]) / "emdask.log"
                                           ).read_text()
    # another region, redone: its own percentiles, not the first region's
    cfg["input"]["roi"] = [[16, 64, 64], [40, 160, 160]]
    run(cfg, stages=["predict"], overwrite=True)
    meta = zarr.open_group(cfg["output"]["path"], mode="r").attrs["emdask"]
    assert meta["percentiles"]["1,99"] == list(data_percentiles(sample().raw[16:40, 64:160,
                                                                             64:160]))


def test_remote_stores_get_the_log_too():
    import fsspec

    from emdask.pipeline import _log_to_store, put_bytes

    url = "memory://emdask-log-test/out.zarr"
    put_bytes(url, "zarr.json", b"{}")
    for text in ("first", "second"):
        with _log_to_store(url):
            import sys

            print(text, file=sys.stderr)
    log = fsspec.filesystem("memory").cat("/emdask-log-test/out.zarr/emdask.log").decode()
    assert "first" in log and "second" in log


# ------------------------------------------------------------------ formats
def test_a_tiff_stack_runs_through_every_stage(tmp_path, tiny_model, capsys):
    raw = sample().raw[:24, :96, :96].values
    tifffile.imwrite(tmp_path / "stack.tif", raw)
    gt = tmp_path / "gt.h5"
    with h5py.File(gt, "w") as f:
        ds = f.create_dataset("neuron_ids", data=sample().neuron_ids[:24, :96, :96].values)
        ds.attrs["resolution"] = [10.0, 10.0, 10.0]
    cfg = _config(tmp_path, tiny_model, url=str(tmp_path / "stack.tif"), roi=None,
                  input={"voxel_size": [10.0, 10.0, 10.0]},
                  evaluate={"url": str(gt), "dataset": "neuron_ids"})
    scores = run(cfg)["stages"]["report"]["scores"]
    assert np.isfinite(scores["segmentation_0.5"]["voi"])  # an untrained net: any score
    assert Path(cfg["output"]["path"]).with_suffix(".png").stat().st_size > 10_000
    vol = open_volume(tmp_path / "stack.tif", voxel_size=(10, 10, 10))
    np.testing.assert_array_equal(np.asarray(vol[3]), raw[3])  # one section by integer
    np.testing.assert_array_equal(vol[2:5, 7].values, raw[2:5, 7])


# ------------------------------------------------------------------ defaults from the cards
def test_defaults_are_the_cards(tmp_path, monkeypatch):
    cfg = _config(tmp_path, "fibsem", segment={"thresholds": None},
                  synapses={"model": "synapses", "accept_licence": True})
    cfg["segment"] = {}
    loaded = load_run_config(cfg)
    assert loaded.segment.thresholds == [model_card("fibsem")["threshold"]]
    card = model_card("synapses")
    assert (loaded.synapses.threshold, loaded.synapses.min_size, loaded.synapses.radius) == (
        card["threshold"], card["min_size"], card["radius"]) == (0.99, 50, [0, 10, 10])
    # the API: predict_synapses carries the card, find_synapses and assign_partners use it
    model = pretrained("synapses", accept_licence=True)
    raw = as_volume(np.random.default_rng(0).integers(0, 255, (6, 64, 64), np.uint8),
                    voxel_size=model.config.voxel_size)
    probs = predict_synapses(raw, model)
    assert card_defaults(probs.attrs) == card_defaults(card)
    labels, _ = find_synapses(probs)
    assert labels.attrs["radius"] == [0, 10, 10]
    np.testing.assert_array_equal(labels.values, find_synapses(probs.values, 0.99, 50)[0])
    # a bare array: the shipped detector's card; without it installed, a named error
    np.testing.assert_array_equal(labels.values, find_synapses(probs.values)[0])
    monkeypatch.setattr("emdask.models.shipped_operating_point", lambda name: {})
    with pytest.raises(ValueError, match="give threshold"):
        find_synapses(probs.values)


# ------------------------------------------------------------------ refused early
def test_a_volume_smaller_than_the_field_of_view_is_refused(crop):
    tiny = crop[:4, :20, :20]
    with pytest.raises(ValueError, match=r"smaller than the net needs: at least \(13, 30, 30\)"):
        predict_affinities(tiny, "fibsem")  # a shipped model by name
    with pytest.raises(TypeError, match="model must be an AffinityUNet"):
        predict_affinities(crop, 3)
    with pytest.raises(ValueError, match=r"the volume is empty \(shape \(0, 20, 20\)\)"):
        predict_affinities(crop[:0, :20, :20], pretrained("fibsem"))
    with pytest.raises(ValueError, match="empty"):
        segment(np.zeros((3, 0, 4, 4), np.float32), [0.5])


def test_a_small_volume_fails_in_the_cli_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(to_toml(_config(tmp_path, "fibsem", roi=((0, 0, 0), (4, 20, 20)))))
    code, err = _cli(capsys, "run", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "smaller than the net needs" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.zarr").exists()  # refused before anything was written


def test_ground_truth_without_voxel_size_is_refused_before_compute(tmp_path, tiny_model):
    gt = tmp_path / "gt.h5"
    with h5py.File(gt, "w") as f:
        f.create_dataset("ids", data=np.zeros((24, 96, 96), np.uint64))
    cfg = _config(tmp_path, tiny_model, evaluate={"url": str(gt), "dataset": "ids"})
    with pytest.raises(ValueError, match=r"gt.h5:ids: voxel size is missing.*"
                                         r"\[evaluate\] voxel_size = \[z, y, x\]"):
        run(cfg)
    assert not Path(cfg["output"]["path"]).exists()
    cfg["evaluate"]["voxel_size"] = [10.0, 10.0, 10.0]  # the way out the message names
    assert "plan" in run(cfg, dry_run=True)


def test_thresholds_must_be_numbers(tmp_path, tiny_model, capsys):
    with pytest.raises(TypeError, match=r"segment.thresholds must be numbers, got \['0.3'\]"):
        load_run_config(_config(tmp_path, tiny_model, segment={"thresholds": ["0.3"]}))
    with pytest.raises(TypeError, match="thresholds must be numbers"):
        segment(np.ones((3, 4, 4, 4), np.float32), ["0.3"])
    cfg = tmp_path / "run.toml"
    cfg.write_text(to_toml(_config(tmp_path, tiny_model, segment={"thresholds": ["0.3"]})))
    code, err = _cli(capsys, "run", str(cfg))
    assert code == 2 and err == (f"emdask: error: {cfg}: segment.thresholds must be numbers, "
                                 "got ['0.3']\n")


def test_a_config_built_in_python_is_completed_and_checked(tmp_path, tiny_model):
    from emdask.run_config import InputSpec, OutputSpec, PredictSpec, RunConfig

    cfg = RunConfig(InputSpec(str(sample_path()), "raw"), OutputSpec(str(tmp_path / "o.zarr")),
                    predict=PredictSpec(model="fibsem"))
    card = model_card("fibsem")["threshold"]
    assert f"thresholds [{card}]" in run(cfg, dry_run=True)["plan"]  # the card's threshold
    cfg.cluster.n_workers = -1
    with pytest.raises(ValueError, match="n_workers must be >= 0"):
        run(cfg, dry_run=True)


def test_a_failed_first_run_does_not_block_the_corrected_rerun(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, input={"voxel_size": [40.0, 4.0, 4.0]})
    with pytest.raises(ValueError, match=r"voxel size \(40.0, 4.0, 4.0\) nm does not match"):
        run(cfg)
    cfg["input"]["voxel_size"] = None
    run(cfg, stages=["predict"])
    # a stage that failed before finishing a block does not bind the next run either
    import zarr

    root = zarr.open_group(cfg["output"]["path"], mode="r+")
    meta = dict(root.attrs["emdask"])
    meta["stages"]["watershed"] = {"params": {"other": 1}, "finished": None}
    root.attrs["emdask"] = meta
    run(cfg, stages=["segment"])
    # an align stage that failed before a block leaves the finished stages after it alone
    seg = open_volume(cfg["output"]["path"], "segmentation_0.5").values
    meta = dict(root.attrs["emdask"])
    meta["stages"]["align"] = {"params": {"other": 1}, "finished": None}
    root.attrs["emdask"] = meta
    run(cfg, stages=["align"])
    np.testing.assert_array_equal(open_volume(cfg["output"]["path"],
                                              "segmentation_0.5").values, seg)
    # a run that failed before its store existed left only its log: no obstacle
    (tmp_path / "new.zarr").mkdir()
    (tmp_path / "new.zarr" / "emdask.log").write_text("failed: ...")
    cfg["output"]["path"] = str(tmp_path / "new.zarr")
    run(cfg, dry_run=True)


def test_values_that_cannot_work_are_refused_when_the_config_is_read(tmp_path, tiny_model):
    for section, values, message in [
            ("cluster", {"n_workers": -1}, r"cluster.n_workers must be >= 0"),  # hung
            ("segment", {"size_threshold": -5}, r"\[segment\] size_threshold"),
            ("predict", {"device": "gpu"}, r"predict.device must be 'auto', 'cpu'"),
            ("input", {"intensity": [200, 100]}, r"black < white, got \[200, 100\]"),
            ("synapses", {"model": "synapses", "threshold": 1.5},
             r"synapses.threshold must be in \(0, 1\]"),
            ("synapses", {"model": "synapses", "tta": 3},
             r"synapses.tta must be 1, 2, 4, 8 or 16")]:
        with pytest.raises(ValueError, match=message):
            load_run_config(_config(tmp_path, tiny_model, **{section: values}))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            run(_config(tmp_path, tiny_model, predict={"device": "cuda"}))


def test_a_skipped_stage_does_not_bind_a_rerun_with_other_input(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, input={"intensity": [20, 230]})
    run(cfg, stages=["align"])  # no [align] section: recorded as skipped
    cfg["input"]["intensity"] = "auto"
    assert run(cfg)["stages"]["relabel"]["finished"]


# ------------------------------------------------------------------ the command line
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[input\nurl = 'x'\n")
    code, err = _cli(capsys, "run", str(bad))
    assert code == 2 and err.startswith(f"emdask: error: {bad}: not valid TOML")
    assert err.count("\n") == 1
    code, err = _cli(capsys, "run", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml: config file not found" in err
    (tmp_path / "afile").write_text("x")
    cfg = tmp_path / "run.toml"
    cfg.write_text(to_toml({"input": {"url": str(sample_path()), "dataset": "raw"},
                            "output": {"path": str(tmp_path / "afile")}}))
    code, err = _cli(capsys, "run", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "afile is a file" in err
    with pytest.raises(ValueError, match="afile is a file"):
        main(["--debug", "run", str(cfg)])  # --debug: the exception itself
    with pytest.raises(ValueError, match="afile is a file"):
        main(["run", str(cfg), "--debug"])


def test_cli_version_help_and_dry_run(tmp_path, tiny_model, capsys):
    import emdask

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"emdask {emdask.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "emdask run my_volume.toml --dry-run" in out
    assert "``" not in out  # not the raw docstring
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for stage in ("align", "predict", "synapses", "report", "--dry-run"):
        assert stage in out
    cfg = tmp_path / "run.toml"
    cfg.write_text(to_toml(_config(tmp_path, tiny_model)))
    code = main(["run", str(cfg), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "dry run" in out
    assert "blocks   4 of (24, 64, 64) voxels" in out and "predict      to run" in out
    assert "a worker needs about" in out
    assert not (tmp_path / "out.zarr").exists()


def test_runs_log_progress_to_the_store_and_keep_the_dashboard_local(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model)
    run(cfg)
    log = (Path(cfg["output"]["path"]) / "emdask.log").read_text()
    assert "== emdask run" in log and "predict" in log and "elapsed" in log
    assert duration(42.14) == "42.1 s" and duration(185) == "3 min 05 s"
    assert duration(7620) == "2 h 07 min"
    assert ClusterSpec().dashboard.startswith("127.0.0.1")
    import psutil

    with make_cluster(ClusterSpec(n_workers=1, processes=False)) as cluster:
        port = int(cluster.dashboard_link.split(":")[-1].split("/")[0])
        listening = {c.laddr.ip for c in psutil.Process().net_connections()
                     if c.status == "LISTEN" and c.laddr.port == port}
        assert listening == {"127.0.0.1"}


# ------------------------------------------------------------------ other traps
def test_uint16_affinities_are_refused_not_guessed():
    affs = np.full((3, 4, 4, 4), 60000, np.uint16)
    with pytest.raises(ValueError, match=r"got uint16; convert them"):
        segment(affs, [0.5])


def test_basins_quantizes_float_affinities():
    rng = np.random.default_rng(0)
    affs = rng.random((3, 12, 12, 12)).astype(np.float32)
    params = WatershedParams(size_threshold=0)
    from_float = basins(affs, (0, 0, 0), (6, 6, 6), params, halo=3)
    by_hand = np.rint(affs.astype(np.float64) * 65535).astype(np.uint16)  # 1.0 -> 65535
    from_uint16 = basins(by_hand, (0, 0, 0), (6, 6, 6), params, halo=3)
    for a, b in zip(from_float, from_uint16, strict=True):
        np.testing.assert_array_equal(a, b)
    assert from_float[0].max() > 1  # not all background


def test_nearest_rendering_keeps_uint64_ids():
    ids = np.arange(64, dtype=np.uint64).reshape(8, 8) + np.uint64(2**60 + 1)
    shifted = warp_section(ids, np.ones((2, 2, 2)), 8, order=0)  # pixel p reads p + 1
    np.testing.assert_array_equal(shifted[:7, :7], ids[1:, 1:])
    assert shifted.dtype == np.uint64 and (shifted[7] == 0).all()


# ------------------------------------------------------------------ packaging
def test_torch_is_a_lower_bound_and_the_nc_weights_are_opt_in(tmp_path):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = [d for d in meta["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req and "==" not in torch_req[0] and ">=" in torch_req[0]
    assert not any("weights_nc" in g for g in meta["tool"]["setuptools"]["package-data"]
                   ["emdask"])
    with pytest.raises(ValueError, match="CC BY-NC-SA 3.0.*accept_licence=True"):
        pretrained("synapses")
    with pytest.raises(ValueError, match="give a synapse model"):
        predict_synapses(da.zeros((8, 64, 64), np.uint8))
    cfg = _config(tmp_path, "fibsem", synapses={"model": "synapses"})
    with pytest.raises(ValueError, match=r"\[synapses\] accept_licence = true"):
        run(cfg)
    assert json.loads((WEIGHTS_NC / "synapses.json").read_text())["card"]["threshold"] == 0.99
