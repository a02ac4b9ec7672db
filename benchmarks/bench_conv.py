"""float32 inference on CPU: oneDNN for every convolution against torch's own choice.

    python benchmarks/bench_conv.py [--threads 2] [--repeat 3]

torch (2.13) runs a 3-D convolution of a one-item batch through its slow reference kernel
wherever batch x channels x depth x height <= 20480, which most of a U-Net's deeper levels
are; the inference form (:class:`emdask.models.ValidUNet`) calls oneDNN directly
(``_OneDNNConv3d``).  For each shipped net and box, prints the median seconds of a float32
pass (random input, weights loaded) with oneDNN forced (emdask's default) and with torch's
own choice (with a planar first level in slabs of eight sections, as emdask ran float32
before), and, for a net whose first level is planar, oneDNN with that level in slabs of
eight sections instead of one (the default on CPU).  Training is not timed here: a batch of two
passes the heuristic (see ``TrainConfig.batch_size``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from emdask import models
from emdask.models import pretrained
from emdask.predict import inference_net

BOXES = {"fibsem": (64, 192, 192), "sstem": (32, 512, 512)}


def seconds(net, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of ``repeat`` passes after one warm-up."""
    with torch.inference_mode():
        net(x)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def torch_choice(net) -> None:
    """Back to nn.Conv3d's forward: torch picks the kernel by its heuristic."""
    for m in net.modules():
        if type(m) is models._OneDNNConv3d:
            m.__class__ = nn.Conv3d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, float32, median of {args.repeat} passes\n")
    print("| net | box | variant | s per pass |")
    print("|---|---|---|---|")
    for name, box in BOXES.items():
        x = torch.rand((1, 1, *box))
        rows = []
        net = inference_net(pretrained(name), "cpu", "float32")
        rows.append(("oneDNN forced (default)", seconds(net, x, args.repeat)))
        slab = models._slab
        models._slab = lambda device: 8
        if net.planar0:
            rows.append(("oneDNN forced, slabs of 8 sections", seconds(net, x, args.repeat)))
        torch_choice(net)  # as before: slabs of 8 kept most of the first level above it
        rows.append(("torch's choice, slabs of 8 (before)", seconds(net, x, args.repeat)))
        models._slab = slab
        for label, s in rows:
            print(f"| {name} | {'x'.join(map(str, box))} | {label} | {s:.2f} |")


if __name__ == "__main__":
    main()
