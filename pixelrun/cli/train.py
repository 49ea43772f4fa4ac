"""pixelrun train: train (or resume) a run from a config and dotted overrides, or rehearse it."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="train (or resume) a model; no arguments = the built-in CPU demo")
    t.add_argument("--config", help="YAML config file (default: the built-in demo, configs/demo.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    t.add_argument(
        "--rehearse",
        action="store_true",
        help="run this config with every switch as written but at rehearsal size (small width, a few "
        "tokens per side, a few steps per stage, grids, evaluations and checkpoints between), "
        "resume it once and compare, then print a report; in RUN_DIR-rehearsal",
    )
    t.add_argument(
        "--from-checkpoint",
        metavar="STEP",
        help="resume from this older checkpoint of run.dir (step_N or N) instead of the newest; the newer "
        "ones are set aside, not deleted (checkpoints/aside-step_N). A flag, not a config key: it is a "
        "one-off choice of this command, not part of the run's config that a later resume repeats",
    )
    t.set_defaults(func=run)


def run(args) -> int:
    from pixelrun.config import load_config

    cfg = load_config(args.config, args.overrides)  # all validation happens here, before any work
    if args.rehearse and args.from_checkpoint:
        from pixelrun.config import ConfigError

        raise ConfigError("--from-checkpoint", "resumes a run; it cannot be used with --rehearse")
    if args.rehearse:
        from pixelrun.run.rehearse import rehearse

        summary = rehearse(cfg)  # rank 0: the report; other ranks: {}
        if "resume" in summary and not summary["resume"]["same"]:
            return 1  # the rehearsal ran, and found that a resume does not continue the run exactly
    else:
        from pixelrun.run.train import train

        summary = train(cfg, from_checkpoint=args.from_checkpoint)  # checks the data paths first, before any work
    return 128 + summary["signal"] if isinstance(summary.get("signal"), int) else 0
