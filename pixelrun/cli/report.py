"""pixelrun report RUN: a run's curves and sample grids as PNGs and one self-contained HTML page."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    rp = subparsers.add_parser(
        "report",
        help="a run's curves and sample grids as PNGs and one self-contained HTML page",
        description="Plots every loss term, the validation loss by noise level, the evaluation metrics, the "
        "learning rate, gradient norm and images/s of RUN's metrics.jsonl, and writes them with RUN's "
        "sample grids into report.html (images embedded: it opens without a server). Runs while "
        "training too.",
    )
    rp.add_argument("run", help="a run folder (the one `pixelrun train` writes, with metrics.jsonl)")
    rp.add_argument("--out", help="output folder (default RUN/report)")
    rp.set_defaults(func=run)


def run(args) -> int:
    from pixelrun.experiments.report import write_run_report

    for path in write_run_report(args.run, args.out):
        print(path)
    return 0
