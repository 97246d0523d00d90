"""Subspace diffusion on MNIST (or the built-in dataset), on a laptop: `make demo` /
`make demo-quick`.

    python demo.py --mode full  [--workdir runs/demo]        # train 3 small models, analyse,
                                                             # sample, likelihood (11-21 min)
    python demo.py --mode quick [--workdir runs/demo_quick]  # sample from the committed
                                                             # checkpoints (a few min)
    python demo.py --mode smoke --workdir /tmp/smoke          # a few training steps (tests)

`--dataset builtin` runs it on the built-in texture crops instead of MNIST. Results land in
WORKDIR: results.md / results.json (the table), samples.png (the samplers side by side),
nearest.png (samples beside their nearest training images), divergence.png,
subspace_rmsd.json, samples/. `--export_assets` (full mode) copies the EMA weights to
assets/checkpoints/<dataset> and the table and figures to assets/demo/<dataset>.
"""
from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

from absl import flags

import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "full", ["full", "quick", "smoke"],
                  "full: train (or reuse the workdir's models) and measure everything; quick: "
                  "sample from the committed checkpoints; smoke: a tiny run for tests.")
flags.DEFINE_string("workdir", None, "Output folder (default: runs/demo, runs/demo_quick or "
                    "runs/demo_smoke by mode).")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "builtin"],
                  "mnist: the 60,000 / 10,000 MNIST digits; builtin: 32x32 crops of the "
                  "scikit-image photographs.")
flags.DEFINE_bool("reuse_committed", False, "Full mode: use the committed checkpoints instead "
                  "of training.")
flags.DEFINE_bool("export_assets", False, "Full mode: copy the EMA weights to "
                  "assets/checkpoints/<dataset> and the table and figures to "
                  "assets/demo/<dataset>.")
flags.DEFINE_integer("threads", None, "torch CPU threads (default: torch's choice).")
flags.DEFINE_bool("no_progress", False, "Hide progress bars.")


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    """The demo's flags (`argv` without the program name; default: sys.argv[1:]) as a namespace
    with mode, dataset, workdir, reuse_committed, export_assets, threads and no_progress. Bad
    input is one line `error: ...` on stderr and SystemExit(1)."""
    from absl import app

    app.define_help_flags()  # --help / --helpfull, as under app.run
    argv = sys.argv[1:] if argv is None else list(argv)
    FLAGS.unparse_flags()  # main() may run several times in one process (tests)
    rest = cli.parse_flags(["demo.py", *argv])
    if len(rest) > 1:
        cli.fail(f"Unexpected argument '{rest[1]}': demo.py takes flags only (see --help).")
    args = SimpleNamespace(mode=FLAGS.mode, dataset=FLAGS.dataset, workdir=FLAGS.workdir,
                           reuse_committed=FLAGS.reuse_committed,
                           export_assets=FLAGS.export_assets,
                           threads=FLAGS.threads, no_progress=FLAGS.no_progress)
    if args.workdir is None:
        args.workdir = os.path.join("runs", "demo" if args.mode == "full" else f"demo_{args.mode}")
    if args.mode != "full" and (args.reuse_committed or args.export_assets):
        cli.fail("--reuse_committed and --export_assets apply to --mode full only.")
    if args.threads is not None and args.threads < 1:
        cli.fail(f"--threads must be at least 1; got {args.threads}.")
    return args


def _run(args: SimpleNamespace) -> None:
    import torch

    import demo_run
    import demo_settings

    cli.check_writable(args.workdir, "--workdir")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = demo_settings.DemoSettings.for_mode(args.mode, args.dataset)
    demo_run.run_demo(settings, args.workdir, reuse_committed=args.reuse_committed,
                      export_assets=args.export_assets, progress=not args.no_progress)
    with open(os.path.join(args.workdir, "results.md")) as handle:
        print(handle.read())
    print(f"Results: {os.path.join(args.workdir, 'results.md')} (table), "
          f"{os.path.join(args.workdir, 'samples.png')} (samples side by side).")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; bad input and missing files end with one line on stderr and status 1."""
    try:
        args = parse_args(argv)
        logging.basicConfig(level=logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        cli.run_entry_point(_run, args)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
