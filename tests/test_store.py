"""The output store cannot be silently corrupted: one run at a time (the lease), markers of
a stage's generation only, ordered clearing, ``emdask verify``, no pickles, one version."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from emdask import open_volume
from emdask.cli import main
from emdask.config import to_toml
from emdask.data import sample_path
from emdask.models import load_model
from emdask.pipeline import StoreBusy, done_blocks, run, verify
from emdask.store import LEASE, Lease, lease

THREADS = {"processes": False, "n_workers": 2}
NAMES = ("affinities", "fragments", "segmentation_0.3", "segmentation_0.5")


def _config(tmp_path, model, name="out", roi=((0, 0, 0), (16, 64, 64)), **segment):
    return {
        "input": {"url": str(sample_path()), "dataset": "raw", "roi": [list(r) for r in roi]},
        "output": {"path": str(tmp_path / f"{name}.zarr"), "chunks": [8, 32, 32]},
        "predict": {"model": model},
        "segment": {"thresholds": [0.3, 0.5], **segment},
        "cluster": THREADS,
    }


def _outputs(store) -> dict:
    return {n: open_volume(store, n).values for n in NAMES
            if n != "affinities" or Path(store, n).exists()}


def _same(a: dict, b: dict) -> None:
    for name, values in a.items():
        np.testing.assert_array_equal(values, b[name], err_msg=name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> tuple[dict, dict]:
    """A finished run's config and outputs (8 blocks)."""
    cfg = _config(tmp_path_factory.mktemp("ref"), tiny_model, name="ref")
    run(cfg)
    return cfg, _outputs(cfg["output"]["path"])


def _copy(cfg: dict, tmp_path) -> dict:
    import shutil

    dest = tmp_path / "copy.zarr"
    shutil.copytree(cfg["output"]["path"], dest)
    return {**cfg, "output": {**cfg["output"], "path": str(dest)}}


# ------------------------------------------------------------------ the lease
def test_a_second_run_on_a_store_is_refused_while_the_first_runs(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, roi=((0, 0, 0), (40, 160, 160)))
    store = cfg["output"]["path"]
    toml = tmp_path / "run.toml"
    toml.write_text(to_toml(cfg))
    # the segmentation stages only: long enough to hold the lease while the others try
    first = subprocess.Popen([sys.executable, "-m", "emdask.cli", "run", str(toml), "--stage",
                              "predict", "--stage", "segment"], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not Path(store, LEASE).exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()
        time.sleep(0.01)
    with pytest.raises(StoreBusy, match=rf"in use by another emdask run .*pid {first.pid} "
                                        rf"on {socket.gethostname()}"):
        run(cfg)
    second = subprocess.run([sys.executable, "-m", "emdask.cli", "run", str(toml)],
                            capture_output=True, text=True, check=False)
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1
    assert "in use by another emdask run" in second.stderr
    assert first.wait(300) == 0, first.stderr.read().decode()
    assert not Path(store, LEASE).exists()  # released
    assert verify(store) == []


def _lease_file(store: Path, host: str, pid: int, age: float) -> None:
    (store / "_emdask").mkdir(parents=True, exist_ok=True)
    (store / LEASE).write_text(json.dumps({"host": host, "pid": pid, "run": "old",
                                           "started": "then",
                                           "heartbeat": time.time() - age}))


def test_a_stale_lease_is_taken_over(tmp_path):
    store = tmp_path / "s.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lease_file(store, socket.gethostname(), dead.pid, age=1)  # its process has died
    with lease(str(store)) as held:
        assert json.loads((store / LEASE).read_text())["run"] == held.run
    _lease_file(store, "another-host", 1, age=5)  # alive, as far as anyone can tell
    with pytest.raises(StoreBusy, match="another-host"):
        Lease(str(store), timeout=60).acquire()
    _lease_file(store, "another-host", 1, age=120)  # no heartbeat for two minutes
    held = Lease(str(store), timeout=60)
    held.acquire()
    assert json.loads((store / LEASE).read_text())["run"] == held.run
    held.release()
    assert not (store / LEASE).exists()



def test_a_run_whose_lease_was_taken_over_stops_between_blocks(tmp_path):
    from distributed import Client, LocalCluster

    from emdask.cluster import HELD_LEASE, progress

    held = Lease(str(tmp_path / "s.zarr"))
    held.lost = True  # what the heartbeat finds when another run has taken the lease
    token = HELD_LEASE.set(held)
    try:
        with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            futures = client.map(time.sleep, [0.01] + [5.0] * 4, pure=False)
            with pytest.raises(StoreBusy, match="lease was taken over"):
                progress(futures, "test")
            assert all(f.cancelled() for f in futures[1:])
    finally:
        HELD_LEASE.reset(token)


# ------------------------------------------------------------------ verify
def _chunk(store: str, name: str) -> Path:
    return sorted(p for p in Path(store, name, "s0", "c").rglob("*") if p.is_file())[3]


def test_a_deleted_chunk_is_found_and_recomputed(tmp_path, finished):
    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    _chunk(store, "raw/labels/segmentation_0.5").unlink()
    problems = verify(store)
    assert len(problems) == 1 and problems[0].stage == "relabel"
    assert "segmentation_0.5/s0 chunk" in str(problems[0]) and "missing" in str(problems[0])
    run(cfg)  # a rerun finds the lost chunk by itself
    assert verify(store) == []
    _same(_outputs(store), finished[1])


def test_a_truncated_chunk_is_named_and_recomputed_after_repair(tmp_path, finished, capsys):
    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    chunk = _chunk(store, "affinities")
    chunk.write_bytes(chunk.read_bytes()[:50])
    assert main(["verify", store]) == 1
    out = capsys.readouterr().out
    assert "predict block" in out and "affinities/s0 chunk 0." in out and "does not decode" in out
    assert main(["verify", store, "--repair"]) == 1
    assert len(done_blocks(store, "predict")) == 7
    run(cfg)
    assert main(["verify", store]) == 0
    _same(_outputs(store), finished[1])


def test_a_lost_lookup_table_is_found_and_the_solve_redone(tmp_path, finished):
    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    Path(store, "_emdask", "lut", "3.npz").unlink()  # one block's table, of the global solve
    assert [str(p) for p in verify(store)] == ["agglomerate output: _emdask/lut/3.npz: missing"]
    verify(store, repair=True)
    run(cfg)
    assert verify(store) == []
    _same(_outputs(store), finished[1])


def test_a_store_of_given_affinities_is_whole_and_resumes_without_work(tmp_path, finished,
                                                                        capsys):
    cfg = finished[0]
    given = {**cfg, "output": {**cfg["output"], "path": str(tmp_path / "given.zarr")},
             "affinities": {"url": cfg["output"]["path"], "dataset": "affinities"}}
    run(given)
    assert verify(given["output"]["path"]) == []  # no affinities/s0 is expected there
    capsys.readouterr()
    run(given)
    err = capsys.readouterr().err
    assert "lost chunks" not in err and "predict: 8 of 8 blocks already done" in err
    _same({n: v for n, v in _outputs(given["output"]["path"]).items() if n != "affinities"},
          {n: v for n, v in finished[1].items() if n != "affinities"})


# ------------------------------------------------------------------ clearing
def test_markers_that_survive_a_failed_clear_mark_nothing_done(tmp_path, finished, monkeypatch):
    import emdask.pipeline

    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    # the markers cannot be deleted (an object store that refuses, a clear killed midway)
    real = emdask.pipeline.remove
    monkeypatch.setattr(emdask.pipeline, "remove",
                        lambda url, key: None if "/done/" in key else real(url, key))
    changed = {**cfg, "segment": {**cfg["segment"], "size_threshold": 0}}
    run(changed, overwrite=True)
    monkeypatch.undo()
    clean = _config(tmp_path, finished[0]["predict"]["model"], name="clean",
                    size_threshold=0)
    run(clean)
    _same(_outputs(store), _outputs(clean["output"]["path"]))


def test_a_clear_that_fails_halfway_leaves_nothing_marked_done(tmp_path, finished,
                                                               monkeypatch):
    import emdask.pipeline

    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    real = emdask.pipeline.remove

    def fails_on_data(url, key):
        if key.startswith("_emdask/graph"):
            raise PermissionError(f"{url}/{key}: permission denied")
        real(url, key)

    monkeypatch.setattr(emdask.pipeline, "remove", fails_on_data)
    changed = {**cfg, "segment": {**cfg["segment"], "low": 0.001}}
    with pytest.raises(PermissionError):
        run(changed, overwrite=True)
    monkeypatch.undo()
    run(changed, overwrite=True)
    clean = _config(tmp_path, finished[0]["predict"]["model"], name="clean", low=0.001)
    run(clean)
    _same(_outputs(store), _outputs(clean["output"]["path"]))


# ------------------------------------------------------------------ versions, pickles
def test_going_on_with_another_versions_store_is_refused_unless_asked(tmp_path, finished):
    import zarr

    cfg = _copy(finished[0], tmp_path)
    store = cfg["output"]["path"]
    root = zarr.open_group(store, mode="r+")
    meta = dict(root.attrs["emdask"])
    meta["stages"] = {k: {**v, "version": "0.0.1"} for k, v in meta["stages"].items()}
    root.attrs["emdask"] = meta
    with pytest.raises(ValueError, match=r"run by emdask 0\.0\.1, this is emdask .*"
                                         r"--other-version"):
        run(cfg)
    run(cfg, other_version=True)


def test_the_store_holds_no_pickles_and_models_load_no_code(finished, tmp_path):
    store = Path(finished[0]["output"]["path"])
    files = [p for p in (store / "_emdask").rglob("*") if p.is_file()
             and "done" not in p.parts and p.name != "zarr.json"
             and "c" not in p.relative_to(store / "_emdask").parts]
    assert files and all(p.suffix in (".npz", ".npy") for p in files), files
    for p in files:  # plain arrays: they load with pickles refused
        np.load(p, allow_pickle=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": {}, "payload": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_model(path)
