"""Boundary-net throughput against the hardware's peak, one definition for every path.

    python benchmarks/bench_predict.py [--models fibsem sstem] [--precision auto]

For each model, on real EM (the FlyEM medulla cube for ``fibsem``, the larval VNC stack for
``sstem``, mirrored to a larger volume with ``--tile``), prints:

- FLOPs per output voxel (convolutions, the padded net's count: the useful work);
- output Mvoxel/s and useful GFLOP/s of the net alone on one task-sized box, of the
  library path (``predict_affinities`` with its defaults, threaded scheduler) and of the
  pipeline's predict stage (``emdask run``, default LocalCluster, uint8 affinities);
- the fraction of this CPU's fp32 and bf16 peak that reaches (peaks measured here with a
  4096^2 matrix product on all cores, the best a CPU does in practice);
- the halo overhead: FLOPs computed over FLOPs of one pass over the whole volume, for the
  timed volume and for a 10 Gvoxel one at the same task size;
- peak memory (of this process, the volume and its affinities included / of the busiest
  worker) and the workers' user and system CPU time (system time: the kernel handing out
  fresh pages for the feature maps; threads fighting over cores would add to it).

Useful throughput counts output voxels only: context computed twice is not useful work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask
import h5py
import numpy as np
import torch

from emdask.models import pretrained
from emdask.predict import halo_overhead, inference_net, predict_affinities, task_shape
from emdask.volumes import as_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOLUMES = {  # model: (file, dataset, voxel size in nm)
    "fibsem": (DATA / "flyem_medulla_fib_neuroproof_sample2/medulla_fib_sample2_250cube.h5",
               "raw", (10.0, 10.0, 10.0)),
    "sstem": (DATA / "drosophila_vnc_sstem_gerhard2013/vnc_stack1_synapses_x0-640.h5",
              "raw", (50.0, 4.6, 4.6)),
}


def peaks() -> dict[str, float]:
    """GFLOP/s of a large matrix product in fp32 and bf16 on all cores, the best of 5
    rounds (a shared machine measures 20-35% below its peak in some rounds)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        a @ b
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(3):
                a @ b
            best = max(best, 3 * 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
    return out


def volume(model: str, tile: tuple[int, int, int]) -> np.ndarray:
    """The model's real volume, mirrored ``tile`` times along each axis."""
    path, dataset, _ = VOLUMES[model]
    with h5py.File(path, "r") as f:
        raw = f[dataset][:]
    for axis, n in enumerate(tile):
        parts = [raw if i % 2 == 0 else np.flip(raw, axis) for i in range(n)]
        raw = np.concatenate(parts, axis=axis)
    return np.ascontiguousarray(raw)


def peak_rss(reset: bool = False) -> float:
    """This process's peak resident memory (bytes) since the last reset (Linux: VmHWM,
    reset through /proc/self/clear_refs; ru_maxrss would carry a parent's over fork)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
        return 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return float("nan")


def pipeline(raw: np.ndarray, name: str, voxel_size, precision: str) -> dict:
    """The predict stage of ``emdask run`` on ``raw`` (written to a zarr store first)."""
    import psutil
    from distributed import Client

    from emdask.pipeline import ClusterSpec, make_cluster, run
    from emdask.volumes import save_volume

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/in.zarr"
        save_volume(as_volume(raw, voxel_size), src, "raw", chunks=(64, 128, 128))
        cfg = {"input": {"url": src, "dataset": "raw", "voxel_size": list(voxel_size)},
               "output": {"path": f"{tmp}/out.zarr"},
               "predict": {"model": name, "precision": precision}}

        def usage():
            p = psutil.Process()
            return p.cpu_times().user, p.cpu_times().system, peak_rss()

        with make_cluster(ClusterSpec()) as cluster, Client(cluster) as client:
            client.run(peak_rss, True)
            before = client.run(usage)
            report = run(cfg, stages=["predict"], client=client)
            after = client.run(usage)
    user = sum(after[w][0] - before[w][0] for w in after)
    system = sum(after[w][1] - before[w][1] for w in after)
    return {"seconds": report["timings"]["predict"], "user": user, "system": system,
            "peak": max(a[2] for a in after.values()), "workers": len(after)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fibsem", "sstem"])
    parser.add_argument("--precision", default="auto",
                        choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--tile", type=int, nargs=3, default=None,
                        help="mirror the volume this often per axis (default: fibsem 1 2 2, "
                        "sstem 4 2 2)")
    parser.add_argument("--no-pipeline", action="store_true")
    args = parser.parse_args()
    peak = peaks()
    print(f"CPU peak (matrix product, {torch.get_num_threads()} threads): fp32 "
          f"{peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n")
    rows = []
    for name in args.models:
        model = pretrained(name)
        dtype = str(inference_net(model, "cpu", args.precision).dtype).removeprefix("torch.")
        tile = args.tile or {"fibsem": (1, 2, 2), "sstem": (4, 2, 2)}[name]
        raw = volume(name, tile)
        vs = VOLUMES[name][2]
        fpv = model.flops_per_voxel()
        task = task_shape(model, raw.shape, (64, 256, 256), precision=args.precision)
        big = task_shape(model, (2154,) * 3, (64, 256, 256), precision=args.precision)
        print(f"{name}: {fpv / 1e3:.1f} kFLOP per output voxel; volume {raw.shape} "
              f"({raw.size / 1e6:.0f} Mvoxel); {dtype}; library task {task}, halo overhead "
              f"x{halo_overhead(model, raw.shape, task):.2f} (x"
              f"{halo_overhead(model, (2154,) * 3, big):.2f} for 10 Gvoxel in its tasks of "
              f"{big}, within the same memory)")

        def row(mode, voxels, seconds, memory, note="", name=name, fpv=fpv):
            g = voxels * fpv / seconds / 1e9
            rows.append(f"| {name} | {mode} | {voxels / seconds / 1e6:.2f} | {g:.0f} | "
                        f"{g / peak['fp32']:.0%} | {g / peak['bf16']:.0%} | "
                        f"{memory / 2**30:.1f} GiB | {note} |")

        # the net alone on one task-sized box of the volume (no reading, no writing)
        for precision in ("float32", dtype) if dtype != "float32" else ("float32",):
            net = inference_net(model, "cpu", precision)
            peak_rss(reset=True)
            out = np.minimum(np.array(task), raw.shape)
            begin, end = net.input_box(0, out)
            x = torch.rand(1, 1, *(end - begin).tolist())
            with torch.inference_mode():
                net(x)
                t = time.perf_counter()
                net(x)
                s = time.perf_counter() - t
            row(f"net on one {tuple(out.tolist())} box, {precision}", float(np.prod(out)), s,
                peak_rss())
        with dask.config.set(scheduler="threads"):
            vol = as_volume(raw, vs).chunk({"z": 64, "y": 256, "x": 256})
            peak_rss(reset=True)
            t = time.perf_counter()
            predict_affinities(vol, model, dtype="uint8", precision=args.precision).data\
                .compute()
            row("library: predict_affinities", raw.size, time.perf_counter() - t, peak_rss())
        if not args.no_pipeline:
            p = pipeline(raw, name, vs, args.precision)
            row(f"pipeline: emdask run, predict stage ({p['workers']} workers)", raw.size,
                p["seconds"], p["peak"], f"user {p['user']:.0f} s, system "
                f"{p['system']:.1f} s")
    print("\n| model | path | Mvoxel/s | useful GFLOP/s | of fp32 peak | of bf16 peak | "
          "peak memory | CPU time |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
