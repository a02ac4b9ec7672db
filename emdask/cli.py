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


def _train(args: argparse.Namespace) -> int:
    from emdask.train import load_config, train

    config = load_config(args.config)
    if args.out:
        config.out = args.out
    train(config, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emdask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample")
    demo.set_defaults(func=_demo)
    tr = sub.add_parser("train", help="train (or resume training) an affinity net")
    tr.add_argument("config", help="TOML training config (see emdask.train)")
    tr.add_argument("--out", help="output folder (overrides the config's 'out')")
    tr.add_argument("--max-minutes", type=float, help="stop after a checkpoint once "
                    "this much training time has passed (resume later)")
    tr.set_defaults(func=_train)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
