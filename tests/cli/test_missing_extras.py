"""A command whose optional package is missing says so in one line with the install command, not a
ModuleNotFoundError traceback (issue 30: `pixelrun export --format diffusers` without diffusers)."""

from __future__ import annotations

import sys

from conftest import one_line_error

from pixelrun import cli


def test_a_missing_extra_is_one_line_with_its_install_command(monkeypatch, capsys):
    def needs_diffusers(args):
        import diffusers.pipelines  # noqa: F401  (absent: sys.modules below)

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import of it raises ModuleNotFoundError
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["report"].set_defaults(func=needs_diffusers)
    assert cli.main(["report", "somewhere"]) == 2
    one_line_error(capsys, "'diffusers'", "not installed", "pip install 'pixelrun[diffusers]'")


def test_a_missing_package_that_no_extra_installs_is_not_hidden(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)

    def broken(args):
        import a_module_pixelrun_never_names  # noqa: F401

    parser._subparsers._group_actions[0].choices["report"].set_defaults(func=broken)
    try:
        cli.main(["report", "somewhere"])
    except ModuleNotFoundError as e:
        assert e.name == "a_module_pixelrun_never_names"
    else:
        raise AssertionError("a bug's ModuleNotFoundError must stay a traceback")
