"""The ``emdask`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from emdask.demo import run_demo

    run_demo(args.out, vnc=args.vnc)
    return 0


def _train(args: argparse.Namespace) -> int:
    from emdask.training import load_config, train

    config = load_config(args.config)
    if args.out:
        config.out = args.out
    train(config, max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    return 0


def _run(args: argparse.Namespace) -> int:
    from emdask.pipeline import run

    run(args.config, stages=args.stage, scheduler=args.scheduler,
        overwrite=True if args.overwrite else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emdask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample")
    demo.add_argument("--out", default="emdask_demo_output", help="output folder")
    demo.add_argument("--vnc", help="the larval VNC stack (vnc_stack1_synapses_x0-640.h5): "
                                    "also detect synapses and build the connectome")
    demo.set_defaults(func=_demo)
    tr = sub.add_parser("train", help="train (or resume training) an affinity net")
    tr.add_argument("config", help="TOML training config (see emdask.training)")
    tr.add_argument("--out", help="output folder (overrides the config's 'out')")
    tr.add_argument("--max-minutes", type=float, help="stop after a checkpoint once "
                    "this much training time has passed (resume later)")
    tr.set_defaults(func=_train)
    rn = sub.add_parser("run", help="run the pipeline (raw EM -> segmentation) from a config")
    rn.add_argument("config", help="TOML or YAML run config (see emdask.pipeline)")
    rn.add_argument("--stage", action="append", help="run only this stage (repeatable): "
                    "predict, watershed, agglomerate, relabel, report, or segment")
    rn.add_argument("--scheduler", help="address of a running Dask scheduler to use")
    rn.add_argument("--overwrite", action="store_true", help="redo stages whose outputs "
                    "were made with other parameters")
    rn.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
