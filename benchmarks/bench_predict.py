"""Boundary-net throughput: voxels per second on CPU (and GPU when present), with the
model's FLOPs per voxel, so throughput can be compared to the hardware's peak.

    python benchmarks/bench_predict.py [--model fibsem] [--shape 64 256 256]

Counts output voxels of a chunked run over a volume (the halo's recomputation included,
as in real use) and of the net alone on one patch (no halo overhead).
"""

from __future__ import annotations

import argparse
import time

import dask
import numpy as np
import torch

from emdask.models import pretrained
from emdask.predict import _run_net, predict_affinities
from emdask.volumes import as_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fibsem")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--chunks", type=int, nargs=3, default=[64, 128, 128])
    args = parser.parse_args()
    model = pretrained(args.model)
    flops = model.flops_per_voxel()
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {flops / 1e3:.1f} kFLOP per output voxel, field of view "
          f"{model.field_of_view}, halo {model.halo}")
    raw = np.random.default_rng(0).integers(0, 256, args.shape).astype(np.uint8)
    vol = as_volume(raw, model.config.voxel_size).chunk(dict(zip("zyx", args.chunks,
                                                                  strict=True)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n| device | mode | Mvoxel | seconds | voxel/s | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        patch = tuple(int(c + 2 * h) for c, h in zip(args.chunks, model.halo, strict=True))
        x = np.random.default_rng(1).random(patch).astype(np.float32)
        _run_net(model.to(device), x, device, None, 1)  # warm up
        t = time.perf_counter()
        _run_net(model, x, device, None, 1)
        s = time.perf_counter() - t
        n = x.size
        print(f"| {device} | net on one {patch} patch | {n / 1e6:.2f} | {s:.2f} | "
              f"{n / s:,.0f} | {n * flops / s / 1e9:.1f} |")
        t = time.perf_counter()
        with dask.config.set(scheduler="threads" if device == "cpu" else "sync"):
            predict_affinities(vol, model, device=device).data.compute()
        s = time.perf_counter() - t
        print(f"| {device} | chunked {tuple(args.chunks)} over {tuple(args.shape)} | "
              f"{raw.size / 1e6:.2f} | {s:.2f} | {raw.size / s:,.0f} | "
              f"{raw.size * flops / s / 1e9:.1f} (useful) |")


if __name__ == "__main__":
    main()
