"""emdask run: config checks, stages, resume after SIGKILL, lost workers, hung tasks."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster

from emdask import open_volume, save_volume, segment
from emdask.config import to_toml
from emdask.data import sample_path
from emdask.models import AffinityUNet, ModelConfig, save_model
from emdask.pipeline import (
    ClusterSpec,
    Grid,
    _Context,
    _run_blocks,
    done_blocks,
    load_run_config,
    make_cluster,
    run,
)
from emdask.predict import predict_affinities

THREADS = {"processes": False, "n_workers": 2}  # fast to start; processes where it matters


def _config(tmp_path, model, name="out", chunks=(16, 64, 64), roi=((0, 0, 0), (40, 160, 160)),
            cluster=None, **segment):
    return {
        "input": {"url": str(sample_path()), "dataset": "raw",
                  "roi": [list(r) for r in roi] if roi else None},
        "output": {"path": str(tmp_path / f"{name}.zarr"), "chunks": list(chunks)},
        "predict": {"model": model},
        "segment": {"thresholds": [0.3, 0.5], **segment},
        "evaluate": {"url": str(sample_path()), "dataset": "neuron_ids"},
        "cluster": cluster or THREADS,
    }


def _outputs(store) -> dict:
    names = ["affinities", "fragments", "segmentation_0.3", "segmentation_0.5"]
    return {n: open_volume(store, n).values for n in names}


def _chunk_mtimes(store: str, dataset: str) -> dict:
    root = Path(store, dataset, "s0", "c")
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ configuration
def test_config_errors_name_the_key(tmp_path, tiny_model):
    good = _config(tmp_path, tiny_model)
    assert load_run_config(good).segment.thresholds == [0.3, 0.5]
    with pytest.raises(ValueError, match=r"config.segment: unknown keys \['treshold'\]"):
        load_run_config({**good, "segment": {"treshold": 0.5}})
    with pytest.raises(TypeError, match=r"config.output: chunks = 64 should be of type list"):
        load_run_config({**good, "output": {"path": "x.zarr", "chunks": 64}})
    with pytest.raises(TypeError, match=r"n_workers = '2' should be of type int"):
        load_run_config({**good, "cluster": {"n_workers": "2"}})
    with pytest.raises(ValueError, match="thresholds must be strictly increasing"):
        load_run_config({**good, "segment": {"thresholds": [0.5, 0.3]}})
    with pytest.raises(ValueError, match="cluster.kind must be"):
        load_run_config({**good, "cluster": {"kind": "kubernetes"}})
    with pytest.raises(ValueError, match=r"\[segment\] solve = 'tree' works for the"):
        load_run_config({**good, "segment": {"thresholds": [0.5], "score": "median",
                                              "solve": "tree"}})
    with pytest.raises(ValueError, match="missing required keys \\['url'\\]"):
        load_run_config({**good, "input": {"dataset": "raw"}})
    with pytest.raises(ValueError, match="synapses.dtype must be 'uint8' or 'float32'"):
        load_run_config({**good, "synapses": {"model": "synapses", "dtype": "float16"}})
    with pytest.raises(ValueError, match=r"synapses.radius must be 3 voxel counts"):
        load_run_config({**good, "synapses": {"model": "synapses", "radius": [1, 0, 0]}})
    with pytest.raises(ValueError, match=r"align.solve_window must be >= 2 \* align.neighbours"):
        load_run_config({**good, "align": {"neighbours": 3, "solve_window": 5}})
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("input: {url: a.zarr}\noutput: {path: b.zarr}\n"
                         "cluster: {kind: slurm, jobqueue: {cores: 4, memory: 8GB}}\n")
    assert load_run_config(yaml_file).cluster.jobqueue == {"cores": 4, "memory": "8GB"}


def test_slurm_job_script():
    spec = load_run_config({
        "input": {"url": "a.zarr"}, "output": {"path": "b.zarr"},
        "cluster": {"kind": "slurm", "maximum_jobs": 4, "jobqueue": {
            "cores": 8, "processes": 2, "memory": "32GB", "queue": "short",
            "walltime": "02:00:00", "account": "connectomics",
            "job_extra_directives": ["--gres=gpu:1"]}}}).cluster
    with make_cluster(spec) as cluster:
        script = cluster.job_script()
    for line in ["#SBATCH -p short", "#SBATCH -A connectomics", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=30G", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1"]:
        assert line in script, (line, script)
    assert "--nworkers 2" in script and "--nthreads 4" in script


# ------------------------------------------------------------------ the stages
def test_run_equals_the_library_functions(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, roi=None, chunks=(16, 64, 64))
    # every stage but meshes and skeletons (tests/test_viewing.py), which take 30 s here
    result = run(cfg, stages=["predict", "segment", "synapses", "pyramid", "report"])
    store = cfg["output"]["path"]
    out = _outputs(store)
    raw = open_volume(sample_path(), "raw")
    from emdask.models import load_model

    ref = predict_affinities(raw, load_model(tiny_model), chunks=(50, 192, 192),
                             dtype="uint8").values
    assert out["affinities"].shape == ref.shape
    assert np.abs(out["affinities"].astype(int) - ref).max() <= 1  # float rounding at x.5
    # the pipeline's blocks give exactly what segment() gives on the same affinities
    segs = segment(open_volume(store, "affinities")[:3], [0.3, 0.5], return_fragments=True)
    for name, seg in zip(["fragments", "segmentation_0.3", "segmentation_0.5"], segs,
                         strict=True):
        np.testing.assert_array_equal(out[name], seg.values)
    stages = result["stages"]
    assert all(stages[s]["finished"] for s in stages)
    assert set(stages["report"]["scores"]) == {"segmentation_0.3", "segmentation_0.5"}
    assert Path(store).with_suffix(".png").stat().st_size > 10_000


def test_roi_keeps_physical_coordinates_and_reruns_are_checked(tmp_path, tiny_model, capsys):
    cfg = _config(tmp_path, tiny_model, roi=((8, 32, 16), (40, 160, 160)))
    run(cfg, stages=["predict", "segment"])
    store = cfg["output"]["path"]
    seg = open_volume(store, "segmentation_0.5")
    assert seg.shape == (32, 128, 144)
    raw_offset = np.array(open_volume(sample_path(), "raw").attrs["offset"])
    assert seg.attrs["offset"] == tuple(raw_offset + [80, 320, 160])  # the ROI's corner, nm
    assert seg.attrs["voxel_size"] == (10, 10, 10)
    before = _chunk_mtimes(store, "affinities")
    capsys.readouterr()
    run(cfg)  # nothing left to do but the report
    assert "predict: 12 of 12 blocks already done" in capsys.readouterr().err
    changed = {**cfg, "segment": {"thresholds": [0.3, 0.6]}}
    with pytest.raises(ValueError, match=r"agglomerate.*other parameters.*thresholds: "
                                         r"\[0.3, 0.5\] -> \[0.3, 0.6\]"):
        run(changed)
    run(changed, overwrite=True)  # redoes agglomerate and relabel, not predict
    assert _chunk_mtimes(store, "affinities") == before
    assert "segmentation_0.6" in open_volume(store, "segmentation_0.6").attrs["source"]
    import zarr

    labels = zarr.open_group(f"{store}/raw/labels", mode="r").attrs["ome"]["labels"]
    assert labels == ["fragments", "segmentation_0.3", "segmentation_0.6"]  # 0.5 is gone


# ------------------------------------------------------------------ resilience
SMALL = {"chunks": (8, 32, 32), "roi": ((0, 0, 0), (40, 96, 96))}  # 45 small blocks


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> dict:
    """Outputs of an undisturbed run, to compare interrupted runs with (its global step is
    one task, as the default's for so few blocks; the tree's test compares with it too)."""
    cfg = _config(tmp_path_factory.mktemp("ref"), tiny_model, name="ref", **SMALL,
                  solve="global")
    run(cfg, stages=["predict", "segment"])
    return _outputs(cfg["output"]["path"])


def test_the_tree_solve_equals_the_global_one_and_resumes_per_box(tmp_path, tiny_model,
                                                                 reference, capsys):
    cfg = _config(tmp_path, tiny_model, name="tree", **SMALL, solve="tree")
    run(cfg, stages=["predict", "segment"])
    store = cfg["output"]["path"]
    tree = _outputs(store)
    for name in reference:  # the reference: one global task
        np.testing.assert_array_equal(tree[name], reference[name], err_msg=name)
    # a crash in the upper half of the tree: its boxes' markers, the stage's and the
    # relabel's lost, and a segmentation with them
    done = Path(store, "_emdask", "done")
    boxes = sorted(done.glob("agglomerate-tree/*/*"), key=lambda p: int(p.name))
    assert len(boxes) == 89  # 45 blocks: 45 leaves and 44 inner boxes
    for marker in [*boxes[60:], *done.glob("agglomerate/*/*"), *done.glob("relabel/*/*")]:
        marker.unlink()
    shutil.rmtree(Path(store, "raw", "labels", "segmentation_0.5", "s0", "c"))
    capsys.readouterr()
    run(cfg, stages=["segment"])
    assert "tree: 60 of 89 boxes already done" in capsys.readouterr().err
    resumed = _outputs(store)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_sigkill_mid_stage_then_resume(tmp_path, tiny_model, reference):
    # small blocks so the kill lands mid-stage; worker processes, as in real use
    cfg = _config(tmp_path, tiny_model, name="killed", **SMALL,
                  cluster={"n_workers": 1, "threads_per_worker": 1})
    store = cfg["output"]["path"]
    toml = tmp_path / "run.toml"
    toml.write_text(to_toml(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "emdask.cli", "run", str(toml), "--stage",
                             "predict", "--stage", "segment"],
                            start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(done_blocks(store, "predict")) < 8:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-stage
    proc.wait()
    assert len(done_blocks(store, "relabel")) < 45  # it was interrupted
    # the chunks of the blocks marked done (a block written but not yet marked when the
    # kill came is unfinished and is redone)
    finished = {Path(store, "affinities", "s0", "c", "0",
                     *(str(i) for i in np.unravel_index(b, (5, 3, 3))))
                for b in done_blocks(store, "predict")}
    before = {p: t for p, t in _chunk_mtimes(store, "affinities").items() if p in finished}
    assert len(before) == len(finished) >= 8
    run({**cfg, "cluster": THREADS}, stages=["predict", "segment"])
    after = _chunk_mtimes(store, "affinities")
    assert all(after[p] == t for p, t in before.items())  # finished chunks not redone
    resumed = _outputs(store)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_killed_worker_loses_nothing(tmp_path, tiny_model, reference):
    cfg = _config(tmp_path, tiny_model, name="lost", **SMALL)
    store = cfg["output"]["path"]
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = list(client.run(os.getpid).values())

        def kill_one():
            while len(done_blocks(store, "predict")) < 8:
                time.sleep(0.01)
            os.kill(pids[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        run(cfg, stages=["predict", "segment"], client=client)
        killer.join()
        assert len(set(client.run(os.getpid).values()) - set(pids)) >= 1  # restarted
    lost = _outputs(store)
    for name in reference:
        np.testing.assert_array_equal(lost[name], reference[name], err_msg=name)


_HANGS: dict = {}


def _hangs_once(ctx, block):
    """Block 2's first attempt hangs (a stuck file system, a preempted GPU...)."""
    if block == 2 and not _HANGS.get(block):
        _HANGS[block] = True
        threading.Event().wait(30)
    from emdask.store import mark_done

    mark_done(ctx.store, "test", block, ctx.stamp)


def test_hung_task_is_abandoned_and_retried(tmp_path):
    ctx = _Context(str(tmp_path / "s.zarr"), Grid((4, 4, 4), (2, 2, 2)))
    spec = ClusterSpec(task_timeout=1.0, retries=2)
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        assert _run_blocks(client, ctx, "test", _hangs_once, spec) == 8
        assert time.perf_counter() - t0 < 15
    assert done_blocks(ctx.store, "test") == set(range(8))
    assert _HANGS == {2: True}


def test_roi_in_nm_selects_the_same_voxels(tmp_path, tiny_model):
    from emdask.pipeline import _input

    offset = np.array(open_volume(sample_path(), "raw").attrs["offset"])
    voxels = load_run_config(_config(tmp_path, tiny_model, roi=((8, 32, 16), (40, 160, 160))))
    nm = load_run_config(_config(tmp_path, tiny_model, roi=(
        tuple(offset + [80, 320, 160]), tuple(offset + [400, 1600, 1600]))))
    nm.input.roi_units = "nm"
    (_, a, begin_a), (_, b, begin_b) = _input(voxels), _input(nm)
    assert begin_a == begin_b == (8, 32, 16) and a.shape == b.shape == (32, 128, 144)


def test_cluster_tolerates_the_configured_worker_losses():
    from emdask.cluster import connect

    spec = ClusterSpec(n_workers=1, processes=False, allowed_failures=25)
    with connect(spec) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 25


def test_local_workers_start_without_malloc_trim():
    # distributed's MALLOC_TRIM_THRESHOLD_ halves the speed of the block kernels
    from emdask.pipeline import local_cluster

    with local_cluster(n_workers=1, dashboard_address=":0") as cluster, Client(cluster) as c:
        env = c.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(env.values()) == [None]


def test_attaches_to_a_running_scheduler(tmp_path, tiny_model, reference, capsys):
    cfg = _config(tmp_path, tiny_model, name="attached", **SMALL)
    with LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster:
        run(cfg, stages=["predict", "segment"], scheduler=cluster.scheduler_address)
    assert f"attached to {cluster.scheduler_address}" in capsys.readouterr().err
    out = _outputs(cfg["output"]["path"])
    for name in reference:
        np.testing.assert_array_equal(out[name], reference[name], err_msg=name)


def test_a_stage_alone_needs_its_upstream_as_configured(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, **SMALL)
    with pytest.raises(ValueError, match="run it first"):
        run(cfg, stages=["watershed"])
    run(cfg, stages=["predict", "watershed", "agglomerate"])
    changed = {**cfg, "segment": {"thresholds": [0.4, 0.6]}}
    with pytest.raises(ValueError, match=r"stage 'agglomerate' was run with other parameters"
                                         r".*thresholds"):
        run(changed, stages=["relabel"])  # would relabel with the old tables
    # a config object holding tuples resumes like the lists stored in the attributes
    tupled = load_run_config(cfg)
    tupled.input.roi = tuple(tuple(r) for r in tupled.input.roi)
    tupled.segment.thresholds = tuple(tupled.segment.thresholds)
    run(tupled, stages=["relabel"])
    with pytest.raises(ValueError, match="give the same dataset names"):
        load_run_config({**cfg, "segment": {"thresholds": [0.3, 0.30000001]}})


def test_segments_affinities_the_user_has(tmp_path, tiny_model, reference):
    """[affinities]: no net runs; the user's affinities are segmented, whether they cover
    the region of interest or the whole input (values outside the region are not read)."""
    roi = SMALL["roi"]
    cfg = _config(tmp_path, tiny_model, name="given", **SMALL)
    full = open_volume(sample_path(), "raw")
    covering = np.random.default_rng(0).random((3, *full.shape), np.float32)  # junk
    covering[(slice(None), *(slice(a, b) for a, b in zip(*roi, strict=True)))] = (
        reference["affinities"][:3].astype(np.float32) / 255)
    save_volume(covering, tmp_path / "affs.zarr", "whole",
                voxel_size=full.attrs["voxel_size"], offset=full.attrs["offset"])
    save_volume(reference["affinities"], tmp_path / "affs.zarr", "roi",
                voxel_size=full.attrs["voxel_size"])
    for dataset in ("whole", "roi"):
        given = {**cfg, "output": {**cfg["output"], "path": str(tmp_path / f"{dataset}.zarr")},
                 "predict": {"model": "no such model"},
                 "affinities": {"url": str(tmp_path / "affs.zarr"), "dataset": dataset}}
        run(given, stages=["segment"])  # no predict stage needed before it
        out = {n: open_volume(given["output"]["path"], n).values
               for n in ("fragments", "segmentation_0.3", "segmentation_0.5")}
        for name, labels in out.items():
            np.testing.assert_array_equal(labels, reference[name], err_msg=name)
    with pytest.raises(ValueError, match=r"fit neither the input .* nor its region"):
        run({**given, "affinities": {"url": str(tmp_path / "affs.zarr"), "dataset": "roi"},
             "input": {**given["input"], "roi": [[0, 0, 0], [32, 96, 96]]}})
    with pytest.raises(ValueError, match=r"\[segment\] thresholds are needed"):
        load_run_config({**given, "segment": {}})


def test_learned_agglomeration_in_the_pipeline(tmp_path, tiny_model):
    """[segment] score = "learned" gives what segment() gives with the same classifier,
    whose raw EM features read the EM that the predict stage keeps in the store."""
    from emdask.segmentation import segment

    learned = {"thresholds": [0.3, 0.5], "score": "learned", "classifier": "fibsem"}
    cfg = {**_config(tmp_path, tiny_model, name="learned", **SMALL), "segment": learned}
    run(cfg, stages=["predict", "segment"])
    store = cfg["output"]["path"]
    expected = segment(open_volume(store, "affinities")[:3].values, [0.3, 0.5],
                       score="learned", classifier="fibsem",
                       raw=open_volume(store, "raw").values)
    for t, labels in zip((0.3, 0.5), expected, strict=True):
        np.testing.assert_array_equal(open_volume(store, f"segmentation_{t}").values,
                                      labels.compute())
    with pytest.raises(ValueError, match=r"\[segment\] score = 'learned' needs classifier"):
        load_run_config({**cfg, "segment": {"thresholds": [0.5], "score": "learned"}})
    with pytest.raises(ValueError, match=r"\[segment\] nothing: no such classifier"):
        load_run_config({**cfg, "segment": {**learned, "classifier": "nothing"}})


def test_synapse_stage_writes_objects_and_tables(tmp_path, tiny_model, capsys, monkeypatch):
    import emdask.predict
    from emdask.predict import symmetries

    passes = []  # the stage's test-time augmentation: 4 passes per task

    def counted(*args, **kwargs):
        passes.append((args[3], args[4]))  # flipped and transposed
        return symmetric_pass(*args, **kwargs)

    symmetric_pass = emdask.predict._symmetric_pass
    monkeypatch.setattr(emdask.predict, "_symmetric_pass", counted)
    torch.manual_seed(1)
    syn_model = tmp_path / "syn.pt"
    save_model(AffinityUNet(ModelConfig(width=4, downsample=[[1, 2, 2]], target="synapses",
                                        voxel_size=[10.0, 10.0, 10.0])), syn_model)
    partner_model = tmp_path / "partners.pt"  # untrained: checks the machinery only
    save_model(AffinityUNet(ModelConfig(width=4, downsample=[[1, 2, 2]], target="partners",
                                        in_channels=2, voxel_size=[10.0, 10.0, 10.0])),
               partner_model)
    cfg = _config(tmp_path, tiny_model, **SMALL)
    cfg["synapses"] = {"model": str(syn_model), "threshold": 0.5, "min_size": 30,
                       "radius": [0, 3, 3], "tta": 4,
                       "direction_model": str(partner_model), "direction_patch": [8, 16, 16]}
    # (not meshes and skeletons: 45 small blocks of them are slow, and tested elsewhere)
    result = run(cfg, stages=["predict", "segment", "synapses", "pyramid"])
    store = cfg["output"]["path"]
    assert result["stages"]["synapses"]["n_synapses"] >= 0
    probs = open_volume(store, "synapse_probabilities")
    labels = open_volume(store, "synapses")
    assert probs.shape == labels.shape == (40, 96, 96) and probs.dtype == np.float32
    assert passes and all(passes.count(s) == len(passes) // 4 for s in symmetries(4))
    table = pd.read_parquet(Path(store, "synapses.parquet"))
    edges = pd.read_parquet(Path(store, "connectome.parquet"))
    assert len(table) == result["stages"]["synapses"]["n_synapses"] == labels.values.max()
    assert {"id", "size", "z_nm", "partner_1", "partner_2", "direction"} <= set(table.columns)
    assert {"partner_a", "partner_b", "n_synapses", "total_size"} <= set(edges.columns)
    assert {"pre", "post", "direction_score"} <= set(table.columns)
    both = (table["partner_1"] > 0) & (table["partner_2"] > 0)
    assert table.loc[both, "direction"].isin(["1->2", "2->1", "unknown"]).all()
    assert edges["directed"].any() == (table["pre"] > 0).any()
    capsys.readouterr()
    coarse = open_volume(cfg["output"]["path"], "synapses", level=1).values
    run(cfg, stages=["synapses"])  # resumes: every block already predicted
    assert "synapses: 45 of 45 blocks already done" in capsys.readouterr().err
    # the objects are not rewritten, so their pyramid levels stay
    np.testing.assert_array_equal(open_volume(cfg["output"]["path"], "synapses",
                                              level=1).values, coarse)
    # the report scores synapses against ground truth: here 3 of the detections and one
    # that no detection touches
    sample = open_volume(str(sample_path()), "raw")
    found = labels.values
    n, k = int(found.max()), min(3, int(found.max()))
    truth = np.zeros(sample.shape, np.uint64)
    truth[:40, :96, :96] = np.where(found <= k, found, 0)
    # a true synapse of 36 voxels (above the size filter) where nothing was detected
    y, x = next((y, x) for y in range(0, 90, 6) for x in range(0, 90, 6)
                if not found[39, y:y + 6, x:x + 6].any())
    truth[39, y:y + 6, x:x + 6] = n + 1
    gt_url = str(tmp_path / "truth.zarr")
    for name, data in (("synapses", truth),
                       ("cells", open_volume(str(sample_path()), "neuron_ids").values)):
        save_volume(data, gt_url, name, voxel_size=sample.attrs["voxel_size"])
    cfg["evaluate"] = {"url": gt_url, "dataset": "cells", "synapses": "synapses",
                       "cells": "cells"}
    scores = run(cfg, stages=["report"], overwrite=True)["stages"]["report"]["scores"][
        "synapses"]
    assert (scores["n_detected"], scores["n_true"], scores["n_matched"]) == (n, k + 1, k)
    assert scores["recall"] == pytest.approx(k / (k + 1))
    assert scores["precision"] == pytest.approx(k / n) and scores["partners_of"] == k
    assert f"({k} of {k + 1} true, {n} detected)" in capsys.readouterr().err


def test_align_stage_aligns_masks_and_resumes(tmp_path, tiny_model, capsys):
    import zarr

    from emdask.align import align, displacement_error, distort

    raw = open_volume(str(sample_path()), "raw")[:12].values
    distorted, truth = distort(raw, seed=2, translation=6, rotation=1.0, elastic=3)
    distorted[6] = 0  # a lost section
    src = tmp_path / "distorted.zarr"
    arr = zarr.create_array(str(src), shape=distorted.shape, chunks=(4, 96, 96),
                            dtype=np.uint8)
    arr[:] = distorted
    arr.attrs.update(resolution=[10.0, 10.0, 10.0])
    cfg = _config(tmp_path, tiny_model, chunks=(6, 96, 96), roi=None)
    cfg["input"] = {"url": str(src)}
    cfg["align"] = {}
    del cfg["evaluate"]
    run(cfg, stages=["align", "predict"])
    store = cfg["output"]["path"]
    aligned = open_volume(store, "raw").values
    mask = open_volume(store, "defects").values.astype(bool)
    table = pd.read_parquet(Path(store, "sections.parquet"))
    assert table["missing"].tolist() == [z == 6 for z in range(12)]
    assert mask[6].all() and not mask[:6, 30:-30, 30:-30].any()
    # the stage renders what the library computes
    library = align(distorted)
    np.testing.assert_array_equal(aligned, library.aligned.values)
    fields = zarr.open_array(str(Path(store, "alignment", "fields")))
    np.testing.assert_allclose(fields[:], library.fields.values)
    err = displacement_error(library.fields, truth)[[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]]
    assert np.median(err[:, 4:-4, 4:-4]) < 1.0
    # nets read the aligned stack; affinities that touch missing data are 0
    affs = open_volume(store, "affinities").values
    assert (affs[:3, 6] == 0).all() and (affs[0, 7] == 0).all() and affs[0, 5].any()
    capsys.readouterr()
    run(cfg, stages=["align"])
    assert "align: 8 of 8 blocks already done" in capsys.readouterr().err


def test_align_and_evaluate_score_in_one_frame(tmp_path, tiny_model):
    """With [align], the ground truth is warped into the aligned frame (integer gathering:
    uint64 ids above 2**53 survive) before it is scored."""
    from emdask.align import distort, render
    from emdask.metrics import evaluate

    sample = open_volume(str(sample_path()), "raw")
    raw = sample[:12].values
    distorted, truth = distort(raw, seed=2, translation=6, rotation=1.0, elastic=3)
    # the ground truth, distorted like the raw (nearest neighbour), with huge ids
    labels = open_volume(str(sample_path()), "neuron_ids")[:12].values.astype(np.uint64)
    labels = np.where(labels > 0, labels + np.uint64(2**60), 0).astype(np.uint64)
    ys, xs = np.indices(raw.shape[1:])
    moved = np.zeros_like(labels)
    for z in range(12):
        y = np.rint(ys + truth[z, 0]).astype(int)
        x = np.rint(xs + truth[z, 1]).astype(int)
        inside = (y >= 0) & (y < raw.shape[1]) & (x >= 0) & (x < raw.shape[2])
        moved[z][inside] = labels[z][y[inside], x[inside]]
    src = str(tmp_path / "distorted.zarr")
    save_volume(distorted, src, "raw", voxel_size=sample.attrs["voxel_size"])
    save_volume(moved, src, "labels", voxel_size=sample.attrs["voxel_size"])
    cfg = _config(tmp_path, tiny_model, chunks=(6, 96, 96), roi=None)
    cfg["input"] = {"url": src, "dataset": "raw"}
    cfg["align"] = {}
    cfg["evaluate"] = {"url": src, "dataset": "labels"}
    scores = run(cfg, ["align", "predict", "segment", "report"])["stages"]["report"]["scores"]
    store = cfg["output"]["path"]
    import zarr

    fields = zarr.open_array(str(Path(store, "alignment", "fields")))
    import xarray as xr

    aligned_truth = render(moved, xr.DataArray(fields[:], attrs=dict(fields.attrs)),
                           order=0).values
    assert set(np.unique(aligned_truth)) <= set(np.unique(labels))  # ids moved, not blended
    for t in (0.3, 0.5):
        seg = open_volume(store, f"segmentation_{t:g}").values
        expected = evaluate(seg, aligned_truth)
        assert scores[f"segmentation_{t:g}"]["voi"] == pytest.approx(expected["voi"])
        assert scores[f"segmentation_{t:g}"]["voi"] != pytest.approx(
            evaluate(seg, moved)["voi"])  # what scoring the unaligned truth gave
    # redoing predict keeps the aligned stack (the align stage's, not predict's)
    aligned = open_volume(store, "raw").values
    run({**cfg, "predict": {**cfg["predict"], "dtype": "float32"}}, ["predict"], overwrite=True)
    np.testing.assert_array_equal(open_volume(store, "raw").values, aligned)


def test_a_dry_run_with_errors_plans_the_boundary_net(tmp_path, tiny_model, capsys):
    # the [errors] models are checked before any stage, and do not stand in for the net
    text = run({**_config(tmp_path, tiny_model), "errors": {}}, dry_run=True)["plan"]
    from emdask.errors import load_split_model

    floor = load_split_model("splits").floor  # the card's
    assert f"model splits, segments under {floor} voxels joined" in text
    assert "tiny.pt" in text
