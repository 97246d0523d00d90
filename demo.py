"""Subspace diffusion on the built-in dataset, on a laptop: `make demo` / `make demo-quick`.

    python demo.py --mode full  [--workdir runs/demo]        # train 3 small models, analyse,
                                                             # sample, likelihood (~15 min, 2 cores)
    python demo.py --mode quick [--workdir runs/demo_quick]  # sample from the committed
                                                             # checkpoints (~1 min)
    python demo.py --mode smoke --workdir /tmp/smoke          # a few training steps (tests)

Results land in WORKDIR: results.md / results.json (the table), samples.png (the samplers side
by side), divergence.png, subspace_rmsd.json, samples/. `--export_assets` (full mode) copies the
EMA weights to assets/checkpoints/builtin and the table and figures to assets/demo.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python demo.py",
        description="Subspace diffusion on the built-in dataset: train or reuse small models, "
                    "choose cutoffs by the orthogonal Fisher divergence, compare full-only and "
                    "subspace sampling at the same number of steps.")
    parser.add_argument("--mode", choices=("full", "quick", "smoke"), default="full",
                        help="full: train (or reuse the workdir's models) and measure everything;"
                             " quick: sample from the committed checkpoints; smoke: a tiny run "
                             "for tests (default: %(default)s)")
    parser.add_argument("--workdir", default=None,
                        help="output folder (default: runs/demo, runs/demo_quick or "
                             "runs/demo_smoke by mode)")
    parser.add_argument("--reuse_builtin", action="store_true",
                        help="full mode: use the committed checkpoints instead of training")
    parser.add_argument("--export_assets", action="store_true",
                        help="full mode: copy the EMA weights to assets/checkpoints/builtin and "
                             "the table and figures to assets/demo")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = os.path.join("runs", "demo" if args.mode == "full" else f"demo_{args.mode}")
    if args.mode != "full" and (args.reuse_builtin or args.export_assets):
        parser.error("--reuse_builtin and --export_assets apply to --mode full only.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}.")
    return args


def main(argv=None) -> int:
    """Run the demo; bad input and missing files end with one line on stderr and status 1."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    import demo_lib
    from utils import CheckpointError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = demo_lib.DemoSettings.for_mode(args.mode)
    try:
        demo_lib.run_demo(settings, args.workdir, reuse_builtin=args.reuse_builtin,
                          export_assets=args.export_assets, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        if os.environ.get("SUBSPACE_DEBUG"):
            raise
        print(f"error: {error.args[0] if error.args else error!r}", file=sys.stderr)
        return 1
    with open(os.path.join(args.workdir, "results.md")) as handle:
        print(handle.read())
    print(f"Results: {os.path.join(args.workdir, 'results.md')} (table), "
          f"{os.path.join(args.workdir, 'samples.png')} (samples side by side).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
