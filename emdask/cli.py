"""The ``emdask`` command line.

Errors are one line naming the file, key or array and what is wrong (exit code 2 for bad
input, 1 for a failure while running); ``--debug`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import sys

DESCRIPTION = """\
emdask: neurons and their synapses reconstructed from serial-section EM volumes, on Dask.

commands:
  demo    the whole pipeline on the bundled FlyEM sample (and synapses on the larval VNC
          stack with --vnc)
  run     raw EM -> alignment -> affinities -> segmentation -> synapses -> report, from a
          config file; resumable: rerun the same command after a crash
  train   train (or resume training) a boundary or synapse net from a config file
  verify  check that every finished block of an output store is whole (and mark the
          broken ones for recomputation with --repair)
  view    open an output store in neuroglancer (a local viewer; prints its URL)
"""

EXAMPLES = """\
examples:
  emdask demo
  emdask run my_volume.toml --dry-run      # check the config, print the plan
  emdask run my_volume.toml                # run (or resume) every stage
  emdask run my_volume.toml --stage segment --overwrite
  emdask train emdask/weights/fibsem.toml --max-minutes 60
  emdask verify my_volume.zarr --repair    # then rerun: broken blocks are recomputed
  emdask view my_volume.zarr               # raw, affinities, segmentations, synapses

A minimal run config (TOML):
  [input]
  url = "cremi_sample_B.hdf"
  dataset = "volumes/raw"
  [output]
  path = "sample_B.zarr"
  [predict]
  model = "sstem3d"
"""

RUN_EXAMPLES = """\
stages, in order: align (with an [align] section), predict, watershed, agglomerate,
relabel, synapses (with a [synapses] section), pyramid, meshes, skeletons, report.  "segment" stands for watershed,
agglomerate and relabel.  Finished blocks are kept: rerunning the same command resumes.

examples:
  emdask run my_volume.toml --dry-run
  emdask run my_volume.toml
  emdask run my_volume.toml --stage predict
  emdask run my_volume.toml --stage segment --stage report --overwrite
  emdask run my_volume.toml --scheduler tcp://login-node:8786

The config's sections and keys: see emdask.run_config.RunConfig and the README.
"""

#: Exceptions that mean the input (a file, a config, an array) is wrong: exit code 2.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError,
             FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


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
        overwrite=True if args.overwrite else None, dry_run=args.dry_run,
        other_version=args.other_version)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from emdask.pipeline import verify

    problems = verify(args.store, repair=args.repair)
    for problem in problems:
        print(f"  {problem}")
    if not problems:
        print(f"{args.store}: every finished block is whole")
        return 0
    blocks = {(p.stage, p.block) for p in problems}
    print(f"{args.store}: {len(problems)} problem(s) in {len(blocks)} block(s) or outputs; "
          + ("marked for recomputation: rerun `emdask run` with the same config"
             if args.repair else "rerun with --repair, then `emdask run` recomputes them"))
    return 1


def _view(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("neuroglancer") is None:
        raise ImportError("emdask view needs neuroglancer: pip install 'emdask[view]'")
    from emdask.view import main as view

    view(args.store, args.bind, args.port, args.screenshot)
    return 0


def parser() -> argparse.ArgumentParser:
    from emdask import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="emdask", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=formatter)
    p.add_argument("--version", action="version", version=f"emdask {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug also after the command (default suppressed: the main parser's stays)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error")
    demo = sub.add_parser("demo", help="run the pipeline on the bundled sample", parents=[debug],
                          formatter_class=formatter,
                          epilog="example:\n  emdask demo --out demo_output --vnc "
                                 "../shared/data/drosophila_vnc_sstem_gerhard2013/"
                                 "vnc_stack1_synapses_x0-640.h5")
    demo.add_argument("--out", default="emdask_demo_output", help="output folder")
    demo.add_argument("--vnc", help="the larval VNC stack (vnc_stack1_synapses_x0-640.h5): "
                                    "also detect synapses and build the connectome")
    demo.set_defaults(func=_demo)
    tr = sub.add_parser("train", help="train (or resume training) a net", parents=[debug],
                        formatter_class=formatter,
                        epilog="examples:\n  emdask train emdask/weights/fibsem.toml\n"
                               "  emdask train my_net.toml --out runs/mine --max-minutes 120"
                               "   # resume later with the same command")
    tr.add_argument("config", help="TOML or YAML training config (see emdask.training)")
    tr.add_argument("--out", help="output folder (overrides the config's 'out')")
    tr.add_argument("--max-minutes", type=float, help="stop after a checkpoint once "
                    "this much training time has passed (resume later)")
    tr.set_defaults(func=_train)
    from emdask.pipeline import STAGES

    rn = sub.add_parser("run", help="run the pipeline from a config (resumable)", parents=[debug],
                        description="Run the pipeline from a config file: raw EM to "
                        "segmentation, synapses and a report.", epilog=RUN_EXAMPLES,
                        formatter_class=formatter)
    rn.add_argument("config", help="TOML or YAML run config (see emdask.run_config.RunConfig)")
    rn.add_argument("--stage", action="append", choices=[*STAGES, "segment"],
                    metavar="STAGE", help="run only this stage (repeatable): "
                    + ", ".join(STAGES) + ", or segment")
    rn.add_argument("--dry-run", action="store_true", help="check the config and print the "
                    "plan (stages, blocks, sizes, memory per task) without running it")
    rn.add_argument("--scheduler", help="address of a running Dask scheduler to use")
    rn.add_argument("--overwrite", action="store_true", help="redo stages whose outputs "
                    "were made with other parameters")
    rn.add_argument("--other-version", action="store_true", help="go on with a store "
                    "whose stages were run by another emdask version")
    rn.set_defaults(func=_run)
    ve = sub.add_parser("verify", help="check an output store's finished blocks",
                        parents=[debug], formatter_class=formatter,
                        description="Check that every finished block of an emdask output "
                        "store has all its chunks and that they decode; exit code 1 when "
                        "something is missing or broken.",
                        epilog="examples:\n  emdask verify run.zarr\n"
                               "  emdask verify run.zarr --repair && emdask run run.toml")
    ve.add_argument("store", help="the output store (path or fsspec URL)")
    ve.add_argument("--repair", action="store_true", help="mark the broken blocks not "
                    "done, so that the next `emdask run` recomputes them")
    ve.set_defaults(func=_verify)
    vw = sub.add_parser("view", help="open an output store in neuroglancer", parents=[debug],
                        formatter_class=formatter,
                        description="Serve an output store (with CORS headers) and open it "
                        "in a local neuroglancer viewer: raw, affinities, every "
                        "segmentation and label, synapses as points with their partners. "
                        "Prints the URL to open; Ctrl-C stops.",
                        epilog="examples:\n  emdask view run.zarr\n"
                               "  emdask view run.zarr --bind 0.0.0.0 --port 9000   "
                               "# reachable from other machines\n"
                               "  emdask view run.zarr --screenshot view.png")
    vw.add_argument("store", help="the output store of emdask run (a local path)")
    vw.add_argument("--bind", default="127.0.0.1", help="address to listen on "
                    "(default: this machine only)")
    vw.add_argument("--port", type=int, default=0, help="the viewer's port (default: any)")
    vw.add_argument("--screenshot", metavar="FILE", help="render the view in headless "
                    "Chromium, save it as a PNG and exit (needs selenium, chromium and "
                    "chromium-driver)")
    vw.set_defaults(func=_view)
    return p


def _one_line(err: BaseException) -> str:
    text = str(err) if not isinstance(err, KeyError) or not err.args else str(err.args[0])
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # a crash in native code (numba, a codec, torch) prints every thread's Python stack
    with contextlib.suppress(AttributeError, ValueError):  # stderr not a file (captured)
        faulthandler.enable()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("emdask: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        from emdask.store import StoreBusy

        bad_input = isinstance(err, BAD_INPUT)
        plain = bad_input or isinstance(err, StoreBusy)  # a state to report, not a bug
        kind = "" if plain else f"failed: {type(err).__name__}: "
        print(f"emdask: error: {kind}{_one_line(err)}"
              + ("" if plain else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
