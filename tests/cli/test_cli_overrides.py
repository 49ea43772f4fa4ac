"""`key=value` overrides anywhere on a subcommand's line, before, between or after its flags;
anything else argparse does not know is its usual error."""

from __future__ import annotations

import pytest

from pixelrun.cli import build_parser, main, parse_args


@pytest.mark.parametrize(
    "line, overrides",
    [
        (["bench", "--steps", "3", "train.batch_size=2", "--variants", "dense"], ["train.batch_size=2"]),
        (["bench", "a.b=1", "--steps", "3", "c=2", "--variants", "dense", "d.e=x=y"], ["a.b=1", "c=2", "d.e=x=y"]),
        (["train", "x=1", "--config", "f"], ["x=1"]),
        (["train", "--config", "f", "x=1", "y=2"], ["x=1", "y=2"]),
        (["export", "--checkpoint", "c", "--out", "o", "sample.shift=3"], ["sample.shift=3"]),
        (
            ["sample", "--checkpoint", "c", "sample.steps=2", "--out", "o", "sample.seed=3"],
            ["sample.steps=2", "sample.seed=3"],
        ),
        (
            ["eval", "eval.prompts=4", "--checkpoint", "c", "eval.metrics=[shapes]"],
            ["eval.prompts=4", "eval.metrics=[shapes]"],
        ),
    ],
)
def test_overrides_anywhere(line, overrides):
    args = parse_args(build_parser(), line)
    assert args.overrides == overrides
    if line[0] == "bench":
        assert (args.steps, args.variants) == (3, "dense")
    if line[0] == "train":
        assert args.config == "f"


@pytest.mark.parametrize(
    "line, named",
    [
        (["train", "--config", "f", "x=1", "--bogus"], "--bogus"),
        (["bench", "--steps", "3", "x=1", "--nope", "2"], "--nope 2"),
        (["presets", "a=1"], "a=1"),  # a subcommand without overrides
    ],
)
def test_anything_else_is_argparse_error(line, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(line)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"pixelrun: error: unrecognized arguments: {named}")


def test_overrides_after_flags_reach_the_config(capsys):
    """The override after the flags is applied (an invalid value fails naming its key)."""
    assert main(["bench", "--steps", "1", "--variants", "dense", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_every_command_is_a_module_with_add_parser_and_run():
    """pixelrun/cli/<command>.py declares its arguments in add_parser and does its work in run."""
    import pixelrun.cli

    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert names == {"train", "sample", "eval", "bench", "export", "ablate", "presets", "report", "data", "demo"}
    for command in pixelrun.cli.COMMANDS:
        assert callable(command.add_parser) and callable(command.run), command.__name__
    for line in (
        ["sample", "--checkpoint", "c", "--out", "o"],
        ["eval", "--checkpoint", "c"],
        ["data", "inspect", "s"],
        ["presets"],
        ["demo", "runs/demo"],
    ):
        assert parse_args(build_parser(), line).func.__module__ == f"pixelrun.cli.{line[0]}"
