"""The ``emdask`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from emdask.data import sample

    ds = sample()
    raw, gt = ds.raw, ds.neuron_ids
    print("emdask demo: bundled sample (FlyEM medulla FIB-SEM crop, CC BY)")
    print(f"  raw        {raw.shape} {raw.dtype}, voxel size {raw.attrs['voxel_size']} nm, "
          f"offset {raw.attrs['offset']} nm, chunks {raw.data.chunksize}")
    n_bodies = len(set(gt.values.ravel().tolist()) - {0})
    print(f"  neuron_ids {n_bodies} ground-truth bodies")
    print("The full demo (predict affinities -> watershed -> agglomerate -> evaluate -> figure)")
    print("runs here once the boundary net and segmentation stages land.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emdask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
