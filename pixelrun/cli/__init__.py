"""The command line: pixelrun train | sample | eval | bench | export | ablate | presets | report | data | demo.

One module per command in this folder (train.py, sample.py, eval.py, ...), each with
``add_parser(subparsers)``, which declares its arguments, and ``run(args) -> int``; common.py holds
what several share. The rule for every command: a config key is set only as a dotted ``KEY=VALUE``
override (of the config to train, or of the checkpoint's own config for sample and eval); flags are
only for what is not a config key (paths, prompts, the device, bench's measurement settings, the
shard layout of data convert). Here: the parser of them all, the overrides anywhere on the line, and
``main``, which turns the errors a user can fix into one line and an exit code."""

from __future__ import annotations

import argparse
import re
import sys

from pixelrun.cli import ablate, bench, common, data, demo, export, presets, report, sample, train
from pixelrun.cli import eval as evaluate
from pixelrun.config import ConfigError, RunFailed
from pixelrun.data import NoUsableData

COMMANDS = (train, sample, evaluate, bench, export, ablate, presets, report, data, demo)  # in the order of --help


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixelrun", description="Pixel-space text-to-image diffusion training.")
    ap.add_argument("--version", action="version", version=f"pixelrun {common.package_version()}")
    subparsers = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return ap


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, with `key=value` overrides accepted anywhere on the line, before or after flags:
    argparse fills the `overrides` positional from the first run of positionals only, so the later
    ones come back unrecognised and join it here. Anything else unrecognised is argparse's error."""
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if _OVERRIDE.match(a)]
    unknown = [a for a in rest if not _OVERRIDE.match(a)]
    if extra and not hasattr(args, "overrides"):
        unknown = rest  # this subcommand takes no overrides
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"pixelrun: config error: {e}", file=sys.stderr)
        return 2
    except NoUsableData as e:
        print(f"pixelrun: config error: data.path: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"pixelrun: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"pixelrun: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"pixelrun: this needs the package {e.name.split('.')[0]!r}, which is not installed: "  # type: ignore[union-attr]
            f"pip install 'pixelrun[{extra}]'",
            file=sys.stderr,
        )
        return 2


# The optional packages and the extra of pyproject.toml that installs each: a command that imports one
# missing says so in one line instead of a ModuleNotFoundError traceback.
EXTRAS = {
    "diffusers": "diffusers",
    "peft": "lora",
    "ftfy": "diffusers",
    "accelerate": "diffusers",
    "wandb": "wandb",
    "datasets": "hub",
    "gradio": "demo",
    "submitit": "slurm",
}


def _quiet_libraries() -> None:
    """transformers draws a "Loading weights" bar for every network it loads (text encoder, teachers,
    metric networks): noise around pixelrun's own progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
